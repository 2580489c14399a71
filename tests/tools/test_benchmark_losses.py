"""The loss benchmark's per-sample references compute the same values as the vectorised losses.

Timings are not asserted (they go to docs/BENCHMARKS.md); what is tested is that each timed pair
computes the same loss, and that the benchmark refuses to time a pair that disagrees.
"""

import json

import pytest

SMALL = ["--device", "cpu", "--batch", "48", "--dim", "16", "--old-classes", "30", "--new-classes", "100",
         "--old-fraction", "0.5", "--repeats", "1", "--warmup", "0", "--threads", "1"]


@pytest.fixture(scope="module")
def benchmark_cli(benchmark_tools):
    return benchmark_tools.cli, benchmark_tools.suite("losses")


def test_every_method_agrees_with_its_reference_and_json_schema(benchmark_cli, tmp_path):
    cli, losses = benchmark_cli
    out = tmp_path / "losses.json"
    cli.main(["losses", *SMALL, "--json", str(out)])
    result = json.loads(out.read_text())
    assert sorted(result) == sorted(losses.METHODS)
    for figures in result.values():
        assert sorted(figures) == ["reference_ms", "speedup", "vectorised_ms"]
        assert figures["vectorised_ms"] > 0 and figures["reference_ms"] > 0
        assert figures["speedup"] == pytest.approx(figures["reference_ms"] / figures["vectorised_ms"], rel=0.02)


def test_a_reference_that_disagrees_is_refused(benchmark_cli, monkeypatch, tmp_path):
    cli, losses = benchmark_cli
    original = losses.reference_adversarial
    monkeypatch.setattr(losses, "reference_adversarial", lambda *a: original(*a) * 1.01)
    with pytest.raises(RuntimeError, match="advbct_adversarial: vectorised loss"):
        cli.main(["losses", *SMALL, "--methods", "advbct_adversarial", "--json", str(tmp_path / "x.json")])
    assert not (tmp_path / "x.json").exists()
