"""A training run loses nothing and records nothing false: a run into a folder holding another is refused
before any write, every input is checked before OUTPUT is touched, a resume continues the run it names
(or says in one line why not), killed writes leave no temporary behind, and a non-finite loss names only
checkpoints that exist. The slow fault test SIGKILLs a real training at random points.

Tiny runs on the ``image_list`` fixture (tests/conftest.py): resnet18 with a 32-d embedding at 16 px, batch 8.
"""

import os
import random
import shutil
import signal
import sys
import time
import traceback

import pytest
import torch
import yaml

from advbct.config import load_config
from advbct.engine.trainer import Trainer
from advbct.io import is_temporary
from advbct.models import save_checkpoint
from helpers import REPO, flat_tensors
from helpers import load_checkpoint as load

EMB = 32
CHECKPOINT_TEMPS = (".last.pth.", ".final.pth.", ".epoch_")  # advbct.io temporaries of the checkpoints


def overrides(data, out, *extra, epochs=1):
    return ["OUTPUT", str(out), "DATA.TRAIN_LIST", str(data / "train.txt"), "DATA.ROOT", str(data),
            "MODEL.ARCH", "resnet18", "MODEL.EMB_DIM", str(EMB), "MODEL.PRETRAINED", "false",
            "DATA.IMG_SIZE", "16", "DATA.NUM_WORKERS", "0", "TRAIN.BATCH_SIZE", "8", "TRAIN.EPOCHS", str(epochs),
            "TRAIN.MAX_ITERS_PER_EPOCH", "1", "TRAIN.PRINT_FREQ", "1", "TRAIN.SAVE_FREQ", "1", "SEED", "1234",
            *extra]


