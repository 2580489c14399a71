"""ROxford5k / RParis6k: safe gnd unpickling (real files, malicious pickles) and the dataset loader."""

import os
import pickle
import shutil
import subprocess

import numpy as np
import pytest

from advbct.data.revisited import load_revisited
from advbct.data.safe_pickle import safe_load_pickle
from advbct.data.synthetic import PRESETS
from advbct.errors import UserError

REAL_COUNTS = {"roxford5k": (70, 4993), "rparis6k": (70, 6322)}


# ------------------------------------------------------------------------------------- safe unpickle


@pytest.mark.parametrize("name", sorted(REAL_COUNTS))
def test_real_gnd_files_load_safely(shared_dir, name):
    path = shared_dir / "data" / "revisited" / f"gnd_{name}.pkl"
    cfg = safe_load_pickle(path)
    with open(path, "rb") as handle:  # the shared file is trusted: compare with the plain unpickler
        assert cfg == pickle.load(handle)
    assert sorted(cfg) == ["gnd", "imlist", "qimlist"]
    nq, ndb = REAL_COUNTS[name]
    assert len(cfg["qimlist"]) == len(cfg["gnd"]) == nq and len(cfg["imlist"]) == ndb
    assert all(sorted(g) == ["bbx", "easy", "hard", "junk"] for g in cfg["gnd"])
    assert not set(cfg["qimlist"]) & set(cfg["imlist"])  # queries are not in the database


def test_real_roxford_values(shared_dir):
    ds = load_revisited(shared_dir / "data" / "revisited", "roxford5k", check_images=False)
    assert ds.query_names[0] == "all_souls_000013" and ds.gallery_names[0] == "ashmolean_000283"
    assert ds.gnd[0]["easy"].dtype == np.int64 and ds.gnd[0]["easy"][:5].tolist() == [30, 69, 296, 324, 581]
    assert (len(ds.gnd[0]["easy"]), len(ds.gnd[0]["hard"]), len(ds.gnd[0]["junk"])) == (65, 38, 33)
    assert np.allclose(ds.query_bbx[0], [136.5, 34.1, 648.5, 955.7])
    assert ds.query_bbx.shape == (70, 4) and ds.query_paths[0].endswith("roxford5k/jpg/all_souls_000013.jpg")
    # two queries of the real ROxford have no easy positives; the loader keeps them as empty arrays
    assert sum(len(g["easy"]) == 0 for g in ds.gnd) == 2


class _Evil:
    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


class _EvilSubprocess:
    def __reduce__(self):
        return subprocess.check_call, (["true"],)


@pytest.mark.parametrize("protocol", [0, 2, 3, 5])
def test_malicious_pickle_refused_without_running(tmp_path, protocol):
    marker = tmp_path / "pwned"
    path = tmp_path / "gnd_evil.pkl"
    path.write_bytes(pickle.dumps({"gnd": [_Evil(f"touch {marker}")], "imlist": [], "qimlist": []}, protocol=protocol))
    with pytest.raises(UserError) as err:
        safe_load_pickle(path)
    assert str(path) in str(err.value) and f"'{os.system.__module__}.system'" in str(err.value)
    assert not marker.exists()


def test_other_globals_refused(tmp_path):
    path = tmp_path / "evil2.pkl"
    path.write_bytes(pickle.dumps([_EvilSubprocess()]))
    with pytest.raises(UserError, match="subprocess.check_call"):
        safe_load_pickle(path)
    path.write_bytes(b"cbuiltins\neval\n(S'1+1'\ntR.")  # hand-written protocol-0 call of eval
    with pytest.raises(UserError, match="builtins.eval"):
        safe_load_pickle(path)


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_numpy_gnd_allowed(tmp_path, protocol):
    gnd = {"gnd": [{"easy": np.array([3, 1]), "hard": np.array([], dtype=np.int64), "junk": np.int64(2),
                    "bbx": np.array([1.5, 2.0, 3.0, 4.25], dtype=np.float32)}], "imlist": ["a"], "qimlist": ["q"]}
    path = tmp_path / "np.pkl"
    path.write_bytes(pickle.dumps(gnd, protocol=protocol))
    got = safe_load_pickle(path)
    assert got["gnd"][0]["easy"].tolist() == [3, 1] and got["gnd"][0]["junk"] == 2
    assert got["gnd"][0]["bbx"].dtype == np.float32 and got["gnd"][0]["bbx"].tolist() == [1.5, 2.0, 3.0, 4.25]


