"""advbct.io, the one atomic-write helper: a complete file on success; on a failing writer the old file intact
and no temporary file left; the exact bytes of the callers' formats; the package's writers going through it."""

import importlib.util
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from advbct import io as aio
from advbct.config import load_config, save_config
from advbct.data import splits
from advbct.evaluation import feature_cache
from advbct.meta import ClassMeta, export_original_json, load_meta, save_meta
from advbct.models import load_checkpoint, save_checkpoint

REPO = Path(__file__).resolve().parent.parent


def _listing(folder):
    return sorted(os.listdir(folder))


# ------------------------------------------------------------------------------------------ the helper
def test_write_text_atomic_writes_the_whole_text_and_leaves_nothing_else(tmp_path):
    path = tmp_path / "a.txt"
    text = "".join(f"line {i} φ\n" for i in range(10000))
    aio.write_text_atomic(path, text)
    assert path.read_bytes() == text.encode("utf-8")
    assert _listing(tmp_path) == ["a.txt"]
    aio.write_text_atomic(path, "second\n")  # replaces an existing file
    assert path.read_text(encoding="utf-8") == "second\n"
    assert _listing(tmp_path) == ["a.txt"]


def test_write_json_atomic_bytes(tmp_path):
    path = tmp_path / "r.json"
    aio.write_json_atomic(path, {"a": [1.5, "φ"], "b": None})
    assert path.read_bytes() == '{\n "a": [\n  1.5,\n  "φ"\n ],\n "b": null\n}\n'.encode("utf-8")


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_failing_writer_leaves_the_old_file_and_no_temporary(tmp_path, error):
    path = tmp_path / "out.json"
    path.write_text("old content\n")
    with pytest.raises(error):
        with aio.atomic_open(path) as handle:
            handle.write("half of the new con")
            handle.flush()
            raise error("writer failed")
    assert path.read_text() == "old content\n"
    assert _listing(tmp_path) == ["out.json"]


def test_failing_json_dump_after_a_partial_write(tmp_path):
    path = tmp_path / "r.json"
    aio.write_json_atomic(path, {"kept": 1})
    before = path.read_bytes()
    with pytest.raises(TypeError):  # json.dump has written the first entries when it meets the object
        aio.write_json_atomic(path, {"a": list(range(1000)), "b": object()})
    assert path.read_bytes() == before
    assert _listing(tmp_path) == ["r.json"]


def test_failing_writer_creates_no_destination(tmp_path):
    with pytest.raises(ValueError):
        with aio.atomic_path(tmp_path / "new.bin") as tmp:
            Path(tmp).write_bytes(b"partial")
            raise ValueError("no")
    assert _listing(tmp_path) == []


def test_destination_changes_only_when_the_block_ends(tmp_path):
    path = tmp_path / "f.txt"
    path.write_text("old")
    with aio.atomic_open(path) as handle:
        handle.write("new")
        handle.flush()
        assert path.read_text() == "old"  # a reader meanwhile sees the old file
        [tmp] = [name for name in _listing(tmp_path) if name != "f.txt"]
        assert tmp.startswith(".f.txt.") and tmp.endswith(".tmp")  # hidden, in the destination's folder
    assert path.read_text() == "new"
    assert _listing(tmp_path) == ["f.txt"]


def test_temporary_names_are_unique(tmp_path):
    with aio.atomic_path(tmp_path / "x") as first, aio.atomic_path(tmp_path / "x") as second:
        assert first != second
        assert os.path.dirname(first) == os.path.dirname(second) == str(tmp_path)
        Path(first).write_text("1")
        Path(second).write_text("2")
    assert (tmp_path / "x").read_text() == "1"  # the outer block ends last
    assert _listing(tmp_path) == ["x"]


def test_binary_mode_and_no_fsync(tmp_path):
    path = tmp_path / "b.bin"
    with aio.atomic_open(path, "wb", fsync=False) as handle:
        handle.write(bytes(range(256)))
    assert path.read_bytes() == bytes(range(256))
    with aio.atomic_open(tmp_path / "s.txt", errors="surrogateescape") as handle:
        handle.write("caf\udce9\n")  # a byte that was not UTF-8, kept as it was
    assert (tmp_path / "s.txt").read_bytes() == b"caf\xe9\n"
    with pytest.raises(ValueError, match="mode"):
        with aio.atomic_open(path, "a"):
            pass
    assert path.read_bytes() == bytes(range(256))


def test_parent_folders(tmp_path):
    nested = tmp_path / "a" / "b" / "c.txt"
    aio.write_text_atomic(nested, "x")
    assert nested.read_text() == "x"
    with pytest.raises(FileNotFoundError):
        with aio.atomic_open(tmp_path / "missing" / "d.txt", makedirs=False) as handle:
            handle.write("x")
    assert not (tmp_path / "missing").exists()


def test_file_mode_is_that_of_a_plain_open(tmp_path):
    plain = tmp_path / "plain"
    plain.write_text("x")
    aio.write_text_atomic(tmp_path / "atomic", "x")
    assert (tmp_path / "atomic").stat().st_mode == plain.stat().st_mode


