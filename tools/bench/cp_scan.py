"""Benchmark: the context-parallel future-KL scan vs all-gather-then-scan, over gloo.

B sequences of T tokens (default 8 x 32768, fp32, one padded row each) are split zigzag over
CP = 2 and 4 spawned processes. Each rank computes F for its local tokens with
  (ours)     :func:`megatron_fipo.megatron.cp_scan.cp_future_sum`: scan the local chunks,
             all-gather the per-chunk decayed totals (2 numbers per sequence per rank), add
             the carries;
  (baseline) all-gather every rank's local tokens, rebuild the whole sequences, scan them
             with ``discounted_future_sum`` and keep the local part.
It prints, per CP size, the slowest rank's best-of-N time, the bytes each rank receives, the
ratios, and the largest difference between the two results. On one machine gloo moves bytes
through loopback, so the time ratio understates what the byte ratio saves across nodes.
Usage: python tools/bench/cp_scan.py [--cp 2 4] [--batch 8] [--length 32768] [--repeats 5]
"""

from __future__ import annotations

import argparse

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from megatron_fipo.algorithms.future_kl import discounted_future_sum
from megatron_fipo.megatron.context_parallel import build_layout, local_to_global, split_to_local
from megatron_fipo.megatron.cp_scan import ChunkIndex, cp_future_sum, exchange_bytes
from megatron_fipo.megatron.distributed import (
    free_port,
    init_process_group_from_env,
    set_local_world_env,
)
from tools.bench.timing import slowest_rank_best_time

GAMMA = 2.0 ** (-1.0 / 32)


def gather_then_scan(x_local, layout, gamma):
    """The baseline: gather the full sequences, scan them whole, keep this rank's tokens."""
    stacked = x_local.new_empty((layout.cp_size * x_local.shape[0], x_local.shape[1]))
    dist.all_gather_single(stacked, x_local.contiguous())
    pieces = list(stacked.chunk(layout.cp_size))
    full = local_to_global(pieces, layout, max(layout.padded_lengths))
    return split_to_local(discounted_future_sum(full, gamma), layout)


def _rank_main(rank, cp_size, port, args, results) -> None:
    set_local_world_env(rank, cp_size, port)
    torch.set_num_threads(1)
    init_process_group_from_env("gloo")
    layout = build_layout([args.length] * args.batch, cp_size, rank, packed=False)
    dtype = getattr(torch, args.dtype)
    x = torch.randn(args.batch, args.length, generator=torch.Generator().manual_seed(0))
    x_local = split_to_local(x.to(dtype), layout)
    index = ChunkIndex.from_layout(layout)
    ours = slowest_rank_best_time(
        lambda: cp_future_sum(x_local, GAMMA, layout, None, index), args.repeats
    )
    baseline = slowest_rank_best_time(
        lambda: gather_then_scan(x_local, layout, GAMMA), args.repeats
    )
    diff = (cp_future_sum(x_local, GAMMA, layout) - gather_then_scan(x_local, layout, GAMMA)).abs()
    scale = torch.tensor([diff.max().item()], dtype=torch.float64)
    dist.all_reduce(scale, op=dist.ReduceOp.MAX)
    if rank == 0:
        results.put((cp_size, ours, baseline, exchange_bytes(layout, dtype), scale.item()))
    dist.destroy_process_group()


def run(cp_size: int, args) -> tuple:
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(target=_rank_main, args=(r, cp_size, port, args, results))
        for r in range(cp_size)
    ]
    for proc in procs:
        proc.start()
    outcome = results.get(timeout=1800)
    for proc in procs:
        proc.join()
    return outcome


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cp", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=32768)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    args = parser.parse_args()
    print(
        f"B={args.batch} T={args.length} {args.dtype} gloo, 1 thread per rank; times are the "
        f"slowest rank's best of {args.repeats} (ms); bytes are received per rank"
    )
    header = (
        f"{'CP':>3} {'ours ms':>9} {'gather ms':>10} {'speed-up':>9} {'ours B':>8} "
        f"{'gather B':>12} {'bytes ratio':>12} {'max |diff|':>11}"
    )
    print(header)
    for cp_size in args.cp:
        cp, ours, baseline, counted, diff = run(cp_size, args)
        print(
            f"{cp:>3} {ours * 1e3:>9.1f} {baseline * 1e3:>10.1f} {baseline / ours:>8.2f}x "
            f"{counted.scan:>8} {counted.full_gather:>12} {counted.ratio:>11.0f}x {diff:>11.2e}"
        )


if __name__ == "__main__":
    main()
