"""Launching on several nodes and under srun: the torchrun command lines scripts/lib/launch.sh builds, its
refusals, the failed-rank report of advbct.launch on a node other than 0, and, end to end, two "nodes"
on this machine (torchrun static rendezvous, and srun-style tasks without torchrun) training exactly like
one process with the doubled batch. (The srun-style tasks are tools/train.py's main in two children forked
from this process with srun's variables: the world they form comes from those variables alone.)"""

import importlib.util
import json
import logging
import os
import shutil
import subprocess
import sys

import pytest

from helpers import REPO, SCRIPTS_LIB, TRAIN_BATCH as BATCH, TRAIN_WORLD as WORLD
from helpers import (assert_states_close, base_overrides, fork_main, free_port, load_last, momentum_buffers,
                     wait_children)

TOOL = ["tools/train.py", "--cfg", "x.yml", "TRAIN.EPOCHS", "1"]

# prints its arguments as JSON instead of running them; `-m advbct.world` (asked by launch.sh) runs for real
STAND_IN = f"""#!{sys.executable}
import json, os, sys
if sys.argv[1:3] == ["-m", "advbct.world"]:
    os.execv(sys.executable, [sys.executable] + sys.argv[1:])
print(json.dumps(sys.argv[1:]))
"""


@pytest.fixture
def stand_in(tmp_path):
    path = tmp_path / "python"
    path.write_text(STAND_IN)
    path.chmod(0o755)
    return path


def run_launch(stand_in, tmp_path, **env):
    """``launch tools/train.py ...`` with PYTHON = the stand-in and only ``env`` (no inherited SLURM_*)."""
    full = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(tmp_path), "TMPDIR": str(tmp_path),
            "PYTHON": str(stand_in), **env}
    script = f"set -euo pipefail; source {SCRIPTS_LIB}/launch.sh; launch {' '.join(TOOL)}"
    return subprocess.run(["bash", "-c", script], cwd=REPO, env=full, capture_output=True, text=True, timeout=60)


def launched(proc):
    """The stand-in's argv, the temporary log folder replaced by LOG."""
    assert proc.returncode == 0, proc.stderr
    argv = json.loads(proc.stdout)
    if argv[:2] == ["-m", "advbct.launch"]:
        assert "advbct-launch." in argv[2]
        argv[2] = "LOG"
    return argv


TORCHRUN = ["-m", "advbct.launch", "LOG"]
SLURM_STEP = {"SLURM_JOB_ID": "12345", "SLURM_STEP_ID": "0", "SLURM_STEP_NODELIST": "gpu[07-08]",
              "SLURM_PROCID": "1", "SLURM_LOCALID": "0"}


