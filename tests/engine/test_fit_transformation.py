"""Fitting the old-to-new transformation (advbct/engine/transformation.py): FCT's schedule and training on a
synthetic linear-plus-noise case, seeded bit-identical runs, COMP_LOSS.TYPE fct training without the old model,
and the whole fitting step on a tiny image list (Procrustes checked against features embedded here)."""

import math

import numpy as np
import pytest
import torch

from advbct.config import load_config
from advbct.data.decoding import image_input
from advbct.data.image_list import ImageListDataset, read_image_list
from advbct.engine import transformation as fitting
from advbct.engine.trainer import Trainer
from advbct.errors import UserError
from advbct.evaluation.features import extract_features
from advbct.models import load_trained_model
from advbct.models.transformation import load_transformation, orthogonal_procrustes
from helpers import load_checkpoint as load

EMB = 16


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: on a shared 2-core machine, two threads' synchronisation costs a tiny BatchNorm
    call milliseconds (100x its work), the fitting's time in these small cases."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def linear_plus_noise(n=512, d_old=8, d_new=8, noise=0.05, seed=0):
    g = torch.Generator().manual_seed(seed)
    old = torch.randn(n, d_old, generator=g)
    new = old @ torch.randn(d_old, d_new, generator=g) / math.sqrt(d_old) + noise * torch.randn(n, d_new, generator=g)
    return old, new


SMALL = dict(epochs=12, lr=1e-2, weight_decay=0.0, warmup_epochs=1, batch_size=64, width=32, depth=2)


def test_fct_schedule_is_warmup_then_cosine():
    lrs = [fitting.fct_lr(e, 10, 2, 1.0) for e in range(10)]
    assert lrs[:3] == [0.5, 1.0, 1.0]  # (e + 1) / 2 during warmup, then cos(0) = 1
    assert lrs[6] == pytest.approx(0.5)  # halfway through the 8 cosine epochs
    assert lrs[9] == pytest.approx(0.5 * (1 + math.cos(math.pi * 7 / 8)))
    assert all(a >= b for a, b in zip(lrs[1:], lrs[2:]))


def test_fct_learns_a_linear_map_plus_noise():
    old, new = linear_plus_noise()
    net, losses = fitting.fit_fct(old, new, seed=0, **SMALL)
    assert len(losses) == SMALL["epochs"] and not net.training
    assert losses[-1] < 0.25 * losses[0]
    errors = fitting.fit_errors(net, old, new)
    identity = float(((old - new) ** 2).mean())
    assert errors["mse_identity"] == pytest.approx(identity, rel=1e-6)
    # the map brings the old rows much closer to the new ones than leaving them as they are (~0.86 here)
    assert identity > 0.5 and errors["mse_mapped"] < 0.1 * identity


def test_fct_seeded_runs_are_bit_identical():
    old, new = linear_plus_noise(n=200)
    kw = dict(SMALL, epochs=3)
    before = torch.get_rng_state()
    a, la = fitting.fit_fct(old, new, seed=5, **kw)
    assert torch.equal(torch.get_rng_state(), before)  # the caller's random state is untouched
    b, lb = fitting.fit_fct(old, new, seed=5, **kw)
    c, _ = fitting.fit_fct(old, new, seed=6, **kw)
    assert la == lb
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


def test_procrustes_fit_aligns_directions():
    g = torch.Generator().manual_seed(1)
    old = torch.randn(100, 6, generator=g)
    q, _ = torch.linalg.qr(torch.randn(6, 6, generator=g))
    new = 3.0 * (old @ q)  # another scale: only the directions matter
    module = fitting.fit_procrustes(old, new)
    torch.testing.assert_close(module.weight, q, atol=1e-5, rtol=0)
    assert fitting.fit_errors(module, old, new)["mse_mapped"] < 1e-10


@pytest.mark.parametrize("key, value, expect", [
    ("TYPE", "affine", "TRANSFORM.TYPE 'affine': expected one of fct, procrustes"),
    ("WARMUP_EPOCHS", "10", "TRANSFORM.WARMUP_EPOCHS 10: expected 0 .. TRANSFORM.EPOCHS - 1 (9)"),
    ("BATCH_SIZE", "1", "TRANSFORM.BATCH_SIZE 1: expected >= 2 (BatchNorm needs two rows)"),
    ("LR", "0", "TRANSFORM.LR 0.0: expected > 0"),
])
def test_bad_settings_are_refused_before_anything_is_read(tmp_path, key, value, expect):
    out = tmp_path / "out"
    cfg = load_config(None, ["OUTPUT", str(out), "TRANSFORM.EPOCHS", "10", f"TRANSFORM.{key}", value])
    with pytest.raises(UserError) as info:
        fitting.train_transformation(cfg, progress=False)
    assert str(info.value) == expect and not out.exists()


