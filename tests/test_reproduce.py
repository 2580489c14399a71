"""Reproduction plumbing: resumable steps, argument errors, table assembly in the paper's schema."""

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import run_pipeline_lib

from advbct.evaluation.collect import collect_block, criterion_report
from advbct.evaluation.reporting import fill_scores, validate_table

REPO = Path(__file__).resolve().parent.parent


def bash(script, cwd):
    return subprocess.run(["bash", "-c", script], cwd=cwd, capture_output=True, text=True)


def test_run_step_skips_completed_and_stops_on_failure(tmp_path):
    lib = REPO / "scripts" / "lib" / "pipeline.sh"
    script = f"""
set -euo pipefail
source {lib}
run_step "first" out/a.txt logs/first.log bash -c 'echo one >> count.txt; echo done > out/a.txt'
run_step "first" out/a.txt logs/first.log bash -c 'echo one >> count.txt; echo done > out/a.txt'
run_step "second" out/b.txt logs/second.log bash -c 'echo boom; exit 7'
echo unreachable
"""
    (tmp_path / "out").mkdir()
    proc = bash(script, tmp_path)
    assert proc.returncode == 1
    assert (tmp_path / "count.txt").read_text() == "one\n"        # the completed step ran once
    assert "[done] first" in proc.stdout and "unreachable" not in proc.stdout
    assert "error: step 'second' failed; log: logs/second.log" in proc.stderr
    assert (tmp_path / "logs" / "second.log").read_text() == "boom\n"
    assert (tmp_path / "out" / "a.txt").read_text() == "done\n"   # earlier output intact
    # a step that "succeeds" without writing its output is an error too
    proc = bash(f"source {lib}; run_step third out/c.txt logs/third.log true", tmp_path)
    assert proc.returncode == 1 and "ended without writing out/c.txt" in proc.stderr


def test_stale_synthetic_benchmark_stops_with_how_to_regenerate(tmp_path):
    """A benchmark of format 1 (no pretrain/) is refused by the scripts' first step, in one line."""
    (tmp_path / "SYNTHETIC.json").write_text(json.dumps({"format_version": 1, "preset": "small"}))
    proc = run_pipeline_lib(f"x=\"$(synthetic_train_list {tmp_path})\"; echo reached", REPO)
    assert proc.returncode == 2 and "reached" not in proc.stdout
    assert proc.stderr.count("\n") == 1 and "format version 1, this code needs 2" in proc.stderr
    assert f"make_synthetic.py --out {tmp_path} --preset small --overwrite" in proc.stderr


def test_stamp_outputs_keys_output_dirs_on_their_benchmark(tmp_path):
    """Outputs built from one benchmark are reused with it and refused, intact, after it changed."""
    (tmp_path / "SYNTHETIC.json").write_text('{"preset": "small", "train_classes": 2000}\n')
    digest = hashlib.sha256((tmp_path / "SYNTHETIC.json").read_bytes()).hexdigest()
    (tmp_path / "fresh" / "logs").mkdir(parents=True)          # only a log: a fresh block, no note
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "final.pth").write_text("weights")      # outputs made before stamps existed
    call = "stamp_outputs SYNTHETIC.json fresh old new; echo reached"
    proc = run_pipeline_lib(call, tmp_path)
    assert proc.returncode == 0 and proc.stdout.endswith("reached\n")
    assert proc.stdout.count("[note]") == 1 and "[note] old has no BENCHMARK.sha256" in proc.stdout
    for d in ("fresh", "old", "new"):
        assert (tmp_path / d / "BENCHMARK.sha256").read_text() == f"{digest}  SYNTHETIC.json\n"
    proc = run_pipeline_lib(call, tmp_path)                      # same benchmark: silent reuse
    assert proc.returncode == 0 and proc.stdout == "reached\n" and proc.stderr == ""

    (tmp_path / "SYNTHETIC.json").write_text('{"preset": "small", "train_classes": 1000}\n')
    proc = run_pipeline_lib("stamp_outputs SYNTHETIC.json brand_new fresh old new; echo reached", tmp_path)
    assert proc.returncode == 2 and "reached" not in proc.stdout
    assert proc.stderr.count("\n") == 1
    assert f"error: fresh was built from another SYNTHETIC.json (sha256 {digest[:12]}..." in proc.stderr
    assert "move fresh away to rebuild it" in proc.stderr
    assert (tmp_path / "old" / "final.pth").read_text() == "weights"
    assert (tmp_path / "old" / "BENCHMARK.sha256").read_text() == f"{digest}  SYNTHETIC.json\n"
    assert not (tmp_path / "brand_new").exists()                # a refused run stamps nothing, not even
                                                                # the new dirs listed before the stale one
    proc = run_pipeline_lib("stamp_outputs missing.json out", tmp_path)
    assert proc.returncode == 2 and proc.stderr == "error: missing.json not found: cannot key the outputs on it\n"
    assert not (tmp_path / "out").exists()


