"""The bad-input battery: every entry point, given missing, empty or garbage files, wrong types, unknown keys or
the wrong number of arguments, ends with one line naming the file or key, a non-zero exit, no traceback, and
no file changed outside a fresh output folder.

The Python entry points run in-process (``main(argv)``, stderr captured); the bash scripts in a subprocess,
for their own argument checks and one wiring case each. ``CASES`` lists them; docs/USAGE.md gives the count.
"""

import hashlib
import importlib.util
import os
import pickle
import shutil
import subprocess
import sys
from dataclasses import dataclass

import pytest
from PIL import Image

from helpers import REPO

GARBAGE = b"\x89\x00 not what it should be \xff\xfe"


@dataclass(frozen=True)
class Case:
    """``entry`` (tools/X.py, or ``pipelines``) called with ``argv`` (``{w}`` is the world folder, ``{ckpt}`` a
    valid checkpoint); the last stderr line must contain ``needle`` (``{w}`` expanded)."""

    id: str
    entry: str
    argv: tuple
    needle: str
    env: tuple = ()


def _train(*extra):
    return ("--cfg", "{w}/cfg.yml", "OUTPUT", "{w}/fresh", *extra)


CASES = [
    # tools/train.py (scripts/train_old.sh, scripts/train_new.sh)
    Case("train-missing-config", "train", ("--cfg", "{w}/missing.yml"), "config file not found: {w}/missing.yml"),
    Case("train-garbage-config", "train", ("--cfg", "{w}/garbage.yml"), "{w}/garbage.yml: not valid YAML"),
    Case("train-list-config", "train", ("--cfg", "{w}/list.yml"), "{w}/list.yml: expected a mapping"),
    Case("train-empty-config", "train", ("--cfg", "{w}/empty.yml", "OUTPUT", "{w}/fresh"), "DATA.TRAIN_LIST is empty"),
    Case("train-unknown-key", "train", _train("TRAIN.EPOCH", "3"), "unknown config key 'TRAIN.EPOCH'"),
    Case("train-wrong-type", "train", _train("TRAIN.EPOCHS", "three"), "'TRAIN.EPOCHS' expects an integer"),
    Case("train-odd-overrides", "train", _train("TRAIN.EPOCHS"), "'TRAIN.EPOCHS' has no value"),
    Case("train-missing-list", "train", _train("DATA.TRAIN_LIST", "{w}/nolist.txt"), "{w}/nolist.txt: image list not found"),
    Case("train-garbage-list", "train", _train("DATA.TRAIN_LIST", "{w}/garbage.txt"), "{w}/garbage.txt:1:"),
    Case("train-garbage-old-model", "train", _train("COMP_LOSS.TYPE", "bct", "OLD_MODEL.WEIGHTS", "{w}/garbage.pth"),
         "{w}/garbage.pth"),
    Case("train-missing-old-model", "train", _train("COMP_LOSS.TYPE", "bct", "OLD_MODEL.WEIGHTS", "{w}/none.pth"),
         "{w}/none.pth"),
    Case("train-garbage-meta", "train", _train("COMP_LOSS.TYPE", "advbct", "OLD_MODEL.WEIGHTS", "{ckpt}",
                                               "COMP_LOSS.META_PATH", "{w}/garbage.pt"), "{w}/garbage.pt"),
    Case("train-empty-meta", "train", _train("COMP_LOSS.TYPE", "advbct", "OLD_MODEL.WEIGHTS", "{ckpt}",
                                             "COMP_LOSS.META_PATH", "{w}/empty.pt"), "{w}/empty.pt"),
    Case("train-unknown-method", "train", _train("COMP_LOSS.TYPE", "magic"), "COMP_LOSS.TYPE"),
    Case("train-bt2-no-added-dims", "train", _train("COMP_LOSS.TYPE", "bt2", "COMP_LOSS.BT2_EXTRA_DIM", "0"),
         "COMP_LOSS.BT2_EXTRA_DIM 0: expected a positive number of dimensions"),
    Case("train-bt2-garbage-teacher", "train", _train("COMP_LOSS.TYPE", "bt2", "OLD_MODEL.WEIGHTS", "{ckpt}",
                                                      "COMP_LOSS.BT2_TEACHER", "{w}/garbage.pth"), "{w}/garbage.pth"),
    Case("train-bad-decode", "train", _train("DATA.DECODE", "turbo"), "DATA.DECODE 'turbo'"),
    # tools/extract_meta.py (scripts/extract_meta.sh, scripts/extract_feat.sh)
    Case("meta-missing-model", "extract_meta", ("OLD_MODEL.WEIGHTS", "{w}/none.pth", "META.TRAIN_LIST", "{w}/train.txt",
                                                "DATA.ROOT", "{w}", "COMP_LOSS.META_PATH", "{w}/fresh/meta.pt"),
         "{w}/none.pth"),
    Case("meta-garbage-model", "extract_meta", ("OLD_MODEL.WEIGHTS", "{w}/garbage.pth", "META.TRAIN_LIST",
                                                "{w}/train.txt", "DATA.ROOT", "{w}", "COMP_LOSS.META_PATH",
                                                "{w}/fresh/meta.pt"), "{w}/garbage.pth"),
    Case("meta-empty-list", "extract_meta", ("OLD_MODEL.WEIGHTS", "{ckpt}", "META.TRAIN_LIST", "{w}/empty.txt",
                                             "DATA.ROOT", "{w}", "COMP_LOSS.META_PATH", "{w}/fresh/meta.pt"),
         "{w}/empty.txt"),
    Case("meta-no-output", "extract_meta", ("OLD_MODEL.WEIGHTS", "{ckpt}", "META.TRAIN_LIST", "{w}/train.txt"),
         "COMP_LOSS.META_PATH is empty"),
    Case("meta-wrong-type", "extract_meta", ("EVAL.BATCH_SIZE", "[1]"), "'EVAL.BATCH_SIZE' expects an integer"),
    # tools/train_transformation.py (scripts/train_transformation.sh)
    Case("transform-garbage-old-model", "train_transformation", ("OLD_MODEL.WEIGHTS", "{w}/garbage.pth",
                                                                 "DATA.TRAIN_LIST", "{w}/train.txt", "DATA.ROOT",
                                                                 "{w}", "OUTPUT", "{w}/fresh"), "{w}/garbage.pth"),
    # tools/test.py (scripts/test.sh, scripts/test_old.sh)
    Case("test-missing-new-model", "test", ("NEW_MODEL.WEIGHTS", "{w}/none.pth", "EVAL.ROOT", "{w}/rev",
                                            "EVAL.SAVE_DIR", "{w}/fresh"), "{w}/none.pth"),
    Case("test-garbage-gnd", "test", ("NEW_MODEL.WEIGHTS", "{ckpt}", "EVAL.ROOT", "{w}/badrev",
                                      "EVAL.SAVE_DIR", "{w}/fresh"), "{w}/badrev/gnd_roxford5k.pkl"),
    Case("test-missing-root", "test", ("NEW_MODEL.WEIGHTS", "{ckpt}", "EVAL.ROOT", "{w}/nowhere",
                                       "EVAL.SAVE_DIR", "{w}/fresh"), "{w}/nowhere"),
    Case("test-unknown-set", "test", ("NEW_MODEL.WEIGHTS", "{ckpt}", "EVAL.DATASET", "holidays",
                                      "EVAL.SAVE_DIR", "{w}/fresh"), "holidays"),
    Case("test-garbage-old-model", "test", ("NEW_MODEL.WEIGHTS", "{ckpt}", "OLD_MODEL.WEIGHTS", "{w}/garbage.pth",
                                            "EVAL.ROOT", "{w}/rev", "EVAL.SAVE_DIR", "{w}/fresh"),
         "{w}/garbage.pth"),
    Case("test-unknown-backfill-unit", "test", ("NEW_MODEL.WEIGHTS", "{ckpt}", "OLD_MODEL.WEIGHTS", "{ckpt}",
                                                "EVAL.ROOT", "{w}/rev", "EVAL.BACKFILL", "true",
                                                "EVAL.BACKFILL_UNITS", "[image,newest]", "EVAL.SAVE_DIR", "{w}/fresh"),
         "EVAL.BACKFILL_UNITS 'newest': expected image, batch or most_changed"),
    # tools/test_generations.py (scripts/test_generations.sh)
    Case("generations-one-model", "test_generations", ("GENERATIONS.WEIGHTS", "[{ckpt}]", "EVAL.ROOT", "{w}/rev",
                                                       "EVAL.SAVE_DIR", "{w}/fresh"),
         "GENERATIONS.WEIGHTS: a chain needs at least two checkpoints"),
    Case("generations-garbage-model", "test_generations", ("GENERATIONS.WEIGHTS", "[{ckpt},{w}/garbage.pth]",
                                                           "EVAL.ROOT", "{w}/rev", "EVAL.SAVE_DIR", "{w}/fresh"),
         "{w}/garbage.pth"),
    Case("collect-generations-missing", "collect_generations", ("--method", "AdvBCT={w}/nomatrix", "--out",
                                                                "{w}/fresh/g.json"), "{w}/nomatrix/matrix.json"),
    # the other tools
    Case("synthetic-bad-preset", "make_synthetic", ("--out", "{w}/fresh", "--preset", "huge"), "--preset"),
    Case("synthetic-bad-size", "make_synthetic", ("--out", "{w}/fresh", "--image-size", "big"), "--image-size 'big'"),
    Case("synthetic-no-out", "make_synthetic", (), "--out"),
    Case("gldv2-missing-csvs", "prepare_gldv2", ("--csv-dir", "{w}/nocsv", "--out", "{w}/fresh"), "{w}/nocsv"),
    Case("gldv2-garbage-csv", "prepare_gldv2", ("--csv-dir", "{w}/badcsv", "--out", "{w}/fresh"), "{w}/badcsv"),
    Case("split-missing-list", "split_dataset", ("--list", "{w}/nolist.txt", "--by", "class", "--out-dir",
                                                 "{w}/fresh"), "{w}/nolist.txt"),
    Case("split-garbage-list", "split_dataset", ("--list", "{w}/garbage.txt", "--by", "class", "--out-dir",
                                                 "{w}/fresh"), "{w}/garbage.txt"),
    Case("split-bad-ratio", "split_dataset", ("--list", "{w}/train.txt", "--by", "class", "--ratio", "1.5",
                                              "--out-dir", "{w}/fresh"), "ratio"),
    Case("split-bad-by", "split_dataset", ("--list", "{w}/train.txt", "--by", "colour"), "--by"),
    Case("split-chain-and-ratio", "split_dataset", ("--list", "{w}/train.txt", "--by", "class", "--ratio", "0.3",
                                                    "--chain", "0.3,1.0", "--out-dir", "{w}/fresh"),
         "argument --chain: not allowed with argument --ratio"),
    Case("split-chain-of-one", "split_dataset", ("--list", "{w}/train.txt", "--by", "class", "--chain", "1.0",
                                                 "--out-dir", "{w}/fresh"), "a chain needs at least two generations"),
    Case("table-missing-json", "make_table", ("--from-json", "{w}/none.json"), "{w}/none.json"),
    Case("table-garbage-json", "make_table", ("--from-json", "{w}/garbage.json"), "{w}/garbage.json"),
    Case("table-wrong-schema", "make_table", ("--from-json", "{w}/list.json"), "{w}/list.json"),
    Case("collect-missing-dir", "collect_results", ("--independent", "{w}/noeval", "--out", "{w}/fresh/t.json"),
         "{w}/noeval"),
    Case("collect-garbage-results", "collect_results", ("--independent", "{w}/badeval", "--out",
                                                        "{w}/fresh/t.json"), "{w}/badeval"),
    Case("features-missing-npz", "evaluate_features", ("--dataset", "roxford5k", "--root", "{w}/rev", "--query",
                                                       "{w}/none.npy", "--gallery", "{w}/none.npy"), "{w}/none.npy"),
    Case("features-garbage-npz", "evaluate_features", ("--dataset", "roxford5k", "--root", "{w}/rev", "--query",
                                                       "{w}/garbage.npy", "--gallery", "{w}/garbage.npy"),
         "{w}/garbage.npy"),
    Case("features-bad-dataset", "evaluate_features", ("--dataset", "holidays", "--root", "{w}/rev", "--query",
                                                       "q", "--gallery", "g"), "--dataset"),
    Case("plot-missing-dir", "plot_backfill", ("--eval-dir", "{w}/noeval", "--out", "{w}/fresh/b"), "{w}/noeval"),
    Case("preresize-missing-src", "preresize", ("--src", "{w}/nosrc", "--dst", "{w}/fresh"), "{w}/nosrc"),
    Case("preresize-dst-in-src", "preresize", ("--src", "{w}", "--dst", "{w}/inside"), "{w}/inside"),
    Case("preresize-bad-quality", "preresize", ("--src", "{w}/rev", "--dst", "{w}/fresh", "--quality", "high"),
         "--quality"),
    Case("benchmark-unknown-suite", "benchmark", ("nosuch",), "nosuch"),
    Case("benchmark-loader-nothing", "benchmark", ("loader",), "--generate"),
    Case("gpu-check-unknown-step", "gpu_check", ("--steps", "warp"), "warp"),
    # the pipelines (scripts/demo.sh, scripts/reproduce_table.sh, scripts/reproduce_ablation.sh)
    Case("pipeline-no-command", "pipelines", (), "usage: python -m advbct.pipelines"),
    Case("pipeline-demo-argument", "pipelines", ("demo", "now"), "usage: bash scripts/demo.sh"),
    Case("pipeline-table-arguments", "pipelines", ("table", "class"), "usage: bash scripts/reproduce_table.sh"),
    Case("pipeline-table-backbone", "pipelines", ("table", "class", "r34"), "r34"),
    Case("pipeline-table-old-epoch", "pipelines", ("table", "class", "r18", "--old-epoch"), "--old-epoch needs an epoch"),
    Case("pipeline-ablation-preset", "pipelines", ("ablation", "class", "r18", "--synthetic", "huge"), "huge"),
    Case("pipeline-generations-chain-of-one", "pipelines", ("generations", "class", "--chain", "r18:1.0"),
         "--chain r18:1.0: a chain needs at least two generations"),
    Case("pipeline-generations-against", "pipelines", ("generations", "class", "--against", "first"),
         "--against first: expected previous or all"),
    Case("pipeline-generations-unknown-method", "pipelines", ("generations", "class", "--methods", "bct,magic"),
         "COMP_LOSS.TYPE 'magic'"),
    Case("pipeline-table-garbage-data", "pipelines", ("table", "class", "r18", "--synthetic", "tiny"),
         "{w}/badsynthetic/SYNTHETIC.json", env=(("DATA", "{w}/badsynthetic"),)),
]

