"""BT² (advbct/losses/bt2.py): the loss against a per-sample reference of the release's three terms (values and
gradients, several seeds), its declaration, the builders' checks in one line (teacher, class means over the new
training list), the class means extracted over DATA.TRAIN_LIST, and a short training with the real trainer."""

import math

import pytest
import torch
import torch.nn.functional as F

from advbct.config import load_config
from advbct.engine.builders import build_compatibility, build_new_model, build_teacher
from advbct.engine.meta_extraction import extract_meta
from advbct.engine.trainer import Trainer
from advbct.errors import UserError
from advbct.losses import build_compat_loss, get_method
from advbct.losses.bt2 import BT2Loss
from advbct.losses.build import meta_classes, new_model_head, teacher_checkpoint
from advbct.meta import ClassMeta, load_meta
from advbct.models import load_trained_model
from advbct.models.basis_transform import BasisTransformHead

D_OLD, D_NEW, K, CLASSES = 6, 6, 3, 5


def make_meta(seed, classes=CLASSES, dim=D_OLD):
    g = torch.Generator().manual_seed(seed)
    n = torch.full((classes,), 4)
    return ClassMeta(centers=0.7 * F.normalize(torch.randn(classes, dim, generator=g), dim=1),
                     r_max=torch.full((classes,), 0.5), r_min=torch.full((classes,), 0.1), counts=n, n_kept=n,
                     theta_max=torch.full((classes,), 0.6))


def reference(feat_new, feat_old, branch, teacher, labels, centers, lambdas):
    """The release's batch loss, one sample at a time (trainers/transfer_trainer.py)."""
    l1, l2, l3 = lambdas
    ce, cos_old, cos_new = [], [], []
    for i in range(len(labels)):
        b = feat_new[i, :D_OLD] / feat_new[i, :D_OLD].norm()
        logits = torch.stack([b @ centers[k] for k in range(centers.shape[0])])
        ce.append(torch.logsumexp(logits, 0) - logits[labels[i]])
        cos_old.append(b @ (feat_old[i] / feat_old[i].norm()))
        cos_new.append((branch[i] / branch[i].norm()) @ (teacher[i] / teacher[i].norm()))
    n = len(labels)
    return (l2 * sum(ce) / n + l3 * (1 - sum(cos_old) / n) + l1 * (1 - sum(cos_new) / n),
            (sum(ce) / n, 1 - sum(cos_old) / n, 1 - sum(cos_new) / n))


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("lambdas, weight", [((1.0, 10.0, 5.0), 1.0), ((0.5, 2.0, 0.0), 0.3)])
def test_matches_the_per_sample_reference_in_values_and_gradients(seed, lambdas, weight):
    g = torch.Generator().manual_seed(seed)
    meta = make_meta(seed)
    loss = BT2Loss(meta, num_old_classes=2, match_new=lambdas[0], influence=lambdas[1], match_old=lambdas[2],
                   weight=weight)
    feat_new = torch.randn(7, D_NEW + K, generator=g, requires_grad=True)
    branch = torch.randn(7, D_NEW, generator=g, requires_grad=True)
    feat_old, teacher = torch.randn(7, D_OLD, generator=g), torch.randn(7, D_NEW, generator=g)
    labels = torch.randint(0, CLASSES, (7,), generator=g)  # new classes too: the class means cover every class
    out = loss(feat_new, feat_old, labels, progress=0.5, epoch=0, aux={"branch": branch, "teacher": teacher})
    ref, (ce, mo, mn) = reference(feat_new, feat_old, branch, teacher, labels, meta.centers, lambdas)
    torch.testing.assert_close(out["loss"], weight * ref)
    torch.testing.assert_close(out["bt2"], ref.detach())
    for key, value in (("bt2_influence", ce), ("bt2_match_old", mo), ("bt2_match_new", mn)):
        torch.testing.assert_close(out[key], value.detach())
    grads = torch.autograd.grad(out["loss"], (feat_new, branch))
    want = torch.autograd.grad(weight * ref, (feat_new, branch))
    for got, exp in zip(grads, want):
        torch.testing.assert_close(got, exp)
    assert grads[0][:, D_OLD:].abs().sum() == 0  # the added dims are free of the old model's terms


