"""Shared pytest fixtures: the tiny synthetic benchmark and the read-only shared data folder."""

from pathlib import Path

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