SCRIPT_CASES = [  # bash entry points: (id, argv, needle in the one stderr line)
    ("train_old-no-config", ["scripts/train_old.sh"], "usage: bash scripts/train_old.sh"),
    ("train_new-no-config", ["scripts/train_new.sh"], "usage: bash scripts/train_new.sh"),
    ("extract_meta-no-config", ["scripts/extract_meta.sh"], "usage: bash scripts/extract_meta.sh"),
    ("train_transformation-no-config", ["scripts/train_transformation.sh"],
     "usage: bash scripts/train_transformation.sh"),
    ("test-two-arguments", ["scripts/test.sh", "landmark", "roxford5k"], "usage: bash scripts/test.sh"),
    ("test_old-no-arguments", ["scripts/test_old.sh"], "usage: bash scripts/test_old.sh"),
    ("reproduce_table-one-argument", ["scripts/reproduce_table.sh", "class"], "usage: bash scripts/reproduce_table.sh"),
    ("reproduce_ablation-bad-block", ["scripts/reproduce_ablation.sh", "class", "r34"], "r34"),
    ("demo-argument", ["scripts/demo.sh", "now"], "usage: bash scripts/demo.sh"),
    ("test_generations-two-arguments", ["scripts/test_generations.sh", "landmark", "roxford5k"],
     "usage: bash scripts/test_generations.sh"),
    ("reproduce_generations-no-argument", ["scripts/reproduce_generations.sh"],
     "usage: bash scripts/reproduce_generations.sh"),
]


