"""A pipeline killed inside a training step, then run again: the step continues from its last full epoch
and ends where an uninterrupted run ends.

The demo's plan (advbct.pipelines.demo) on the tiny synthetic benchmark, up to its first training (the
pretrained backbone, shrunk to 32 px and 2 iterations per epoch), run by ``run_steps`` in a process group of
its own as scripts/demo.sh runs it (a child forked from this process, which has imported torch already; its
steps are fresh processes as always), with its data and output folders named with a space, quotes and a
``$``. CPU, one thread: the computation is deterministic, so the resumed model equals, bit for bit, the one
this process trains from the same config without a break."""

import dataclasses
import os
import re
import signal
import sys
import time

import pytest
import torch

from advbct.io import is_temporary
from helpers import REPO, fork_main

pytestmark = pytest.mark.slow

EPOCHS = 3
SHRINK = ("DATA.IMG_SIZE", "32", "MODEL.EMB_DIM", "32", "TRAIN.EPOCHS", str(EPOCHS), "TRAIN.MAX_ITERS_PER_EPOCH", "2",
          "TRAIN.BATCH_SIZE", "8", "DATA.NUM_WORKERS", "0")
WEIRD = "a b 'c' \"d\" $HOME"   # a space, quotes and a $ that no shell may expand


def run_plan(argv):
    """The pipeline's command line on the demo's plan up to its pretraining (shrunk): ``argv`` is DATA, OUT."""
    from advbct.cli import guarded
    from advbct.pipelines import demo_steps, run_steps

    data, out = argv
    plan = demo_steps("tiny", data, out)[:4]
    plan[3] = dataclasses.replace(plan[3], command=(*plan[3].command, *SHRINK))
    return guarded(run_steps)(plan)


class Plan:
    """:func:`run_plan` from the repository root in a forked child, in a new process group; its stdout and
    stderr together in ``log``."""

    def __init__(self, data, out, log):
        env = dict(os.environ, NGPUS="1", OMP_NUM_THREADS="1", PYTHON=sys.executable)
        self.log, self.returncode = log, None
        self.pid = fork_main(run_plan, [data, out], env, log, cwd=REPO, new_group=True)

    def poll(self):
        if self.returncode is None:
            done, status = os.waitpid(self.pid, os.WNOHANG)
            if done:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self, timeout=None):
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() > deadline:
                os.killpg(self.pid, signal.SIGKILL)
                self.wait()
                raise AssertionError(f"the plan ran over {timeout} s: {self.output()[-3000:]}")
            time.sleep(0.02)
        return self.returncode

    def output(self):
        return self.log.read_text() if self.log.exists() else ""


def finish(plan, timeout=120):
    plan.wait(timeout)
    out = plan.output()
    assert plan.returncode == 0, out[-3000:]
    return out


def model_of(path):
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


def uninterrupted(data, out):
    """The demo's pretraining (shrunk) trained in this process without a break, one thread: its final.pth."""
    from advbct.config import load_config
    from advbct.engine.trainer import Trainer
    from advbct.pipelines import demo_steps

    step = demo_steps("tiny", data, out)[3]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        Trainer(load_config(str(REPO / step.command[2]), [*step.command[3:], *SHRINK])).fit()
    finally:
        torch.set_num_threads(threads)
    return f"{out}/pretrain/final.pth"


def test_demo_killed_in_a_training_step_resumes_it_and_ends_as_an_uninterrupted_run(tiny_synthetic, tmp_path):
    data = tmp_path / f"data {WEIRD}"
    data.symlink_to(tiny_synthetic)   # (read only: the plan's first steps write nothing into DATA)
    out = tmp_path / f"out {WEIRD}"
    killed = Plan(str(data), str(out), tmp_path / "first.log")
    run = out / "pretrain"
    deadline = time.monotonic() + 90
    while not (run / "last.pth").exists():   # epoch 1 saved: kill the whole pipeline, trainer included
        assert killed.poll() is None and time.monotonic() < deadline, killed.output()[-3000:]
        time.sleep(0.02)
    os.killpg(killed.pid, signal.SIGKILL)
    killed.wait()
    assert killed.returncode == -signal.SIGKILL
    assert not (run / "final.pth").exists()   # killed inside the step

    again = Plan(str(data), str(out), tmp_path / "second.log")
    reference = uninterrupted(str(data), str(tmp_path / f"ref {WEIRD}"))   # meanwhile, one core each
    second = finish(again)
    assert second.startswith(f"[done] 1/9 synthetic benchmark (tiny)  ({data}/SYNTHETIC.json)\n")
    assert (f"[resume] 2/9 pretrain backbone (r18, {data}/pretrain)  (log: {out}/logs/pretrain.log; the run "
            f"in {run} continues from its last.pth)") in second
    log = (run / "log.txt").read_text()
    resumed = re.findall(r"resumed from (.+) at epoch (\d+)", log)
    assert len(resumed) == 1 and resumed[0][0] == f"{run}/last.pth" and 1 <= int(resumed[0][1]) < EPOCHS
    k = int(resumed[0][1])
    after = log[log.index("resumed from"):]   # the epochs after k, each once
    assert re.findall(r"epoch (\d+)/3 \(", after) == [str(e) for e in range(k + 1, EPOCHS + 1)]
    steps = (out / "logs" / "pretrain.log").read_text()
    assert steps.count("train resnet18:") == 2 and f"at epoch {k}" in steps   # both attempts kept in the log

    # the continued run ends bit for bit where the uninterrupted one does
    final, want = model_of(run / "final.pth"), model_of(reference)
    assert final.keys() == want.keys()
    assert all(torch.equal(final[key], want[key]) for key in want)
    state = torch.load(run / "last.pth", map_location="cpu", weights_only=True)
    assert state["epoch"] == EPOCHS and state["config"]["OUTPUT"] == str(run)
    assert state["config"]["TRAIN"]["RESUME"] == "auto" and state["config"]["TRAIN"]["OVERWRITE"] is False
    leftovers = [os.path.join(d, n) for d, _, names in os.walk(tmp_path) for n in names if is_temporary(n)]
    assert leftovers == []
    assert sorted(p.name for p in out.iterdir()) == ["BENCHMARK.sha256", "logs", "pretrain"]
    assert not (run / "epoch_1.pth").exists() and (data / "SYNTHETIC.json").is_file()
