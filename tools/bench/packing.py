"""Packed rows vs padded rows on a long-tailed RL batch (CPU).

    python -m tools.bench.packing [--sequences 32] [--max-length 4096] [--budget 4096]

One process, a small Qwen2-shaped model, the long-tailed batch of
:mod:`tools.bench.dynamic_batching` (log-normal responses, one at the length limit). The same
batch goes through ``compute_log_probs`` and one FIPO ``train_step`` from the same weights,
three ways:

- fixed: ``micro_batch_size=1``, every row padded to the batch's longest sequence (the default
  without a token budget);
- padded: ``max_tokens_per_micro_batch=--budget``, ``packing=false``: rows grouped by length,
  each group padded to its own longest;
- packed: the same budget, ``packing=true`` (the default with a budget): sequences packed back
  to back into rows of at most ``--budget`` tokens, attention per sequence.

Prints the tokens each plan computes (padding included), wall times, real tokens per second
of the train step, the ratios against the padded plan, and the largest log-prob difference
(all three compute the same thing). Padded and packed run ``--rounds`` times in alternating
order (a shared, busy machine drifts); times are medians over rounds, ratios are given per
round too. The fixed plan runs once.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from tools.bench.dynamic_batching import add_batch_arguments, bench_hf_config, long_tailed_batch


def run_plan(hf: dict, batch, parallelism_fields: dict, state: dict | None):
    from megatron_fipo.config import OptimizerConfig
    from megatron_fipo.megatron.actor import MegatronActor
    from megatron_fipo.megatron.check_parallel import layout, model_section
    from megatron_fipo.megatron.micro_batches import plan_micro_batches

    actor = MegatronActor(
        hf,
        model_section(hf),
        layout(**parallelism_fields),
        OptimizerConfig(lr=1e-5, lr_warmup_steps=0),
        seed=3,
    )
    params = dict(actor.model[0].named_parameters())
    if state is None:
        state = {name: p.detach().clone() for name, p in params.items()}
    else:
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(state[name])
        actor.optimizer.reload_model_params()
    plan = plan_micro_batches(batch.lengths, actor.parallelism, actor.model_config)
    start = time.perf_counter()
    log_probs = actor.compute_log_probs(batch)
    logprob_s = time.perf_counter() - start
    batch.old_log_probs = log_probs
    start = time.perf_counter()
    actor.train_step(batch)
    step_s = time.perf_counter() - start
    real = int(batch.lengths.sum())
    return (
        state,
        log_probs,
        {
            "micro_batches": len(plan),
            "computed_tokens": sum(item.num_tokens for item in plan),
            "padding_tokens": sum(item.num_tokens for item in plan) - real,
            "compute_log_probs_s": round(logprob_s, 3),
            "train_step_s": round(step_s, 3),
            "train_tokens_per_s": round(real / step_s, 1),
        },
    )


def _median(measured: list[dict]) -> dict:
    """Per key, the median over rounds (counts are the same every round)."""
    return {key: sorted(m[key] for m in measured)[len(measured) // 2] for key in measured[0]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_batch_arguments(parser)
    parser.add_argument("--skip-fixed", action="store_true", help="only padded vs packed")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    hf = bench_hf_config(args)
    batch = long_tailed_batch(args.sequences, args.max_length, hf["vocab_size"])
    plans = {
        "padded": dict(max_tokens_per_micro_batch=args.budget, packing=False),
        "packed": dict(max_tokens_per_micro_batch=args.budget, packing=True),
    }
    state, results, log_probs = None, {}, {}
    if not args.skip_fixed:
        state, log_probs["fixed_mbs1"], results["fixed_mbs1"] = run_plan(
            hf, batch, dict(micro_batch_size=1), state
        )
    rounds: dict[str, list[dict]] = {name: [] for name in plans}
    for index in range(args.rounds):
        for name in list(plans)[index % 2 :] + list(plans)[: index % 2]:
            state, log_probs[name], measured = run_plan(hf, batch, plans[name], state)
            rounds[name].append(measured)
    for name, measured in rounds.items():
        results[name] = _median(measured)
    padded, packed = results["padded"], results["packed"]
    summary = {
        "sequences": args.sequences,
        "real_tokens": int(batch.lengths.sum()),
        "budget": args.budget,
        "rounds": args.rounds,
        **results,
        "packed_vs_padded": {
            "computed_tokens_ratio": round(
                padded["computed_tokens"] / packed["computed_tokens"], 3
            ),
            "train_tokens_per_s_ratio": round(
                packed["train_tokens_per_s"] / padded["train_tokens_per_s"], 2
            ),
            "train_tokens_per_s_ratio_per_round": [
                round(b["train_step_s"] / a["train_step_s"], 2)
                for a, b in zip(rounds["packed"], rounds["padded"])
            ],
            "compute_log_probs_speedup": round(
                padded["compute_log_probs_s"] / packed["compute_log_probs_s"], 2
            ),
        },
        "max_log_prob_difference": max(
            float((log_probs[name] - log_probs["padded"]).abs().max()) for name in log_probs
        ),
    }
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
