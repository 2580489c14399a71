"""Pre-resized dataset copies (advbct.data.preresize, tools/preresize.py): sizes, byte-identical copies, rescaled
query boxes, corrupt inputs listed, resuming after a kill, a rerun that changes nothing, refusals."""

import json
import os
import pickle
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from advbct.data import preresize as pr
from advbct.data.preresize import is_leftover_temporary, preresize, rescale_box, target_size
from advbct.data.revisited import load_revisited
from advbct.data.safe_pickle import safe_load_pickle
from advbct.errors import UserError
from advbct.io import atomic_path
from helpers import REPO

TOOL = str(REPO / "tools" / "preresize.py")


def _photo(rng, width, height, mode="RGB"):
    """A smooth random picture with some grain (JPEG-like content, not flat colour)."""
    channels = 1 if mode == "L" else 3
    low = (rng.random((max(2, height // 32), max(2, width // 32), channels)) * 255).astype(np.uint8)
    smooth = Image.fromarray(low.squeeze(-1) if channels == 1 else low).resize((width, height),
                                                                               Image.Resampling.BICUBIC)
    grain = rng.normal(0, 6, np.asarray(smooth).shape)
    return Image.fromarray(np.clip(np.asarray(smooth) + grain, 0, 255).astype(np.uint8))


def _save(img, path, **kwargs):
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, **kwargs)
    return path


def _files(root):
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, names in os.walk(root) for f in names)


def _state(root):
    """(path, size, mtime_ns) of every file under ``root``."""
    return [(f, os.stat(os.path.join(root, f)).st_size, os.stat(os.path.join(root, f)).st_mtime_ns)
            for f in _files(root)]


def _run_tool(*args):
    return subprocess.run([sys.executable, TOOL, *map(str, args)], capture_output=True, text=True, timeout=120)


# ------------------------------------------------------------------------------------------------ pure functions


@pytest.mark.parametrize("size, short_side, want", [
    ((1024, 768), 256, (341, 256)),    # 1024 * 256 / 768 = 341.33
    ((768, 1024), 256, (256, 341)),    # portrait
    ((800, 600), 256, (341, 256)),     # GLDv2-like
    ((1000, 500), 256, (512, 256)),    # exact
    ((257, 300), 256, (256, 299)),     # 300 * 256 / 257 = 298.83
    ((200, 150), 256, (200, 150)),     # already small: kept, never upscaled
    ((256, 900), 256, (256, 900)),     # short side exactly 256: kept
    ((300, 300), 256, (256, 256)),     # square
    ((5, 4), 2, (2, 2)),               # 5 * 2 / 4 = 2.5: halves to even
    ((7, 4), 2, (4, 2)),               # 7 * 2 / 4 = 3.5: halves to even
])
def test_target_size(size, short_side, want):
    assert target_size(*size, short_side) == want


def test_rescale_box_keeps_the_container():
    assert rescale_box([100, 50, 900, 700], (1024, 768), (341, 256)) == pytest.approx(
        [100 * 341 / 1024, 50 / 3, 900 * 341 / 1024, 700 / 3])
    assert type(rescale_box((1, 2, 3, 4), (10, 10), (5, 5))) is tuple
    arr = rescale_box(np.array([30, 60, 600, 990]), (768, 1024), (256, 341))
    assert arr.dtype == np.float64 and arr.tolist() == pytest.approx([10, 60 * 341 / 1024, 200, 990 * 341 / 1024])


def test_leftover_temporaries_are_the_ones_advbct_io_writes(tmp_path):
    with atomic_path(tmp_path / "img.jpg") as tmp:
        name = os.path.basename(tmp)
        assert is_leftover_temporary(name)
        assert not is_leftover_temporary(name, source_names={name})  # a source file of that name is data
    for other in ("img.jpg", ".hidden.jpg", ".img.jpg.tmp", "img.jpg.123.deadbeef.tmp"):
        assert not is_leftover_temporary(other)


# ------------------------------------------------------------------------------------------- one run over a tree

# query boxes: roxford5k in the original layout (list boxes), rparis6k in the revisitop one (an array box)
OX_BOXES = [[100.0, 50.0, 900.0, 700.0], [30.0, 60.0, 600.0, 990.0]]
PA_BOX = np.array([100.0, 100.0, 900.0, 400.0])
RESIZED = {  # relative path: (source size, copy size)
    "ROxfordParis/roxford5k/jpg/q0.jpg": ((1024, 768), (341, 256)),
    "ROxfordParis/roxford5k/jpg/q1.jpg": ((768, 1024), (256, 341)),
    "ROxfordParis/roxford5k/jpg/g0.jpg": ((640, 480), (341, 256)),
    "rparis/rparis6k/jpg/pq0.jpg": ((1000, 500), (512, 256)),
    "gldv2/train/a/b/c/abc1.jpg": ((800, 600), (341, 256)),
    "gldv2/train/gray.jpg": ((640, 480), (341, 256)),
    "gldv2/train/alpha.png": ((300, 400), (256, 341)),
    "gldv2/train/UPPER.JPG": ((257, 300), (256, 299)),
    "gldv2/train/rotated.jpg": ((1024, 768), (341, 256)),  # EXIF says rotate: ignored, like the loader
}
SMALL = ["ROxfordParis/roxford5k/jpg/g1.jpg", "rparis/rparis6k/jpg/pg0.jpg"]
OTHERS = ["gldv2/label_2.txt", "gldv2/train.csv"]
GND = ["ROxfordParis/gnd_roxford5k.pkl", "rparis/rparis6k/gnd_rparis6k.pkl"]
CORRUPT = ["gldv2/train/half.jpg", "gldv2/train/text.jpg"]


def _make_tree(src):
    rng = np.random.default_rng(0)
    for rel, (size, _) in RESIZED.items():
        mode = "L" if "gray" in rel else "RGB"
        img = _photo(rng, *size, mode=mode)
        if rel.endswith(".png"):
            _save(img.convert("RGBA"), src / rel)
        elif "rotated" in rel:
            exif = Image.Exif()
            exif[0x0112] = 6  # orientation: rotate 90 degrees when displayed
            _save(img, src / rel, quality=90, exif=exif.tobytes())
        else:
            _save(img, src / rel, quality=90)
    for rel in SMALL:
        _save(_photo(rng, 200, 150), src / rel, quality=90)
    (src / "gldv2/label_2.txt").write_text("train/a/b/c/abc1.jpg 0\ntrain/gray.jpg 1\n")
    (src / "gldv2/train.csv").write_text("id,url,landmark_id\nabc1,http://x,0\n")
    with open(src / GND[0], "wb") as handle:
        pickle.dump({"gnd": [{"bbx": OX_BOXES[0], "easy": [0], "hard": [], "junk": [1]},
                             {"bbx": OX_BOXES[1], "easy": np.array([1]), "hard": [0], "junk": []}],
                     "imlist": ["g0", "g1"], "qimlist": ["q0", "q1"]}, handle, protocol=3)
    with open(src / GND[1], "wb") as handle:
        pickle.dump({"gnd": [{"bbx": PA_BOX, "easy": [0], "hard": [], "junk": []}],
                     "imlist": ["pg0"], "qimlist": ["pq0"]}, handle, protocol=3)
    whole = (src / "gldv2/train/a/b/c/abc1.jpg").read_bytes()
    (src / CORRUPT[0]).write_bytes(whole[:len(whole) // 2])
    (src / CORRUPT[1]).write_text("not an image\n")


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """A source tree and its copy (2 processes): (src, dst, summary)."""
    root = tmp_path_factory.mktemp("preresize")
    src, dst = root / "src", root / "dst"
    _make_tree(src)
    return src, dst, preresize(src, dst, workers=2, progress=False)


def test_resized_images_have_the_target_size_format_and_content(made):
    src, dst, _ = made
    for rel, (old, new) in RESIZED.items():
        with Image.open(src / rel) as before, Image.open(dst / rel) as after:
            assert (before.size, after.size) == (old, new), rel
            assert after.format == before.format, rel
            assert after.mode == ("L" if "gray" in rel else "RGB"), rel
            assert not after.getexif(), rel  # no metadata carried over (orientation included)
            want = np.asarray(before.convert("RGB").resize(new, Image.Resampling.LANCZOS), dtype=float)
            got = np.asarray(after.convert("RGB"), dtype=float)
            # the same picture, up to JPEG at quality 95 with half-resolution chroma (another picture: about 60)
            assert np.abs(got - want).mean() < 4.0, rel


def test_small_images_and_other_files_are_byte_identical(made):
    src, dst, _ = made
    for rel in SMALL + OTHERS:
        assert (dst / rel).read_bytes() == (src / rel).read_bytes(), rel
    assert _files(dst) == sorted([*RESIZED, *SMALL, *OTHERS, *GND, "PRESIZED.json", "preresize_corrupt.txt"])


def test_query_boxes_are_rescaled_and_the_copy_loads(made):
    _, dst, _ = made
    ox = load_revisited(dst / "ROxfordParis", "roxford5k", crop_query=True)  # checks every image exists
    assert np.allclose(ox.query_bbx, [
        [100 * 341 / 1024, 50 * 256 / 768, 900 * 341 / 1024, 700 * 256 / 768],   # 1024x768 -> 341x256
        [30 * 256 / 768, 60 * 341 / 1024, 600 * 256 / 768, 990 * 341 / 1024],   # 768x1024 -> 256x341
    ], rtol=0, atol=1e-9)
    assert [g["easy"].tolist() for g in ox.gnd] == [[0], [1]] and ox.gallery_names == ["g0", "g1"]
    raw = safe_load_pickle(dst / GND[0])
    assert type(raw["gnd"][0]["bbx"]) is list and isinstance(raw["gnd"][1]["easy"], np.ndarray)
    pa = load_revisited(dst / "rparis", "rparis6k")  # revisitop layout: the gnd file beside jpg/
    assert np.allclose(pa.query_bbx, [[51.2, 51.2, 460.8, 204.8]], rtol=0, atol=1e-9)  # 1000x500 -> 512x256
    assert isinstance(safe_load_pickle(dst / GND[1])["gnd"][0]["bbx"], np.ndarray)


def test_corrupt_images_are_listed_and_not_copied(made):
    _, dst, summary = made
    lines = (dst / "preresize_corrupt.txt").read_text().splitlines()
    assert [line.split("\t")[0] for line in lines] == CORRUPT
    assert "image file is truncated" in lines[0].split("\t")[1]
    assert lines[1].split("\t")[1] == "not an image (no image format recognised)"
    assert not any((dst / rel).exists() for rel in CORRUPT)
    assert [n for n in os.listdir(dst / "gldv2/train") if n.startswith(".")] == []


def test_summary_and_settings_count_the_copy(made):
    src, dst, summary = made
    before = sum((src / rel).stat().st_size for rel in [*RESIZED, *SMALL])
    after = sum((dst / rel).stat().st_size for rel in [*RESIZED, *SMALL])
    assert {k: summary[k] for k in ("images", "resized", "copied", "skipped", "corrupt", "failed", "other_copied",
                                    "gnd_rescaled", "other_skipped", "written", "bytes_before", "bytes_after",
                                    "complete", "failed_files")} == {
        "images": 13, "resized": 9, "copied": 2, "skipped": 0, "corrupt": 2, "failed": 0, "other_copied": 4,
        "gnd_rescaled": 2, "other_skipped": 0, "written": 15, "bytes_before": before, "bytes_after": after,
        "complete": True, "failed_files": []}
    assert after < before / 3
    settings = json.loads((dst / "PRESIZED.json").read_text())
    assert settings == {"format_version": 1, "source": os.path.realpath(src), "short_side": 256, "quality": 95,
                        "resample": "lanczos", "jpeg_subsampling": "4:2:0", "jpeg_optimize": True,
                        "complete": True, "images": 11, "corrupt": 2, "other_files": 4}


def test_a_second_run_changes_nothing(made):
    src, dst, _ = made
    state = _state(dst)
    summary = preresize(src, dst, workers=2, progress=False)
    assert _state(dst) == state
    assert {k: summary[k] for k in ("resized", "copied", "other_copied", "written", "skipped", "other_skipped",
                                    "corrupt", "complete")} == {
        "resized": 0, "copied": 0, "other_copied": 0, "written": 0, "skipped": 11, "other_skipped": 4,
        "corrupt": 2, "complete": True}


# ------------------------------------------------------------------------------------------------ refusals


def _refused(args, *untouched):
    states = [_state(p) if p.exists() else None for p in untouched]
    proc = _run_tool(*args, "--no-progress")
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == "" and len(proc.stderr.splitlines()) == 1 and proc.stderr.startswith("error: ")
    assert [_state(p) if p.exists() else None for p in untouched] == states
    return proc.stderr


def test_other_settings_into_a_copy_are_refused(made):
    src, dst, _ = made
    message = _refused(["--src", src, "--dst", dst, "--short-side", "128", "--quality", "90"], src, dst)
    assert "PRESIZED.json" in message and "short_side 256 there, 128 now" in message and "quality" in message
    assert "resample" not in message


def test_foreign_folders_and_bad_paths_are_refused(made, tmp_path):
    src, _, _ = made
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine\n")
    assert "not a copy made by this tool" in _refused(["--src", src, "--dst", foreign], src, foreign)
    inside = src / "gldv2" / "small"
    assert "inside the source folder" in _refused(["--src", src, "--dst", inside], src)
    assert not inside.exists()
    assert "is the source folder" in _refused(["--src", src, "--dst", src], src)
    assert "source folder not found" in _refused(["--src", tmp_path / "nope", "--dst", tmp_path / "new"])
    assert not (tmp_path / "new").exists()


# ------------------------------------------------------------------------------------ failures and resuming


def test_a_bad_output_is_removed_listed_and_redone(tmp_path, monkeypatch):
    src, dst = tmp_path / "src", tmp_path / "dst"
    rng = np.random.default_rng(1)
    for i in range(3):
        _save(_photo(rng, 640, 480), src / f"im{i}.jpg", quality=90)
    encode = pr._encode

    def broken(data):  # the encoder's output for im1 comes out cut in half
        payload, size, fmt, resized = encode(data)
        return (payload[:len(payload) // 2] if data == (src / "im1.jpg").read_bytes() else payload), size, fmt, resized

    monkeypatch.setattr(pr, "_encode", broken)
    summary = preresize(src, dst, workers=1, progress=False)
    assert (summary["resized"], summary["failed"], summary["complete"]) == (2, 1, False)
    [failed] = summary["failed_files"]
    assert failed.startswith("im1.jpg: written file does not decode (OSError: image file is truncated")
    assert _files(dst) == ["PRESIZED.json", "im0.jpg", "im2.jpg"]
    assert "complete" not in json.loads((dst / "PRESIZED.json").read_text())
    monkeypatch.setattr(pr, "_encode", encode)
    summary = preresize(src, dst, workers=1, progress=False)
    assert (summary["resized"], summary["skipped"], summary["complete"]) == (1, 2, True)
    with Image.open(dst / "im1.jpg") as im:
        assert im.size == (341, 256)


def _kill_when(dst, args, images):
    """Start the tool, SIGKILL it once ``dst`` holds ``images`` JPEGs; how many it holds then."""
    proc = subprocess.Popen([sys.executable, TOOL, *map(str, args), "--no-progress"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and sum(f.endswith(".jpg") for f in _files(dst) if dst.exists()) < images:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    return proc.pid, sum(f.endswith(".jpg") for f in _files(dst))


@pytest.mark.slow
def test_a_killed_run_resumes_to_the_same_bytes(tmp_path):
    src = tmp_path / "src"
    rng = np.random.default_rng(2)
    total = 60
    for i in range(total):
        _save(_photo(rng, 1024, 768), src / f"d{i % 3}" / f"im{i:02d}.jpg", quality=90)
    (src / "list.txt").write_text("".join(f"d{i % 3}/im{i:02d}.jpg {i}\n" for i in range(total)))
    reference = tmp_path / "reference"
    preresize(src, reference, workers=2, progress=False)

    dst = tmp_path / "dst"
    pid, written = _kill_when(dst, ["--src", src, "--dst", dst, "--workers", "1"], 6)
    assert 6 <= written < total  # killed halfway
    # as if killed inside writes (the walk is sorted: d0 is the folder being written)
    (dst / "d0" / f".im45.jpg.{pid}.0badf00d.tmp").write_bytes(b"\xff\xd8 partial")
    (dst / f".PRESIZED.json.{pid}.0badf00d.tmp").write_text('{"comp')
    # killed again, now with worker processes: they end with it and write nothing more
    _, written = _kill_when(dst, ["--src", src, "--dst", dst, "--workers", "2"], written + 6)
    state = _state(dst)
    time.sleep(0.5)
    assert _state(dst) == state and written < total
    assert not (dst / f".PRESIZED.json.{pid}.0badf00d.tmp").exists()  # removed by the second run
    assert not (dst / "d0" / f".im45.jpg.{pid}.0badf00d.tmp").exists()

    done = _run_tool("--src", src, "--dst", dst, "--workers", "1", "--no-progress")
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert (summary["skipped"], summary["resized"], summary["complete"]) == (written, total - written, True)
    assert _files(dst) == _files(reference)  # no temporary left, nothing else there
    differing = [f for f in _files(dst) if (dst / f).read_bytes() != (reference / f).read_bytes()]
    assert differing == []


def test_real_ground_truth_boxes_follow_their_query_image(shared_dir, tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    (src / "gnd_roxford5k.pkl").write_bytes((shared_dir / "data/revisited/gnd_roxford5k.pkl").read_bytes())
    # only the first query's image is there (portrait, as its box says); the other boxes stay as they are
    _save(Image.new("RGB", (768, 1024), (90, 120, 150)), src / "roxford5k/jpg/all_souls_000013.jpg", quality=90)
    summary = preresize(src, dst, workers=1, progress=False)
    assert (summary["resized"], summary["gnd_rescaled"]) == (1, 1)
    before = load_revisited(src, "roxford5k", check_images=False)
    after = load_revisited(dst, "roxford5k", check_images=False)
    assert np.allclose(after.query_bbx[0], [136.5 / 3, 34.1 * 341 / 1024, 648.5 / 3, 955.7 * 341 / 1024],
                       rtol=0, atol=1e-9)
    assert np.array_equal(after.query_bbx[1:], before.query_bbx[1:])
    assert all(np.array_equal(a[k], b[k]) for a, b in zip(after.gnd, before.gnd) for k in ("easy", "hard", "junk"))
    assert after.gallery_names == before.gallery_names and after.query_names == before.query_names


def test_a_copy_being_written_by_another_run_is_refused(made):
    fcntl = pytest.importorskip("fcntl")
    src, dst, _ = made
    state = _state(dst)
    fd = os.open(dst, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        with pytest.raises(UserError, match="another run is writing into this copy now"):
            preresize(src, dst, workers=1, progress=False)
    finally:
        os.close(fd)
    assert _state(dst) == state