# -------------------------------------------------------------------------- the package's writers
def _fail_after_partial_write(*args, **kwargs):
    """Stands in for torch.save / np.savez / yaml.safe_dump: writes a few bytes to the file, then fails."""
    for target in args:
        if hasattr(target, "write"):
            target.write(b"partial" if "b" in target.mode else "partial")
            target.flush()
            break
    else:
        raise AssertionError("the writer was not given an open file")
    raise OSError("disk full")


def _meta():
    return ClassMeta(centers=torch.eye(3, 4), r_max=torch.ones(3), r_min=torch.zeros(3),
                     counts=torch.full((3,), 4), n_kept=torch.full((3,), 4), theta_max=torch.ones(3))


def test_save_config_failure_keeps_the_old_file(tmp_path, monkeypatch):
    cfg = load_config(str(REPO / "configs" / "test_model.yml"), [])
    path = tmp_path / "config.yml"
    save_config(cfg, path)
    before = path.read_bytes()
    monkeypatch.setattr("yaml.safe_dump", lambda data, stream, **kw: _fail_after_partial_write(data, stream))
    with pytest.raises(OSError, match="disk full"):
        save_config(cfg, path)
    assert path.read_bytes() == before
    assert _listing(tmp_path) == ["config.yml"]


def test_save_meta_and_checkpoint_failures_keep_the_old_files(tmp_path, monkeypatch):
    meta_path, ckpt_path = tmp_path / "meta.pt", tmp_path / "ckpt.pth"
    save_meta(meta_path, _meta())
    save_checkpoint(ckpt_path, {"model": {"w": torch.ones(2)}, "epoch": 1})
    before = {p: p.read_bytes() for p in (meta_path, ckpt_path)}
    monkeypatch.setattr(torch, "save", _fail_after_partial_write)
    with pytest.raises(OSError, match="disk full"):
        save_meta(meta_path, _meta())
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(ckpt_path, {"model": {"w": torch.zeros(2)}, "epoch": 2})
    monkeypatch.undo()
    assert {p: p.read_bytes() for p in before} == before
    assert _listing(tmp_path) == ["ckpt.pth", "meta.pt"]
    assert torch.equal(load_meta(meta_path).centers, torch.eye(3, 4))
    assert load_checkpoint(ckpt_path)["epoch"] == 1


def test_save_meta_is_deterministic(tmp_path):
    """Written through a handle, the .pt file's bytes no longer depend on a temporary file's name."""
    save_meta(tmp_path / "a.pt", _meta())
    save_meta(tmp_path / "b.pt", _meta())
    assert (tmp_path / "a.pt").read_bytes() == (tmp_path / "b.pt").read_bytes()
    export_original_json(_meta(), tmp_path / "m.json")
    assert json.loads((tmp_path / "m.json").read_text())["0"]["center"] == [1.0, 0.0, 0.0, 0.0]
    assert _listing(tmp_path) == ["a.pt", "b.pt", "m.json"]


def test_feature_cache_failure_keeps_the_old_entry(tmp_path, monkeypatch):
    key = "k" * 64
    path = feature_cache.save(tmp_path, "roxford5k", key, np.ones((2, 3)), np.zeros((4, 3)))
    before = Path(path).read_bytes()
    monkeypatch.setattr(np, "savez", _fail_after_partial_write)
    with pytest.raises(OSError, match="disk full"):
        feature_cache.save(tmp_path, "roxford5k", key, np.zeros((2, 3)), np.ones((4, 3)))
    monkeypatch.undo()
    assert Path(path).read_bytes() == before
    assert _listing(tmp_path) == [os.path.basename(path)]


def test_split_list_failure_keeps_the_old_list(tmp_path):
    path = tmp_path / "list.txt"
    splits._write_list(path, ["a.jpg", "é.jpg"], [0, 1])
    assert path.read_bytes() == "a.jpg 0\né.jpg 1\n".encode("utf-8")
    with pytest.raises(ValueError):
        splits._write_list(path, ["a.jpg", "b.jpg"], [0, "not a label"])
    assert path.read_bytes() == "a.jpg 0\né.jpg 1\n".encode("utf-8")
    assert _listing(tmp_path) == ["list.txt"]


def test_gpu_check_report_failure_keeps_the_old_report(tmp_path):
    spec = importlib.util.spec_from_file_location("advbct_gpu_check_io", REPO / "tools" / "gpu_check.py")
    gc = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gc)
    path = str(tmp_path / "out" / "gpu_check.json")
    gc.write_json(path, {"status": "ok", "x": [1, "φ"]})  # creates the folder
    before = Path(path).read_bytes()
    assert before == b'{\n "status": "ok",\n "x": [\n  1,\n  "\\u03c6"\n ]\n}'
    with pytest.raises(TypeError):
        gc.write_json(path, {"status": "failed", "x": object()})
    assert Path(path).read_bytes() == before
    assert _listing(tmp_path / "out") == ["gpu_check.json"]


def test_no_other_atomic_write_remains():
    """Every ``os.replace`` of the package and tools is the helper's."""
    sources = sorted((REPO / "advbct").rglob("*.py")) + sorted((REPO / "tools").rglob("*.py"))
    users = [str(p.relative_to(REPO)) for p in sources if "os.replace(" in p.read_text(encoding="utf-8")]
    assert users == ["advbct/io.py"]
