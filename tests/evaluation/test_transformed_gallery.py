"""The cross test through a transformation of the old gallery (EVAL.OLD_TRANSFORM): scores recomputed here on
hand-mapped features, the old self-test and the old-feature cache untouched, and each refusal in one line before
any image is embedded, leaving nothing written. The embedding itself is replaced by fixed features."""

import json

import numpy as np
import pytest
import torch

from advbct.config import load_config
from advbct.errors import UserError
from advbct.evaluation import evaluate, feature_cache, protocol
from advbct.evaluation.protocol import TestSet as RetrievalSet  # aliased: pytest would collect Test*
from advbct.evaluation.protocol import backfill_gallery, headline_value, score
from advbct.models import save_checkpoint
from advbct.models.transformation import FCTTransformation, ProcrustesMap, save_transformation

DIM, NQ, NG = 16, 6, 30


def random_orthogonal(d, seed):
    q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((d, d)))
    return q.astype(np.float32)


W = random_orthogonal(DIM, 0)


def features(seed=0):
    """Old features, and new ones that are the old ones rotated by W plus noise: mapped, the old gallery
    matches the new queries; unmapped, it does not."""
    rng = np.random.default_rng(seed)
    old_q, old_g = (rng.standard_normal((n, DIM)).astype(np.float32) for n in (NQ, NG))
    new_q = old_g[:NQ] @ W + 0.3 * rng.standard_normal((NQ, DIM)).astype(np.float32)  # query i ~ gallery i
    new_g = old_g @ W + 0.3 * rng.standard_normal((NG, DIM)).astype(np.float32)
    return {"new": (new_q, new_g), "old": (old_q, old_g)}


def make_set():
    gnd = [{"easy": np.array([i]), "hard": np.array([NQ + i]), "junk": np.array([], np.int64)} for i in range(NQ)]
    return RetrievalSet("roxford5k", [f"q{i}.jpg" for i in range(NQ)], [f"g{i}.jpg" for i in range(NG)], gnd)


class Stub(torch.nn.Module):
    """What evaluate_models reads of a model besides its embedding: its size and its device."""

    def __init__(self, dim=DIM):
        super().__init__()
        self.p = torch.nn.Parameter(torch.zeros(1))
        self.embed_dim = self.compatible_dim = dim


@pytest.fixture
def embedded(monkeypatch):
    """protocol.embed_test_set returns :func:`features` by the model's tag; ``calls`` lists the tags asked for."""
    feats, calls = features(), []

    def fake(model, ts, cfg, progress=True, tag="model"):
        calls.append(tag)
        q, g = feats[tag]
        return q.copy(), g.copy()

    monkeypatch.setattr(protocol, "embed_test_set", fake)
    return {"features": feats, "calls": calls}


def cfg_with(*extra):
    return load_config(None, ["EVAL.BACKFILL", "true", "EVAL.BACKFILL_RATIOS", "[0.0, 0.5, 1.0]", *extra])


def fct_network():
    torch.manual_seed(0)
    net = FCTTransformation(DIM, DIM, width=8, depth=1)
    net(torch.randn(20, DIM))  # running statistics away from their initial values
    return net.eval()


@pytest.mark.parametrize("kind", ["procrustes", "fct"])
def test_cross_test_and_backfilling_search_the_mapped_gallery(embedded, kind):
    ts = make_set()
    (new_q, new_g), (old_q, old_g) = embedded["features"]["new"], embedded["features"]["old"]
    if kind == "procrustes":
        transform, mapped = ProcrustesMap(DIM, DIM, torch.tensor(W)), old_g @ W
    else:
        transform = fct_network()
        with torch.no_grad():
            mapped = transform(torch.tensor(old_g)).numpy()
    result = protocol.evaluate_models(Stub(), Stub(), cfg_with(), progress=False, test_set=ts,
                                      old_transform=transform)
    assert result["cross_test"] == score(ts, new_q, mapped)
    assert result["old_self_test"] == score(ts, old_q, old_g)  # the old model's own features
    assert result["self_test"] == score(ts, new_q, new_g)
    assert result["backfill"]["values"][0] == pytest.approx(headline_value(result["cross_test"]), abs=1e-12)
    assert result["backfill"]["values"][-1] == pytest.approx(headline_value(result["self_test"]), abs=1e-12)
    if kind == "procrustes":  # the map is what makes the gallery searchable here
        unmapped = headline_value(score(ts, new_q, old_g))
        assert headline_value(result["cross_test"]) > unmapped + 30


