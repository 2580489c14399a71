"""Benchmark: feature-extraction throughput (images/s) of ResNet-18 (and ResNet-50) on CPU and GPU.

Two figures per model and device, after one untimed warm-up batch:
``end_to_end``: ``extract_features`` over the ROxford5k gallery of a synthetic benchmark (JPEG decoding
and resizing in DataLoader workers, forward pass, gather), what ``scripts/test.sh`` does per model;
``forward``: the model alone on batches already in memory (on the device), the compute ceiling.
The gap between the two is data loading. Random weights: throughput does not depend on them.

    python tools/benchmark.py extraction [--root DIR] [--img-size 224] [--batch-size 64] [--workers 2]
"""

import os
import tempfile
import time

import torch
from torch.utils.data import Subset

from advbct.data.decoding import ImageInput
from advbct.data.synthetic import make_synthetic
from advbct.evaluation.features import extract_features
from advbct.evaluation.protocol import image_datasets, load_test_set
from advbct.models import build_model


def add_arguments(parser):
    """Options of this benchmark."""
    parser.add_argument("--root", default=None,
                        help="synthetic benchmark root (tools/make_synthetic.py --out); default: generate the "
                             "'small' preset into a temporary folder")
    parser.add_argument("--img-size", type=int, default=224, help="images are resized to this (default 224)")
    parser.add_argument("--batch-size", type=int, default=64, help="images per batch (default 64)")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers (default 2)")
    parser.add_argument("--max-images", type=int, default=256,
                        help="images embedded per measurement, 0 = the whole gallery (default 256)")
    parser.add_argument("--resnet50", action="store_true", help="also measure ResNet-50")
    parser.add_argument("--amp", action="store_true", help="also measure bf16 autocast on the GPU")
    parser.add_argument("--embed-dim", type=int, default=256, help="embedding size (default 256)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    return parser


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _forward_img_s(model, device, n_images, batch_size, img_size, amp):
    """Images/s of the model alone on random batches already on ``device``."""
    batch = torch.randn(batch_size, 3, img_size, img_size, device=device)
    n_batches = max(1, n_images // batch_size)
    ctx = torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp)
    with torch.no_grad(), ctx:
        model(batch)  # warm-up (cuDNN autotuning, allocator)
        _sync(device)
        start = time.perf_counter()
        for _ in range(n_batches):
            model(batch)
        _sync(device)
    return n_batches * batch_size / (time.perf_counter() - start)


def _measure(arch, device, dataset, args, amp=False):
    model = build_model(arch, embed_dim=args.embed_dim, pretrained=False).to(device).eval()
    kw = dict(batch_size=args.batch_size, num_workers=args.workers, device=device, amp=amp, progress=False)
    extract_features(model, Subset(dataset, range(min(args.batch_size, len(dataset)))), **kw)  # warm-up
    _sync(device)
    start = time.perf_counter()
    feats = extract_features(model, dataset, **kw)  # returns on the CPU: includes the device sync
    seconds = time.perf_counter() - start
    assert feats.shape == (len(dataset), args.embed_dim) and torch.isfinite(feats).all()
    return {"end_to_end_img_s": round(len(dataset) / seconds, 1), "end_to_end_s": round(seconds, 3),
            "forward_img_s": round(_forward_img_s(model, device, len(dataset), args.batch_size,
                                                  args.img_size, amp), 1)}


def _run_on(root, args):
    test_set = load_test_set("roxford5k", os.path.join(root, "ROxfordParis"))
    _, gallery = image_datasets(test_set, ImageInput(args.img_size))
    n = len(gallery) if args.max_images <= 0 else min(args.max_images, len(gallery))
    dataset = Subset(gallery, range(n))
    archs = ["resnet18"] + (["resnet50"] if args.resnet50 else [])
    result = {"benchmark": "extract_features throughput (images/s), random-weight models, embed "
                           f"{args.embed_dim}-d", "images": n, "img_size": args.img_size,
              "batch_size": args.batch_size, "workers": args.workers, "cpu_threads": torch.get_num_threads()}
    result["cpu"] = {arch: _measure(arch, torch.device("cpu"), dataset, args) for arch in archs}
    if torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
        gpu = {"device": torch.cuda.get_device_name(device)}
        for arch in archs:
            gpu[arch] = _measure(arch, device, dataset, args)
            if args.amp:
                gpu[f"{arch}_bf16"] = _measure(arch, device, dataset, args, amp=True)
        result["gpu"] = gpu
    else:
        result["gpu"] = "unmeasured (no CUDA device visible)"
    return result


def run(args):
    """Throughput figures of ``extract_features`` (see the module docstring)."""
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if args.root:
        return {**_run_on(args.root, args), "root": args.root}
    with tempfile.TemporaryDirectory(prefix="advbct-extraction-bench-") as tmp:
        start = time.perf_counter()
        make_synthetic(tmp, preset="small", seed=0)
        generated_s = time.perf_counter() - start
        return {**_run_on(tmp, args), "root": "generated 'small' preset (temporary)",
                "generate_s": round(generated_s, 1)}


if __name__ == "__main__":
    import argparse
    import json

    print(json.dumps(run(add_arguments(argparse.ArgumentParser(description=__doc__)).parse_args()), indent=1))
