"""A new model trained compatible with the models before the old one too (OLD_MODEL.EARLIER_WEIGHTS): one more
term per earlier model, each the term a run against that model alone computes; learnable parts of those terms
optimised, saved and resumed; every refusal in one line before the first step. Tiny runs on the ``image_list``
fixture (4 classes, 32 px)."""

import pytest
import torch

from advbct.config import load_config
from advbct.engine.builders import build_earlier_compatibility
from advbct.engine.meta_extraction import extract_meta
from advbct.engine.trainer import Trainer
from advbct.errors import UserError

EMB = 32


@pytest.fixture(scope="module")
def models(image_list, random_checkpoint, tmp_path_factory):
    """The old model (3 classes), two earlier ones (2 classes each, other seeds), one of another size, and the
    class metas of the old model and of the first earlier one over their own classes' images."""
    old, e1, e2 = random_checkpoint(7, EMB, 3), random_checkpoint(9, EMB, 2), random_checkpoint(10, EMB, 2)
    folder = tmp_path_factory.mktemp("earlier")
    lines = (image_list / "train.txt").read_text().splitlines()
    found = {"data": image_list, "old": old, "e1": e1, "e2": e2, "small": random_checkpoint(9, 16, 2),
             "start": random_checkpoint(11, EMB, 4)}
    for name, checkpoint, classes in (("meta_old", old, 3), ("meta_e1", e1, 2)):
        listed = folder / f"{name}.txt"
        listed.write_text("\n".join(l for l in lines if int(l.split()[1]) < classes) + "\n")
        found[name] = str(folder / f"{name}.pt")
        extract_meta(load_config(None, ["OLD_MODEL.WEIGHTS", checkpoint, "META.TRAIN_LIST", str(listed),
                                        "DATA.ROOT", str(image_list), "DATA.IMG_SIZE", "32", "EVAL.NUM_WORKERS", "0",
                                        "COMP_LOSS.META_PATH", found[name]]), progress=False)
    return found


def config(models, out, *extra, method="bct", old="old"):
    data = models["data"]
    return load_config(None, [
        "OUTPUT", str(out), "DATA.TRAIN_LIST", str(data / "train.txt"), "DATA.ROOT", str(data), "MODEL.ARCH",
        "resnet18", "MODEL.EMB_DIM", str(EMB), "MODEL.PRETRAINED", "false", "DATA.IMG_SIZE", "32",
        "DATA.NUM_WORKERS", "0", "TRAIN.BATCH_SIZE", "8", "TRAIN.EPOCHS", "1", "TRAIN.MAX_ITERS_PER_EPOCH", "2",
        "TRAIN.PRINT_FREQ", "1", "SEED", "1234", "COMP_LOSS.TYPE", method, "OLD_MODEL.WEIGHTS", models[old], *extra])


def means(cfg):
    return {k: float(v) for k, v in Trainer(cfg).fit()[0].items()}


def test_each_earlier_term_is_the_term_against_that_model_alone(models, tmp_path):
    """Every run starts from the same weights (MODEL.WEIGHTS) and keeps them (TRAIN.LR 0), so each sees the same
    embeddings of the same batches."""
    fixed = ("TRAIN.LR", "0", "MODEL.WEIGHTS", models["start"])
    both = means(config(models, tmp_path / "both", *fixed,
                        "OLD_MODEL.EARLIER_WEIGHTS", f"[{models['e1']},{models['e2']}]"))
    alone = means(config(models, tmp_path / "e2", *fixed, old="e2"))
    assert both["earlier2_bct"] == pytest.approx(alone["bct"], rel=1e-6)
    assert both["cls"] == pytest.approx(alone["cls"], rel=1e-6)  # the same model and batches in both runs
    assert both["earlier1_bct"] != pytest.approx(both["earlier2_bct"], rel=1e-3)  # two models, two terms
    assert both["bct"] != pytest.approx(both["earlier1_bct"], rel=1e-3)  # and neither is the old model's
    assert both["bct"] != pytest.approx(both["earlier2_bct"], rel=1e-3)
    assert both["total"] == pytest.approx(both["cls"] + both["comp"] + both["earlier1_comp"] + both["earlier2_comp"],
                                          rel=1e-6)


