"""Benchmark: training throughput of one step, plain (L_cls) vs AdvBCT (+ frozen old model + L_EB + L_adv).

Times the trainer's own step (``Trainer._step``: forward, CE, old-model forward, compatibility loss,
backward, SGD update) on in-memory random batches, median over steps after a warm-up. The models
have the paper's heads (256-d embedding, 81,313 new classes, 24,393 old ones as extended-class) and
the AdvBCT loss a random old-class meta. On CPU: ResNet-18 at 64 px, batch 64, fp32 (``--cpu-amp bf16``,
``--channels-last`` and ``--cpu-arch resnet50`` measure the synthetic R50 blocks' setting). With CUDA:
ResNet-18 and ResNet-50 at 224 px, batch 256, AMP bf16 and fp32 (else reported as unmeasured).
Beside both steps it times the frozen old model's forward alone (``embed`` under no_grad, as AdvBCT's step
runs it), so that ``advbct_overhead`` = (AdvBCT step - plain step - old forward) / plain step is what the
AdvBCT losses and their backward add to plain training (the GPU check's target: < 5 %).
``--compile`` runs the new model through ``torch.compile`` (the trainer does not: on the 2-core AMD EPYC it
gained nothing, docs/BENCHMARKS.md); its first step, compilation included, is reported as ``first_step_s``.

    python tools/benchmark.py training [--steps 5] [--threads 1] [--channels-last] [--compile] [--json OUT]
"""

from __future__ import annotations

import argparse
import statistics
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from advbct.engine.precision import autocast_context, memory_format
from advbct.engine.trainer import Trainer
from advbct.losses import build_compat_loss
from advbct.meta import ClassMeta
from advbct.models import build_model
from benchmarks.timing import timed_calls


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--steps", type=int, default=5, help="timed steps per setting (median reported)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (allocator, autotuning)")
    parser.add_argument("--emb-dim", type=int, default=256)
    parser.add_argument("--num-classes", type=int, default=81313, help="new classifier outputs (GLDv2)")
    parser.add_argument("--old-classes", type=int, default=24393, help="old classes (extended-class)")
    parser.add_argument("--old-fraction", type=float, default=0.3, help="share of old-class samples per batch")
    parser.add_argument("--cpu-arch", default="resnet18")
    parser.add_argument("--cpu-size", type=int, default=64, help="CPU input size (px)")
    parser.add_argument("--cpu-batch", type=int, default=64)
    parser.add_argument("--cpu-amp", choices=("none", "bf16"), default="none", help="CPU autocast (TRAIN.AMP)")
    parser.add_argument("--channels-last", action="store_true",
                        help="models and batches in NHWC on every device (TRAIN.CHANNELS_LAST)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the new model (not the old one)")
    parser.add_argument("--gpu-archs", default="resnet18,resnet50")
    parser.add_argument("--gpu-size", type=int, default=224)
    parser.add_argument("--gpu-batch", type=int, default=256)
    parser.add_argument("--no-cpu", action="store_true", help="skip the CPU measurement")
    parser.add_argument("--no-gpu", action="store_true", help="skip the CUDA measurements")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--seed", type=int, default=0)


def random_meta(num_classes: int, dim: int, gen: torch.Generator) -> ClassMeta:
    """A plausible old-class meta: centers of norm 0.3-0.9, radii 0.5-1.4, 2-7 kept samples per class."""
    centers = F.normalize(torch.randn(num_classes, dim, generator=gen), dim=1)
    centers = centers * torch.empty(num_classes, 1).uniform_(0.3, 0.9, generator=gen)
    r_max = torch.empty(num_classes).uniform_(0.5, 1.4, generator=gen)
    n_kept = torch.randint(2, 8, (num_classes,), generator=gen)
    return ClassMeta(centers=centers, r_max=r_max, r_min=0.5 * r_max, counts=n_kept.clone(), n_kept=n_kept,
                     theta_max=torch.empty(num_classes).uniform_(0.3, 1.2, generator=gen))


def frozen_old_model(args, arch, device):
    """The old model as AdvBCT's step holds it: eval mode, no gradients, in the step's memory format."""
    old_model = build_model(arch, embed_dim=args.emb_dim, num_classes=args.old_classes)
    return old_model.to(device, memory_format=memory_format(args.channels_last)).eval().requires_grad_(False)


def make_stepper(args, arch, device, amp, advbct, gen):
    """A stand-in ``self`` for ``Trainer._step`` holding exactly what the step reads (world size 1)."""
    fmt = memory_format(args.channels_last)
    model = build_model(arch, embed_dim=args.emb_dim, num_classes=args.num_classes).to(device, memory_format=fmt)
    model.train()
    old_model, comp = None, None
    if advbct:
        old_model = frozen_old_model(args, arch, device)
        comp = build_compat_loss({"TYPE": "advbct"}, embed_dim=args.emb_dim, num_old_classes=args.old_classes,
                                 total_epochs=30, meta=random_meta(args.old_classes, args.emb_dim, gen)).to(device)
    params = list(model.parameters()) + ([p for p in comp.parameters() if p.requires_grad] if comp else [])
    optimizer = torch.optim.SGD(params, lr=1e-3, momentum=0.9, weight_decay=5e-4)
    # the step calls ``ddp``: compiling it compiles the new model's forward and, through it, its backward
    ddp = torch.compile(model) if args.compile else model
    return SimpleNamespace(model=model, ddp=ddp, old_model=old_model, teacher=None, earlier=[], comp_loss=comp, comp_ddp=comp,
                           optimizer=optimizer, scaler=torch.amp.GradScaler(device.type, enabled=False),
                           autocast=lambda: autocast_context(amp, device))


