"""Allocation rules (PAPER.md "Protocol"): seeds, small classes, label renumbering."""

import os
import subprocess
import sys

import numpy as np
import pytest

from advbct.data.splits import make_allocation, split_by_class, split_by_data
from advbct.errors import UserError
from helpers import REPO


def _reference_by_data(labels, ratio):
    """Plain per-class reading of the original rule (legacy global RNG reseeded with 666 + class)."""
    old = set()
    for c in sorted(set(labels)):
        idx = [i for i, l in enumerate(labels) if l == c]
        n = len(idx)
        if n < 4:
            old.add(idx[0])
            continue
        np.random.seed(666 + c)
        perm = np.arange(n)
        np.random.shuffle(perm)
        old.update(idx[j] for j in perm[: int(n * ratio)])
    return old


def test_by_data_small_class_cases_and_counts():
    # class 0: 1 image, class 1: 2 images, class 2: 3 images, class 3: 10 images (interleaved order)
    labels = np.array([3, 1, 3, 2, 3, 0, 3, 1, 2, 3, 3, 2, 3, 3, 3, 3])
    old = split_by_data(labels, 0.3)
    assert old[5]                                  # the single image of class 0 goes to old
    assert old[1] and not old[7]                   # class 1: first image in file order only
    assert old[3] and not old[8] and not old[11]   # class 2: first image only
    assert old[labels == 3].sum() == 3             # int(10 * 0.3)
    assert set(np.flatnonzero(old)) == _reference_by_data(list(labels), 0.3)


def test_by_data_matches_reference_on_random_list():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 40, size=600)
    assert set(np.flatnonzero(split_by_data(labels, 0.3))) == _reference_by_data(list(labels), 0.3)


def test_by_class_seed_and_renumbering():
    labels = np.repeat(np.arange(10), 2)
    old_mask, old_labels, new_labels = split_by_class(labels, 0.3)
    np.random.seed(666)
    order = np.arange(10)
    np.random.shuffle(order)
    expected_old = sorted(order[:3])              # int(10 * 0.3) classes, seed 666
    assert sorted(set(labels[old_mask])) == expected_old
    # old classes renumbered 0..2 in increasing original id; new classes follow, same order
    expected = {c: i for i, c in enumerate(expected_old)}
    rest = [c for c in range(10) if c not in expected]
    expected.update({c: 3 + i for i, c in enumerate(rest)})
    assert [new_labels[labels == c][0] for c in range(10)] == [expected[c] for c in range(10)]
    assert set(old_labels[old_mask]) == {0, 1, 2}
    assert (old_labels[old_mask] == new_labels[old_mask]).all()


def test_make_allocation_files(tmp_path):
    lines = [f"train/a/{i}.jpg {c}" for i, c in enumerate([2, 0, 1, 2, 0, 1, 2, 0, 1, 2])]
    src = tmp_path / "full.txt"
    src.write_text("\n".join(lines) + "\n")
    s = make_allocation(str(src), "class", 0.34, dataset="toy")
    old = (tmp_path / "toy_train_old_34percent_class.txt").read_text().split("\n")[:-1]
    new = (tmp_path / "toy_train_new_100percent_class.txt").read_text().split("\n")[:-1]
    assert s["old_classes"] == 1 and s["new_classes"] == 3 and s["new_images"] == 10
    assert len(new) == 10 and all(line.endswith(" 0") for line in old)
    # as the original: grouped by ORIGINAL class id, file order kept inside a class
    original = {f"train/a/{i}.jpg": c for i, c in enumerate([2, 0, 1, 2, 0, 1, 2, 0, 1, 2])}
    new_paths = [line.split()[0] for line in new]
    assert [original[p] for p in new_paths] == sorted(original[p] for p in new_paths)
    assert new_paths[:3] == ["train/a/1.jpg", "train/a/4.jpg", "train/a/7.jpg"]
    s = make_allocation(str(src), "data", 0.3, dataset="toy")
    assert s["old_images"] == 3 and s["new_images"] == 10   # classes 0,1 (3 images): first; class 2: int(4*0.3)
    rest = (tmp_path / "toy_train_new_70percent_data.txt").read_text().split("\n")[:-1]
    assert len(rest) == 10 - 3