def test_learnable_parts_of_earlier_terms_are_optimised_saved_and_resumed(models, tmp_path):
    out = tmp_path / "run"
    advbct = ("COMP_LOSS.META_PATH", models["meta_old"], "OLD_MODEL.EARLIER_WEIGHTS", f"[{models['e1']}]",
              "OLD_MODEL.EARLIER_META_PATHS", f"[{models['meta_e1']}]")
    trainer = Trainer(config(models, out, *advbct, method="advbct"))
    earlier_loss = trainer.earlier[0].loss
    assert earlier_loss.num_old_classes == 2 and trainer.comp_loss.num_old_classes == 3
    learnable = [p for p in earlier_loss.parameters() if p.requires_grad]  # its radii and discriminator
    optimised = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert learnable and {id(p) for p in learnable} <= optimised
    before = [p.detach().clone() for p in learnable]
    trainer.fit()
    assert any(not torch.equal(a, p) for a, p in zip(before, learnable))
    saved = torch.load(out / "last.pth", weights_only=False)["earlier_comp_losses"]
    assert len(saved) == 1 and saved[0].keys() == earlier_loss.state_dict().keys()
    resumed = Trainer(config(models, out, *advbct, "TRAIN.RESUME", "auto", "TRAIN.EPOCHS", "2", method="advbct"))
    for key, value in earlier_loss.state_dict().items():
        torch.testing.assert_close(resumed.earlier[0].loss.state_dict()[key], value)


@pytest.mark.parametrize("extra, method, expect", [
    (("OLD_MODEL.EARLIER_WEIGHTS", "[{e1}]"), "", "OLD_MODEL.EARLIER_WEIGHTS is set but COMP_LOSS.TYPE '' trains no "
                                                  "compatibility term against an old model"),
    (("OLD_MODEL.EARLIER_WEIGHTS", "[{e1},{e2}]", "OLD_MODEL.EARLIER_ARCHS", "[resnet18,resnet18,resnet18]"), "bct",
     "OLD_MODEL.EARLIER_ARCHS: 3 backbones for 2 checkpoints"),
    (("OLD_MODEL.EARLIER_WEIGHTS", "[{e1},{e2}]", "COMP_LOSS.META_PATH", "{meta_old}",
      "OLD_MODEL.EARLIER_META_PATHS", "[{meta_e1}]"), "advbct", "OLD_MODEL.EARLIER_META_PATHS: 1 meta files for 2"),
    (("OLD_MODEL.EARLIER_WEIGHTS", "[{small}]"), "bct", "OLD_MODEL.EARLIER_WEIGHTS[0] embeds to 16 dims"),
    (("OLD_MODEL.EARLIER_WEIGHTS", "[{e1},{e1}]", "COMP_LOSS.META_PATH", "{meta_old}",
      "OLD_MODEL.EARLIER_META_PATHS", "[{meta_e1},{meta_old}]"), "advbct",
     "OLD_MODEL.EARLIER_META_PATHS[1] {meta_old} holds 3 classes but the old model has 2"),
])
def test_refusals_in_one_line(models, tmp_path, extra, method, expect):
    values = {k: v for k, v in models.items() if isinstance(v, str)}
    cfg = config(models, tmp_path / "run", *[x.format(**values) for x in extra], method=method)
    with pytest.raises(UserError) as err:
        build_earlier_compatibility(cfg, num_classes=4, device=torch.device("cpu"))
    assert str(err.value).startswith(expect.format(**values)) and "\n" not in str(err.value)


def test_the_trainer_refuses_before_writing_anything(models, tmp_path):
    with pytest.raises(UserError, match=r"^OLD_MODEL.EARLIER_WEIGHTS\[0\] embeds to 16 dims"):
        Trainer(config(models, tmp_path / "run", "OLD_MODEL.EARLIER_WEIGHTS", f"[{models['small']}]"))
    assert not (tmp_path / "run").exists()


def test_each_old_checkpoint_is_read_once(models, tmp_path, monkeypatch):
    """The old and every earlier checkpoint: their shapes and their weights from one read each."""
    reads = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda f, *a, **k: reads.append(str(f)) or real_load(f, *a, **k))
    cfg = config(models, tmp_path / "run", "OLD_MODEL.EARLIER_WEIGHTS", f"[{models['e1']},{models['e2']}]")
    from advbct.engine.builders import build_compatibility

    build_compatibility(cfg, num_classes=4, device=torch.device("cpu"))
    build_earlier_compatibility(cfg, num_classes=4, device=torch.device("cpu"))
    assert sorted(reads) == sorted([models["old"], models["e1"], models["e2"]])
