"""tools/evaluate_features.py: JSON schema and values (against a loop reference), and its one-line errors, on the
tiny synthetic benchmark's ground truth (slow)."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from advbct.evaluation.protocol import load_test_set
from helpers import REPO

TOOL = REPO / "tools" / "evaluate_features.py"
KAPPAS = (1, 5, 10)

pytestmark = pytest.mark.slow


def load_tool():
    spec = importlib.util.spec_from_file_location("evaluate_features_tool", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --------------------------------------------------------------------- independent loop references


def reference_revisited(query, gallery, gnd):
    """revisitop's compute_map, one query at a time: cosine ranking, junk removed, trapezoid AP,
    mP@k with k clipped to the last positive; queries without positives skipped. Percent."""
    q = query / np.linalg.norm(query, axis=1, keepdims=True)
    g = gallery / np.linalg.norm(gallery, axis=1, keepdims=True)
    order = np.argsort(-(q.astype(np.float64) @ g.astype(np.float64).T), axis=1, kind="stable")
    out = {"mAP": {}, "mP@k": {}}
    for proto in ("easy", "medium", "hard"):
        aps, precs = [], []
        for i, entry in enumerate(gnd):
            easy, hard, junk = (set(entry[k].tolist()) for k in ("easy", "hard", "junk"))
            pos = {"easy": easy, "medium": easy | hard, "hard": hard}[proto]
            ignore = {"easy": junk | hard, "medium": junk, "hard": junk | easy}[proto]
            if not pos:
                continue
            kept = [x for x in order[i].tolist() if x not in ignore]
            ranks = [r for r, x in enumerate(kept) if x in pos]
            ap = 0.0
            for j, r in enumerate(ranks):
                p0 = 1.0 if r == 0 else j / r
                ap += (p0 + (j + 1) / (r + 1)) / 2 / len(ranks)
            aps.append(ap)
            last = ranks[-1] + 1
            precs.append([sum(r + 1 <= min(last, k) for r in ranks) / min(last, k) for k in KAPPAS])
        out["mAP"][proto] = 100 * float(np.mean(aps))
        out["mP@k"][proto] = {str(k): 100 * float(v) for k, v in zip(KAPPAS, np.mean(precs, axis=0))}
    return out


def reference_gldv2(query, gallery, gt, k=100):
    q = query / np.linalg.norm(query, axis=1, keepdims=True)
    g = gallery / np.linalg.norm(gallery, axis=1, keepdims=True)
    order = np.argsort(-(q.astype(np.float64) @ g.astype(np.float64).T), axis=1, kind="stable")[:, :k]
    aps = []
    for i, relevant in enumerate(gt):
        relevant = set(relevant.tolist())
        hits, total = 0, 0.0
        for rank, x in enumerate(order[i].tolist(), start=1):
            if x in relevant:
                hits += 1
                total += hits / rank
        aps.append(total / min(len(relevant), k))
    return 100 * float(np.mean(aps))


# ------------------------------------------------------------------------------------------ helpers


def features(tmp_path, n_query, n_gallery, dim=16, seed=0, name="f"):
    rng = np.random.default_rng(seed)
    query = rng.standard_normal((n_query, dim)).astype(np.float32)
    gallery = rng.standard_normal((n_gallery, dim)).astype(np.float32)
    qp, gp = tmp_path / f"{name}_q.npy", tmp_path / f"{name}_g.npy"
    np.save(qp, query)
    np.save(gp, gallery)
    return query, gallery, str(qp), str(gp)


@pytest.fixture(scope="module")
def rox(tiny_synthetic):
    root = str(tiny_synthetic / "ROxfordParis")
    return root, load_test_set("roxford5k", root, check_images=False)


def run_tool(argv, capsys):
    """(exit code, stdout, stderr) of the tool's main run in this process."""
    try:
        load_tool().main(argv)
        code = 0
    except SystemExit as exc:
        code = exc.code
    out = capsys.readouterr()
    return code, out.out, out.err


# -------------------------------------------------------------------------------------------- tests


