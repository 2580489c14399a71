"""The training benchmark's figures are consistent with each other, and ``--compile`` compiles the new model only.

Timings are not asserted (they go to docs/BENCHMARKS.md).
"""

import argparse
import json

import pytest
import torch

TINY = ["--cpu-size", "32", "--cpu-batch", "4", "--num-classes", "10", "--old-classes", "4", "--emb-dim", "16",
        "--steps", "1", "--warmup", "1", "--threads", "1", "--no-gpu"]


@pytest.fixture(scope="module")
def benchmark_cli(benchmark_tools):
    return benchmark_tools.cli, benchmark_tools.suite("training")


def _args(training, *extra):
    parser = argparse.ArgumentParser()
    training.add_arguments(parser)
    return parser.parse_args([*TINY, *extra])



def images_per_second_fits(fig, batch):
    """img/s comes from the unrounded step time and step_ms is rounded to 0.01 ms: img/s (rounded to 0.1)
    must lie within what any step time that rounds to step_ms gives."""
    ms = fig["step_ms"]
    return 1000.0 * batch / (ms + 0.005) - 0.05 <= fig["img_per_s"] <= 1000.0 * batch / (ms - 0.005) + 0.05

def test_figures_are_consistent(benchmark_cli, tmp_path):
    """Without warm-up the one timed step is the first: both figures describe the same step."""
    cli, _ = benchmark_cli
    out = tmp_path / "training.json"
    cli.main(["training", *TINY, "--warmup", "0", "--json", str(out)])
    result = json.loads(out.read_text())
    assert (result["setup"]["compile"], result["setup"]["warmup"]) == (False, 0)
    assert result["cuda"] == "unmeasured (--no-gpu)"
    cpu = result["cpu"]
    assert (cpu["arch"], cpu["img_size"], cpu["batch"], cpu["threads"]) == ("resnet18", 32, 4, 1)
    for kind in ("plain", "advbct"):
        fig = cpu[kind]
        assert fig["step_ms"] > 0
        assert abs(fig["first_step_s"] * 1000.0 - fig["step_ms"]) <= 5.01   # rounded to 10 ms
        assert images_per_second_fits(fig, batch=4)
    assert cpu["advbct_time_ratio"] == round(cpu["advbct"]["step_ms"] / cpu["plain"]["step_ms"], 3)
    old = cpu["old_forward"]
    assert old["step_ms"] > 0 and images_per_second_fits(old, batch=4)
    expected = (cpu["advbct"]["step_ms"] - cpu["plain"]["step_ms"] - old["step_ms"]) / cpu["plain"]["step_ms"]
    assert cpu["advbct_overhead"] == round(expected, 4)


def test_compile_wraps_the_new_model_only(benchmark_cli):
    cli, training = benchmark_cli
    gen = torch.Generator().manual_seed(0)
    plain = training.make_stepper(_args(training), "resnet18", torch.device("cpu"), "none", True, gen)
    assert plain.ddp is plain.model
    compiled = training.make_stepper(_args(training, "--compile"), "resnet18", torch.device("cpu"), "none", True, gen)
    assert compiled.ddp is not compiled.model and compiled.ddp._orig_mod is compiled.model
    assert compiled.old_model is not None and not hasattr(compiled.old_model, "_orig_mod")


def test_compile_without_warmup_is_refused(benchmark_cli, tmp_path):
    cli, _ = benchmark_cli
    out = tmp_path / "never.json"
    with pytest.raises(SystemExit, match="--compile needs --warmup >= 1"):
        cli.main(["training", *TINY, "--compile", "--warmup", "0", "--json", str(out)])
    assert not out.exists()
