"""Hot-refresh across 2 gloo processes equals the single-process loss on the whole global batch.

Convention: each rank's loss is the mean over its LOCAL rows, and the gather's backward sums, for
every shard, the gradients all ranks computed for it. Hence with W ranks of equal batch size
    mean_r loss_r == loss(global batch)   and   grad_r(feat_new_r) / W == grad(global)[rows of r],
so after DDP averages parameter gradients over ranks the update is the single-process one.
"""


import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from advbct.losses import build_compat_loss
from helpers import free_port, ref_hot_refresh

WORLD, B_LOCAL, D = 2, 6, 8


def global_batch():
    g = torch.Generator().manual_seed(0)
    feat_new = torch.randn(WORLD * B_LOCAL, D, generator=g)
    feat_old = torch.randn(WORLD * B_LOCAL, D, generator=g)
    labels = torch.randint(0, 5, (WORLD * B_LOCAL,), generator=g)  # same-class pairs across ranks
    return feat_new, feat_old, labels


# (TOPK_NEG, DETACH_KEYS): every negative with gradient through the keys; the release's 10 hardest
# (3 here) with keys gathered without gradient; and the two mixed
MODES = ((0, False), (3, False), (3, True), (0, True))


def make_loss(topk, detach):
    return build_compat_loss({"TYPE": "hot_refresh", "TEMPERATURE": 0.1, "TOPK_NEG": topk, "DETACH_KEYS": detach},
                             embed_dim=D, num_old_classes=5, total_epochs=1)


def _worker(rank, port, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        feat_new, feat_old, labels = global_batch()
        rows = slice(rank * B_LOCAL, (rank + 1) * B_LOCAL)
        result = {}
        for mode in MODES:
            x = feat_new[rows].clone().requires_grad_(True)
            out = make_loss(*mode)(x, feat_old[rows], labels[rows], progress=0.0, epoch=0)
            out["loss"].backward()
            result[mode] = (out["loss"].detach(), x.grad)
        torch.save(result, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()



@pytest.mark.slow
@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not available")
def test_hot_refresh_two_ranks_equal_single_process(tmp_path):
    mp.spawn(_worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    feat_new, feat_old, labels = global_batch()
    for mode in MODES:
        x = feat_new.clone().requires_grad_(True)
        single = make_loss(*mode)(x, feat_old, labels, progress=0.0, epoch=0)["loss"]
        single.backward()
        ref = x.detach().clone().requires_grad_(True)
        ref_loss = ref_hot_refresh(ref, feat_old, labels, 0.1, *mode)  # per-sample, on the global batch
        ref_loss.backward()
        torch.testing.assert_close(single.detach(), ref_loss.detach(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(x.grad, ref.grad, rtol=1e-4, atol=1e-6)
        mean_loss = sum(r[mode][0] for r in ranks) / WORLD
        torch.testing.assert_close(mean_loss, single.detach())
        for r in range(WORLD):
            grad = ranks[r][mode][1]
            torch.testing.assert_close(grad / WORLD, x.grad[r * B_LOCAL:(r + 1) * B_LOCAL])
        # rank-local losses differ from each other: the test would catch a rank seeing only itself
        assert abs(float(ranks[0][mode][0] - ranks[1][mode][0])) > 1e-4
    # the key gradient is real: with and without it the gradients differ
    assert (ranks[0][(3, False)][1] - ranks[0][(3, True)][1]).abs().max() > 1e-4
