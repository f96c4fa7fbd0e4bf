"""Throughput parts of the GPU check (:mod:`tools.bench.gpu_check` runs them; ``--smoke``
runs them on CPU at tiny sizes):

- ``side_by_side``: the same 1B Qwen2 shape and tokens through (a) our actor's train step and
  (b) a plain transformers bf16 training step (SDPA attention, AdamW), one after the other on
  the same GPU: tokens/s, MFU (``6 * params * tokens / time`` over the card's dense bf16
  peak), and (a)'s tokens/s over (b)'s.
- ``packed``: a long-tailed batch (lengths ``--packed-lengths``, 200 to 20k tokens) through the
  actor's token-budget micro-batches, padded rows vs packed rows: tokens/s, tokens computed.
- ``packed_attention``: PyTorch's variable-length flash kernel (packed rows on CUDA at CP = 1)
  against the materialised fp32 reference, bf16, ragged sequences with GQA.

The helpers (device, timing, memory, the model shape, the bf16 actor) are gpu_check's, read
when a part runs (``--smoke`` switches its device to CPU).
"""

from __future__ import annotations

import gc
import time

import torch


def _base():
    from tools.bench import gpu_check

    return gpu_check


def timed_steps(step, count: int) -> float:
    """Mean seconds of ``count`` calls of ``step`` after one warm-up call."""
    base = _base()
    times = []
    for _ in range(count + 1):
        base._sync()
        start = time.perf_counter()
        step()
        base._sync()
        times.append(time.perf_counter() - start)
    return sum(times[1:]) / count


def mfu(num_params: int, tokens: int, seconds: float) -> float | None:
    peak = _base().peak_tflops()
    return 6 * num_params * tokens / seconds / (peak * 1e12) if peak else None


def transformers_step(hf: dict, batch, micro_batch_size: int, steps: int) -> dict:
    """A plain transformers bf16 training step on ``batch``: SDPA attention, AdamW (bf16
    weights and states), the batch in micro-batches of ``micro_batch_size`` rows."""
    from transformers import AutoConfig, AutoModelForCausalLM

    fields = dict(hf)
    config = AutoConfig.for_model(fields.pop("model_type"), **fields)
    config._attn_implementation = "sdpa"
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).to(_base().DEVICE)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)
    ids = torch.stack(batch.input_ids).to(_base().DEVICE)
    parts = ids.split(micro_batch_size)

    def step():
        for part in parts:
            loss = model(input_ids=part, labels=part).loss / len(parts)
            loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    seconds = timed_steps(step, steps)
    num_params = sum(p.numel() for p in model.parameters())
    return {"params": num_params, "step_s": seconds, "tokens_per_s": ids.numel() / seconds}


def actor_steps(hf: dict, batch, steps: int, micro_batch_size: int = 1, **parallel) -> dict:
    """Our bf16 actor's train step on ``batch`` (old log-probs first, as the loop does)."""
    from megatron_fipo.megatron.micro_batches import plan_micro_batches

    base = _base()
    actor = base.bf16_actor(hf, micro_batch_size=micro_batch_size, parallel_fields=parallel)
    plan = plan_micro_batches(batch.lengths, actor.parallelism, actor.model_config)
    batch.old_log_probs = actor.compute_log_probs(batch)
    seconds = timed_steps(lambda: actor.train_step(batch), steps)
    return {
        "params": sum(p.numel() for chunk in actor.model for p in chunk.parameters()),
        "computed_tokens": sum(item.num_tokens for item in plan),
        "step_s": seconds,
        "tokens_per_s": int(batch.lengths.sum()) / seconds,
        "max_memory_gib": base._max_memory() / 2**30,
    }


