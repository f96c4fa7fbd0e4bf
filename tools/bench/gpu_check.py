"""One prepared GPU check (CUDA, no TransformerEngine; under 8 minutes on one H100 / H200).

    python -m tools.bench.gpu_check [--seq-len 2048] [--num-sequences 8] [--logprob-tokens 32768]

1. Actor step: a ~1B-parameter Qwen2-shaped model (hidden 2048, 16 layers, GQA 16/4 heads,
   SwiGLU 5632, vocab 151936, tied embeddings) in bf16 with the local spec on one GPU; FIPO
   train steps on random sequences; step time, tokens/s and MFU (6 * params * tokens / time
   over the card's dense bf16 peak; attention FLOPs excluded, so MFU is a lower bound).
2. Chunked log-prob peak memory at T = 32768 (vocab 151936, hidden 2048, bf16 inputs):
   ``torch.cuda.max_memory_allocated`` above the inputs, chunked vs naive (naive at
   ``--naive-tokens`` and scaled linearly in T when T would not fit).
3. The context-parallel future-KL scan on CUDA tensors (every CP rank of CP = 2 and 4
   simulated in one process with the same per-rank pieces the distributed scan uses) against
   the single-rank CPU scan in fp64 and fp32.

Prints one JSON line per part and a summary; exits 1 without CUDA.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

# Dense bf16 peak TFLOP/s by card name fragment (no sparsity).
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0}


def model_config(num_layers: int) -> dict:
    return dict(
        model_type="qwen2",
        vocab_size=151936,
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=num_layers,
        num_attention_heads=16,
        num_key_value_heads=4,
        rms_norm_eps=1e-6,
        rope_theta=1000000.0,
        max_position_embeddings=32768,
        tie_word_embeddings=True,
    )


def peak_tflops() -> float | None:
    name = torch.cuda.get_device_name()
    return next((value for key, value in PEAK_BF16_TFLOPS.items() if key in name), None)


def random_batch(num_sequences: int, seq_len: int, vocab: int):
    from megatron_fipo.megatron.actor import ActorBatch

    gen = torch.Generator().manual_seed(0)
    prompt = seq_len // 4
    ids = [torch.randint(0, vocab, (seq_len,), generator=gen) for _ in range(num_sequences)]
    return ActorBatch(
        input_ids=ids,
        prompt_lengths=torch.full((num_sequences,), prompt),
        response_lengths=torch.full((num_sequences,), seq_len - prompt),
        advantages=torch.randn(num_sequences, generator=gen),
    )


def actor_step(args) -> dict:
    from megatron_fipo.megatron.actor import ActorConfig, ActorOptimizerConfig, MegatronActor
    from megatron_fipo.megatron.distributed import ParallelConfig

    hf = model_config(args.num_layers)
    actor = MegatronActor(
        hf,
        ParallelConfig(),
        ActorConfig(dtype="bfloat16", micro_batch_size=args.micro_batch_size),
        ActorOptimizerConfig(lr=1e-6, lr_warmup_steps=0),
    )
    num_params = sum(p.numel() for chunk in actor.model for p in chunk.parameters())
    batch = random_batch(args.num_sequences, args.seq_len, hf["vocab_size"])
    batch.old_log_probs = actor.compute_log_probs(batch)
    times = []
    for _ in range(args.steps + 1):  # the first step warms up allocator and kernels
        torch.cuda.synchronize()
        start = time.perf_counter()
        metrics = actor.train_step(batch)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    step = sum(times[1:]) / len(times[1:])
    tokens = args.num_sequences * args.seq_len
    peak = peak_tflops()
    mfu = 6 * num_params * tokens / step / (peak * 1e12) if peak else None
    return {
        "part": "actor_step",
        "params": num_params,
        "tokens_per_step": tokens,
        "step_s": step,
        "tokens_per_s": tokens / step,
        "mfu": mfu,
        "loss": metrics["actor/loss"],
        "max_memory_gib": torch.cuda.max_memory_allocated() / 2**30,
    }


def _logprob_peak(method: str, tokens: int, vocab: int, hidden: int) -> float:
    from megatron_fipo.megatron.logprobs import chunked_log_probs, log_probs_from_logits

    torch.cuda.empty_cache()
    states = torch.randn(tokens, hidden, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    weight = (
        torch.randn(vocab, hidden, device="cuda", dtype=torch.bfloat16) * 0.02
    ).requires_grad_()
    targets = torch.randint(0, vocab, (tokens,), device="cuda")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    if method == "naive":
        log_probs, entropy = log_probs_from_logits(states @ weight.t(), targets, group=None)
    else:
        log_probs, entropy = chunked_log_probs(states, weight, targets, group=None)
    (log_probs.sum() + entropy.sum()).backward()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**30


def logprob_memory(args) -> dict:
    vocab, hidden = 151936, 2048
    chunked = _logprob_peak("chunked", args.logprob_tokens, vocab, hidden)
    naive_tokens = min(args.naive_tokens, args.logprob_tokens)
    naive = _logprob_peak("naive", naive_tokens, vocab, hidden)
    naive_scaled = naive * args.logprob_tokens / naive_tokens
    return {
        "part": "logprob_memory",
        "tokens": args.logprob_tokens,
        "chunked_extra_gib": chunked,
        "naive_tokens": naive_tokens,
        "naive_extra_gib": naive,
        "naive_extra_gib_at_tokens": naive_scaled,
        "ratio": naive_scaled / chunked,
    }


def _simulated_cp_scan(x: torch.Tensor, lengths, cp_size: int, gamma: float) -> torch.Tensor:
    """Every CP rank's local scan + carry exchange, run in one process on ``x``'s device."""
    from megatron_fipo.megatron import context_parallel as cp
    from megatron_fipo.megatron import cp_scan

    layout = cp.build_layout(lengths, cp_size, 0, packed=False)
    ranks = [layout.for_rank(rank) for rank in range(cp_size)]
    local = [cp.split_to_local(x, lay) for lay in ranks]
    indexes = [cp_scan.ChunkIndex.from_layout(lay) for lay in ranks]
    pieces = [cp_scan.local_chunk_scan(lx, ix, gamma) for lx, ix in zip(local, indexes)]
    all_totals = torch.stack([totals for _, totals in pieces])
    outs = []
    for rank, (ix, lx, (scan, _)) in enumerate(zip(indexes, local, pieces)):
        carries = cp_scan.own_carries(all_totals, ix, rank, gamma)
        outs.append(cp_scan.apply_carries(scan, carries, ix, lx, gamma))
    return cp.local_to_global(outs, layout, x.shape[1])


def cp_scan_check(args) -> dict:
    from megatron_fipo.algorithms.future_kl import discounted_future_sum

    gamma = 2 ** (-1 / 32)
    gen = torch.Generator().manual_seed(0)
    lengths = [32768, 20001, 777, 4096]
    result = {"part": "cp_scan", "lengths": lengths}
    for dtype, name in ((torch.float64, "fp64"), (torch.float32, "fp32")):
        x = torch.randn(len(lengths), max(lengths), generator=gen, dtype=torch.float64)
        x *= torch.arange(max(lengths))[None] < torch.tensor(lengths)[:, None]
        reference = discounted_future_sum(x, gamma)  # CPU fp64, whole sequences
        for cp_size in (2, 4):
            torch.cuda.synchronize()
            start = time.perf_counter()
            got = _simulated_cp_scan(x.to("cuda", dtype), lengths, cp_size, gamma)
            torch.cuda.synchronize()
            scale = reference.abs().max().item()
            result[f"{name}_cp{cp_size}_max_rel_err"] = (
                got.double().cpu() - reference
            ).abs().max().item() / scale
            result[f"{name}_cp{cp_size}_s"] = time.perf_counter() - start
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-layers", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--num-sequences", type=int, default=8)
    parser.add_argument("--micro-batch-size", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--logprob-tokens", type=int, default=32768)
    parser.add_argument("--naive-tokens", type=int, default=8192)
    parser.add_argument("--skip", nargs="*", default=[], choices=("actor", "logprob", "cp_scan"))
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_check needs a CUDA device (none is visible); nothing was run.", file=sys.stderr)
        return 1
    print(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__}))
    parts = {"cp_scan": cp_scan_check, "logprob": logprob_memory, "actor": actor_step}
    failed = False
    for name, part in parts.items():
        if name in args.skip:
            continue
        try:
            print(json.dumps(part(args)), flush=True)
        except Exception as error:  # noqa: BLE001 - report and go on to the next part
            failed = True
            print(json.dumps({"part": name, "error": repr(error)}), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
