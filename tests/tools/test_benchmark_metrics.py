"""tools/benchmarks/metrics.py reads gnd_*.pkl with the restricted unpickler: a tampered file is refused and
runs nothing, a real-format file (lists, or numpy arrays) is used."""

import os
import pickle
from types import SimpleNamespace

import numpy as np
import pytest

from advbct.errors import UserError


class _Tampered:
    """Unpickles as a call of os.system: it would create ``marker``."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _real_format_gnd(path, n_query, n_gallery, arrays=False):
    """A gnd file shaped as the revisited release's: ``gnd`` (per query bbx/easy/hard/junk), imlist, qimlist."""
    rng = np.random.default_rng(0)
    gnd = []
    for _ in range(n_query):
        ids = rng.choice(n_gallery, size=12, replace=False)
        lists = {"easy": ids[:5], "hard": ids[5:9], "junk": ids[9:]}
        gnd.append({"bbx": [1.0, 2.0, 30.0, 40.0],
                    **{k: (v if arrays else v.tolist()) for k, v in lists.items()}})
    with open(path, "wb") as f:
        pickle.dump({"gnd": gnd, "imlist": [f"g{i}" for i in range(n_gallery)],
                     "qimlist": [f"q{i}" for i in range(n_query)]}, f, protocol=2 if arrays else 3)
    return gnd


def test_a_tampered_gnd_file_is_refused_and_runs_nothing(benchmark_tools, tmp_path, capsys):
    metrics = benchmark_tools.suite("metrics")
    marker = tmp_path / "ran"
    (tmp_path / "gnd_roxford5k.pkl").write_bytes(pickle.dumps({"gnd": [_Tampered(marker)] * 70}))
    with pytest.raises(UserError, match=r"gnd_roxford5k\.pkl: refused to unpickle global '(posix|nt|os)\.system'"):
        metrics._load_gnd(str(tmp_path), "roxford5k", 70, 4993)
    assert not marker.exists()
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:  # the command line: one line, exit 2
        benchmark_tools.cli.main(["metrics", "--gnd-dir", str(tmp_path), "--repeats", "1"])
    err = capsys.readouterr().err
    assert info.value.code == 2 and len(err.splitlines()) == 1 and err.startswith("error: ")
    assert "refused to unpickle global" in err and not marker.exists()


@pytest.mark.parametrize("arrays", [False, True], ids=["lists", "numpy"])
def test_a_real_format_gnd_file_is_used(benchmark_tools, tmp_path, arrays):
    metrics = benchmark_tools.suite("metrics")
    (tmp_path / "roxford5k").mkdir()
    path = tmp_path / "roxford5k" / "gnd_roxford5k.pkl"  # the <name>/gnd_<name>.pkl layout
    written = _real_format_gnd(path, 70, 4993, arrays)
    gnd, source = metrics._load_gnd(str(tmp_path), "roxford5k", 70, 4993)
    assert source == str(path) and len(gnd) == 70
    assert [list(g["easy"]) for g in gnd] == [list(g["easy"]) for g in written]
    assert metrics._load_gnd(str(tmp_path), "rparis6k", 70, 6322) == (None, None)  # absent: random
    report = metrics.run(SimpleNamespace(repeats=1, gnd_dir=str(tmp_path), seed=0))
    assert report["results"]["roxford5k"]["gnd"] == str(path)
    assert report["results"]["rparis6k"]["gnd"] == "random"


def test_the_released_gnd_files_load(benchmark_tools, shared_dir):
    metrics = benchmark_tools.suite("metrics")
    folder = shared_dir / "data" / "revisited"
    for name, n_query, n_gallery in metrics.SHAPES:
        if not (folder / f"gnd_{name}.pkl").is_file():
            pytest.skip(f"{folder}/gnd_{name}.pkl is absent")
        gnd, source = metrics._load_gnd(str(folder), name, n_query, n_gallery)
        assert source == str(folder / f"gnd_{name}.pkl") and len(gnd) == n_query
        assert {"easy", "hard", "junk"} <= set(gnd[0])
