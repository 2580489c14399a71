"""Small helpers shared by the test modules (not fixtures)."""

import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parent.parent   # the repository root
SCRIPTS_LIB = REPO / "scripts" / "lib"


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


def run_pipeline_steps(plan, cwd, **kwargs):
    """Run the Python expression ``plan`` (a list of advbct.pipelines steps, names of advbct.pipelines in
    scope) with ``run_steps`` in a fresh interpreter from ``cwd``, as the pipelines' command line does
    (a failing step: one ``error: ...`` line, exit status 1)."""
    code = ("import sys\nfrom advbct.cli import guarded\nfrom advbct.pipelines import *\n"
            f"sys.exit(guarded(run_steps)({plan}))")
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, **kwargs)


def write_results(path, dataset, self_m, cross_m, old_m):
    """``path/results.json`` as scripts/test.sh writes it for ``dataset``: the self, cross and old self-test
    headline values given (revisited sets: Medium ``v``, Easy ``v + 1``, Hard ``v - 1``; gldv2: mAP@100)."""
    import json

    def metrics(v):
        if dataset == "gldv2":
            return {"mAP@100": v}
        return {"mAP": {"easy": v + 1, "medium": v, "hard": v - 1}}

    path.mkdir(parents=True)
    (path / "results.json").write_text(json.dumps({
        "dataset": dataset, "self_test": metrics(self_m), "cross_test": metrics(cross_m),
        "old_self_test": metrics(old_m)}))


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


# ------------------------------------------------- two processes against one (tests/engine/test_trainer_ddp.py,
# tests/scripts/test_launch.py): the same global batch, one step, resnet18 with synchronised BatchNorm
TRAIN_WORLD, TRAIN_BATCH, TRAIN_EMB = 2, 8, 32


def base_overrides(data, out, batch, extra=()):
    """The one-step training both sides of a two-process comparison run: ``data`` an image list folder
    (``train.txt``), ``batch`` images per process, ``extra`` more KEY VALUE overrides."""
    return ["OUTPUT", str(out), "DATA.TRAIN_LIST", str(data / "train.txt"), "DATA.ROOT", str(data),
            "MODEL.ARCH", "resnet18", "MODEL.EMB_DIM", str(TRAIN_EMB), "MODEL.PRETRAINED", "false",
            "DATA.IMG_SIZE", "32", "DATA.NUM_WORKERS", "0", "TRAIN.BATCH_SIZE", str(batch),
            "TRAIN.EPOCHS", "1", "TRAIN.MAX_ITERS_PER_EPOCH", "1", "TRAIN.PRINT_FREQ", "1",
            "MODEL.SYNC_BN", "true", "SEED", "1234", *extra]


def run_one_process(overrides):
    """The in-process Trainer on ``overrides``; returns its epoch means (Trainer.fit)."""
    from advbct.config import load_config
    from advbct.engine.trainer import Trainer

    return Trainer(load_config(None, overrides)).fit()


def load_checkpoint(path):
    """A checkpoint file's dict, its tensors on the CPU."""
    import torch

    return torch.load(path, map_location="cpu", weights_only=True)


def load_last(out):
    return load_checkpoint(out / "last.pth")


def flat_tensors(tree, prefix=""):
    """The tensors of a checkpoint part (nested dicts/lists) as ``{dotted.key: tensor}``."""
    import torch

    items = tree.items() if isinstance(tree, dict) else enumerate(tree) if isinstance(tree, (list, tuple)) else ()
    out = {}
    for k, v in items:
        if torch.is_tensor(v):
            out[f"{prefix}{k}"] = v
        else:
            out.update(flat_tensors(v, f"{prefix}{k}."))
    return out


def relative_error(a, b):
    """‖a − b‖ / ‖b‖: float reduction order differs between 1 and 2 processes, so elementwise
    tolerances fail on near-zero entries while the tensor as a whole agrees to ~1e-6."""
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp(min=1e-12))


