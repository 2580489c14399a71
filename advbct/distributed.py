"""torch.distributed glue: init from torchrun's (or SLURM's) environment, rank helpers and collectives.

One code path for 1 and N processes: every helper is the identity when the process group is not
initialised (world size 1, no ``torchrun``). One code path for CPU and GPU: NCCL takes only CUDA tensors
of the rank's own GPU, gloo only CPU ones, so every collective here first moves its tensors to
:func:`group_device` and hands results back on the caller's device. Work that one rank can do for all
(search, file checks, writing) runs on rank 0 through :func:`run_on_main`, its result broadcast.
"""

import datetime
import os
import pickle

import torch
import torch.distributed as dist

from advbct import world as run_environment
from advbct.errors import UserError


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    return get_rank() == 0


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def rank_device(local_rank: int) -> torch.device:
    """This rank's GPU: ``cuda:<local rank>`` when the process sees the node's GPUs, ``cuda:0`` when it sees
    only its own (``srun --gpus-per-task=1``, or CUDA_VISIBLE_DEVICES set per rank)."""
    return torch.device("cuda", local_rank % torch.cuda.device_count())


def init_distributed(backend: str = "auto", timeout_minutes: int = 30):
    """Initialise from torchrun's ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` (an ``srun`` task's ``SLURM_*``
    become those first: :mod:`advbct.world`); return ``(rank, world, device)``.

    Backend ``auto`` is NCCL when CUDA is available and gloo otherwise. Without ``WORLD_SIZE`` (a plain
    ``python`` launch) nothing is initialised and the run is single-process.
    """
    os.environ.update(run_environment.process_env(os.environ))
    use_cuda = torch.cuda.is_available()
    device = rank_device(int(os.environ.get("LOCAL_RANK", 0))) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world > 1 and not is_distributed():
        if backend == "auto":
            backend = "nccl" if use_cuda else "gloo"
        dist.init_process_group(
            backend=backend,
            timeout=datetime.timedelta(minutes=timeout_minutes),
            **({"device_id": device} if backend == "nccl" else {}),
        )
    return get_rank(), get_world_size(), device


def cleanup() -> None:
    """Tear the process group down (error paths too: no collective here, a peer may be gone)."""
    if is_distributed():
        dist.destroy_process_group()


def finish() -> None:
    """Normal end of a run: wait until every rank is done, then tear down. A rank destroying its gloo
    group while a peer is still finishing can abort that peer ("terminate called without an active
    exception", seen once in CI under load)."""
    if is_distributed():
        dist.barrier()
    cleanup()


class _GatherWithGrad(torch.autograd.Function):
    """All-gather whose backward returns to each rank the gradient of its own shard.

    Every rank computes a loss over the gathered tensor, so the gradient of a shard is the sum of the
    gradients all ranks computed for it: all-reduce the incoming gradient, then take the local slice.
    """

    @staticmethod
    def forward(ctx, tensor):
        ctx.rank = dist.get_rank()
        ctx.size = tensor.shape[0]
        parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, tensor.contiguous())
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        start = ctx.rank * ctx.size
        return grad[start:start + ctx.size]


def all_gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate ``tensor`` (same shape on every rank) over ranks, keeping the local shard's gradient."""
    if not is_distributed():
        return tensor
    return _GatherWithGrad.apply(tensor.to(group_device())).to(tensor.device)


def group_device() -> torch.device:
    """The device this process group's collectives take tensors on: the rank's current GPU under NCCL
    (a CPU tensor there is refused), the CPU under gloo (and when not distributed)."""
    if is_distributed() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _gather_padded(tensor, dst=None):
    """Rows of every rank in rank order (``dst`` None: on every rank; else on rank ``dst`` only, None
    elsewhere). Shards may differ in their first dimension: sizes are exchanged, shards padded to the
    longest. Runs on the group's device; the result comes back on ``tensor``'s device."""
    device = group_device()
    world = get_world_size()
    local = tensor.to(device)
    n = torch.tensor([local.shape[0]], device=device, dtype=torch.long)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n)
    sizes = torch.cat(sizes).tolist()
    padded = local.new_zeros((max(sizes),) + tuple(local.shape[1:]))
    padded[: local.shape[0]] = local
    if dst is None:
        parts = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(parts, padded)
    else:
        parts = [torch.empty_like(padded) for _ in range(world)] if get_rank() == dst else None
        dist.gather(padded, parts, dst=dst)
        if parts is None:
            return None
    return torch.cat([p[:s] for p, s in zip(parts, sizes)], dim=0).to(tensor.device)


def all_gather_variable(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate over ranks (rank order) tensors whose first dimension may differ; no gradient."""
    if not is_distributed():
        return tensor
    return _gather_padded(tensor)


def gather_to_main(tensor: torch.Tensor):
    """Concatenation over ranks (rank order, first dimensions may differ) on rank 0; None on the others.

    What a whole-gallery gather should be: only the rank that searches holds the 761,757 x 256 matrix.
    """
    if not is_distributed():
        return tensor
    return _gather_padded(tensor, dst=0)


def mean_over_ranks(values: dict) -> dict:
    """``{name: scalar tensor or number}`` -> ``{name: float}``, each the mean over ranks; one all-reduce
    for all names (values may sit on any device: they are stacked on the group's device)."""
    names = sorted(values)
    if not names:
        return {}
    device = group_device()
    stacked = torch.stack([torch.as_tensor(values[k]).detach().to(device, torch.float64).reshape(())
                           for k in names])
    if is_distributed():
        dist.all_reduce(stacked)
        stacked /= get_world_size()
    return dict(zip(names, stacked.tolist()))


def all_gather_object(obj) -> list:
    """Every rank's picklable ``obj``, in rank order, on every rank (pickled through the group's device;
    torch's own version picks its device from the backend's defaults)."""
    if not is_distributed():
        return [obj]
    payload = torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8)
    sizes = all_gather_variable(torch.tensor([payload.numel()])).tolist()
    data = all_gather_variable(payload).numpy().tobytes()
    offsets = [sum(sizes[:r]) for r in range(len(sizes) + 1)]
    return [pickle.loads(data[offsets[r]:offsets[r + 1]]) for r in range(len(sizes))]


def broadcast_object(obj=None, src: int = 0):
    """Rank ``src``'s picklable ``obj`` on every rank (pickled through the group's device)."""
    if not is_distributed():
        return obj
    box = [obj if get_rank() == src else None]
    dist.broadcast_object_list(box, src=src, device=group_device())
    return box[0]


def run_on_main(fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` computed on rank 0 only and returned on every rank; a :class:`UserError`
    raised there is raised on every rank, so no rank waits for a peer that failed."""
    if not is_distributed():
        return fn(*args, **kwargs)
    outcome = None
    if is_main_process():
        try:
            outcome = ("ok", fn(*args, **kwargs))
        except UserError as exc:  # pickled as it is: the other ranks raise the same class and message
            outcome = ("error", exc)
        except BaseException as exc:  # a bug or an interrupt: tell the peers, then fail here as usual
            broadcast_object(("crash", f"{type(exc).__name__} on rank 0 in {getattr(fn, '__name__', fn)}"))
            raise
    kind, value = broadcast_object(outcome)
    if kind == "error":
        raise value
    if kind == "crash":
        raise RuntimeError(f"{value}: see rank 0's message")
    return value
