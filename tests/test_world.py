"""advbct.world: SLURM nodelists and task counts, and the rank a process gets from torchrun's or srun's
variables (hand-written expected values, refusals as one-line errors naming the variable)."""

import subprocess
import sys
from pathlib import Path

import pytest

from advbct.errors import UserError
from advbct.world import master_port, process_env, slurm_hostnames, tasks_per_node

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("nodelist, hosts", [
    ("node[01-03,07],gpu-a1,x[1-2]-ib",
     ["node01", "node02", "node03", "node07", "gpu-a1", "x1-ib", "x2-ib"]),
    ("localhost", ["localhost"]),
    ("n[9-11]", ["n9", "n10", "n11"]),              # padding is the lower bound's width
    ("n[009-011]", ["n009", "n010", "n011"]),
    ("r[1-2]n[01-02]", ["r1n01", "r1n02", "r2n01", "r2n02"]),
    ("b[3,1]", ["b3", "b1"]),                       # order as written, not sorted
])
def test_slurm_hostnames(nodelist, hosts):
    assert slurm_hostnames(nodelist) == hosts


@pytest.mark.parametrize("nodelist", ["node[1-", "node]", "node[]", "a,,b", "n[3-1]", "n[a-b]", ""])
def test_slurm_hostnames_refuses_garbled_lists(nodelist):
    with pytest.raises(UserError, match=r"^SLURM_JOB_NODELIST=.* is not a SLURM nodelist") as err:
        slurm_hostnames(nodelist, "SLURM_JOB_NODELIST")
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("spec, counts", [("4(x2),3", [4, 4, 3]), ("2", [2]), ("1,2(x3)", [1, 2, 2, 2])])
def test_tasks_per_node(spec, counts):
    assert tasks_per_node(spec) == counts


@pytest.mark.parametrize("spec", ["4(x),3", "0", "x", "4(x0)", ""])
def test_tasks_per_node_refuses_garbled_counts(spec):
    with pytest.raises(UserError, match=r"^SLURM_STEP_TASKS_PER_NODE="):
        tasks_per_node(spec, "SLURM_STEP_TASKS_PER_NODE")


# 8 tasks on gpu07 (4) and gpu08 (4), step 3 of job 12345
STEP = {"SLURM_JOB_ID": "12345", "SLURM_STEP_ID": "3", "SLURM_STEP_NUM_TASKS": "8", "SLURM_STEP_NUM_NODES": "2",
        "SLURM_STEP_NODELIST": "gpu[07-08]", "SLURM_STEP_TASKS_PER_NODE": "4(x2)", "SLURM_JOB_NODELIST": "gpu[01-08]",
        "SLURM_TASKS_PER_NODE": "8(x8)", "SLURM_NTASKS": "64"}


def task(procid, nodeid, localid, **extra):
    return dict(STEP, SLURM_PROCID=str(procid), SLURM_NODEID=str(nodeid), SLURM_LOCALID=str(localid), **extra)


def test_srun_task_is_one_rank():
    assert process_env(task(6, 1, 2)) == {
        "RANK": "6", "WORLD_SIZE": "8", "LOCAL_RANK": "2", "LOCAL_WORLD_SIZE": "4",
        "MASTER_ADDR": "gpu07", "MASTER_PORT": "23453"}  # 20000 + (12345 * 10 + 3) % 20000