def test_the_old_feature_cache_holds_unmapped_features(embedded, tmp_path):
    ts, old = make_set(), tmp_path / "old.pth"
    old.write_bytes(b"the old checkpoint's bytes key the cache")
    cfg = cfg_with("OLD_MODEL.WEIGHTS", str(old), "EVAL.OLD_FEATURES_CACHE", str(tmp_path / "cache"))
    protocol.evaluate_models(Stub(), Stub(), cfg, progress=False, test_set=ts,
                             old_transform=ProcrustesMap(DIM, DIM, torch.tensor(W)))
    key = feature_cache.cache_key(str(old), cfg.OLD_MODEL.ARCH, ts, cfg.EVAL.IMG_SIZE, cfg.EVAL.CROP_QUERY,
                                  cfg.EVAL.AMP, cfg.DATA.DECODE)
    cached = feature_cache.load(str(tmp_path / "cache"), ts.name, key)
    for got, want in zip(cached, embedded["features"]["old"]):
        np.testing.assert_array_equal(got, want)
    # another transformation reads the same entry: the old model is not embedded again
    result = protocol.evaluate_models(Stub(), Stub(), cfg, progress=False, test_set=ts, old_transform=fct_network())
    assert embedded["calls"] == ["new", "old", "new"] and "cross_test" in result


def test_evaluate_models_refuses_a_transformation_of_other_dims(embedded):
    with pytest.raises(UserError) as info:
        protocol.evaluate_models(Stub(), Stub(), cfg_with("EVAL.OLD_TRANSFORM", "t.pth"), progress=False,
                                 test_set=make_set(), old_transform=ProcrustesMap(8, DIM))
    assert str(info.value) == (f"EVAL.OLD_TRANSFORM t.pth maps 8 -> {DIM} dims but the old model embeds to "
                               f"{DIM} and the new model to {DIM}")
    assert embedded["calls"] == []


# ------------------------------------------------------------------- a new model with added dimensions (BT²)
class AddedDimsStub(Stub):
    """A new model whose embedding has K dims more than the old one, compatible on its first DIM (BT²'s head)."""

    def __init__(self, extra):
        super().__init__(DIM + extra)
        self.compatible_dim = DIM


def test_added_dimensions_search_the_zero_padded_old_gallery(monkeypatch):
    """The cross test is the release's: new queries cut to the old size against the old gallery; backfilling
    mixes re-embedded (full-size) and old (padded) items in one gallery; the old self-test is untouched."""
    ts, rng, extra = make_set(), np.random.default_rng(1), 5
    old_q, old_g = (rng.standard_normal((n, DIM)).astype(np.float32) for n in (NQ, NG))
    new_q = np.concatenate([old_g[:NQ] + 0.3 * rng.standard_normal((NQ, DIM)), rng.standard_normal((NQ, extra))],
                           axis=1).astype(np.float32)
    new_g = np.concatenate([old_g, rng.standard_normal((NG, extra))], axis=1).astype(np.float32)
    feats = {"new": (new_q, new_g), "old": (old_q, old_g)}
    monkeypatch.setattr(protocol, "embed_test_set", lambda model, t, cfg, progress=True, tag="m": feats[tag])
    result = protocol.evaluate_models(AddedDimsStub(extra), Stub(), cfg_with(), progress=False, test_set=ts)
    assert result["cross_test"] == score(ts, new_q[:, :DIM], old_g)  # utils/eval_utils.py: both cut to DIM
    assert result["self_test"] == score(ts, new_q, new_g)
    assert result["old_self_test"] == score(ts, old_q, old_g)
    assert result["backfill"]["values"][0] == pytest.approx(headline_value(result["cross_test"]), abs=1e-12)
    assert result["backfill"]["values"][-1] == pytest.approx(headline_value(result["self_test"]), abs=1e-12)
    padded = np.concatenate([old_g, np.zeros((NG, extra), np.float32)], axis=1)
    half = backfill_gallery(new_g, padded, 0.5, 0, "image", 16)
    assert result["backfill"]["values"][1] == pytest.approx(headline_value(score(ts, new_q, half)), abs=1e-12)
    with pytest.raises(UserError) as info:  # compatible on other dims than the old model's
        protocol.evaluate_models(AddedDimsStub(extra), Stub(DIM + 1), cfg_with(), progress=False, test_set=ts)
    assert str(info.value) == (f"the new model is compatible on its first {DIM} dims but the old model embeds to "
                               f"{DIM + 1}: cross-test needs the same embedding size (MODEL.EMB_DIM)")


