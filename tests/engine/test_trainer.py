"""Acceptance tests of the trainer: resume, non-finite loss, and bad input caught before the first step.

Tiny runs (resnet18, 32-d embedding, 32 px, 8 images per batch, 2 iterations per epoch) on the small PNGs of
the ``image_list`` fixture (tests/conftest.py). ``tools/train.py``'s ``main`` is called in-process where an exit
code or the stderr text matters; a real process is killed with SIGKILL in ``test_killed_process_resumes``.
Runs of more than two steps, the real process and the evaluation on the synthetic benchmark are marked slow.
"""

import importlib.util
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from advbct.config import load_config
from advbct.engine.trainer import Trainer
from advbct.models import build_model
from helpers import REPO, flat_tensors
from helpers import load_checkpoint as load

CLASSES, EMB = 4, 32   # the image_list fixture's classes


def load_train_tool():
    spec = importlib.util.spec_from_file_location("advbct_train_tool", REPO / "tools" / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def setup(image_list, random_checkpoint, class_meta):
    """Image list, old checkpoints (32-d and 16-d embeddings, random weights) and the 32-d one's meta."""
    old = random_checkpoint(3, EMB, CLASSES)
    return {"data": image_list, "old": old, "old16": random_checkpoint(3, 16, CLASSES), "meta": class_meta(old)}


def overrides(setup, out, *extra, epochs=2):
    data = setup["data"]
    return ["OUTPUT", str(out), "DATA.TRAIN_LIST", str(data / "train.txt"), "DATA.ROOT", str(data),
            "MODEL.ARCH", "resnet18", "MODEL.EMB_DIM", str(EMB), "MODEL.PRETRAINED", "false",
            "DATA.IMG_SIZE", "32", "DATA.NUM_WORKERS", "0", "TRAIN.BATCH_SIZE", "8",
            "TRAIN.EPOCHS", str(epochs), "TRAIN.MAX_ITERS_PER_EPOCH", "2", "TRAIN.PRINT_FREQ", "1",
            "SEED", "1234", *extra]


def advbct_overrides(setup, out, *extra):
    return overrides(setup, out, "COMP_LOSS.TYPE", "advbct", "OLD_MODEL.WEIGHTS", str(setup["old"]),
                     "COMP_LOSS.META_PATH", str(setup["meta"]), *extra)


RESUMED_PARTS = ("model", "optimizer", "comp_loss")  # the scheduler holds numbers only: compared with ==


@pytest.fixture(scope="module")
def straight(setup, tmp_path_factory):
    """Two advbct epochs in one go: the reference of both resume tests."""
    out = tmp_path_factory.mktemp("straight")
    history = Trainer(load_config(None, advbct_overrides(setup, out))).fit()
    return {"out": out, "history": history, "last": load(out / "last.pth")}


# ------------------------------------------------------------------------------------------------ resume
@pytest.mark.slow
def test_resume_after_crash_equals_straight_run(setup, straight, tmp_path, monkeypatch):
    """Epoch 1, a crash in the 2nd step of epoch 2, then TRAIN.RESUME auto: bit-identical to 2 straight
    epochs (weights, SGD momentum, LR schedule, elastic radii + discriminator of the advbct loss)."""
    saved = {}
    real_save, real_step = Trainer._save, Trainer._step

    def spy_save(self, epoch):
        real_save(self, epoch)
        saved[epoch] = (Path(self.cfg.OUTPUT) / "last.pth").read_bytes()

    steps = []

    def crashing_step(self, images, labels, epoch, progress):
        steps.append(epoch)
        if steps.count(1) == 2:
            raise RuntimeError("simulated crash in epoch 2")
        return real_step(self, images, labels, epoch, progress)

    monkeypatch.setattr(Trainer, "_save", spy_save)
    monkeypatch.setattr(Trainer, "_step", crashing_step)
    with pytest.raises(RuntimeError, match="simulated crash"):
        Trainer(load_config(None, advbct_overrides(setup, tmp_path))).fit()
    assert list(saved) == [1]
    # the crash lost only the epoch in progress: last.pth is epoch 1's, untouched since its save
    assert (tmp_path / "last.pth").read_bytes() == saved[1]
    assert load(tmp_path / "last.pth")["epoch"] == 1
    assert not (tmp_path / "final.pth").exists()

    monkeypatch.setattr(Trainer, "_step", real_step)
    resumed = Trainer(load_config(None, advbct_overrides(setup, tmp_path, "TRAIN.RESUME", "auto")))
    assert resumed.start_epoch == 1
    history = resumed.fit()
    assert history == straight["history"][1:]  # the epoch-2 means, exactly
    last = load(tmp_path / "last.pth")
    assert last["epoch"] == straight["last"]["epoch"] == 2
    for part in RESUMED_PARTS:
        got, want = flat_tensors(last[part]), flat_tensors(straight["last"][part])
        assert got.keys() == want.keys() and got, part
        for key in want:
            assert torch.equal(got[key], want[key]), f"{part}.{key}"
    momentum = [v for k, v in flat_tensors(last["optimizer"]).items() if k.endswith("momentum_buffer")]
    assert momentum and all(m.abs().sum() > 0 for m in momentum[:3])  # momentum really was restored
    assert "elastic_weight" in " ".join(flat_tensors(last["comp_loss"]))
    assert last["scheduler"] == straight["last"]["scheduler"]
    assert torch.equal(load(tmp_path / "final.pth")["model"]["embedding.fc.weight"],
                       straight["last"]["model"]["embedding.fc.weight"])


@pytest.mark.slow
def test_killed_process_resumes(setup, straight, tmp_path):
    """SIGKILL a real tools/train.py as soon as epoch 1's last.pth exists; the checkpoint on disk loads
    (weights_only) and keeps every epoch the log reports done; resuming reproduces the straight run."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    log = open(tmp_path / "stderr.txt", "w")
    proc = subprocess.Popen([sys.executable, str(REPO / "tools" / "train.py"), *advbct_overrides(setup, tmp_path)],
                            cwd=REPO, env=env, stdout=log, stderr=log)
    deadline = time.time() + 240
    try:
        while not (tmp_path / "last.pth").exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.02)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        log.close()
    assert (tmp_path / "last.pth").exists(), (tmp_path / "stderr.txt").read_text()[-2000:]
    logged_done = len(re.findall(r"epoch \d+/\d+ \(", (tmp_path / "log.txt").read_text()))
    epoch = load(tmp_path / "last.pth")["epoch"]
    assert 1 <= epoch <= 2 and epoch >= logged_done  # nothing reported as done is lost
    history = Trainer(load_config(None, advbct_overrides(setup, tmp_path, "TRAIN.RESUME", "auto"))).fit()
    assert len(history) == 2 - epoch
    last = load(tmp_path / "last.pth")
    for part in ("model", "comp_loss"):
        got, want = flat_tensors(last[part]), flat_tensors(straight["last"][part])
        for key in want:
            diff = (got[key].double() - want[key].double()).norm() / want[key].double().norm().clamp(min=1e-12)
            assert diff <= 1e-6, f"{part}.{key}: relative difference {float(diff)}"


@pytest.mark.slow
def test_resume_in_another_precision_warns_and_starts_a_fresh_loss_scale(setup, straight, tmp_path, monkeypatch):
    """A checkpoint of an fp32 run (empty GradScaler state) resumed where TRAIN.AMP now means fp16 (auto on
    another kind of GPU): no crash on the empty scaler state, the weights still come back, and the log
    names the change."""
    import advbct.engine.trainer as trainer_module

    monkeypatch.setattr(trainer_module, "resolve_amp", lambda mode, device: ("fp16", None))
    resumed = Trainer(load_config(None, advbct_overrides(setup, tmp_path, "TRAIN.RESUME",
                                                         str(straight["out"] / "last.pth"))))
    assert resumed.start_epoch == 2 and resumed.scaler.is_enabled()
    assert resumed.scaler.get_scale() == torch.amp.GradScaler("cpu").get_scale()  # the default initial scale
    assert torch.equal(resumed.model.state_dict()["embedding.fc.weight"],
                       straight["last"]["model"]["embedding.fc.weight"])
    assert (f"warning: {straight['out'] / 'last.pth'} trained in TRAIN.AMP none; the run continues in fp16"
            in (tmp_path / "log.txt").read_text())

# ------------------------------------------------------------------------------------ memory format
def test_channels_last_trains_the_same_model_in_nhwc(setup, tmp_path):
    """TRAIN.CHANNELS_LAST: one AdvBCT step gives the plain run's weights (fp32: equal up to summation
    order), with the new model's convolutions really held in NHWC, and a checkpoint any model loads."""
    runs = {}
    for fmt in ("false", "true"):
        out = tmp_path / fmt
        trainer = Trainer(load_config(None, advbct_overrides(setup, out, "TRAIN.CHANNELS_LAST", fmt, "TRAIN.EPOCHS",
                                                             "1", "TRAIN.MAX_ITERS_PER_EPOCH", "1")))
        if fmt == "false":   # both runs start from the same seeded weights
            init = {k: v.clone() for k, v in trainer.model.state_dict().items()}
        trainer.fit()
        runs[fmt] = load(out / "last.pth")["model"]
    ref, got = runs["false"], runs["true"]
    assert got["backbone.conv1.weight"].is_contiguous(memory_format=torch.channels_last)
    assert not got["backbone.conv1.weight"].is_contiguous()
    assert ref["backbone.conv1.weight"].is_contiguous()
    moved = 0
    for key, value in ref.items():
        assert torch.allclose(got[key].float(), value.float(), rtol=1e-4, atol=1e-5), key
        moved += int(value.is_floating_point() and not torch.equal(value, init[key]))
    assert moved > 50   # the step changed the weights, by far more than the tolerance: the check can fail
    assert (ref["backbone.conv1.weight"] - init["backbone.conv1.weight"]).abs().max() > 1e-3
    plain = build_model("resnet18", embed_dim=EMB, num_classes=CLASSES)
    plain.load_state_dict(got)
    assert plain.backbone.conv1.weight.is_contiguous()
    assert torch.equal(plain.backbone.conv1.weight, got["backbone.conv1.weight"])


