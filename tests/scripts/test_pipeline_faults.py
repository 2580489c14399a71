"""A pipeline killed inside a training step, then run again: the step continues from its last full epoch
and ends where an uninterrupted run ends.

The demo's plan (advbct.pipelines.demo) on the tiny synthetic benchmark, up to its first training (the
pretrained backbone, shrunk to 32 px and 2 iterations per epoch), run by ``run_steps`` in a process group of
its own as scripts/demo.sh runs it, with its data and output folders named with a space, quotes and a
``$``. CPU, one thread: the computation is deterministic, so the resumed model equals, bit for bit, the one
this process trains from the same config without a break."""

import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

from advbct.io import is_temporary
from helpers import REPO

pytestmark = pytest.mark.slow

EPOCHS = 3
SHRINK = ("DATA.IMG_SIZE", "32", "MODEL.EMB_DIM", "32", "TRAIN.EPOCHS", str(EPOCHS), "TRAIN.MAX_ITERS_PER_EPOCH", "2",
          "TRAIN.BATCH_SIZE", "8", "DATA.NUM_WORKERS", "0")
WEIRD = "a b 'c' \"d\" $HOME"   # a space, quotes and a $ that no shell may expand


def start_plan(data, out):
    """``run_steps`` of the demo's plan up to its pretraining (shrunk), from the repository root, in a new
    process group; stdout and stderr together in the returned Popen's stdout."""
    code = ("import dataclasses, sys\nfrom advbct.cli import guarded\nfrom advbct.pipelines import *\n"
            f"plan = demo_steps('tiny', {data!r}, {out!r})[:4]\n"
            f"plan[3] = dataclasses.replace(plan[3], command=(*plan[3].command, *{SHRINK!r}))\n"
            "sys.exit(guarded(run_steps)(plan))")
    env = dict(os.environ, NGPUS="1", OMP_NUM_THREADS="1", PYTHON=sys.executable)
    return subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, process_group=0)


def finish(proc, timeout=120):
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-3000:]
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
    killed = start_plan(str(data), str(out))
    run = out / "pretrain"
    deadline = time.monotonic() + 90
    while not (run / "last.pth").exists():   # epoch 1 saved: kill the whole pipeline, trainer included
        assert killed.poll() is None and time.monotonic() < deadline, killed.stdout.read()[-3000:]
        time.sleep(0.02)
    os.killpg(killed.pid, signal.SIGKILL)
    killed.wait()
    assert killed.returncode == -signal.SIGKILL
    assert not (run / "final.pth").exists()   # killed inside the step

    again = start_plan(str(data), str(out))
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
