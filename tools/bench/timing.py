"""Timing shared by the multi-process benchmarks."""

from __future__ import annotations

import time

import torch
import torch.distributed as dist


def slowest_rank_best_time(fn, repeats: int, warmup: bool = True) -> float:
    """Best of ``repeats`` timings of ``fn``, each the slowest rank's (ranks start together
    at a barrier). ``warmup`` runs ``fn`` once untimed first."""
    if warmup:
        fn()
    best = float("inf")
    for _ in range(repeats):
        dist.barrier()
        start = time.perf_counter()
        fn()
        elapsed = torch.tensor([time.perf_counter() - start], dtype=torch.float64)
        dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
        best = min(best, elapsed.item())
    return best