def _script_copy(tmp_path):
    """scripts/ copied into tmp_path (the scripts cd to their parent), advbct/ and tools/ linked beside it."""
    shutil.copytree(REPO / "scripts", tmp_path / "scripts")
    for name in ("advbct", "tools", "configs"):
        (tmp_path / name).symlink_to(REPO / name)
    return tmp_path / "scripts"


def test_block_refuses_outputs_of_another_train_list_before_any_step(tmp_path):
    """reproduce_table.sh (real-data route) keys the old-model and block dirs on label_81313.txt: a block
    dir stamped from another list stops the run before its first step, stamping nothing."""
    scripts = _script_copy(tmp_path)
    for need in ("data/GLDv2/label_81313.txt", "data/GLDv2/gldv2_private_query_gt.txt",
                 "data/ROxfordParis/gnd_roxford5k.pkl", "data/ROxfordParis/gnd_rparis6k.pkl"):
        (tmp_path / need).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / need).write_text("a.jpg 0\n")
    block = tmp_path / "output" / "reproduce" / "class_r18"
    block.mkdir(parents=True)
    (block / "BENCHMARK.sha256").write_text("0" * 64 + "  ./data/GLDv2/label_81313.txt\n")
    (block / "bct").mkdir()
    (block / "bct" / "final.pth").write_text("weights")
    run = ["bash", str(scripts / "reproduce_table.sh"), "class", "r18"]
    env = {**os.environ, "PYTHON": sys.executable}
    proc = subprocess.run(run, cwd=tmp_path, capture_output=True, text=True, env=env)
    assert proc.returncode == 2 and "[run]" not in proc.stdout and proc.stderr.count("\n") == 1
    assert ("error: ./output/reproduce/class_r18 was built from another ./data/GLDv2/label_81313.txt "
            "(sha256 000000000000..." in proc.stderr)
    assert (block / "bct" / "final.pth").read_text() == "weights"
    old_dir = tmp_path / "output" / "reproduce" / "old_class"
    assert not old_dir.exists()
    # with the stale dir moved away, both dirs are keyed on the current list and the steps run: the split,
    # then the old model, which fails here (no configs, no images) with the step's name
    shutil.move(str(block), str(tmp_path / "stale"))
    proc = subprocess.run(run, cwd=tmp_path, capture_output=True, text=True, env=env)
    assert "[run]  split by class (30 % old)" in proc.stdout
    assert proc.returncode == 1 and "error: step 'old model (R18, class allocation)' failed" in proc.stderr
    digest = hashlib.sha256(b"a.jpg 0\n").hexdigest()
    stamp = f"{digest}  ./data/GLDv2/label_81313.txt\n"
    assert (old_dir / "BENCHMARK.sha256").read_text() == stamp
    assert (block / "BENCHMARK.sha256").read_text() == stamp


def _fake_real_data(root):
    for need in ("data/GLDv2/label_81313.txt", "data/GLDv2/gldv2_private_query_gt.txt",
                 "data/ROxfordParis/gnd_roxford5k.pkl", "data/ROxfordParis/gnd_rparis6k.pkl"):
        (root / need).parent.mkdir(parents=True, exist_ok=True)
        (root / need).write_text("a.jpg 0\n")