def test_corrupt_or_missing_pickle(tmp_path):
    path = tmp_path / "trunc.pkl"
    path.write_bytes(pickle.dumps({"imlist": ["a"] * 10})[:-5])
    with pytest.raises(UserError, match="trunc.pkl: not a readable pickle"):
        safe_load_pickle(path)
    with pytest.raises(UserError, match="nothere.pkl.*Dataset.md"):
        safe_load_pickle(tmp_path / "nothere.pkl")


# ------------------------------------------------------------------------------------ loader (synthetic)


def _type_tree(obj):
    """Python-type skeleton of a gnd object (dict keys in order, first element of lists)."""
    if isinstance(obj, dict):
        return ("dict", [(k, _type_tree(v)) for k, v in obj.items()])
    if isinstance(obj, list):
        return ("list", _type_tree(obj[0]) if obj else None)
    return type(obj).__name__


@pytest.mark.slow
@pytest.mark.parametrize("name", ["roxford5k", "rparis6k"])
def test_synthetic_gnd_has_the_real_structure(tiny_synthetic, shared_dir, name):
    synth = tiny_synthetic / "ROxfordParis" / f"gnd_{name}.pkl"
    real = shared_dir / "data" / "revisited" / f"gnd_{name}.pkl"
    assert synth.read_bytes()[:2] == real.read_bytes()[:2] == b"\x80\x03"  # pickle protocol 3
    s, r = safe_load_pickle(synth), safe_load_pickle(real)
    assert list(s) == list(r)
    assert _type_tree(s["gnd"][0]) == ("dict", [("bbx", ("list", "float")), ("easy", ("list", "int")),
                                                ("hard", ("list", "int")), ("junk", ("list", "int"))])
    assert [list(g) for g in r["gnd"]][0] == list(s["gnd"][0])
    assert _type_tree(s["imlist"]) == _type_tree(r["imlist"]) == ("list", "str")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["roxford5k", "rparis6k"])
def test_load_synthetic_revisited(tiny_synthetic, name):
    ds = load_revisited(tiny_synthetic / "ROxfordParis", name)
    p = PRESETS["tiny"]
    queries = p.rev_landmarks * p.rev_queries
    assert len(ds.query_paths) == queries == len(ds.gnd) > 0
    assert len(ds.gallery_paths) == p.rev_landmarks * (p.rev_easy + p.rev_hard + p.rev_junk) + p.rev_distractors
    assert all(os.path.isfile(p) for p in ds.query_paths + ds.gallery_paths)
    assert not set(ds.query_paths) & set(ds.gallery_paths)
    for g in ds.gnd:
        assert g["easy"].dtype == g["hard"].dtype == g["junk"].dtype == np.int64
        assert (len(g["easy"]), len(g["hard"]), len(g["junk"])) == (p.rev_easy, p.rev_hard, p.rev_junk)
        assert not (set(g["easy"]) & set(g["hard"]) or set(g["easy"]) & set(g["junk"]) or set(g["hard"]) & set(g["junk"]))
    assert ds.query_bbx.shape == (queries, 4) and (ds.query_bbx[:, 2] > ds.query_bbx[:, 0]).all()
    assert ds.crop_query is False and ds.query_dataset().boxes is None


@pytest.mark.slow
def test_crop_query_option(tiny_synthetic):
    ds = load_revisited(tiny_synthetic / "ROxfordParis", "roxford5k", crop_query=True)
    qds = ds.query_dataset()
    img, label, index = qds[3]
    x1, y1, x2, y2 = (int(round(v)) for v in ds.query_bbx[3])
    assert img.size == (x2 - x1, y2 - y1) and (label, index) == (-1, 3)
    assert ds.gallery_dataset()[0][0].size == (PRESETS["tiny"].image_size,) * 2


