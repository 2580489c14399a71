"""Two gloo processes with batch B/2 each train exactly like one process with batch B.

``tools/train.py`` on 2 CPU processes (its main in two children forked from this process, with the
variables ``torch.distributed.run`` gives its workers: no Python start with torch a process; torchrun itself
launches tools/train.py in tests/scripts/test_launch.py) against the in-process Trainer
with the doubled batch, after one iteration: weights, BN statistics, SGD momentum (= the gradient of
the first step), the loss module's state and the logged epoch means must agree. The global batch is
the same SET of images: DistributedSampler gives rank r the indices perm[r::2] of one seeded
permutation, so the first B/2 of each rank are together perm[:B], the single process's first batch.
With MODEL.SYNC_BN the BatchNorm statistics are global (AllReduceBatchNorm on CPU), so everything that
is a mean over the batch matches; hot_refresh gathers its negatives across ranks; the advbct loss
module (elastic radii + discriminator with its own BN) runs under DDP, and so does a second one against an
earlier model (OLD_MODEL.EARLIER_WEIGHTS); bt2 trains its basis-transformation head with a frozen teacher
beside the old model. The other multi-process checks fork
their ranks too (``torch.multiprocessing`` with the fork start method).
"""

import importlib.util
import os
import re

import pytest
import torch
import torch.distributed as tdist
import torch.multiprocessing as mp
from torch.utils.data.distributed import DistributedSampler

from advbct.config import load_config
from advbct.engine.sync_bn import AllReduceBatchNorm, convert_sync_batchnorm
from advbct.models import build_model
from helpers import REPO, TRAIN_BATCH as BATCH, TRAIN_EMB as EMB, TRAIN_WORLD as WORLD
from helpers import (assert_states_close, base_overrides, fork_main, free_port, load_last, momentum_buffers,
                     relative_error, run_one_process, wait_children)

CLASSES, PER_CLASS = 4, 8   # the image_list fixture's

