"""The method registry: a compatibility method declared in one place reaches the config schema, the loss
builder, the trainer and the report labels; conflicting declarations are refused; the built-in methods'
COMP_LOSS keys and defaults are those of the configs under configs/.

The acceptance test declares a toy method in this file only (one ``register_method`` call), trains it
with the real Trainer for two tiny steps and unregisters it afterwards.
"""

import pytest
import torch
import torch.nn.functional as F
import yaml

from advbct.config import DEFAULTS, all_keys, describe, load_config
from advbct.engine.trainer import Trainer
from advbct.errors import UserError
from advbct.evaluation.backfill_report import _axis_and_labels, model_labels
from advbct.losses import (
    LOSSES,
    CompatibilityLoss,
    Option,
    build_compat_loss,
    get_method,
    list_methods,
    needs_meta,
    needs_old_classifier,
    register_method,
    unregister_method,
)
from advbct.losses.base import masked_mean, old_class_index
from advbct.losses.registry import config_section, labels, plot_labels
from advbct.meta import ClassMeta
from helpers import REPO

OLD_CLASSES, EMB = 2, 32   # the old model knows the first 2 of the image_list fixture's 4 classes

# COMP_LOSS keys, types and defaults as they were when the section was written out by hand in
# advbct/config.py (key names and defaults only; a config's tuned values are checked against its YAML)
COMP_LOSS_DEFAULTS = {
    "TYPE": "", "WEIGHT": 1.0, "META_PATH": "",
    "ELASTIC": True, "FIXED_RADIUS": "min", "BOUNDARY": True, "ADVERSARIAL": True, "THRESHOLD": 1.0,
    "ADV_SCHEDULE": "decay", "DISC_HIDDEN": 100, "GRL_GAMMA": 10.0,
    "LCE_VARIANT": "benchmark", "LCE_ALIGN_WEIGHT": 1.0,
    "ARC_SCALE": 30.0, "ARC_MARGIN": 0.3,
    "TEMPERATURE": 0.01, "TOPK_NEG": 0, "DETACH_KEYS": False,
    "MIX_RATIO": 0.3, "MIX_DENOISE": "meta", "MIX_REPLACE": True,
    "BT2_EXTRA_DIM": 32, "BT2_SCALE": 2.0, "BT2_TEACHER": "", "BT2_MATCH_NEW": 1.0, "BT2_INFLUENCE": 10.0,
    "BT2_MATCH_OLD": 5.0,
}
BUILT_IN = ["bct", "lce", "unibct", "hot_refresh", "advbct", "l2", "mixbct", "bt2", "fct"]


def meta(num_classes=3, dim=4):
    n_kept = torch.full((num_classes,), 4)
    return ClassMeta(centers=torch.rand(num_classes, dim), r_max=torch.full((num_classes,), 0.5),
                     r_min=torch.full((num_classes,), 0.2), counts=n_kept.clone(), n_kept=n_kept,
                     theta_max=torch.full((num_classes,), 0.7))


class ToyLoss(CompatibilityLoss):
    """scale · mean over old-class samples of ‖f̂_n − f̂_o‖²; records its inputs for the test."""

    def __init__(self, num_old_classes, scale, weight=1.0):
        super().__init__(num_old_classes, weight)
        self.scale = scale
        self.seen = []

    def compute(self, feat_new, feat_old, labels, *, new_classifier_weight, progress, epoch):
        self.seen.append((feat_new.detach().clone(), feat_old.clone(), labels.clone()))
        is_old, _ = old_class_index(labels, self.num_old_classes)
        dist = masked_mean((F.normalize(feat_new, dim=1) - F.normalize(feat_old, dim=1)).pow(2).sum(1), is_old)
        term = self.scale * dist
        return term, {"toy": term, "toy_dist": dist}


