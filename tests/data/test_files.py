"""missing_files: one listing per folder gives exactly os.path.isfile's answer, in order."""

import os

import numpy as np

from advbct.data import files
from advbct.data.files import missing_files


def test_missing_files_equals_isfile(tmp_path, monkeypatch):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    for name in ("a/x.jpg", "a/y.jpg", "b/z.jpg"):
        (tmp_path / name).write_bytes(b"jpg")
    (tmp_path / "a" / "dir.jpg").mkdir()                                  # a folder named like an image
    os.symlink(tmp_path / "b" / "z.jpg", tmp_path / "a" / "link.jpg")     # a link to a file counts
    os.symlink(tmp_path / "gone.jpg", tmp_path / "a" / "dangling.jpg")    # a dangling link does not
    paths = [tmp_path / p for p in ("a/x.jpg", "c/w.jpg", "a/dir.jpg", "a/link.jpg", "a/dangling.jpg",
                                    "b/z.jpg", "a/Y.jpg", "a/y.jpg", "b/x.jpg")]
    listed = []
    real = files._files_in
    monkeypatch.setattr(files, "_files_in", lambda folder: listed.append(folder) or real(folder))
    got = missing_files(paths)
    want = np.array([not os.path.isfile(p) for p in paths])
    np.testing.assert_array_equal(got, want)
    assert want.tolist() == [False, True, True, False, True, False, True, False, True]
    assert sorted(listed) == sorted(str(tmp_path / d) for d in ("a", "b", "c"))  # each folder listed once


def test_relative_paths_and_empty_input(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "here.jpg").write_bytes(b"jpg")
    assert missing_files(["here.jpg", "there.jpg"]).tolist() == [False, True]
    assert missing_files([]).tolist() == []