@pytest.mark.parametrize("env, argv", [
    ({"NGPUS": "1"}, TOOL),
    ({"NGPUS": "2"}, TORCHRUN + ["--standalone", "--nproc_per_node=2", "--redirects", "0:0,1:2"] + TOOL),
    ({"NGPUS": "4", "NNODES": "2", "NODE_RANK": "1", "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "1234"},
     TORCHRUN + ["--nnodes=2", "--node_rank=1", "--master_addr=10.0.0.1", "--master_port=1234",
                 "--nproc_per_node=4", "--redirects", "3"] + TOOL),
    ({"NGPUS": "2", "NNODES": "2", "MASTER_ADDR": "10.0.0.1"},
     TORCHRUN + ["--nnodes=2", "--node_rank=0", "--master_addr=10.0.0.1", "--master_port=29500",
                 "--nproc_per_node=2", "--redirects", "0:0,1:2"] + TOOL),
    ({"NGPUS": "1", "NNODES": "3", "NODE_RANK": "2", "MASTER_ADDR": "h0"},   # one process a node: torchrun too
     TORCHRUN + ["--nnodes=3", "--node_rank=2", "--master_addr=h0", "--master_port=29500",
                 "--nproc_per_node=1", "--redirects", "3"] + TOOL),
    ({"NGPUS": "2", "NNODES": "2", "RDZV_ENDPOINT": "h0:29400", "NODE_RANK": "1"},
     TORCHRUN + ["--nnodes=2", "--rdzv-backend=c10d", "--rdzv-endpoint=h0:29400", "--rdzv-id=advbct",
                 "--nproc_per_node=2", "--redirects", "0:0,1:2"] + TOOL),
    ({"NGPUS": "2", "NNODES": "2", "RDZV_ENDPOINT": "h0:29400", "RDZV_ID": "job7"},
     TORCHRUN + ["--nnodes=2", "--rdzv-backend=c10d", "--rdzv-endpoint=h0:29400", "--rdzv-id=job7",
                 "--nproc_per_node=2", "--redirects", "0:0,1:2"] + TOOL),
    # srun --ntasks-per-node=1 on 2 nodes: one torchrun per node, rendezvous on the step's first node
    (dict(SLURM_STEP, SLURM_STEP_NUM_TASKS="2", SLURM_STEP_NUM_NODES="2", SLURM_NODEID="1", NGPUS="8"),
     TORCHRUN + ["--nnodes=2", "--node_rank=1", "--master_addr=gpu07", "--master_port=23450",
                 "--nproc_per_node=8", "--redirects", "3"] + TOOL),
    (dict(SLURM_STEP, SLURM_STEP_NUM_TASKS="2", SLURM_STEP_NUM_NODES="2", SLURM_NODEID="0", NGPUS="2",
          MASTER_PORT="29999"),
     TORCHRUN + ["--nnodes=2", "--node_rank=0", "--master_addr=gpu07", "--master_port=29999",
                 "--nproc_per_node=2", "--redirects", "0:0,1:2"] + TOOL),
    # srun with 8 tasks on each of 2 nodes: each task is one rank, the tool runs directly
    (dict(SLURM_STEP, SLURM_STEP_NUM_TASKS="16", SLURM_STEP_NUM_NODES="2", SLURM_NODEID="0"), TOOL),
    (dict(SLURM_STEP, SLURM_STEP_NUM_TASKS="16", SLURM_STEP_NUM_NODES="2", SLURM_NODEID="0", NGPUS="1"), TOOL),
    # a one-task step, or the sbatch script itself (no step): the single-node rules
    (dict(SLURM_STEP, SLURM_STEP_NUM_TASKS="1", SLURM_STEP_NUM_NODES="1", SLURM_NODEID="0", NGPUS="2"),
     TORCHRUN + ["--standalone", "--nproc_per_node=2", "--redirects", "0:0,1:2"] + TOOL),
    ({"SLURM_JOB_ID": "5", "SLURM_NTASKS": "16", "SLURM_NNODES": "2", "NGPUS": "1"}, TOOL),
], ids=["one-process", "one-node", "static-node1", "static-node0", "one-process-a-node", "rdzv", "rdzv-id",
        "srun-per-node-1", "srun-per-node-0", "srun-per-gpu", "srun-per-gpu-ngpus1", "srun-one-task",
        "sbatch-script"])
def test_command_lines(stand_in, tmp_path, env, argv):
    assert launched(run_launch(stand_in, tmp_path, **env)) == argv


@pytest.mark.parametrize("env, message", [
    ({"NGPUS": "2", "NNODES": "2", "NODE_RANK": "1"},
     "error: NNODES=2 needs MASTER_ADDR (node 0's address, with NODE_RANK and MASTER_PORT) or "
     "RDZV_ENDPOINT=HOST:PORT on every node"),
    (dict(SLURM_STEP, SLURM_STEP_NUM_TASKS="16", SLURM_STEP_NUM_NODES="2", SLURM_NODEID="0", NGPUS="8"),
     "error: NGPUS=8 under srun's 16 tasks on 2 nodes: every task would start its own torchrun world; run one "
     "task per node (srun --ntasks-per-node=1) with NGPUS, or one task per GPU without NGPUS"),
    ({"NGPUS": "2", "NNODES": "2", "NODE_RANK": "2", "MASTER_ADDR": "h0"},
     "error: NODE_RANK=2 with NNODES=2: expected 0..1"),
    ({"NGPUS": "2", "NNODES": "two", "MASTER_ADDR": "h0"}, "error: NNODES='two': expected an integer >= 1"),
    (dict(SLURM_STEP, SLURM_STEP_NUM_TASKS="2", SLURM_STEP_NUM_NODES="2", SLURM_NODEID="0", NNODES="4"),
     "error: NNODES=4 but srun started 2 tasks, one per node: unset NNODES (the step's nodes are the run's nodes)"),
    (dict(SLURM_STEP, SLURM_STEP_NUM_TASKS="2", SLURM_STEP_NUM_NODES="2", SLURM_NODEID="0", NGPUS="2",
          SLURM_STEP_NODELIST="gpu[07-"),
     "error: SLURM_STEP_NODELIST='gpu[07-' is not a SLURM nodelist (unbalanced brackets)"),
], ids=["nnodes-without-master", "srun-per-gpu-with-ngpus", "node-rank", "nnodes-garbled", "nnodes-vs-srun",
        "nodelist"])
def test_refusals(stand_in, tmp_path, env, message):
    proc = run_launch(stand_in, tmp_path, **env)
    assert (proc.returncode, proc.stdout, proc.stderr) == (2, "", message + "\n")


# the bash entry points, in a repository whose path holds a space, quotes, a $ and backquotes, called with
# arguments that hold them too: a stand-in python prints what it was given (arguments, DATA, folder)
WEIRD = "r o'o \"t\" $HOME `x`"
STAND_IN_ENV = f"""#!{sys.executable}
import json, os, sys
print(json.dumps({{"argv": sys.argv[1:], "DATA": os.environ.get("DATA"), "cwd": os.getcwd()}}))
"""


@pytest.mark.parametrize("ngpus", ["1", "2"])
def test_entry_points_keep_paths_with_shell_characters_whole(tmp_path, ngpus):
    root = tmp_path / f"repo {WEIRD}"
    shutil.copytree(REPO / "scripts", root / "scripts")
    python = tmp_path / f"bin {WEIRD}" / "python"
    python.parent.mkdir()
    python.write_text(STAND_IN_ENV)
    python.chmod(0o755)
    venv = tmp_path / f"venv {WEIRD}"   # demo.sh's install step, satisfied (tests/scripts/test_reproduce.py)
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").symlink_to(python)
    (venv / ".advbct-installed").write_text("cpu cpu\n")
    (tmp_path / f"tmp {WEIRD}").mkdir()
    path, cfg = f"{tmp_path}/data {WEIRD}", f"c {WEIRD}.yml"
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": "/nowhere", "TMPDIR": f"{tmp_path}/tmp {WEIRD}",
           "PYTHON": str(python), "NGPUS": ngpus, "NEW_MODEL_PATH": f"{path}/new.pth", "DATA": path,
           "ADVBCT_VENV": str(venv), "ADVBCT_FAISS": "cpu"}
    launcher = [] if ngpus == "1" else ["-m", "advbct.launch", "LOG", "--standalone", "--nproc_per_node=2",
                                        "--redirects", "0:0,1:2"]
    cases = [
        ("train_new.sh", [cfg, "OUTPUT", path], launcher + [f"{root}/tools/train.py", "--cfg", cfg, "OUTPUT", path]),
        ("train_old.sh", [cfg, "DATA.ROOT", path],
         launcher + [f"{root}/tools/train.py", "--cfg", cfg, "DATA.ROOT", path]),
        ("extract_meta.sh", [cfg, "COMP_LOSS.META_PATH", path],
         launcher + [f"{root}/tools/extract_meta.py", "--cfg", cfg, "COMP_LOSS.META_PATH", path]),
        ("extract_feat.sh", [cfg], launcher + [f"{root}/tools/extract_meta.py", "--cfg", cfg]),
        ("test.sh", ["landmark", "roxford5k", path, "EVAL.SAVE_DIR", path],
         launcher + [f"{root}/tools/test.py", "--cfg", f"{root}/configs/test_model.yml", "NEW_MODEL.ARCH", "resnet18",
                     "NEW_MODEL.WEIGHTS", f"{path}/new.pth", "OLD_MODEL.ARCH", "resnet18", "OLD_MODEL.WEIGHTS",
                     "./output/final_model/resnet18_30class_oldmodel.pth.tar", "EVAL.DATASET_TYPE", "landmark",
                     "EVAL.DATASET", "roxford5k", "EVAL.ROOT", path, "EVAL.SAVE_DIR", path]),
        # the pipelines take the arguments as they come; DATA reaches them whole
        ("reproduce_table.sh", ["class", "r18", "--synthetic", f"t {WEIRD}"],
         ["-m", "advbct.pipelines", "table", "class", "r18", "--synthetic", f"t {WEIRD}"]),
        ("reproduce_ablation.sh", ["--synthetic", "tiny"],
         ["-m", "advbct.pipelines", "ablation", "--synthetic", "tiny"]),
        ("demo.sh", [], ["-m", "advbct.pipelines", "demo"]),
    ]
    for script, args, want in cases:
        proc = subprocess.run(["bash", str(root / "scripts" / script), *args], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0 and proc.stderr == "", (script, proc.stderr)
        got = json.loads(proc.stdout)
        if ngpus == "2" and got["argv"][:2] == ["-m", "advbct.launch"]:
            assert got["argv"][2].startswith(f"{tmp_path}/tmp {WEIRD}/advbct-launch.")
            got["argv"][2] = "LOG"
        assert got["argv"] == want, script
        assert got["DATA"] == path
        if script.startswith(("reproduce", "demo")):  # run from the repository root
            assert got["cwd"] == str(root)


# srun as the two tasks of a one-task-per-node step (node 0, then node 1); prints its own options first
FAKE_SRUN = f"""#!{sys.executable}
import json, os, subprocess, sys
options = [a for a in sys.argv[1:] if a.startswith("--")]
print(json.dumps(options), flush=True)
for node in (0, 1):
    env = dict(os.environ, SLURM_STEP_ID="0", SLURM_STEP_NUM_TASKS="2", SLURM_STEP_NUM_NODES="2",
               SLURM_STEP_NODELIST="gpu[07-08]", SLURM_NODEID=str(node), SLURM_PROCID=str(node), SLURM_LOCALID="0")
    subprocess.run(sys.argv[1 + len(options):], env=env, check=True)
"""


def test_sbatch_script_runs_train_new_once_per_node(stand_in, tmp_path):
    """scripts/slurm/train_new.sbatch (run where sbatch would, the submit folder given by SLURM): one srun
    task per node, each launching one torchrun over its node's GPUs with the step's rendezvous."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(FAKE_SRUN)
    (bin_dir / "srun").chmod(0o755)
    env = {"PATH": f"{bin_dir}:{os.environ.get('PATH', '/usr/bin:/bin')}", "HOME": str(tmp_path),
           "TMPDIR": str(tmp_path), "PYTHON": str(stand_in), "NGPUS": "8", "SLURM_JOB_ID": "12345",
           "SLURM_SUBMIT_DIR": str(REPO), "SLURM_CPUS_PER_TASK": "64"}
    cmd = ["bash", str(REPO / "scripts" / "slurm" / "train_new.sbatch"), "cfg.yml", "TRAIN.EPOCHS", "1"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    options, *nodes = [json.loads(line) for line in proc.stdout.splitlines()]
    assert options == ["--ntasks-per-node=1", "--cpus-per-task=64"]
    tool = [str(REPO / "tools" / "train.py"), "--cfg", "cfg.yml", "TRAIN.EPOCHS", "1"]
    for node, argv in enumerate(nodes):
        assert "advbct-launch." in argv[2]
        assert argv[:2] + argv[3:] == ["-m", "advbct.launch", "--nnodes=2", f"--node_rank={node}",
                                       "--master_addr=gpu07", "--master_port=23450", "--nproc_per_node=8",
                                       "--redirects", "3" if node else "0:0,1:2,2:2,3:2,4:2,5:2,6:2,7:2"] + tool
    assert len(nodes) == 2

    # requeued (SLURM_RESTART_COUNT 1): the run in OUTPUT is continued, unless the command line says otherwise
    for extra, added in (([], ["TRAIN.RESUME", "auto"]), (["TRAIN.OVERWRITE", "true"], []),
                         (["TRAIN.RESUME", "x/epoch_5.pth"], [])):
        proc = subprocess.run(cmd + extra, cwd=tmp_path, env=dict(env, SLURM_RESTART_COUNT="1"), capture_output=True,
                              text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        _, *nodes = [json.loads(line) for line in proc.stdout.splitlines()]
        assert all(argv[-len(tool + extra + added):] == tool + extra + added for argv in nodes)

    proc = subprocess.run(cmd, cwd=tmp_path, env=dict(env, SLURM_SUBMIT_DIR=str(tmp_path)), capture_output=True,
                          text=True, timeout=60)
    assert (proc.returncode, proc.stdout) == (2, "")
    assert proc.stderr == f"error: {tmp_path} has no scripts/train_new.sh: submit from the advbct repository root\n"


# ------------------------------------------------------------------- advbct.launch on a node other than 0
def fake_torchrun(monkeypatch, failures):
    """torch.distributed.run.main replaced by one raising ChildFailedError for ``{global: (local, code)}``."""
    import torch.distributed.run as run
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

    def main(args):
        raise ChildFailedError("train.py", {rank: ProcessFailure(local_rank=local, pid=100 + rank, exitcode=code,
                                                                 error_file="")
                                            for rank, (local, code) in failures.items()})

    monkeypatch.setattr(run, "main", main)


@pytest.fixture
def node1_logs(tmp_path):
    """torchrun's log folders on node 1 of 2 x 2: local ranks 0 and 1 (global 2 and 3)."""
    for local in (0, 1):
        folder = tmp_path / "logs" / "run7_abc" / "attempt_0" / str(local)
        folder.mkdir(parents=True)
        (folder / "stderr.log").write_text(f"warning: local {local}\nerror: from local rank {local}\n")
    return tmp_path / "logs"


def test_failed_rank_on_node1_reports_its_local_log(monkeypatch, capfd, node1_logs):
    """Global rank 3 = local rank 1 of node 1 exits 2: its one line comes from local rank 1's stderr.log
    (there is no folder 3), and the exit status is its own."""
    from advbct.launch import main

    fake_torchrun(monkeypatch, {3: (1, 2)})
    assert main([str(node1_logs), "--nnodes=2", "--node_rank=1", "train.py"]) == 2
    assert capfd.readouterr().err == "error: from local rank 1\n"
    # torchrun's failure logging is silenced while it runs, not for the rest of the calling process
    assert logging.root.manager.disable == logging.NOTSET


def test_crashed_rank_on_node1_is_named_by_global_rank(monkeypatch, capfd, node1_logs):
    from advbct.launch import main

    fake_torchrun(monkeypatch, {2: (0, 1)})
    assert main([str(node1_logs), "--nnodes=2", "--node_rank=1", "train.py"]) == 1
    assert capfd.readouterr().err == "warning: local 0\nerror: from local rank 0\nerror: rank 2 failed (exit code 1)\n"


# ------------------------------------------------------------------------------------------- end to end
def run_together(commands, envs):
    """Start every command at once (they meet in one process group), wait, require success of all."""
    procs = [subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for cmd, env in zip(commands, envs)]
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=300))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    for proc, (_, err) in zip(procs, outputs):
        assert proc.returncode == 0, err[-4000:]
    return outputs


