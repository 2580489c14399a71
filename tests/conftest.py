"""Shared pytest fixtures: the tiny synthetic benchmark, the read-only shared data folder, tools/benchmark.py."""

import importlib
import importlib.util
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def tiny_synthetic(tmp_path_factory):
    """Root of the ``tiny`` synthetic benchmark (seed 0), generated once per test session.

    Layout: ``<root>/gldv2`` (images, official CSVs, prepared lists, ``label_40.txt``),
    ``<root>/ROxfordParis`` (``gnd_roxford5k.pkl``, ``gnd_rparis6k.pkl``, ``roxford5k/jpg``,
    ``rparis6k/jpg``) and ``<root>/SYNTHETIC.json``. Treat it as read-only: other tests share it.
    """
    from advbct.data.synthetic import make_synthetic

    root = tmp_path_factory.mktemp("tiny_synthetic")
    make_synthetic(root, preset="tiny", seed=0)
    return root


@pytest.fixture(scope="session")
def shared_dir():
    """The project's shared reference folder (``<repo>/../shared``: PAPER.md, real gnd files)."""
    path = (REPO_ROOT.parent / "shared").resolve()
    if not path.is_dir():
        pytest.skip(f"shared reference folder {path} is absent (real gnd files unavailable)")
    return path


@pytest.fixture(scope="module")
def benchmark_tools():
    """``tools/benchmark.py`` loaded as a module (``cli``) and ``suite(name)`` importing ``tools/benchmarks/<name>``."""
    import torch
    threads = torch.get_num_threads()  # the benchmark's --threads sets it process-wide: restore it after
    tools = str(REPO_ROOT / "tools")
    sys.path.insert(0, tools)
    try:
        spec = importlib.util.spec_from_file_location("advbct_benchmark_cli", str(Path(tools) / "benchmark.py"))
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        yield SimpleNamespace(cli=module, suite=lambda name: importlib.import_module(f"benchmarks.{name}"))
    finally:
        sys.path.remove(tools)
        torch.set_num_threads(threads)
