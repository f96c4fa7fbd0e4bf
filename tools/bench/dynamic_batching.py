"""Dynamic (token-budget) micro-batches vs fixed micro-batches on a long-tailed RL batch.

    python -m tools.bench.dynamic_batching [--sequences 32] [--max-length 4096] [--budget 4096]

One process, CPU, a small Qwen2-shaped model. The batch's response lengths follow a
long-tailed distribution like long-CoT rollouts (log-normal, most a few hundred tokens, a
few near ``--max-length``). The same batch goes through ``compute_log_probs`` and one FIPO
``train_step`` twice, from the same weights:

- fixed: ``micro_batch_size=1``, every row padded to the batch's longest sequence (what the
  actor did before dynamic batching, and still does without ``max_tokens_per_micro_batch``);
- dynamic: ``max_tokens_per_micro_batch=--budget`` with padded rows (``packing=false``;
  :mod:`tools.bench.packing` compares packed rows).

Prints the padded tokens each plan computes, the wall time of each, the ratios, and the
largest difference of the log-probs (the two plans compute the same thing).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch


def long_tailed_batch(count: int, max_length: int, vocab: int, seed: int = 0):
    from megatron_fipo.megatron.actor import ActorBatch

    gen = torch.Generator().manual_seed(seed)
    prompts = torch.randint(64, 192, (count,), generator=gen)
    # log-normal response lengths: median ~ max_length / 12, a tail up to max_length
    responses = torch.exp(torch.randn(count, generator=gen) * 0.9).mul(max_length / 12)
    responses = responses.long().clamp(16, max_length - 192)
    responses[0] = max_length - 192  # one response at the limit, as in every real batch
    ids = [
        torch.randint(0, vocab, (int(p + r),), generator=gen) for p, r in zip(prompts, responses)
    ]
    return ActorBatch(
        input_ids=ids,
        prompt_lengths=prompts,
        response_lengths=responses,
        advantages=torch.where(torch.rand(count, generator=gen) < 0.5, -1.0, 1.0),
    )


def run_plan(hf: dict, batch, budget: int | None, state: dict | None):
    from megatron_fipo.config import OptimizerConfig
    from megatron_fipo.megatron.actor import MegatronActor
    from megatron_fipo.megatron.check_parallel import layout, model_section
    from megatron_fipo.megatron.micro_batches import plan_micro_batches

    actor = MegatronActor(
        hf,
        model_section(hf),
        layout(micro_batch_size=1, max_tokens_per_micro_batch=budget, packing=False),
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
    padded_tokens = sum(item.num_tokens for item in plan)
    start = time.perf_counter()
    log_probs = actor.compute_log_probs(batch)
    logprob_s = time.perf_counter() - start
    batch.old_log_probs = log_probs
    start = time.perf_counter()
    actor.train_step(batch)
    step_s = time.perf_counter() - start
    return (
        state,
        log_probs,
        {
            "micro_batches": len(plan),
            "padded_tokens": padded_tokens,
            "compute_log_probs_s": round(logprob_s, 3),
            "train_step_s": round(step_s, 3),
        },
    )


def add_batch_arguments(parser: argparse.ArgumentParser) -> None:
    """The batch and model options this benchmark shares with ``tools.bench.packing``."""
    parser.add_argument("--sequences", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=4096)
    parser.add_argument("--budget", type=int, default=4096)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)


def bench_hf_config(args: argparse.Namespace) -> dict:
    """The small Qwen2-shaped model of these benchmarks."""
    return dict(
        model_type="qwen2",
        vocab_size=1024,
        hidden_size=args.hidden,
        intermediate_size=2 * args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=args.max_length,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_batch_arguments(parser)
    args = parser.parse_args(argv)
    hf = bench_hf_config(args)
    batch = long_tailed_batch(args.sequences, args.max_length, hf["vocab_size"])
    real_tokens = int((batch.prompt_lengths + batch.response_lengths).sum())
    state, fixed_lp, fixed = run_plan(hf, batch, None, None)
    _, dynamic_lp, dynamic = run_plan(hf, batch, args.budget, state)
    summary = {
        "sequences": args.sequences,
        "real_tokens": real_tokens,
        "fixed_mbs1": fixed,
        f"dynamic_budget_{args.budget}": dynamic,
        "padded_tokens_ratio": round(fixed["padded_tokens"] / dynamic["padded_tokens"], 2),
        "compute_log_probs_speedup": round(
            fixed["compute_log_probs_s"] / dynamic["compute_log_probs_s"], 2
        ),
        "train_step_speedup": round(fixed["train_step_s"] / dynamic["train_step_s"], 2),
        "max_log_prob_difference": float((fixed_lp - dynamic_lp).abs().max()),
    }
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
