"""Benchmark: all-reduce bandwidth across the processes of one torchrun launch (NCCL on GPUs, gloo on CPU).

Each size S (bytes of a float32 buffer, doubling from --min-bytes to --max-bytes) is first checked
(every rank holds rank + 1; after a sum all-reduce every element must be n(n+1)/2), then timed:
--warmup untimed all-reduces, then --iters back to back. t is the mean time of one all-reduce on the
slowest rank. As nccl-tests define them for all-reduce:

    algbw = S / t        busbw = algbw * 2 (n - 1) / n        (n processes; GB/s = 1e9 bytes/s)

busbw is the figure to compare with the links' bandwidth (each byte crosses 2 (n - 1) / n links in a
ring all-reduce). Needs two processes or more:

    torchrun --standalone --nproc_per_node=N tools/benchmark.py collectives [--min-bytes 1M --max-bytes 256M] [--json OUT]
"""

from __future__ import annotations

import argparse
import re
import statistics
import time

import torch

_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30}


def parse_bytes(text: str) -> int:
    """'4096', '64K', '1M', '2G' (binary units: 1M = 2**20 bytes) -> bytes; a multiple of 4, at least 4."""
    match = re.fullmatch(r"\s*(\d+)\s*([KMG]?)i?B?\s*", str(text), flags=re.IGNORECASE)
    if not match:
        raise argparse.ArgumentTypeError(f"'{text}' is not a size (expected e.g. 4096, 64K, 1M, 2G)")
    size = int(match.group(1)) * _UNITS[match.group(2).upper()]
    if size < 4 or size % 4:
        raise argparse.ArgumentTypeError(f"'{text}' = {size} bytes: expected a multiple of 4 bytes (float32), >= 4")
    return size


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--min-bytes", type=parse_bytes, default="1M", help="smallest buffer (default 1M = 2**20 bytes)")
    parser.add_argument("--max-bytes", type=parse_bytes, default="256M", help="largest buffer (default 256M)")
    parser.add_argument("--factor", type=int, default=2, help="size multiplier between rows (default 2)")
    parser.add_argument("--iters", type=int, default=20, help="timed all-reduces per size")
    parser.add_argument("--warmup", type=int, default=5, help="untimed all-reduces per size first")
    parser.add_argument("--backend", choices=("auto", "nccl", "gloo"), default="auto",
                        help="auto: NCCL when CUDA is available, gloo otherwise")


def sizes(min_bytes: int, max_bytes: int, factor: int) -> list:
    """min_bytes, min_bytes * factor, ... up to max_bytes (both ends included when on the grid)."""
    if factor < 2:
        raise SystemExit("error: benchmark collectives: --factor must be >= 2")
    if min_bytes > max_bytes:
        raise SystemExit(f"error: benchmark collectives: --min-bytes ({min_bytes}) exceeds --max-bytes ({max_bytes})")
    out, size = [], min_bytes
    while size <= max_bytes:
        out.append(size)
        size *= factor
    return out


def algorithm_bandwidth(nbytes: float, seconds: float) -> float:
    """algbw in GB/s (1e9 bytes/s): the buffer's bytes over the time of one all-reduce."""
    return nbytes / seconds / 1e9


def bus_bandwidth(algbw: float, world: int) -> float:
    """busbw of an all-reduce on ``world`` processes, as nccl-tests: algbw * 2 (n - 1) / n."""
    return algbw * 2.0 * (world - 1) / world


def _sig(x: float) -> float:
    """``x`` to 6 significant digits (small CPU bandwidths keep their precision)."""
    return float(f"{x:.6g}")


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run(args):
    """Rows of size, time, algbw, busbw and correctness on rank 0 (None on the other ranks)."""
    from advbct import distributed as dist

    if args.iters < 1 or args.warmup < 0:
        raise SystemExit("error: benchmark collectives: --iters must be >= 1 and --warmup >= 0")
    grid = sizes(args.min_bytes, args.max_bytes, args.factor)
    _, world, device = dist.init_distributed(args.backend)
    if world < 2:
        dist.cleanup()
        raise SystemExit("error: benchmark collectives needs two processes or more: run it under "
                         "torchrun --standalone --nproc_per_node=N (N >= 2)")
    import torch.distributed as tdist
    rank, backend = tdist.get_rank(), str(tdist.get_backend())
    try:
        rows = []
        expected = world * (world + 1) / 2.0
        for nbytes in grid:
            numel = nbytes // 4
            check = torch.full((numel,), float(rank + 1), dtype=torch.float32, device=device)
            tdist.all_reduce(check)
            wrong = torch.tensor([float(int((check != expected).sum()))], device=device)
            del check
            timed = torch.zeros(numel, dtype=torch.float32, device=device)  # sums stay 0: no overflow
            for _ in range(args.warmup):
                tdist.all_reduce(timed)
            _sync(device)
            tdist.barrier()
            start = time.perf_counter()
            for _ in range(args.iters):
                tdist.all_reduce(timed)
            _sync(device)
            seconds = torch.tensor([(time.perf_counter() - start) / args.iters], dtype=torch.float64, device=device)
            del timed
            tdist.all_reduce(seconds, op=tdist.ReduceOp.MAX)  # the slowest rank's mean
            tdist.all_reduce(wrong)
            t = float(seconds)
            algbw = algorithm_bandwidth(nbytes, t)
            rows.append({"bytes": nbytes, "time_us": _sig(t * 1e6), "algbw_gbps": _sig(algbw),
                         "busbw_gbps": _sig(bus_bandwidth(algbw, world)), "correct": float(wrong) == 0.0})
        if device.type == "cuda":
            torch.cuda.empty_cache()
        dist.finish()
    finally:
        dist.cleanup()
    if rank != 0:
        return None
    busbw = [r["busbw_gbps"] for r in rows]
    return {"benchmark": "all_reduce (sum, float32)", "backend": backend,
            "world_size": world, "device": device.type,
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
            "iters": args.iters, "warmup": args.warmup, "rows": rows,
            "peak_busbw_gbps": max(busbw), "median_busbw_gbps": _sig(statistics.median(busbw)),
            "correct": all(r["correct"] for r in rows)}