@pytest.fixture
def toy():
    """The toy method, declared with one call, unregistered afterwards so that no other test sees it."""
    built = []

    def build(opts, ctx):
        built.append(ToyLoss(ctx.num_old_classes, opts.TOY_SCALE, weight=opts.WEIGHT))
        return built[-1]

    method = register_method(
        "toy", ToyLoss, label="Toy", paper_row=False, build=build,
        options=[Option("TOY_SCALE", 2.0, "toy: scale of the squared distance", valid=lambda s: s > 0, expect="> 0")])
    yield method, built
    unregister_method("toy")
    assert "toy" not in list_methods() and "TOY_SCALE" not in DEFAULTS["COMP_LOSS"]


@pytest.fixture(scope="module")
def data(image_list, random_checkpoint):
    """The 4-class image list (the image_list fixture) and an old model of its first 2 classes (random weights,
    32-d)."""
    return {"data": image_list, "old": random_checkpoint(5, EMB, OLD_CLASSES)}


def toy_overrides(setup, out, *extra):
    data = setup["data"]
    return ["OUTPUT", str(out), "DATA.TRAIN_LIST", str(data / "train.txt"), "DATA.ROOT", str(data),
            "MODEL.ARCH", "resnet18", "MODEL.EMB_DIM", str(EMB), "MODEL.PRETRAINED", "false",
            "DATA.IMG_SIZE", "32", "DATA.NUM_WORKERS", "0", "TRAIN.BATCH_SIZE", "8", "TRAIN.EPOCHS", "1",
            "TRAIN.MAX_ITERS_PER_EPOCH", "2", "TRAIN.PRINT_FREQ", "1", "SEED", "1234",
            "OLD_MODEL.WEIGHTS", setup["old"], "COMP_LOSS.TYPE", "toy", *extra]


# ------------------------------------------------------------------------------- the acceptance test
def test_a_method_declared_in_one_place_trains_and_reaches_config_and_reports(toy, data, tmp_path):
    method, built = toy
    # config: the option is a COMP_LOSS key with its default and type, and TYPE's help names the method
    assert DEFAULTS["COMP_LOSS"]["TOY_SCALE"] == (2.0, "toy: scale of the squared distance")
    assert "COMP_LOSS.TOY_SCALE" in all_keys()
    assert "COMP_LOSS.TOY_SCALE = 2.0  # toy: scale of the squared distance" in describe()
    assert DEFAULTS["COMP_LOSS"]["TYPE"][1].endswith("| l2 | mixbct | bt2 | fct | toy")
    assert load_config().COMP_LOSS.TOY_SCALE == 2.0
    cfg = load_config(None, toy_overrides(data, tmp_path / "run", "COMP_LOSS.TOY_SCALE", "3",
                                          "COMP_LOSS.WEIGHT", "0.5"))
    assert cfg.COMP_LOSS.TOY_SCALE == 3.0 and isinstance(cfg.COMP_LOSS.TOY_SCALE, float)
    with pytest.raises(UserError, match="'COMP_LOSS.TOY_SCALE' expects a number"):
        load_config(None, ["COMP_LOSS.TOY_SCALE", "big"])
    with pytest.raises(UserError, match="closest valid key: COMP_LOSS.TOY_SCALE"):
        load_config(None, ["COMP_LOSS.TOY_SCAL", "3"])

    # the real trainer: the old model's features reach the toy term, which is logged with its weight
    history = Trainer(cfg).fit()
    assert len(history) == 1 and len(built) == 1 and len(built[0].seen) == 2
    means = {k: float(v) for k, v in history[0].items()}
    assert {"cls", "comp", "total", "toy", "toy_dist"} <= set(means)
    assert means["toy_dist"] > 0
    assert means["toy"] == pytest.approx(3.0 * means["toy_dist"], rel=1e-6)
    assert means["comp"] == pytest.approx(0.5 * means["toy"], rel=1e-6)
    assert means["total"] == pytest.approx(means["cls"] + means["comp"], rel=1e-6)
    # the logged term recomputed per sample from the inputs the loss saw (old classes 0 and 1 only)
    terms = []
    for feat_new, feat_old, y in built[0].seen:
        assert feat_new.shape == feat_old.shape == (8, EMB)
        old = [i for i in range(len(y)) if y[i] < OLD_CLASSES]
        assert old and len(old) < len(y)  # a batch mixes old and new classes
        dists = [float(((feat_new[i] / feat_new[i].norm() - feat_old[i] / feat_old[i].norm()) ** 2).sum())
                 for i in old]
        terms.append(3.0 * sum(dists) / len(dists))
    assert means["toy"] == pytest.approx(sum(terms) / len(terms), rel=1e-5)
    assert (tmp_path / "run" / "final.pth").exists()
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["COMP_LOSS"]["TOY_SCALE"] == 3.0

    # a bad value: one line naming the key, before the first training step
    bad = tmp_path / "bad"
    with pytest.raises(UserError) as err:
        Trainer(load_config(None, toy_overrides(data, bad, "COMP_LOSS.TOY_SCALE", "-1")))
    assert str(err.value) == "COMP_LOSS.TOY_SCALE -1.0: expected > 0"
    assert not (bad / "last.pth").exists() and len(built) == 1

    # the registry and the reports: a label of its own, not a row of the paper's table
    assert get_method("toy") is method and LOSSES["toy"] is ToyLoss
    assert list_methods()[-1] == "toy" and "toy" not in list_methods(paper_rows=True)
    assert labels()["toy"] == plot_labels()["toy"] == model_labels()["toy"] == "Toy"
    curve = {"ratios": [0.0, 1.0], "values": [1.0, 2.0], "metric": "mAP", "unit": "image", "seed": 0}
    assert _axis_and_labels({"toy": curve, "independent": curve})[1] == {"toy": "Toy", "independent": "phi*"}
    assert not needs_meta({"TYPE": "toy"}) and not needs_old_classifier({"TYPE": "toy"})


