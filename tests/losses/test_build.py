"""The compatibility-loss registry as the builder sees it: names, construction-time errors, flags and buffers
(the declarations themselves: tests/losses/test_registry.py)."""

import pytest
import torch

from advbct.errors import UserError
from advbct.losses import (
    LOSSES,
    CompatibilityLoss,
    build_compat_loss,
    get_method,
    list_methods,
    needs_meta,
    needs_old_classifier,
)
from advbct.meta import ClassMeta

D, C_OLD = 4, 5


def meta(num_classes=C_OLD, dim=D):
    n_kept = torch.full((num_classes,), 4)
    return ClassMeta(centers=torch.rand(num_classes, dim), r_max=torch.full((num_classes,), 0.5),
                     r_min=torch.full((num_classes,), 0.2), counts=n_kept.clone(), n_kept=n_kept,
                     theta_max=torch.full((num_classes,), 0.7))


def build(cfg, **kw):
    args = dict(embed_dim=D, num_old_classes=C_OLD, total_epochs=3)
    args.update(kw)
    return build_compat_loss(cfg, **args)


def test_registry_names_and_types():
    assert set(LOSSES) == {"bct", "lce", "unibct", "hot_refresh", "advbct", "l2", "mixbct", "bt2", "fct"}
    assert list(LOSSES) == list_methods() and all(LOSSES[n] is get_method(n).loss_class for n in LOSSES)
    full = dict(meta=meta(), old_classifier_weight=torch.randn(C_OLD, D))
    for name in LOSSES:
        loss = build({"TYPE": name}, **full)
        if get_method(name).needs_transformation:  # fct: no term (the new model trains as phi*)
            assert loss is None
            continue
        assert isinstance(loss, CompatibilityLoss) and isinstance(loss, LOSSES[name])
    assert build({"TYPE": ""}) is None and build({}) is None


def test_unknown_type_lists_valid_names():
    with pytest.raises(UserError) as err:
        build({"TYPE": "bct_limit"})
    msg = str(err.value)
    assert "COMP_LOSS.TYPE" in msg and all(name in msg for name in LOSSES) and "\n" not in msg


@pytest.mark.parametrize("name", ["lce", "unibct", "advbct"])
def test_meta_required_at_construction(name):
    with pytest.raises(UserError, match="COMP_LOSS.META_PATH"):
        build({"TYPE": name})
    with pytest.raises(UserError, match="COMP_LOSS.META_PATH"):
        build({"TYPE": name}, meta=meta(dim=D + 1))
    with pytest.raises(UserError, match="COMP_LOSS.META_PATH"):
        build({"TYPE": name}, meta=meta(num_classes=C_OLD - 1))
    assert build({"TYPE": name}, meta=meta(num_classes=C_OLD + 3)) is not None  # extra classes are ignored


def test_needs_flags():
    assert needs_meta({"TYPE": "lce"}) and needs_meta({"TYPE": "unibct"}) and needs_meta({"TYPE": "advbct"})
    assert not needs_meta({"TYPE": "advbct", "BOUNDARY": False})
    assert not needs_meta({"TYPE": "bct"}) and not needs_meta({"TYPE": "hot_refresh"}) and not needs_meta({})
    assert needs_old_classifier({"TYPE": "bct"}) and not needs_old_classifier({"TYPE": "advbct"})
    assert LOSSES["bct"].needs_old_classifier and LOSSES["lce"].needs_meta and LOSSES["lce"].needs_new_classifier
    assert build({"TYPE": "advbct", "BOUNDARY": False}) is not None  # no meta needed without the boundary


def test_bct_needs_old_classifier_with_the_right_shape():
    with pytest.raises(UserError, match="OLD_MODEL.WEIGHTS"):
        build({"TYPE": "bct"})
    with pytest.raises(UserError, match="OLD_MODEL.WEIGHTS"):
        build({"TYPE": "bct"}, old_classifier_weight=torch.randn(C_OLD + 1, D))


def test_option_values_are_checked():
    with pytest.raises(UserError, match="COMP_LOSS.LCE_VARIANT"):
        build({"TYPE": "lce", "LCE_VARIANT": "paper"}, meta=meta())
    with pytest.raises(UserError, match="COMP_LOSS.TEMPERATURE"):
        build({"TYPE": "hot_refresh", "TEMPERATURE": 0.0})
    with pytest.raises(UserError, match="COMP_LOSS.TOPK_NEG"):
        build({"TYPE": "hot_refresh", "TOPK_NEG": -1})
    no_theta = meta()
    no_theta.theta_max = torch.full((C_OLD,), float("nan"))  # e.g. an imported radius-only JSON
    with pytest.raises(UserError, match="theta_max"):
        build({"TYPE": "lce"}, meta=no_theta)


def test_meta_buffers_follow_the_module_and_stay_out_of_checkpoints():
    loss = build({"TYPE": "unibct"}, meta=meta())
    assert loss.unit_centers.dtype == torch.float32
    loss = loss.to(torch.float64)
    assert loss.unit_centers.dtype == torch.float64  # buffers move with the module
    assert loss.state_dict() == {}
    bct = build({"TYPE": "bct"}, old_classifier_weight=torch.randn(C_OLD, D))
    assert "old_weight" not in bct.state_dict() and not list(bct.parameters())
