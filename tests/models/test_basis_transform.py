"""BT²'s embedding head (advbct/models/basis_transform.py): the orthonormal maps, the head against a per-sample
reference written from the release's equations, its checkpoint round trip and the zero-padding of old features."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from advbct.errors import UserError
from advbct.models import build_model, load_trained_model, save_checkpoint
from advbct.models.basis_transform import BasisTransformHead, Orthogonal, head_from_state, to_new_space


def expm_series(a: torch.Tensor, terms: int = 40) -> torch.Tensor:
    """exp(a) by its Taylor series in float64: an independent check of torch.linalg.matrix_exp."""
    out, term = torch.eye(a.shape[0], dtype=torch.float64), torch.eye(a.shape[0], dtype=torch.float64)
    for k in range(1, terms):
        term = term @ a / k
        out = out + term
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_orthogonal_is_orthonormal_and_is_base_times_the_exponential_of_a_skew_matrix(seed):
    torch.manual_seed(seed)
    o = Orthogonal(6)
    with torch.no_grad():
        o.skew.normal_(0, 0.3)
    w = o.weight.double()
    torch.testing.assert_close(w @ w.t(), torch.eye(6, dtype=torch.float64), atol=1e-5, rtol=0)
    s = o.skew.detach().double()
    torch.testing.assert_close(w, o.base.double() @ expm_series(s - s.t()), atol=1e-5, rtol=0)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # mixed precision rounds the product, not the basis
        w_amp = o.weight
    assert w_amp.dtype == torch.float32
    torch.testing.assert_close(w_amp @ w_amp.t(), torch.eye(6), atol=1e-5, rtol=0)
    x = torch.randn(5, 6)
    torch.testing.assert_close(o(x), x @ o.weight.t())
    torch.testing.assert_close(o(x).norm(dim=1), x.norm(dim=1))  # a basis change keeps lengths
    o(x).sum().backward()
    assert o.skew.grad is not None and o.skew.grad.abs().sum() > 0


def reference_embedding(head: BasisTransformHead, x: torch.Tensor) -> torch.Tensor:
    """e per sample, in float64, from the module docstring's equations (the head in eval mode: BN per sample)."""
    d, d_o, k = head.embed_dim, head.old_dim, head.extra_dim
    c = float(head.scale)
    w_new, w_old = head.basis_new.weight.detach().double(), head.basis_old.weight.detach().double()
    fc, proj_w, proj_b = head.fc.weight.detach().double(), head.proj.weight.detach().double(), head.proj.bias.detach().double()
    bn = head.bn
    rows = []
    for xi in x.double():
        z = fc @ xi
        z = (z - bn.running_mean.double()) / torch.sqrt(bn.running_var.double() + bn.eps) * bn.weight.double() \
            + bn.bias.double()
        f = z[:d]
        p = proj_w @ torch.clamp(z, min=0) + proj_b
        u = torch.cat([p / p.norm(), w_new @ (c * f / f.norm())])
        assert u.shape == (k + d,)
        rows.append(torch.cat([w_old @ u[:d_o], u[d_o:]]))
    return torch.stack(rows)


