"""Token-balanced data-parallel shares vs round-robin rows on a long-tailed RL batch.

    python -m tools.bench.dp_balance [--sequences 1024] [--dp 2 4 8] [--seeds 5]

Each training rank takes its share of every mini-batch; a step lasts as long as the rank with
the most work. The batch's response lengths are long-tailed like FIPO rollouts (a few hundred
to 20k tokens, log-normal, groups of ``--group`` samples of one prompt in consecutive rows).
For each DP size it compares how rows are dealt:

- round robin: row ``i`` to rank ``i % DP`` (what an unaware split does);
- balanced: :func:`megatron_fipo.batch.balanced_partition` (longest first, each row to the
  rank with the fewest tokens so far), what ``TrainWorker.train_rollout`` uses.

It prints max / mean tokens per rank (1.0 is perfect balance) and the same for the sum of
squared lengths (attention's cost grows with it), averaged and worst over ``--seeds`` batches.
No model runs: the numbers are the work each rank is handed.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from megatron_fipo.batch import balanced_partition


def long_tailed_lengths(
    count: int, group: int, seed: int, low: int = 200, high: int = 20480
) -> torch.Tensor:
    """``[count]`` prompt + response lengths: a prompt per group of ``group`` rows, log-normal
    responses (median about 2k tokens) clamped to ``[low, high]``."""
    gen = torch.Generator().manual_seed(seed)
    prompts = torch.randint(64, 512, (-(-count // group),), generator=gen).repeat_interleave(group)
    responses = torch.exp(torch.randn(count, generator=gen) * 1.0).mul(2000.0).long()
    return prompts[:count] + responses.clamp(low, high)


def imbalance(lengths: torch.Tensor, parts: list[list[int]]) -> tuple[float, float]:
    """(max / mean tokens, max / mean squared-length sum) over the parts."""
    tokens = torch.tensor([float(lengths[part].sum()) for part in parts])
    squares = torch.tensor([float((lengths[part].double() ** 2).sum()) for part in parts])
    return float(tokens.max() / tokens.mean()), float(squares.max() / squares.mean())


def compare(lengths: torch.Tensor, dp: int) -> dict[str, tuple[float, float]]:
    rows = list(range(len(lengths)))
    round_robin = [rows[rank::dp] for rank in range(dp)]
    return {
        "round_robin": imbalance(lengths, round_robin),
        "balanced": imbalance(lengths, balanced_partition(lengths, dp)),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sequences", type=int, default=1024, help="rows per mini-batch")
    parser.add_argument("--group", type=int, default=16, help="samples per prompt")
    parser.add_argument("--dp", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--seeds", type=int, default=5)
    args = parser.parse_args(argv)
    batches = [long_tailed_lengths(args.sequences, args.group, seed) for seed in range(args.seeds)]
    summary: dict = {
        "sequences": args.sequences,
        "mean_tokens": round(float(torch.cat(batches).float().mean()), 1),
        "max_tokens": int(torch.cat(batches).max()),
    }
    for dp in args.dp:
        results = [compare(lengths, dp) for lengths in batches]
        row = {}
        for method in ("round_robin", "balanced"):
            tokens = [r[method][0] for r in results]
            squares = [r[method][1] for r in results]
            row[method] = {
                "max_over_mean_tokens": round(sum(tokens) / len(tokens), 4),
                "worst_max_over_mean_tokens": round(max(tokens), 4),
                "max_over_mean_len2": round(sum(squares) / len(squares), 4),
            }
        summary[f"dp{dp}"] = row
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