def test_an_unregistered_method_and_its_options_are_gone():
    assert "toy" not in list_methods() and "toy" not in LOSSES and "toy" not in model_labels()
    with pytest.raises(UserError, match="unknown config key 'COMP_LOSS.TOY_SCALE'"):
        load_config(None, ["COMP_LOSS.TOY_SCALE", "3"])
    with pytest.raises(UserError, match="COMP_LOSS.TYPE 'toy': expected '' \\(none\\) or one of bct, lce"):
        build_compat_loss({"TYPE": "toy"}, embed_dim=EMB, num_old_classes=OLD_CLASSES, total_epochs=1)


# ------------------------------------------------------------------------------ the built-in methods
def test_built_in_methods_labels_and_order():
    assert list_methods() == BUILT_IN
    assert list_methods(paper_rows=True) == ["bct", "lce", "unibct", "hot_refresh", "advbct"]
    # the table rows advbct/pipelines/blocks.py names today, and the backfilling plots' legends
    assert labels() == {"bct": "BCT", "lce": "LCE", "unibct": "UniBCT", "hot_refresh": "HotRefresh",
                        "advbct": "AdvBCT", "l2": "L2", "mixbct": "MixBCT", "bt2": "BT2", "fct": "FCT"}
    assert model_labels() == {"independent": "phi*", "bct": "BCT", "lce": "LCE", "unibct": "UniBCT",
                              "hot_refresh": "Hot-refresh", "advbct": "AdvBCT", "l2": "L2",
                              "mixbct": "MixBCT", "bt2": "BT2", "fct": "FCT", "fct_procrustes": "FCT (Procrustes)"}
    assert dict(LOSSES) == {name: get_method(name).loss_class for name in BUILT_IN}