def train_tool():
    import importlib.util
    spec = importlib.util.spec_from_file_location("advbct_train_tool", REPO / "tools" / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def refused(argv, capsys, code=2):
    """tools/train.py's main(argv) ends with exit status ``code`` and one 'error: ' line; that line."""
    with pytest.raises(SystemExit) as exc:
        train_tool().main(argv)
    err = capsys.readouterr().err
    assert exc.value.code == code, err
    lines = [ln for ln in err.replace("\r", "\n").splitlines() if ln.strip()]
    assert lines[-1].startswith("error: ") and "Traceback" not in err, err
    return lines[-1]


def listing(folder):
    """{relative path: (size, mtime_ns, bytes of small files)} of everything under ``folder``."""
    out = {}
    for path in sorted(folder.rglob("*")):
        st = path.stat()
        small = path.read_bytes() if path.is_file() and st.st_size < 100_000 else None
        out[str(path.relative_to(folder))] = (st.st_size, st.st_mtime_ns, small)
    return out


@pytest.fixture(scope="module")
def finished(image_list, tmp_path_factory):
    """The files of a finished one-epoch run, as the trainer writes them (last.pth, epoch_1.pth, final.pth,
    config.yaml, log.txt, tb/; its weights untrained: saved without a step, which none of these tests needs)."""
    out = tmp_path_factory.mktemp("finished") / "run"
    Trainer(load_config(None, overrides(image_list, out)))._save(1)
    return out


@pytest.fixture
def run(finished, tmp_path):
    """A copy of ``finished`` of this test's own (checkpoints hard-linked: advbct.io replaces, never edits)."""
    out = tmp_path / "run"
    shutil.copytree(finished, out, copy_function=lambda s, d: os.link(s, d) if s.endswith(".pth")
                    else shutil.copy2(s, d))
    return out


# ------------------------------------------------------------------------- a folder that holds a run
def test_a_fresh_run_into_a_finished_one_is_refused_before_any_write(image_list, run, capsys):
    before = listing(run)
    msg = refused(overrides(image_list, run), capsys)
    assert msg == (f"error: OUTPUT {run} already holds a run (last.pth, final.pth, epoch_1.pth): pass TRAIN.RESUME "
                   f"auto to continue it, or TRAIN.OVERWRITE true to start over (its checkpoints are then removed)")
    assert listing(run) == before  # config.yaml, log.txt, tb/ and the checkpoints as they were


def test_overwrite_removes_the_old_run_only_once_the_inputs_passed(image_list, run, capsys):
    """TRAIN.OVERWRITE true: a bad input still leaves the old run whole; a good one starts afresh (stale
    epoch_N.pth, the old log, tensorboard events and temporaries removed, the new config recorded)."""
    (run / "epoch_7.pth").write_bytes(b"stale")
    with open(run / "log.txt", "a") as log:
        log.write("a line of the old run\n")
    old_events = sorted(p.name for p in (run / "tb").iterdir())
    before = listing(run)
    bad = overrides(image_list, run, "TRAIN.OVERWRITE", "true", "DATA.DECODE", "turbo")
    assert refused(bad, capsys).startswith("error: DATA.DECODE 'turbo'")
    assert listing(run) == before

    trainer = Trainer(load_config(None, overrides(image_list, run, "TRAIN.OVERWRITE", "true", "TRAIN.LR", "0.05")))
    assert sorted(p.name for p in run.iterdir()) == ["config.yaml", "log.txt", "tb"]
    assert old_events and not set(old_events) & {p.name for p in (run / "tb").iterdir()}
    log = (run / "log.txt").read_text()
    assert "a line of the old run" not in log
    assert (f"TRAIN.OVERWRITE: removed the previous run's last.pth, final.pth, epoch_1.pth, epoch_7.pth and "
            f"2 more from {run}") in log
    recorded = yaml.safe_load((run / "config.yaml").read_text())
    assert recorded["TRAIN"]["LR"] == 0.05 and recorded == trainer.cfg.to_dict()


def test_a_run_is_continued_from_its_own_last_checkpoint_only(image_list, run, tmp_path, capsys):
    """Resuming from another checkpoint into a folder holding a run would mix two runs' checkpoints: refused
    unless TRAIN.OVERWRITE true, which keeps the checkpoint resumed from and removes the rest."""
    (tmp_path / "other").mkdir()
    shutil.copy(run / "last.pth", tmp_path / "other" / "last.pth")
    before = listing(run)
    for source in (run / "epoch_1.pth", tmp_path / "other" / "last.pth"):
        msg = refused(overrides(image_list, run, "TRAIN.RESUME", str(source), "TRAIN.EPOCHS", "2"), capsys)
        assert msg == (f"error: OUTPUT {run} holds a run (last.pth, final.pth, epoch_1.pth), continued from its "
                       f"last.pth only, not from {source}: pass TRAIN.OVERWRITE true to replace that run's "
                       f"checkpoints (the one resumed from is kept), or choose another OUTPUT")
        assert listing(run) == before
    trainer = Trainer(load_config(None, overrides(image_list, run, "TRAIN.RESUME", str(run / "epoch_1.pth"),
                                                  "TRAIN.EPOCHS", "2", "TRAIN.OVERWRITE", "true")))
    assert trainer.start_epoch == 1
    assert sorted(p.name for p in run.iterdir()) == ["config.yaml", "epoch_1.pth", "log.txt", "tb"]


# ----------------------------------------------------------------------- inputs checked before writes
@pytest.mark.parametrize("bad, message", [
    (["DATA.TRAIN_LIST", "/no/such/list.txt"], "/no/such/list.txt"),
    (["DATA.DECODE", "turbo"], "DATA.DECODE 'turbo'"),
    (["COMP_LOSS.TYPE", "bct", "OLD_MODEL.WEIGHTS", "/no/such/old.pth"], "/no/such/old.pth"),
    (["TRAIN.SAVE_FREQ", "0"], "TRAIN.SAVE_FREQ"),
], ids=["list", "decode", "old_checkpoint", "save_freq"])
def test_a_refused_input_writes_nothing(image_list, run, tmp_path, capsys, bad, message):
    """No OUTPUT folder is created for a fresh run, and a finished run's files stay as they were."""
    fresh = tmp_path / "fresh"
    assert message in refused(overrides(image_list, fresh, *bad), capsys)
    assert not fresh.exists()
    before = listing(run)
    assert message in refused(overrides(image_list, run, "TRAIN.OVERWRITE", "true", *bad), capsys)
    assert listing(run) == before


def test_a_resume_whose_data_vanished_leaves_the_run_as_it_was(image_list, run, capsys):
    """The list the run trained on is gone: refused, and config.yaml / log.txt are not rewritten."""
    gone = run.parent / "moved" / "train.txt"
    state = load(run / "last.pth")
    state["config"]["DATA"]["TRAIN_LIST"] = str(gone)
    os.remove(run / "last.pth")
    save_checkpoint(run / "last.pth", state)  # a run that trained on ``gone``
    before = listing(run)
    argv = overrides(image_list, run, "TRAIN.RESUME", "auto", "DATA.TRAIN_LIST", str(gone))
    assert f"{gone}: image list not found" in refused(argv, capsys)
    assert listing(run) == before


# ------------------------------------------------------------------------------------------- resuming
def test_a_weights_only_checkpoint_is_not_resumable(image_list, run, tmp_path, capsys):
    final = run / "final.pth"
    msg = refused(overrides(image_list, tmp_path / "new", "TRAIN.RESUME", str(final)), capsys)
    assert msg == (f"error: {final}: not a resumable checkpoint (weights only; it lacks optimizer, scheduler, rng): "
                   f"resume from last.pth or epoch_1.pth in its folder")
    assert not (tmp_path / "new").exists()


def test_a_resume_into_another_model_names_the_keys(image_list, run, capsys):
    before = listing(run)
    msg = refused(overrides(image_list, run, "TRAIN.RESUME", "auto", "MODEL.ARCH", "resnet34", "MODEL.EMB_DIM",
                            "16"), capsys)
    assert msg == (f"error: TRAIN.RESUME {run / 'last.pth'}: this run changes keys that stay as saved on resume: "
                   f"MODEL.ARCH resnet18 -> resnet34, MODEL.EMB_DIM 32 -> 16 (saved -> requested); resume with the "
                   f"saved values, or start a new run (another OUTPUT, or TRAIN.OVERWRITE true without TRAIN.RESUME)")
    assert listing(run) == before


def test_a_resume_changing_the_recipe_is_refused(image_list, run, capsys):
    msg = refused(overrides(image_list, run, "TRAIN.RESUME", "auto", "TRAIN.LR", "0.05", "TRAIN.LR_STEPS", "[1]"),
                  capsys)
    assert ": this run changes keys that stay as saved on resume: TRAIN.LR 0.1 -> 0.05, TRAIN.LR_STEPS " \
           "[5, 10, 20] -> [1] (saved -> requested)" in msg


def test_a_resume_may_train_longer_and_records_what_it_uses(image_list, run):
    """The keys of RESUME_MAY_CHANGE take the requested values (LR milestones stay as saved), the rest the
    checkpoint's; config.yaml and the config every new checkpoint stores say exactly that."""
    from advbct.engine.trainer import RESUME_MAY_CHANGE
    assert {"TRAIN.EPOCHS", "TRAIN.PRINT_FREQ", "TRAIN.SAVE_FREQ", "TRAIN.EVAL_FREQ", "DATA.NUM_WORKERS",
            "EVAL.*", "OUTPUT", "TRAIN.RESUME", "TRAIN.OVERWRITE"} <= set(RESUME_MAY_CHANGE)
    saved = load(run / "last.pth")
    trainer = Trainer(load_config(None, overrides(image_list, run, "TRAIN.RESUME", "auto", "TRAIN.EPOCHS", "9",
                                                  "TRAIN.PRINT_FREQ", "5", "EVAL.BATCH_SIZE", "3")))
    assert trainer.start_epoch == 1 and trainer.scheduler.milestones == saved["scheduler"]["milestones"]
    want = saved["config"]
    want["OUTPUT"] = str(run)  # the checkpoint's, copied here
    want["TRAIN"].update(EPOCHS=9, PRINT_FREQ=5, RESUME="auto")
    want["EVAL"]["BATCH_SIZE"] = 3
    assert yaml.safe_load((run / "config.yaml").read_text()) == want
    assert trainer._state(2)["config"] == want


def test_a_resume_may_read_the_images_from_another_root(image_list, run, tmp_path):
    """DATA.ROOT (a copy of the images on the compute node) and DATA.DECODE may change; the list may not."""
    copy = tmp_path / "local copy"
    shutil.copytree(image_list / "img", copy / "img")
    argv = overrides(image_list, run, "TRAIN.RESUME", "auto", "DATA.DECODE", "pil_draft")
    argv[argv.index("DATA.ROOT") + 1] = str(copy)
    trainer = Trainer(load_config(None, argv))
    assert trainer.start_epoch == 1 and trainer.dataset.paths[0].startswith(str(copy))
    data = yaml.safe_load((run / "config.yaml").read_text())["DATA"]
    assert (data["ROOT"], data["DECODE"]) == (str(copy), "pil_draft")


def test_temporaries_of_killed_writes_are_removed_on_start(image_list, run):
    names = [".last.pth.4242.0123abcd.tmp", ".config.yaml.4242.89abcdef.tmp"]
    for name in names:
        (run / name).write_bytes(b"partial")
    (run / ".notes.tmp").write_text("not ours")
    (run / "tb" / names[0]).write_text("tensorboard's folder: left alone")
    Trainer(load_config(None, overrides(image_list, run, "TRAIN.RESUME", "auto")))
    assert not any((run / name).exists() for name in names)
    assert (run / ".notes.tmp").exists() and (run / "tb" / names[0]).exists()
    assert f"removed 2 temporary file(s) of interrupted writes from {run}" in (run / "log.txt").read_text()


def test_a_kill_between_checkpoint_writes_loses_none(image_list, run, monkeypatch):
    """An epoch's checkpoints are written epoch_N.pth, last.pth, final.pth: a kill before last.pth makes the
    resume redo the epoch (rewriting epoch_N.pth); one between last.pth and final.pth is repaired on resume."""
    import advbct.engine.trainer as trainer_module

    os.remove(run / "final.pth")  # killed while final.pth was written
    written = []
    real = trainer_module.save_checkpoint
    monkeypatch.setattr(trainer_module, "save_checkpoint", lambda path, payload: written.append(
        os.path.basename(path)) or real(path, payload))
    trainer = Trainer(load_config(None, overrides(image_list, run, "TRAIN.RESUME", "auto")))
    assert trainer.fit() == [] and written == ["final.pth"]
    final, last = load(run / "final.pth"), load(run / "last.pth")
    assert final["epoch"] == 1 and final["model"].keys() == last["model"].keys()
    assert all(torch.equal(v, last["model"][k]) for k, v in final["model"].items())

    monkeypatch.setattr(trainer_module, "save_checkpoint", lambda path, payload: written.append(
        os.path.basename(path)))
    trainer.cfg.TRAIN.update(EPOCHS=4, SAVE_FREQ=2)
    for epoch in (3, 4):
        trainer._save(epoch)
    assert written[1:] == ["last.pth", "epoch_4.pth", "last.pth", "final.pth"]


# ------------------------------------------------------------------------------------- non-finite loss
@pytest.mark.parametrize("resume", [False, True], ids=["fresh", "resumed"])
def test_a_non_finite_loss_names_only_checkpoints_that_exist(image_list, run, tmp_path, monkeypatch, capsys,
                                                             resume):
    monkeypatch.setattr(Trainer, "_step", lambda self, *args: {"total": torch.tensor(float("nan"))})
    out = tmp_path / "new"
    extra = ["TRAIN.RESUME", str(run / "last.pth"), "TRAIN.EPOCHS", "2"] if resume else []
    msg = refused(overrides(image_list, out, *extra), capsys, code=3)
    epoch = 2 if resume else 1
    kept = f"the last good checkpoint is {run / 'last.pth'} (epoch 1)" if resume else "no checkpoint was written"
    assert msg == (f"error: non-finite loss (nan) at epoch {epoch}, iteration 1: training stopped; {kept}; "
                   f"lower TRAIN.LR")
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml", "log.txt", "tb"]


# ------------------------------------------------------------------------------------------ the fault test
def fork_train(argv, log):
    """tools/train.py's main(argv) in a forked child (1 thread, CPU; output to ``log``); its pid.

    Forked from this process, which has imported torch already: a start costs milliseconds, not seconds."""
    pid = os.fork()
    if pid:
        return pid
    code = 1
    try:
        sys.stdout = sys.stderr = open(log, "a", buffering=1)
        torch.set_num_threads(1)
        torch.cuda.is_available = lambda: False
        train_tool().main(argv)
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:
        traceback.print_exc()
    finally:
        os._exit(code)


def temporaries(folder, prefixes=("",)):
    return sorted(p.name for p in folder.rglob("*") if is_temporary(p.name) and p.name.startswith(prefixes))


def log_lines(out):
    return (out / "log.txt").read_text().splitlines() if (out / "log.txt").exists() else []


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(os, "fork"), reason="forks the training")
def test_sigkill_at_random_points_loses_nothing(image_list, tmp_path, monkeypatch):
    """Five SIGKILLs at seeded random points (two while a checkpoint is written, three a random time after the
    start or an epoch's end), each run resumed with TRAIN.RESUME auto: the run completes with the weights of a
    straight run from its last epoch boundary, every checkpoint, no temporary file, and config.yaml equal to
    what each run used. The points are events of the run's own (not seconds from its start), so that a
    faster machine kills at the same stages."""
    rng = random.Random(27)
    out, epochs = tmp_path / "run", 8
    plan = [("write", rng.randrange(1, 4)) for _ in range(2)]  # at the k-th checkpoint the run writes
    plan += [("epoch", (rng.randrange(3), rng.uniform(0, 0.15))) for _ in range(3)]  # s after j epochs
    rng.shuffle(plan)

    def argv(i):  # PRINT_FREQ changes per run: a key a resume may change, which config.yaml must follow
        return overrides(image_list, out, "TRAIN.RESUME", "auto", "TRAIN.MAX_ITERS_PER_EPOCH", "2",
                         "TRAIN.SAVE_FREQ", "2", "TRAIN.PRINT_FREQ", str(1 + i % 2), epochs=epochs)

    def epochs_logged(lines):
        return [int(ln.split("epoch ")[1].split("/")[0]) for ln in lines if f"/{epochs} (" in ln]

    used = [load_config(None, argv(i)).to_dict() for i in range(len(plan) + 1)]
    kills, boundary = [], 0
    for i, (mode, arg) in enumerate([*plan, ("none", None)]):
        boundary = load(out / "last.pth")["epoch"] if (out / "last.pth").exists() else 0
        if boundary:
            os.link(out / "last.pth", tmp_path / f"start{i}.pth")  # the state this run resumes from
        left = temporaries(out) if out.exists() else []
        lines0 = log_lines(out)
        pid, seen, fire_at = fork_train(argv(i), tmp_path / "console.txt"), set(), None
        while not os.waitpid(pid, os.WNOHANG)[0]:
            if mode == "write" and out.exists():
                seen.update(set(temporaries(out, CHECKPOINT_TEMPS)) - set(left))
            if mode == "epoch" and fire_at is None:
                lines = log_lines(out)
                if (len(lines) > len(lines0) if arg[0] == 0 else
                        len(epochs_logged(lines)) - len(epochs_logged(lines0)) >= arg[0]):
                    fire_at = time.monotonic() + arg[1]
            if (mode == "write" and len(seen) >= arg) or (fire_at is not None and time.monotonic() >= fire_at):
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                kills.append((mode, boundary, temporaries(out, CHECKPOINT_TEMPS)))
                break
            time.sleep(0.002)
        else:
            assert mode == "none", f"run {i} ended before its kill ({mode} {arg})"
        lines = log_lines(out)
        if left:
            assert f"removed {len(left)} temporary file(s) of interrupted writes from {out}" in "\n".join(
                lines[len(lines0):])
        # what the log reports done is on disk, every checkpoint loads, config.yaml is one run's own
        last = load(out / "last.pth")["epoch"] if (out / "last.pth").exists() else 0
        assert last >= max(epochs_logged(lines), default=0) and last >= boundary
        for path in out.glob("epoch_*.pth"):
            assert load(path)["epoch"] == int(path.stem.split("_")[1])
        if (out / "config.yaml").exists():
            assert yaml.safe_load((out / "config.yaml").read_text()) in used[:i + 1]
    assert len(kills) == 5 and any(k[2] for k in kills if k[0] == "write"), kills

    # complete, clean and true
    assert sorted(p.name for p in out.iterdir() if p.suffix == ".pth") == [
        "epoch_2.pth", "epoch_4.pth", "epoch_6.pth", "epoch_8.pth", "final.pth", "last.pth"]
    assert temporaries(out) == []
    last, final = load(out / "last.pth"), load(out / "final.pth")
    assert last["epoch"] == final["epoch"] == epochs
    assert yaml.safe_load((out / "config.yaml").read_text()) == used[-1] == last["config"] == final["config"]

    # the weights: a straight run from the epoch the last run resumed at (one thread, as the children)
    ref = tmp_path / "reference"
    threads = torch.get_num_threads()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    torch.set_num_threads(1)
    try:
        resume = ["TRAIN.RESUME", str(tmp_path / f"start{len(plan)}.pth")] if boundary else []
        Trainer(load_config(None, [*argv(len(plan)), "OUTPUT", str(ref), *resume])).fit()
    finally:
        torch.set_num_threads(threads)
    want = load(ref / "last.pth")
    for part in ("model", "optimizer"):
        got_t, want_t = flat_tensors(last[part]), flat_tensors(want[part])
        assert got_t.keys() == want_t.keys() and got_t
        assert all(torch.equal(got_t[k], want_t[k]) for k in want_t), part
    assert all(torch.equal(final["model"][k], v) for k, v in load(ref / "final.pth")["model"].items())
    assert last["scheduler"] == want["scheduler"] and torch.equal(last["rng"], want["rng"])
