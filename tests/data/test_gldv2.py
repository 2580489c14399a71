"""GLDv2: official CSVs -> lists (prepare_gldv2), the test-set loader, and the synthetic GLDv2 part."""

import csv
import os

import numpy as np
import pytest

from advbct.data.gldv2 import image_relpath, load_gldv2_test, prepare_gldv2, read_csv_columns
from advbct.data.image_list import read_image_list
from advbct.data.synthetic import PRESETS
from advbct.errors import UserError
from helpers import REPO

# hand-written mini release: ids are 16 hex digits like the real ones
A, B, C, D, E, F = "a1b2c3d4e5f60001", "b2c3d4e5f6a70002", "c3d4e5f6a7b80003", "d4e5f6a7b8c90004", \
    "e5f6a7b8c9d00005", "f6a7b8c9d0e10006"
NOISE = "0f0f0f0f0f0f0007"
I0, I1, I2, I3 = "1111aaaa2222bbbb", "3333cccc4444dddd", "5555eeee6666ffff", "7777000088889999"
Q0, Q1, Q2, Q3 = "9999aaaa00000001", "8888bbbb00000002", "7777cccc00000003", "6666dddd00000004"


def _write_csv(path, header, rows):
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)


@pytest.fixture
def mini(tmp_path):
    """Official-format CSVs: landmarks 12, 3, 7 (unsorted), a noisy train.csv row, Ignored/None queries."""
    d = tmp_path / "csv"
    d.mkdir()
    _write_csv(d / "train_clean.csv", ["landmark_id", "images"], [[12, f"{E} {F}"], [3, f"{B} {A}"], [7, C + " " + D]])
    _write_csv(d / "train.csv", ["id", "url", "landmark_id"],
               [[A, "http://x/a,1.jpg", 3], [NOISE, "http://x/n.jpg", 7], [B, "http://x/b.jpg", 3],
                [C, "http://x/c.jpg", 7], [D, "http://x/d.jpg", 7], [E, "http://x/e.jpg", 12], [F, "http://x/f.jpg", 12]])
    _write_csv(d / "index.csv", ["id"], [[I0], [I1], [I2], [I3]])
    _write_csv(d / "test.csv", ["id"], [[Q0], [Q1], [Q2], [Q3]])
    _write_csv(d / "retrieval_solution_v2.1.csv", ["id", "images", "Usage"],
               [[Q0, f"{I2} {I0}", "Private"], [Q1, "None", "Ignored"], [Q2, I3, "Public"], [Q3, f"{I1}", "Private"]])
    return d


def _lines(path):
    return path.read_text().splitlines()


def test_prepare_mini_release(mini, tmp_path):
    out = tmp_path / "out"
    summary = prepare_gldv2(mini, out)
    assert summary["num_classes"] == 3 and summary["train_images"] == 6
    assert (summary["private_queries"], summary["public_queries"], summary["index_images"]) == (2, 1, 4)
    # labels: landmark 3 -> 0, 7 -> 1, 12 -> 2; images in train_clean.csv order; noisy row excluded
    assert _lines(out / "label_3.txt") == [
        f"train/b/2/c/{B}.jpg 0", f"train/a/1/b/{A}.jpg 0", f"train/c/3/d/{C}.jpg 1",
        f"train/d/4/e/{D}.jpg 1", f"train/e/5/f/{E}.jpg 2", f"train/f/6/a/{F}.jpg 2",
    ]
    assert _lines(out / "gldv2_label_map.csv") == ["label,landmark_id", "0,3", "1,7", "2,12"]
    assert _lines(out / "gldv2_gallery_list.txt") == [
        f"index/1/1/1/{I0}.jpg 0", f"index/3/3/3/{I1}.jpg 1", f"index/5/5/5/{I2}.jpg 2", f"index/7/7/7/{I3}.jpg 3"]
    assert _lines(out / "gldv2_private_query_list.txt") == [f"test/9/9/9/{Q0}.jpg 0", f"test/6/6/6/{Q3}.jpg 1"]
    assert _lines(out / "gldv2_private_query_gt.txt") == [f"test/9/9/9/{Q0}.jpg 0 2,0", f"test/6/6/6/{Q3}.jpg 1 1"]
    assert _lines(out / "gldv2_public_query_list.txt") == [f"test/7/7/7/{Q2}.jpg 0"]
    assert _lines(out / "gldv2_public_query_gt.txt") == [f"test/7/7/7/{Q2}.jpg 0 3"]

    test = load_gldv2_test(out, "private", image_root="/img", check_images=False)
    assert test.query_paths.tolist() == [f"/img/test/9/9/9/{Q0}.jpg", f"/img/test/6/6/6/{Q3}.jpg"]
    assert test.gallery_paths[2] == f"/img/index/5/5/5/{I2}.jpg" and len(test.gallery_paths) == 4
    assert [g.tolist() for g in test.gt] == [[2, 0], [1]] and test.gt[0].dtype == np.int64
    paths, labels = read_image_list(out / "label_3.txt", num_classes=3)  # the train list is a valid list
    assert labels.tolist() == [0, 0, 1, 1, 2, 2]


