"""Old-to-new transformations (advbct/models/transformation.py): the closed-form Procrustes map against known
answers and an independent reference, the FCT network's forward against a per-sample reference written from its
weights, and the checkpoint format with its one-line refusals."""

import numpy as np
import pytest
import torch

from advbct.errors import UserError
from advbct.models import save_checkpoint
from advbct.models.transformation import (
    FCTTransformation,
    ProcrustesMap,
    build_transformation,
    load_transformation,
    map_features,
    orthogonal_procrustes,
    save_transformation,
)


def random_orthogonal(d, seed):
    q, r = np.linalg.qr(np.random.default_rng(seed).standard_normal((d, d)))
    return q * np.sign(np.diag(r))  # a fixed sign per column: a proper Haar draw, not just any Q


def polar_reference(x_old, x_new):
    """The orthogonal polar factor of M = x_old^T x_new, M (M^T M)^(-1/2), from an eigendecomposition of M^T M
    (the same minimiser as U V^T of M's SVD when M has full rank, computed another way)."""
    m = x_old.astype(np.float64).T @ x_new.astype(np.float64)
    vals, vecs = np.linalg.eigh(m.T @ m)
    return m @ (vecs / np.sqrt(vals)) @ vecs.T


# ---------------------------------------------------------------------------------------- Procrustes
def test_procrustes_recovers_a_known_orthogonal_matrix_from_noiseless_features():
    q = random_orthogonal(16, seed=1)
    x_old = np.random.default_rng(2).standard_normal((200, 16))
    w = orthogonal_procrustes(torch.tensor(x_old), torch.tensor(x_old @ q))
    assert w.dtype == torch.float32 and w.shape == (16, 16)
    np.testing.assert_allclose(w.numpy(), q, atol=1e-5)


def test_procrustes_equals_independent_references_and_is_orthogonal():
    rng = np.random.default_rng(3)
    x_old = rng.standard_normal((300, 12))
    x_new = x_old @ rng.standard_normal((12, 12)) + 0.5 * rng.standard_normal((300, 12))  # no exact answer
    w = orthogonal_procrustes(torch.tensor(x_old), torch.tensor(x_new)).double().numpy()
    np.testing.assert_allclose(w, polar_reference(x_old, x_new), atol=1e-5)
    scipy_linalg = pytest.importorskip("scipy.linalg")
    np.testing.assert_allclose(w, scipy_linalg.orthogonal_procrustes(x_old, x_new)[0], atol=1e-5)
    np.testing.assert_allclose(w.T @ w, np.eye(12), atol=1e-5)
    # it minimises the residual: no other orthogonal matrix (here: random ones, the identity) does better
    best = np.linalg.norm(x_old @ w - x_new)
    for seed in range(5):
        assert best < np.linalg.norm(x_old @ random_orthogonal(12, seed) - x_new)
    assert best < np.linalg.norm(x_old - x_new)


def test_procrustes_between_different_sizes_has_orthonormal_rows():
    rng = np.random.default_rng(4)
    x_old, x_new = rng.standard_normal((100, 6)), rng.standard_normal((100, 10))
    w = orthogonal_procrustes(torch.tensor(x_old), torch.tensor(x_new)).double().numpy()
    assert w.shape == (6, 10)
    np.testing.assert_allclose(w @ w.T, np.eye(6), atol=1e-5)


# -------------------------------------------------------------------------------------- FCT network
def randomise_batchnorm(net, seed=0):
    """Running statistics and affine parameters away from their identity initialisation."""
    g = torch.Generator().manual_seed(seed)
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm1d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g))
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.randn(m.num_features, generator=g))
            m.bias.data.copy_(torch.randn(m.num_features, generator=g))


def per_sample_forward(net, x):
    """h(x) row by row from the weights: each hidden layer relu(gamma (W x - mean) / sqrt(var + eps) + beta),
    then the output layer W x + b."""
    linears = [m for m in net.modules() if isinstance(m, torch.nn.Linear)]
    norms = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm1d)]
    rows = []
    for v in x:
        for lin, bn in zip(linears[:-1], norms):
            z = lin.weight @ v
            v = torch.relu(bn.weight * (z - bn.running_mean) / torch.sqrt(bn.running_var + bn.eps) + bn.bias)
        rows.append(linears[-1].weight @ v + linears[-1].bias)
    return torch.stack(rows)