# ------------------------------------------------------------------------ on images, with real models
def overrides(data, out, *extra):
    return ["OUTPUT", str(out), "DATA.TRAIN_LIST", str(data / "train.txt"), "DATA.ROOT", str(data),
            "MODEL.ARCH", "resnet18", "MODEL.EMB_DIM", str(EMB), "MODEL.PRETRAINED", "false",
            "DATA.IMG_SIZE", "32", "DATA.NUM_WORKERS", "0", "EVAL.NUM_WORKERS", "0", "TRAIN.BATCH_SIZE", "8",
            "TRAIN.EPOCHS", "1", "TRAIN.MAX_ITERS_PER_EPOCH", "1", "TRAIN.PRINT_FREQ", "1", "SEED", "1234", *extra]


@pytest.fixture(scope="module")
def fct_run(image_list, random_checkpoint, tmp_path_factory):
    """One step of COMP_LOSS.TYPE fct training, its OLD_MODEL.WEIGHTS naming a file that does not exist."""
    out = tmp_path_factory.mktemp("fct") / "new"
    cfg = load_config(None, overrides(image_list, out, "COMP_LOSS.TYPE", "fct",
                                      "OLD_MODEL.WEIGHTS", str(out / "never_read.pth")))
    trainer = Trainer(cfg)
    trainer.fit()
    return {"trainer": trainer, "out": out, "old": random_checkpoint(11, EMB), "data": image_list}


def test_fct_trains_the_new_model_alone_and_marks_its_checkpoint(fct_run):
    trainer = fct_run["trainer"]
    assert trainer.old_model is None and trainer.comp_loss is None  # the old checkpoint was never opened
    final = load(fct_run["out"] / "final.pth")
    assert final["config"]["COMP_LOSS"]["TYPE"] == "fct" and "comp_loss" not in load(fct_run["out"] / "last.pth")


def embed(arch, path, data):
    model = load_trained_model(arch, path, "TEST")
    paths, labels = read_image_list(data / "train.txt", root=data)
    ds = ImageListDataset(paths, labels, image_input=image_input(32, "pil", "cpu"))
    return extract_features(model, ds, batch_size=16, num_workers=0, progress=False)


def test_train_transformation_writes_what_features_embedded_here_give(fct_run):
    """Procrustes from OUTPUT/final.pth (NEW_MODEL.WEIGHTS empty) equals the closed form computed here on
    the list embedded independently; FCT writes a network of the models' dims with its provenance."""
    data, out, old = fct_run["data"], fct_run["out"], fct_run["old"]
    cfg = load_config(None, overrides(data, out, "OLD_MODEL.WEIGHTS", old, "TRANSFORM.TYPE", "procrustes"))
    summary = fitting.train_transformation(cfg, progress=False)
    path = out / "transformation.pth"
    assert summary["path"] == str(path) and (summary["kind"], summary["images"]) == ("procrustes", 32)
    x_old, x_new = embed("resnet18", old, data), embed("resnet18", str(out / "final.pth"), data)
    expected = orthogonal_procrustes(torch.nn.functional.normalize(x_old.double(), dim=1),
                                     torch.nn.functional.normalize(x_new.double(), dim=1))
    loaded = load_transformation(path)
    torch.testing.assert_close(loaded.weight, expected, atol=1e-5, rtol=0)
    assert summary["mse_mapped"] < summary["mse_identity"]

    cfg = load_config(None, overrides(data, out, "OLD_MODEL.WEIGHTS", old, "NEW_MODEL.WEIGHTS",
                                      str(out / "final.pth"), "TRANSFORM.EPOCHS", "2", "TRANSFORM.WARMUP_EPOCHS",
                                      "0", "TRANSFORM.WIDTH", "8", "TRANSFORM.BATCH_SIZE", "16"))
    summary = fitting.train_transformation(cfg, progress=False)
    loaded = load_transformation(path)
    assert (loaded.kind, loaded.in_dim, loaded.out_dim, loaded.width, loaded.depth) == ("fct", EMB, EMB, 8, 2)
    assert len(summary["losses"]) == 2 and all(np.isfinite(summary["losses"]))
    saved = torch.load(path, weights_only=True)["provenance"]
    assert (saved["old_weights"], saved["new_weights"], saved["train_list"]) == \
        (old, str(out / "final.pth"), str(data / "train.txt"))