# ------------------------------------------------------------------------------------- non-finite loss
def test_non_finite_loss_stops_with_code_3(setup, tmp_path, monkeypatch, capsys):
    """Epoch 2 runs at LR 1e-1 x 1e38 (MultiStepLR milestone 1): the loss overflows, the run exits 3 with
    one 'error:' line, epoch 1's last.pth is byte-identical and no temporary file is left."""
    snapshots = {}
    real_save = Trainer._save

    def spy_save(self, epoch):
        real_save(self, epoch)
        snapshots[epoch] = (tmp_path / "last.pth").read_bytes()

    monkeypatch.setattr(Trainer, "_save", spy_save)
    argv = overrides(setup, tmp_path, "TRAIN.LR_STEPS", "[1]", "TRAIN.LR_GAMMA", "1.0e+38")
    with pytest.raises(SystemExit) as exc:
        load_train_tool().main(argv)
    assert exc.value.code == 3
    err = capsys.readouterr().err
    assert "Traceback" not in err
    errors = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "non-finite loss" in errors[0] and "epoch 2" in errors[0], err[-2000:]
    assert f"the last good checkpoint is {tmp_path / 'last.pth'} (epoch 1)" in errors[0]
    assert errors[0] == err.rstrip("\n").splitlines()[-1]  # the last thing printed
    assert list(snapshots) == [1]
    assert (tmp_path / "last.pth").read_bytes() == snapshots[1]
    state = load(tmp_path / "last.pth")
    assert state["epoch"] == 1 and all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    assert not (tmp_path / "final.pth").exists()
    assert [p.name for p in tmp_path.rglob("*") if ".tmp" in p.name] == []


