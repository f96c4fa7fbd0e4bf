"""Parallel consistency check: one FIPO train step under a TP/PP/CP/DP layout vs one process.

    python -m megatron_fipo.megatron.check_parallel --tp 2 --pp 2 --cp 1 --dp 1

On CPU it spawns the processes itself (gloo); under ``torchrun`` on GPUs it uses the launched
ranks (NCCL) and runs the single-process reference in a child of rank 0. Both runs build the
same tiny Qwen2-shaped model (the layout run loads the reference's initial weights from a
distributed checkpoint, which also exercises resharding), compute log-probs of a fixed random
batch, take one optimizer step of the FIPO loss, and gather the updated parameters. Prints
the max differences of log-probs, loss, gradient norm and parameters; exits 1 above
tolerance. ``--optimizer sgd`` (lr 1, no clipping) makes the parameter difference equal the
gradient difference.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import os
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass

import torch
import torch.distributed as dist

from megatron_fipo.algorithms.losses import PolicyLossConfig
from megatron_fipo.megatron.distributed import ParallelConfig, free_port, set_local_world_env


def tiny_hf_config(
    num_layers: int = 4, tie_word_embeddings: bool = False, vocab_size: int = 300
) -> dict:
    """A Qwen2-shaped config small enough for CPU checks (GQA, QKV bias, SwiGLU)."""
    return dict(
        model_type="qwen2",
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
        max_position_embeddings=512,
        tie_word_embeddings=tie_word_embeddings,
        initializer_range=0.02,
    )


@dataclass(kw_only=True)
class CheckSettings:
    """What the check runs; identical for the reference and the layout run."""

    optimizer: str = "adam"
    lr: float = 1e-3
    num_sequences: int = 8
    micro_batch_size: int = 2
    num_layers: int = 4
    tie_word_embeddings: bool = False
    logprob_chunk_size: int = 16
    seed: int = 7
    max_tokens_per_micro_batch: int | None = None

    def actor_configs(self):
        from megatron_fipo.megatron.actor import ActorConfig, ActorOptimizerConfig

        sgd = self.optimizer == "sgd"
        return (
            ActorConfig(
                micro_batch_size=self.micro_batch_size,
                max_tokens_per_micro_batch=self.max_tokens_per_micro_batch,
                logprob_chunk_size=self.logprob_chunk_size,
                seed=self.seed,
                use_distributed_optimizer=not sgd,  # Megatron's supports Adam only
            ),
            ActorOptimizerConfig(
                optimizer=self.optimizer,
                lr=1.0 if sgd else self.lr,
                lr_warmup_steps=0,
                weight_decay=0.0 if sgd else 0.1,
                clip_grad=0.0 if sgd else 1.0,
            ),
        )


def fixed_batch(settings: CheckSettings, vocab_size: int = 300):
    """The global batch: ragged prompts / responses, noise for old log-probs, advantages."""
    from megatron_fipo.megatron.actor import ActorBatch

    gen = torch.Generator().manual_seed(settings.seed)
    count = settings.num_sequences
    prompts = torch.randint(2, 9, (count,), generator=gen)
    responses = torch.randint(3, 24, (count,), generator=gen)
    ids = [
        torch.randint(0, vocab_size, (int(p + r),), generator=gen)
        for p, r in zip(prompts, responses)
    ]
    return ActorBatch(
        input_ids=ids,
        prompt_lengths=prompts,
        response_lengths=responses,
        old_log_probs=0.3 * torch.randn(count, int(responses.max()), generator=gen),  # noise
        advantages=torch.where(torch.rand(count, generator=gen) < 0.5, -1.0, 1.0),
    )


def dp_slice(batch, dp_rank: int, dp_size: int):
    """Contiguous share of the global batch for one DP rank."""
    count = len(batch.input_ids)
    if count % dp_size:
        raise ValueError(f"{count} sequences do not split over data_parallel={dp_size}")
    rows = slice(dp_rank * count // dp_size, (dp_rank + 1) * count // dp_size)
    return dataclasses.replace(
        batch,
        input_ids=batch.input_ids[rows],
        prompt_lengths=batch.prompt_lengths[rows],
        response_lengths=batch.response_lengths[rows],
        old_log_probs=batch.old_log_probs[rows],
        advantages=batch.advantages[rows],
    )


def run_layout(
    parallel: ParallelConfig, settings: CheckSettings, checkpoint_dir: str, reference: bool
):
    """Per-rank body: build, (save|load) initial weights, log-probs, one step, gather.

    Returns ``{"log_probs", "metrics", "params"}`` on global rank 0, None elsewhere.
    """
    from megatron.core import parallel_state as ps

    from megatron_fipo.megatron import checkpoint
    from megatron_fipo.megatron.actor import MegatronActor
    from megatron_fipo.megatron.distributed import destroy

    hf = tiny_hf_config(settings.num_layers, settings.tie_word_embeddings)
    actor_cfg, optim_cfg = settings.actor_configs()
    actor = MegatronActor(hf, parallel, actor_cfg, optim_cfg, PolicyLossConfig(mode="fipo"))
    try:
        if reference:
            checkpoint.save_model_checkpoint(actor.model, checkpoint_dir, hf)
        else:
            actor.load(checkpoint_dir, load_optimizer=False)
        batch = dp_slice(
            fixed_batch(settings), ps.get_data_parallel_rank(), actor.data_parallel_size
        )
        log_probs = actor.compute_log_probs(batch)
        # Old log-probs = current + fixed noise: ratios away from 1 so clipping and FIPO act.
        batch.old_log_probs = log_probs + batch.old_log_probs[:, : log_probs.shape[1]]
        metrics = actor.train_step(batch)
        params = checkpoint.gather_full_parameters(actor.model, vocab_size=actor.vocab_size)
        pieces = [None] * actor.data_parallel_size
        dist.all_gather_object(pieces, log_probs, group=ps.get_data_parallel_group())
        if dist.get_rank() != 0:
            return None
        width = max(piece.shape[1] for piece in pieces)
        full = torch.cat([torch.nn.functional.pad(p, (0, width - p.shape[1])) for p in pieces])
        return {"log_probs": full, "metrics": metrics, "params": params}
    finally:
        destroy()


def compare(reference: dict, result: dict) -> dict[str, float]:
    """Max abs differences (gradient norm relative) between two :func:`run_layout` results."""
    if set(reference["params"]) != set(result["params"]):
        missing = set(reference["params"]) ^ set(result["params"])
        raise RuntimeError(f"parameter names differ between the runs: {sorted(missing)[:8]}")
    param_diff = max(
        float((reference["params"][name] - result["params"][name]).abs().max())
        for name in reference["params"]
    )
    ref_norm = reference["metrics"]["actor/grad_norm"]
    return {
        "log_probs": float((reference["log_probs"] - result["log_probs"]).abs().max()),
        "loss": abs(reference["metrics"]["actor/loss"] - result["metrics"]["actor/loss"]),
        "grad_norm_rel": abs(ref_norm - result["metrics"]["actor/grad_norm"])
        / max(ref_norm, 1e-12),
        "params": param_diff,
    }


TOLERANCES = {"log_probs": 1e-5, "loss": 1e-5, "grad_norm_rel": 1e-5, "params": 1e-5}


def _spawned_rank(rank, world_size, port, parallel, settings, checkpoint_dir, reference, results):
    set_local_world_env(rank, world_size, port)
    torch.set_num_threads(1)
    try:
        out = run_layout(parallel, settings, checkpoint_dir, reference)
    except BaseException:
        # Without this the parent would wait on the queue forever.
        results.put(traceback.format_exc().encode())
        raise
    if rank == 0:
        # As bytes: tensors sent through the queue would live in this process's shared
        # memory, which is gone once it exits.
        buffer = io.BytesIO()
        torch.save(out, buffer)
        results.put(buffer.getvalue())


def spawn_run(world_size: int, parallel, settings, checkpoint_dir: str, reference: bool) -> dict:
    """Runs :func:`run_layout` in ``world_size`` fresh processes; rank 0's result."""
    import torch.multiprocessing as mp

    port = free_port()
    context = mp.get_context("spawn")
    results = context.SimpleQueue()
    args = (world_size, port, parallel, settings, checkpoint_dir, reference, results)
    processes = mp.start_processes(
        _spawned_rank, args=args, nprocs=world_size, start_method="spawn", join=False
    )
    result = results.get()
    if not result.startswith(b"PK"):  # torch.save archives are zip files
        raise RuntimeError("a check_parallel rank failed:\n" + result.decode())
    processes.join()
    return torch.load(io.BytesIO(result), weights_only=False)


