"""Old-class meta: hand-computed IQR cases, vectorised == per-class loop, JSON and .pt round trips."""

import json
import math
import os
import time

import numpy as np
import pytest
import torch

from advbct.errors import UserError
from advbct.meta import (ClassMeta, compute_meta, export_original_json, import_original_json, iqr_filter,
                         load_meta, save_meta)


def _filter(groups, num_classes):
    """Run iqr_filter on {class: [values]} given in a shuffled, interleaved order."""
    values = [(k, v) for k, vs in groups.items() for v in vs]
    rng = np.random.default_rng(0)
    rng.shuffle(values)
    labels = torch.tensor([k for k, _ in values])
    vals = torch.tensor([v for _, v in values], dtype=torch.float64)
    r_max, r_min, n_kept = iqr_filter(vals, labels, num_classes)
    return r_max.tolist(), r_min.tolist(), n_kept.tolist()


def test_iqr_hand_cases():
    groups = {
        0: [5.0, 0.1, 100.0],                          # n < 4: keep everything, even 100
        1: [1, 2, 3, 4, 5, 6, 7, 100],                 # q1=r[2]=3, q3=r[6]=7, hi=13: drop 100
        2: [0.0, 10, 10.5, 11, 11, 11.5, 12, 12, 30],  # q1=10.5, q3=12, [8.25, 14.25]: drop 0 and 30
        3: [2.0, 2.0, 2.0, 2.0],                       # ties, IQR 0: bounds inclusive, keep all
        4: [1.0, 2, 2, 2, 2, 3],                       # q1=r[1]=2, q3=r[4]=2: drop 1 and 3
        5: [0.0, 1, 2, 3, 4, 5, 11],                   # q1=r[1]=1, q3=r[5]=5: hi=11 kept (inclusive)
        7: [0.25],                                     # single sample
    }                                                  # class 6: no sample
    r_max, r_min, n_kept = _filter(groups, 8)
    assert n_kept == [3, 7, 7, 4, 4, 7, 0, 1]
    assert r_max == [100.0, 7.0, 12.0, 2.0, 2.0, 11.0, 0.0, 0.25]
    assert r_min == [0.1, 1.0, 10.0, 2.0, 2.0, 0.0, 0.0, 0.25]


def test_iqr_uses_floor_indices_not_percentiles():
    # n=7: the original's q1 = r[1] = 1, q3 = r[5] = 5 -> hi = 11 keeps 11; numpy percentiles
    # (1.5, 4.5 -> hi 9) would drop it. n=5: q3 = r[⌊15/4⌋] = r[3].
    r_max, _, n_kept = _filter({0: [0.0, 1, 2, 3, 4, 5, 11.0], 1: [0.0, 1, 1.1, 1.2, 4.5]}, 2)
    assert n_kept == [7, 3] and r_max[0] == 11.0 and r_max[1] == 1.2


def test_compute_meta_hand_case():
    # class 0: two orthogonal directions of different lengths; class 1: 3 copies of one direction
    feats = torch.tensor([[2.0, 0.0], [0.0, 3.0], [0.0, -1.0], [0.0, -5.0], [0.0, -2.0]])
    labels = torch.tensor([0, 0, 1, 1, 1])
    meta = compute_meta(feats, labels, 3)
    torch.testing.assert_close(meta.centers, torch.tensor([[0.5, 0.5], [0.0, -1.0], [0.0, 0.0]]))
    assert meta.counts.tolist() == [2, 3, 0] and meta.n_kept.tolist() == [2, 3, 0]
    torch.testing.assert_close(meta.r_max, torch.tensor([math.sqrt(0.5), 0.0, 0.0]))
    torch.testing.assert_close(meta.r_min, torch.tensor([math.sqrt(0.5), 0.0, 0.0]))
    torch.testing.assert_close(meta.theta_max, torch.tensor([math.pi / 4, 0.0, 0.0]))
    assert meta.num_classes == 3 and meta.embed_dim == 2