def test_train_csv_cross_check(mini, tmp_path):
    rows = _lines(mini / "train.csv")
    (mini / "train.csv").write_text("\n".join(r.replace(f"{D},http://x/d.jpg,7", f"{D},http://x/d.jpg,8")
                                              for r in rows) + "\n")
    with pytest.raises(UserError) as err:
        prepare_gldv2(mini, tmp_path / "o1")
    assert f"train.csv:6: image {D} has landmark_id 8" in str(err.value)
    assert prepare_gldv2(mini, tmp_path / "o2", check_train_csv=False)["train_images"] == 6
    (mini / "train.csv").write_text("\n".join(r for r in rows if not r.startswith(E)) + "\n")
    with pytest.raises(UserError, match=f"image {E} is not in .*train.csv"):
        prepare_gldv2(mini, tmp_path / "o3")


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("retrieval_solution_v2.1.csv", f"id,images,Usage\n{Q0},{I0} ffff000011112222,Private\n",
         r"retrieval_solution_v2.1.csv:2: index image ffff000011112222 is not in .*index.csv"),
        ("retrieval_solution_v2.1.csv", f"id,images,Usage\n{Q0},{I0},Private\n{Q2},None,Public\n",
         r"retrieval_solution_v2.1.csv:3: public query .* lists no index images"),
        ("retrieval_solution_v2.1.csv", f"id,images,Usage\n{Q0},{I0},Secret\n", "Usage 'Secret' is not"),
        ("retrieval_solution_v2.1.csv", f"id,images,Usage\nabcd00001111eeee,{I0},Private\n",
         r":2: query abcd00001111eeee is not in .*test.csv"),
        ("retrieval_solution_v2.1.csv", f"id,images\n{Q0},{I0}\n", "missing column.*Usage"),
        ("index.csv", f"id\n{I0}\n{I1}\n{I0}\n", f"image id '{I0}' listed more than once"),
        ("index.csv", "id\nab\n", r"index.csv:2: malformed image id 'ab'"),
        ("train_clean.csv", "landmark_id,images\n3,\n", r"train_clean.csv:2: landmark 3 has no images"),
        ("train_clean.csv", f"landmark_id,images\nx3,{A}\n", r"train_clean.csv:2: column landmark_id: 'x3'"),
        ("train_clean.csv", f"landmark_id,images\n3,{A}\n3,{B}\n", "landmark_id 3 appears on more than one row"),
        ("train_clean.csv", f"landmark_id,images\n3,{A},x\n", r"train_clean.csv:2: expected 2 fields, got 3"),
    ],
)
def test_prepare_rejects_bad_csvs(mini, tmp_path, name, content, message):
    (mini / name).write_text(content)
    with pytest.raises(UserError, match=message):
        prepare_gldv2(mini, tmp_path / "out", check_train_csv=False)


def test_missing_csv_and_folder(mini, tmp_path):
    with pytest.raises(UserError, match="Dataset.md"):
        prepare_gldv2(tmp_path / "nowhere", tmp_path / "out")
    os.remove(mini / "index.csv")
    with pytest.raises(UserError, match=r"index.csv: file not found .*Dataset.md"):
        prepare_gldv2(mini, tmp_path / "out")


def _touch_images(root, relpaths):
    for rel in relpaths:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(b"x")


def test_image_root_checks_and_skip_missing(mini, tmp_path):
    images = tmp_path / "images"
    test_imgs = [image_relpath("index", i) for i in (I0, I1, I2, I3)] + [image_relpath("test", q) for q in (Q0, Q2, Q3)]
    _touch_images(images, test_imgs + [image_relpath("train", i) for i in (A, B, C, E, F)])  # D (landmark 7) absent
    with pytest.raises(UserError) as err:
        prepare_gldv2(mini, tmp_path / "o1", image_root=images)
    assert str(images / image_relpath("train", D)) in str(err.value) and "--skip-missing" in str(err.value)
    summary = prepare_gldv2(mini, tmp_path / "o2", image_root=images, skip_missing=True)
    assert summary["dropped_missing_train_images"] == 1 and summary["num_classes"] == 3
    assert [l.split()[1] for l in _lines(tmp_path / "o2" / "label_3.txt")] == ["0", "0", "1", "2", "2"]
    os.remove(images / image_relpath("train", C))  # landmark 7 now has no image: labels are compacted
    summary = prepare_gldv2(mini, tmp_path / "o3", image_root=images, skip_missing=True)
    assert summary["num_classes"] == 2 and _lines(tmp_path / "o3" / "gldv2_label_map.csv") == ["label,landmark_id", "0,3", "1,12"]
    os.remove(images / image_relpath("index", I2))
    with pytest.raises(UserError, match=f"{I2}.jpg: index image not found"):
        prepare_gldv2(mini, tmp_path / "o4", image_root=images, skip_missing=True)


