"""The benchmarks' shared timing loop: wall seconds of each call, CUDA work included."""

import time

import torch


def timed_calls(work, calls: int, device=None) -> list:
    """Seconds of each of ``calls`` calls of ``work``; on a CUDA ``device`` queued work is waited for
    before and after each call, so that a call's time is its own."""
    cuda = device is not None and torch.device(device).type == "cuda"
    times = []
    for _ in range(calls):
        if cuda:
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        work()
        if cuda:
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return times