@pytest.mark.parametrize("args, old, meta, out", [
    ([], "final.pth", "meta.pt", "class_r50"),
    (["--old-epoch", "30"], "final.pth", "meta.pt", "class_r50"),   # the last epoch is the final model
    (["--old-epoch", "10"], "epoch_10.pth", "meta_epoch10.pt", "class_r50_old-epoch10"),
])
def test_block_resolves_the_old_model_into_the_compatible_configs(tmp_path, args, old, meta, out):
    """The old model a block's compatible rows load: the final one by default (the paper), the release's
    epoch-10 checkpoint with --old-epoch 10, with its own meta and block folder; the resolved configs of
    the rows (what their config.yaml records) and the test step's architectures follow."""
    _script_copy(tmp_path)
    _fake_real_data(tmp_path)
    script = ('usage=u; source scripts/lib/block.sh "$@"; '
              'echo "$OUT"; echo "$NEW_ARCH $OLD_ARCH"; '
              'for m in "${METHODS[@]%%:*}"; do config_value "$CFG/$m.yml" OLD_MODEL.WEIGHTS "${COMPAT[@]}"; '
              'config_value "$CFG/$m.yml" COMP_LOSS.META_PATH "${COMPAT[@]}"; done')
    proc = subprocess.run(["bash", "-c", script, "block", "class", "r50", *args], cwd=tmp_path,
                          capture_output=True, text=True, env={**os.environ, "PYTHON": sys.executable})
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == f"./output/reproduce/{out}"
    assert lines[1] == "timm:resnet50.a1_in1k timm:resnet18.tv_in1k"   # the release's weights, from the configs
    assert lines[2:] == [f"./output/reproduce/old_class/{old}", f"./output/reproduce/old_class/{meta}"] * 5


@pytest.mark.parametrize("epoch", ["12", "0", "ten", "31"])
def test_block_refuses_an_old_epoch_without_a_checkpoint(tmp_path, epoch):
    _script_copy(tmp_path)
    _fake_real_data(tmp_path)
    proc = subprocess.run(["bash", str(tmp_path / "scripts" / "reproduce_table.sh"), "class", "r18",
                           "--old-epoch", epoch], cwd=tmp_path, capture_output=True, text=True,
                          env={**os.environ, "PYTHON": sys.executable})
    assert proc.returncode == 2 and "[run]" not in proc.stdout and proc.stderr.count("\n") == 1
    assert proc.stderr == (f"error: --old-epoch {epoch}: the old model (configs/gldv2/class_r18/old.yml) keeps the "
                           "checkpoints of epochs 5, 10, 15, 20, 25, 30 (TRAIN.SAVE_FREQ 5, TRAIN.EPOCHS 30)\n")
    assert not (tmp_path / "output").exists()


def test_synthetic_block_refuses_a_pretrained_backbone_of_another_benchmark(tiny_synthetic, tmp_path):
    """The synthetic route keys the shared pretrained backbones too: a stale pretrain dir stops
    reproduce_table.sh --synthetic before the pretraining, with the old-model and block dirs unstamped."""
    scripts = _script_copy(tmp_path)
    pretrain = tmp_path / "output" / "reproduce" / "pretrain_synthetic-tiny"
    (pretrain / "r18").mkdir(parents=True)
    (pretrain / "r18" / "final.pth").write_text("weights")
    (pretrain / "BENCHMARK.sha256").write_text("f" * 64 + "  other/SYNTHETIC.json\n")
    env = {**os.environ, "PYTHON": sys.executable, "DATA": str(tiny_synthetic)}
    proc = subprocess.run(["bash", str(scripts / "reproduce_table.sh"), "class", "r18", "--synthetic", "tiny"],
                          cwd=tmp_path, capture_output=True, text=True, env=env)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1
    assert proc.stdout == f"[done] synthetic benchmark (tiny)  ({tiny_synthetic}/SYNTHETIC.json)\n"
    assert (f"error: ./output/reproduce/pretrain_synthetic-tiny was built from another "
            f"{tiny_synthetic}/SYNTHETIC.json (sha256 ffffffffffff..." in proc.stderr)
    assert (pretrain / "r18" / "final.pth").read_text() == "weights"
    assert not (tmp_path / "output" / "reproduce" / "old_class_synthetic-tiny").exists()
    assert not (tmp_path / "output" / "reproduce" / "class_r18_synthetic-tiny" / "BENCHMARK.sha256").exists()


