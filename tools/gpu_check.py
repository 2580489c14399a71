"""GPU check: the tiny pipeline on GPU vs CPU, step times, loss speed-up, faiss-gpu search, all-reduce, nvJPEG decoding.

    bash tools/gpu_check.sh [--out output/gpu_check/gpu_check.json] [--steps pipeline,training,...] [--cpu-dry-run]

Six steps, each recorded in the JSON with its status (ok, failed, skipped + the reason), figures and
seconds; a failed step does not stop the later ones (docs/BENCHMARKS.md, "GPU check"):
  pipeline     the tiny synthetic benchmark end to end through the bash scripts from one backbone pretrained
               on the GPUs: on every visible GPU (NCCL; fp32, TF32 off), then on the CPU (the trainings on as
               many gloo processes, one process otherwise): the headline mAPs must agree within --tolerance
               points, each backbone within 0.25 of its update; the CPU's AdvBCT models evaluated on the
               GPUs within 0.5 points
  training     one training step, ResNet-18/50 at 224 px, batch 256 per GPU, bf16 autocast and fp32,
               NHWC: plain vs AdvBCT and the old model's forward (tools/benchmarks/training.py)
  losses       one compatibility-loss step, vectorised vs the original's per-sample loops, on the GPU
               (tools/benchmarks/losses.py)
  search       faiss-gpu exact search at GLDv2 scale (tools/benchmarks/search.py)
  collectives  all-reduce bus bandwidth over every visible GPU (tools/benchmarks/collectives.py)
  decoding     64 generated 640x480 JPEGs to 224 px model inputs: DATA.DECODE nvjpeg on the GPU against PIL
               (pixels within NVJPEG_PIXEL_TOLERANCE levels), images/s of every mode (tools/benchmarks/loader.py)
Exit status: 0 when no step failed, 1 when one did (a crash, a timeout, a GPU/CPU disagreement, a wrong
all-reduce sum, nvJPEG pixels off PIL's; a performance target missed is reported, not a failure), 2 on a usage
error or without a visible CUDA GPU (--cpu-dry-run runs the CPU-side logic only and marks every GPU step skipped).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if importlib.util.find_spec("advbct") is None:  # run from a checkout without the package installed
    sys.path.insert(0, REPO)

from advbct.cli import guarded  # noqa: E402
from advbct.errors import UserError  # noqa: E402
from advbct.io import atomic_open  # noqa: E402
from advbct.evaluation import test_sets  # noqa: E402

SCHEMA = "advbct-gpu-check/1"
DEFAULT_OUT = os.path.join("output", "gpu_check", "gpu_check.json")
STEPS = ("pipeline", "training", "losses", "search", "collectives", "decoding")
STATUSES = ("ok", "failed", "skipped")
TITLES = {
    "pipeline": "tiny synthetic pipeline on GPU vs CPU (headline mAPs)",
    "training": "training step time, plain vs AdvBCT (R18/R50, 224 px, batch 256, bf16/fp32, NHWC)",
    "losses": "compatibility-loss step, vectorised vs per-sample loops, on GPU",
    "search": "faiss-gpu exact search at GLDv2 scale",
    "collectives": "NCCL all-reduce bus bandwidth over the visible GPUs",
    "decoding": "image decoding on the GPU (DATA.DECODE nvjpeg) vs PIL: fidelity and throughput",
}
KINDS = {"pipeline": "correctness", "training": "performance", "losses": "correctness+performance",
         "search": "performance", "collectives": "correctness+performance", "decoding": "correctness+performance"}
# a step gets at most this long (seconds); all of them together at most --budget-s
STEP_TIMEOUT = {"pipeline": 300, "training": 150, "losses": 90, "search": 75, "collectives": 60, "decoding": 90}
MIN_STEP_S = 15  # a later step is left at least this much of the budget

# targets (reported; missing one is not a failure)
OVERHEAD_TARGET = 0.05   # AdvBCT step - plain step - old forward, over the plain step
SPEEDUP_TARGET = 50.0    # vectorised AdvBCT loss step vs the original's per-sample loops
SPEEDUP_METHOD = "advbct"

# the tiny pipeline (step pipeline)
NEW_MODELS = ("advbct", "hot_refresh")
CONFIGS = {"pretrain": "configs/synthetic/pretrain_r18.yml", "old": "configs/synthetic/class_r18/old.yml",
           "advbct": "configs/synthetic/class_r18/advbct.yml",
           "hot_refresh": "configs/synthetic/class_r18/hot_refresh.yml"}
PIPELINE_BATCH = 32          # global batch of every training run (per GPU: 32 // NGPUS)
# Short on purpose (docs/BENCHMARKS.md, "GPU check"): from a shared pretrained backbone, the old model (12 steps
# at the configs' LR 0.1) and the new ones (12 steps at LR 0.01) end where float noise alone (1 vs 2 CPU
# threads) moves a backbone by at most 2.5 % of its update and a headline mAP by at most 0.28 points. New
# models at LR 0.1 amplify the same noise to 3-8 % after 12 steps and 7-14 % after 36, and the mAPs then move
# by up to 3 points from rounding alone: no tolerance could tell a GPU fault from it.
PIPELINE_SCHEDULE = {"old": {"epochs": 4, "lr": 0.1, "lr_steps": [3]},
                     "new": {"epochs": 1, "lr": 0.01, "lr_steps": [1]}}
PIPELINE_IMG = 64            # the synthetic benchmark's image size
# GPU vs CPU agreement; ~10x the float noise measured on CPU (0.28 mAP points, 0.025 of an update), below what
# one semantic difference did (AdvBCT on 1 vs 2 processes: 3.3 points, 0.33): docs/BENCHMARKS.md
TOLERANCE = 3.0              # mAP points, models trained apart
EVAL_TOLERANCE = 0.5         # mAP points, the same models evaluated on the GPUs and on the CPU
WEIGHT_TOLERANCE = 0.25      # |backbone_gpu - backbone_cpu| / |backbone_cpu - pretrained|, per trained model

COLLECTIVE_SIZES = ("1M", "256M")

# the decoding step: largest mean |model input - PIL's| (uint8 levels, 0-255) of the nvjpeg path, on the GPU and
# with the CPU decoder. ~10x the CPU decoder's arithmetic difference (0.13-0.16 measured; nvJPEG's IDCT may
# differ from libjpeg-turbo's by about a level), below what a wrong crop, a colour-channel swap or an
# unnormalised batch gives (tens of levels)
NVJPEG_PIXEL_TOLERANCE = 1.5
DECODING_MODES = ("pil", "pil_draft", "nvjpeg_cpu", "preresized", "nvjpeg")  # the loader suite's rows
DECODING_CHECKED = ("nvjpeg", "nvjpeg_cpu")  # the rows held to NVJPEG_PIXEL_TOLERANCE


class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one line, ``error: ...``, exit status 2."""

    def error(self, message):
        raise UserError(f"{self.prog}: {message}")