def test_revisited_json_schema_and_values(rox, tmp_path, capsys):
    root, ts = rox
    query, gallery, qp, gp = features(tmp_path, len(ts.query_paths), len(ts.gallery_paths))
    out_json = tmp_path / "m.json"
    code, stdout, err = run_tool(["--dataset", "roxford5k", "--root", root, "--query", qp,
                                  "--gallery", gp, "--json", str(out_json)], capsys)
    assert code == 0, err
    result = json.loads(out_json.read_text())
    assert set(result) == {"dataset", "mAP", "mP@k"} and result["dataset"] == "roxford5k"
    assert set(result["mAP"]) == {"easy", "medium", "hard"}
    assert set(result["mP@k"]) == {"easy", "medium", "hard"}
    assert all(set(v) == {"1", "5", "10"} for v in result["mP@k"].values())
    ref = reference_revisited(query, gallery, ts.ground_truth)
    for p in ("easy", "medium", "hard"):  # numbers in percent, equal to the loop reference
        assert result["mAP"][p] == pytest.approx(ref["mAP"][p], abs=1e-6)
        assert result["mP@k"][p] == pytest.approx(ref["mP@k"][p], abs=1e-6)
    assert ref["mAP"]["medium"] > 1.0  # percent, not a fraction
    m = result["mAP"]
    assert f"mAP  E {m['easy']:.2f}  M {m['medium']:.2f}  H {m['hard']:.2f}" in stdout


def test_gldv2_json_schema_and_value(tiny_synthetic, tmp_path, capsys):
    root = str(tiny_synthetic / "gldv2")
    ts = load_test_set("gldv2", root, check_images=False)
    query, gallery, qp, gp = features(tmp_path, len(ts.query_paths), len(ts.gallery_paths), seed=1)
    # make some queries find their relevant images, so the value is far from 0
    for i in range(0, len(ts.ground_truth), 2):
        query[i] = gallery[ts.ground_truth[i]].mean(0)
    np.save(qp, query)
    out_json = tmp_path / "g.json"
    code, stdout, err = run_tool(["--dataset", "gldv2", "--root", root, "--query", qp, "--gallery", gp,
                                  "--json", str(out_json)], capsys)
    assert code == 0, err
    result = json.loads(out_json.read_text())
    assert set(result) == {"dataset", "mAP@100"} and result["dataset"] == "gldv2"
    ref = reference_gldv2(query, gallery, ts.ground_truth)
    assert ref > 10.0  # far above chance
    assert result["mAP@100"] == pytest.approx(ref, abs=1e-6)
    assert f"mAP@100 {ref:.2f}" in stdout


@pytest.mark.parametrize("case", ["rows", "dims", "nan", "missing", "not_npy", "npz"])
def test_bad_features_exit_2_with_one_line(rox, tmp_path, capsys, case):
    root, ts = rox
    nq, ng = len(ts.query_paths), len(ts.gallery_paths)
    query, gallery, qp, gp = features(tmp_path, nq, ng)
    if case == "rows":
        np.save(qp, query[:-1])
        expected = [qp, f"query features have {nq - 1} rows but roxford5k has {nq} query images"]
    elif case == "dims":
        np.save(gp, gallery[:, :8])
        expected = [gp, "query features are 16-d but gallery features 8-d"]
    elif case == "nan":
        gallery[3, 1] = np.nan
        np.save(gp, gallery)
        expected = [gp, "gallery features contain NaN"]
    elif case == "missing":
        qp = str(tmp_path / "absent.npy")
        expected = [qp, "not found"]
    elif case == "npz":
        with open(qp, "wb") as f:
            np.savez(f, query=query)
        expected = [qp, "not a .npy array"]
    else:
        Path(qp).write_text("not an array")
        expected = [qp, "not a .npy array"]
    code, stdout, err = run_tool(["--dataset", "roxford5k", "--root", root, "--query", qp, "--gallery", gp],
                                 capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for text in expected:
        assert text in lines[0]
    assert stdout == ""


def test_entry_point_runs_without_pythonpath(rox, tmp_path):
    """The real command line from another directory, clean environment: exit 2, one line, no traceback."""
    root, ts = rox
    query, gallery, qp, gp = features(tmp_path, len(ts.query_paths), len(ts.gallery_paths))
    query[0, 0] = np.inf
    np.save(qp, query)
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": os.environ.get("HOME", str(tmp_path))}
    proc = subprocess.run([sys.executable, str(TOOL), "--dataset", "roxford5k", "--root", root,
                           "--query", qp, "--gallery", gp], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"error: --query {qp}, --gallery {gp}: query features contain NaN or inf"]
