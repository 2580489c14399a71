"""Synthetic benchmark: determinism, counts, ground-truth semantics, geometry and output-folder safety."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from advbct.data import synthetic
from advbct.data.image_list import load_image, read_image_list
from advbct.data.revisited import load_revisited
from advbct.data.safe_pickle import safe_load_pickle
from advbct.data.synthetic import PRESETS, Scene, make_scene, make_synthetic, render_view
from advbct.errors import UserError
from helpers import REPO


def _all_files(root):
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, files in os.walk(root) for f in files)


@pytest.mark.slow
def test_same_seed_gives_byte_identical_files(tiny_synthetic, tmp_path):
    again = tmp_path / "again"
    make_synthetic(again, preset="tiny", seed=0)
    files = _all_files(tiny_synthetic)
    assert files == _all_files(again)
    # every image the summary counts is compared (GLDv2 train, index and test, pretrain, both revisited sets)
    summary = synthetic.read_summary(tiny_synthetic)
    gld = summary["gldv2"]
    images = (gld["train_csv_rows"] + gld["index_images"] + gld["test"] + summary["pretrain"]["images"]
              + sum(summary[name]["queries"] + summary[name]["gallery"] for name in ("roxford5k", "rparis6k")))
    assert sum(f.endswith(".jpg") for f in files) == images > 0 and "ROxfordParis/gnd_rparis6k.pkl" in files
    differing = [f for f in files if (tiny_synthetic / f).read_bytes() != (again / f).read_bytes()]
    assert differing == []


def test_seed_changes_scenes_and_ids():
    a = make_scene(synthetic._rng(0, 1, 5), 128)
    b = make_scene(synthetic._rng(1, 1, 5), 128)
    assert a.pixels.shape == (128, 128, 4) and not np.array_equal(a.pixels, b.pixels)
    assert np.array_equal(a.pixels, make_scene(synthetic._rng(0, 1, 5), 128).pixels)
    assert synthetic._image_id(0, "train", 1, 2) != synthetic._image_id(1, "train", 1, 2)
    assert len(synthetic._image_id(0, "x")) == 16 and int(synthetic._image_id(0, "x"), 16) >= 0


def test_roles_use_disjoint_seed_domains():
    # train, test and distractor landmarks never share a scene: their seed domains are distinct
    assert len(set(synthetic._KIND.values())) == len(synthetic._KIND)
    train = make_scene(synthetic._rng(0, synthetic._KIND["gld_train"], 0), 128)
    test = make_scene(synthetic._rng(0, synthetic._KIND["gld_test"], 0), 128)
    assert not np.array_equal(train.pixels, test.pixels)


@pytest.mark.slow
def test_summary_matches_files(tiny_synthetic):
    summary = json.loads((tiny_synthetic / "SYNTHETIC.json").read_text())
    p = PRESETS["tiny"]
    assert summary["preset"] == "tiny" and summary["seed"] == 0
    assert not (tiny_synthetic / synthetic.PARTIAL_MARKER).exists()  # removed once complete
    assert summary["roxford5k"] == {"queries": p.rev_landmarks * p.rev_queries,
                                    "gallery": p.rev_landmarks * (p.rev_easy + p.rev_hard + p.rev_junk) + p.rev_distractors}
    g = summary["gldv2"]
    assert g["num_classes"] == p.train_classes and g["train_list"] == f"gldv2/label_{p.train_classes}.txt"
    assert g["private_queries"] + g["public_queries"] == p.gld_landmarks * p.gld_queries
    assert g["test"] == p.gld_landmarks * p.gld_queries + p.gld_ignored
    assert p.train_classes * p.train_images[0] <= g["train_images"] <= p.train_classes * p.train_images[1]
    img = Image.open(tiny_synthetic / "ROxfordParis" / "roxford5k" / "jpg" / "oxford_lm00_q000.jpg")
    assert img.size == (p.image_size, p.image_size) and img.format == "JPEG"
    assert summary["format_version"] == synthetic.FORMAT_VERSION == 2


@pytest.mark.slow
def test_pretrain_corpus(tiny_synthetic):
    """pretrain/: a labelled image list over its own landmarks (classes 0..C-1, folder = class), every
    image on disk at the preset's size, and no image shared with the GLDv2 train set."""
    summary = json.loads((tiny_synthetic / "SYNTHETIC.json").read_text())
    p = PRESETS["tiny"]
    info = summary["pretrain"]
    paths, labels = read_image_list(tiny_synthetic / info["train_list"], root=tiny_synthetic / "pretrain")
    assert info["classes"] == p.pretrain_classes and info["images"] == len(paths)
    counts = np.bincount(labels, minlength=p.pretrain_classes)
    assert len(counts) == p.pretrain_classes
    assert counts.min() >= p.pretrain_images[0] and counts.max() <= p.pretrain_images[1]
    assert all(os.path.basename(os.path.dirname(path)) == f"{label:05d}" for path, label in zip(paths, labels))
    assert all(os.path.isfile(path) for path in paths)
    assert Image.open(paths[0]).size == (p.image_size, p.image_size)
    ids = {os.path.basename(path) for path in paths}
    gld_ids = {os.path.basename(f) for f in _all_files(tiny_synthetic / "gldv2" / "train")}
    assert len(ids) == len(paths) and not ids & gld_ids