def test_demo_refuses_an_output_dir_of_another_benchmark(tiny_synthetic, tmp_path):
    """demo.sh keys its OUT like the blocks: a stale output/demo stops it before the pretraining, intact.
    Its install step is satisfied by a stand-in venv (ADVBCT_VENV) that points at this interpreter."""
    scripts = _script_copy(tmp_path)
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").symlink_to(sys.executable)
    (venv / ".advbct-installed").write_text("cpu cpu\n")  # installed with the faiss-cpu extra, as wanted
    out = tmp_path / "output" / "demo"
    (out / "old").mkdir(parents=True)
    (out / "old" / "final.pth").write_text("weights")
    (out / "BENCHMARK.sha256").write_text("f" * 64 + "  other/SYNTHETIC.json\n")
    env = {**os.environ, "PYTHON": sys.executable, "ADVBCT_VENV": str(venv), "ADVBCT_FAISS": "cpu",
           "DATA": str(tiny_synthetic), "PRESET": "tiny"}
    proc = subprocess.run(["bash", str(scripts / "demo.sh")], cwd=tmp_path, capture_output=True, text=True,
                          env=env)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1
    assert proc.stdout == f"[done] 1/9 synthetic benchmark (tiny)  ({tiny_synthetic}/SYNTHETIC.json)\n"
    assert (f"error: ./output/demo was built from another {tiny_synthetic}/SYNTHETIC.json "
            f"(sha256 ffffffffffff..." in proc.stderr)
    assert (out / "old" / "final.pth").read_text() == "weights"
    assert sorted(p.name for p in out.iterdir()) == ["BENCHMARK.sha256", "old"]


@pytest.mark.parametrize("script", ["reproduce_table.sh", "reproduce_ablation.sh"])
@pytest.mark.parametrize("args, needle", [
    (["foo", "r18"], "unknown allocation 'foo'"),
    (["class", "r34"], "unknown backbone 'r34'"),
    (["class", "r18", "--fast"], "unknown argument '--fast'"),
    (["class", "r18"], "not found: lay out the datasets as in Dataset.md"),
])
def test_reproduce_scripts_argument_errors(tmp_path, script, args, needle):
    proc = subprocess.run(["bash", str(REPO / "scripts" / script), *args], cwd=tmp_path,
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert needle in proc.stderr and proc.stderr.count("\n") == 1


def _result(path, dataset, self_m, cross_m, old_m):
    def metrics(v):
        if dataset == "gldv2":
            return {"mAP@100": v}
        return {"mAP": {"easy": v + 1, "medium": v, "hard": v - 1}}
    path.mkdir(parents=True)
    (path / "results.json").write_text(json.dumps({
        "dataset": dataset, "self_test": metrics(self_m), "cross_test": metrics(cross_m),
        "old_self_test": metrics(old_m)}))


def test_collect_block_schema_values_and_criterion(tmp_path):
    old = {"rparis6k": 60.0, "roxford5k": 40.0, "gldv2": 10.0}
    for ds, (s, x) in {"rparis6k": (70.0, 5.0), "roxford5k": (50.0, 2.0), "gldv2": (15.0, 0.5)}.items():
        _result(tmp_path / "ind" / ds, ds, s, x, old[ds])
    for ds, (s, x) in {"rparis6k": (69.0, 61.0), "roxford5k": (48.0, 39.0), "gldv2": (14.0, 11.0)}.items():
        _result(tmp_path / "adv" / ds, ds, s, x, old[ds])
    table = collect_block(tmp_path / "ind", {"AdvBCT": tmp_path / "adv"})
    validate_table(table)
    block = table["blocks"]["block"]
    assert table["datasets"] == ["rparis6k", "roxford5k", "gldv2"]
    assert block["old"]["self"] == [60.0, 40.0, 10.0]                 # Medium / mAP@100 headline
    assert block["independent"] == {"self": [70.0, 50.0, 15.0], "cross": [5.0, 2.0, 0.5]}
    assert block["methods"]["AdvBCT"] == {"self": [69.0, 48.0, 14.0], "cross": [61.0, 39.0, 11.0]}
    lines, ok = criterion_report(fill_scores(table))
    assert not ok                                                      # 39 <= 40 on roxford5k
    assert "AdvBCT on rparis6k: cross-test 61.00 > old self-test 60.00 -> compatible" in lines
    assert "AdvBCT on roxford5k: cross-test 39.00 <= old self-test 40.00 -> NOT compatible" in lines


def test_collect_results_tool_writes_filled_table(tmp_path):
    for name, vals in {"ind": (70.0, 5.0), "m": (69.0, 65.0)}.items():
        for ds in ("rparis6k", "roxford5k", "gldv2"):
            _result(tmp_path / name / ds, ds, vals[0], vals[1], 60.0)
    out = tmp_path / "table.json"
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "collect_results.py"), "--independent",
                           str(tmp_path / "ind"), "--method", f"AdvBCT={tmp_path / 'm'}", "--block", "class",
                           "--out", str(out), "--criterion"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    table = json.loads(out.read_text())
    row = table["blocks"]["class"]["methods"]["AdvBCT"]
    # a = sigma((69-70)/70), b = sigma((65-60)/(70-60)) on every dataset
    import math
    a, b = 1 / (1 + math.exp(1 / 70)), 1 / (1 + math.exp(-0.5))
    assert row["P_up"] == pytest.approx(100 * a) and row["P_comp"] == pytest.approx(100 * b)
    assert row["P_1"] == pytest.approx(100 * 2 * a * b / (a + b))
    assert "holds everywhere" in proc.stdout
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "collect_results.py"), "--independent",
                           str(tmp_path / "nowhere"), "--out", str(out)], capture_output=True, text=True)
    assert proc.returncode == 2 and "results file not found" in proc.stderr and "Traceback" not in proc.stderr