def test_train_transformation_needs_the_old_model(fct_run, tmp_path):
    cfg = load_config(None, overrides(fct_run["data"], tmp_path / "out"))
    with pytest.raises(UserError, match="^OLD_MODEL.WEIGHTS is empty: the transformation maps the old model's"):
        fitting.train_transformation(cfg, progress=False)
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------- end to end, tiny benchmark
@pytest.mark.slow
def test_fct_new_model_transformation_and_cross_test_on_the_tiny_benchmark(tiny_synthetic, random_checkpoint,
                                                                          tmp_path):
    """COMP_LOSS.TYPE fct training -> tools/train_transformation.py (Procrustes) -> run_evaluation with
    EVAL.OLD_TRANSFORM on roxford5k: the cross test is the score of the new queries against the old gallery
    mapped here by the written matrix, on features embedded here."""
    import importlib.util

    from advbct.evaluation.evaluate import run_evaluation
    from advbct.evaluation.protocol import image_datasets, load_test_set, score
    from helpers import REPO

    gld = tiny_synthetic / "gldv2"
    lines = next(gld.glob("label_*.txt")).read_text().splitlines()
    short = tmp_path / "train.txt"
    short.write_text("\n".join(lines[::8]) + "\n")  # every 8th image: ~50
    out, old = tmp_path / "fct", random_checkpoint(12, EMB)
    common = ["OUTPUT", str(out), "DATA.TRAIN_LIST", str(short), "DATA.ROOT", str(gld), "MODEL.ARCH", "resnet18",
              "MODEL.EMB_DIM", str(EMB), "MODEL.PRETRAINED", "false", "DATA.IMG_SIZE", "32", "DATA.NUM_WORKERS", "0",
              "EVAL.NUM_WORKERS", "0", "EVAL.IMG_SIZE", "32", "OLD_MODEL.WEIGHTS", old, "COMP_LOSS.TYPE", "fct"]
    Trainer(load_config(None, common + ["TRAIN.BATCH_SIZE", "8", "TRAIN.EPOCHS", "1",
                                        "TRAIN.MAX_ITERS_PER_EPOCH", "1"])).fit()
    spec = importlib.util.spec_from_file_location("advbct_fit_tool", REPO / "tools" / "train_transformation.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    tool.main(["TRANSFORM.TYPE", "procrustes", *common])
    transform = out / "transformation.pth"
    root = tiny_synthetic / "ROxfordParis"
    (result,) = run_evaluation(load_config(None, common + [
        "NEW_MODEL.WEIGHTS", str(out / "final.pth"), "EVAL.OLD_TRANSFORM", str(transform), "EVAL.DATASET",
        "roxford5k", "EVAL.ROOT", str(root), "EVAL.SAVE_DIR", str(tmp_path / "eval")]))
    assert result["old_transform"] == {"path": str(transform), "kind": "procrustes"}

    ts = load_test_set("roxford5k", str(root))
    q_ds, g_ds = image_datasets(ts, image_input(32, "pil", "cpu"))
    new_model = load_trained_model("resnet18", str(out / "final.pth"), "TEST")
    old_model = load_trained_model("resnet18", old, "TEST")
    new_q = extract_features(new_model, q_ds, batch_size=64, num_workers=0, progress=False).numpy()
    old_q, old_g = (extract_features(old_model, ds, batch_size=64, num_workers=0, progress=False).numpy()
                    for ds in (q_ds, g_ds))
    w = torch.load(transform, weights_only=True)["state"]["weight"].numpy()
    expected = score(ts, new_q, old_g @ w)
    for subset in ("easy", "medium", "hard"):
        assert result["cross_test"]["mAP"][subset] == pytest.approx(expected["mAP"][subset], abs=1e-3)
    assert result["old_self_test"]["mAP"] == pytest.approx(score(ts, old_q, old_g)["mAP"], abs=1e-3)