def test_every_registered_option_is_a_config_key_with_its_default():
    section = DEFAULTS["COMP_LOSS"]
    assert section is config_section()
    resolved = load_config().COMP_LOSS
    declared = {"TYPE", "WEIGHT", "META_PATH"}
    for name in list_methods():
        for option in get_method(name).options:
            assert section[option.key] == (option.default, option.help), option.key
            assert resolved[option.key] == option.default and type(resolved[option.key]) is option.type
            declared.add(option.key)
    assert set(section) == declared == set(COMP_LOSS_DEFAULTS)
    assert section["TYPE"] == ("", "compatibility method: '' (none) | bct | lce | unibct | hot_refresh | advbct | l2 "
                                   "| mixbct | bt2 | fct")
    assert section["META_PATH"] == ("", "class meta file (scripts/extract_meta.sh): the old model's class centers "
                                        "and radii over its training list (bt2: over DATA.TRAIN_LIST); needed by lce, "
                                        "unibct, advbct, mixbct, bt2")
    assert section["WEIGHT"] == (1.0, "weight of the whole compatibility term")


def test_declared_needs_match_the_loss_classes():
    full = dict(embed_dim=4, num_old_classes=3, total_epochs=2,
                old_classifier_weight=torch.randn(3, 4))
    for name in BUILT_IN:
        loss = build_compat_loss({"TYPE": name}, meta=meta(), **full)
        if loss is None:  # fct: no term, the new model trains alone (tests/engine/test_transformation.py)
            assert get_method(name).loss_class.needs_transformation and not needs_meta({"TYPE": name})
            continue
        assert needs_meta({"TYPE": name}) == bool(loss.needs_meta), name
        assert needs_old_classifier({"TYPE": name}) == bool(loss.needs_old_classifier), name
    assert not needs_meta({"TYPE": "advbct", "BOUNDARY": False})
    assert not build_compat_loss({"TYPE": "advbct", "BOUNDARY": False}, **full).needs_meta


@pytest.mark.parametrize("key, value, expect", [
    ("FIXED_RADIUS", "mean", "COMP_LOSS.FIXED_RADIUS 'mean': expected one of min, max"),
    ("ADV_SCHEDULE", "linear", "COMP_LOSS.ADV_SCHEDULE 'linear': expected one of decay, constant"),
    ("LCE_VARIANT", "paper", "COMP_LOSS.LCE_VARIANT 'paper': expected one of benchmark, official"),
    ("TEMPERATURE", 0, "COMP_LOSS.TEMPERATURE 0.0: expected > 0"),
    ("TOPK_NEG", -2, "COMP_LOSS.TOPK_NEG -2: expected 0 (all negatives) or a positive count"),
])
def test_option_values_are_checked_in_one_line(key, value, expect):
    name = next(n for n in BUILT_IN if any(o.key == key for o in get_method(n).options))
    with pytest.raises(UserError) as err:
        build_compat_loss({"TYPE": name, key: value}, embed_dim=4, num_old_classes=3, total_epochs=2,
                          meta=meta())
    assert str(err.value) == expect


# ------------------------------------------------------------------------------------ conflicts
def _declare(name="toy2", options=(), **kw):
    kw.setdefault("label", "Toy2")
    return register_method(name, ToyLoss, build=lambda opts, ctx: ToyLoss(ctx.num_old_classes, 1.0),
                           options=options, **kw)


@pytest.mark.parametrize("options, kw, needle", [
    ([Option("TEMPERATURE", 0.5, "toy2: another temperature")], {}, "COMP_LOSS.TEMPERATURE = 0.5 .* conflicts "
     "with method 'hot_refresh', which declares it = 0.01"),
    ([Option("TOPK_NEG", 0.0, "toy2: a float count")], {}, "conflicts with method 'hot_refresh'"),
    ([Option("WEIGHT", 1.0, "toy2: its own weight")], {}, "not one of the shared keys"),
    ([Option("toy_scale", 1.0, "lower case")], {}, "upper-case"),
    ([Option("TOY_A", 1.0, "a"), Option("TOY_A", 1.0, "a again")], {}, "declared twice"),
    ([Option("TOY_T", (1, 2), "a tuple")], {}, "expected one of bool, int, float, str, list"),
    ([Option("TOY_T", 1.0, "two\nlines")], {}, "one-line help"),
    ([Option("TOY_T", 0.0, "t", valid=lambda t: t > 0, expect="> 0")], {}, "default fails its own check"),
    ([Option("TOY_T", 1.0, "t", valid=lambda t: t > 0)], {}, "no 'expect' text"),
    ([], {"label": "BCT"}, "label 'BCT' is empty or already used"),
])
def test_conflicting_declarations_are_refused_and_change_nothing(options, kw, needle):
    section_before = dict(DEFAULTS["COMP_LOSS"])
    with pytest.raises(ValueError, match=needle):
        _declare(options=options, **kw)
    assert list_methods() == BUILT_IN and dict(DEFAULTS["COMP_LOSS"]) == section_before