def _parse(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for name in ("tp", "pp", "cp", "dp"):
        parser.add_argument(f"--{name}", type=int, default=1, help=f"{name.upper()} size")
    parser.add_argument("--vpp", type=int, default=None, help="virtual pipeline stages per rank")
    parser.add_argument("--optimizer", choices=("adam", "sgd"), default="adam")
    parser.add_argument("--num-layers", type=int, default=4)
    parser.add_argument("--tie-word-embeddings", action="store_true")
    parser.add_argument("--micro-batch-size", type=int, default=2)
    parser.add_argument(
        "--workdir", default=None, help="shared directory (required under torchrun)"
    )
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = _parse(argv)
    parallel = ParallelConfig(
        tensor_parallel=args.tp,
        pipeline_parallel=args.pp,
        virtual_pipeline=args.vpp,
        context_parallel=args.cp,
        data_parallel=args.dp,
    )
    settings = CheckSettings(
        optimizer=args.optimizer,
        num_layers=args.num_layers,
        tie_word_embeddings=args.tie_word_embeddings,
        micro_batch_size=args.micro_batch_size,
    )
    world_size = parallel.model_parallel_size * args.dp
    if "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1:
        return _main_torchrun(parallel, settings, args.workdir)
    with tempfile.TemporaryDirectory() as workdir:
        start = time.time()
        reference = spawn_run(1, ParallelConfig(), settings, os.path.join(workdir, "init"), True)
        result = spawn_run(world_size, parallel, settings, os.path.join(workdir, "init"), False)
        return _report(reference, result, time.time() - start, args)


def _report(reference: dict, result: dict, seconds: float, args) -> int:
    diffs = compare(reference, result)
    failed = {key: value for key, value in diffs.items() if value > TOLERANCES[key]}
    layout = f"tp={args.tp} pp={args.pp} cp={args.cp} dp={args.dp} vpp={args.vpp}"
    print(f"check_parallel {layout} optimizer={args.optimizer} ({seconds:.1f}s)")
    for key, value in diffs.items():
        print(f"  max diff {key:14s} {value:.3e}  (tolerance {TOLERANCES[key]:.0e})")
    print(
        f"  loss {result['metrics']['actor/loss']:.6f}  grad_norm {result['metrics']['actor/grad_norm']:.6f}"
    )
    print("FAILED: " + json.dumps(failed) if failed else "OK")
    return 1 if failed else 0


def _main_torchrun(parallel, settings, workdir) -> int:
    """Under torchrun: rank 0 runs the reference in a one-process child, then all ranks run."""
    if workdir is None:
        raise SystemExit("--workdir (a directory all ranks can read) is required under torchrun")
    rank = int(os.environ["RANK"])
    init_dir, done = os.path.join(workdir, "init"), os.path.join(workdir, "reference.pt")
    if rank == 0:
        saved = {
            key: os.environ.pop(key)
            for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK")
            if key in os.environ
        }
        reference = spawn_run(1, ParallelConfig(), settings, init_dir, True)
        os.environ.update(saved)
        torch.save(reference, done + ".tmp")
        os.replace(done + ".tmp", done)
    while not os.path.exists(done):
        time.sleep(1.0)
    start = time.time()
    result = run_layout(parallel, settings, init_dir, False)
    if rank != 0:
        return 0
    args = argparse.Namespace(
        tp=parallel.tensor_parallel,
        pp=parallel.pipeline_parallel,
        cp=parallel.context_parallel,
        dp=parallel.data_parallel,
        vpp=parallel.virtual_pipeline,
        optimizer=settings.optimizer,
    )
    return _report(torch.load(done, weights_only=False), result, time.time() - start, args)


if __name__ == "__main__":
    sys.exit(main())
