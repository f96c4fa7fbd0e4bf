"""Benchmark: discounted_future_sum vs the [T, 128]-decay-matrix formulation and a cumsum floor.

B = 16, fp32, T in {4096, 10240, 20480, 32768}. In the same run it times
  (a) the reference formulation: for each 128-column block of outputs, build the [T, 128]
      decay matrix gamma^(k - t) and accumulate one matmul (O(B T^2) work), and
  (b) one flipped torch.cumsum pass over the same tensor (a floor proxy: no scan can touch
      the data fewer times),
and prints ours / (a) speed-ups and ours / (b) slow-downs. Targets: >= 100x faster than (a)
at T = 20480, within 4x of (b). Usage: python tools/bench/future_kl.py [--threads N]
"""

from __future__ import annotations

import argparse
import time

import torch

from megatron_fipo.algorithms.future_kl import discounted_future_sum

GAMMA = 2.0 ** (-1.0 / 32)
COLUMNS = 128


def reference_block_matmul(x: torch.Tensor, gamma: float) -> torch.Tensor:
    batch, length = x.shape
    out = torch.empty_like(x)
    rows = torch.arange(length, dtype=x.dtype).unsqueeze(1)  # k
    for start in range(0, length, COLUMNS):
        cols = torch.arange(start, min(start + COLUMNS, length), dtype=x.dtype).unsqueeze(0)
        diff = rows - cols  # [T, 128]: k - t
        decay = torch.where(diff >= 0, torch.pow(gamma, diff.clamp(min=0)), 0.0)
        out[:, start : start + cols.shape[1]] = x @ decay
    return out


def flipped_cumsum(x: torch.Tensor) -> torch.Tensor:
    return torch.cumsum(x.flip(-1), dim=-1).flip(-1)


def best_time(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 10240, 20480, 32768])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"B=16 fp32 gamma=2^(-1/32) threads={args.threads} (best of repeats, ms)")
    header = f"{'T':>6} {'ours':>9} {'(a) [T,128]':>12} {'(b) cumsum':>11} {'a/ours':>8} {'ours/b':>7} {'max rel err':>12}"
    print(header)
    for length in args.lengths:
        x = torch.randn(16, length, generator=torch.Generator().manual_seed(length))
        ours = best_time(lambda x=x: discounted_future_sum(x, GAMMA), 20)
        floor = best_time(lambda x=x: flipped_cumsum(x), 20)
        ref_repeats = 3 if length <= 10240 else 1
        ref = best_time(lambda x=x: reference_block_matmul(x, GAMMA), ref_repeats)
        exact = discounted_future_sum(x.double(), GAMMA)
        err = (
            (discounted_future_sum(x, GAMMA).double() - exact).abs().max() / exact.abs().max()
        ).item()
        print(
            f"{length:>6} {ours * 1e3:>9.3f} {ref * 1e3:>12.1f} {floor * 1e3:>11.3f} "
            f"{ref / ours:>7.0f}x {ours / floor:>6.2f}x {err:>12.2e}"
        )


if __name__ == "__main__":
    main()