@pytest.mark.slow
def test_split_tool_summary_and_errors(tmp_path):
    src = tmp_path / "full.txt"
    src.write_text("".join(f"x/{i}.jpg {i % 20}\n" for i in range(200)))
    tool = str(REPO / "tools" / "split_dataset.py")
    proc = subprocess.run([sys.executable, tool, "--list", str(src), "--by", "class"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "old: 6 classes, 60 images" in proc.stdout and "new: 20 classes, 200 images" in proc.stdout
    bad = tmp_path / "bad.txt"
    bad.write_text("x/0.jpg 0\nx/1.jpg one\n")
    proc = subprocess.run([sys.executable, tool, "--list", str(bad), "--by", "data"], capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert str(bad) in proc.stderr and "2" in proc.stderr


def _write_list(path, labels):
    path.write_text("".join(f"img/{i}.jpg {l}\n" for i, l in enumerate(labels)))


@pytest.mark.parametrize("by", ["class", "data"])
def test_a_chain_of_two_is_the_old_new_split_to_the_byte(tmp_path, by):
    from advbct.data.splits import make_chain_allocation

    _write_list(tmp_path / "list.txt", np.random.default_rng(0).integers(0, 40, size=500))
    pair = make_allocation(str(tmp_path / "list.txt"), by, 0.3, out_dir=str(tmp_path / "pair"))
    chain = make_chain_allocation(str(tmp_path / "list.txt"), by, [0.3, 1.0], out_dir=str(tmp_path / "chain"))
    assert [open(p).read() for p in chain["files"]] == [open(pair["files"][k]).read() for k in ("old", "new")]
    assert [os.path.basename(p) for p in chain["files"]] == [f"gldv2_train_chain_30_{by}.txt",
                                                             f"gldv2_train_chain_30-100_{by}.txt"]


def _read(path):
    return [tuple(line.split()) for line in open(path)]


def test_a_chain_of_three_by_class_nests_and_keeps_each_predecessors_labels(tmp_path):
    from advbct.data.splits import make_chain_allocation

    labels = np.random.default_rng(1).integers(0, 50, size=700)
    _write_list(tmp_path / "list.txt", labels)
    s = make_chain_allocation(str(tmp_path / "list.txt"), "class", [0.3, 0.6, 1.0])
    gens = [dict(_read(p)) for p in s["files"]]  # {image: chain label}
    np.random.seed(666)
    order = np.arange(50)
    np.random.shuffle(order)  # the release's class order: the first 15, then 30, then all 50 classes
    first = {c: 0 if k < 15 else 1 if k < 30 else 2 for k, c in enumerate(order)}
    # expected numbering: generation 1's classes 0..14 by original id, then generation 2's new ones 15..29, ...
    expected = {c: n for n, c in enumerate(sorted(range(50), key=lambda c: (first[c], c)))}
    for k, gen in enumerate(gens):
        images = {f"img/{i}.jpg" for i, l in enumerate(labels) if first[int(l)] <= k}
        assert set(gen) == images
        assert all(int(gen[f"img/{i}.jpg"]) == expected[int(labels[i])] for i in range(700) if f"img/{i}.jpg" in gen)
        n_k = len({int(v) for v in gen.values()})
        assert {int(v) for v in gen.values()} == set(range(n_k)) and n_k == [15, 30, 50][k]
    # each generation keeps its predecessor's images and labels: its old classes are exactly label < N_(k-1)
    for prev, gen in zip(gens, gens[1:]):
        assert all(gen[img] == lab for img, lab in prev.items())
        assert {img for img, lab in gen.items() if int(lab) < len(set(prev.values()))} == set(prev)


def test_a_chain_of_three_by_data_nests_the_release_shares(tmp_path):
    from advbct.data.splits import make_chain_allocation

    labels = np.random.default_rng(2).integers(0, 30, size=400)
    _write_list(tmp_path / "list.txt", labels)
    s = make_chain_allocation(str(tmp_path / "list.txt"), "data", [0.3, 0.6, 1.0])
    gens = [set(_read(p)) for p in s["files"]]
    for ratio, gen in zip((0.3, 0.6), gens):
        assert {f"img/{i}.jpg" for i in _reference_by_data(list(labels), ratio)} == {img for img, _ in gen}
    assert gens[0] <= gens[1] <= gens[2] and len(gens[2]) == 400


@pytest.mark.parametrize("ratios, message", [
    ([1.0], "a chain needs at least two generations"), ([0.6, 0.3], "expected increasing shares"),
    ([0.3, 0.3], "expected increasing shares"), ([0.3, 1.5], "expected increasing shares"),
    ([0.0, 1.0], "expected increasing shares")])
def test_a_chain_that_is_no_chain_is_refused(tmp_path, ratios, message):
    from advbct.data.splits import make_chain_allocation

    _write_list(tmp_path / "list.txt", [0, 1, 2, 3])
    with pytest.raises(UserError, match=message):
        make_chain_allocation(str(tmp_path / "list.txt"), "class", ratios)
    assert sorted(os.listdir(tmp_path)) == ["list.txt"]


def test_a_generation_without_images_is_refused_before_any_list_is_written(tmp_path):
    from advbct.data.splits import make_chain_allocation

    _write_list(tmp_path / "list.txt", [0, 1, 2, 3] * 3)  # 4 classes: 10 % of them is none
    with pytest.raises(UserError, match="--chain: generation 1 \\(share 0.1\\) gets no image of"):
        make_chain_allocation(str(tmp_path / "list.txt"), "class", [0.1, 1.0], out_dir=str(tmp_path / "out"))
    assert list((tmp_path / "out").iterdir()) == []
