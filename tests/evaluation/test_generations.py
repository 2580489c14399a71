"""A chain's evaluation (advbct.evaluation.generations): which model embeds the queries and which the gallery of
each matrix entry, the checked GENERATIONS keys, and the refusals before any image is embedded."""

import numpy as np
import pytest

from advbct.config import load_config
from advbct.errors import UserError
from advbct.evaluation.generations import generation_specs, run_generations, score_chain
from advbct.evaluation.test_sets import TestSet


def _test_set(n_query=6, per_query=3):
    """GLDv2-scored: query q's positives are gallery rows 3q..3q+2 (18 rows)."""
    gt = [np.arange(per_query * q, per_query * (q + 1)) for q in range(n_query)]
    return TestSet("gldv2", [f"q{i}" for i in range(n_query)], [f"g{i}" for i in range(n_query * per_query)], gt)


def test_entry_i_j_is_queries_of_i_against_the_gallery_of_j():
    rng = np.random.default_rng(0)
    ts = _test_set()
    centres = rng.normal(size=(6, 16)).astype(np.float32)
    good_q = centres + 0.01 * rng.normal(size=centres.shape).astype(np.float32)
    good_g = np.repeat(centres, 3, axis=0) + 0.01 * rng.normal(size=(18, 16)).astype(np.float32)
    noise_q, noise_g = (rng.normal(size=s).astype(np.float32) for s in ((6, 16), (18, 16)))
    # gen1 good everywhere; gen2: good queries, a gallery of noise; gen3: noise queries, a good gallery
    entry = score_chain(ts, [(good_q, good_g), (good_q, noise_g), (noise_q, good_g)])
    c = entry["matrix"]
    assert c[0][0] == 100.0 and c[1][0] == 100.0  # gen2's queries find gen1's gallery
    assert c[1][1] < 60 and c[2][0] < 60 and c[2][1] < 60 and c[2][2] < 60
    assert c[0][1] is None and c[0][2] is None and c[1][2] is None
    assert entry["metric"] == "mAP@100"
    assert entry["AC"] == pytest.approx(sum(c[i][j] > c[j][j] for i, j in ((1, 0), (2, 0), (2, 1))) / 3)
    i, j = np.tril_indices(3)
    assert entry["AM"] == pytest.approx(np.mean([c[a][b] for a, b in zip(i, j)]))
    assert [(p["query"], p["gallery"]) for p in entry["pairs"]] == [(1, 1), (2, 1), (2, 2), (3, 1), (3, 2), (3, 3)]
    assert all(p["metrics"]["mAP@100"] == c[p["query"] - 1][p["gallery"] - 1] for p in entry["pairs"])


def _cfg(*overrides):
    return load_config(None, list(overrides))


def test_specs_default_names_and_one_arch_for_all():
    specs = generation_specs(_cfg("GENERATIONS.WEIGHTS", "[a.pth,b.pth,c.pth]", "GENERATIONS.ARCHS", "[resnet50]"))
    assert specs == [("phi1", "resnet50", "a.pth"), ("phi2", "resnet50", "b.pth"), ("phi3", "resnet50", "c.pth")]
    specs = generation_specs(_cfg("GENERATIONS.WEIGHTS", "[a.pth,b.pth]", "GENERATIONS.ARCHS", "[resnet18,resnet50]",
                                  "GENERATIONS.NAMES", "[old,new]"))
    assert specs == [("old", "resnet18", "a.pth"), ("new", "resnet50", "b.pth")]


@pytest.mark.parametrize("overrides, message", [
    (("GENERATIONS.WEIGHTS", "[a.pth]"), "GENERATIONS.WEIGHTS: a chain needs at least two checkpoints"),
    ((), "GENERATIONS.WEIGHTS: a chain needs at least two checkpoints, oldest first .* got 0"),
    (("GENERATIONS.WEIGHTS", "[a.pth,b.pth,c.pth]", "GENERATIONS.ARCHS", "[resnet18,resnet50]"),
     "GENERATIONS.ARCHS: 2 architectures for the 3 checkpoints"),
    (("GENERATIONS.WEIGHTS", "[a.pth,b.pth]", "GENERATIONS.NAMES", "[x,x]"), "GENERATIONS.NAMES"),
])
def test_a_chain_that_is_no_chain_is_refused(overrides, message):
    with pytest.raises(UserError, match=message):
        generation_specs(_cfg(*overrides))


def test_refusals_before_any_image_is_embedded(random_checkpoint, tmp_path, monkeypatch):
    """A missing checkpoint names its GENERATIONS.WEIGHTS entry; models of different embedding sizes are refused;
    neither leaves a file in EVAL.SAVE_DIR (the test set root does not even exist: nothing was read)."""
    a, b = random_checkpoint(1, 32), random_checkpoint(2, 16)
    out = tmp_path / "out"
    base = ("EVAL.DATASET", "gldv2", "EVAL.ROOT", str(tmp_path / "nowhere"), "EVAL.SAVE_DIR", str(out))
    with pytest.raises(UserError, match=r"EVAL.ROOT|nowhere"):
        run_generations(_cfg(*base, "GENERATIONS.WEIGHTS", f"[{a},{b}]"))
    from advbct.evaluation import generations

    monkeypatch.setattr(generations, "load_test_set", lambda *args, **kw: _test_set())
    with pytest.raises(UserError, match=r"GENERATIONS.WEIGHTS\[1\] .*embeds to 16 dims but GENERATIONS.WEIGHTS"
                                        r"\[0\] .* to 32"):
        run_generations(_cfg(*base, "GENERATIONS.WEIGHTS", f"[{a},{b}]"))
    with pytest.raises(UserError, match=r"GENERATIONS.WEIGHTS\[1\]"):
        run_generations(_cfg(*base, "GENERATIONS.WEIGHTS", f"[{a},{tmp_path / 'missing.pth'}]"))
    assert not out.exists() or not any(out.iterdir())
