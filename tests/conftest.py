"""Shared pytest fixtures: the tiny synthetic benchmark, small image lists, random ResNet-18 checkpoints and their
old-class meta, the two-process training setup, the read-only shared data folder, tools/benchmark.py.

The ``scope="session"`` fixtures are built once per test run and shared by every folder under tests/: treat what
they return as read-only."""

import importlib
import importlib.util
import os
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from helpers import REPO, TRAIN_BATCH, base_overrides, run_one_process, write_image_list

MEMORY_TEMP = Path("/dev/shm")
MEMORY_TEMP_MIN_FREE = 8 * 2**30   # bytes; a full run holds up to about 2 GiB there at a time


def pytest_configure(config):
    """Temporary folders (``tmp_path``, ``tmp_path_factory``) in memory, under /dev/shm, where it is a writable
    folder with room and neither TMPDIR nor PYTEST_DEBUG_TEMPROOT names another place: every checkpoint the
    trainings write is fsynced (advbct.io), which on a disk costs more than the tiny training steps
    themselves. With ``tmp_path_retention_policy = "failed"`` (pyproject.toml) a test's folder is removed once
    it passed, and the whole run's folder once every test passed."""
    if os.environ.get("PYTEST_DEBUG_TEMPROOT") or os.environ.get("TMPDIR"):
        return
    try:
        free = shutil.disk_usage(MEMORY_TEMP).free
    except OSError:  # no /dev/shm (macOS, Windows)
        return
    if free >= MEMORY_TEMP_MIN_FREE and os.access(MEMORY_TEMP, os.W_OK | os.X_OK):
        os.environ["PYTEST_DEBUG_TEMPROOT"] = str(MEMORY_TEMP)


SELECTED = pytest.StashKey[frozenset]()


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config, items):
    """Remember the node ids of the tests this run runs (after -k, -m and --deselect have removed theirs)."""
    config.stash[SELECTED] = frozenset(item.nodeid for item in items)


@pytest.fixture(scope="session")
def selected(request):
    """The node ids of the tests this run runs: a fixture that starts several tests' runs up front (two at a
    time) starts only those of the selected tests."""
    return request.config.stash[SELECTED]


@pytest.fixture(scope="session")
def tiny_synthetic(tmp_path_factory):
    """Root of the ``tiny`` synthetic benchmark (seed 0), generated once per test run (a few seconds: its
    users are marked slow).

    Layout: ``<root>/gldv2`` (images, official CSVs, prepared lists, ``label_40.txt``),
    ``<root>/ROxfordParis`` (``gnd_roxford5k.pkl``, ``gnd_rparis6k.pkl``, ``roxford5k/jpg``,
    ``rparis6k/jpg``), ``<root>/pretrain`` and ``<root>/SYNTHETIC.json``. Treat it as read-only: other tests
    share it.
    """
    from advbct.data.synthetic import make_synthetic

    root = tmp_path_factory.mktemp("tiny_synthetic")
    make_synthetic(root, preset="tiny", seed=0)
    return root


@pytest.fixture(scope="session")
def image_list(tmp_path_factory):
    """The folder of ``helpers.write_image_list``'s default list: ``train.txt`` over ``img/``, 4 classes x 8
    PNGs of 16 px (the image list of the trainer, two-process and method-registry tests)."""
    data = tmp_path_factory.mktemp("image_list") / "data"
    write_image_list(data)
    return data


@pytest.fixture(scope="session")
def random_checkpoint(tmp_path_factory):
    """``random_checkpoint(seed, embed_dim, num_classes=0)``: the path (str) of ``{"model": state_dict}`` of a
    ResNet-18 built right after ``torch.manual_seed(seed)`` (random weights, no pretraining; no classifier
    for 0 classes). Each set of arguments is built once per test run."""
    import torch

    from advbct.models import build_model, save_checkpoint

    folder = tmp_path_factory.mktemp("random_checkpoints")
    built = {}

    def get(seed, embed_dim, num_classes=0):
        key = (seed, embed_dim, num_classes)
        if key not in built:
            torch.manual_seed(seed)
            model = build_model("resnet18", embed_dim=embed_dim, num_classes=num_classes, pretrained=False)
            path = str(folder / f"resnet18_seed{seed}_d{embed_dim}_c{num_classes}.pth")
            save_checkpoint(path, {"model": model.state_dict()})
            built[key] = path
        return built[key]

    return get