@pytest.mark.parametrize("seed, dims", [(0, (8, 8, 3)), (1, (8, 6, 4)), (2, (5, 9, 4))])
def test_head_matches_the_per_sample_reference(seed, dims):
    d, d_o, k = dims
    torch.manual_seed(seed)
    head = BasisTransformHead(12, d, d_o, k, scale=2.0)
    with torch.no_grad():
        head.basis_new.skew.normal_(0, 0.2)
        head.basis_old.skew.normal_(0, 0.2)
        head.bn.running_mean.normal_()
        head.bn.running_var.uniform_(0.5, 2.0)
    head.eval()
    x = torch.randn(7, 12)
    e, f = head.branches(x)
    assert e.shape == (7, d + k) and f.shape == (7, d) and head.out_dim == d + k
    assert (head.branch_dim, head.compatible_dim) == (d, d_o)
    torch.testing.assert_close(e.double(), reference_embedding(head, x), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(head(x), e)
    # every embedding has length √(1 + C²): ranking by dot product is ranking by cosine
    torch.testing.assert_close(e.norm(dim=1), torch.full((7,), math.sqrt(5.0)), atol=1e-5, rtol=0)


def test_every_part_of_the_head_is_trained():
    torch.manual_seed(3)
    head = BasisTransformHead(10, 6, 6, 2, scale=2.0)
    e, f = head.branches(torch.randn(9, 10))
    (e[:, :6].pow(3).sum() + e[:, 6:].sum() + f.pow(2).sum()).backward()
    for name, p in head.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("args, expect", [
    ((10, 6, 6, 7), "COMP_LOSS.BT2_EXTRA_DIM 7: expected at most the old embedding size 6"),
    ((10, 6, 12, 3), "COMP_LOSS.BT2_EXTRA_DIM 3: expected at most the old embedding size 12"),
    ((10, 6, 6, 0), "BT² head: dimensions must be positive"),
])
def test_impossible_sizes_are_refused_in_one_line(args, expect):
    with pytest.raises(UserError) as err:
        BasisTransformHead(*args, scale=2.0)
    assert str(err.value).startswith(expect) and "\n" not in str(err.value)


def test_a_checkpoint_rebuilds_its_head_from_the_weights(tmp_path):
    torch.manual_seed(4)
    model = build_model("resnet18", embed_dim=16, num_classes=5, pretrained=False,
                        head={"kind": "basis_transform", "old_dim": 16, "extra_dim": 4, "scale": 1.5})
    assert model.classifier.weight.shape == (5, 16)  # the classifier reads the 16-d new branch
    assert model.spec["head"] == {"kind": "basis_transform", "old_dim": 16, "extra_dim": 4, "scale": 1.5}
    with torch.no_grad():
        model.embedding.basis_old.skew.normal_(0, 0.1)
    path = tmp_path / "bt2.pth"
    save_checkpoint(path, {"model": model.state_dict()})
    assert head_from_state(model.state_dict()) == {"embed_dim": 16, "old_dim": 16, "extra_dim": 4, "scale": 1.5}
    loaded = load_trained_model("resnet18", str(path), "NEW_MODEL.WEIGHTS")
    assert (loaded.embed_dim, loaded.compatible_dim, loaded.classifier) == (20, 16, None)
    x = torch.randn(2, 3, 32, 32)
    model.eval(), loaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded.embed(x), model.embed(x))
    plain = build_model("resnet18", embed_dim=16, pretrained=False)
    assert head_from_state(plain.state_dict()) is None and plain.compatible_dim == plain.embed_dim == 16


def test_a_checkpoint_missing_part_of_its_head_is_refused_in_one_line(tmp_path):
    model = build_model("resnet18", embed_dim=8, pretrained=False,
                        head={"kind": "basis_transform", "old_dim": 8, "extra_dim": 2, "scale": 2.0})
    state = model.state_dict()
    del state["embedding.scale"]
    path = tmp_path / "cut.pth"
    save_checkpoint(path, {"model": state})
    with pytest.raises(UserError) as err:
        load_trained_model("resnet18", str(path), "NEW_MODEL.WEIGHTS")
    assert str(err.value) == f"NEW_MODEL.WEIGHTS: {path} holds a BT² embedding head without 'embedding.scale'"


def test_unknown_head_is_refused_in_one_line():
    with pytest.raises(UserError, match="^embedding head 'mlp'"):
        build_model("resnet18", embed_dim=8, pretrained=False, head={"kind": "mlp"})


def test_old_features_are_zero_padded_into_the_new_space():
    rng = np.random.default_rng(0)
    old = rng.standard_normal((4, 3)).astype(np.float32)
    padded = to_new_space(old, 5)
    assert padded.shape == (4, 5) and padded.dtype == np.float32
    np.testing.assert_array_equal(padded[:, :3], old)
    np.testing.assert_array_equal(padded[:, 3:], 0)
    assert to_new_space(old, 3) is old
    t = torch.from_numpy(old)
    torch.testing.assert_close(to_new_space(t, 5), torch.from_numpy(padded))
    # a new query scores a padded old item as its leading dims score the old one (the release's cross test)
    q = rng.standard_normal((2, 5)).astype(np.float32)
    np.testing.assert_allclose(q @ padded.T, q[:, :3] @ old.T, rtol=1e-6)
    with pytest.raises(ValueError):
        to_new_space(old, 2)
    # normalising the padded vectors is normalising the old ones
    np.testing.assert_allclose(F.normalize(torch.from_numpy(padded), dim=1)[:, :3].numpy(),
                               F.normalize(t, dim=1).numpy(), rtol=1e-6)