def test_fct_network_layout_is_the_papers_without_side_information():
    net = FCTTransformation(6, 10, width=32, depth=3)
    shapes = [tuple(m.weight.shape) for m in net.modules() if isinstance(m, torch.nn.Linear)]
    # old branch 6 -> 12 -> 20 (2 x new), mixer 20 -> 32 -> 32 -> 32, output 32 -> 10
    assert shapes == [(12, 6), (20, 12), (32, 20), (32, 32), (32, 32), (10, 32)]
    assert [m.bias is None for m in net.modules() if isinstance(m, torch.nn.Linear)] == [True] * 5 + [False]
    assert sum(isinstance(m, torch.nn.BatchNorm1d) for m in net.modules()) == 5


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fct_forward_batched_equals_per_sample_reference(seed):
    torch.manual_seed(seed)
    net = FCTTransformation(5, 7, width=16, depth=2)
    randomise_batchnorm(net)
    net.eval()
    x, target = torch.randn(9, 5), torch.randn(9, 7)
    with torch.no_grad():
        batched = net(x)
        reference = per_sample_forward(net, x)
    assert batched.shape == (9, 7)
    torch.testing.assert_close(batched, reference, rtol=1e-5, atol=1e-5)
    # the training loss (engine/transformation.py: F.mse_loss) and its gradients, against the per-sample sum
    params = [p for p in net.parameters() if p.requires_grad]
    grads = torch.autograd.grad(torch.nn.functional.mse_loss(net(x), target), params)
    per_sample = sum(((per_sample_forward(net, x[i:i + 1]) - target[i:i + 1]) ** 2).sum() for i in range(9)) / (9 * 7)
    for got, want in zip(grads, torch.autograd.grad(per_sample, params)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    # map_features: the same, in chunks, as float32 numpy (and the module left in the mode it was in)
    net.train()
    np.testing.assert_allclose(map_features(net, x.numpy(), batch=4), reference.numpy(), rtol=1e-5, atol=1e-5)
    assert net.training


# -------------------------------------------------------------------------------------- checkpoints
@pytest.mark.parametrize("kind", ["fct", "procrustes"])
def test_checkpoint_round_trip(tmp_path, kind):
    torch.manual_seed(1)
    module = build_transformation(kind, 6, 8, width=16, depth=2)
    if kind == "fct":
        randomise_batchnorm(module)
    else:
        module = ProcrustesMap(6, 8, orthogonal_procrustes(torch.randn(40, 6), torch.randn(40, 8)))
    path = tmp_path / "t.pth"
    save_transformation(path, module, {"images": 40})
    assert [p.name for p in tmp_path.iterdir()] == ["t.pth"]  # written through a temporary, atomically
    loaded = load_transformation(path)
    assert (loaded.kind, loaded.in_dim, loaded.out_dim, loaded.training) == (kind, 6, 8, False)
    x = torch.randn(5, 6)
    module.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), module(x), rtol=0, atol=0)


def refusal(path, key="EVAL.OLD_TRANSFORM"):
    with pytest.raises(UserError) as info:
        load_transformation(path, key)
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith(key), msg
    return msg


def test_load_refuses_bad_files_in_one_line_naming_key_and_file(tmp_path):
    assert refusal("") == "EVAL.OLD_TRANSFORM is empty: give the transformation file (scripts/train_transformation.sh)"
    missing = tmp_path / "absent.pth"
    assert refusal(missing) == f"EVAL.OLD_TRANSFORM: transformation file not found: {missing}"
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint at all")
    assert str(junk) in refusal(junk) and "not a readable PyTorch checkpoint" in refusal(junk)
    model = tmp_path / "model.pth"
    save_checkpoint(model, {"model": {"embedding.fc.weight": torch.zeros(4, 4)}})
    assert refusal(model, "X.KEY") == f"X.KEY: {model} is not a transformation file (written by " \
                                      f"scripts/train_transformation.sh)"
    good = tmp_path / "good.pth"
    save_transformation(good, FCTTransformation(4, 4, width=8, depth=1))
    payload = torch.load(good, weights_only=True)
    wrong_dims = tmp_path / "wrong_dims.pth"  # the header says 4 -> 6; the weights are 4 -> 4
    save_checkpoint(wrong_dims, {**payload, "out_dim": 6})
    msg = refusal(wrong_dims)
    assert f"{wrong_dims}: weights do not fit a fct transformation 4 -> 6" in msg
    bad_header = tmp_path / "bad_header.pth"
    save_checkpoint(bad_header, {**payload, "kind": "affine"})
    assert f"{bad_header}: corrupt transformation header (kind 'affine'" in refusal(bad_header)
    nan = tmp_path / "nan.pth"
    state = dict(payload["state"])
    state["mixer.1.weight"] = torch.full_like(state["mixer.1.weight"], float("nan"))
    save_checkpoint(nan, {**payload, "state": state})
    assert refusal(nan) == (f"EVAL.OLD_TRANSFORM: {nan} holds NaN or inf in 1 of 17 weight tensors (first: "
                            "mixer.1.weight); was it saved after its training diverged?")