def test_the_trainer_head_and_the_loss_agree_on_the_compatible_dims():
    """The loss reads e[:D_o], which is B_o applied to the head's first D_o concatenated dims."""
    torch.manual_seed(0)
    head = BasisTransformHead(10, D_NEW, D_OLD, K, scale=2.0).eval()
    e, f = head.branches(torch.randn(4, 10))
    loss = BT2Loss(make_meta(0), num_old_classes=2)
    out = loss(e, e[:, :D_OLD].detach(), torch.tensor([0, 1, 2, 3]), progress=0.0, epoch=0,
               aux={"branch": f, "teacher": f.detach()})
    # old features equal to the compatible dims and a teacher equal to the branch: both matching terms vanish
    assert abs(float(out["bt2_match_old"])) < 1e-6 and abs(float(out["bt2_match_new"])) < 1e-6


def test_missing_aux_inputs_are_a_programming_error():
    loss = BT2Loss(make_meta(0), num_old_classes=2)
    with pytest.raises(ValueError, match=r"needs aux inputs \['teacher'\]"):
        loss(torch.randn(2, D_NEW + K), torch.randn(2, D_OLD), torch.tensor([0, 1]), progress=0.0, epoch=0,
             aux={"branch": torch.randn(2, D_NEW)})


def test_declaration_and_defaults_are_the_releases():
    method = get_method("bt2")
    assert (method.label, method.paper_row, method.loss_class) == ("BT2", False, BT2Loss)
    assert {o.key: o.default for o in method.options} == {
        "BT2_EXTRA_DIM": 32, "BT2_SCALE": 2.0, "BT2_TEACHER": "", "BT2_MATCH_NEW": 1.0, "BT2_INFLUENCE": 10.0,
        "BT2_MATCH_OLD": 5.0}
    comp = {"TYPE": "bt2"}
    assert new_model_head(comp, old_dim=256) == {"kind": "basis_transform", "extra_dim": 32, "scale": 2.0,
                                                 "old_dim": 256}
    assert teacher_checkpoint({"TYPE": "bt2", "BT2_TEACHER": "phi.pth"}) == ("COMP_LOSS.BT2_TEACHER", "phi.pth")
    assert meta_classes(comp) == "train" and meta_classes({"TYPE": "advbct"}) == "old"
    assert new_model_head({"TYPE": "advbct"}, old_dim=8) is None and teacher_checkpoint({"TYPE": "bct"}) is None
    loss = build_compat_loss(comp, embed_dim=D_OLD, num_old_classes=2, total_epochs=1, meta=make_meta(0))
    assert loss.aux_inputs == ("branch", "teacher") and not list(loss.parameters()) and loss.state_dict() == {}


@pytest.mark.parametrize("key, value, expect", [
    ("BT2_EXTRA_DIM", 0, "COMP_LOSS.BT2_EXTRA_DIM 0: expected a positive number of dimensions"),
    ("BT2_SCALE", -1.0, "COMP_LOSS.BT2_SCALE -1.0: expected a positive number"),
    ("BT2_INFLUENCE", -0.5, "COMP_LOSS.BT2_INFLUENCE -0.5: expected a weight >= 0"),
])
def test_option_values_are_checked_in_one_line(key, value, expect):
    with pytest.raises(UserError) as err:
        new_model_head({"TYPE": "bt2", key: value}, old_dim=8)
    assert str(err.value) == expect


# ------------------------------------------------------------------------- builders, on the tiny image list
def bt2_config(setup, *extra):
    data = setup["data"]
    return load_config(None, [
        "DATA.TRAIN_LIST", str(data / "train.txt"), "DATA.ROOT", str(data), "MODEL.ARCH", "resnet18",
        "MODEL.EMB_DIM", "32", "MODEL.PRETRAINED", "false", "DATA.IMG_SIZE", "32", "DATA.NUM_WORKERS", "0",
        "EVAL.NUM_WORKERS", "0", "OLD_MODEL.WEIGHTS", setup["old"], "COMP_LOSS.TYPE", "bt2",
        "COMP_LOSS.BT2_TEACHER", setup["teacher"], "COMP_LOSS.BT2_EXTRA_DIM", "8", *extra])