@pytest.mark.slow
@pytest.mark.parametrize("name", ["roxford5k", "rparis6k"])
def test_gnd_semantics(tiny_synthetic, name):
    cfg = safe_load_pickle(tiny_synthetic / "ROxfordParis" / f"gnd_{name}.pkl")
    prefix = {"roxford5k": "oxford", "rparis6k": "paris"}[name]
    for q, (qname, g) in enumerate(zip(cfg["qimlist"], cfg["gnd"])):
        lm = qname.split("_")[1]  # e.g. "lm01"
        relevant = set(g["easy"]) | set(g["hard"]) | set(g["junk"])
        same_landmark = {i for i, n in enumerate(cfg["imlist"]) if n.startswith(f"{prefix}_{lm}_")}
        assert relevant == same_landmark  # every view of the landmark is labelled, nothing else
        x1, y1, x2, y2 = g["bbx"]
        size = PRESETS["tiny"].image_size
        assert 0 <= x1 < x2 <= size and 0 <= y1 < y2 <= size
    distractors = [n for n in cfg["imlist"] if n.startswith(f"{prefix}_general_")]
    assert len(distractors) == PRESETS["tiny"].rev_distractors


@pytest.mark.slow
def test_levels_order_raw_pixel_similarity(tiny_synthetic):
    """Easy views resemble the query more than hard ones, and junk fragments least (in raw pixels)."""
    ds = load_revisited(tiny_synthetic / "ROxfordParis", "roxford5k")

    def vec(path):
        a = np.asarray(load_image(path).resize((32, 32)), dtype=np.float64).ravel()
        a -= a.mean()
        return a / np.linalg.norm(a)

    sim = np.stack([vec(p) for p in ds.query_paths]) @ np.stack([vec(p) for p in ds.gallery_paths]).T
    level = {k: np.mean([sim[q, g[k]].mean() for q, g in enumerate(ds.gnd)]) for k in ("easy", "hard", "junk")}
    assert level["easy"] > level["hard"] + 0.03 > level["junk"] + 0.06


def test_perspective_coeffs_map_points():
    out_pts = [(0, 0), (10, 0), (10, 10), (0, 10)]
    in_pts = [(5, 5), (25, 5), (25, 25), (5, 25)]  # scale 2, shift 5: u = 2x + 5, v = 2y + 5
    assert np.allclose(synthetic._perspective_coeffs(out_pts, in_pts), [2, 0, 5, 0, 2, 5, 0, 0], atol=1e-9)
    quad = [(3, 1), (40, 6), (35, 44), (0, 30)]
    a, b, c, d, e, f, g, h = synthetic._perspective_coeffs(out_pts, quad)
    for (x, y), (u, v) in zip(out_pts, quad):
        w = g * x + h * y + 1
        assert np.allclose([(a * x + b * y + c) / w, (d * x + e * y + f) / w], [u, v])


