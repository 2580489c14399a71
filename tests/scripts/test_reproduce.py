"""Reproduction plumbing through the bash entry points (scripts/demo.sh, reproduce_table.sh,
reproduce_ablation.sh): argument errors and one-line refusals before any step, the data stamps, the old
model a block resolves. The plans themselves and the step runner are tested in process in
tests/pipelines/test_plans.py, table assembly in tests/evaluation/test_collect.py. The runs that start Python
(the pipelines behind the scripts) are slow; the argument checks of bash alone are not. Each script runs
end to end in a fresh process at least once; the other refusals call the command line the script execs
(``advbct.pipelines.__main__.main``) in this process, from the folder the script changes to, and check the
same exit status and lines (a fresh Python with torch costs ~1.5 s a run)."""

import hashlib
import json
import os
import shutil
import subprocess
import sys

import pytest

from advbct.config import load_config
from advbct.pipelines import __main__ as pipelines_cli
from advbct.pipelines.blocks import _table_methods, resolve_block
from helpers import REPO, call_main

COMMANDS = {"reproduce_table.sh": "table", "reproduce_ablation.sh": "ablation", "demo.sh": "demo"}


def _script_copy(tmp_path):
    """scripts/ copied into tmp_path (the scripts cd to their parent), advbct/ and tools/ linked beside it."""
    shutil.copytree(REPO / "scripts", tmp_path / "scripts")
    for name in ("advbct", "tools", "configs"):
        (tmp_path / name).symlink_to(REPO / name)
    return tmp_path / "scripts"


def run_in_process(script, args, root, monkeypatch, capfd, **env):
    """What ``bash <root>/scripts/<script> ARGS`` runs, ``python -m advbct.pipelines <command> ARGS`` from
    ``root`` (the script's ``cd``), called in this process with PYTHON (and ``env``) set as the test's runs
    of the script set them: its exit status, stdout and stderr."""
    monkeypatch.chdir(root)
    for key, value in {"PYTHON": sys.executable, **env}.items():
        monkeypatch.setenv(key, value)
    return call_main(pipelines_cli.main, [COMMANDS[script], *args], capfd)


@pytest.mark.slow
def test_block_refuses_outputs_of_another_train_list_before_any_step(tmp_path, monkeypatch, capfd):
    """reproduce_table.sh (real-data route) keys the old-model and block dirs on label_81313.txt: a block
    dir stamped from another list stops the run before its first step, stamping nothing. (The pipeline in
    this process; its steps, bash entry points and tools, in their own as always.)"""
    _script_copy(tmp_path)
    for need in ("data/GLDv2/label_81313.txt", "data/GLDv2/gldv2_private_query_gt.txt",
                 "data/ROxfordParis/gnd_roxford5k.pkl", "data/ROxfordParis/gnd_rparis6k.pkl"):
        (tmp_path / need).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / need).write_text("a.jpg 0\n")
    block = tmp_path / "output" / "reproduce" / "class_r18"
    block.mkdir(parents=True)
    (block / "BENCHMARK.sha256").write_text("0" * 64 + "  ./data/GLDv2/label_81313.txt\n")
    (block / "bct").mkdir()
    (block / "bct" / "final.pth").write_text("weights")

    def run():
        return run_in_process("reproduce_table.sh", ["class", "r18"], tmp_path, monkeypatch, capfd)

    proc = run()
    assert proc.returncode == 2 and "[run]" not in proc.stdout and proc.stderr.count("\n") == 1
    assert ("error: ./output/reproduce/class_r18 was built from another ./data/GLDv2/label_81313.txt "
            "(sha256 000000000000..." in proc.stderr)
    assert (block / "bct" / "final.pth").read_text() == "weights"
    old_dir = tmp_path / "output" / "reproduce" / "old_class"
    assert not old_dir.exists()
    # with the stale dir moved away, both dirs are keyed on the current list and the steps run: the split,
    # then the old model, which fails here (no configs, no images) with the step's name
    shutil.move(str(block), str(tmp_path / "stale"))
    proc = run()
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