def assert_states_close(a, b, what, tol, rms_floor=1e-6):
    """Per tensor ‖a − b‖ <= tol·‖b‖ + rms_floor·√n. The floor covers gradients that are analytically
    zero (a bias right before BatchNorm, e.g. the discriminator's first Linear) and hence pure
    rounding noise; a real mismatch moves gradients by their own size (~1e-2 here)."""
    import torch

    assert a.keys() == b.keys(), what
    for key in a:
        if not a[key].is_floating_point():  # e.g. num_batches_tracked
            assert torch.equal(a[key], b[key]), f"{what} {key}"
            continue
        x, y = a[key].double(), b[key].double()
        bound = tol * float(y.norm()) + rms_floor * y.numel() ** 0.5
        assert float((x - y).norm()) <= bound, f"{what} {key}: relative error {relative_error(x, y)}"


def momentum_buffers(state):
    """The SGD momentum buffers of a checkpoint, by parameter index (after one step: the first gradient)."""
    opt = state["optimizer"]["state"]
    return {i: opt[i]["momentum_buffer"] for i in sorted(opt)}


def call_main(main, argv, capfd):
    """``main(argv)`` of an entry point called in this process, as its command line runs it (``sys.exit(main())``):
    a ``CompletedProcess`` with the exit status (a ``SystemExit``'s code, or main's return value; None is 0) and
    what reached stdout and stderr, ``capfd`` capturing them. The caller sets the folder and the environment
    the script would (monkeypatch.chdir / setenv); what the bash wrapper itself does is not run."""
    capfd.readouterr()   # what the test printed before
    try:
        code = main(list(argv))
    except SystemExit as exc:
        code = exc.code
    out, err = capfd.readouterr()
    return subprocess.CompletedProcess(list(argv), 0 if code is None else code, out, err)


def fork_main(main, argv, env, log, cwd=None, new_group=False):
    """``main(argv)`` (an entry point's, e.g. tools/train.py's) in a child forked from this process, which has
    imported torch already: a start costs milliseconds, not the seconds of a fresh Python. The child's
    environment is ``env`` alone, it uses one torch thread and no GPU (as a torchrun worker on the CPU) and
    writes stdout and stderr to ``log``, from ``cwd`` (default: this process's folder), in a process group of
    its own with ``new_group`` (``os.killpg(pid, ...)`` then reaches what it starts too); its exit status is
    main's (``sys.exit`` code or return value; 1 on an exception, printed). Returns its pid
    (:func:`wait_children`)."""
    import os
    import traceback

    pid = os.fork()
    if pid:
        return pid
    code = 1
    try:
        if new_group:
            os.setpgid(0, 0)
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        sys.stdout = sys.stderr = open(fd, "w", buffering=1, closefd=False)
        os.environ.clear()
        os.environ.update(env)
        if cwd is not None:
            os.chdir(cwd)
        import torch
        torch.set_num_threads(1)
        torch.cuda.is_available = lambda: False
        result = main(list(argv))
        code = result if isinstance(result, int) else 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:
        traceback.print_exc()
    finally:
        try:
            sys.stdout.flush()
        finally:
            os._exit(code)


def wait_children(pids, logs, timeout=300):
    """Wait for the forked children ``pids`` (killing all once ``timeout`` s passed or one failed and the rest
    outlived it by 60 s) and require that every one exited 0; otherwise fail with the end of each log."""
    import os
    import signal
    import time

    deadline, codes, first_failure = time.monotonic() + timeout, {}, None
    while len(codes) < len(pids):
        for pid in pids:
            if pid in codes:
                continue
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                codes[pid] = os.waitstatus_to_exitcode(status)
                if codes[pid] != 0 and first_failure is None:
                    first_failure = time.monotonic()
        now = time.monotonic()
        if len(codes) < len(pids) and (now > deadline or (first_failure is not None and now > first_failure + 60)):
            for pid in pids:
                if pid not in codes:
                    os.kill(pid, signal.SIGKILL)
                    codes[pid] = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
        time.sleep(0.01)
    failed = [(pid, codes[pid], Path(log).read_text()[-4000:] if Path(log).exists() else "")
              for pid, log in zip(pids, logs) if codes[pid] != 0]
    assert not failed, failed
    return [codes[pid] for pid in pids]