def _assert_box_fits_magenta(img, box, min_pixels):
    """``box`` is the bounding box, within 1.5 px, of the more than ``min_pixels`` magenta pixels of ``img``."""
    arr = np.asarray(img).astype(int)
    magenta = (arr[..., 0] > 200) & (arr[..., 1] < 60) & (arr[..., 2] > 200)
    ys, xs = np.nonzero(magenta)
    assert len(xs) > min_pixels
    assert abs(xs.min() - box[0]) <= 1.5 and abs(xs.max() + 1 - box[2]) <= 1.5
    assert abs(ys.min() - box[1]) <= 1.5 and abs(ys.max() + 1 - box[3]) <= 1.5


def test_query_box_covers_the_landmark():
    """With no change of view, the returned box is where the landmark's pixels land in the image."""
    pixels = np.zeros((128, 128, 4), dtype=np.uint8)
    pixels[40:90, 30:70] = (255, 0, 255, 255)  # a magenta landmark on transparent sky
    scene = Scene(pixels, (30.0, 40.0, 70.0, 90.0))
    for seed in range(3):
        img, box = render_view(scene, synthetic._rng(seed, 9), 0.0, 64, query=True)
        _assert_box_fits_magenta(img, box, min_pixels=50)


def test_output_folder_safety(tmp_path):
    with pytest.raises(UserError, match="unknown synthetic preset 'huge'"):
        make_synthetic(tmp_path / "x", preset="huge")
    foreign = tmp_path / "foreign"
    (foreign / "ROxfordParis").mkdir(parents=True)
    (foreign / "ROxfordParis" / "gnd_roxford5k.pkl").write_bytes(b"real data")
    for overwrite in (False, True):
        with pytest.raises(UserError, match="not a synthetic benchmark, not overwriting"):
            make_synthetic(foreign, preset="tiny", overwrite=overwrite)
    assert (foreign / "ROxfordParis" / "gnd_roxford5k.pkl").read_bytes() == b"real data"
    ours = tmp_path / "ours"
    (ours / "gldv2").mkdir(parents=True)
    (ours / "gldv2" / "stale.txt").write_text("old")
    (ours / synthetic.MARKER).write_text("{}")
    with pytest.raises(UserError, match="already exists; pass --overwrite"):
        synthetic._prepare_out(str(ours), overwrite=False)
    synthetic._prepare_out(str(ours), overwrite=True)
    assert not (ours / "gldv2").exists() and not (ours / synthetic.MARKER).exists()
    # an interrupted generation (partial marker only) is replaced without --overwrite
    (ours / "ROxfordParis").mkdir()
    (ours / synthetic.PARTIAL_MARKER).write_text("{}")
    synthetic._prepare_out(str(ours), overwrite=False)
    assert not (ours / "ROxfordParis").exists()


@pytest.mark.slow
def test_read_summary_checks_presence_format_version_and_preset(tiny_synthetic, tmp_path):
    good = synthetic.read_summary(tiny_synthetic)
    assert good["pretrain"]["train_list"] == "pretrain/train_list.txt"
    with pytest.raises(UserError, match=f"{tmp_path / synthetic.MARKER} not found: generate"):
        synthetic.read_summary(tmp_path)
    (tmp_path / synthetic.MARKER).write_text(json.dumps({"format_version": 1, "preset": "small"}))
    with pytest.raises(UserError, match="format version 1, this code needs 2 .*--preset small --overwrite"):
        synthetic.read_summary(tmp_path)
    # a benchmark of a preset whose parameters changed since (a retuned preset) is refused too
    stale = dict(good, params=dict(good["params"], train_classes=good["params"]["train_classes"] + 1))
    (tmp_path / synthetic.MARKER).write_text(json.dumps(stale))
    with pytest.raises(UserError, match="other parameters than this code's preset 'tiny': regenerate .*--preset tiny --overwrite"):
        synthetic.read_summary(tmp_path)
    # so is one of a preset this code does not have; the command then leaves the preset to choose
    (tmp_path / synthetic.MARKER).write_text(json.dumps(dict(good, preset="huge")))
    with pytest.raises(UserError, match=r"preset 'huge' is not one of this code's \(tiny, small, medium\): "
                                        r"regenerate .*--preset PRESET --overwrite"):
        synthetic.read_summary(tmp_path)
    (tmp_path / synthetic.MARKER).write_text(json.dumps(good))
    assert synthetic.read_summary(tmp_path) == good
    (tmp_path / synthetic.MARKER).write_text("{not json")
    with pytest.raises(UserError, match="not a readable synthetic benchmark summary"):
        synthetic.read_summary(tmp_path)