@pytest.fixture(scope="module")
def setup(image_list, random_checkpoint, tmp_path_factory):
    """The 4-class image list, an old model on its first 2 classes, phi* on all 4, and BT²'s class means."""
    s = {"data": image_list, "old": random_checkpoint(7, 32, 2), "teacher": random_checkpoint(8, 32, 4)}
    s["meta"] = str(tmp_path_factory.mktemp("bt2") / "means.pt")
    # META.TRAIN_LIST names no file: BT²'s means are of DATA.TRAIN_LIST, every class the new model trains on
    extract_meta(bt2_config(s, "COMP_LOSS.META_PATH", s["meta"], "META.TRAIN_LIST", "absent.txt"), progress=False)
    return s


def test_class_means_read_the_old_checkpoint_once(setup, tmp_path, monkeypatch):
    reads = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda f, *a, **k: reads.append(str(f)) or real_load(f, *a, **k))
    extract_meta(bt2_config(setup, "COMP_LOSS.META_PATH", str(tmp_path / "m.pt")), progress=False)
    assert reads == [setup["old"]]


def test_class_means_cover_every_class_of_the_training_list(setup):
    from advbct.data.image_list import read_image_list

    meta = load_meta(setup["meta"])
    paths, labels = read_image_list(str(setup["data"] / "train.txt"), root=str(setup["data"]))
    assert meta.num_classes == 4 == int(labels.max()) + 1 and meta.embed_dim == 32
    assert meta.counts.tolist() == [int((labels == k).sum()) for k in range(4)]


def test_builders_give_the_head_the_teacher_and_the_loss(setup):
    cfg = bt2_config(setup, "COMP_LOSS.META_PATH", setup["meta"])
    model = build_new_model(cfg, num_classes=4)
    assert (model.embed_dim, model.compatible_dim, model.classifier.weight.shape) == (40, 32, (4, 32))
    old_model, loss = build_compatibility(cfg, num_classes=4, device=torch.device("cpu"))
    assert isinstance(loss, BT2Loss) and loss.pseudo_classifier.shape == (4, 32) and old_model.num_classes == 2
    teacher = build_teacher(cfg, torch.device("cpu"))
    assert teacher.embed_dim == 32 and not any(p.requires_grad for p in teacher.parameters())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(teacher.embed(x), load_trained_model("resnet18", setup["teacher"], "T").eval().embed(x))


def test_refusals_name_the_key_in_one_line(setup, random_checkpoint):
    cases = [
        (bt2_config(setup, "COMP_LOSS.BT2_TEACHER", ""), "COMP_LOSS.BT2_TEACHER is empty: give the checkpoint path"),
        (bt2_config(setup, "COMP_LOSS.BT2_TEACHER", random_checkpoint(8, 16, 4)),
         "COMP_LOSS.BT2_TEACHER"),
    ]
    for cfg, expect in cases:
        with pytest.raises(UserError) as err:
            build_teacher(cfg, torch.device("cpu"))
        assert str(err.value).startswith(expect) and "\n" not in str(err.value)
    assert "embeds to 16 dims but MODEL.EMB_DIM is 32" in str(err.value)
    # class means of fewer classes than the training list has
    with pytest.raises(UserError) as err:
        build_compatibility(bt2_config(setup, "COMP_LOSS.META_PATH", setup["meta"]), num_classes=6,
                            device=torch.device("cpu"))
    assert str(err.value) == f"COMP_LOSS.META_PATH {setup['meta']} holds 4 classes but DATA.TRAIN_LIST has 6"
    with pytest.raises(UserError) as err:
        build_new_model(bt2_config(setup, "COMP_LOSS.BT2_EXTRA_DIM", "33"), num_classes=4)
    assert str(err.value).startswith("COMP_LOSS.BT2_EXTRA_DIM 33: expected at most the old embedding size 32")