def test_ablation_labels_are_valid_method_names():
    """Each ablation row's label goes to collect_results.py as --method LABEL=FOLDER: no '=' in it."""
    text = (REPO / "scripts" / "reproduce_ablation.sh").read_text()
    rows = re.findall(r'^  "(advbct[^:"]*):([^:"]*):([^"]*)"$', text, flags=re.M)
    assert [name for name, _, _ in rows] == ["advbct", "advbct_no_adv", "advbct_no_elastic", "advbct_T0.4",
                                             "advbct_T0.6", "advbct_T0.8", "advbct_T1.0", "advbct_T1.2"]
    for name, label, opts in rows:
        assert label and "=" not in label, name
        if name.startswith("advbct_T"):  # the row's name, label and override agree on T
            t = name[len("advbct_T"):]
            assert label == f"T {t}" and opts == f"COMP_LOSS.THRESHOLD {t}"


def test_collect_results_names_an_equals_sign_in_the_method_name(tmp_path):
    """'T = 0.4=DIR' splits into name 'T ' and folder ' 0.4=DIR': one line saying what is wrong."""
    folder = tmp_path / "eval"
    folder.mkdir()
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "collect_results.py"), "--independent", str(folder),
                           "--method", f"T = 0.4={folder}", "--out", str(tmp_path / "t.json")],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert "NAME must not contain '='" in proc.stderr and f"'T = 0.4={folder}'" in proc.stderr
    assert not (tmp_path / "t.json").exists()


def test_test_step_runs_only_the_missing_sets_in_one_call(tmp_path):
    """test_step hands scripts/test.sh every set without results.json at once (one root per set, the
    eval folder as SAVE_DIR); a single missing set gets its own folder; nothing missing, no call."""
    lib = REPO / "scripts" / "lib" / "pipeline.sh"
    fake = tmp_path / "scripts" / "test.sh"
    fake.parent.mkdir()
    # the stand-in records its arguments and writes the results.json files a real run would
    fake.write_text('echo "$NEW_MODEL_PATH $OLD_MODEL_PATH $NEW_MODEL_ARCH $*" >> calls.txt\n'
                    'save="${@: -1}"; IFS=, read -r -a sets <<<"$2"\n'
                    'if [[ ${#sets[@]} -eq 1 ]]; then mkdir -p "$save"; touch "$save/results.json"\n'
                    'else for s in "${sets[@]}"; do mkdir -p "$save/$s"; touch "$save/$s/results.json"; done; fi\n')
    step = f'source {lib}; test_step "test m" new.pth resnet50 old.pth ev logs/t.log REV GLD EVAL.BACKFILL true'
    (tmp_path / "ev" / "rparis6k").mkdir(parents=True)
    (tmp_path / "ev" / "rparis6k" / "results.json").write_text("{}")
    proc = bash(step, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "[run]  test m on roxford5k,gldv2  (log: logs/t.log)" in proc.stdout
    calls = (tmp_path / "calls.txt").read_text().splitlines()
    assert calls == ["new.pth old.pth resnet50 landmark roxford5k,gldv2 REV,GLD EVAL.BACKFILL true EVAL.SAVE_DIR ev"]
    (tmp_path / "ev" / "gldv2" / "results.json").unlink()
    proc = bash(step, tmp_path)
    assert proc.returncode == 0, proc.stderr
    calls = (tmp_path / "calls.txt").read_text().splitlines()
    assert calls[1] == "new.pth old.pth resnet50 landmark gldv2 GLD EVAL.BACKFILL true EVAL.SAVE_DIR ev/gldv2"
    proc = bash(step, tmp_path)
    assert proc.returncode == 0 and "[done] test m" in proc.stdout
    assert len((tmp_path / "calls.txt").read_text().splitlines()) == 2   # nothing left to run: no third call