def assert_same_training(two, one):
    """Gradients of the first step (momentum), weights and BN statistics, and the loss module's state
    (elastic radii, discriminator) agree as in tests/engine/test_trainer_ddp.py."""
    assert_states_close(momentum_buffers(two), momentum_buffers(one), "momentum", tol=1e-4)
    assert_states_close(two["model"], one["model"], "weights and BN statistics", tol=1e-4)
    assert_states_close(two["comp_loss"], one["comp_loss"], "loss module", tol=1e-4)


@pytest.mark.slow
def test_two_nodes_equal_one_process(ddp_setup, advbct_one_process, tmp_path):
    """The same launch command on two "nodes" (NNODES=2, NODE_RANK 0 and 1, one process each, batch B/2)
    trains one step exactly like one process with batch B; only node 0 shows the training log."""
    overrides = base_overrides(ddp_setup["data"], tmp_path / "two", BATCH // WORLD, ddp_setup["comp"]["advbct"])
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(NNODES="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), NGPUS="1",
               PYTHON=sys.executable, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")  # one core per "node"
    script = f"source {SCRIPTS_LIB}/launch.sh; launch tools/train.py " + " ".join(f"'{a}'" for a in overrides)
    (_, err0), (_, err1) = run_together([["bash", "-c", script]] * 2,
                                        [dict(env, NODE_RANK=str(rank)) for rank in range(2)])
    assert "epoch 1/1" in err0 and err1 == ""
    assert_same_training(load_last(tmp_path / "two"), advbct_one_process["last"])


@pytest.mark.slow
def test_srun_tasks_equal_one_process(ddp_setup, advbct_one_process, tmp_path):
    """Two plain tools/train.py processes (its main in children forked from this one) with the variables srun
    gives the two tasks of a step (no torchrun, no RANK/WORLD_SIZE) form one world and train one step exactly
    like one process with the doubled batch."""
    overrides = base_overrides(ddp_setup["data"], tmp_path / "two", BATCH // WORLD, ddp_setup["comp"]["advbct"])
    base = {k: v for k, v in os.environ.items()
            if not k.startswith("SLURM_") and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")}
    base.update(PYTHONPATH=str(REPO), CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", SLURM_JOB_ID="4242", SLURM_STEP_ID="0",
                SLURM_STEP_NUM_TASKS="2", SLURM_STEP_NUM_NODES="1", SLURM_STEP_NODELIST="localhost",
                SLURM_STEP_TASKS_PER_NODE="2", SLURM_NODEID="0", MASTER_ADDR="127.0.0.1",
                MASTER_PORT=str(free_port()))
    spec = importlib.util.spec_from_file_location("advbct_train_tool", REPO / "tools" / "train.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    logs = [tmp_path / f"task{r}.log" for r in range(2)]
    pids = [fork_main(tool.main, overrides, dict(base, SLURM_PROCID=str(r), SLURM_LOCALID=str(r)), log)
            for r, log in enumerate(logs)]
    wait_children(pids, logs)
    assert_same_training(load_last(tmp_path / "two"), advbct_one_process["last"])