@pytest.mark.slow
def test_trains_with_the_real_trainer_and_its_checkpoint_is_a_bt2_model(setup, tmp_path):
    out = tmp_path / "run"
    cfg = bt2_config(setup, "COMP_LOSS.META_PATH", setup["meta"], "OUTPUT", str(out), "TRAIN.BATCH_SIZE", "8",
                     "TRAIN.EPOCHS", "1", "TRAIN.MAX_ITERS_PER_EPOCH", "2", "TRAIN.PRINT_FREQ", "1",
                     "COMP_LOSS.WEIGHT", "0.5")
    trainer = Trainer(cfg)
    means = {k: float(v) for k, v in trainer.fit()[0].items()}
    assert {"cls", "comp", "total", "bt2", "bt2_influence", "bt2_match_old", "bt2_match_new"} <= set(means)
    assert all(math.isfinite(v) for v in means.values())
    assert means["bt2"] == pytest.approx(10 * means["bt2_influence"] + 5 * means["bt2_match_old"]
                                         + means["bt2_match_new"], rel=1e-5)
    assert means["comp"] == pytest.approx(0.5 * means["bt2"], rel=1e-5)
    assert means["total"] == pytest.approx(means["cls"] + means["comp"], rel=1e-5)
    assert 0 < means["bt2_match_new"] < 2 and 0 < means["bt2_influence"]
    model = load_trained_model("resnet18", str(out / "final.pth"), "NEW_MODEL.WEIGHTS", with_classifier=True)
    assert (model.embed_dim, model.compatible_dim, model.num_classes) == (40, 32, 4)
    assert model.embedding.spec() == {"kind": "basis_transform", "old_dim": 32, "extra_dim": 8, "scale": 2.0}


@pytest.mark.slow
def test_trained_and_tested_on_the_tiny_benchmark(tiny_synthetic, random_checkpoint, tmp_path):
    """Class means, a short BT² training and run_evaluation on roxford5k: the saved checkpoint is rebuilt as a
    BT² model; self-test on its 40-d embeddings, cross test the release's (new queries cut to the old 32 dims)."""
    from advbct.data.decoding import image_input
    from advbct.evaluation.evaluate import run_evaluation
    from advbct.evaluation.features import extract_features
    from advbct.evaluation.protocol import image_datasets, load_test_set, score

    gld = tiny_synthetic / "gldv2"
    lines = next(gld.glob("label_*.txt")).read_text().splitlines()
    short = tmp_path / "train.txt"
    short.write_text("\n".join(lines[::8]) + "\n")  # every 8th image: ~50
    out, old, teacher = tmp_path / "bt2", random_checkpoint(12, 32), random_checkpoint(13, 32)
    common = ["OUTPUT", str(out), "DATA.TRAIN_LIST", str(short), "DATA.ROOT", str(gld), "MODEL.ARCH", "resnet18",
              "MODEL.EMB_DIM", "32", "MODEL.PRETRAINED", "false", "DATA.IMG_SIZE", "32", "DATA.NUM_WORKERS", "0",
              "EVAL.NUM_WORKERS", "0", "EVAL.IMG_SIZE", "32", "OLD_MODEL.WEIGHTS", old, "OLD_MODEL.NUM_CLASSES", "2",
              "COMP_LOSS.TYPE", "bt2", "COMP_LOSS.BT2_TEACHER", teacher, "COMP_LOSS.BT2_EXTRA_DIM", "8",
              "COMP_LOSS.META_PATH", str(tmp_path / "means.pt")]
    extract_meta(load_config(None, common), progress=False)
    Trainer(load_config(None, common + ["TRAIN.BATCH_SIZE", "8", "TRAIN.EPOCHS", "1",
                                        "TRAIN.MAX_ITERS_PER_EPOCH", "1"])).fit()
    root = tiny_synthetic / "ROxfordParis"
    (result,) = run_evaluation(load_config(None, common + [
        "NEW_MODEL.WEIGHTS", str(out / "final.pth"), "EVAL.DATASET", "roxford5k", "EVAL.ROOT", str(root),
        "EVAL.SAVE_DIR", str(tmp_path / "eval")]))

    ts = load_test_set("roxford5k", str(root))
    q_ds, g_ds = image_datasets(ts, image_input(32, "pil", "cpu"))
    new_model = load_trained_model("resnet18", str(out / "final.pth"), "TEST")
    old_model = load_trained_model("resnet18", old, "TEST")
    assert (new_model.embed_dim, new_model.compatible_dim) == (40, 32)
    new_q, new_g, old_g = (extract_features(m, ds, batch_size=64, num_workers=0, progress=False).numpy()
                           for m, ds in ((new_model, q_ds), (new_model, g_ds), (old_model, g_ds)))
    for key, expected in (("cross_test", score(ts, new_q[:, :32], old_g)), ("self_test", score(ts, new_q, new_g))):
        for subset in ("easy", "medium", "hard"):
            assert result[key]["mAP"][subset] == pytest.approx(expected["mAP"][subset], abs=1e-3), key
