"""The GPU check's CPU-side logic (tools/gpu_check.sh, tools/gpu_check.py): arguments, the refusal without a
GPU, the JSON report of a dry run, step isolation, the GPU-vs-CPU comparison, the overhead and bus-bandwidth
formulas, the pipeline's batch plan, the collectives suite on two gloo processes, the decoding step's figures
and checks, and which faiss wheel the install picks. Nothing here trains a model or needs a GPU; no figure is
timed-asserted."""

import argparse
import importlib.util
import json
import math
import os
import shlex
import shutil
import subprocess
import sys
import time

import pytest

from helpers import REPO

ALL_STEPS = ["pipeline", "training", "losses", "search", "collectives", "decoding"]
SCRIPT = REPO / "tools" / "gpu_check.sh"
STEP_KEYS = {"title", "kind", "status", "reason", "seconds", "figures", "commands", "log"}
MACHINE_KEYS = {"date", "host", "cpu", "cores", "python", "torch", "cuda", "commit", "ngpus", "gpus", "driver",
                "faiss", "faiss_gpu_support"}


@pytest.fixture(scope="module")
def gc():
    spec = importlib.util.spec_from_file_location("advbct_gpu_check", REPO / "tools" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_script(*args, env_extra=None):
    """``bash tools/gpu_check.sh ARGS`` with no GPU visible and this interpreter (no venv install)."""
    env = dict(os.environ, PYTHON=sys.executable, CUDA_VISIBLE_DEVICES="", **(env_extra or {}))
    return subprocess.run(["bash", str(SCRIPT), *map(str, args)], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=120)


# ------------------------------------------------------------------------------------------- arguments
def test_defaults_and_options(gc, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = gc.parse_args([])
    assert args.out == str(tmp_path / "output" / "gpu_check" / "gpu_check.json")
    assert args.steps == ALL_STEPS
    assert (args.ngpus, args.tolerance, args.cpu_dry_run, args.keep_work) == (0, 3.0, False, False)
    args = gc.parse_args(["--out", "x/report.json", "--steps", "collectives, pipeline", "--tolerance", "1.5",
                          "--ngpus", "2", "--cpu-dry-run"])
    assert args.out == str(tmp_path / "x" / "report.json")
    assert args.steps == ["pipeline", "collectives"]  # the check's order, whatever the order given
    assert (args.ngpus, args.tolerance, args.cpu_dry_run) == (2, 1.5, True)
    assert gc.parse_args(["--steps", "decoding"]).steps == ["decoding"]
    assert gc.parse_args(["--steps", "decoding,pipeline"]).steps == ["pipeline", "decoding"]


@pytest.mark.parametrize("argv, message", [
    (["--steps", "pipeline,nccl"], "--steps: unknown step(s) nccl"),
    (["--steps", ","], "--steps: unknown step(s) (none given)"),
    (["--steps", "decoding,nvjpeg"], "--steps: unknown step(s) nvjpeg"),
    (["--out", "report.txt"], "--out must name a .json file"),
    (["--tolerance", "-1"], "--tolerance must be a finite number >= 0"),
    (["--ngpus", "-2"], "--ngpus must be >= 0"),
    (["--ngpus", "two"], "argument --ngpus: invalid int value"),
    (["--frobnicate"], "unrecognized arguments: --frobnicate"),
])
def test_a_bad_argument_is_one_line_and_exit_2(gc, capsys, argv, message):
    with pytest.raises(SystemExit) as exc:
        gc.main([*argv, "--cpu-dry-run"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err, err


@pytest.mark.slow
def test_refused_without_a_gpu(tmp_path):
    out = tmp_path / "never.json"
    proc = run_script("--out", out)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: no CUDA GPU visible"), proc.stderr
    assert "--cpu-dry-run" in proc.stderr and "Traceback" not in proc.stderr
    assert proc.stdout == "" and not out.exists()


# --------------------------------------------------------------------------------------- the report
def test_dry_run_report_schema(gc, tmp_path, capsys):
    out = tmp_path / "sub" / "report.json"
    assert gc.main(["--cpu-dry-run", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert set(report) == {"schema", "status", "dry_run", "command", "out", "tolerance", "budget_s", "seconds",
                           "machine", "steps"}
    assert (report["schema"], report["status"], report["dry_run"]) == ("advbct-gpu-check/1", "ok", True)
    assert report["out"] == str(out) and report["tolerance"] == 3.0
    assert report["command"].startswith("bash tools/gpu_check.sh --cpu-dry-run --out ")
    assert isinstance(report["seconds"], float) and report["seconds"] >= 0
    machine = report["machine"]
    assert set(machine) == MACHINE_KEYS
    assert (machine["ngpus"], machine["gpus"]) == (0, []) and isinstance(machine["cores"], int)
    assert list(report["steps"]) == ALL_STEPS
    for name, step in report["steps"].items():
        assert set(step) == STEP_KEYS, name
        assert step["status"] in gc.STATUSES and step["status"] == "skipped"
        assert step["reason"] == "--cpu-dry-run: the GPU steps do not run"
        assert step["kind"] in ("correctness", "performance", "correctness+performance")
        assert isinstance(step["title"], str) and step["title"]
        assert (step["kind"], step["title"]) == (gc.KINDS[name], gc.TITLES[name])
        assert (step["seconds"], step["figures"], step["commands"], step["log"]) == (0.0, {}, [], None)
    assert report["steps"]["pipeline"]["kind"] == "correctness"
    decoding = report["steps"]["decoding"]
    assert (decoding["status"], decoding["reason"]) == ("skipped", "--cpu-dry-run: the GPU steps do not run")
    assert decoding["kind"] == "correctness+performance" and "nvjpeg" in decoding["title"]
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("GPU check (cpu dry run): no GPU;") and len(lines) == 8
    assert [ln.split()[:2] for ln in lines[1:7]] == [[f"{c}.", s] for c, s in zip("abcdef", report["steps"])]
    assert all("[skipped]" in ln for ln in lines[1:7]) and lines[7].startswith("result: OK")
    assert not (tmp_path / "sub" / "report_work").exists()  # a dry run prepares nothing


def test_a_failed_step_does_not_stop_the_later_ones(gc, tmp_path, monkeypatch, capsys):
    """Orchestration on a pretend one-GPU machine with stand-in steps: a check that fails and a step that
    crashes are recorded as failed, the later steps still run, the exit status is 1."""
    ran = []

    def failing(ctx, record, timeout):
        ran.append("pipeline")
        raise gc.StepFailed("GPU and CPU headline mAPs differ")

    def crashing(ctx, record, timeout):
        ran.append("training")
        raise RuntimeError("CUDA error: an illegal memory access")

    def fine(ctx, record, timeout):
        ran.append("losses")
        record["figures"].update({"methods": {"advbct": {"vectorised_ms": 1.0, "reference_ms": 80.0,
                                                         "speedup": 80.0}},
                                  "target_met": True})

    def decoding(ctx, record, timeout):
        ran.append("decoding")
        record["figures"].update(gc.decoding_figures(loader_result()))

    monkeypatch.setattr(gc, "visible_gpus", lambda: 1)
    monkeypatch.setattr(gc, "machine_info", lambda n: {"ngpus": n, "gpus": ["Stand-in GPU"], "torch": "x",
                                                         "commit": "abc"})
    monkeypatch.setattr(gc, "_faiss_gpu", lambda: (False, "faiss has no GPU support"))
    monkeypatch.setattr(gc, "RUNNERS", {"pipeline": failing, "training": crashing, "losses": fine,
                                        "decoding": decoding})
    out = tmp_path / "r.json"
    assert gc.main(["--out", str(out)]) == 1  # the exit status (sys.exit(main()) when run as a script)
    assert ran == ["pipeline", "training", "losses", "decoding"]
    report = json.loads(out.read_text())
    steps = report["steps"]
    assert report["status"] == "failed"
    assert [steps[s]["status"] for s in gc.STEPS] == ["failed", "failed", "ok", "skipped", "skipped", "ok"]
    assert steps["pipeline"]["reason"] == "GPU and CPU headline mAPs differ"
    assert steps["training"]["reason"] == "RuntimeError: CUDA error: an illegal memory access"
    assert steps["search"]["reason"] == "faiss has no GPU support"
    assert steps["collectives"]["reason"] == "1 GPU in use: an all-reduce across GPUs needs two or more"
    assert not (tmp_path / "r_work").exists()  # the pipeline's work folder is removed at the end
    printed = capsys.readouterr().out
    assert "result: FAILED (pipeline, training failed)" in printed and "advbct 80x" in printed
    assert "f. decoding" in printed and "nvjpeg 5,000 img/s on the GPU" in printed


@pytest.mark.slow
def test_a_failing_or_hanging_command_is_reported(gc, tmp_path):
    """A step's command: its error line becomes the reason; on a time-out its whole process group (torchrun's
    ranks) is stopped, a child started in the background included."""
    log = tmp_path / "logs" / "step.log"
    with pytest.raises(gc.StepFailed) as exc:
        gc.run_logged(["bash", "-c", "echo working; echo 'error: DATA.ROOT not found' >&2; exit 2"], str(log), 30,
                      what="gpu old model")
    assert str(exc.value) == f"gpu old model exited 2: error: DATA.ROOT not found (log: {log})"
    marker = tmp_path / "still-running"
    start = time.monotonic()
    with pytest.raises(gc.StepFailed, match=r"^sleeper timed out after 1 s"):
        gc.run_logged(["bash", "-c", f"(sleep 2; touch {marker}) & sleep 60"], str(log), 1, what="sleeper")
    time.sleep(max(0.0, start + 2.5 - time.monotonic()))   # the child would have touched it 2 s after its start
    assert not marker.exists()
    assert "$ bash -c 'echo working;" in log.read_text()  # every command is logged before its output


def test_steps_not_selected_are_skipped_with_that_reason(gc, tmp_path):
    out = tmp_path / "r.json"
    assert gc.main(["--cpu-dry-run", "--steps", "losses", "--out", str(out)]) == 0
    steps = json.loads(out.read_text())["steps"]
    assert steps["losses"]["reason"] == "--cpu-dry-run: the GPU steps do not run"
    assert {steps[s]["reason"] for s in ("pipeline", "training", "search", "collectives", "decoding")} == \
        {"not selected (--steps)"}
    assert gc.main(["--cpu-dry-run", "--steps", "decoding", "--out", str(out)]) == 0
    steps = json.loads(out.read_text())["steps"]
    assert steps["decoding"]["reason"] == "--cpu-dry-run: the GPU steps do not run"
    assert {r["reason"] for s, r in steps.items() if s != "decoding"} == {"not selected (--steps)"}


# ------------------------------------------------------------------------------- step a: comparison
def test_comparison_within_tolerance(gc):
    gpu = {"advbct/roxford5k/self": 41.5, "advbct/roxford5k/cross": 30.0, "old/roxford5k/self": 28.25}
    cpu = {"advbct/roxford5k/self": 40.0, "advbct/roxford5k/cross": 32.0, "old/roxford5k/self": 28.25}
    c = gc.compare_maps(gpu, cpu, 3.0)
    assert c["within_tolerance"] is True
    assert c["deltas"] == {"advbct/roxford5k/cross": -2.0, "advbct/roxford5k/self": 1.5, "old/roxford5k/self": 0.0}
    assert (c["max_abs_delta"], c["worst"], c["compared"]) == (2.0, "advbct/roxford5k/cross", 3)
    assert gc.compare_maps({"a": 13.0}, {"a": 10.0}, 3.0)["within_tolerance"] is True  # |delta| = tolerance


def test_comparison_outside_tolerance_missing_or_not_finite(gc):
    c = gc.compare_maps({"a": 50.0, "b": 20.0}, {"a": 46.9, "b": 20.5}, 3.0)
    assert c["within_tolerance"] is False and c["worst"] == "a" and c["max_abs_delta"] == pytest.approx(3.1)
    c = gc.compare_maps({"a": 50.0}, {"a": 50.0, "b": 20.0}, 3.0)
    assert c["within_tolerance"] is False and c["missing"] == ["b"] and c["compared"] == 1
    c = gc.compare_maps({"a": 50.0, "b": math.nan}, {"a": 50.0, "b": 20.0}, 3.0)
    assert c["within_tolerance"] is False and c["not_finite"] == ["b"]
    assert gc.compare_maps({}, {}, 3.0)["within_tolerance"] is False  # nothing compared is no pass


def test_headline_maps_read_the_test_script_results(gc, tmp_path):
    """Medium mAP on the revisited sets and mAP@100 on GLDv2, per model, from results.json as scripts/test.sh
    writes them (EVAL.SAVE_DIR/<set>/results.json)."""
    def revisited(medium):
        return {"mAP": {"easy": medium + 10, "medium": medium, "hard": medium - 10}, "mP@k": {}, "n_queries": {}}
    for i, model in enumerate(("advbct", "hot_refresh")):
        for name in ("rparis6k", "roxford5k", "gldv2"):
            sections = {"self_test": 60.0 + i, "cross_test": 50.0 + i, "old_self_test": 40.0}
            result = {"dataset": name}
            for key, value in sections.items():
                result[key] = {"mAP@100": value - 5} if name == "gldv2" else revisited(value)
            (tmp_path / model / name).mkdir(parents=True)
            (tmp_path / model / name / "results.json").write_text(json.dumps(result))
    maps = gc.headline_maps(str(tmp_path))
    assert len(maps) == 15
    assert maps["advbct/roxford5k/self"] == 60.0 and maps["hot_refresh/rparis6k/cross"] == 51.0
    assert maps["advbct/gldv2/self"] == 55.0 and maps["hot_refresh/gldv2/cross"] == 46.0
    assert maps["old/roxford5k/self"] == 40.0 and maps["old/gldv2/self"] == 35.0


def test_pipeline_plan_gives_gpus_and_cpu_the_same_batches(gc, tmp_path):
    assert gc.pipeline_batches(1) == (32, 32) and gc.pipeline_batches(4) == (8, 32)
    assert gc.pipeline_batches(3) == (10, 30) and gc.pipeline_batches(8) == (4, 32)
    assert gc.iters_per_epoch(388, 32) == 12 and gc.iters_per_epoch(116, 30) == 3 and gc.iters_per_epoch(5, 32) == 1
    lists = {"old": "old.txt", "new": "new.txt", "old_images": 116, "new_images": 388}
    plans = {dev: gc.pipeline_commands(dev, str(tmp_path / dev), "DATA", lists, 3, "PRE.pth") for dev in ("gpu", "cpu")}
    for dev, plan in plans.items():
        assert [what for what, _, _ in plan] == ["old model", "meta", "advbct", "hot_refresh", "test advbct",
                                                 "test hot_refresh"]
        assert [cmd[1] for _, cmd, _ in plan] == ["scripts/train_old.sh", "scripts/extract_meta.sh",
                                                  "scripts/train_new.sh", "scripts/train_new.sh",
                                                  "scripts/test.sh", "scripts/test.sh"]
    def opt(cmd, key):
        return cmd[cmd.index(key) + 1]
    for what, _, env in plans["gpu"]:  # every command on the 3 GPUs, fp32 without TF32
        assert (env["NGPUS"], env["NVIDIA_TF32_OVERRIDE"]) == ("3", "0") and "CUDA_VISIBLE_DEVICES" not in env, what
    # the CPU reference: no GPU; the trainings on 3 gloo processes (the same per-rank batches and per-rank loss
    # normalisation), meta and evaluation in one process
    assert [env["NGPUS"] for _, _, env in plans["cpu"]] == ["3", "1", "3", "3", "1", "1"]
    assert all(env["CUDA_VISIBLE_DEVICES"] == "" for _, _, env in plans["cpu"])
    assert int(plans["cpu"][0][2]["OMP_NUM_THREADS"]) == max(1, (os.cpu_count() or 1) // 3)
    for i in (0, 2, 3):  # the training runs: 10 images per rank on both, the same iterations
        gpu_cmd, cpu_cmd = plans["gpu"][i][1], plans["cpu"][i][1]
        assert opt(gpu_cmd, "TRAIN.BATCH_SIZE") == opt(cpu_cmd, "TRAIN.BATCH_SIZE") == "10"
        assert opt(gpu_cmd, "TRAIN.MAX_ITERS_PER_EPOCH") == opt(cpu_cmd, "TRAIN.MAX_ITERS_PER_EPOCH")
        assert opt(gpu_cmd, "TRAIN.AMP") == opt(cpu_cmd, "TRAIN.AMP") == "none"
        assert opt(gpu_cmd, "MODEL.PRETRAINED_PATH") == opt(cpu_cmd, "MODEL.PRETRAINED_PATH") == "PRE.pth"
    assert opt(plans["gpu"][0][1], "TRAIN.MAX_ITERS_PER_EPOCH") == "3"
    # the old model: 4 epochs of 3 steps at the configs' LR; the new ones: one epoch of 12 steps at LR 0.01
    assert [opt(plans["gpu"][i][1], k) for i in (0, 2) for k in ("TRAIN.EPOCHS", "TRAIN.LR", "TRAIN.LR_STEPS")] == \
        ["4", "0.1", "[3]", "1", "0.01", "[1]"]
    assert opt(plans["gpu"][2][1], "TRAIN.MAX_ITERS_PER_EPOCH") == "12"
    assert plans["gpu"][4][2]["NEW_MODEL_PATH"] == str(tmp_path / "gpu" / "advbct" / "final.pth")
    assert plans["cpu"][5][2]["NEW_MODEL_PATH"] == str(tmp_path / "cpu" / "hot_refresh" / "final.pth")
    # the backbone both start from is trained once, on the GPUs, with their per-GPU batch
    cmd, env = gc.pretrain_command("DATA", "PRE", 3)
    assert cmd[:3] == ["bash", "scripts/train_new.sh", "configs/synthetic/pretrain_r18.yml"]
    assert (opt(cmd, "TRAIN.BATCH_SIZE"), opt(cmd, "OUTPUT"), env["NGPUS"]) == ("10", "PRE", "3")


def test_weight_divergence_is_relative_to_the_update(gc, tmp_path):
    import torch

    start = {"backbone.conv.weight": torch.zeros(2), "backbone.bn.running_mean": torch.zeros(2),
             "backbone.bn.num_batches_tracked": torch.tensor(0), "embedding.fc.weight": torch.zeros(2)}
    cpu = {"backbone.conv.weight": torch.tensor([3.0, 4.0]), "backbone.bn.running_mean": torch.ones(2),
           "backbone.bn.num_batches_tracked": torch.tensor(3), "embedding.fc.weight": torch.ones(2)}
    gpu = {"backbone.conv.weight": torch.tensor([3.0, 4.5]), "backbone.bn.running_mean": torch.full((2,), 9.0),
           "backbone.bn.num_batches_tracked": torch.tensor(3), "embedding.fc.weight": torch.full((2,), 7.0)}
    # only the backbone's learned tensors count: |(0, 0.5)| / |(3, 4)| = 0.1
    assert gc.weight_divergence(gpu, cpu, start) == pytest.approx(0.1)
    torch.save({"model": start}, tmp_path / "pre.pth")
    for device, states in (("gpu", {"old": gpu, "advbct": cpu}), ("cpu", {"old": cpu, "advbct": cpu})):
        for model, state in states.items():
            (tmp_path / device / model).mkdir(parents=True)
            torch.save({"model": state}, tmp_path / device / model / "final.pth")
    w = gc.compare_weights(str(tmp_path / "gpu"), str(tmp_path / "cpu"), str(tmp_path / "pre.pth"),
                           ("old", "advbct"), 0.25)
    assert w["divergence"] == {"old": 0.1, "advbct": 0.0} and (w["worst"], w["within_tolerance"]) == ("old", True)
    assert gc.compare_weights(str(tmp_path / "gpu"), str(tmp_path / "cpu"), str(tmp_path / "pre.pth"),
                              ("old",), 0.05)["within_tolerance"] is False


# ---------------------------------------------------------------------------- step b: the overhead
def test_advbct_overhead_formula_and_rows(gc):
    overhead = gc.load_suite("training").advbct_overhead
    assert overhead(100.0, 130.0, 27.0) == pytest.approx(0.03)
    assert overhead(200.0, 260.0, 40.0) == pytest.approx(0.10)
    assert overhead(50.0, 60.0, 12.5) == pytest.approx(-0.05)  # timing noise can make it negative
    cuda = {"device": "GPU", "img_size": 224, "batch": 256, "tf32": {"cudnn": True, "matmul": False},
            "resnet18": {"bf16": {"plain": {"step_ms": 100.0, "img_per_s": 2560.0},
                                  "advbct": {"step_ms": 130.0, "img_per_s": 1969.2},
                                  "old_forward": {"step_ms": 27.0, "img_per_s": 9481.5}},
                         "fp32": {"plain": {"step_ms": 200.0, "img_per_s": 1280.0},
                                  "advbct": {"step_ms": 260.0, "img_per_s": 984.6},
                                  "old_forward": {"step_ms": 40.0, "img_per_s": 6400.0}}}}
    rows = gc.training_rows(cuda)
    assert sorted(rows) == ["resnet18/bf16", "resnet18/fp32"]
    assert rows["resnet18/bf16"]["overhead"] == 0.03 and rows["resnet18/bf16"]["target_met"] is True
    assert rows["resnet18/fp32"]["overhead"] == 0.1 and rows["resnet18/fp32"]["target_met"] is False
    assert rows["resnet18/fp32"]["old_forward_ms"] == 40.0


def test_training_suite_times_the_old_forward(benchmark_tools, tmp_path):
    """The figures the overhead is computed from, on CPU: the old forward is timed and the overhead is
    the formula applied to the reported step times."""
    out = tmp_path / "training.json"
    benchmark_tools.cli.main(["training", "--cpu-size", "32", "--cpu-batch", "4", "--num-classes", "10",
                              "--old-classes", "4", "--emb-dim", "16", "--steps", "1", "--warmup", "0",
                              "--threads", "1", "--no-gpu", "--json", str(out)])
    cpu = json.loads(out.read_text())["cpu"]
    old = cpu["old_forward"]
    # img/s comes from the unrounded step time, step_ms is rounded to 0.01 ms: equal up to both roundings
    ms = old["step_ms"]
    assert ms > 0 and 4000.0 / (ms + 0.005) - 0.05 <= old["img_per_s"] <= 4000.0 / (ms - 0.005) + 0.05
    overhead = benchmark_tools.suite("training").advbct_overhead
    assert cpu["advbct_overhead"] == round(overhead(cpu["plain"]["step_ms"], cpu["advbct"]["step_ms"],
                                                    old["step_ms"]), 4)


# ------------------------------------------------------------------------------ step e: collectives
def test_bus_bandwidth_and_sizes(benchmark_tools):
    coll = benchmark_tools.suite("collectives")
    assert coll.bus_bandwidth(10.0, 2) == pytest.approx(10.0)      # 2(n-1)/n = 1
    assert coll.bus_bandwidth(10.0, 4) == pytest.approx(15.0)      # 1.5
    assert coll.bus_bandwidth(10.0, 8) == pytest.approx(17.5)      # 1.75
    assert coll.algorithm_bandwidth(2**20, 1e-3) == pytest.approx(1.048576)  # 1 MiB in 1 ms, GB/s
    assert coll.parse_bytes("1M") == 2**20 and coll.parse_bytes("64K") == 65536 and coll.parse_bytes("4096") == 4096
    assert coll.parse_bytes("256MB") == 2**28 and coll.parse_bytes("2g") == 2**31
    for bad in ("1.5M", "6", "abc", "0"):
        with pytest.raises(argparse.ArgumentTypeError):
            coll.parse_bytes(bad)
    assert coll.sizes(2**20, 2**28, 2) == [2**k for k in range(20, 29)]  # the check's 1M..256M: 9 rows
    assert coll.sizes(4096, 65536, 4) == [4096, 16384, 65536]


@pytest.mark.slow
def test_collectives_on_two_gloo_processes(gc, tmp_path):
    """The command the check runs (torchrun, one process per GPU), on 2 CPU processes with tiny buffers."""
    out = tmp_path / "coll.json"
    cmd = gc.collectives_command(sys.executable, 2, str(out), min_bytes="4K", max_bytes="64K", iters=3, warmup=1)
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", PYTHONPATH=str(REPO))
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    fig = json.loads(out.read_text())
    assert (fig["backend"], fig["world_size"], fig["device"], fig["iters"], fig["warmup"]) == ("gloo", 2, "cpu", 3, 1)
    assert [r["bytes"] for r in fig["rows"]] == [4096, 8192, 16384, 32768, 65536]
    assert fig["correct"] is True and all(r["correct"] for r in fig["rows"])
    for r in fig["rows"]:
        assert r["time_us"] > 0
        assert r["algbw_gbps"] == pytest.approx(r["bytes"] / (r["time_us"] * 1e-6) / 1e9, rel=1e-4)
        assert r["busbw_gbps"] == pytest.approx(r["algbw_gbps"] * 2 * (2 - 1) / 2, rel=1e-4)
    assert fig["peak_busbw_gbps"] == max(r["busbw_gbps"] for r in fig["rows"])
    assert proc.stdout.count('"world_size": 2') == 1  # rank 0 alone reports


# ------------------------------------------------------------------------------------ step f: decoding
def loader_result(nvjpeg_mad=0.2, cpu_mad=0.14, gpu=True):
    """The loader suite's JSON as its --json writes it, with made-up figures (the nvjpeg row only with CUDA)."""
    modes = {"pil": {"img_s_per_core": 131.7, "vs_pil": 1.0, "pixel_mad": 0.0},
             "pil_draft": {"img_s_per_core": 218.6, "vs_pil": 1.66, "pixel_mad": 0.738},
             "nvjpeg_cpu": {"img_s_per_core": 61.9, "vs_pil": 0.47, "pixel_mad": cpu_mad},
             "preresized": {"img_s_per_core": 297.6, "vs_pil": 2.26, "pixel_mad": 1.37}}
    if gpu:
        modes["nvjpeg"] = {"worker_img_s_per_core": 900.1, "gpu_img_s": 5000.0, "pixel_mad": nvjpeg_mad}
    return {"setup": {"size": 224, "images": 64, "repeats": 2, "short_side": 256, "weights": None,
                      "arch": "resnet18", "threads": 1},
            "folders": [{"root": "64 generated photographs", "image_size": "640x480", "images": 64,
                         "kbytes_per_image": 70.3, "preresized_kbytes_per_image": 26.2, "modes": modes}]}


def test_decoding_figures_of_a_good_result(gc):
    fig = gc.decoding_figures(loader_result())
    assert fig == {"image_size": "640x480", "images": 64, "input_size": 224,
                   "pil_img_s_per_core": 131.7, "pil_draft_img_s_per_core": 218.6, "pil_draft_vs_pil": 1.66,
                   "preresized_img_s_per_core": 297.6, "preresized_vs_pil": 2.26,
                   "nvjpeg_gpu_img_s": 5000.0, "nvjpeg_worker_img_s_per_core": 900.1,
                   "pixel_mad": {"pil": 0.0, "pil_draft": 0.738, "nvjpeg_cpu": 0.14, "preresized": 1.37,
                                 "nvjpeg": 0.2},
                   "pixel_tolerance": 1.5, "within_tolerance": True}
    assert gc.NVJPEG_PIXEL_TOLERANCE == 1.5
    gc.check_decoding(fig)  # passes
    # only the nvjpeg paths are held to the tolerance (pil_draft and a pre-resized copy differ by design)
    far = loader_result(nvjpeg_mad=1.5, cpu_mad=1.5)
    far["folders"][0]["modes"]["pil_draft"]["pixel_mad"] = 9.0
    far["folders"][0]["modes"]["preresized"]["pixel_mad"] = 12.0
    gc.check_decoding(gc.decoding_figures(far))  # |mad| = tolerance passes
    line = gc.step_summary("decoding", {"status": "ok", "reason": None, "figures": fig})
    assert line == ("64 JPEGs of 640x480: nvjpeg 5,000 img/s on the GPU, pixels 0.20 levels from PIL's (CPU "
                    "decoder 0.14; tolerance 1.5); per core: PIL 132 img/s, pil_draft 1.66x, pre-resized 2.26x, "
                    "nvjpeg workers 900 img/s")


def test_decoding_fails_without_the_nvjpeg_row(gc):
    fig = gc.decoding_figures(loader_result(gpu=False))
    assert (fig["nvjpeg_gpu_img_s"], fig["nvjpeg_worker_img_s_per_core"]) == (None, None)
    assert set(fig["pixel_mad"]) == {"pil", "pil_draft", "nvjpeg_cpu", "preresized"}
    assert fig["within_tolerance"] is False and fig["pil_img_s_per_core"] == 131.7  # the CPU figures are kept
    with pytest.raises(gc.StepFailed, match=r"^nvjpeg not measured: .*torch\.cuda\.is_available\(\)"):
        gc.check_decoding(fig)


@pytest.mark.parametrize("nvjpeg_mad, cpu_mad, message", [
    (3.0, 0.14, "nvjpeg pixel_mad 3.0 vs PIL exceeds the tolerance 1.5 levels"),
    (0.2, 2.0, "nvjpeg_cpu pixel_mad 2.0 vs PIL exceeds the tolerance 1.5 levels"),
    (40.0, 1.6, "nvjpeg pixel_mad 40.0 vs PIL exceeds the tolerance 1.5 levels; "
                "nvjpeg_cpu pixel_mad 1.6 vs PIL exceeds the tolerance 1.5 levels"),
    (math.nan, 0.14, "nvjpeg pixel_mad nan is not a finite number"),
    (None, 0.14, "nvjpeg pixel_mad None is not a finite number"),
])
def test_decoding_fails_when_pixels_are_off(gc, nvjpeg_mad, cpu_mad, message):
    fig = gc.decoding_figures(loader_result(nvjpeg_mad=nvjpeg_mad, cpu_mad=cpu_mad))
    assert fig["within_tolerance"] is False
    with pytest.raises(gc.StepFailed) as exc:
        gc.check_decoding(fig)
    assert str(exc.value) == message


def test_decoding_refuses_a_malformed_suite_result(gc):
    for result in ({}, {"folders": []}, {"folders": [None]}, []):
        with pytest.raises(gc.StepFailed, match="^loader benchmark measured no folder"):
            gc.decoding_figures(result)
    broken = loader_result()
    del broken["folders"][0]["modes"]["pil"], broken["folders"][0]["modes"]["preresized"]
    with pytest.raises(gc.StepFailed, match=r"^loader benchmark wrote no pil, preresized row\(s\)"):
        gc.decoding_figures(broken)


def test_decoding_step_runs_the_loader_suite_and_keeps_its_figures(gc, tmp_path, monkeypatch):
    """The step through run_step with a stand-in for the command: the suite's command line, its JSON read back,
    the figures recorded even when the pixel check fails."""
    ran = []

    def fake_run_logged(cmd, log_path, timeout, env=None, what=None):
        ran.append((cmd, log_path, timeout))
        os.makedirs(os.path.dirname(log_path), exist_ok=True)  # as run_logged does
        with open(cmd[cmd.index("--json") + 1], "w") as f:
            json.dump(loader_result(nvjpeg_mad=3.0), f)

    monkeypatch.setattr(gc, "run_logged", fake_run_logged)
    ctx = gc.Context(gc.parse_args(["--out", str(tmp_path / "r.json")]), 1)
    ctx.deadline = time.monotonic() + 1000
    record = gc.run_step(ctx, "decoding", 0)
    json_out = str(tmp_path / "r_logs" / "decoding.json")
    cmd = [sys.executable, "tools/benchmark.py", "loader", "--generate", "640x480", "--images", "64",
           "--repeats", "2", "--json", json_out]
    assert ran == [(cmd, str(tmp_path / "r_logs" / "decoding.log"), 90)]
    assert record["commands"] == [shlex.join(cmd)] and record["log"] == str(tmp_path / "r_logs" / "decoding.log")
    assert (record["status"], record["reason"]) == ("failed", "nvjpeg pixel_mad 3.0 vs PIL exceeds the tolerance "
                                                              "1.5 levels")
    assert record["figures"]["pixel_mad"]["nvjpeg"] == 3.0 and record["figures"]["nvjpeg_gpu_img_s"] == 5000.0


@pytest.mark.slow
def test_decoding_step_on_the_cpu(gc, tmp_path, monkeypatch):
    """The step's real command with CUDA hidden: the suite's JSON is what the step reads, the CPU decoder's
    arithmetic lies within the tolerance, and the missing GPU row fails the step by name."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    monkeypatch.setattr(gc, "DECODING_IMAGES", 8)  # the same command, fewer images: a few seconds
    ctx = gc.Context(gc.parse_args(["--out", str(tmp_path / "r.json")]), 1)
    record = gc.new_record("decoding")
    with pytest.raises(gc.StepFailed, match="^nvjpeg not measured: "):
        gc.step_decoding(ctx, record, 300)
    fig = record["figures"]
    assert (fig["image_size"], fig["images"], fig["input_size"]) == ("640x480", 8, 224)
    assert fig["pil_img_s_per_core"] > 0 and fig["nvjpeg_gpu_img_s"] is None
    assert fig["pixel_mad"]["pil"] == 0.0 and fig["pixel_mad"]["nvjpeg_cpu"] <= gc.NVJPEG_PIXEL_TOLERANCE


# ------------------------------------------------------------------------------------ the install
@pytest.mark.parametrize("smi, override, expected", [
    ("exit 0", "", "gpu"), ("exit 9", "", "cpu"), (None, "", "cpu"), ("exit 0", "cpu", "cpu"), (None, "gpu", "gpu"),
])
def test_faiss_extra_follows_the_driver(tmp_path, smi, override, expected):
    """scripts/lib/venv.sh installs faiss-gpu-cu12 where `nvidia-smi -L` succeeds, faiss-cpu elsewhere."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    if smi is not None:
        (bin_dir / "nvidia-smi").write_text(f"#!/bin/sh\n{smi}\n")
        (bin_dir / "nvidia-smi").chmod(0o755)
    # PATH holds the stand-in alone: a real nvidia-smi elsewhere on the machine must not answer
    env = {"PATH": str(bin_dir), "HOME": str(tmp_path), "ADVBCT_FAISS": override}
    proc = subprocess.run([shutil.which("bash"), "-c", f"source {REPO}/scripts/lib/venv.sh; faiss_extra"], env=env,
                          capture_output=True, text=True, timeout=30)
    assert (proc.returncode, proc.stdout.strip()) == (0, expected), proc.stderr


def test_faiss_extra_refuses_an_unknown_choice(tmp_path):
    proc = subprocess.run([shutil.which("bash"), "-c", f"source {REPO}/scripts/lib/venv.sh; faiss_extra"],
                          env={"PATH": str(tmp_path), "ADVBCT_FAISS": "rocm"}, capture_output=True, text=True,
                          timeout=30)
    assert proc.returncode == 2 and proc.stderr == "error: ADVBCT_FAISS='rocm': expected cpu or gpu\n"


def test_missing_faiss_names_both_install_commands(monkeypatch):
    from advbct.errors import UserError
    from advbct.evaluation import search

    monkeypatch.setitem(sys.modules, "faiss", None)  # import faiss -> ImportError
    with pytest.raises(UserError) as exc:
        search.faiss_gpu_available()
    message = str(exc.value)
    assert "\n" not in message and "pip install -e .[cpu]" in message and "pip install -e .[gpu]" in message
