"""tools/collect_results.py as the user runs it (a fresh process: slow): the filled table in the paper's
schema with its P values, and one-line errors (its main in this process, with the same arguments: a fresh
Python with torch costs ~1.5 s a run)."""

import importlib.util
import json
import math
import subprocess
import sys

import pytest

from helpers import REPO, call_main, write_results


def collect_results_main():
    """tools/collect_results.py's main (guarded: one ``error:`` line and exit status 2 on a user error)."""
    spec = importlib.util.spec_from_file_location("advbct_collect_results_tool", REPO / "tools" / "collect_results.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    return tool.main


@pytest.mark.slow


def test_collect_results_tool_writes_filled_table(tmp_path, capfd):
    for name, vals in {"ind": (70.0, 5.0), "m": (69.0, 65.0)}.items():
        for ds in ("rparis6k", "roxford5k", "gldv2"):
            write_results(tmp_path / name / ds, ds, vals[0], vals[1], 60.0)
    out = tmp_path / "table.json"
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "collect_results.py"), "--independent",
                           str(tmp_path / "ind"), "--method", f"AdvBCT={tmp_path / 'm'}", "--block", "class",
                           "--out", str(out), "--criterion"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    table = json.loads(out.read_text())
    row = table["blocks"]["class"]["methods"]["AdvBCT"]
    # a = sigma((69-70)/70), b = sigma((65-60)/(70-60)) on every dataset
    a, b = 1 / (1 + math.exp(1 / 70)), 1 / (1 + math.exp(-0.5))
    assert row["P_up"] == pytest.approx(100 * a) and row["P_comp"] == pytest.approx(100 * b)
    assert row["P_1"] == pytest.approx(100 * 2 * a * b / (a + b))
    assert "holds everywhere" in proc.stdout
    proc = call_main(collect_results_main(), ["--independent", str(tmp_path / "nowhere"), "--out", str(out)], capfd)
    assert proc.returncode == 2 and "results file not found" in proc.stderr and "Traceback" not in proc.stderr


def test_collect_results_names_an_equals_sign_in_the_method_name(tmp_path, capfd):
    """'T = 0.4=DIR' splits into name 'T ' and folder ' 0.4=DIR': one line saying what is wrong."""
    folder = tmp_path / "eval"
    folder.mkdir()
    proc = call_main(collect_results_main(), ["--independent", str(folder), "--method", f"T = 0.4={folder}",
                                              "--out", str(tmp_path / "t.json")], capfd)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert "NAME must not contain '='" in proc.stderr and f"'T = 0.4={folder}'" in proc.stderr
    assert not (tmp_path / "t.json").exists()