def time_steps(args, arch, device, size, batch, amp, advbct, gen):
    """Median step time (ms) and images/s of ``Trainer._step`` on one fixed random batch."""
    stepper = make_stepper(args, arch, device, amp, advbct, gen)
    images = torch.randn(batch, 3, size, size, generator=gen).to(device, memory_format=memory_format(args.channels_last))
    is_old = torch.rand(batch, generator=gen) < args.old_fraction
    labels = torch.where(is_old, torch.randint(0, args.old_classes, (batch,), generator=gen),
                         torch.randint(args.old_classes, args.num_classes, (batch,), generator=gen)).to(device)
    # float() waits for the step; every step is timed, warm-up included: the first one (compilation, if
    # any) is reported apart
    times = timed_calls(lambda: float(Trainer._step(stepper, images, labels, 0, 0.5)["total"]),
                        args.warmup + args.steps, device)
    ms = statistics.median(times[args.warmup:]) * 1000.0
    return {"step_ms": round(ms, 2), "img_per_s": round(batch / ms * 1000.0, 1), "first_step_s": round(times[0], 2)}


def time_old_forward(args, arch, device, size, batch, amp, gen):
    """Median time (ms) of the frozen old model's forward alone, as ``Trainer._step`` runs it for AdvBCT
    (``old_model.embed(images)`` under no_grad, in the step's autocast and memory format)."""
    old_model = frozen_old_model(args, arch, device)
    images = torch.randn(batch, 3, size, size, generator=gen).to(device, memory_format=memory_format(args.channels_last))

    def forward():
        with torch.no_grad(), autocast_context(amp, device):
            float(old_model.embed(images).float()[0, 0])  # waits for the forward

    ms = statistics.median(timed_calls(forward, args.warmup + args.steps, device)[args.warmup:]) * 1000.0
    return {"step_ms": round(ms, 2), "img_per_s": round(batch / ms * 1000.0, 1)}


def advbct_overhead(plain_ms: float, advbct_ms: float, old_forward_ms: float) -> float:
    """What AdvBCT adds to a plain step besides the old model's forward, as a fraction of the plain step:
    (AdvBCT step - plain step - old forward) / plain step."""
    return (advbct_ms - plain_ms - old_forward_ms) / plain_ms


def compare(args, arch, device, size, batch, amp, gen):
    plain = time_steps(args, arch, device, size, batch, amp, False, gen)
    adv = time_steps(args, arch, device, size, batch, amp, True, gen)
    old = time_old_forward(args, arch, device, size, batch, amp, gen)
    return {"plain": plain, "advbct": adv, "advbct_time_ratio": round(adv["step_ms"] / plain["step_ms"], 3),
            "old_forward": old,
            "advbct_overhead": round(advbct_overhead(plain["step_ms"], adv["step_ms"], old["step_ms"]), 4)}


def run(args) -> dict:
    """Throughput plain vs AdvBCT on CPU (``--cpu-amp``) and, with CUDA, per GPU arch x {bf16, fp32}."""
    if args.compile and args.warmup < 1:
        raise SystemExit("benchmark training: --compile needs --warmup >= 1 (the first step compiles)")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(args.seed)
    torch.manual_seed(args.seed)
    result = {"setup": {"emb_dim": args.emb_dim, "num_classes": args.num_classes, "old_classes": args.old_classes,
                        "old_fraction": args.old_fraction, "steps": args.steps, "warmup": args.warmup,
                        "channels_last": bool(args.channels_last), "compile": bool(args.compile)}}
    if not args.no_cpu:
        cpu = {"arch": args.cpu_arch, "img_size": args.cpu_size, "batch": args.cpu_batch, "amp": args.cpu_amp,
               "threads": torch.get_num_threads()}
        cpu.update(compare(args, args.cpu_arch, torch.device("cpu"), args.cpu_size, args.cpu_batch, args.cpu_amp, gen))
        result["cpu"] = cpu
    if args.no_gpu:
        result["cuda"] = "unmeasured (--no-gpu)"
    elif not torch.cuda.is_available():
        result["cuda"] = "unmeasured (no CUDA device)"
    else:
        device = torch.device("cuda", torch.cuda.current_device())
        torch.backends.cudnn.benchmark = True
        cuda = {"device": torch.cuda.get_device_name(device), "img_size": args.gpu_size, "batch": args.gpu_batch,
                # fp32 rows run with torch's defaults, as the trainer: cuDNN may use TF32, matmuls do not
                "tf32": {"cudnn": bool(torch.backends.cudnn.allow_tf32),
                         "matmul": bool(torch.backends.cuda.matmul.allow_tf32)}}
        for arch in [a.strip() for a in args.gpu_archs.split(",") if a.strip()]:
            cuda[arch] = {("fp32" if amp == "none" else amp): compare(args, arch, device, args.gpu_size,
                                                                      args.gpu_batch, amp, gen)
                          for amp in ("bf16", "none")}
            torch.cuda.empty_cache()
        result["cuda"] = cuda
    return result