@pytest.fixture(scope="module")
def world(tmp_path_factory, image_list, random_checkpoint):
    """The inputs the cases point at: good ones (a list, a checkpoint, a revisited root) and bad ones."""
    w = tmp_path_factory.mktemp("battery")
    shutil.copytree(image_list, w, dirs_exist_ok=True)  # train.txt over img/
    (w / "cfg.yml").write_text(f"DATA:\n  TRAIN_LIST: {w}/train.txt\n  ROOT: {w}\n  IMG_SIZE: 16\n  NUM_WORKERS: 0\n"
                               "MODEL:\n  PRETRAINED: false\n  EMB_DIM: 32\n")
    (w / "garbage.yml").write_text("DATA: [unclosed\n")
    (w / "list.yml").write_text("- a\n- b\n")
    (w / "empty.yml").write_text("")
    for name in ("garbage.txt", "garbage.pth", "garbage.pt", "garbage.json", "garbage.npy"):
        (w / name).write_bytes(GARBAGE)
    for name in ("empty.txt", "empty.pt"):
        (w / name).write_bytes(b"")
    (w / "list.json").write_text("[1, 2, 3]")
    ckpt = random_checkpoint(3, 32, 4)
    paths = {"ckpt": ckpt}
    (w / "rev" / "roxford5k" / "jpg").mkdir(parents=True)  # a valid revisited root: 1 query, 2 gallery images
    for name in ("q0", "g0", "g1"):
        Image.new("RGB", (16, 16), (len(name) * 40, 90, 140)).save(w / "rev" / "roxford5k" / "jpg" / f"{name}.jpg")
    with open(w / "rev" / "gnd_roxford5k.pkl", "wb") as f:
        pickle.dump({"imlist": ["g0", "g1"], "qimlist": ["q0"],
                     "gnd": [{"easy": [0], "hard": [], "junk": [1], "bbx": [0.0, 0.0, 8.0, 8.0]}]}, f, protocol=3)
    (w / "badrev").mkdir()
    (w / "badrev" / "gnd_roxford5k.pkl").write_bytes(GARBAGE)
    (w / "badcsv").mkdir()
    for name in ("train_clean.csv", "index.csv", "retrieval_solution_v2.1.csv"):
        (w / "badcsv" / name).write_bytes(GARBAGE)
    (w / "badeval").mkdir()
    (w / "badeval" / "results.json").write_bytes(GARBAGE)
    (w / "badsynthetic").mkdir()
    (w / "badsynthetic" / "SYNTHETIC.json").write_bytes(GARBAGE)
    return w, paths