def _reference_meta(feats, labels, num_classes):
    """Per-class loop following the original release's gen_class_meta / gen_class_theta."""
    feats = feats.astype(np.float64)
    feats = feats / np.linalg.norm(feats, axis=1, keepdims=True)
    out = {k: np.zeros(num_classes) for k in ("r_max", "r_min", "n_kept", "theta_max")}
    centers = np.zeros((num_classes, feats.shape[1]))

    def keep(values):
        values = sorted(values)
        if len(values) < 4:
            return values
        n = len(values)
        q1, q3 = values[n // 4], values[3 * n // 4]
        iqr = q3 - q1
        return [r for r in values if q1 - 1.5 * iqr <= r <= q3 + 1.5 * iqr]

    for k in range(num_classes):
        fk = feats[labels == k]
        if len(fk) == 0:
            continue
        c = fk.mean(0)
        centers[k] = c
        radii = keep([float(np.linalg.norm(f - c)) for f in fk])
        thetas = keep([math.acos(min(float(f @ (c / np.linalg.norm(c))), 1.0)) for f in fk])
        out["r_max"][k], out["r_min"][k], out["n_kept"][k] = radii[-1], radii[0], len(radii)
        out["theta_max"][k] = thetas[-1]
    return centers, out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_compute_meta_matches_per_class_loop(seed):
    rng = np.random.default_rng(seed)
    num_classes, dim = 40, 8
    sizes = rng.integers(0, 30, num_classes)
    sizes[:6] = [0, 1, 2, 3, 4, 5]
    labels = np.repeat(np.arange(num_classes), sizes)
    # per-class direction + spread, plus a few far outliers so that the IQR rule drops something
    base = rng.normal(size=(num_classes, dim))
    feats = base[labels] + rng.normal(scale=rng.uniform(0.2, 1.0, num_classes)[labels, None], size=(len(labels), dim))
    feats[rng.random(len(labels)) < 0.05] *= -1
    perm = rng.permutation(len(labels))
    feats, labels = feats[perm].astype(np.float32), labels[perm]
    meta = compute_meta(torch.from_numpy(feats), torch.from_numpy(labels), num_classes, chunk_size=37)
    centers, ref = _reference_meta(feats, labels, num_classes)
    np.testing.assert_allclose(meta.centers.numpy(), centers, atol=1e-6)
    assert meta.n_kept.tolist() == ref["n_kept"].astype(int).tolist()
    assert meta.counts.tolist() == np.bincount(labels, minlength=num_classes).tolist()
    assert (meta.n_kept < meta.counts).any()  # the outlier rule did remove radii
    for key in ("r_max", "r_min", "theta_max"):
        np.testing.assert_allclose(getattr(meta, key).numpy(), ref[key], atol=2e-5, err_msg=key)


def test_compute_meta_many_classes_is_vectorised():
    # 81,313 classes (GLDv2) on 200k features: a per-class Python loop would take minutes
    torch.manual_seed(0)
    labels = torch.randint(0, 81313, (200_000,))
    feats = torch.randn(200_000, 8)
    start = time.perf_counter()
    meta = compute_meta(feats, labels, 81313, chunk_size=65536)
    assert time.perf_counter() - start < 20
    assert meta.counts.sum() == 200_000 and meta.num_classes == 81313
    assert bool((meta.n_kept <= meta.counts).all()) and bool((meta.r_min <= meta.r_max).all())
    assert bool(((meta.n_kept > 1) == (meta.counts > 1)).all())


def test_compute_meta_rejects_bad_labels():
    with pytest.raises(UserError, match=r"\[0, 3\)"):
        compute_meta(torch.randn(4, 2), torch.tensor([0, 1, 2, 3]), 3)


def _random_meta(seed=0):
    torch.manual_seed(seed)
    labels = torch.randint(0, 12, (150,))
    return compute_meta(torch.randn(150, 6), labels, 14)  # classes 12, 13 empty


def test_save_load_round_trip(tmp_path):
    meta = _random_meta()
    path = tmp_path / "sub" / "meta.pt"
    save_meta(path, meta)
    assert sorted(p.name for p in path.parent.iterdir()) == ["meta.pt"]  # no temp file left
    raw = torch.load(path, weights_only=True)
    assert isinstance(raw["centers"], torch.Tensor)
    back = load_meta(path, "cpu")
    for key in ("centers", "r_max", "r_min", "counts", "n_kept", "theta_max"):
        assert torch.equal(getattr(back, key), getattr(meta, key)), key


def test_load_meta_errors_name_the_file(tmp_path):
    with pytest.raises(UserError, match="nope.pt"):
        load_meta(tmp_path / "nope.pt")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a torch file")
    with pytest.raises(UserError, match="bad.pt"):
        load_meta(bad)
    other = tmp_path / "other.pt"
    torch.save({"centers": torch.zeros(2, 2)}, other)
    with pytest.raises(UserError, match="other.pt"):
        load_meta(other)


def test_json_round_trip(tmp_path):
    meta = _random_meta(1)
    path = tmp_path / "meta.json"
    export_original_json(meta, path)
    data = json.loads(path.read_text())
    assert sorted(int(k) for k in data) == torch.nonzero(meta.n_kept > 0).flatten().tolist()
    for k, entry in data.items():
        radius = entry["radius"]
        assert len(radius) == int(meta.n_kept[int(k)]) and radius == sorted(radius)
        assert radius[0] == float(meta.r_min[int(k)]) and radius[-1] == float(meta.r_max[int(k)])
    back = import_original_json(path, num_classes=meta.num_classes)
    assert torch.equal(back.centers, meta.centers)
    assert torch.equal(back.r_max, meta.r_max) and torch.equal(back.r_min, meta.r_min)
    assert torch.equal(back.n_kept, meta.n_kept)
    assert bool(torch.isnan(back.theta_max).all())  # the radius file carries no angles
    assert torch.equal(load_meta(path).r_max[:12], meta.r_max[:12])  # .json paths are imported


def test_import_original_json_hand_written(tmp_path):
    radius = tmp_path / "r.json"
    theta = tmp_path / "t.json"
    radius.write_text(json.dumps({"0": {"center": [0.5, 0.5], "radius": [0.1, 0.2, 0.4]},
                                  "2": {"center": [0.0, 1.0], "radius": [0.3]}}))
    theta.write_text(json.dumps({"0": {"center": [0.5, 0.5], "radius": [0.2, 0.7]},
                                 "2": {"center": [0.0, 1.0], "radius": [0.05]}}))
    meta = import_original_json(radius, theta_path=theta)
    assert meta.num_classes == 3 and meta.n_kept.tolist() == [3, 0, 1]
    torch.testing.assert_close(meta.r_max, torch.tensor([0.4, 0.0, 0.3]))
    torch.testing.assert_close(meta.r_min, torch.tensor([0.1, 0.0, 0.3]))
    torch.testing.assert_close(meta.theta_max, torch.tensor([0.7, 0.0, 0.05]))
    torch.testing.assert_close(meta.centers, torch.tensor([[0.5, 0.5], [0.0, 0.0], [0.0, 1.0]]))
    radius.write_text(json.dumps({"x": {"center": [1.0]}}))
    with pytest.raises(UserError, match="r.json"):
        import_original_json(radius)


def test_meta_to_device_keeps_values():
    meta = _random_meta(2)
    moved = meta.to("cpu")
    assert isinstance(moved, ClassMeta) and torch.equal(moved.centers, meta.centers)


def test_compute_meta_refuses_nan_features_naming_the_classes():
    """A NaN or inf feature would make its class center NaN: refused, the classes named (first five ids)."""
    labels = torch.arange(40) % 10
    feats = torch.randn(40, 4)
    feats[:7, 1] = float("nan")
    with pytest.raises(UserError, match=r"^features: NaN or inf features for 7 image\(s\) of 7 class\(es\) "
                                        r"\(ids 0, 1, 2, 3, 4, \.\.\.\); no class meta written$"):
        compute_meta(feats, labels, 10)
    feats = torch.randn(40, 4)
    feats[[3, 13, 7]] = float("nan")  # classes 3 (twice) and 7
    feats[9, 0] = float("inf")        # class 9
    for chunk_size in (262144, 8):  # one chunk, and bad rows spread over several chunks
        with pytest.raises(UserError) as info:
            compute_meta(feats, labels, 10, chunk_size=chunk_size, source="old.pth")
        assert str(info.value) == ("old.pth: NaN or inf features for 4 image(s) of 3 class(es) (ids 3, 7, 9); "
                                   "no class meta written")


def test_extract_meta_with_nan_features_writes_nothing(image_list, random_checkpoint, tmp_path, monkeypatch):
    """NaN features of the old model (e.g. a bf16 overflow) end the extraction in one line naming the checkpoint
    and the classes; no meta file and no temporary are left."""
    from advbct.config import load_config
    from advbct.engine import meta_extraction

    def nan_for_class_2(model, dataset, **kwargs):
        feats = torch.randn(len(dataset), model.embed_dim)
        feats[torch.as_tensor(dataset.labels) == 2] = float("nan")
        return feats

    monkeypatch.setattr(meta_extraction, "extract_features", nan_for_class_2)
    old = random_checkpoint(7, 32, 4)
    out = tmp_path / "meta"
    cfg = load_config(None, ["OLD_MODEL.WEIGHTS", old, "COMP_LOSS.META_PATH", str(out / "meta.pt"),
                             "META.TRAIN_LIST", str(image_list / "train.txt"), "DATA.ROOT", str(image_list),
                             "DATA.IMG_SIZE", "32", "EVAL.NUM_WORKERS", "0"])
    out.mkdir()
    with pytest.raises(UserError) as info:
        meta_extraction.extract_meta(cfg, progress=False)
    assert str(info.value) == (f"OLD_MODEL.WEIGHTS {old}: NaN or inf features for 8 image(s) of 1 class(es) (ids 2); "
                               "no class meta written")
    assert os.listdir(out) == []