def test_make_synthetic_tool_error_exit(tmp_path, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "make_tool", str(REPO / "tools" / "make_synthetic.py"))
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    (tmp_path / "gldv2").mkdir()
    with pytest.raises(SystemExit) as exc:
        tool.main(["--out", str(tmp_path), "--preset", "tiny"])
    assert exc.value.code == 2 and capsys.readouterr().err.startswith(f"error: {tmp_path / 'gldv2'}: exists but")


def test_query_box_in_a_real_size_frame_is_where_the_landmark_lands():
    """A w x h frame is the centre of the square view: the box moves with the crop and stays in the frame."""
    pixels = np.zeros((128, 128, 4), dtype=np.uint8)
    pixels[40:90, 30:70] = (255, 0, 255, 255)
    scene = Scene(pixels, (30.0, 40.0, 70.0, 90.0))
    for seed in range(3):
        img, box = render_view(scene, synthetic._rng(seed, 9), 0.0, 128, query=True, frame=(128, 96))
        assert img.size == (128, 96)
        _assert_box_fits_magenta(img, box, min_pixels=200)
        assert 0 <= box[1] < box[3] <= 96


def test_write_photos_real_size_deterministic_and_distinct(tmp_path):
    a = synthetic.write_photos(tmp_path / "a", (120, 90), 6)
    b = synthetic.write_photos(tmp_path / "b", (120, 90), 6)
    assert [os.path.basename(p) for p in a] == [os.path.basename(p) for p in b]
    assert all(open(p, "rb").read() == open(q, "rb").read() for p, q in zip(a, b))
    arrays = [np.asarray(load_image(p), dtype=np.float32) for p in a]
    assert all(x.shape == (90, 120, 3) for x in arrays) and all(Image.open(p).format == "JPEG" for p in a)
    assert min(np.abs(x - y).mean() for i, x in enumerate(arrays) for y in arrays[i + 1:]) > 5  # distinct views


@pytest.mark.slow
def test_a_real_size_benchmark_is_read_by_the_real_loaders(tmp_path):
    """--image-size: every image w x h, query boxes inside them, the summary says so, the preset's files intact."""
    from advbct.evaluation.protocol import load_test_set

    make_synthetic(tmp_path, preset="tiny", seed=0, frame=(96, 72))
    summary = synthetic.read_summary(tmp_path)
    assert summary["image_size"] == [96, 72]
    jpgs = [f for f in _all_files(tmp_path) if f.endswith(".jpg")]
    assert {Image.open(tmp_path / f).size for f in jpgs} == {(96, 72)}
    ds = load_revisited(tmp_path / "ROxfordParis", "roxford5k")
    assert len(ds.query_paths) == PRESETS["tiny"].rev_landmarks * PRESETS["tiny"].rev_queries
    assert (ds.query_bbx[:, [0, 2]] <= 96).all() and (ds.query_bbx[:, [1, 3]] <= 72).all()
    assert (ds.query_bbx[:, 2] > ds.query_bbx[:, 0]).all() and (ds.query_bbx[:, 3] > ds.query_bbx[:, 1]).all()
    gld = load_test_set("gldv2", tmp_path / "gldv2")
    assert len(gld.gallery_paths) == summary["gldv2"]["index_images"]


@pytest.mark.parametrize("text", ["1024", "1024x", "x768", "10x768", "1024x768x3", "big"])
def test_image_size_argument_is_checked(text):
    with pytest.raises(UserError, match=rf"--image-size '{text}': expected WIDTHxHEIGHT"):
        synthetic.parse_frame(text)
    assert synthetic.parse_frame("1024x768") == (1024, 768) and synthetic.parse_frame("640X480") == (640, 480)
