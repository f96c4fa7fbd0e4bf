"""One prepared GPU check (CUDA, no TransformerEngine; parts 1-9 took under 8 minutes on one
H100 / H200; parts 10-14 are not yet timed on a GPU: ``--skip`` any part to stay within a
10-minute lease).

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
4. The blocked future-KL scan's CUDA time against a flipped ``cumsum`` of the same tensor
   (the bandwidth floor), measured in the same run, and its error against CPU fp64.
5. Weight sync into the embedded HF engine on the same GPU after the actor's train steps:
   sync GB/s, then sampled generation and the engine's token log-probs against the actor's
   recomputed ones (the trainer's ``rollout/logprob_diff_*``).
6. Our core attention's fused kernels (flash for plain causal, memory-efficient with the CP
   zigzag mask) against the materialised fp32 reference, bf16 with GQA.
7. The model with our core attention against Megatron's DotProductAttention, same weights,
   bf16: logits and gradients.
8. Profile of an actor step per micro-batch size: device busy fraction and top kernels.
9. Long context: one ``--long-seq-len`` (default 32768) token row through a train step with
   the local spec (flash attention through our core attention) and the chunked log-probs;
   peak memory and time.
10-12. Side by side with a plain transformers training step, packed vs padded rows, and
    the packed rows' attention kernel: :mod:`tools.bench.gpu_throughput`.
13-14. Colocation (an actor and an HF engine process on one GPU: free memory at each phase
    boundary of two RL-like steps, engine vs actor log-probs after each sync) and IPC weight
    sync (the full weights into another process's engine weights through the run's in-place
    route, GB/s against a same-device copy, checked bit for bit): :mod:`tools.bench.gpu_colocation`.

Prints one JSON line per part and a summary; exits 1 without CUDA.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback

import torch

from tools.bench import gpu_colocation, gpu_throughput

# Dense bf16 peak TFLOP/s by card name fragment (no sparsity).
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0}


DEVICE = "cuda"
SIZES = {"vocab": 151936, "hidden": 2048, "ffn": 5632}
"""``--smoke`` (CPU, tiny sizes) exercises every line of this script without a GPU."""


def _sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def _memory() -> int:
    return torch.cuda.memory_allocated() if DEVICE == "cuda" else 0


def _max_memory() -> int:
    return torch.cuda.max_memory_allocated() if DEVICE == "cuda" else 0


def _reset_memory() -> None:
    if DEVICE == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def model_config(num_layers: int) -> dict:
    return dict(
        model_type="qwen2",
        vocab_size=SIZES["vocab"],
        hidden_size=SIZES["hidden"],
        intermediate_size=SIZES["ffn"],
        num_hidden_layers=num_layers,
        num_attention_heads=16,
        num_key_value_heads=4,
        rms_norm_eps=1e-6,
        rope_theta=1000000.0,
        max_position_embeddings=32768,
        tie_word_embeddings=True,
    )


def peak_tflops() -> float | None:
    if DEVICE != "cuda":
        return None
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


def bf16_actor(hf: dict, micro_batch_size: int = 1, parallel_fields=None, **model_fields):
    """A one-process bf16 actor with the local spec (no TE on the device), AdamW at lr 1e-6."""
    from megatron_fipo.config import OptimizerConfig
    from megatron_fipo.megatron.actor import MegatronActor
    from megatron_fipo.megatron.check_parallel import layout, model_section

    return MegatronActor(
        hf,
        model_section(hf, dtype="bfloat16", **model_fields),
        layout(micro_batch_size=micro_batch_size, **(parallel_fields or {})),
        OptimizerConfig(lr=1e-6, lr_warmup_steps=0),
    )


def actor_step(args) -> dict:
    hf = model_config(args.num_layers)
    actor = bf16_actor(hf, micro_batch_size=args.micro_batch_size)
    num_params = sum(p.numel() for chunk in actor.model for p in chunk.parameters())
    batch = random_batch(args.num_sequences, args.seq_len, hf["vocab_size"])
    batch.old_log_probs = actor.compute_log_probs(batch)
    times = []
    for _ in range(args.steps + 1):  # the first step warms up allocator and kernels
        _sync()
        start = time.perf_counter()
        metrics = actor.train_step(batch)
        _sync()
        times.append(time.perf_counter() - start)
    step = sum(times[1:]) / len(times[1:])
    tokens = args.num_sequences * args.seq_len
    peak = peak_tflops()
    mfu = 6 * num_params * tokens / step / (peak * 1e12) if peak else None
    result = {
        "part": "actor_step",
        "params": num_params,
        "tokens_per_step": tokens,
        "step_s": step,
        "tokens_per_s": tokens / step,
        "mfu": mfu,
        "loss": metrics["actor/loss"],
        "max_memory_gib": _max_memory() / 2**30,
    }
    print(json.dumps(result), flush=True)
    return sync_rollout(actor, hf, args)


def profile_actor(args) -> dict:
    """Where an actor step's time goes: per micro-batch size, step time, busy fraction of
    the device (kernel time / wall) and the top kernels of one profiled step."""
    import gc

    from torch.profiler import ProfilerActivity, profile

    hf = model_config(args.num_layers)
    batch = random_batch(args.num_sequences, args.seq_len, hf["vocab_size"])
    result = {"part": "profile"}
    for mbs in args.profile_micro_batch_sizes:
        gc.collect()
        _reset_memory()
        actor = bf16_actor(hf, micro_batch_size=mbs)
        batch.old_log_probs = actor.compute_log_probs(batch)
        actor.train_step(batch)  # warm-up
        _sync()
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if DEVICE == "cuda" else [])
        with profile(activities=activities) as prof:
            start = time.perf_counter()
            actor.train_step(batch)
            _sync()
            wall = time.perf_counter() - start
        events = prof.key_averages()
        device_us = sum(getattr(e, "self_device_time_total", 0) for e in events)
        top = sorted(events, key=lambda e: getattr(e, "self_device_time_total", 0), reverse=True)
        result[f"mbs{mbs}"] = {
            "step_s": wall,
            "device_busy_fraction": device_us / 1e6 / wall,
            "max_memory_gib": _max_memory() / 2**30,
            "top_kernels_ms": {
                e.key[:60]: round(getattr(e, "self_device_time_total", 0) / 1e3, 1)
                for e in top[:12]
            },
        }
        del actor
    return result


def sync_rollout(actor, hf: dict, args) -> dict:
    """Sync the trained actor into an HF engine on this GPU, sample, compare log-probs."""
    from megatron_fipo.megatron.actor import ActorBatch
    from megatron_fipo.rollout.engine import GenerationRequest, SamplingParams
    from megatron_fipo.rollout.hf_engine import HFEngineConfig, HFRolloutEngine
    from megatron_fipo.rollout.weight_sync import WeightSync, WeightSyncConfig

    engine = HFRolloutEngine(
        HFEngineConfig(dtype="bfloat16", device=DEVICE, attn_implementation="sdpa"),
        hf_config=hf,
    )
    sync = WeightSync(
        actor.named_parameters_for_sync, hf, WeightSyncConfig(reuse_buffers=True, dtype="bfloat16")
    )
    times = []
    for _ in range(2):  # the first sync allocates the kept buffers
        _sync()
        start = time.perf_counter()
        sync.sync(engine)
        _sync()
        times.append(time.perf_counter() - start)
    gen = torch.Generator().manual_seed(1)
    requests = [
        GenerationRequest(
            prompt_token_ids=torch.randint(0, hf["vocab_size"], (64,), generator=gen).tolist(),
            sampling=SamplingParams(temperature=1.0, max_new_tokens=args.rollout_tokens, seed=i),
            request_id=str(i),
        )
        for i in range(8)
    ]
    _sync()
    start = time.perf_counter()
    samples = engine.generate(requests)
    _sync()
    generate_s = time.perf_counter() - start
    batch = ActorBatch(
        input_ids=[torch.tensor(s.prompt_token_ids + s.response_token_ids) for s in samples],
        prompt_lengths=torch.tensor([len(s.prompt_token_ids) for s in samples]),
        response_lengths=torch.tensor([len(s.response_token_ids) for s in samples]),
        advantages=torch.zeros(len(samples)),
    )
    actor_lp = actor.compute_log_probs(batch).cpu()
    diffs = torch.cat(
        [
            (torch.tensor(s.log_probs) - actor_lp[row, : len(s.log_probs)]).abs()
            for row, s in enumerate(samples)
        ]
    )
    return {
        "part": "sync_rollout",
        "sync_gb": sync.stats.num_bytes / 1e9,
        "sync_s": times[-1],
        "sync_gb_per_s": sync.stats.num_bytes / 1e9 / times[-1],
        "generated_tokens": int(diffs.numel()),
        "generate_tokens_per_s": diffs.numel() / generate_s,
        "logprob_diff_mean": float(diffs.mean()),
        "logprob_diff_max": float(diffs.max()),
    }


def actor_long(args) -> dict:
    """One long row through compute_log_probs and a train step (memory at long context)."""
    import gc

    gc.collect()
    _reset_memory()
    hf = model_config(args.num_layers)
    actor = bf16_actor(hf, micro_batch_size=1, recompute_granularity=args.long_recompute)
    batch = random_batch(1, args.long_seq_len, hf["vocab_size"])
    batch.old_log_probs = actor.compute_log_probs(batch)
    times = []
    for _ in range(2):
        _sync()
        start = time.perf_counter()
        metrics = actor.train_step(batch)
        _sync()
        times.append(time.perf_counter() - start)
    return {
        "part": "actor_long",
        "seq_len": args.long_seq_len,
        "recompute": args.long_recompute,
        "step_s": times[-1],
        "tokens_per_s": args.long_seq_len / times[-1],
        "loss": metrics["actor/loss"],
        "max_memory_gib": _max_memory() / 2**30,
    }


def future_kl_cuda(args) -> dict:
    """Blocked scan vs flipped cumsum on CUDA, fp32, same tensors, same run."""
    from megatron_fipo.algorithms.future_kl import discounted_future_sum

    gamma = 2 ** (-1 / 32)
    result = {"part": "future_kl_cuda", "batch": 16}
    for length in (1024,) if DEVICE == "cpu" else (10240, 20480, 32768):
        x64 = torch.randn(
            16, length, generator=torch.Generator().manual_seed(length), dtype=torch.float64
        )
        x = x64.to(DEVICE, torch.float32)

        def timed(fn):
            for _ in range(3):
                fn()
            _sync()
            start = time.perf_counter()
            for _ in range(20):
                fn()
            _sync()
            return (time.perf_counter() - start) / 20

        scan_s = timed(lambda x=x: discounted_future_sum(x, gamma))
        cumsum_s = timed(lambda x=x: x.flip(-1).cumsum(-1).flip(-1))
        reference = discounted_future_sum(x64, gamma)
        err = (discounted_future_sum(x, gamma).double().cpu() - reference).abs().max().item()
        result[f"T{length}_scan_ms"] = scan_s * 1e3
        result[f"T{length}_cumsum_ms"] = cumsum_s * 1e3
        result[f"T{length}_ratio_vs_cumsum"] = scan_s / cumsum_s
        result[f"T{length}_max_rel_err"] = err / reference.abs().max().item()
    return result


def attention_check(args) -> dict:
    """Our core attention's fused kernels vs the materialised fp32 reference on this device:
    plain causal (flash) and the CP = 2 zigzag mask (memory-efficient kernel), bf16, GQA."""
    from megatron_fipo.megatron.cp_attention import (
        fused_attention,
        masked_attention,
        zigzag_causal_mask,
    )

    length = 256 if DEVICE == "cpu" else 4096
    gen = torch.Generator().manual_seed(2)
    q, k, v = (
        torch.randn(length, 2, heads, 128, generator=gen).to(DEVICE, torch.bfloat16)
        for heads in (16, 4, 4)
    )
    result = {"part": "attention", "seq_len": length}
    causal = zigzag_causal_mask(length, 1, 0, None).to(DEVICE)
    half = length // 2  # CP rank 0 of 2: its zigzag queries over all keys
    zigzag = zigzag_causal_mask(half, 2, 0, None).to(DEVICE)
    cases = {"causal": (q, None, causal), "cp2_rank0": (q[:half], zigzag, zigzag)}
    for name, (query, fused_mask, mask) in cases.items():
        reference = masked_attention(query, k, v, mask, 128**-0.5).float()
        _reset_memory()
        base = _memory()
        got = fused_attention(query, k, v, fused_mask, 128**-0.5).float()
        _sync()
        result[f"{name}_max_abs_err"] = (got - reference).abs().max().item()
        result[f"{name}_fused_extra_mib"] = (_max_memory() - base) / 2**20
    return result


def model_attention_check(args) -> dict:
    """The GPTModel (2 layers of the 1B shape) with our core attention on its fused kernels
    against the same weights with Megatron's DotProductAttention: logits and every gradient,
    bf16 on this device (the GPU path without TE uses ours by default)."""
    from megatron.core.transformer.module import Float16Module

    from megatron_fipo.megatron import model as model_lib
    from megatron_fipo.megatron.check_parallel import layout, model_section
    from megatron_fipo.megatron.cp_attention import ContextParallelAttention
    from megatron_fipo.megatron.distributed import init_distributed

    init_distributed(layout())
    hf = model_config(2)
    dtype = "bfloat16" if DEVICE == "cuda" else "float32"
    config = model_lib.transformer_config_from_hf(hf, model_section(hf, dtype=dtype), layout())
    models = []
    for own in (False, True):
        model = model_lib.build_gpt_model(hf, config, own_attention=own).to(DEVICE)
        for module in model.modules():
            if isinstance(module, ContextParallelAttention):
                module.fused = True
        models.append(Float16Module(config, model) if config.bf16 else model)
    with torch.no_grad():
        mine = dict(models[1].named_parameters())
        for name, param in models[0].named_parameters():
            mine[name].copy_(param)
    length = 256 if DEVICE == "cpu" else 2048
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(0, hf["vocab_size"], (2, length), generator=gen).to(DEVICE)
    positions = torch.arange(length, device=DEVICE).expand(2, length)
    mask = model_lib.causal_attention_mask(length, DEVICE)
    outputs = []
    for model, attention_mask in zip(models, (mask, None)):
        logits = model(ids, positions, attention_mask)
        torch.log_softmax(logits.float(), dim=-1)[..., 0].sum().backward()
        outputs.append(logits.detach().float())
    grads = [dict((n, p.grad.float()) for n, p in m.named_parameters()) for m in models]
    grad_err = max(
        ((grads[1][n] - g).norm() / g.norm().clamp_min(1e-30)).item() for n, g in grads[0].items()
    )
    return {
        "part": "model_attention",
        "seq_len": length,
        "dtype": str(dtype),
        "logits_max_rel_err": (
            (outputs[1] - outputs[0]).abs().max() / outputs[0].abs().max()
        ).item(),
        "grads_max_rel_norm_err": grad_err,
    }


def _logprob_peak(method: str, tokens: int, vocab: int, hidden: int) -> float:
    from megatron_fipo.megatron.logprobs import chunked_log_probs, log_probs_from_logits

    _reset_memory()
    states = torch.randn(tokens, hidden, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    weight = (
        torch.randn(vocab, hidden, device=DEVICE, dtype=torch.bfloat16) * 0.02
    ).requires_grad_()
    targets = torch.randint(0, vocab, (tokens,), device=DEVICE)
    _sync()
    _reset_memory()
    base = _memory()
    if method == "naive":
        log_probs, entropy = log_probs_from_logits(states @ weight.t(), targets, group=None)
    else:
        log_probs, entropy = chunked_log_probs(states, weight, targets, group=None)
    (log_probs.sum() + entropy.sum()).backward()
    _sync()
    return (_max_memory() - base) / 2**30


def logprob_memory(args) -> dict:
    vocab, hidden = SIZES["vocab"], SIZES["hidden"]
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
        "ratio": naive_scaled / chunked if chunked else None,
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
            _sync()
            start = time.perf_counter()
            got = _simulated_cp_scan(x.to(DEVICE, dtype), lengths, cp_size, gamma)
            _sync()
            scale = reference.abs().max().item()
            result[f"{name}_cp{cp_size}_max_rel_err"] = (
                got.double().cpu() - reference
            ).abs().max().item() / scale
            result[f"{name}_cp{cp_size}_s"] = time.perf_counter() - start
    return result


PARTS = {
    "cp_scan": cp_scan_check,
    "attention": attention_check,
    "model_attention": model_attention_check,
    "future_kl": future_kl_cuda,
    "logprob": logprob_memory,
    "actor": actor_step,
    "long": actor_long,
    "profile": profile_actor,
    "side_by_side": gpu_throughput.side_by_side,
    "packed": gpu_throughput.packed_vs_padded,
    "packed_attention": gpu_throughput.packed_attention_check,
    "colocation": gpu_colocation.colocation,
    "ipc_sync": gpu_colocation.ipc_sync,
}
"""The parts, in the order they run (``--skip`` names any of them)."""


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-layers", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--num-sequences", type=int, default=8)
    parser.add_argument("--micro-batch-size", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--logprob-tokens", type=int, default=32768)
    parser.add_argument("--naive-tokens", type=int, default=8192)
    parser.add_argument("--rollout-tokens", type=int, default=128)
    parser.add_argument("--profile-micro-batch-sizes", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--long-seq-len", type=int, default=32768)
    parser.add_argument("--long-recompute", default=None, choices=(None, "full", "selective"))
    parser.add_argument("--packed-lengths", type=int, nargs=2, default=[200, 20480])
    parser.add_argument("--packed-sequences", type=int, default=16)
    parser.add_argument("--packed-steps", type=int, default=2)
    gpu_colocation.add_arguments(parser)
    parser.add_argument(
        "--skip",
        nargs="*",
        default=[],
        choices=tuple(PARTS),
    )
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny sizes: checks the script")
    args = parser.parse_args(argv)
    global DEVICE
    if args.smoke:
        DEVICE = "cpu"
        SIZES.update(vocab=512, hidden=64, ffn=128)
    elif not torch.cuda.is_available():
        print("gpu_check needs a CUDA device (none is visible); nothing was run.", file=sys.stderr)
        return 1
    name = torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu (smoke)"
    print(json.dumps({"device": name, "torch": torch.__version__}))
    failed = False
    for name, part in PARTS.items():
        if name in args.skip:
            continue
        start = time.perf_counter()
        try:
            result = part(args)
            result["wall_s"] = time.perf_counter() - start
            print(json.dumps(result), flush=True)
        except Exception as error:  # noqa: BLE001 - report and go on to the next part
            failed = True
            traceback.print_exc()
            print(json.dumps({"part": name, "error": repr(error)}), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    # The importable module's main, not this __main__ copy's: the parts in other modules read
    # its DEVICE and SIZES (``--smoke`` sets them).
    from tools.bench import gpu_check

    sys.exit(gpu_check.main())
