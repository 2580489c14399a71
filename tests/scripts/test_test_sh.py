"""scripts/test.sh end to end on the tiny synthetic sets, checked against an in-process recomputation,
and its answers to bad input (exit 2, one line on stderr, no traceback, the culprit named). All are slow.

scripts/test.sh and scripts/test_old.sh run in fresh processes (one roxford5k run of each, shared by the tests
that read it); the references of the several-sets run and most refusals call the command line test.sh execs
(``tools/test.py``'s main with the same arguments) in this process, which saves a Python start with torch and
two model loads a run and checks the same results, exit status and line."""

import importlib.util
import json
import os
import re
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch

from advbct.config import load_config
from advbct.data.decoding import ImageInput
from advbct.evaluation.features import extract_features
from advbct.evaluation.protocol import image_datasets, load_test_set
from advbct.models import load_trained_model
from helpers import REPO, call_main

SCRIPT = REPO / "scripts" / "test.sh"
IMG, BATCH = 32, 64
FAST = ["EVAL.IMG_SIZE", str(IMG), "EVAL.NUM_WORKERS", "0", "EVAL.BATCH_SIZE", str(BATCH)]
SECTIONS = ("self_test", "cross_test", "old_self_test")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ckpts(random_checkpoint):
    """Random ResNet-18 models: ``new`` and ``old`` embed to 32 dims (different seeds), ``d16`` to 16."""
    return {"new": random_checkpoint(0, 32), "old": random_checkpoint(1, 32), "d16": random_checkpoint(2, 16)}


def script_argv(dataset, root, new, old, save_dir, *extra):
    """The arguments scripts/test.sh passes to tools/test.py (its default architectures, resnet18)."""
    return ["--cfg", str(REPO / "configs" / "test_model.yml"), "NEW_MODEL.ARCH", "resnet18", "NEW_MODEL.WEIGHTS",
            str(new), "OLD_MODEL.ARCH", "resnet18", "OLD_MODEL.WEIGHTS", str(old), "EVAL.DATASET_TYPE", "landmark",
            "EVAL.DATASET", dataset, "EVAL.ROOT", str(root), *FAST, "EVAL.SAVE_DIR", str(save_dir), *extra]


def load_test_tool():
    """tools/test.py loaded as a module (its ``main(argv)`` is what scripts/test.sh runs)."""
    spec = importlib.util.spec_from_file_location("advbct_test_tool", REPO / "tools" / "test.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    return tool


def run_test_py(dataset, root, new, old, save_dir, *extra, cwd, monkeypatch, capfd, one_core=False):
    """What ``run_test_sh`` runs, one process on the CPU, called in this process from ``cwd``: tools/test.py's
    main with test.sh's arguments (``one_core``: one torch thread, as OMP_NUM_THREADS=1 gives the script)."""
    monkeypatch.chdir(cwd)
    threads = torch.get_num_threads()
    if one_core:
        torch.set_num_threads(1)
    try:
        return call_main(load_test_tool().main, script_argv(dataset, root, new, old, save_dir, *extra), capfd)
    finally:
        torch.set_num_threads(threads)


def run_test_sh(dataset, root, new, old, save_dir, *extra, cwd, ngpus=None, script=SCRIPT, one_core=False):
    """scripts/test.sh (or ``script``) with a clean environment (PATH and HOME only, no PYTHONPATH) from
    ``cwd``; ``new`` None leaves NEW_MODEL_PATH unset; ``one_core``: OMP_NUM_THREADS=1 too, for runs side by
    side."""
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": os.environ.get("HOME", str(cwd)),
           "OLD_MODEL_PATH": str(old)}
    if one_core:
        env["OMP_NUM_THREADS"] = "1"
    if new is not None:
        env["NEW_MODEL_PATH"] = str(new)
    if ngpus:
        env["NGPUS"] = str(ngpus)
        env["CUDA_VISIBLE_DEVICES"] = ""  # several CPU processes (gloo), whatever GPUs the machine has
    cmd = ["bash", str(script), "landmark", dataset, str(root), *FAST, "EVAL.SAVE_DIR", str(save_dir), *extra]
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, timeout=300)
    # decoded by hand: text=True would turn the progress bars' carriage returns into newlines
    return subprocess.CompletedProcess(proc.args, proc.returncode, proc.stdout.decode(errors="replace"),
                                       proc.stderr.decode(errors="replace"))


