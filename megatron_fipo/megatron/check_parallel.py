"""Parallel consistency check: one FIPO train step under a TP/PP/CP/DP layout vs one process.

    python -m megatron_fipo.megatron.check_parallel --tp 2 --pp 2 --cp 1 --dp 1

On CPU it spawns the processes itself (gloo); under ``torchrun`` on GPUs it uses the launched
ranks (NCCL) and runs the single-process reference in a child of rank 0. Both runs build the
same tiny Qwen2-shaped model (the layout run loads the reference's initial weights from a
distributed checkpoint, which also exercises resharding), compute log-probs of a fixed random
batch, take one optimizer step of the FIPO loss, and gather the updated parameters. Prints
each difference (log-probs, loss, gradient norm, parameters) with the tolerance derived from
fp32 rounding by :mod:`megatron_fipo.numerics`, and exits 1 above any. The reference also
returns its gradients: they set each parameter's bound, carried through the update (Adam's
first step is nearly ``lr * sign(g)``, so an element whose gradient is rounding noise may
move by up to ``2 lr``). ``--optimizer sgd`` (lr 1, no clipping) makes the parameter
difference equal the gradient difference.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import math
import os
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from megatron_fipo import numerics
from megatron_fipo.algorithms.losses import PolicyLossConfig
from megatron_fipo.config import (
    ArchitectureConfig,
    ModelConfig,
    OptimizerConfig,
    ParallelismConfig,
)
from megatron_fipo.megatron.distributed import free_port, set_local_world_env
from megatron_fipo.numerics import Comparison

if TYPE_CHECKING:
    from megatron_fipo.megatron.actor import ActorBatch


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
    )


def model_section(hf_config: dict, **overrides) -> ModelConfig:
    """The ``model`` config section of an inline architecture (``hf_config`` holds
    :class:`ArchitectureConfig` fields only), fp32 with the local spec: what runs on CPU."""
    return ModelConfig(
        architecture=ArchitectureConfig(**hf_config),
        **{"dtype": "float32", "spec": "local", **overrides},
    )


def layout(
    tp: int = 1, pp: int = 1, cp: int = 1, vpp: int | None = None, **fields
) -> ParallelismConfig:
    """The ``parallelism`` section of a TP / PP / CP layout (DP is what the world leaves)."""
    return ParallelismConfig(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        context_parallel_size=cp,
        virtual_pipeline_model_parallel_size=vpp,
        **fields,
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
    packing: bool | None = None
    """``parallelism.packing`` (None: on with ``max_tokens_per_micro_batch``)."""
    overlap: bool = False
    """``parallelism.overlap_grad_reduce`` and ``overlap_param_gather`` (Adam only)."""

    def sections(
        self, parallel: ParallelismConfig | None = None
    ) -> tuple[ModelConfig, ParallelismConfig, OptimizerConfig]:
        """The actor's ``model``, ``parallelism`` (the ``parallel`` layout with this check's
        micro-batching) and ``optimizer`` sections."""
        sgd = self.optimizer == "sgd"
        model = model_section(
            tiny_hf_config(self.num_layers, self.tie_word_embeddings),
            logprob_chunk_size=self.logprob_chunk_size,
        )
        parallelism = dataclasses.replace(
            parallel or ParallelismConfig(),
            micro_batch_size=self.micro_batch_size,
            max_tokens_per_micro_batch=self.max_tokens_per_micro_batch,
            packing=self.packing,
            use_distributed_optimizer=not sgd,  # Megatron's supports Adam only
            overlap_grad_reduce=self.overlap,
            overlap_param_gather=self.overlap,
        )
        return model, parallelism, self.optimizer_section()

    def optimizer_section(self) -> OptimizerConfig:
        sgd = self.optimizer == "sgd"
        return OptimizerConfig(
            optimizer=self.optimizer,
            lr=1.0 if sgd else self.lr,
            lr_warmup_steps=0,
            weight_decay=0.0 if sgd else 0.1,
            clip_grad=0.0 if sgd else 1.0,
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
    parallel: ParallelismConfig,
    settings: CheckSettings,
    checkpoint_dir: str,
    reference: bool,
    edit_batch: Callable[[ActorBatch], None] | None = None,
):
    """Per-rank body: build, (save|load) initial weights, log-probs, one step, gather.

    Returns ``{"log_probs", "metrics", "params"}`` on global rank 0, None elsewhere; the
    reference adds ``"grads"`` (:func:`gathered_gradients`). ``edit_batch`` changes this DP
    rank's training batch in place before the step (tests plant a deliberate error with it).
    """
    from megatron.core import parallel_state as ps

    from megatron_fipo.megatron import checkpoint
    from megatron_fipo.megatron.actor import MegatronActor
    from megatron_fipo.megatron.distributed import destroy

    hf = tiny_hf_config(settings.num_layers, settings.tie_word_embeddings)
    actor = MegatronActor(
        hf, *settings.sections(parallel), PolicyLossConfig(mode="fipo"), seed=settings.seed
    )
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
        if edit_batch is not None:
            edit_batch(batch)
        metrics = actor.train_step(batch)
        actor.finish_param_sync()  # overlap_param_gather: the step's all-gather is still due
        params = checkpoint.gather_full_parameters(actor.model, vocab_size=actor.vocab_size)
        grads = gathered_gradients(actor, metrics) if reference else None
        pieces = [None] * actor.data_parallel_size
        dist.all_gather_object(pieces, log_probs, group=ps.get_data_parallel_group())
        if dist.get_rank() != 0:
            return None
        width = max(piece.shape[1] for piece in pieces)
        full = torch.cat([torch.nn.functional.pad(p, (0, width - p.shape[1])) for p in pieces])
        out = {"log_probs": full, "metrics": metrics, "params": params}
        if reference:  # the gradients bound each parameter's update (see compare)
            out["grads"] = grads
        return out
    finally:
        destroy()


def gathered_gradients(actor, metrics: dict) -> dict[str, torch.Tensor] | None:
    """The full gradients of the step just taken, as the optimizer used them (clipped), on
    global rank 0 (None elsewhere); all ranks call it.

    Read from DDP's ``main_grad`` buffers after the step: Megatron clips the gradients in
    place and, with fp32 parameters, the optimizer's grads are views of those buffers. Their
    norm is checked against the reported (pre-clip) gradient norm, so a Megatron change that
    breaks this cannot go unnoticed.
    """
    from megatron_fipo.megatron import checkpoint

    if actor.data_parallel_size > 1 and actor.parallelism.use_distributed_optimizer:
        raise ValueError("gathered_gradients needs data_parallel 1 or no distributed optimizer")
    grads = checkpoint.gather_full_parameters(actor.model, main_grad=True)
    if grads is None:
        return None
    norm = math.sqrt(sum(float(g.double().square().sum()) for g in grads.values()))
    reported, clip = metrics["actor/grad_norm"], actor.optimizer_config.clip_grad
    expected = reported * min(1.0, clip / (reported + 1e-6)) if clip else reported
    depth = sum(grad.numel() for grad in grads.values())  # the norm's sum of squares
    if abs(norm - expected) > numerics.rounding_tolerance(expected, depth):
        raise RuntimeError(
            f"main_grad norm {norm:.6g} after the step is not the clipped gradient norm "
            f"{expected:.6g}: Megatron no longer leaves the used gradients there"
        )
    vocab = set(checkpoint.VOCAB_PARALLEL_PARAMS)
    return {
        name: grad[: actor.vocab_size] if name in vocab else grad for name, grad in grads.items()
    }


def depths(settings: CheckSettings) -> tuple[int, int]:
    """(forward depth of a log-prob, depth of a weight gradient) for the check's model and
    batch (:mod:`megatron_fipo.numerics`)."""
    hf = tiny_hf_config(settings.num_layers, settings.tie_word_embeddings)
    batch = fixed_batch(settings, hf["vocab_size"])
    lengths = batch.prompt_lengths + batch.response_lengths
    forward = numerics.transformer_depth(
        num_layers=hf["num_hidden_layers"],
        hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"],
        head_dim=hf["hidden_size"] // hf["num_attention_heads"],
        seq_length=int(lengths.max()),
        vocab_size=hf["vocab_size"],
    )
    return forward, numerics.gradient_depth(forward, int(lengths.sum()))


def _loss_tolerance(reference: dict, log_prob_tolerance: float, settings) -> float:
    """The loss is a token mean of ``-A f r`` (clipped): each term moves by its log-prob's
    error times ``|A| f min(r, c)``, and once more through the FIPO weight ``f = exp(F)``,
    whose discounted future sum collects independent errors with weight
    ``sqrt(sum gamma^2k) = 1 / sqrt(1 - gamma^2)``; the mean of ``N`` independent errors
    shrinks by ``sqrt(N)``."""
    metrics, config = reference["metrics"], PolicyLossConfig(mode="fipo")
    advantage = numerics.max_abs(fixed_batch(settings).advantages)
    sensitivity = (
        advantage
        * metrics["fipo/weight_max"]
        * min(metrics["actor/ratio_max"], config.clip_ratio_c)
        * (1 + 1 / math.sqrt(1 - config.gamma**2))
    )
    return sensitivity * log_prob_tolerance / math.sqrt(metrics["actor/num_tokens"])


def _adam_step(optim, name: str, previous: list[dict[str, torch.Tensor]]) -> numerics.AdamStep:
    """Adam's moments before this step, rebuilt from the earlier steps' (clipped) gradients
    exactly as torch Adam accumulates them."""
    exp_avg = exp_avg_sq = None
    for grads in previous:
        grad = grads[name].double()
        if exp_avg is None:
            exp_avg, exp_avg_sq = torch.zeros_like(grad), torch.zeros_like(grad)
        exp_avg = optim.adam_beta1 * exp_avg + (1 - optim.adam_beta1) * grad
        exp_avg_sq = optim.adam_beta2 * exp_avg_sq + (1 - optim.adam_beta2) * grad * grad
    return numerics.AdamStep(
        beta1=optim.adam_beta1,
        beta2=optim.adam_beta2,
        eps=optim.adam_eps,
        step=len(previous) + 1,
        exp_avg=exp_avg,
        exp_avg_sq=exp_avg_sq,
    )


def parameter_bounds(reference: dict, settings: CheckSettings) -> dict[str, torch.Tensor]:
    """Elementwise bound on |layout - reference| of each parameter after the step.

    The gradient tolerance (relative to the largest gradient of that tensor) carried
    through the update (SGD: times lr; Adam: :func:`numerics.adam_update_bound`, with the
    moments of ``reference["previous_grads"]``, the clipped gradients of earlier steps, if
    any), plus the rounding of the update itself relative to ``|p_new| + lr |direction|``.
    """
    _, grad_depth = depths(settings)
    optim = settings.optimizer_section()
    rounding = numerics.rounding_tolerance(1.0, numerics.UPDATE_ROUNDINGS[optim.optimizer])
    bounds = {}
    for name, grad in reference["grads"].items():
        grad_tol = numerics.rounding_tolerance(numerics.max_abs(grad), grad_depth)
        if optim.optimizer == "sgd":  # the update is lr x the gradient
            moved = torch.full_like(grad, optim.lr * grad_tol, dtype=torch.float64)
            step = optim.lr * grad.double().abs()
        else:
            adam = _adam_step(optim, name, reference.get("previous_grads", []))
            moved = optim.lr * numerics.adam_update_bound(grad, grad_tol, adam)
            step = optim.lr * adam.direction(grad).abs()
        bounds[name] = moved + rounding * (reference["params"][name].double().abs() + step)
    return bounds


def compare(reference: dict, result: dict, settings: CheckSettings) -> list[Comparison]:
    """Each compared quantity of two :func:`run_layout` results (``reference`` from the
    single process, with its gradients) with its difference and derived tolerance."""
    if set(reference["params"]) != set(result["params"]):
        missing = set(reference["params"]) ^ set(result["params"])
        raise RuntimeError(f"parameter names differ between the runs: {sorted(missing)[:8]}")
    forward_depth, grad_depth = depths(settings)
    log_probs = numerics.compare_tensors(
        "log_probs", result["log_probs"], reference["log_probs"], forward_depth
    )
    ref_metrics, metrics = reference["metrics"], result["metrics"]
    loss = Comparison(
        "loss",
        abs(ref_metrics["actor/loss"] - metrics["actor/loss"]),
        _loss_tolerance(reference, log_probs.tolerance, settings),
    )
    ref_norm = ref_metrics["actor/grad_norm"]
    grad_norm = Comparison(
        "grad_norm (relative)",
        abs(ref_norm - metrics["actor/grad_norm"]) / ref_norm,
        numerics.rounding_tolerance(1.0, grad_depth),
    )
    worst = None
    for name, bound in parameter_bounds(reference, settings).items():
        diff = (reference["params"][name].double() - result["params"][name].double()).abs()
        index = int((diff / bound).argmax())
        candidate = Comparison(
            f"params ({name})", float(diff.view(-1)[index]), float(bound.view(-1)[index])
        )
        if worst is None or candidate.ratio > worst.ratio:
            worst = candidate
    return [log_probs, loss, grad_norm, worst]


def undetermined_signs(reference: dict, settings: CheckSettings) -> tuple[int, int]:
    """(elements whose reference gradient is within its own rounding tolerance, all
    elements): under Adam these may move by up to 2 lr in either run."""
    _, grad_depth = depths(settings)
    count = total = 0
    for grad in reference["grads"].values():
        tol = numerics.rounding_tolerance(numerics.max_abs(grad), grad_depth)
        count += int(((grad.abs() <= tol) & (grad != 0)).sum())
        total += grad.numel()
    return count, total


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
        "--max-tokens-per-micro-batch", type=int, default=None, help="token-budget batching"
    )
    parser.add_argument(
        "--packing",
        choices=("auto", "on", "off"),
        default="auto",
        help="packed rows (auto: with --max-tokens-per-micro-batch)",
    )
    parser.add_argument("--overlap", action="store_true", help="overlap grad reduce / gather")
    parser.add_argument(
        "--workdir", default=None, help="shared directory (required under torchrun)"
    )
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = _parse(argv)
    parallel = layout(args.tp, args.pp, args.cp, args.vpp)
    settings = CheckSettings(
        optimizer=args.optimizer,
        num_layers=args.num_layers,
        tie_word_embeddings=args.tie_word_embeddings,
        micro_batch_size=args.micro_batch_size,
        max_tokens_per_micro_batch=args.max_tokens_per_micro_batch,
        packing={"auto": None, "on": True, "off": False}[args.packing],
        overlap=args.overlap,
    )
    world_size = parallel.model_parallel_size * args.dp
    if "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1:
        return _main_torchrun(parallel, settings, args.workdir)
    with tempfile.TemporaryDirectory() as workdir:
        start = time.time()
        reference = spawn_run(1, layout(), plain(settings), os.path.join(workdir, "init"), True)
        result = spawn_run(world_size, parallel, settings, os.path.join(workdir, "init"), False)
        return _report(reference, result, time.time() - start, args, settings)


def plain(settings: CheckSettings) -> CheckSettings:
    """The reference's settings: fixed micro-batches of padded rows, no overlap (the batching
    and overlap of ``settings`` are what the layout run checks against it)."""
    return dataclasses.replace(
        settings, max_tokens_per_micro_batch=None, packing=False, overlap=False
    )


def _report(reference: dict, result: dict, seconds: float, args, settings) -> int:
    comparisons = compare(reference, result, settings)
    shape = f"tp={args.tp} pp={args.pp} cp={args.cp} dp={args.dp} vpp={args.vpp}"
    batching = (
        f"packing={settings.packing} max_tokens={settings.max_tokens_per_micro_batch} "
        f"overlap={settings.overlap}"
    )
    print(f"check_parallel {shape} optimizer={args.optimizer} {batching} ({seconds:.1f}s)")
    print("  tolerances: fp32 rounding of each quantity (megatron_fipo/numerics.py)")
    for comparison in comparisons:
        print(f"  {comparison}")
    metrics = result["metrics"]
    print(f"  loss {metrics['actor/loss']:.6f}  grad_norm {metrics['actor/grad_norm']:.6f}")
    if settings.optimizer == "adam":
        count, total = undetermined_signs(reference, settings)
        print(f"  {count} of {total} gradient elements are within their own rounding (Adam sign)")
    failed = [comparison.name for comparison in comparisons if not comparison.ok]
    print("FAILED: " + ", ".join(failed) if failed else "OK")
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
        reference = spawn_run(1, layout(), plain(settings), init_dir, True)
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
        tp=parallel.tensor_model_parallel_size,
        pp=parallel.pipeline_model_parallel_size,
        cp=parallel.context_parallel_size,
        dp=int(os.environ["WORLD_SIZE"]) // parallel.model_parallel_size,
        vpp=parallel.virtual_pipeline_model_parallel_size,
        optimizer=settings.optimizer,
    )
    return _report(
        torch.load(done, weights_only=False), result, time.time() - start, args, settings
    )


if __name__ == "__main__":
    sys.exit(main())