# ------------------------------------------------------------------------------------- run_evaluation
@pytest.fixture
def checkpoints(random_checkpoint, tmp_path):
    """A new and an old 16-d ResNet-18 checkpoint, a new one whose saved config says COMP_LOSS.TYPE fct, and
    transformation files of the right and of the wrong dims."""
    new, old = random_checkpoint(0, DIM), random_checkpoint(1, DIM)
    marked = tmp_path / "fct_final.pth"
    save_checkpoint(marked, {"model": torch.load(new, weights_only=True)["model"],
                             "config": {"COMP_LOSS": {"TYPE": "fct"}}})
    right, wrong = tmp_path / "right.pth", tmp_path / "wrong.pth"
    save_transformation(right, ProcrustesMap(DIM, DIM, torch.tensor(W)))
    save_transformation(wrong, ProcrustesMap(8, 8))
    return {"new": new, "old": old, "marked": str(marked), "right": str(right), "wrong": str(wrong)}


def run(tmp_path, monkeypatch, new, *extra):
    monkeypatch.setattr(evaluate, "load_test_set", lambda *args, **kwargs: make_set())
    save = tmp_path / "eval"
    cfg = load_config(None, ["NEW_MODEL.WEIGHTS", str(new), "EVAL.SAVE_DIR", str(save), *extra])
    return save, evaluate.run_evaluation(cfg)


def refused(tmp_path, monkeypatch, embedded, new, *extra):
    with pytest.raises(UserError) as info:
        run(tmp_path, monkeypatch, new, *extra)
    assert embedded["calls"] == [] and not (tmp_path / "eval").exists()  # nothing embedded, nothing written
    assert "\n" not in str(info.value)
    return str(info.value)


def test_run_evaluation_records_the_transformation(checkpoints, embedded, tmp_path, monkeypatch):
    c = checkpoints
    import torch

    reads = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda f, *a, **k: reads.append(str(f)) or real_load(f, *a, **k))
    save, (result,) = run(tmp_path, monkeypatch, c["marked"], "OLD_MODEL.WEIGHTS", c["old"],
                          "EVAL.OLD_TRANSFORM", c["right"])
    (new_q, _), (_, old_g) = embedded["features"]["new"], embedded["features"]["old"]
    written = json.loads((save / "results.json").read_text())
    assert written["old_transform"] == {"path": c["right"], "kind": "procrustes"}
    assert written["cross_test"] == json.loads(json.dumps(score(make_set(), new_q, old_g @ W)))
    assert result["old_transform"] == written["old_transform"]
    # each file read once (the new checkpoint: its saved config, is it FCT's?, and its weights from one read),
    # with a transformation and in the plain cross test of a model that needs none
    assert sorted(p for p in reads if p.endswith(".pth")) == sorted([c["marked"], c["old"], c["right"]])
    reads.clear()
    run(tmp_path, monkeypatch, c["new"], "OLD_MODEL.WEIGHTS", c["old"])
    assert sorted(p for p in reads if p.endswith(".pth")) == sorted([c["new"], c["old"]])


def test_run_evaluation_refusals(checkpoints, embedded, tmp_path, monkeypatch):
    c = checkpoints
    assert refused(tmp_path, monkeypatch, embedded, c["new"], "EVAL.OLD_TRANSFORM", c["right"]) == \
        f"EVAL.OLD_TRANSFORM {c['right']} is set but OLD_MODEL.WEIGHTS is empty: the transformation maps the " \
        f"old model's gallery"
    assert refused(tmp_path, monkeypatch, embedded, c["marked"], "OLD_MODEL.WEIGHTS", c["old"]) == \
        f"NEW_MODEL.WEIGHTS {c['marked']} was trained with COMP_LOSS.TYPE fct, whose cross test maps the old " \
        f"gallery: set EVAL.OLD_TRANSFORM (written by scripts/train_transformation.sh)"
    assert refused(tmp_path, monkeypatch, embedded, c["new"], "OLD_MODEL.WEIGHTS", c["old"],
                   "EVAL.OLD_TRANSFORM", c["wrong"]) == \
        f"EVAL.OLD_TRANSFORM {c['wrong']} maps 8 -> 8 dims but the old model embeds to {DIM} and the new model to {DIM}"
    missing = str(tmp_path / "absent.pth")
    assert refused(tmp_path, monkeypatch, embedded, c["new"], "OLD_MODEL.WEIGHTS", c["old"],
                   "EVAL.OLD_TRANSFORM", missing) == f"EVAL.OLD_TRANSFORM: transformation file not found: {missing}"
    # an FCT model alone (its self-test, no old model) needs no transformation
    _, (result,) = run(tmp_path, monkeypatch, c["marked"])
    assert "cross_test" not in result and embedded["calls"] == ["new"]
