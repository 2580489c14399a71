"""Evaluation outputs stay whole and errors name their cause: one evaluation at a time writes an EVAL.SAVE_DIR,
results.json always comes with the config.yaml of its own run, NaN features name the model that made them and
never reach the old-feature cache."""

import fcntl
import importlib.util
import json
import os

import numpy as np
import pytest
import yaml

from advbct.config import load_config
from advbct.errors import UserError
from advbct.evaluation import evaluate, protocol
from advbct.evaluation.protocol import load_test_set
from helpers import REPO

IMG = 16


def _cfg(root, save_dir, new, *extra):
    return load_config(None, ["NEW_MODEL.WEIGHTS", str(new), "EVAL.DATASET", "roxford5k", "EVAL.ROOT", str(root),
                              "EVAL.IMG_SIZE", str(IMG), "EVAL.NUM_WORKERS", "0", "EVAL.BATCH_SIZE", "64",
                              "EVAL.SAVE_DIR", str(save_dir), *extra])


def _test_tool(argv, capsys):
    """tools/test.py's main in this process: (exit code, stdout, stderr)."""
    spec = importlib.util.spec_from_file_location("advbct_test_tool", REPO / "tools" / "test.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    capsys.readouterr()
    try:
        tool.main(argv)
        code = 0
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


# ------------------------------------------------------------------------- one evaluation per SAVE_DIR
@pytest.mark.slow
def test_a_second_evaluation_into_the_same_save_dir_is_refused(tiny_synthetic, random_checkpoint, tmp_path,
                                                               monkeypatch):
    """A second evaluation started while the first is embedding is refused before it loads anything; the
    first one's results.json and config.yaml are then both its own, and no lock file stays behind."""
    root, save = tiny_synthetic / "ROxfordParis", tmp_path / "eval"
    mine, other = random_checkpoint(0, 16), random_checkpoint(1, 16)
    refusals = []
    real = evaluate.evaluate_models

    def evaluate_while_another_starts(*args, **kwargs):
        if not refusals:  # once: the first run, mid-way
            refusals.append(None)
            with pytest.raises(UserError) as info:
                evaluate.run_evaluation(_cfg(root, save, other))
            refusals[0] = str(info.value)
        return real(*args, **kwargs)

    monkeypatch.setattr(evaluate, "evaluate_models", evaluate_while_another_starts)
    (result,) = evaluate.run_evaluation(_cfg(root, save, mine))
    assert refusals == [f"EVAL.SAVE_DIR {save}: another evaluation is writing there now (pid {os.getpid()})"]
    assert sorted(os.listdir(save)) == ["config.yaml", "results.json"]
    written = json.loads((save / "results.json").read_text())
    assert written == json.loads(json.dumps(result)) and written["new_model"]["weights"] == mine
    assert yaml.safe_load((save / "config.yaml").read_text())["NEW_MODEL"]["WEIGHTS"] == mine


def test_a_held_save_dir_refuses_test_py_in_one_line(tmp_path, capsys):
    """tools/test.py into a SAVE_DIR whose lock another process holds: exit 2, one line naming the
    directory and the holder's pid; the files there are untouched."""
    save = tmp_path / "eval"
    save.mkdir()
    (save / "results.json").write_text('{"dataset": "roxford5k"}\n')
    (save / "config.yaml").write_text("EVAL: {DATASET: roxford5k}\n")
    before = {p.name: p.read_bytes() for p in save.iterdir()}
    with open(save / ".evaluation.lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        held.write("4242\n")
        held.flush()
        code, out, err = _test_tool(["NEW_MODEL.WEIGHTS", "absent.pth", "EVAL.ROOT", str(tmp_path / "nowhere"),
                                     "EVAL.SAVE_DIR", str(save)], capsys)
    assert code == 2 and out == ""
    assert err.splitlines() == [f"error: EVAL.SAVE_DIR {save}: another evaluation is writing there now (pid 4242)"]
    assert {p.name: p.read_bytes() for p in save.iterdir() if p.name != ".evaluation.lock"} == before


def test_a_refused_evaluation_leaves_no_save_dir_behind(tmp_path, capsys):
    code, _, err = _test_tool(["NEW_MODEL.WEIGHTS", "absent.pth", "EVAL.ROOT", str(tmp_path / "nowhere"),
                               "EVAL.SAVE_DIR", str(tmp_path / "out" / "eval")], capsys)
    assert code == 2 and len(err.splitlines()) == 1 and str(tmp_path / "nowhere") in err
    assert os.listdir(tmp_path) == []


def test_results_json_never_outlives_its_config(tmp_path, monkeypatch):
    """config.yaml is written before results.json and an older results.json removed first: a run that
    dies in between leaves a config.yaml and no results.json, never the previous run's results beside it."""
    cfg_a, cfg_b = (_cfg("root", tmp_path, name) for name in ("a.pth", "b.pth"))
    evaluate.write_results(str(tmp_path), cfg_a, {"dataset": "roxford5k", "run": "a"})

    def dies(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(evaluate, "write_json_atomic", dies)
    with pytest.raises(OSError):
        evaluate.write_results(str(tmp_path), cfg_b, {"dataset": "roxford5k", "run": "b"})
    assert sorted(os.listdir(tmp_path)) == ["config.yaml"]
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["NEW_MODEL"]["WEIGHTS"] == "b.pth"


# ----------------------------------------------------------------------------- non-finite features
def test_nan_features_name_the_model_and_its_checkpoint():
    ts = protocol.TestSet("roxford5k", ["q.jpg"] * 3, ["g.jpg"] * 5, [{}] * 3)
    query, gallery = np.ones((3, 4), np.float32), np.ones((5, 4), np.float32)
    gallery[[1, 4], 2] = np.inf
    with pytest.raises(UserError) as info:
        protocol.check_model_features(ts, query, gallery, "old", "/ckpt/old.pth")
    assert str(info.value) == "the old model (OLD_MODEL.WEIGHTS /ckpt/old.pth): gallery features contain NaN or inf"
    query[0, 0] = np.nan
    with pytest.raises(UserError, match=r"^the new model: query features contain NaN or inf$"):
        protocol.check_model_features(ts, query, gallery, "new")


@pytest.mark.slow
def test_nan_old_features_are_refused_before_the_cache_is_written(tiny_synthetic, random_checkpoint, tmp_path,
                                                                  monkeypatch):
    root = tiny_synthetic / "ROxfordParis"
    ts = load_test_set("roxford5k", str(root))
    old = random_checkpoint(1, 16)
    cfg = _cfg(root, tmp_path / "eval", random_checkpoint(0, 16), "OLD_MODEL.WEIGHTS", old,
               "EVAL.OLD_FEATURES_CACHE", str(tmp_path / "cache"))
    nq, ng = len(ts.query_paths), len(ts.gallery_paths)

    def nan_embedding(model, test_set, cfg, progress=True, tag="model"):
        gallery = np.zeros((ng, 16), np.float32)
        gallery[3] = np.nan
        return np.zeros((nq, 16), np.float32), gallery

    monkeypatch.setattr(protocol, "embed_test_set", nan_embedding)
    with pytest.raises(UserError) as info:
        protocol.embed_old_test_set(None, ts, cfg, progress=False)
    assert str(info.value) == f"the old model (OLD_MODEL.WEIGHTS {old}): gallery features contain NaN or inf"
    assert not (tmp_path / "cache").exists() or os.listdir(tmp_path / "cache") == []
