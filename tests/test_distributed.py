"""The collectives' device rule, enforced on CPU by a stand-in for NCCL.

NCCL takes only tensors on the rank's own GPU: a CPU tensor (e.g. a loss diagnostic made with
``torch.tensor(x)``) kills the run at the first reduction. Here no GPU exists, so a second device stands
in for it: torch's lazy TorchScript backend (``lazy:0``), a real device whose tensors hold data computed
on the CPU. The stand-in group runs gloo underneath but, as NCCL, refuses every tensor that is not on
``lazy:0``; ``advbct.distributed.group_device`` is pointed at that device, as it points at ``cuda:<local
rank>`` under NCCL. Every helper must then hand correct results back, whatever device its input is on.
"""

import os

import pytest
import torch
import torch.distributed as tdist
import torch.multiprocessing as mp
import torch.nn.functional as F

from advbct import distributed as dist
from advbct.errors import UserError
from advbct.losses import LOSSES, build_compat_loss, get_method
from advbct.losses.build import needs_transformation
from advbct.meta import ClassMeta
from helpers import free_port

WORLD = 2
COLLECTIVES = ("all_reduce", "all_gather", "gather", "broadcast")


def test_group_device_follows_the_backend(monkeypatch):
    assert dist.group_device() == torch.device("cpu")  # not distributed
    monkeypatch.setattr(dist, "is_distributed", lambda: True)
    monkeypatch.setattr(tdist, "get_backend", lambda group=None: "nccl")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    assert dist.group_device() == torch.device("cuda", 3)
    monkeypatch.setattr(tdist, "get_backend", lambda group=None: "gloo")
    assert dist.group_device() == torch.device("cpu")


@pytest.mark.parametrize("local_rank, visible, want", [(5, 8, 5), (0, 8, 0), (5, 1, 0), (3, 2, 1)])
def test_rank_device_is_the_ranks_own_gpu(monkeypatch, local_rank, visible, want):
    """All of the node's GPUs visible: the local rank's; one GPU per task (srun --gpus-per-task=1): that one."""
    monkeypatch.setattr(torch.cuda, "device_count", lambda: visible)
    assert dist.rank_device(local_rank) == torch.device("cuda", want)


def _meta(classes, dim, gen):
    return ClassMeta(centers=0.5 * F.normalize(torch.randn(classes, dim, generator=gen), dim=1),
                     r_max=torch.full((classes,), 0.8), r_min=torch.full((classes,), 0.2),
                     counts=torch.full((classes,), 6), n_kept=torch.full((classes,), 5),
                     theta_max=torch.full((classes,), 0.5))


# every method with a loss (FCT's new model trains without one: its map is fitted after training)
@pytest.mark.parametrize("kind", sorted(k for k in LOSSES if not needs_transformation({"TYPE": k})))
def test_every_loss_output_is_on_the_features_device(kind):
    """Diagnostics made on the host would reach the epoch-end all-reduce as CPU tensors. The meta device
    (shapes, no data) shows where each output lives; the losses run their GPU path (masking, no compaction)."""
    gen = torch.Generator().manual_seed(0)
    classes, dim = 5, 8
    meta_classes = 10 if get_method(kind).meta_classes == "train" else classes  # BT²: every class of the batch
    loss = build_compat_loss({"TYPE": kind}, embed_dim=dim, num_old_classes=classes, total_epochs=3,
                             meta=_meta(meta_classes, dim, gen), old_classifier_weight=torch.randn(classes, dim))
    for module in loss.modules():
        if hasattr(module, "compact_rows"):
            module.compact_rows = False
    meta_device = torch.device("meta")
    loss = loss.to(meta_device)
    feat = torch.randn(6, dim, generator=gen).to(meta_device).requires_grad_()
    out = loss(feat, torch.randn(6, dim, generator=gen).to(meta_device),
               torch.tensor([0, 1, 2, 7, 8, 9]).to(meta_device), progress=0.3, epoch=1,
               new_classifier_weight=torch.randn(10, dim).to(meta_device),
               aux={name: torch.randn(6, dim, generator=gen).to(meta_device) for name in loss.aux_inputs})
    assert {k: v.device.type for k, v in out.items()} == {k: "meta" for k in out}
    if kind == "advbct":
        assert {"alpha", "adv_weight", "boundary", "adversarial"} <= set(out)


# ------------------------------------------------------------------------------------ the stand-in
def _standin_device():
    import torch._lazy.ts_backend
    torch._lazy.ts_backend.init()
    return torch.device("lazy", 0)


def _tensors(value):
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors(v)]
    return []


def _cpu_copy(value, pairs):
    if isinstance(value, torch.Tensor):
        copy = value.detach().cpu().clone()
        pairs.append((value, copy))
        return copy
    if isinstance(value, (list, tuple)):
        return type(value)(_cpu_copy(v, pairs) for v in value)
    return value