def build_parser():
    p = _Parser(prog="gpu_check", description=__doc__.splitlines()[0])
    p.add_argument("--out", default=DEFAULT_OUT, help=f"JSON report (default {DEFAULT_OUT}); logs go to "
                   "<out>_logs/, the pipeline's models to <out>_work/ (removed at the end unless --keep-work)")
    p.add_argument("--steps", default=",".join(STEPS), help=f"comma-separated subset of {','.join(STEPS)} (default all)")
    p.add_argument("--ngpus", type=int, default=0, help="GPUs to use (default 0: every visible one)")
    p.add_argument("--tolerance", type=float, default=TOLERANCE,
                   help=f"largest |GPU - CPU| of a headline mAP, in points (default {TOLERANCE})")
    p.add_argument("--budget-s", type=float, default=470.0,
                   help="seconds for all steps together (default 470); a step that would start without "
                        f"{MIN_STEP_S} s left is skipped")
    p.add_argument("--keep-work", action="store_true", help="keep the pipeline's data, models and results")
    p.add_argument("--cpu-dry-run", action="store_true",
                   help="no GPU needed: check the arguments, write the JSON with every GPU step skipped")
    return p


def parse_args(argv=None):
    args = build_parser().parse_args(argv)
    steps = [s.strip() for s in args.steps.split(",") if s.strip()]
    unknown = [s for s in steps if s not in STEPS]
    if unknown or not steps:
        raise UserError(f"--steps: unknown step(s) {', '.join(unknown) or '(none given)'}; expected a subset of "
                        f"{','.join(STEPS)}")
    args.steps = [s for s in STEPS if s in steps]
    if args.ngpus < 0:
        raise UserError(f"--ngpus must be >= 0 (0: every visible GPU), got {args.ngpus}")
    if not (args.tolerance >= 0 and math.isfinite(args.tolerance)):
        raise UserError(f"--tolerance must be a finite number >= 0, got {args.tolerance}")
    if not args.budget_s > 0:
        raise UserError(f"--budget-s must be positive, got {args.budget_s}")
    if not args.out.endswith(".json"):
        raise UserError(f"--out must name a .json file, got '{args.out}'")
    args.out = os.path.abspath(args.out)
    return args


# ------------------------------------------------------------------------------------------ formulas
def compare_maps(gpu: dict, cpu: dict, tolerance: float) -> dict:
    """Headline mAPs of the GPU run against the CPU run: every value present in both, finite, and
    |gpu - cpu| <= tolerance (mAP points)."""
    keys = sorted(set(gpu) | set(cpu))
    missing = [k for k in keys if k not in gpu or k not in cpu]
    deltas, bad = {}, []
    for key in keys:
        if key in missing:
            continue
        g, c = gpu[key], cpu[key]
        if not (_finite(g) and _finite(c)):
            bad.append(key)
            continue
        deltas[key] = round(float(g) - float(c), 4)
    worst = max(deltas, key=lambda k: abs(deltas[k])) if deltas else None
    max_abs = abs(deltas[worst]) if worst else None
    within = bool(deltas) and not missing and not bad and max_abs <= tolerance
    return {"tolerance": tolerance, "compared": len(deltas), "max_abs_delta": max_abs, "worst": worst,
            "missing": missing, "not_finite": bad, "deltas": deltas, "within_tolerance": within}


def weight_divergence(state_a: dict, state_b: dict, start: dict) -> float:
    """How far two trainings from the same ``start`` ended apart, relative to how far they went:
    |a - b| / |b - start| over the backbone's learned tensors (BatchNorm running statistics left out)."""
    import torch

    keys = [k for k, v in start.items() if k.startswith("backbone.") and v.is_floating_point()
            and "running_" not in k]
    if not keys:
        raise StepFailed("no backbone tensors to compare")
    flat = [torch.cat([s[k].detach().double().flatten().cpu() for k in keys]) for s in (state_a, state_b, start)]
    moved = float((flat[1] - flat[2]).norm())
    return float((flat[0] - flat[1]).norm()) / max(moved, 1e-30)


def compare_weights(gpu_out: str, cpu_out: str, pretrained: str, models, tolerance: float) -> dict:
    """weight_divergence of each model's final.pth, GPU run against CPU run, from the shared backbone."""
    import torch

    def load(path):
        return torch.load(path, map_location="cpu", weights_only=True)["model"]

    start = load(pretrained)
    div = {m: round(weight_divergence(load(os.path.join(gpu_out, m, "final.pth")),
                                      load(os.path.join(cpu_out, m, "final.pth")), start), 6) for m in models}
    worst = max(div, key=div.get)
    return {"tolerance": tolerance, "divergence": div, "worst": worst, "max": div[worst],
            "within_tolerance": div[worst] <= tolerance}