def _link_copy(src_root, dst_root, name, layout="original", skip=()):
    """A copy of a revisited set under ``dst_root`` (images symlinked), optionally missing some images."""
    jpg = dst_root / name / "jpg"
    jpg.mkdir(parents=True)
    gnd_dst = dst_root / (f"gnd_{name}.pkl" if layout == "original" else f"{name}/gnd_{name}.pkl")
    shutil.copy(src_root / f"gnd_{name}.pkl", gnd_dst)
    for image in sorted((src_root / name / "jpg").iterdir()):
        if image.name not in skip:
            (jpg / image.name).symlink_to(image)
    return dst_root


@pytest.mark.slow
def test_revisitop_layout_is_accepted(tiny_synthetic, tmp_path):
    src = tiny_synthetic / "ROxfordParis"
    root = _link_copy(src, tmp_path / "revisitop", "rparis6k", layout="revisitop")
    ds = load_revisited(root, "rparis6k")
    ref = load_revisited(src, "rparis6k")
    assert ds.gnd_path.endswith("rparis6k/gnd_rparis6k.pkl")
    assert [os.path.basename(p) for p in ds.gallery_paths] == [os.path.basename(p) for p in ref.gallery_paths]


@pytest.mark.slow
def test_missing_images_reported_first_and_counted(tiny_synthetic, tmp_path):
    src = tiny_synthetic / "ROxfordParis"
    cfg = safe_load_pickle(src / "gnd_roxford5k.pkl")
    gone = [cfg["imlist"][5] + ".jpg", cfg["imlist"][9] + ".jpg"]
    root = _link_copy(src, tmp_path / "partial", "roxford5k", skip=gone)
    with pytest.raises(UserError) as err:
        load_revisited(root, "roxford5k")
    msg = str(err.value)
    gallery = len(cfg["imlist"])
    assert msg.startswith(str(root / "roxford5k" / "jpg" / gone[0]))
    assert f"2 of {len(cfg['qimlist']) + gallery} images missing" in msg
    assert "Dataset.md" in msg
    assert len(load_revisited(root, "roxford5k", check_images=False).gallery_paths) == gallery


def test_bad_root_gnd_and_name(tmp_path):
    with pytest.raises(UserError, match=f"{tmp_path / 'absent'}.*Dataset.md"):
        load_revisited(tmp_path / "absent", "roxford5k")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError) as err:
        load_revisited(tmp_path / "empty", "rparis6k")
    assert str(tmp_path / "empty" / "gnd_rparis6k.pkl") in str(err.value) and "Dataset.md" in str(err.value)
    with pytest.raises(UserError, match="unknown revisited dataset 'oxford105k'"):
        load_revisited(tmp_path, "oxford105k")


@pytest.mark.parametrize(
    "cfg, message",
    [
        ({"imlist": ["a"], "qimlist": ["q"]}, "missing key 'gnd'"),
        ({"imlist": ["a"], "qimlist": ["q"], "gnd": []}, "one entry per query"),
        ({"imlist": ["a"], "qimlist": ["q"], "gnd": [{"easy": [0], "hard": [], "bbx": [0, 0, 1, 1]}]},
         r"gnd\[0\]: missing key 'junk'"),
        ({"imlist": ["a"], "qimlist": ["q"], "gnd": [{"easy": [1], "hard": [], "junk": [], "bbx": [0, 0, 1, 1]}]},
         r"gnd\[0\]\['easy'\]: gallery index out of range \[0, 1\)"),
        ({"imlist": ["a"], "qimlist": ["q"], "gnd": [{"easy": [0], "hard": [], "junk": [], "bbx": [0, 1]}]},
         r"\['bbx'\]: expected \[x1, y1, x2, y2\]"),
    ],
)
def test_malformed_gnd(tmp_path, cfg, message):
    (tmp_path / "gnd_roxford5k.pkl").write_bytes(pickle.dumps(cfg, protocol=3))
    with pytest.raises(UserError, match=message):
        load_revisited(tmp_path, "roxford5k", check_images=False)