def side_by_side(args) -> dict:
    """Our actor step vs a plain transformers step, same shape, tokens and GPU."""
    base = _base()
    hf = base.model_config(args.num_layers)
    batch = base.random_batch(args.num_sequences, args.seq_len, hf["vocab_size"])
    tokens = args.num_sequences * args.seq_len
    base._reset_memory()
    ours = actor_steps(hf, batch, args.steps, args.micro_batch_size)
    gc.collect()
    base._reset_memory()
    theirs = transformers_step(hf, batch, args.micro_batch_size, args.steps)
    return {
        "part": "side_by_side",
        "params": ours["params"],
        "tokens_per_step": tokens,
        "ours_step_s": ours["step_s"],
        "ours_tokens_per_s": ours["tokens_per_s"],
        "ours_mfu": mfu(ours["params"], tokens, ours["step_s"]),
        "ours_max_memory_gib": ours["max_memory_gib"],
        "transformers_step_s": theirs["step_s"],
        "transformers_tokens_per_s": theirs["tokens_per_s"],
        "transformers_mfu": mfu(theirs["params"], tokens, theirs["step_s"]),
        "transformers_max_memory_gib": base._max_memory() / 2**30,
        "ratio_tokens_per_s": theirs["step_s"] / ours["step_s"],
    }


def long_tailed_batch(lengths: tuple[int, int], count: int, vocab: int):
    """``count`` sequences, total lengths log-normal within ``lengths`` (one at the maximum)."""
    from megatron_fipo.batch import ActorBatch

    low, high = lengths
    gen = torch.Generator().manual_seed(5)
    total = torch.exp(torch.randn(count, generator=gen)).mul(high / 10).long().clamp(low, high)
    total[0] = high
    prompts = torch.full((count,), min(128, low // 2))
    ids = [torch.randint(0, vocab, (int(n),), generator=gen) for n in total]
    return ActorBatch(
        input_ids=ids,
        prompt_lengths=prompts,
        response_lengths=total - prompts,
        advantages=torch.randn(count, generator=gen),
    )


def packed_vs_padded(args) -> dict:
    """The same long-tailed batch through token-budget micro-batches of padded rows and of
    packed rows (fresh actors of the same shape): tokens/s of a train step."""
    base = _base()
    hf = base.model_config(args.num_layers)
    low, high = args.packed_lengths
    batch = long_tailed_batch((low, high), args.packed_sequences, hf["vocab_size"])
    result = {"part": "packed_vs_padded", "real_tokens": int(batch.lengths.sum()), "budget": high}
    for name, packing in (("padded", False), ("packed", True)):
        gc.collect()
        base._reset_memory()
        result[name] = actor_steps(
            hf, batch, args.packed_steps, max_tokens_per_micro_batch=high, packing=packing
        )
    result["ratio_tokens_per_s"] = result["padded"]["step_s"] / result["packed"]["step_s"]
    return result


def packed_attention_check(args) -> dict:
    """Variable-length flash attention (CUDA, bf16) vs the materialised fp32 reference on a
    packed row of ragged sequences, GQA; on CPU (smoke) the kernel does not exist and only
    the reference runs."""
    from megatron_fipo.megatron.cp_attention import (
        masked_attention,
        varlen_causal_attention,
        zigzag_causal_mask,
    )

    device = _base().DEVICE
    lengths = [48, 130, 6, 72] if device == "cpu" else [4096, 777, 10000, 3]
    padded = [-(-n // 2) * 2 for n in lengths]
    cu = torch.tensor([0, *padded]).cumsum(0).to(torch.int32)
    total = int(cu[-1])
    gen = torch.Generator().manual_seed(6)
    q, k, v = (
        torch.randn(total, heads, 128, generator=gen).to(device, torch.bfloat16)
        for heads in (16, 4, 4)
    )
    allowed = zigzag_causal_mask(total, 1, 0, cu).to(device)
    reference = masked_attention(*(x.unsqueeze(1) for x in (q, k, v)), allowed, 128**-0.5)
    result = {"part": "packed_attention", "lengths": lengths}
    if device != "cuda":
        result["varlen"] = "skipped (CUDA only)"
        return result
    got = varlen_causal_attention(q, k, v, cu, 128**-0.5)
    result["varlen_max_abs_err"] = (got.float() - reference.squeeze(1).float()).abs().max().item()
    return result
