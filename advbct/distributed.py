"""torch.distributed glue: init from torchrun's environment, rank helpers and gathers.

One code path for 1 and N processes: every helper is the identity when the process group is not
initialised (world size 1, no ``torchrun``).
"""

import datetime
import os

import torch
import torch.distributed as dist


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


def init_distributed(backend: str = "auto", timeout_minutes: int = 30):
    """Initialise from torchrun's ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``; return ``(rank, world, device)``.

    Backend ``auto`` is NCCL when CUDA is available and gloo otherwise. Without ``WORLD_SIZE`` (a plain
    ``python`` launch) nothing is initialised and the run is single-process.
    """
    use_cuda = torch.cuda.is_available()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device(f"cuda:{local_rank}" if use_cuda else "cpu")
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
    return _GatherWithGrad.apply(tensor)


def all_gather_variable(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate over ranks (rank order) tensors whose first dimension may differ; no gradient."""
    if not is_distributed():
        return tensor
    world = get_world_size()
    n = torch.tensor([tensor.shape[0]], device=tensor.device, dtype=torch.long)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n)
    sizes = [int(s.item()) for s in sizes]
    longest = max(sizes)
    padded = tensor.new_zeros((longest,) + tuple(tensor.shape[1:]))
    padded[: tensor.shape[0]] = tensor
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded.contiguous())
    return torch.cat([p[:s] for p, s in zip(parts, sizes)], dim=0)


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """Mean over ranks (for logging); identity on one process."""
    if not is_distributed():
        return tensor
    out = tensor.detach().clone()
    dist.all_reduce(out)
    return out / get_world_size()