def _expand(text, w, paths):
    return text.replace("{w}", str(w)).replace("{ckpt}", paths["ckpt"])


def _snapshot(root, skip):
    """{relative path: (size, sha1)} of every file under ``root`` outside ``skip`` (mtime would flag reads)."""
    out = {}
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if os.path.join(folder, d) != skip]
        for name in files:
            path = os.path.join(folder, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, root)] = (os.path.getsize(path), hashlib.sha1(f.read()).hexdigest())
    return out


def _tree(root):
    """Paths and sizes under ``root`` (the repository's output/ and data/: large, so no content hashes)."""
    return {os.path.join(d, f): os.path.getsize(os.path.join(d, f))
            for d, _, files in os.walk(root) for f in files}


_MODULES = {}


def _entry(name):
    """``main`` of tools/<name>.py (loaded once) or of advbct.pipelines."""
    if name == "pipelines":
        from advbct.pipelines.__main__ import main
        return main
    if name not in _MODULES:
        sys.path.insert(0, str(REPO / "tools"))  # tools/benchmark.py imports its suites from tools/benchmarks/
        spec = importlib.util.spec_from_file_location(f"battery_{name}", REPO / "tools" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        _MODULES[name] = module
    return _MODULES[name].main


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_python_entry_point_refuses_in_one_line(case, world, capsys, monkeypatch):
    w, paths = world
    fresh = str(w / "fresh")
    before = _snapshot(str(w), fresh)
    repo_before = _tree(REPO / "output"), _tree(REPO / "data")  # the pipelines' default folders
    monkeypatch.chdir(REPO)  # the pipelines run from the repository root; the tools anywhere
    for key, value in case.env:
        monkeypatch.setenv(key, _expand(value, w, paths))
    main = _entry(case.entry)
    capsys.readouterr()
    try:
        code = main([_expand(a, w, paths) for a in case.argv])  # the pipelines return their exit status
    except SystemExit as exc:
        code = exc.code
    err = capsys.readouterr().err
    assert isinstance(code, int) and code != 0, (code, err)
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert lines, "nothing on stderr"
    assert _expand(case.needle, w, paths) in lines[-1], lines[-1]
    assert sum(ln.startswith(("error:", "usage:")) for ln in lines) == 1, err  # one message, the last line
    assert _snapshot(str(w), fresh) == before  # nothing changed outside the fresh output folder
    assert (_tree(REPO / "output"), _tree(REPO / "data")) == repo_before
    shutil.rmtree(fresh, ignore_errors=True)


@pytest.mark.parametrize("case", SCRIPT_CASES, ids=[c[0] for c in SCRIPT_CASES])
def test_bash_entry_point_refuses_in_one_line(case):
    _, argv, needle = case
    env = {**os.environ, "PYTHON": sys.executable}
    done = subprocess.run(["bash", *argv], cwd=REPO, capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode != 0 and "Traceback" not in done.stderr, done.stderr
    lines = [ln for ln in done.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and needle in lines[0], done.stderr


def test_the_battery_covers_every_entry_point():
    """Every tool, bash script and pipeline command has at least one case here (a new entry point needs its own)."""
    tools = {p[:-3] for p in os.listdir(REPO / "tools") if p.endswith(".py")}
    assert tools <= {c.entry for c in CASES} | {"__init__"}, tools - {c.entry for c in CASES}
    scripts = {p[:-3] for p in os.listdir(REPO / "scripts") if p.endswith(".sh")} - {"run_tests", "extract_feat"}
    covered = {os.path.basename(c[1][0])[:-3] for c in SCRIPT_CASES}
    assert scripts <= covered, scripts - covered
    commands = {c.argv[0] for c in CASES if c.entry == "pipelines" and c.argv}
    assert commands == {"demo", "table", "ablation", "generations"}
    assert len(CASES) + len(SCRIPT_CASES) == BATTERY_SIZE


BATTERY_SIZE = 79  # docs/USAGE.md states it