# ------------------------------------------------------------------------------------------- bad input
def run_expecting_user_error(argv, monkeypatch, capsys, out):
    """main(argv) must exit 2 with one 'error:' line and no traceback, before any training step."""

    def no_step(*args, **kwargs):
        raise AssertionError("a training step ran before the input was checked")

    monkeypatch.setattr(Trainer, "_step", no_step)
    with pytest.raises(SystemExit) as exc:
        load_train_tool().main(argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert not (out / "last.pth").exists()
    return lines[0]


@pytest.mark.parametrize("method", ["bct", "lce", "unibct", "hot_refresh", "advbct", "l2"])
def test_method_without_old_model(setup, tmp_path, monkeypatch, capsys, method):
    msg = run_expecting_user_error(overrides(setup, tmp_path, "COMP_LOSS.TYPE", method,
                                             "COMP_LOSS.META_PATH", str(setup["meta"])),
                                   monkeypatch, capsys, tmp_path)
    assert "OLD_MODEL.WEIGHTS" in msg and method in msg


@pytest.mark.parametrize("method", ["lce", "unibct", "advbct"])
def test_method_without_meta(setup, tmp_path, monkeypatch, capsys, method):
    msg = run_expecting_user_error(overrides(setup, tmp_path, "COMP_LOSS.TYPE", method,
                                             "OLD_MODEL.WEIGHTS", str(setup["old"])),
                                   monkeypatch, capsys, tmp_path)
    assert "COMP_LOSS.META_PATH" in msg and method in msg


def test_label_out_of_range(setup, tmp_path, monkeypatch, capsys):
    lines = (setup["data"] / "train.txt").read_text().splitlines()
    lines[4] = lines[4].rsplit(" ", 1)[0] + f" {CLASSES}"  # line 5: label 4 with MODEL.NUM_CLASSES 4
    bad = tmp_path / "bad.txt"
    bad.write_text("\n".join(lines) + "\n")
    argv = overrides(setup, tmp_path, "MODEL.NUM_CLASSES", str(CLASSES))
    argv[argv.index("DATA.TRAIN_LIST") + 1] = str(bad)
    msg = run_expecting_user_error(argv, monkeypatch, capsys, tmp_path)
    assert f"{bad}:5:" in msg and f"label {CLASSES}" in msg


def test_embedding_sizes_differ(setup, tmp_path, monkeypatch, capsys):
    msg = run_expecting_user_error(overrides(setup, tmp_path, "COMP_LOSS.TYPE", "bct",
                                             "OLD_MODEL.WEIGHTS", str(setup["old16"])),
                                   monkeypatch, capsys, tmp_path)
    assert "OLD_MODEL.WEIGHTS" in msg and "16" in msg and f"MODEL.EMB_DIM is {EMB}" in msg


@pytest.mark.parametrize("mode, expected", [("nvjpeg", "error: DATA.DECODE nvjpeg decodes on a CUDA GPU, but this "
                                                         "process runs on cpu (no CUDA device): use DATA.DECODE pil "
                                                         "or pil_draft"),
                                            ("turbo", "error: DATA.DECODE 'turbo': expected one of pil, pil_draft, "
                                                      "nvjpeg")])
def test_decode_mode_refused_before_training(setup, tmp_path, monkeypatch, capsys, mode, expected):
    assert run_expecting_user_error(overrides(setup, tmp_path, "DATA.DECODE", mode), monkeypatch, capsys,
                                    tmp_path) == expected


def test_workers_hand_over_uint8_and_the_step_gets_the_normalised_batch(setup, tmp_path, monkeypatch):
    """DATA.DECODE reaches the dataset; batches cross from the workers as uint8 and reach the step as the
    former float pipeline's batch (ToTensor + Normalize in the worker), to the bit."""
    from torchvision import transforms as T

    from advbct.data.image_list import load_image
    from advbct.data.transforms import IMAGENET_MEAN, IMAGENET_STD

    trainer = Trainer(load_config(None, overrides(setup, tmp_path, "DATA.DECODE", "pil_draft", "TRAIN.EPOCHS", "1",
                                                  "TRAIN.MAX_ITERS_PER_EPOCH", "1")))
    assert trainer.dataset.image_input.decode == "pil_draft" and trainer.dataset.image_input.size == (32, 32)
    images, _, index = next(iter(trainer.loader))
    assert images.dtype == torch.uint8 and images.shape == (8, 3, 32, 32)
    seen = {}
    def spy_step(self, x, y, *args):
        seen["x"] = x
        return {"total": torch.zeros(())}

    monkeypatch.setattr(Trainer, "_step", spy_step)
    trainer.train_epoch(0)
    former = T.Compose([T.Resize((32, 32)), T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    order = list(iter(trainer.sampler))[:8]  # the same epoch-0 order the loader drew
    expected = torch.stack([former(load_image(trainer.dataset.paths[i])) for i in order])
    assert torch.equal(seen["x"], expected)  # 16 px PNGs: no JPEG, so pil_draft decodes as pil


# ------------------------------------------------------------------------- old forward only when needed
METHOD_OPTS = {"bct": [], "lce": [], "unibct": [], "advbct_no_adv": ["COMP_LOSS.ADVERSARIAL", "false"],
               "hot_refresh": [], "advbct": [], "l2": []}


def counted_trainer(setup, out, method, *extra):
    """A 1-epoch, 2-step trainer of ``method`` whose old model counts its embed calls."""
    kind = "advbct" if method.startswith("advbct") else method
    trainer = Trainer(load_config(None, overrides(setup, out, "COMP_LOSS.TYPE", kind, "OLD_MODEL.WEIGHTS",
                                                  str(setup["old"]), "COMP_LOSS.META_PATH", str(setup["meta"]),
                                                  *METHOD_OPTS[method], *extra, epochs=1)))
    calls = []
    embed = trainer.old_model.embed
    trainer.old_model.embed = lambda images: calls.append(images.shape[0]) or embed(images)
    return trainer, calls


@pytest.mark.parametrize("method,needs", [("bct", False), ("lce", False), ("unibct", False),
                                          ("advbct_no_adv", False), ("hot_refresh", True), ("advbct", True),
                                          ("l2", True)])
def test_old_model_runs_only_for_losses_that_read_old_features(setup, tmp_path, method, needs):
    """The old forward pass (a ResNet-18 per step) is skipped where the loss reads only class-level old data."""
    trainer, calls = counted_trainer(setup, tmp_path, method)
    assert trainer.comp_loss.needs_old_features is needs
    trainer.fit()
    assert calls == ([8, 8] if needs else [])   # one call per step, on the step's 8 images


@pytest.mark.slow
@pytest.mark.parametrize("method", ["bct", "lce", "unibct", "advbct_no_adv"])
def test_skipping_the_old_forward_changes_no_weight(setup, tmp_path, method):
    """Forcing the old forward back on gives bit-identical weights: the skipped features were unused."""
    weights = {}
    for forced in (False, True):
        trainer, calls = counted_trainer(setup, tmp_path / str(forced), method)
        if forced:
            trainer.comp_loss.needs_old_features = True
        init = trainer.model.state_dict()["backbone.conv1.weight"].clone()
        trainer.fit()
        assert len(calls) == (2 if forced else 0)
        weights[forced] = load(tmp_path / str(forced) / "last.pth")["model"]
    assert not torch.equal(weights[False]["backbone.conv1.weight"], init)   # the steps moved the weights
    for key, value in weights[False].items():
        assert torch.equal(weights[True][key], value), key


# --------------------------------------------------------------------------- evaluation during training
@pytest.mark.slow
@pytest.mark.parametrize("dataset, root, fragments", [
    ("roxford5k", "no_such_root", ["no_such_root", "Dataset.md"]),
    ("roxford5k,gldv2", "ROxfordParis", ["EVAL.DATASET 'roxford5k,gldv2'", "TRAIN.EVAL_FREQ", "one test set"]),
])
def test_periodic_eval_set_is_checked_before_the_first_step(setup, tiny_synthetic, tmp_path, monkeypatch, capsys,
                                                            dataset, root, fragments):
    argv = overrides(setup, tmp_path / "out", "TRAIN.EVAL_FREQ", "1", "EVAL.DATASET", dataset,
                     "EVAL.ROOT", str(tmp_path / root if root == "no_such_root" else tiny_synthetic / root))
    msg = run_expecting_user_error(argv, monkeypatch, capsys, tmp_path / "out")
    for fragment in fragments:
        assert fragment in msg, msg


@pytest.mark.slow
def test_periodic_eval_logs_the_final_models_scores(setup, tiny_synthetic, tmp_path):
    """TRAIN.EVAL_FREQ 1: the epoch's log line holds the self/cross/old-self mAP that evaluating the
    trained models afresh gives."""
    from advbct.evaluation.protocol import evaluate_models, headline, load_test_set
    cfg = load_config(None, advbct_overrides(setup, tmp_path, "TRAIN.EPOCHS", "1", "TRAIN.EVAL_FREQ", "1",
                                             "EVAL.DATASET", "roxford5k", "EVAL.ROOT",
                                             str(tiny_synthetic / "ROxfordParis"), "EVAL.IMG_SIZE", "32",
                                             "EVAL.NUM_WORKERS", "0"))
    trainer = Trainer(cfg)
    assert trainer.eval_set.name == "roxford5k" and len(trainer.eval_set.query_paths) > 0
    trainer.fit()
    want = headline(evaluate_models(trainer.model, trainer.old_model, cfg, progress=False,
                                    test_set=load_test_set("roxford5k", str(tiny_synthetic / "ROxfordParis"))))
    assert set(want) == {"self", "cross", "old_self"}
    log = (tmp_path / "log.txt").read_text()
    line = next(ln for ln in log.splitlines() if "eval epoch 1:" in ln)
    assert line.endswith("eval epoch 1: " + " ".join(f"{k} {v:.2f}" for k, v in want.items())), line
    assert "note: global batch 1 x 8 = 8 images, the release trained with 1024 (4 GPUs x 256)" in log


@pytest.mark.parametrize("world, batch, noted", [(4, 256, False), (8, 128, False), (8, 256, True), (2, 256, True)])
def test_a_global_batch_other_than_the_releases_is_noted(world, batch, noted):
    """The release trained 4 GPUs x 256: any other global batch (with TRAIN.LR as given) gets a log line."""
    lines = []
    fake = SimpleNamespace(world=world, cfg=load_config(None, ["TRAIN.BATCH_SIZE", str(batch)]),
                           log=SimpleNamespace(info=lines.append))
    Trainer._check_recipe(fake)
    assert lines == ([f"note: global batch {world} x {batch} = {world * batch} images, the release trained "
                      f"with 1024 (4 GPUs x 256); TRAIN.LR 0.1 is used as given"] if noted else [])


# --------------------------------------------------------------------------------------- TRAIN.AMP auto
@pytest.mark.slow
@pytest.mark.parametrize("native, used", [(False, "none"), (True, "bf16")])
def test_amp_auto_trains_as_the_mode_it_resolves_to(setup, tmp_path, monkeypatch, native, used):
    """TRAIN.AMP auto gives, weight for weight, the run of the mode it resolves to on this CPU, and records
    that mode (config.yaml, checkpoint, log); fp32 and bf16 runs differ, so the comparison can fail."""
    import yaml
    from advbct.engine import precision
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: native)
    one_step = ("TRAIN.EPOCHS", "1", "TRAIN.MAX_ITERS_PER_EPOCH", "1")
    weights = {}
    for mode in ("auto", "none", "bf16"):
        Trainer(load_config(None, advbct_overrides(setup, tmp_path / mode, "TRAIN.AMP", mode, *one_step))).fit()
        weights[mode] = load(tmp_path / mode / "last.pth")
    assert yaml.safe_load((tmp_path / "auto" / "config.yaml").read_text())["TRAIN"]["AMP"] == used
    assert weights["auto"]["config"]["TRAIN"]["AMP"] == used
    assert f"TRAIN.AMP auto -> {used}: this cpu (" in (tmp_path / "auto" / "log.txt").read_text()
    other = "bf16" if used == "none" else "none"
    assert any(not torch.equal(v, weights[other]["model"][k]) for k, v in weights[used]["model"].items()
               if v.is_floating_point())
    for key, value in weights[used]["model"].items():
        assert torch.equal(weights["auto"]["model"][key], value), key


def test_unknown_amp_mode_is_refused_before_training(setup, tmp_path, monkeypatch, capsys):
    msg = run_expecting_user_error(overrides(setup, tmp_path, "TRAIN.AMP", "fp32"), monkeypatch, capsys, tmp_path)
    assert msg == "error: TRAIN.AMP must be one of none, bf16, fp16, auto, got 'fp32'"