def pipeline_batches(ngpus: int, global_batch: int = PIPELINE_BATCH):
    """(per-GPU batch, global batch) of the pipeline's trainings: about ``global_batch`` images a step on any
    number of GPUs (the CPU reference runs the same ranks with the same batches)."""
    per_gpu = max(1, global_batch // ngpus)
    return per_gpu, per_gpu * ngpus


def iters_per_epoch(n_images: int, global_batch: int) -> int:
    """Full global batches per epoch: the same cap on 1 process and on N (DistributedSampler pads a
    rank's share, so N processes could otherwise run one more, partly repeated, batch)."""
    return max(1, n_images // global_batch)


def headline_maps(eval_root: str, models=NEW_MODELS, sets=None) -> dict:
    """``{"<model>/<set>/self": mAP, "<model>/<set>/cross": mAP, "old/<set>/self": mAP}`` from the
    results.json files scripts/test.sh wrote under ``eval_root/<model>/<set>/`` (Medium mAP on the
    revisited sets, mAP@100 on GLDv2: the paper's headline numbers); ``sets`` defaults to every registered
    test set (advbct.evaluation.test_sets)."""
    maps = {}
    for model in models:
        for name in (test_sets.names() if sets is None else sets):
            path = os.path.join(eval_root, model, name, "results.json")
            with open(path) as f:
                result = json.load(f)
            maps[f"{model}/{name}/self"] = float(test_sets.headline_value(result["self_test"], name))
            maps[f"{model}/{name}/cross"] = float(test_sets.headline_value(result["cross_test"], name))
            maps.setdefault(f"old/{name}/self", float(test_sets.headline_value(result["old_self_test"], name)))
    return maps


def load_suite(name):
    """``tools/benchmarks/<name>.py`` as a module; tools/ goes at the end of sys.path (the suites import their
    shared helpers as ``benchmarks.timing``), so it shadows no installed module."""
    tools = os.path.join(REPO, "tools")
    if tools not in sys.path:
        sys.path.append(tools)
    key = f"_gpu_check_suite_{name}"
    if key not in sys.modules:
        spec = importlib.util.spec_from_file_location(key, os.path.join(REPO, "tools", "benchmarks", f"{name}.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules[key] = module
        spec.loader.exec_module(module)
    return sys.modules[key]


def training_rows(cuda: dict) -> dict:
    """Per arch and precision of the training suite's ``cuda`` figures: step times, the old model's
    forward and the AdvBCT overhead against its target."""
    advbct_overhead = load_suite("training").advbct_overhead
    rows = {}
    for arch, per_amp in cuda.items():
        if not isinstance(per_amp, dict) or arch in ("tf32",):
            continue
        for amp, fig in per_amp.items():
            plain, adv, old = fig["plain"]["step_ms"], fig["advbct"]["step_ms"], fig["old_forward"]["step_ms"]
            overhead = advbct_overhead(plain, adv, old)
            rows[f"{arch}/{amp}"] = {"plain_ms": plain, "advbct_ms": adv, "old_forward_ms": old,
                                     "plain_img_per_s": fig["plain"]["img_per_s"],
                                     "advbct_img_per_s": fig["advbct"]["img_per_s"],
                                     "overhead": round(overhead, 4), "target_met": overhead < OVERHEAD_TARGET}
    return rows


def decoding_figures(result: dict) -> dict:
    """The decoding step's figures from the loader suite's JSON (its first folder): throughput per mode and
    each mode's pixel difference from PIL; ``nvjpeg`` figures are None where the suite had no CUDA."""
    folders = result.get("folders") if isinstance(result, dict) else None
    if not folders or not isinstance(folders[0], dict):
        raise StepFailed(f"loader benchmark measured no folder: {result}")
    folder = folders[0]
    modes = folder.get("modes") or {}
    absent = [m for m in DECODING_MODES if m != "nvjpeg" and not isinstance(modes.get(m), dict)]
    if absent:
        raise StepFailed(f"loader benchmark wrote no {', '.join(absent)} row(s): {sorted(modes)}")
    gpu = modes.get("nvjpeg") or {}
    pixel_mad = {m: modes[m].get("pixel_mad") for m in DECODING_MODES if isinstance(modes.get(m), dict)}
    within = not pixel_problems(pixel_mad, NVJPEG_PIXEL_TOLERANCE)
    return {"image_size": folder.get("image_size"), "images": folder.get("images"),
            "input_size": (result.get("setup") or {}).get("size"),
            "pil_img_s_per_core": modes["pil"].get("img_s_per_core"),
            "pil_draft_img_s_per_core": modes["pil_draft"].get("img_s_per_core"),
            "pil_draft_vs_pil": modes["pil_draft"].get("vs_pil"),
            "preresized_img_s_per_core": modes["preresized"].get("img_s_per_core"),
            "preresized_vs_pil": modes["preresized"].get("vs_pil"),
            "nvjpeg_gpu_img_s": gpu.get("gpu_img_s"),
            "nvjpeg_worker_img_s_per_core": gpu.get("worker_img_s_per_core"),
            "pixel_mad": pixel_mad, "pixel_tolerance": NVJPEG_PIXEL_TOLERANCE, "within_tolerance": within}


def _finite(x):
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def pixel_problems(pixel_mad: dict, tolerance: float) -> list:
    """One line per DECODING_CHECKED row whose pixel difference from PIL is absent, not finite or over ``tolerance``."""
    problems = []
    for m in DECODING_CHECKED:
        mad = pixel_mad.get(m)
        if not _finite(mad):
            problems.append(f"{m} pixel_mad {mad} is not a finite number")
        elif mad > tolerance:
            problems.append(f"{m} pixel_mad {mad} vs PIL exceeds the tolerance {tolerance:g} levels")
    return problems


def check_decoding(fig: dict):
    """StepFailed unless nvjpeg was measured and both nvjpeg paths' pixels lie within the tolerance of PIL's."""
    if "nvjpeg" not in fig["pixel_mad"]:
        raise StepFailed("nvjpeg not measured: the loader benchmark wrote no nvjpeg row (torch.cuda.is_available() "
                         "was False in its process)")
    problems = pixel_problems(fig["pixel_mad"], fig["pixel_tolerance"])
    if problems:
        raise StepFailed("; ".join(problems))


# ---------------------------------------------------------------------------------------- processes
def base_env():
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["PYTHON"] = sys.executable  # scripts/lib/launch.sh runs the tools with this interpreter
    return env


SHOWN_ENV = ("NGPUS", "CUDA_VISIBLE_DEVICES", "NVIDIA_TF32_OVERRIDE", "OMP_NUM_THREADS", "NEW_MODEL_PATH",
             "OLD_MODEL_PATH", "NEW_MODEL_ARCH", "OLD_MODEL_ARCH")


def shown(cmd, env):
    """``cmd`` as a shell line, prefixed by the variables of ``env`` the scripts read (to rerun it by hand)."""
    prefix = [f"{k}={shlex.quote(env[k])}" for k in SHOWN_ENV if k in env and env.get(k) != os.environ.get(k)]
    return " ".join(prefix + [shlex.join(map(str, cmd))])


class StepFailed(Exception):
    """A step's check or command failed; the message is the reason recorded in the JSON."""


def run_logged(cmd, log_path, timeout, env=None, what=None):
    """Run ``cmd`` from the repository root, output appended to ``log_path``; on a timeout the whole
    process group (torchrun's ranks included) is stopped. Raise StepFailed naming the error line."""
    if timeout < 1:
        raise StepFailed(f"time budget spent before {what or cmd[0]}")
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    with open(log_path, "a") as log:
        log.write(f"\n$ {shlex.join(map(str, cmd))}\n")
        log.flush()
        # its own process group, so that a time-out stops torchrun's ranks too
        group = {"process_group": 0} if sys.version_info >= (3, 11) else {"preexec_fn": os.setpgrp}
        proc = subprocess.Popen([str(c) for c in cmd], cwd=REPO, env=env or base_env(), stdout=log,
                                stderr=subprocess.STDOUT, **group)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _stop_group(proc)
            raise StepFailed(f"{what or cmd[0]} timed out after {timeout:.0f} s (log: {log_path})") from None
        except BaseException:
            _stop_group(proc)
            raise
    if rc != 0:
        raise StepFailed(f"{what or cmd[0]} exited {rc}: {error_line(log_path)} (log: {log_path})")


def _stop_group(proc):
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def error_line(log_path):
    """The last 'error: ' line of a log, else its last non-empty line (progress bars stripped)."""
    try:
        with open(log_path, errors="replace") as f:
            lines = [ln.split("\r")[-1].strip() for ln in f.read().splitlines()]
    except OSError:
        return "(no log)"
    lines = [ln for ln in lines if ln]
    errors = [ln for ln in lines if ln.startswith("error:") or "Error:" in ln]
    return (errors or lines or ["(empty log)"])[-1][:300]


# ------------------------------------------------------------------------------------------- steps
class Context:
    def __init__(self, args, ngpus):
        self.args, self.ngpus = args, ngpus
        stem = args.out[:-len(".json")]
        self.logs, self.work = stem + "_logs", stem + "_work"
        self.deadline = None

    def log(self, step):
        return os.path.join(self.logs, f"{step}.log")

    def remaining(self):
        return self.deadline - time.monotonic()


def _timeout(ctx, step, later):
    return min(STEP_TIMEOUT[step], ctx.remaining() - MIN_STEP_S * later)


def pipeline_env(device, ngpus, training=True):
    """(environment, per-process batch) of a pipeline command. ``gpu``: NGPUS processes, NCCL, fp32 without TF32.
    ``cpu``, the reference: no GPU visible to torch or faiss; trainings on as many processes as GPUs (gloo), so
    that every rank sees the images it sees on the GPUs and the losses normalised per rank (AdvBCT's boundary
    term, as the original code) are the same computation; meta and evaluation, which do not depend on the
    number of processes, in one process."""
    env = base_env()
    per_gpu = pipeline_batches(ngpus)[0]
    if device == "gpu":
        env.update(NGPUS=str(ngpus), NVIDIA_TF32_OVERRIDE="0")  # fp32 stays fp32 (cuDNN convolutions use TF32)
        return env, per_gpu
    nproc = ngpus if training else 1
    env.update(NGPUS=str(nproc), CUDA_VISIBLE_DEVICES="")
    if nproc > 1:  # torchrun would give each rank one thread
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // nproc))
    return env, per_gpu


def pretrain_command(data, out, ngpus):
    """The synthetic stand-in for ImageNet weights (configs/synthetic/pretrain_r18.yml, in its TRAIN.AMP auto:
    bf16 on the GPUs), trained once on the GPUs: the GPU and CPU runs both start from it."""
    env, batch = pipeline_env("gpu", ngpus)
    env.pop("NVIDIA_TF32_OVERRIDE")
    return ["bash", "scripts/train_new.sh", CONFIGS["pretrain"], "DATA.ROOT", os.path.join(data, "pretrain"),
            "DATA.TRAIN_LIST", os.path.join(data, "pretrain", "train_list.txt"), "TRAIN.BATCH_SIZE", str(batch),
            "TRAIN.SAVE_FREQ", "1000", "TRAIN.PRINT_FREQ", "4", "DATA.NUM_WORKERS", "1", "OUTPUT", out], env


def test_command(eval_dir, new_ckpt, old_ckpt, data):
    """scripts/test.sh of one new model against the old one on the three test sets (one process group)."""
    cmd = ["bash", "scripts/test.sh", "landmark", ",".join(test_sets.names()),
           ",".join(os.path.join(data, s.synthetic_root) for s in test_sets.specs()),
           "EVAL.IMG_SIZE", str(PIPELINE_IMG), "EVAL.NUM_WORKERS", "1", "EVAL.BATCH_SIZE", "64",
           "EVAL.SAVE_DIR", eval_dir]
    return cmd, {"NEW_MODEL_PATH": new_ckpt, "OLD_MODEL_PATH": old_ckpt, "NEW_MODEL_ARCH": "resnet18",
                 "OLD_MODEL_ARCH": "resnet18"}


def pipeline_commands(device, out, data, lists, ngpus, pretrained):
    """The bash scripts' commands of one run of the pipeline from the shared ``pretrained`` backbone:
    ``[(what, command, environment)]``."""
    env, batch = pipeline_env(device, ngpus)
    one_process = pipeline_env(device, ngpus, training=False)[0]
    global_batch = pipeline_batches(ngpus)[1]
    common = ["DATA.ROOT", os.path.join(data, "gldv2"), "EVAL.ROOT", os.path.join(data, "ROxfordParis"),
              "MODEL.PRETRAINED", "false", "MODEL.PRETRAINED_PATH", pretrained, "TRAIN.AMP", "none",
              "TRAIN.BATCH_SIZE", str(batch), "TRAIN.SAVE_FREQ", "1000", "TRAIN.PRINT_FREQ", "4",
              "DATA.NUM_WORKERS", "1", "DATA.IMG_SIZE", str(PIPELINE_IMG)]

    def schedule(kind, n_images):
        sched = PIPELINE_SCHEDULE[kind]
        return ["TRAIN.EPOCHS", str(sched["epochs"]), "TRAIN.LR", str(sched["lr"]),
                "TRAIN.LR_STEPS", str(sched["lr_steps"]).replace(" ", ""),
                "TRAIN.MAX_ITERS_PER_EPOCH", str(iters_per_epoch(n_images, global_batch))]

    old_ckpt, meta = os.path.join(out, "old", "final.pth"), os.path.join(out, "old", "meta.pt")
    compat = ["OLD_MODEL.WEIGHTS", old_ckpt, "COMP_LOSS.META_PATH", meta]
    cmds = [("old model", ["bash", "scripts/train_old.sh", CONFIGS["old"], *common, "DATA.TRAIN_LIST", lists["old"],
                           *schedule("old", lists["old_images"]), "OUTPUT", os.path.join(out, "old")], env),
            ("meta", ["bash", "scripts/extract_meta.sh", CONFIGS["advbct"], *common, *compat,
                      "META.TRAIN_LIST", lists["old"], "EVAL.NUM_WORKERS", "1"], one_process)]
    for model in NEW_MODELS:
        cmds.append((model, ["bash", "scripts/train_new.sh", CONFIGS[model], *common, *compat,
                             "DATA.TRAIN_LIST", lists["new"], *schedule("new", lists["new_images"]),
                             "OUTPUT", os.path.join(out, model)], env))
    for model in NEW_MODELS:
        cmd, extra = test_command(os.path.join(out, "eval", model), os.path.join(out, model, "final.pth"),
                                  old_ckpt, data)
        cmds.append((f"test {model}", cmd, dict(one_process, **extra)))
    return cmds


def run_pipeline(ctx, device, data, lists, pretrained, log, deadline):
    """One run of the pipeline; its headline mAPs and seconds."""
    out = os.path.join(ctx.work, device)
    start = time.monotonic()
    for what, cmd, env in pipeline_commands(device, out, data, lists, ctx.ngpus, pretrained):
        run_logged(cmd, log, deadline - time.monotonic(), env=env, what=f"{device} {what}")
    return headline_maps(os.path.join(out, "eval")), round(time.monotonic() - start, 1)


def prepare_work(ctx):
    """A fresh ``<out>_work`` (only a folder this check made earlier is removed)."""
    marker = os.path.join(ctx.work, ".gpu_check_work")
    if os.path.isdir(ctx.work) and os.listdir(ctx.work):
        if not os.path.exists(marker):
            raise UserError(f"{ctx.work} exists and was not made by the GPU check: move it away or pick "
                            f"another --out")
        shutil.rmtree(ctx.work)
    os.makedirs(ctx.work, exist_ok=True)
    open(marker, "w").close()


def step_pipeline(ctx, record, timeout):
    """a: pretrain once on the GPUs; from that backbone the pipeline on the GPUs and on the CPU; their headline
    mAPs within --tolerance. Then the CPU's AdvBCT models evaluated on the GPUs: the same models, so the
    mAPs must agree within EVAL_TOLERANCE (features, faiss and the gathers of the evaluation alone)."""
    from advbct.data.splits import make_allocation
    from advbct.data.synthetic import make_synthetic

    deadline = time.monotonic() + timeout
    log = ctx.log("pipeline")
    start = time.monotonic()
    data = os.path.join(ctx.work, "data")
    make_synthetic(data, preset="tiny", seed=0)
    split = make_allocation(os.path.join(data, "gldv2", "label_40.txt"), "class", 0.3,
                            out_dir=os.path.join(ctx.work, "lists"))
    lists = {"old": split["files"]["old"], "new": split["files"]["new"], "old_images": split["old_images"],
             "new_images": split["new_images"]}
    per_gpu, global_batch = pipeline_batches(ctx.ngpus)
    fig = record["figures"]
    fig.update({"preset": "tiny", "seed": 0, "img_size": PIPELINE_IMG, "ngpus": ctx.ngpus,
                "backend": "nccl" if ctx.ngpus > 1 else "none (one process)",
                "cpu_reference": (f"trainings on {ctx.ngpus} process(es) (gloo when several) with the GPUs' "
                                  f"per-rank batches, meta and evaluation in one process"),
                "per_gpu_batch": per_gpu, "global_batch": global_batch, "schedule": PIPELINE_SCHEDULE,
                "iters_per_epoch": {"old": iters_per_epoch(split["old_images"], global_batch),
                                    "new": iters_per_epoch(split["new_images"], global_batch)},
                "precision": "fp32 (TRAIN.AMP none; on the GPUs with NVIDIA_TF32_OVERRIDE=0)",
                "pretrain_precision": "TRAIN.AMP auto (bf16 on GPUs that compute it natively), NHWC",
                "models": ["old", *NEW_MODELS], "test_sets": list(test_sets.names()),
                "faiss_gpu": _faiss_gpu()[0], "generate_seconds": round(time.monotonic() - start, 1)})
    pretrained = os.path.join(ctx.work, "pretrain", "final.pth")
    pre_cmd, pre_env = pretrain_command(data, os.path.dirname(pretrained), ctx.ngpus)
    gpu_cmds = pipeline_commands("gpu", os.path.join(ctx.work, "gpu"), data, lists, ctx.ngpus, pretrained)
    cpu_out = os.path.join(ctx.work, "cpu")
    eval_cmd, eval_extra = test_command(os.path.join(ctx.work, "cpu_models_on_gpu", "advbct"),
                                        os.path.join(cpu_out, "advbct", "final.pth"),
                                        os.path.join(cpu_out, "old", "final.pth"), data)
    cpu_cmds = pipeline_commands("cpu", cpu_out, data, lists, ctx.ngpus, pretrained)
    eval_env = dict(pipeline_env("gpu", ctx.ngpus)[0], **eval_extra)
    record["commands"] = [shown(cmd, env) for cmd, env in
                          ((pre_cmd, pre_env), *[(c, e) for _, c, e in gpu_cmds + cpu_cmds], (eval_cmd, eval_env))]

    t = time.monotonic()
    run_logged(pre_cmd, log, deadline - t, env=pre_env, what="gpu pretraining")
    fig["pretrain_seconds"] = round(time.monotonic() - t, 1)
    failures = []
    for device in ("gpu", "cpu"):  # the CPU reference runs even when the GPU run failed: it tells which broke
        try:
            fig[device], fig[f"{device}_seconds"] = run_pipeline(ctx, device, data, lists, pretrained, log, deadline)
        except StepFailed as exc:
            fig[device] = None
            failures.append(str(exc))
    if fig["cpu"] is not None:
        try:
            run_logged(eval_cmd, log, deadline - time.monotonic(), env=eval_env, what="gpu evaluation of the cpu models")
            on_gpu = headline_maps(os.path.join(ctx.work, "cpu_models_on_gpu"), models=("advbct",))
            fig["cpu_models_on_gpu"] = on_gpu
            fig["evaluation_comparison"] = compare_maps(on_gpu, {k: fig["cpu"].get(k) for k in on_gpu},
                                                        EVAL_TOLERANCE)
        except StepFailed as exc:
            failures.append(str(exc))
    if failures:
        raise StepFailed("; ".join(failures))
    fig["comparison"] = compare_maps(fig["gpu"], fig["cpu"], ctx.args.tolerance)
    fig["weights"] = compare_weights(os.path.join(ctx.work, "gpu"), cpu_out, pretrained, ("old", *NEW_MODELS),
                                     WEIGHT_TOLERANCE)
    problems = [_disagreement("trained on the GPUs vs on the CPU", fig["comparison"]),
                _disagreement("CPU models evaluated on the GPUs vs on the CPU", fig["evaluation_comparison"])]
    w = fig["weights"]
    if not w["within_tolerance"]:
        problems.append(f"backbones trained on the GPUs vs on the CPU differ by {w['max']:.3f} of their update "
                        f"({w['worst']}; tolerance {w['tolerance']})")
    problems = [p for p in problems if p]
    if problems:
        raise StepFailed("; ".join(problems))


def _disagreement(what, c):
    if c["within_tolerance"]:
        return None
    return (f"headline mAPs {what} differ: max |delta| {c['max_abs_delta']} at {c['worst']} (tolerance "
            f"{c['tolerance']}; missing {c['missing']}, not finite {c['not_finite']})")


def _suite_json(ctx, step):
    path = os.path.join(ctx.logs, f"{step}.json")
    if os.path.exists(path):
        os.remove(path)
    return path


def _read_json(path, step):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as exc:
        raise StepFailed(f"{step}: no figures written ({exc})") from None


def step_training(ctx, record, timeout):
    out = _suite_json(ctx, "training")
    cmd = [sys.executable, "tools/benchmark.py", "training", "--no-cpu", "--channels-last",
           "--gpu-archs", "resnet18,resnet50", "--gpu-size", "224", "--gpu-batch", "256",
           "--steps", "5", "--warmup", "3", "--json", out]
    record["commands"] = [shlex.join(cmd)]
    run_logged(cmd, ctx.log("training"), timeout, what="training benchmark")
    cuda = _read_json(out, "training").get("cuda")
    if not isinstance(cuda, dict):
        raise StepFailed(f"training benchmark measured nothing on CUDA: {cuda}")
    rows = training_rows(cuda)
    record["figures"].update({"device": cuda.get("device"), "img_size": cuda.get("img_size"),
                              "batch_per_gpu": cuda.get("batch"), "channels_last": True, "tf32": cuda.get("tf32"),
                              "rows": rows, "overhead_target": OVERHEAD_TARGET,
                              "target_met": all(r["target_met"] for r in rows.values())})


def step_losses(ctx, record, timeout):
    out = _suite_json(ctx, "losses")
    cmd = [sys.executable, "tools/benchmark.py", "losses", "--device", "cuda", "--repeats", "10", "--warmup", "2",
           "--json", out]
    record["commands"] = [shlex.join(cmd)]
    run_logged(cmd, ctx.log("losses"), timeout, what="losses benchmark")  # it fails if a pair disagrees
    methods = _read_json(out, "losses")
    speedup = methods.get(SPEEDUP_METHOD, {}).get("speedup")
    record["figures"].update({"device": "cuda", "methods": methods, "target_method": SPEEDUP_METHOD,
                              "speedup_target": SPEEDUP_TARGET,
                              "target_met": speedup is not None and speedup >= SPEEDUP_TARGET})


def step_search(ctx, record, timeout):
    out = _suite_json(ctx, "search")
    cmd = [sys.executable, "tools/benchmark.py", "search", "--json", out]
    record["commands"] = [shlex.join(cmd)]
    run_logged(cmd, ctx.log("search"), timeout, what="search benchmark")
    figures = _read_json(out, "search")
    if figures.get("device") != "gpu":
        raise StepFailed(f"the search ran on {figures.get('device')}, not on the GPU")
    record["figures"].update(figures)


def collectives_command(python, nproc, json_out, min_bytes=COLLECTIVE_SIZES[0], max_bytes=COLLECTIVE_SIZES[1],
                        iters=20, warmup=5):
    """torchrun of the collectives suite on ``nproc`` local processes (NCCL on GPUs, gloo on CPU)."""
    return [python, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "tools/benchmark.py", "collectives", "--min-bytes", str(min_bytes), "--max-bytes", str(max_bytes),
            "--iters", str(iters), "--warmup", str(warmup), "--json", json_out]


def step_collectives(ctx, record, timeout):
    out = _suite_json(ctx, "collectives")
    cmd = collectives_command(sys.executable, ctx.ngpus, out)
    record["commands"] = [shlex.join(cmd)]
    run_logged(cmd, ctx.log("collectives"), timeout, what="collectives benchmark")
    figures = _read_json(out, "collectives")
    record["figures"].update(figures)
    if not figures.get("correct"):
        wrong = [r["bytes"] for r in figures.get("rows", []) if not r.get("correct")]
        raise StepFailed(f"all-reduce returned wrong sums at sizes {wrong} (bytes)")


DECODING_IMAGES = 64  # generated 640x480 JPEGs the decoding step measures


def decoding_command(python, json_out):
    """The loader suite on DECODING_IMAGES generated 640x480 JPEGs (its nvjpeg row needs CUDA in that process)."""
    return [python, "tools/benchmark.py", "loader", "--generate", "640x480", "--images", str(DECODING_IMAGES),
            "--repeats", "2", "--json", json_out]


def step_decoding(ctx, record, timeout):
    """f: DATA.DECODE nvjpeg on the GPU against PIL, pixels and images/s (the figures kept when a check fails)."""
    out = _suite_json(ctx, "decoding")
    cmd = decoding_command(sys.executable, out)
    record["commands"] = [shlex.join(cmd)]
    run_logged(cmd, ctx.log("decoding"), timeout, what="loader benchmark")
    fig = decoding_figures(_read_json(out, "decoding"))
    record["figures"].update(fig)
    check_decoding(fig)


RUNNERS = {"pipeline": step_pipeline, "training": step_training, "losses": step_losses,
           "search": step_search, "collectives": step_collectives, "decoding": step_decoding}


def skip_reason(ctx, step):
    """Why ``step`` does not run here (None: it runs)."""
    if step not in ctx.args.steps:
        return "not selected (--steps)"
    if ctx.args.cpu_dry_run:
        return "--cpu-dry-run: the GPU steps do not run"
    if step == "search":
        ok, why = _faiss_gpu()
        if not ok:
            return why
    if step == "collectives" and ctx.ngpus < 2:
        return f"{ctx.ngpus} GPU in use: an all-reduce across GPUs needs two or more"
    return None


def _faiss_gpu():
    """(faiss has GPU support and sees a GPU, the reason when not)."""
    try:
        from advbct.evaluation.search import faiss_gpu_available
        if faiss_gpu_available():
            return True, None
        import faiss
        if not hasattr(faiss, "StandardGpuResources"):
            return False, "faiss has no GPU support (faiss-cpu installed; pip install -e .[gpu] installs faiss-gpu-cu12)"
        return False, "faiss-gpu sees no GPU"
    except (ImportError, UserError) as exc:
        return False, f"faiss unavailable: {exc}"


def new_record(step):
    return {"title": TITLES[step], "kind": KINDS[step], "status": "skipped", "reason": None, "seconds": 0.0,
            "figures": {}, "commands": [], "log": None}


def run_step(ctx, step, later):
    record = new_record(step)
    reason = skip_reason(ctx, step)
    timeout = None if reason else _timeout(ctx, step, later)
    if reason is None and timeout < MIN_STEP_S:
        reason = f"time budget (--budget-s {ctx.args.budget_s:g}) spent"
    if reason:
        record["reason"] = reason
        return record
    start = time.monotonic()
    record["log"] = ctx.log(step)
    try:
        RUNNERS[step](ctx, record, timeout)
        record["status"] = "ok"
    except StepFailed as exc:
        record["status"], record["reason"] = "failed", str(exc)
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001 - a broken step is recorded, the later ones still run
        record["status"], record["reason"] = "failed", f"{type(exc).__name__}: {exc}"
    record["seconds"] = round(time.monotonic() - start, 1)
    return record


# ------------------------------------------------------------------------------------------ report
def machine_info(ngpus):
    import torch

    info = {"date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "host": platform.node(),
            "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "commit": _git_commit(), "ngpus": ngpus,
            "gpus": [torch.cuda.get_device_name(i) for i in range(ngpus)] if ngpus else [],
            "driver": _nvidia_driver()}
    try:
        import faiss
        info["faiss"] = getattr(faiss, "__version__", "unknown")
        info["faiss_gpu_support"] = hasattr(faiss, "StandardGpuResources")
    except ImportError:
        info["faiss"], info["faiss_gpu_support"] = None, False
    return info


def _git_commit():
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                             timeout=10)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _nvidia_driver():
    if not shutil.which("nvidia-smi"):
        return None
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    except (OSError, subprocess.SubprocessError):
        return None


def overall_status(steps: dict) -> str:
    return "failed" if any(r["status"] == "failed" for r in steps.values()) else "ok"


def write_json(path, report):
    with atomic_open(path) as f:
        json.dump(report, f, indent=1)


def step_summary(step, record):
    """One human line of a step's figures."""
    fig = record["figures"]
    if record["status"] != "ok":
        return record["reason"] or ""
    if step == "pipeline":
        c, e, w = fig["comparison"], fig["evaluation_comparison"], fig["weights"]
        return (f"{c['compared']} headline mAPs trained on {fig['ngpus']} GPU(s) vs CPU: max |delta| "
                f"{c['max_abs_delta']:.2f} ({c['worst']}; tolerance {c['tolerance']:g}); backbones apart by "
                f"{w['max']:.4f} of their update ({w['tolerance']:g}); CPU models evaluated on GPU: max |delta| "
                f"{e['max_abs_delta']:.2f} ({e['tolerance']:g})")
    if step == "training":
        parts = [f"{k} {100 * r['overhead']:+.1f} %" for k, r in fig["rows"].items()]
        met = "met" if fig["target_met"] else "MISSED"
        return f"AdvBCT overhead {', '.join(parts)} (target < {100 * OVERHEAD_TARGET:g} %: {met})"
    if step == "losses":
        parts = [f"{m} {f['speedup']:g}x" for m, f in fig["methods"].items()]
        met = "met" if fig["target_met"] else "MISSED"
        return f"speedup {', '.join(parts)} (target {SPEEDUP_METHOD} >= {SPEEDUP_TARGET:g}x: {met})"
    if step == "search":
        return f"{fig['queries']} x {fig['gallery']:,} x {fig['dim']}, top-{fig['topk']}: {fig['search_s']} s on {fig['device']}"
    if step == "collectives":
        return (f"{fig['world_size']} GPUs, {fig['backend']}: busbw peak {fig['peak_busbw_gbps']:g} GB/s "
                f"({len(fig['rows'])} sizes, {fig['rows'][0]['bytes']:,}-{fig['rows'][-1]['bytes']:,} bytes)")
    if step == "decoding":
        mad = fig["pixel_mad"]
        return (f"{fig['images']} JPEGs of {fig['image_size']}: nvjpeg {fig['nvjpeg_gpu_img_s']:,.0f} img/s on the "
                f"GPU, pixels {mad['nvjpeg']:.2f} levels from PIL's (CPU decoder {mad['nvjpeg_cpu']:.2f}; tolerance "
                f"{fig['pixel_tolerance']:g}); per core: PIL {fig['pil_img_s_per_core']:,.0f} img/s, pil_draft "
                f"{fig['pil_draft_vs_pil']:g}x, pre-resized {fig['preresized_vs_pil']:g}x, nvjpeg workers "
                f"{fig['nvjpeg_worker_img_s_per_core']:,.0f} img/s")
    return ""


def summary(report):
    m = report["machine"]
    gpus = ", ".join(m["gpus"]) if m["gpus"] else "no GPU"
    mode = "cpu dry run" if report["dry_run"] else f"{m['ngpus']} GPU(s)"
    lines = [f"GPU check ({mode}): {gpus}; torch {m['torch']}, commit {m['commit']}"]
    for i, (step, record) in enumerate(report["steps"].items()):
        letter = chr(ord("a") + i)
        lines.append(f"  {letter}. {step:<12} {'[' + record['status'] + ']':<10} {record['seconds']:6.1f} s  "
                     f"{step_summary(step, record)}")
    failed = [s for s, r in report["steps"].items() if r["status"] == "failed"]
    lines.append(f"result: {report['status'].upper()}" + (f" ({', '.join(failed)} failed)" if failed else "")
                 + f" in {report['seconds']:.0f} s -> {report['out']}")
    return "\n".join(lines)


def visible_gpus():
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


@guarded
def main(argv=None):
    args = parse_args(argv)
    visible = visible_gpus()
    if not args.cpu_dry_run:
        if visible == 0:
            raise UserError("no CUDA GPU visible (torch.cuda.is_available() is False): run the GPU check on a "
                            "machine with 1-8 NVIDIA GPUs, or add --cpu-dry-run to check its CPU-side logic only")
        if args.ngpus > visible:
            raise UserError(f"--ngpus {args.ngpus}: only {visible} GPU(s) visible")
    ngpus = 0 if args.cpu_dry_run else (args.ngpus or visible)
    ctx = Context(args, ngpus)
    start = time.monotonic()
    ctx.deadline = start + args.budget_s
    report = {"schema": SCHEMA, "status": "incomplete", "dry_run": bool(args.cpu_dry_run),
              "command": "bash tools/gpu_check.sh " + shlex.join(argv if argv is not None else sys.argv[1:]),
              "out": args.out, "tolerance": args.tolerance, "budget_s": args.budget_s, "seconds": 0.0,
              "machine": machine_info(ngpus), "steps": {s: new_record(s) for s in STEPS}}
    if "pipeline" in args.steps and not args.cpu_dry_run:
        prepare_work(ctx)
    write_json(args.out, report)
    try:
        for i, step in enumerate(STEPS):
            later = sum(1 for s in STEPS[i + 1:] if skip_reason(ctx, s) is None)
            report["steps"][step] = run_step(ctx, step, later)
            report["seconds"] = round(time.monotonic() - start, 1)
            write_json(args.out, report)  # a killed check keeps the steps done so far
    finally:
        if not args.keep_work and os.path.exists(os.path.join(ctx.work, ".gpu_check_work")):
            shutil.rmtree(ctx.work, ignore_errors=True)
    report["status"] = overall_status(report["steps"])
    report["seconds"] = round(time.monotonic() - start, 1)
    write_json(args.out, report)
    print(summary(report))
    return 1 if report["status"] == "failed" else 0


if __name__ == "__main__":
    sys.exit(main())