def test_srun_tasks_agree_on_the_world():
    """Every task of the step gets a distinct rank and the same rendezvous, without communicating."""
    envs = [process_env(task(p, p // 4, p % 4)) for p in range(8)]
    assert sorted(int(e["RANK"]) for e in envs) == list(range(8))
    assert {(e["WORLD_SIZE"], e["MASTER_ADDR"], e["MASTER_PORT"], e["LOCAL_WORLD_SIZE"]) for e in envs} == {
        ("8", "gpu07", "23453", "4")}
    assert [e["LOCAL_RANK"] for e in envs] == ["0", "1", "2", "3"] * 2


def test_srun_uneven_nodes_and_fallbacks():
    """3 tasks on the first node, 2 on the others; the job-level variables stand in for the step's."""
    env = {"SLURM_JOB_ID": "7", "SLURM_STEP_ID": "0", "SLURM_STEP_NUM_TASKS": "7", "SLURM_PROCID": "6",
           "SLURM_NODEID": "2", "SLURM_LOCALID": "1", "SLURM_TASKS_PER_NODE": "3,2(x2)",
           "SLURM_JOB_NODELIST": "a[5-7]"}
    assert process_env(env) == {"RANK": "6", "WORLD_SIZE": "7", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
                                "MASTER_ADDR": "a5", "MASTER_PORT": "20070"}


def test_srun_master_from_the_environment_wins():
    got = process_env(task(0, 0, 0, MASTER_ADDR="10.1.2.3", MASTER_PORT="29511"))
    assert (got["MASTER_ADDR"], got["MASTER_PORT"]) == ("10.1.2.3", "29511")


def test_master_port_differs_between_steps_and_jobs():
    ports = {master_port({"SLURM_JOB_ID": str(job), "SLURM_STEP_ID": str(step)})
             for job in (12345, 12346) for step in range(4)}
    assert len(ports) == 8 and all(20000 <= p < 40000 for p in ports)


@pytest.mark.parametrize("env", [
    {},                                                                        # plain python
    {"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "h", "MASTER_PORT": "1"},  # env:// set by hand
    {"RANK": "1", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "TORCHELASTIC_RUN_ID": "x", "GROUP_WORLD_SIZE": "1"},
    dict(STEP, SLURM_STEP_NUM_TASKS="1", SLURM_PROCID="0"),                   # srun -n 1 python ...
    {"SLURM_JOB_ID": "5", "SLURM_NTASKS": "8", "SLURM_PROCID": "0", "SLURM_JOB_NODELIST": "n[1-2]"},  # sbatch script
    # torchrun, one agent per task of a 2-task step (srun --ntasks-per-node=1 bash scripts/train_new.sh)
    dict(STEP, SLURM_STEP_NUM_TASKS="2", RANK="9", WORLD_SIZE="16", TORCHELASTIC_RUN_ID="none",
         GROUP_WORLD_SIZE="2"),
], ids=["plain", "manual-env", "torchrun", "one-task-step", "batch-script", "torchrun-per-node"])
def test_nothing_to_add(env):
    assert process_env(env) == {}


def test_independent_torchrun_worlds_are_refused():
    """``srun -n 8 torchrun --standalone ...``: eight one-agent worlds that would all write one OUTPUT."""
    env = task(5, 1, 1, RANK="1", WORLD_SIZE="2", TORCHELASTIC_RUN_ID="abc", GROUP_WORLD_SIZE="1")
    with pytest.raises(UserError) as err:
        process_env(env)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("srun started 8 tasks (SLURM_STEP_NUM_TASKS) each running its own torchrun")
    assert "8 independent runs writing into one OUTPUT" in message
    assert "--ntasks-per-node=1" in message and "one task per GPU without torchrun" in message


@pytest.mark.parametrize("change, variable", [
    ({"SLURM_PROCID": None}, "SLURM_PROCID is not set"),
    ({"SLURM_LOCALID": "x"}, "SLURM_LOCALID='x'"),
    ({"SLURM_STEP_NUM_TASKS": "two"}, "SLURM_STEP_NUM_TASKS='two'"),
    ({"SLURM_STEP_NUM_TASKS": "0"}, "SLURM_STEP_NUM_TASKS='0'"),
    ({"SLURM_PROCID": "8"}, "SLURM_PROCID=8 is not below SLURM_STEP_NUM_TASKS=8"),
    ({"SLURM_NODEID": None}, "SLURM_NODEID is not set"),
    ({"SLURM_NODEID": "2"}, "SLURM_NODEID=2"),
    ({"SLURM_LOCALID": "4"}, "SLURM_LOCALID=4"),
    ({"SLURM_STEP_TASKS_PER_NODE": "4(x2", "SLURM_TASKS_PER_NODE": None}, "SLURM_STEP_TASKS_PER_NODE='4(x2'"),
    ({"SLURM_STEP_TASKS_PER_NODE": None, "SLURM_TASKS_PER_NODE": None}, "SLURM_STEP_TASKS_PER_NODE is not set"),
    ({"SLURM_STEP_NODELIST": "gpu[07-"}, "SLURM_STEP_NODELIST='gpu[07-'"),
    ({"SLURM_STEP_NODELIST": None, "SLURM_JOB_NODELIST": None}, "SLURM_STEP_NODELIST is not set"),
    ({"SLURM_JOB_ID": None}, "SLURM_JOB_ID is not set"),
    ({"MASTER_PORT": "70000"}, "MASTER_PORT='70000'"),
    ({"WORLD_SIZE": "16"}, "WORLD_SIZE='16' is set, but srun started 8 tasks"),
])
def test_missing_or_garbled_slurm_variables(change, variable):
    env = task(6, 1, 2)
    for key, value in change.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    with pytest.raises(UserError) as err:
        process_env(env)
    assert str(err.value).startswith(variable) and "\n" not in str(err.value)


def run_world(*args, env):
    return subprocess.run([sys.executable, "-m", "advbct.world", *args], cwd=REPO, capture_output=True, text=True,
                          env=dict(env, PATH="/usr/bin:/bin", PYTHONPATH=str(REPO)))


def test_command_line():
    """What launch.sh asks: the step's rendezvous as "ADDR PORT"; a bad variable is one line, exit 2."""
    proc = run_world("master", env=task(0, 0, 0))
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "gpu07 23453\n", "")
    proc = run_world("hostnames", "x[1-2]-ib,y", env={})
    assert proc.stdout == "x1-ib\nx2-ib\ny\n"
    proc = run_world("master", env=dict(task(0, 0, 0), SLURM_STEP_NODELIST="gpu[07-"))
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr == "error: SLURM_STEP_NODELIST='gpu[07-' is not a SLURM nodelist (unbalanced brackets)\n"


def test_no_torch_import():
    """The launcher calls it before every run: it must stay cheap (no torch)."""
    code = "import sys, advbct.world; print('torch' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert proc.stdout == "False\n"