pytestmark = pytest.mark.skipif(not tdist.is_available() or not tdist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")


def fork_two_processes(overrides, logs):
    """tools/train.py's main on ``overrides`` in two forked children that form one gloo world through the
    variables torchrun sets for its workers (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR/PORT, ...; one thread
    each, as torchrun's OMP_NUM_THREADS=1); each child's console in ``logs/rank<r>.log``."""
    spec = importlib.util.spec_from_file_location("advbct_train_tool", REPO / "tools" / "train.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    logs.mkdir(parents=True, exist_ok=True)
    base = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    world = {"WORLD_SIZE": str(WORLD), "LOCAL_WORLD_SIZE": str(WORLD), "GROUP_RANK": "0", "GROUP_WORLD_SIZE": "1",
             "TORCHELASTIC_RUN_ID": "forked", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
             "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(REPO)}
    paths = [logs / f"rank{r}.log" for r in range(WORLD)]
    pids = [fork_main(tool.main, overrides, dict(base, **world, RANK=str(r), LOCAL_RANK=str(r)), path)
            for r, path in enumerate(paths)]
    wait_children(pids, paths)


def logged_epoch_means(out):
    """``{term: value}`` of the last 'epoch k/N (...s): term value ...' line of log.txt (4 decimals)."""
    lines = [ln for ln in (out / "log.txt").read_text().splitlines() if re.search(r"epoch \d+/\d+ \(", ln)]
    assert lines, f"no epoch line in {out / 'log.txt'}"
    fields = lines[-1].split("): ", 1)[1].split()
    return {k: float(v) for k, v in zip(fields[::2], fields[1::2])}


def test_global_batch_is_the_same_set():
    """The premise: rank r's first B/2 indices together are the single process's first batch."""
    n = CLASSES * PER_CLASS
    dataset = list(range(n))
    single = list(DistributedSampler(dataset, num_replicas=1, rank=0, shuffle=True, seed=1234))[:BATCH]
    ranks = [list(DistributedSampler(dataset, num_replicas=WORLD, rank=r, shuffle=True, seed=1234))[:BATCH // WORLD]
             for r in range(WORLD)]
    assert sorted(single) == sorted(ranks[0] + ranks[1])
    assert ranks[0] == single[0::WORLD] and ranks[1] == single[1::WORLD]
    assert sorted(single) != list(range(BATCH))  # shuffled: the check is not vacuous


@pytest.mark.slow
@pytest.mark.parametrize("method", ["", "hot_refresh", "advbct", "advbct_earlier", "bt2"],
                         ids=["plain", "hot_refresh", "advbct", "advbct_earlier", "bt2"])
def test_two_processes_equal_one_process(ddp_setup, request, tmp_path, method):
    data, extra = ddp_setup["data"], ddp_setup["comp"][method]
    fork_two_processes(base_overrides(data, tmp_path / "two", BATCH // WORLD, extra), tmp_path / "logs")
    if method == "advbct":  # the one-process AdvBCT run tests/scripts/test_launch.py compares with too
        reference = request.getfixturevalue("advbct_one_process")
        history, one = reference["history"], reference["last"]
    else:
        history = run_one_process(base_overrides(data, tmp_path / "one", BATCH, extra))
        one = load_last(tmp_path / "one")
    two = load_last(tmp_path / "two")

    # gradients of the first step (momentum buffer = grad + wd * w), then the weights after it
    assert_states_close(momentum_buffers(two), momentum_buffers(one), "momentum", tol=1e-4)
    assert_states_close(two["model"], one["model"], "weights and BN statistics", tol=1e-4)
    if method.startswith("advbct"):  # elastic radii, discriminator and its BN statistics
        assert_states_close(two["comp_loss"], one["comp_loss"], "loss module", tol=1e-4)
    if method == "advbct_earlier":  # the earlier model's term: its own radii and discriminator, under DDP too
        assert_states_close(two["earlier_comp_losses"][0], one["earlier_comp_losses"][0], "earlier loss module",
                            tol=1e-4)

    logged = logged_epoch_means(tmp_path / "two")
    assert logged.keys() == history[0].keys()
    for term, value in history[0].items():
        if term.endswith("violators"):  # a count per process: the ranks' mean is half the global count
            value /= WORLD
        assert logged[term] == pytest.approx(value, abs=1.5e-4), term
    if method.startswith("advbct"):
        # per-rank normalisation of L_EB (as the original) equals the global one when every sample
        # violates its boundary on both ranks: the precondition of this comparison
        assert logged["violation_rate"] == history[0]["violation_rate"] == 1.0
    if method == "advbct_earlier":
        assert logged["earlier1_violation_rate"] == 1.0 and "earlier1_adversarial" in logged
    if method == "":
        # the comparison can fail: one process on rank 0's half of the batch trains differently
        run_one_process(base_overrides(data, tmp_path / "half", BATCH // WORLD))
        half, full = momentum_buffers(load_last(tmp_path / "half")), momentum_buffers(one)
        assert max(relative_error(half[i], full[i]) for i in full) > 1e-2


# ----------------------------------------------------------------- the CPU synchronised BatchNorm itself
def _bn_inputs():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 3, 4, 5, generator=g) * 3 + 1
    w_out = torch.randn(6, 3, 4, 5, generator=g)  # loss = sum(out * w_out): non-trivial gradients
    return x, w_out


MOMENTA = (0.1, None)  # exponential and cumulative running averages


def _bn_worker(rank, port, out_dir):
    torch.set_num_threads(1)
    tdist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        x, w_out = _bn_inputs()
        rows = slice(0, 2) if rank == 0 else slice(2, 6)  # unequal shards: counts are all-reduced too
        result = {}
        for i, momentum in enumerate(MOMENTA):
            bn = _affine_bn(AllReduceBatchNorm(3, momentum=momentum))
            xl = x[rows].clone().requires_grad_(True)
            out = bn(xl)
            (out * w_out[rows]).sum().backward()
            result[i] = {"out": out.detach(), "x_grad": xl.grad, "w_grad": bn.weight.grad,
                         "b_grad": bn.bias.grad, "state": bn.state_dict()}
        torch.save(result, f"{out_dir}/rank{rank}.pt")
    finally:
        tdist.destroy_process_group()


def _affine_bn(bn):
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([1.0, 2.0, 0.5]))
        bn.bias.copy_(torch.tensor([0.1, -0.2, 0.3]))
    return bn


@pytest.mark.slow
def test_all_reduce_batchnorm_equals_batchnorm_on_the_global_batch(tmp_path):
    """Two ranks holding 2 and 4 samples: outputs, input and parameter gradients (summed over ranks, as
    DDP's all-reduce does before averaging) and running statistics equal BatchNorm2d on all 6."""
    mp.start_processes(_bn_worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True, start_method="fork")
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    x, w_out = _bn_inputs()
    for i, momentum in enumerate(MOMENTA):
        r0, r1 = ranks[0][i], ranks[1][i]
        ref = _affine_bn(torch.nn.BatchNorm2d(3, momentum=momentum))
        xr = x.clone().requires_grad_(True)
        out = ref(xr)
        (out * w_out).sum().backward()
        torch.testing.assert_close(torch.cat([r0["out"], r1["out"]]), out.detach(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(torch.cat([r0["x_grad"], r1["x_grad"]]), xr.grad, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(r0["w_grad"] + r1["w_grad"], ref.weight.grad, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(r0["b_grad"] + r1["b_grad"], ref.bias.grad, rtol=1e-5, atol=1e-5)
        for r in (r0, r1):
            for key, value in ref.state_dict().items():
                torch.testing.assert_close(r["state"][key], value, rtol=1e-5, atol=1e-6, msg=key)
        # the running variance is the unbiased one (n = 6 samples x 20 pixels), not the biased one
        biased = x.transpose(0, 1).reshape(3, -1).var(1, unbiased=False)
        f = momentum or 1.0
        assert not torch.allclose(r0["state"]["running_var"], (1 - f) + f * biased, rtol=1e-6, atol=1e-7)


def test_convert_sync_batchnorm_keeps_the_state():
    model = build_model("resnet18", embed_dim=EMB, num_classes=CLASSES)
    model.backbone.bn1.running_mean.add_(0.5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    converted = convert_sync_batchnorm(model, torch.device("cpu"))
    bns = [m for m in converted.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert len(bns) == 21 and all(isinstance(m, AllReduceBatchNorm) for m in bns)  # 20 in resnet18 + head
    after = converted.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)
    x = torch.randn(3, 3, 32, 32)
    converted.eval()
    model_ref = build_model("resnet18", embed_dim=EMB, num_classes=CLASSES)
    model_ref.load_state_dict(before)
    model_ref.eval()
    torch.testing.assert_close(converted(x)["feat"], model_ref(x)["feat"])  # one process: plain BatchNorm


# ----------------------------------------------------------------- resume without a shared filesystem
def _resume_worker(rank, port, outputs, overrides):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(WORLD), CUDA_VISIBLE_DEVICES="")
    torch.set_num_threads(1)
    torch.cuda.is_available = lambda: False   # forked: the CPU, whatever this machine has
    from advbct import distributed
    from advbct.engine.trainer import Trainer

    try:  # each rank its own OUTPUT: only rank 0's holds last.pth, as on nodes without a shared filesystem
        trainer = Trainer(load_config(None, [*overrides, "OUTPUT", outputs[rank], "TRAIN.RESUME", "auto"]))
        torch.save({"start_epoch": trainer.start_epoch, "model": trainer.model.state_dict(),
                    "comp_loss": trainer.comp_loss.state_dict()}, os.path.join(outputs[rank], "resumed.pt"))
    finally:
        distributed.cleanup()


@pytest.mark.slow
def test_resume_comes_from_rank_0_on_every_rank(ddp_setup, tmp_path):
    """TRAIN.RESUME auto: rank 0 reads last.pth and every rank resumes from it (epoch, weights, loss
    module), even a rank whose own OUTPUT has no checkpoint; reading per rank would start rank 1 afresh."""
    data, extra = ddp_setup["data"], ddp_setup["comp"]["advbct"]
    overrides = base_overrides(data, tmp_path / "first", BATCH // WORLD, extra)[2:]  # without OUTPUT
    run_one_process(["OUTPUT", str(tmp_path / "first"), *overrides])
    saved = load_last(tmp_path / "first")
    (tmp_path / "other").mkdir()
    outputs = [str(tmp_path / "first"), str(tmp_path / "other")]
    extended = [*overrides, "TRAIN.EPOCHS", "2"]  # one epoch left to train
    mp.start_processes(_resume_worker, args=(free_port(), outputs, extended), nprocs=WORLD, join=True,
                       start_method="fork")
    for out in outputs:
        resumed = torch.load(os.path.join(out, "resumed.pt"), weights_only=True)
        assert resumed["start_epoch"] == saved["epoch"] == 1
        for part in ("model", "comp_loss"):
            assert resumed[part].keys() == saved[part].keys()
            for key, value in saved[part].items():
                assert torch.equal(resumed[part][key], value), f"{out} {part} {key}"
    assert not (tmp_path / "other" / "last.pth").exists()


# ----------------------------------------------------------------- DDP over the loss module
def _loss_ddp_worker(rank, port, out_dir):
    torch.set_num_threads(1)
    tdist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        from torch.nn.parallel import DistributedDataParallel

        from advbct.losses import build_compat_loss
        from advbct.meta import ClassMeta

        torch.manual_seed(0)
        classes, dim = 3, 8
        meta = ClassMeta(centers=0.5 * torch.nn.functional.normalize(torch.randn(classes, dim), dim=1),
                         r_max=torch.full((classes,), 0.3), r_min=torch.full((classes,), 0.1),
                         counts=torch.full((classes,), 6), n_kept=torch.full((classes,), 5),
                         theta_max=torch.full((classes,), 0.5))
        loss = build_compat_loss({"TYPE": "advbct"}, embed_dim=dim, num_old_classes=classes, total_epochs=3,
                                 meta=meta)
        ddp = DistributedDataParallel(loss, gradient_as_bucket_view=True)  # as the trainer: no unused search
        opt = torch.optim.SGD(loss.parameters(), lr=0.1)
        g = torch.Generator().manual_seed(10 + rank)
        for step in range(3):
            # step 1 on rank 1: new classes only, so no sample reaches the elastic weights
            labels = torch.tensor([5, 6, 7, 8]) if (step == 1 and rank == 1) else torch.tensor([0, 1, 2, 6])
            out = ddp(torch.randn(4, dim, generator=g), torch.randn(4, dim, generator=g), labels,
                      progress=step / 3, epoch=0)
            opt.zero_grad()
            out["loss"].backward()
            opt.step()
        torch.save({k: v.detach().clone() for k, v in loss.named_parameters()}, f"{out_dir}/rank{rank}.pt")
    finally:
        tdist.destroy_process_group()


@pytest.mark.slow
def test_loss_module_ddp_survives_a_batch_without_old_classes(tmp_path):
    """The AdvBCT module under DDP without find_unused_parameters: a step where one rank has no old-class
    sample still reduces every parameter (zero gradient for the elastic weights), and the ranks' parameters
    stay equal (BatchNorm statistics are per rank here: no SyncBN in this module-only check)."""
    mp.start_processes(_loss_ddp_worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True,
                       start_method="fork")
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD))
    assert r0.keys() == r1.keys() and "boundary.elastic_weight" in r0
    for key in r0:
        torch.testing.assert_close(r0[key], r1[key], rtol=0, atol=0, msg=key)