def visible_lines(text):
    """What a terminal shows: per line the text after the last carriage return (progress bars that
    tqdm erases leave nothing), blank lines dropped."""
    return [line.split("\r")[-1] for line in text.split("\n") if line.split("\r")[-1].strip()]


def evaluate_saved(dataset, root, query, gallery, tmp_path, tag):
    """Metrics of ``tools/evaluate_features.py`` on features saved as .npy."""
    spec = importlib.util.spec_from_file_location("evaluate_features_tool", REPO / "tools" / "evaluate_features.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    qp, gp, out = (str(tmp_path / f"{tag}_{n}") for n in ("q.npy", "g.npy", "m.json"))
    np.save(qp, query)
    np.save(gp, gallery)
    tool.main(["--dataset", dataset, "--root", str(root), "--query", qp, "--gallery", gp, "--json", out])
    return json.loads(Path(out).read_text())


def recompute(dataset, root, ckpts, tmp_path):
    """Self, cross and old self-test recomputed here: our own extraction, then evaluate_features.py."""
    ts = load_test_set(dataset, str(root))
    q_ds, g_ds = image_datasets(ts, ImageInput(IMG))
    device = "cuda" if torch.cuda.is_available() else "cpu"  # the device test.sh uses
    feats = {}
    for name in ("new", "old"):
        model = load_trained_model("resnet18", ckpts[name], name, device=device)
        feats[name] = [extract_features(model, ds, batch_size=BATCH, num_workers=0, progress=False).numpy()
                       for ds in (q_ds, g_ds)]
    return {"self_test": evaluate_saved(dataset, root, feats["new"][0], feats["new"][1], tmp_path, "self"),
            "cross_test": evaluate_saved(dataset, root, feats["new"][0], feats["old"][1], tmp_path, "cross"),
            "old_self_test": evaluate_saved(dataset, root, feats["old"][0], feats["old"][1], tmp_path, "old")}


def flat(metrics):
    """``{"mAP.medium": x, "mP@k.easy.5": y, ...}`` of the numbers evaluate_features.py reports."""
    out = {}
    for key, value in metrics.items():
        if key in ("mAP", "mP@k", "mAP@100"):
            if isinstance(value, dict):
                for k, v in value.items():
                    if isinstance(v, dict):
                        out.update({f"{key}.{k}.{kk}": vv for kk, vv in v.items()})
                    else:
                        out[f"{key}.{k}"] = v
            else:
                out[key] = value
    return out


# ------------------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def roxford_runs(tiny_synthetic, ckpts, tmp_path_factory):
    """scripts/test.sh on roxford5k (new against old) and scripts/test_old.sh (old alone), side by side on one
    core each: ``{"both": (proc, its EVAL.SAVE_DIR), "old": ...}``, read by the recomputation test and the
    test_old.sh test."""
    folder = tmp_path_factory.mktemp("roxford_runs")
    root = tiny_synthetic / "ROxfordParis"
    with ThreadPoolExecutor(max_workers=2) as pool:   # both scripts at once, one core each
        both = pool.submit(run_test_sh, "roxford5k", root, ckpts["new"], ckpts["old"], folder / "both",
                           cwd=folder, one_core=True)
        alone = pool.submit(run_test_sh, "roxford5k", root, None, ckpts["old"], folder / "old", cwd=folder,
                            script=REPO / "scripts" / "test_old.sh", one_core=True)
        return {"both": (both.result(), folder / "both"), "old": (alone.result(), folder / "old")}


@pytest.mark.parametrize("dataset, sub", [("roxford5k", "ROxfordParis"), ("gldv2", "gldv2")])
def test_results_equal_independent_recomputation(tiny_synthetic, ckpts, request, tmp_path, dataset, sub):
    root = tiny_synthetic / sub
    with ThreadPoolExecutor(max_workers=1) as pool:
        if dataset == "roxford5k":   # the run test_old_sh_prints_the_old_self_test_of_test_sh compares with
            proc, save_dir = request.getfixturevalue("roxford_runs")["both"]
        else:
            save_dir = tmp_path / "eval"
            run = pool.submit(run_test_sh, dataset, root, ckpts["new"], ckpts["old"], save_dir, cwd=tmp_path)
        expected = recompute(dataset, root, ckpts, tmp_path)   # (meanwhile, in this process)
        if dataset != "roxford5k":
            proc = run.result()
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((save_dir / "results.json").read_text())
    assert result["dataset"] == dataset and set(SECTIONS) <= set(result)
    for section in SECTIONS:
        got, want = flat(result[section]), flat(expected[section])
        assert set(got) == set(want) and want
        for key in want:
            assert got[key] == pytest.approx(want[key], abs=1e-6), (section, key)
    # the two random models are not the same embedding: cross-test differs from self-test
    assert flat(result["cross_test"]) != pytest.approx(flat(result["self_test"]), abs=1e-3)

    out = proc.stdout
    if dataset == "gldv2":
        for section, label in (("self_test", "self-test"), ("cross_test", "cross-test")):
            assert f"{label}" in out and f"mAP@100 {result[section]['mAP@100']:6.2f}" in out
    else:
        for section, label in (("self_test", "self-test"), ("cross_test", "cross-test")):
            m = result[section]["mAP"]
            line = next(ln for ln in out.splitlines() if ln.startswith(label))
            assert f"E {m['easy']:6.2f}  M {m['medium']:6.2f}  H {m['hard']:6.2f}" in line
    assert f"results: {save_dir / 'results.json'}" in out


def test_same_checkpoint_gives_cross_equal_self(tiny_synthetic, ckpts, tmp_path, monkeypatch, capfd):
    proc = run_test_py("roxford5k", tiny_synthetic / "ROxfordParis", ckpts["new"], ckpts["new"],
                       tmp_path / "eval", cwd=tmp_path, monkeypatch=monkeypatch, capfd=capfd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert result["cross_test"] == result["self_test"] == result["old_self_test"]
    assert 0.0 < result["self_test"]["mAP"]["medium"] <= 100.0


def test_old_sh_prints_the_old_self_test_of_test_sh(roxford_runs, ckpts):
    """scripts/test_old.sh (the release's old-model self-test) gives test.sh's "old self" numbers."""
    (both, both_dir), (alone, old_dir) = roxford_runs["both"], roxford_runs["old"]
    assert both.returncode == 0 and alone.returncode == 0, (both.stderr[-2000:], alone.stderr[-2000:])
    full = json.loads((both_dir / "results.json").read_text())
    old = json.loads((old_dir / "results.json").read_text())
    assert set(SECTIONS) & set(old) == {"self_test"} and old["new_model"]["weights"] == ckpts["old"]
    assert old["self_test"] == full["old_self_test"] and old["self_test"] != full["self_test"]
    numbers = re.compile(r"mAP E +[\d.]+ +M +[\d.]+ +H +[\d.]+")
    old_line = next(ln for ln in both.stdout.splitlines() if ln.startswith("old self"))
    alone_lines = [ln for ln in alone.stdout.splitlines() if numbers.search(ln)]
    assert len(alone_lines) == 1 and numbers.search(alone_lines[0])[0] == numbers.search(old_line)[0]


# -------------------------------------------------------------------------------------- bad input
# Every refusal below is a case: ``prepare(folder, tiny_synthetic, ckpts)`` lays out its input in a folder of
# its own and returns the arguments of its run and what its test needs. A case registered with
# ``script=True`` runs scripts/test.sh in a fresh process: the ``refusals`` fixture starts those of the
# selected tests up front, two at a time on one core each (a run refused before any image is embedded costs
# little more than starting Python with torch). The others call tools/test.py's main (what test.sh execs) in
# this process when their test asks for their run; each test then checks its own run.
CASES = {}
SCRIPT_CASES = set()


def case(name, script=False):
    """Register the decorated ``prepare`` as the case of the test named ``name`` (``script``: through
    scripts/test.sh in a fresh process)."""
    def register(prepare):
        CASES[name] = prepare
        if script:
            SCRIPT_CASES.add(name)
        return prepare
    return register


@pytest.fixture(scope="module")
def refusals(request, selected, tiny_synthetic, ckpts, tmp_path_factory):
    """``{test name: (its run: a future, or its arguments to run in process, its folder, what its prepare
    returned)}`` for the selected tests."""
    wanted = [name for name in CASES if f"{request.node.nodeid}::{name}" in selected]
    with ThreadPoolExecutor(max_workers=2) as pool:
        runs = {}
        for name in wanted:
            folder = tmp_path_factory.mktemp("refusal")
            args, options, context = CASES[name](folder, tiny_synthetic, ckpts)
            run = (pool.submit(run_test_sh, *args, cwd=folder, one_core=True, **options) if name in SCRIPT_CASES
                   else args)
            runs[name] = (run, folder, context)
        yield runs


def refused(refusals, request):
    """The calling test's run (waited for, or run now in this process), its folder and its context."""
    run, folder, context = refusals[request.node.name]
    if isinstance(run, tuple):
        run = run_test_py(*run, cwd=folder, monkeypatch=request.getfixturevalue("monkeypatch"),
                          capfd=request.getfixturevalue("capfd"))
        return run, folder, context
    return run.result(), folder, context


def assert_user_error(proc, *fragments, dataset_doc=False):
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr
    lines = visible_lines(proc.stderr)
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for fragment in fragments:
        assert str(fragment) in lines[0]
    if dataset_doc:
        assert "Dataset.md" in lines[0]
    return lines[0]


def rox_copy(folder, tiny_synthetic):
    """A private copy of the tiny ROxfordParis folder, free to damage."""
    root = folder / "ROxfordParis"
    shutil.copytree(tiny_synthetic / "ROxfordParis", root)
    return root


@case("test_missing_root", script=True)
def prepare_missing_root(folder, tiny, ckpts):
    root = folder / "no_such_root"
    return ("roxford5k", root, ckpts["new"], ckpts["old"], folder / "e"), {}, root


def test_missing_root(refusals, request):
    proc, _, root = refused(refusals, request)
    assert_user_error(proc, root, dataset_doc=True)


@case("test_missing_gnd_file")
def prepare_missing_gnd_file(folder, tiny, ckpts):
    root = folder / "empty"
    root.mkdir()
    return ("roxford5k", root, ckpts["new"], ckpts["old"], folder / "e"), {}, root


def test_missing_gnd_file(refusals, request):
    proc, _, root = refused(refusals, request)
    assert_user_error(proc, root / "gnd_roxford5k.pkl", dataset_doc=True)


@case("test_missing_image")
def prepare_missing_image(folder, tiny, ckpts):
    root = rox_copy(folder, tiny)
    victim = Path(load_test_set("roxford5k", str(root)).gallery_paths[10])
    victim.unlink()
    return ("roxford5k", root, ckpts["new"], ckpts["old"], folder / "e"), {}, victim


def test_missing_image(refusals, request):
    proc, folder, victim = refused(refusals, request)
    assert_user_error(proc, victim, "image not found", dataset_doc=True)
    assert not (folder / "e" / "results.json").exists()


@case("test_unreadable_image")
def prepare_unreadable_image(folder, tiny, ckpts):
    # a gallery image of the second batch, read by a DataLoader worker (its error must stay one line)
    root = rox_copy(folder, tiny)
    victim = Path(load_test_set("roxford5k", str(root)).gallery_paths[BATCH + 3])
    victim.write_bytes(b"this is not a jpeg" * 20)
    return ("roxford5k", root, ckpts["new"], ckpts["old"], folder / "e", "EVAL.NUM_WORKERS", "1"), {}, victim


def test_unreadable_image(refusals, request):
    proc, folder, victim = refused(refusals, request)
    assert_user_error(proc, victim, "unreadable or corrupt image")
    assert not (folder / "e" / "results.json").exists()


@case("test_unknown_config_key_names_closest")
def prepare_unknown_config_key_names_closest(folder, tiny, ckpts):
    return ("roxford5k", tiny / "ROxfordParis", ckpts["new"], ckpts["old"], folder / "e", "EVAL.IMG_SIZ", "32"), \
        {}, None


def test_unknown_config_key_names_closest(refusals, request):
    proc, _, _ = refused(refusals, request)
    assert_user_error(proc, "'EVAL.IMG_SIZ'", "EVAL.IMG_SIZE")


@case("test_embedding_size_mismatch_fails_before_extraction")
def prepare_embedding_size_mismatch_fails_before_extraction(folder, tiny, ckpts):
    return ("roxford5k", tiny / "ROxfordParis", ckpts["new"], ckpts["d16"], folder / "e"), {}, None


def test_embedding_size_mismatch_fails_before_extraction(refusals, request, ckpts):
    proc, folder, _ = refused(refusals, request)
    assert_user_error(proc, ckpts["new"], ckpts["d16"], "32 dims", "to 16")
    assert "queries" not in proc.stderr and "gallery" not in proc.stderr  # no progress bar: nothing embedded
    assert not (folder / "e").exists()


@case("test_old_features_cache_on_a_file_fails_before_extraction")
def prepare_old_features_cache_on_a_file_fails_before_extraction(folder, tiny, ckpts):
    blocker = folder / "cache_is_a_file"
    blocker.write_text("x")
    return ("roxford5k", tiny / "ROxfordParis", ckpts["new"], ckpts["old"], folder / "e",
            "EVAL.OLD_FEATURES_CACHE", str(blocker)), {}, blocker


def test_old_features_cache_on_a_file_fails_before_extraction(refusals, request):
    proc, folder, blocker = refused(refusals, request)
    assert_user_error(proc, "EVAL.OLD_FEATURES_CACHE", blocker, "expected a directory")
    assert "queries" not in proc.stderr and "gallery" not in proc.stderr  # nothing embedded
    assert not (folder / "e").exists() and blocker.read_text() == "x"


@case("test_missing_checkpoint")
def prepare_missing_checkpoint(folder, tiny, ckpts):
    absent = folder / "absent.pth"
    return ("roxford5k", tiny / "ROxfordParis", ckpts["new"], absent, folder / "e"), {}, absent


def test_missing_checkpoint(refusals, request):
    proc, _, absent = refused(refusals, request)
    assert_user_error(proc, absent, "OLD_MODEL.WEIGHTS")


@case("test_two_processes_one_line_when_only_rank1_fails", script=True)
def prepare_two_processes_one_line_when_only_rank1_fails(folder, tiny, ckpts):
    root = rox_copy(folder, tiny)
    victim = Path(load_test_set("roxford5k", str(root)).gallery_paths[-1])
    victim.write_bytes(b"junk" * 50)
    return ("roxford5k", root, ckpts["new"], ckpts["old"], folder / "e"), {"ngpus": 2}, victim


def test_two_processes_one_line_when_only_rank1_fails(refusals, request):
    """NGPUS=2 (torchrun, gloo on CPU): the last gallery image, in rank 1's shard only, is corrupt.
    Both ranks stop, the user sees rank 1's message once, the exit status is 2 (not torchrun's 1)."""
    proc, _, victim = refused(refusals, request)
    assert_user_error(proc, victim, "unreadable or corrupt image")


# ---------------------------------------------------------------------------- several sets, one process


SEVERAL_SETS_BAD_INPUT = {   # test id: (EVAL.DATASET, EVAL.ROOT, fragments of the error line)
    "unknown-set": ("rparis6k,oxford", "{rev}", ["EVAL.DATASET", "'oxford'"]),
    "named-twice": ("rparis6k,rparis6k", "{rev}", ["EVAL.DATASET", "named twice"]),
    "too-few-roots": ("rparis6k,roxford5k,gldv2", "{rev},{gld}", ["EVAL.ROOT", "2 roots for the 3 test sets"]),
    "wrong-root": ("rparis6k,gldv2", "{rev},{rev}", ["{rev}", "gldv2"]),     # the second set's root is wrong
}


def _fill(tiny):
    return {"rev": tiny / "ROxfordParis", "gld": tiny / "gldv2"}


def _several_sets_case(datasets, roots):
    def prepare(folder, tiny, ckpts):
        return (datasets, roots.format(**_fill(tiny)), ckpts["new"], ckpts["old"], folder / "e"), {}, None
    return prepare


for _id, (_datasets, _roots, _) in SEVERAL_SETS_BAD_INPUT.items():
    case(f"test_several_sets_bad_input_fails_before_any_set_is_scored[{_id}]")(_several_sets_case(_datasets, _roots))


@pytest.mark.parametrize("fragments", [v[2] for v in SEVERAL_SETS_BAD_INPUT.values()],
                         ids=list(SEVERAL_SETS_BAD_INPUT))
def test_several_sets_bad_input_fails_before_any_set_is_scored(refusals, request, tiny_synthetic, fragments):
    proc, folder, _ = refused(refusals, request)
    assert_user_error(proc, *(f.format(**_fill(tiny_synthetic)) for f in fragments))
    assert "queries" not in proc.stderr and not (folder / "e").exists()   # nothing embedded, nothing written


def test_several_sets_in_one_process_equal_one_run_each(tiny_synthetic, ckpts, tmp_path, monkeypatch, capfd):
    """``EVAL.DATASET rparis6k,roxford5k,gldv2`` writes, per set, the results.json (and a config.yaml of that
    set alone) that a run on the set alone writes; the models are loaded once. The three sets through test.sh,
    one core; meanwhile the run of each set alone, in this process (tools/test.py's main), one thread too."""
    rev, gld = tiny_synthetic / "ROxfordParis", tiny_synthetic / "gldv2"
    extra = ["EVAL.BACKFILL", "true"]
    sets = (("rparis6k", rev), ("roxford5k", rev), ("gldv2", gld))
    with ThreadPoolExecutor(max_workers=1) as pool:
        together = pool.submit(run_test_sh, "rparis6k,roxford5k,gldv2", f"{rev},{rev},{gld}", ckpts["new"],
                               ckpts["old"], tmp_path / "all", *extra, cwd=tmp_path, one_core=True)
        runs = {dataset: run_test_py(dataset, root, ckpts["new"], ckpts["old"], tmp_path / dataset, *extra,
                                     cwd=tmp_path, monkeypatch=monkeypatch, capfd=capfd, one_core=True)
                for dataset, root in sets}
        proc = together.result()
    assert proc.returncode == 0, proc.stderr[-3000:]
    for dataset, root in sets:
        alone = runs[dataset]
        assert alone.returncode == 0, alone.stderr[-3000:]
        want = json.loads((tmp_path / dataset / "results.json").read_text())
        got = json.loads((tmp_path / "all" / dataset / "results.json").read_text())
        assert got == want and got["dataset"] == dataset and "backfill" in got
        saved = load_config(str(tmp_path / "all" / dataset / "config.yaml"))
        assert (saved.EVAL.DATASET, saved.EVAL.ROOT) == (dataset, str(root))
        assert saved.EVAL.SAVE_DIR == str(tmp_path / "all" / dataset)
        assert f"results: {tmp_path / 'all' / dataset / 'results.json'}" in proc.stdout
    assert not (tmp_path / "all" / "results.json").exists()