@pytest.fixture(scope="session")
def class_meta(image_list, tmp_path_factory):
    """``class_meta(checkpoint)``: the path (str) of the old-class meta (COMP_LOSS.META_PATH) that
    ``extract_meta`` computes with the ResNet-18 ``checkpoint`` over ``image_list`` at 32 px; once per
    checkpoint."""
    from advbct.config import load_config
    from advbct.engine.meta_extraction import extract_meta

    folder = tmp_path_factory.mktemp("class_meta")
    built = {}

    def get(checkpoint):
        if checkpoint not in built:
            meta = str(folder / f"meta{len(built)}.pt")
            extract_meta(load_config(None, ["OLD_MODEL.WEIGHTS", str(checkpoint), "COMP_LOSS.META_PATH", meta,
                                            "META.TRAIN_LIST", str(image_list / "train.txt"),
                                            "DATA.ROOT", str(image_list), "DATA.IMG_SIZE", "32",
                                            "EVAL.NUM_WORKERS", "0", "EVAL.BATCH_SIZE", "32"]),
                         progress=False)
            built[checkpoint] = meta
        return built[checkpoint]

    return get


@pytest.fixture(scope="session")
def ddp_setup(image_list, random_checkpoint, class_meta):
    """The two-process training comparisons' data (``image_list``), a random old model (seed 7, 32-d, 4
    classes) and its meta, and per method the COMP_LOSS overrides ('' = no compatibility loss;
    ``advbct_earlier``: AdvBCT with one more term against an earlier model, here the old model again; ``bt2``:
    its meta covers the list's 4 classes, its teacher another random model)."""
    old = random_checkpoint(7, 32, 4)
    meta = class_meta(old)
    advbct = ["COMP_LOSS.TYPE", "advbct", "OLD_MODEL.WEIGHTS", old, "COMP_LOSS.META_PATH", meta]
    comp = {"": [],
            "hot_refresh": ["COMP_LOSS.TYPE", "hot_refresh", "OLD_MODEL.WEIGHTS", old],
            "advbct": advbct,
            "advbct_earlier": advbct + ["OLD_MODEL.EARLIER_WEIGHTS", f"[{old}]",
                                        "OLD_MODEL.EARLIER_META_PATHS", f"[{meta}]"],
            "bt2": ["COMP_LOSS.TYPE", "bt2", "OLD_MODEL.WEIGHTS", old, "COMP_LOSS.META_PATH", meta,
                    "COMP_LOSS.BT2_TEACHER", random_checkpoint(8, 32, 4), "COMP_LOSS.BT2_EXTRA_DIM", "8"]}
    return {"data": image_list, "comp": comp}


@pytest.fixture(scope="session")
def advbct_one_process(ddp_setup, tmp_path_factory):
    """The reference of the two-process AdvBCT comparisons (tests/engine/test_trainer_ddp.py,
    tests/scripts/test_launch.py): one process, the whole batch, one step. ``out`` (its OUTPUT), ``history``
    (Trainer.fit's epoch means) and ``last`` (its last.pth, loaded)."""
    import torch

    out = tmp_path_factory.mktemp("advbct_one_process") / "out"
    history = run_one_process(base_overrides(ddp_setup["data"], out, TRAIN_BATCH, ddp_setup["comp"]["advbct"]))
    return {"out": out, "history": history,
            "last": torch.load(out / "last.pth", map_location="cpu", weights_only=True)}


@pytest.fixture(scope="session")
def shared_dir():
    """The project's shared reference folder (``<repo>/../shared``: PAPER.md, real gnd files)."""
    path = (REPO.parent / "shared").resolve()
    if not path.is_dir():
        pytest.skip(f"shared reference folder {path} is absent (real gnd files unavailable)")
    return path


@pytest.fixture(scope="module")
def benchmark_tools():
    """``tools/benchmark.py`` loaded as a module (``cli``) and ``suite(name)`` importing ``tools/benchmarks/<name>``."""
    import torch
    threads = torch.get_num_threads()  # the benchmark's --threads sets it process-wide: restore it after
    tools = str(REPO / "tools")
    sys.path.insert(0, tools)
    try:
        spec = importlib.util.spec_from_file_location("advbct_benchmark_cli", str(Path(tools) / "benchmark.py"))
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        yield SimpleNamespace(cli=module, suite=lambda name: importlib.import_module(f"benchmarks.{name}"))
    finally:
        sys.path.remove(tools)
        torch.set_num_threads(threads)
