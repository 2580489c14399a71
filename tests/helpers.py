"""Small helpers shared by the test modules (not fixtures)."""

import socket
import subprocess
from pathlib import Path

import numpy as np
from PIL import Image

SCRIPTS_LIB = Path(__file__).resolve().parent.parent / "scripts" / "lib"


def write_image_list(root, classes=4, per_class=8, size=16, seed=0):
    """``classes`` x ``per_class`` small PNGs (class-dependent colour + noise) and their list file."""
    rng = np.random.default_rng(seed)
    (root / "img").mkdir(parents=True, exist_ok=True)
    lines = []
    for c in range(classes):
        for i in range(per_class):
            pixels = np.clip(rng.normal(40 + 50 * c, 30, (size, size, 3)), 0, 255).astype(np.uint8)
            rel = f"img/c{c}_{i}.png"
            Image.fromarray(pixels).save(root / rel)
            lines.append(f"{rel} {c}\n")
    (root / "train.txt").write_text("".join(lines))
    return root / "train.txt"


def run_pipeline_lib(snippet, cwd, **kwargs):
    """Run ``snippet`` in bash (strict mode) after sourcing the scripts' launch.sh and pipeline.sh."""
    script = f"set -euo pipefail; source {SCRIPTS_LIB}/launch.sh; source {SCRIPTS_LIB}/pipeline.sh; {snippet}"
    return subprocess.run(["bash", "-c", script], cwd=cwd, capture_output=True, text=True, **kwargs)


def free_port():
    """A TCP port free on 127.0.0.1 now (for a test's process group)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def ref_hot_refresh(x, fo, labels, tau, k, detach_keys=False):
    """Per-sample Hot-refresh loss (mean over rows): for row i the positive <f_n,i, f_o,i>, then the
    new-to-old and new-to-new negatives j of other classes, each kind cut to its k largest (k > 0);
    ``detach_keys``: the new-to-new keys f_n,j carry no gradient (the release's gather)."""
    import torch

    fn_hat, fo_hat = x / x.norm(dim=1, keepdim=True), fo / fo.norm(dim=1, keepdim=True)
    keys = fn_hat.detach() if detach_keys else fn_hat
    total = 0.0
    for i in range(len(labels)):
        pos = torch.dot(fn_hat[i], fo_hat[i])
        others = [j for j in range(len(labels)) if labels[j] != labels[i]]
        n2o = torch.stack([torch.dot(fn_hat[i], fo_hat[j]) for j in others]) if others else torch.zeros(0)
        n2n = torch.stack([torch.dot(fn_hat[i], keys[j]) for j in others]) if others else torch.zeros(0)
        if k > 0:
            n2o = torch.sort(n2o, descending=True).values[:k]
            n2n = torch.sort(n2n, descending=True).values[:k]
        logits = torch.cat([pos[None], n2o, n2n]) / tau
        total = total + torch.logsumexp(logits, 0) - logits[0]
    return total / len(labels)