@pytest.mark.parametrize("name", ["bct", "independent", "Toy", "", "with-dash"])
def test_method_names_are_unique_and_well_formed(name):
    with pytest.raises(ValueError, match="already registered" if name == "bct" else "method name"):
        _declare(name=name)
    assert list_methods() == BUILT_IN


def test_a_shared_key_with_the_same_default_is_accepted_and_outlives_the_method():
    _declare(options=[Option("TEMPERATURE", 0.01, "toy2: the same temperature"), Option("TOY2_K", 3, "toy2: k")])
    try:
        assert DEFAULTS["COMP_LOSS"]["TEMPERATURE"] == (0.01, "hot_refresh: InfoNCE temperature")  # first help kept
        assert DEFAULTS["COMP_LOSS"]["TOY2_K"] == (3, "toy2: k")
        assert get_method("toy2").resolve({"TOY2_K": 5, "WEIGHT": 2}) == {"WEIGHT": 2.0, "TEMPERATURE": 0.01,
                                                                          "TOY2_K": 5}
    finally:
        unregister_method("toy2")
    assert "TOY2_K" not in DEFAULTS["COMP_LOSS"] and DEFAULTS["COMP_LOSS"]["TEMPERATURE"][0] == 0.01
    with pytest.raises(KeyError):
        unregister_method("toy2")


# ----------------------------------------------------------------------- every config under configs/
def _keys_set_by(path):
    """COMP_LOSS keys a YAML file sets itself or through its _BASE_ chain."""
    tree = yaml.safe_load(path.read_text()) or {}
    bases = tree.get("_BASE_", [])
    keys = set((tree.get("COMP_LOSS") or {}).keys())
    for base in [bases] if isinstance(bases, str) else bases:
        keys |= _keys_set_by(path.parent / base)
    return keys


CONFIGS = sorted(REPO.glob("configs/**/*.yml"))


def test_configs_exist():
    """The parametrisation below reaches every kind of config: each family's base and every row of its blocks,
    the synthetic pretraining configs and test_model.yml."""
    found = {str(p.relative_to(REPO / "configs")) for p in CONFIGS}
    rows = ["independent", "bct", "lce", "unibct", "hot_refresh", "advbct"]
    for family in ("gldv2", "synthetic"):
        assert f"{family}/base.yml" in found
        for block in ("data_r18", "class_r18", "data_r50", "class_r50"):
            assert {f"{family}/{block}/{row}.yml" for row in rows} <= found, (family, block)
    assert {"synthetic/pretrain_r18.yml", "synthetic/pretrain_r50.yml", "test_model.yml"} <= found


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(REPO / "configs")))
def test_comp_loss_of_every_config_keeps_its_keys_and_defaults(path):
    assert {k: (type(v[0]), v[0]) for k, v in DEFAULTS["COMP_LOSS"].items()} == \
        {k: (type(v), v) for k, v in COMP_LOSS_DEFAULTS.items()}
    comp = load_config(str(path)).COMP_LOSS
    assert set(comp) == set(COMP_LOSS_DEFAULTS)
    for key in set(COMP_LOSS_DEFAULTS) - _keys_set_by(path):
        assert comp[key] == COMP_LOSS_DEFAULTS[key], key