@pytest.mark.parametrize("epoch, old, meta, out", [
    (None, "final.pth", "meta.pt", "class_r50"),
    ("30", "final.pth", "meta.pt", "class_r50"),   # the last epoch is the final model
    ("10", "epoch_10.pth", "meta_epoch10.pt", "class_r50_old-epoch10"),
])
def test_block_resolves_the_old_model_into_the_compatible_configs(tmp_path, monkeypatch, epoch, old, meta, out):
    """The old model a block's compatible rows load: the final one by default (the paper), the release's
    epoch-10 checkpoint with --old-epoch 10, with its own meta and block folder; the resolved configs of
    the rows (what their config.yaml records) and the test step's architectures follow."""
    _script_copy(tmp_path)
    _fake_real_data(tmp_path)
    monkeypatch.chdir(tmp_path)
    block = resolve_block("class", "r50", old_epoch=epoch)
    assert block.out == f"./output/reproduce/{out}"
    # the release's weights, from the configs
    assert (block.new_arch, block.old_arch) == ("timm:resnet50.a1_in1k", "timm:resnet18.tv_in1k")
    resolved = []
    for m, _ in _table_methods():
        cfg = load_config(f"{block.cfg}/{m}.yml", list(block.compat))
        resolved += [cfg.OLD_MODEL.WEIGHTS, cfg.COMP_LOSS.META_PATH]
    assert resolved == [f"./output/reproduce/old_class/{old}", f"./output/reproduce/old_class/{meta}"] * 5
    assert not (tmp_path / "output").exists()   # resolving a block writes nothing


@pytest.mark.parametrize("epoch", ["12", "0", "ten", "31"])
def test_block_refuses_an_old_epoch_without_a_checkpoint(tmp_path, monkeypatch, capfd, epoch):
    _script_copy(tmp_path)
    _fake_real_data(tmp_path)
    proc = run_in_process("reproduce_table.sh", ["class", "r18", "--old-epoch", epoch], tmp_path, monkeypatch, capfd)
    assert proc.returncode == 2 and "[run]" not in proc.stdout and proc.stderr.count("\n") == 1
    assert proc.stderr == (f"error: --old-epoch {epoch}: the old model (configs/gldv2/class_r18/old.yml) keeps the "
                           "checkpoints of epochs 5, 10, 15, 20, 25, 30 (TRAIN.SAVE_FREQ 5, TRAIN.EPOCHS 30)\n")
    assert not (tmp_path / "output").exists()


@pytest.mark.slow
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


@pytest.mark.slow
def test_stale_synthetic_benchmark_stops_with_how_to_regenerate(tmp_path):
    """A benchmark of format 1 (no pretrain/) is refused right after the benchmark step, in one line, before
    any folder is stamped or any other step runs."""
    scripts = _script_copy(tmp_path)
    data = tmp_path / "bench"
    data.mkdir()
    (data / "SYNTHETIC.json").write_text(json.dumps({"format_version": 1, "preset": "small"}))
    env = {**os.environ, "PYTHON": sys.executable, "DATA": str(data)}
    proc = subprocess.run(["bash", str(scripts / "reproduce_ablation.sh"), "--synthetic", "small"], cwd=tmp_path,
                          capture_output=True, text=True, env=env)
    assert proc.returncode == 2 and proc.stdout == f"[done] synthetic benchmark (small)  ({data}/SYNTHETIC.json)\n"
    assert proc.stderr.count("\n") == 1 and "format version 1, this code needs 2" in proc.stderr
    assert f"make_synthetic.py --out {data} --preset small --overwrite" in proc.stderr
    assert not (tmp_path / "output").exists()


@pytest.mark.slow
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
    (["class", "r18", "--synthetic"], "error: --synthetic needs a preset (tiny, small, medium)"),
    (["class", "r18", "--old-epoch"], "error: --old-epoch needs an epoch (e.g. 10, as the release)"),
    (["class", "r18"], "not found: lay out the datasets as in Dataset.md"),
])
def test_reproduce_scripts_argument_errors(tmp_path, monkeypatch, capfd, script, args, needle):
    if script == "reproduce_ablation.sh" and needle.startswith("not found"):
        # the one case that imports torch (~1.5 s a fresh process): reproduce_table.sh's run of it goes through
        # bash, this one calls the same command line in this process
        proc = run_in_process(script, args, REPO, monkeypatch, capfd)
    else:
        proc = subprocess.run(["bash", str(REPO / "scripts" / script), *args], cwd=tmp_path,
                              capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stdout == ""
    assert needle in proc.stderr and proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr


@pytest.mark.parametrize("script, args", [("reproduce_table.sh", []), ("reproduce_table.sh", ["class"]),
                                          ("reproduce_ablation.sh", ["class"])])
def test_reproduce_scripts_print_their_usage_without_enough_arguments(tmp_path, script, args):
    proc = subprocess.run(["bash", str(REPO / "scripts" / script), *args], cwd=tmp_path,
                          capture_output=True, text=True)
    usage = {"reproduce_table.sh": "{data,class} {r18,r50}", "reproduce_ablation.sh": "[{data,class} {r18,r50}]"}
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr == (f"usage: bash scripts/{script} {usage[script]} [--synthetic PRESET] [--old-epoch N]\n")