def test_load_gldv2_test_errors(mini, tmp_path):
    out = tmp_path / "out"
    prepare_gldv2(mini, out)
    with pytest.raises(UserError, match="unknown GLDv2 test split 'secret'"):
        load_gldv2_test(out, "secret")
    with pytest.raises(UserError, match=r"image not found \(2 of 2 missing\)"):
        load_gldv2_test(out, "private")  # no images under the root
    gt = out / "gldv2_private_query_gt.txt"
    gt.write_text(f"test/9/9/9/{Q0}.jpg 0 2,0\ntest/6/6/6/{Q3}.jpg 1 1,9\n")
    with pytest.raises(UserError, match=r"gldv2_private_query_gt.txt:2: gallery index out of range \[0, 4\)"):
        load_gldv2_test(out, "private", check_images=False)
    gt.write_text(f"test/9/9/9/{Q0}.jpg 0 2,0\ntest/6/6/6/{Q0}.jpg 1 1\n")
    with pytest.raises(UserError, match=r"_gt.txt:2: expected query test/6/6/6/"):
        load_gldv2_test(out, "private", check_images=False)
    os.remove(gt)
    with pytest.raises(UserError, match="prepare_gldv2.py; see Dataset.md"):
        load_gldv2_test(out, "private", check_images=False)
    with pytest.raises(UserError, match="GLDv2 root not found"):
        load_gldv2_test(tmp_path / "none")


def test_prepare_tool_reports_user_errors(tmp_path, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "prepare_tool", str(REPO / "tools" / "prepare_gldv2.py"))
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    with pytest.raises(SystemExit) as exc:
        tool.main(["--csv-dir", str(tmp_path / "nope"), "--out", str(tmp_path / "o")])
    assert exc.value.code == 2
    assert capsys.readouterr().err.strip() == f"error: {tmp_path / 'nope'}: CSV folder not found (see Dataset.md)"


# ----------------------------------------------------------------------------------- synthetic GLDv2


@pytest.mark.slow
def test_synthetic_lists_match_solution_csv(tiny_synthetic):
    root = tiny_synthetic / "gldv2"
    index_ids = read_csv_columns(root / "index.csv", ["id"])[0]
    sol_ids, sol_images, usage = read_csv_columns(root / "retrieval_solution_v2.1.csv", ["id", "images", "Usage"])
    assert set(sol_ids) == set(read_csv_columns(root / "test.csv", ["id"])[0])
    ignored = [i for i, u in zip(sol_ids, usage) if u == "Ignored"]
    assert ignored and all(img == "None" for img, u in zip(sol_images, usage) if u == "Ignored")
    n_total = 0
    for split in ("private", "public"):
        test = load_gldv2_test(root, split)  # also checks that every image exists
        expected = {q: set(img.split()) for q, img, u in zip(sol_ids, sol_images, usage) if u.lower() == split}
        got_ids = [os.path.basename(p)[:-4] for p in test.query_paths]
        assert got_ids == [q for q, u in zip(sol_ids, usage) if u.lower() == split]
        for qid, gt in zip(got_ids, test.gt):
            assert {index_ids[i] for i in gt} == expected[qid]
            assert {os.path.basename(test.gallery_paths[i])[:-4] for i in gt} == expected[qid]
        n_total += len(got_ids)
        assert not set(got_ids) & set(ignored)
    tiny = PRESETS["tiny"]
    assert n_total == tiny.gld_landmarks * tiny.gld_queries > 0 and len(index_ids) == len(test.gallery_paths)


@pytest.mark.slow
def test_synthetic_train_list(tiny_synthetic):
    root = tiny_synthetic / "gldv2"
    classes = PRESETS["tiny"].train_classes
    paths, labels = read_image_list(root / f"label_{classes}.txt", root=root, num_classes=classes)
    assert np.array_equal(np.unique(labels), np.arange(classes)) and np.all(np.diff(labels) >= 0)
    landmarks, images = read_csv_columns(root / "train_clean.csv", ["landmark_id", "images"])
    order = np.argsort(np.array(landmarks, dtype=np.int64))
    expected = [os.path.join(str(root), image_relpath("train", i)) for k in order for i in images[k].split()]
    assert paths.tolist() == expected and all(os.path.isfile(p) for p in paths)
    label_map = _lines(root / "gldv2_label_map.csv")[1:]
    assert label_map == [f"{k},{lm}" for k, lm in enumerate(sorted(int(x) for x in landmarks))]
    train_ids = read_csv_columns(root / "train.csv", ["id"])[0]
    assert len(train_ids) > len(paths)  # noisy and dropped-landmark rows exist and are left out
    assert set(os.path.basename(p)[:-4] for p in paths) < set(train_ids)
