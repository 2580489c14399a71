"""EVAL.OLD_FEATURES_CACHE: the old model's test features are embedded once and reused, identically, only
while the old checkpoint, the image lists and the eval settings are the same. The evaluations run on the tiny
synthetic benchmark (slow)."""

import numpy as np
import pytest
import torch

from advbct.config import load_config
from advbct.errors import UserError
from advbct.evaluation import feature_cache
from advbct.evaluation.protocol import evaluate_models, load_test_set
from advbct.models import load_trained_model

IMG = 32


class CountingModel(torch.nn.Module):
    """Wraps a model and counts the images it embeds."""

    def __init__(self, model):
        super().__init__()
        self.model, self.images = model, 0
        self.embed_dim = model.embed_dim

    def embed(self, x):
        self.images += x.shape[0]
        return self.model.embed(x)


@pytest.fixture(scope="module")
def ckpts(random_checkpoint):
    """Random 16-d ResNet-18 models of three seeds."""
    return {"new": random_checkpoint(0, 16), "old": random_checkpoint(1, 16), "old2": random_checkpoint(2, 16)}


def _cfg(root, old_path, cache, **extra):
    overrides = ["EVAL.ROOT", str(root), "EVAL.DATASET", "roxford5k", "EVAL.IMG_SIZE", str(IMG),
                 "EVAL.NUM_WORKERS", "0", "EVAL.BATCH_SIZE", "64", "OLD_MODEL.WEIGHTS", old_path,
                 "EVAL.OLD_FEATURES_CACHE", str(cache), "EVAL.BACKFILL", "true"]
    for k, v in extra.items():
        overrides += [k.replace("__", "."), str(v)]
    return load_config(None, overrides)


def _run(root, ckpts, old_name, cache, **extra):
    cfg = _cfg(root, ckpts[old_name], cache, **extra)
    new = load_trained_model("resnet18", ckpts["new"], "new", device="cpu")
    old = CountingModel(load_trained_model("resnet18", ckpts[old_name], "old", device="cpu"))
    return evaluate_models(new, old, cfg, progress=False), old.images


@pytest.mark.slow
def test_second_run_reads_the_cache_and_scores_identically(tiny_synthetic, ckpts, tmp_path):
    root = tiny_synthetic / "ROxfordParis"
    ts = load_test_set("roxford5k", str(root))
    n_images = len(ts.query_paths) + len(ts.gallery_paths)
    off, embedded_off = _run(root, ckpts, "old", "")
    first, embedded_first = _run(root, ckpts, "old", tmp_path / "cache")
    second, embedded_second = _run(root, ckpts, "old", tmp_path / "cache")
    assert embedded_off == embedded_first == n_images and embedded_second == 0
    assert first == off and second == off  # every metric and the backfilling curve, exactly
    entries = sorted(p.name for p in (tmp_path / "cache").iterdir())
    assert len(entries) == 1 and entries[0].startswith("roxford5k-") and entries[0].endswith(".npz")


@pytest.mark.slow
def test_another_checkpoint_or_setting_is_a_new_entry(tiny_synthetic, ckpts, tmp_path):
    root = tiny_synthetic / "ROxfordParis"
    cache = tmp_path / "cache"
    _run(root, ckpts, "old", cache)
    _, n_other_model = _run(root, ckpts, "old2", cache)            # other weights
    _, n_cropped = _run(root, ckpts, "old", cache, EVAL__CROP_QUERY="true")  # other query images
    assert n_other_model > 0 and n_cropped > 0
    assert len(list(cache.iterdir())) == 3
    # the key follows the file's bytes, not its name: same path, retrained weights -> a miss
    ts = load_test_set("roxford5k", str(root))
    k1 = feature_cache.cache_key(ckpts["old"], "resnet18", ts, IMG, False, False)
    assert k1 == feature_cache.cache_key(ckpts["old"], "resnet18", ts, IMG, False, False)
    assert k1 != feature_cache.cache_key(ckpts["old2"], "resnet18", ts, IMG, False, False)
    assert k1 != feature_cache.cache_key(ckpts["old"], "resnet18", ts, IMG + 8, False, False)
    assert k1 != feature_cache.cache_key(ckpts["old"], "resnet18", ts, IMG, False, True)
    # the decoding mode changes the pixels; 'pil' is the key of before it (entries written then stay valid)
    assert k1 == feature_cache.cache_key(ckpts["old"], "resnet18", ts, IMG, False, False, "pil")
    drafted = feature_cache.cache_key(ckpts["old"], "resnet18", ts, IMG, False, False, "pil_draft")
    assert len({k1, drafted, feature_cache.cache_key(ckpts["old"], "resnet18", ts, IMG, False, False, "nvjpeg")}) == 3


@pytest.mark.slow
def test_unreadable_entry_is_recomputed_and_rewritten(tiny_synthetic, ckpts, tmp_path, capsys):
    """Garbage, or an entry cut in half (a killed copy, a full disk: no zip any more): one warning, the old
    features embedded again, the entry rewritten whole, and the numbers those of the run that wrote it."""
    root = tiny_synthetic / "ROxfordParis"
    ts = load_test_set("roxford5k", str(root))
    cache = tmp_path / "cache"
    good, _ = _run(root, ckpts, "old", cache)
    (entry,) = list(cache.iterdir())
    with np.load(entry) as z:
        query, gallery, key = z["query"].copy(), z["gallery"].copy(), str(z["key"])
    for damage in (lambda whole: b"not an npz", lambda whole: whole[:len(whole) // 2]):
        entry.write_bytes(damage(entry.read_bytes()))
        capsys.readouterr()
        again, embedded = _run(root, ckpts, "old", cache)
        assert again == good  # every metric and the backfilling curve, exactly
        assert embedded == len(ts.query_paths) + len(ts.gallery_paths)
        warnings = [line for line in capsys.readouterr().out.splitlines() if line.startswith("warning")]
        assert len(warnings) == 1 and warnings[0].startswith(f"warning: EVAL.OLD_FEATURES_CACHE entry {entry} is "
                                                             "unreadable (")
        assert warnings[0].endswith("); re-embedding with the old model and rewriting it")
        assert [p.name for p in cache.iterdir()] == [entry.name]  # no temporary left
        hit_q, hit_g = feature_cache.load(str(cache), "roxford5k", key)  # whole again, the same features
        assert np.array_equal(hit_q, query) and np.array_equal(hit_g, gallery)
    assert "(File is not a zip file)" in warnings[0]  # the cut entry


@pytest.mark.slow
def test_a_failed_cache_write_keeps_the_evaluation(tiny_synthetic, ckpts, tmp_path, capsys, monkeypatch):
    root = tiny_synthetic / "ROxfordParis"
    off, _ = _run(root, ckpts, "old", "")

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(feature_cache, "save", disk_full)
    result, embedded = _run(root, ckpts, "old", tmp_path / "cache")
    assert result == off and embedded > 0
    assert "could not write an entry" in capsys.readouterr().out
    assert not (tmp_path / "cache").exists() or not list((tmp_path / "cache").iterdir())


def test_check_directory_creates_or_refuses(tmp_path):
    feature_cache.check_directory(tmp_path / "new" / "dir")
    assert (tmp_path / "new" / "dir").is_dir()
    (tmp_path / "f").write_text("x")
    with pytest.raises(UserError, match="is a file, expected a directory"):
        feature_cache.check_directory(tmp_path / "f")
    with pytest.raises(UserError, match="cannot create"):
        feature_cache.check_directory(tmp_path / "f" / "below")