def install_nccl_rule(device, log):
    """Wrap gloo's collectives (as called by torch.distributed and by its object collectives) so that they
    refuse tensors off ``device``, then run on CPU copies and write the results back onto ``device``."""
    def strict(name, real):
        def collective(*args, **kwargs):
            for t in _tensors(list(args) + list(kwargs.values())):
                if t.device != device:
                    raise RuntimeError(f"stand-in NCCL: {name} got a tensor on {t.device}, the group's device is {device}")
            pairs = []
            result = real(*_cpu_copy(list(args), pairs), **{k: _cpu_copy(v, pairs) for k, v in kwargs.items()})
            with torch.no_grad():
                for original, copy in pairs:
                    original.copy_(copy.to(device))
            log.append(name)
            return result
        return collective

    for name in COLLECTIVES:
        real = getattr(tdist.distributed_c10d, name)
        setattr(tdist.distributed_c10d, name, strict(name, real))
        setattr(tdist, name, getattr(tdist.distributed_c10d, name))



def _fails_on_main(x):
    raise UserError(f"bad input {x}")


def _worker(rank, port, out_dir):
    torch.set_num_threads(1)
    tdist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        device = _standin_device()
        log = []
        install_nccl_rule(device, log)
        dist.group_device = lambda: device  # what NCCL's cuda:<local rank> is to the real run
        result = {}
        try:  # the rule bites: a CPU tensor handed straight to a collective is refused
            tdist.all_reduce(torch.ones(1))
            result["raw_cpu_refused"] = False
        except RuntimeError as exc:
            result["raw_cpu_refused"] = "stand-in NCCL" in str(exc)
        # logging means: a CPU scalar (the old AdvBCT alpha), a device scalar and a number, one all-reduce
        result["means"] = dist.mean_over_ranks({"alpha": torch.tensor(float(rank)),
                                                "loss": torch.tensor(2.0 + rank).to(device), "n": 4})
        rows = torch.arange(3 + rank * 2, dtype=torch.float32).unsqueeze(1) + 10 * rank  # 3 and 5 rows
        gathered = dist.all_gather_variable(rows)
        result["all_gather_variable"] = (gathered.device.type, gathered.squeeze(1).tolist())
        on_main = dist.gather_to_main(rows)
        result["gather_to_main"] = None if on_main is None else (on_main.device.type, on_main.squeeze(1).tolist())
        result["broadcast_object"] = dist.broadcast_object({"epoch": 7} if rank == 0 else None)
        result["all_gather_object"] = dist.all_gather_object(f"rank{rank}")
        result["run_on_main"] = dist.run_on_main(lambda: f"computed on rank {dist.get_rank()}")
        try:
            dist.run_on_main(_fails_on_main, 5)
            result["run_on_main_error"] = None
        except UserError as exc:
            result["run_on_main_error"] = str(exc)
        x = (torch.arange(4.0) + 4 * rank).reshape(2, 2).requires_grad_()
        y = dist.all_gather_with_grad(x)
        (y * torch.arange(8.0).reshape(4, 2)).sum().backward()
        result["gather_with_grad"] = (y.device.type, y.detach().flatten().tolist(), x.grad.flatten().tolist())
        result["collectives"] = sorted(set(log))
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        tdist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.skipif(not tdist.is_gloo_available(), reason="torch.distributed without gloo")
def test_helpers_obey_the_nccl_device_rule(tmp_path):
    mp.start_processes(_worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, start_method="spawn")
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD))
    for r in (r0, r1):
        assert r["raw_cpu_refused"] is True
        assert r["means"] == {"alpha": 0.5, "loss": 2.5, "n": 4.0}
        assert r["all_gather_variable"] == ("cpu", [0.0, 1.0, 2.0, 10.0, 11.0, 12.0, 13.0, 14.0])
        assert r["broadcast_object"] == {"epoch": 7}
        assert r["all_gather_object"] == ["rank0", "rank1"]
        assert r["run_on_main"] == "computed on rank 0"
        assert r["run_on_main_error"] == "bad input 5"
        assert set(r["collectives"]) == set(COLLECTIVES)  # every kind went through the rule
    assert r0["gather_to_main"] == ("cpu", [0.0, 1.0, 2.0, 10.0, 11.0, 12.0, 13.0, 14.0])
    assert r1["gather_to_main"] is None
    # y = [x_0; x_1], loss = sum(y * w) on both ranks: each shard's gradient is the sum of both ranks' w rows
    w = torch.arange(8.0).reshape(4, 2)
    for rank, r in enumerate((r0, r1)):
        assert r["gather_with_grad"][:2] == ("cpu", list(range(8)))
        assert r["gather_with_grad"][2] == (2 * w[2 * rank:2 * rank + 2]).flatten().tolist()
