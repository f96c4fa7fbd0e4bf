"""Dry run of a cluster layout: parallel sizes, engine placement and a per-GPU memory estimate.

``python -m megatron_fipo.cluster.layout --config configs/qwen2.5-32b-fipo.yaml --nnodes 16
--gpus-per-node 8`` validates the Megatron layout against the world (the checks of
:meth:`FipoConfig.validate_layout`: world size by TP*PP*CP, heads by TP, layers by PP, sequence
length by 2*CP*TP, batch by DP) and prints where training ranks and rollout engines go and what
one training GPU holds. No GPU, no Ray, no weights needed.

The memory model (bytes per training GPU, the most loaded pipeline stage):

- weights: parameters of the stage / TP, in ``model.dtype``;
- gradients: Megatron's DDP buffer, fp32 (``grad_reduce_in_fp32``), one per parameter;
- optimizer: Adam moments (+ fp32 master weights when training in 16 bit), sharded over the
  DP*CP ranks by the distributed optimizer (replicated without it);
- activations: per micro-batch of ``max_tokens_per_micro_batch`` tokens split over CP (and over
  TP where sequence parallel applies), in ``model.dtype``, flash attention (no S^2 scores); with full
  recomputation only each layer's input is kept plus one layer being recomputed; PP > 1 keeps
  up to PP micro-batches in flight on the first stage (1F1B);
- logits chunk: the chunked log-prob pass holds ``chunk x V/TP`` fp32 logits a few times over.

It is an estimate for choosing a layout (allocator slack, NCCL buffers and TE workspaces are not
counted), not a guarantee.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from megatron_fipo.config import ArchitectureConfig, ConfigError, FipoConfig, load_config

GIB = 1024**3
DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}
LOGPROB_CHUNK_TOKENS = 1024  # megatron_fipo.megatron.logprobs.DEFAULT_CHUNK_SIZE
LOGITS_COPIES = 3  # logits, softmax / exp, and the gradient buffer of one chunk


@dataclass(frozen=True, slots=True)
class Placement:
    """Where the training ranks and rollout engines go."""

    nnodes: int
    gpus_per_node: int
    """0 on a CPU-only run (then the slots are CPU training ranks)."""
    training_ranks: int
    tensor_parallel: int
    pipeline_parallel: int
    context_parallel: int
    data_parallel: int
    colocate: bool
    engine: str
    engine_tensor_parallel: int
    num_engines: int
    rollout_gpus: int
    """GPUs (CPU slots) the engines use; all of them when colocated."""


@dataclass(frozen=True, slots=True)
class MemoryEstimate:
    """Bytes on the most loaded training GPU."""

    params_total: int
    params_per_gpu: int
    weights: float
    gradients: float
    optimizer: float
    activations: float
    logits_chunk: float
    engine_weights: float
    """Rollout engine weights per GPU (model / engine TP, in ``model.dtype``)."""

    @property
    def training_total(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.activations + self.logits_chunk


def resize_world(config: FipoConfig, nnodes: int | None, gpus_per_node: int | None) -> FipoConfig:
    """``config`` with the cluster shape replaced (re-validated)."""
    trainer = config.trainer
    changes = {"nnodes": nnodes, "gpus_per_node": gpus_per_node}
    changes = {k: v for k, v in changes.items() if v is not None}
    if not changes:
        return config
    return dataclasses.replace(config, trainer=dataclasses.replace(trainer, **changes))


def compute_placement(config: FipoConfig) -> Placement:
    """Validate the layout (ConfigError naming the field) and place ranks and engines."""
    par, rollout, trainer = config.parallelism, config.rollout, config.trainer
    total = trainer.nnodes * (trainer.gpus_per_node or trainer.cpu_ranks_per_node)
    rollout_gpus = total if rollout.colocate else int(rollout.num_gpus or 0)
    engine_tp = rollout.engine_tensor_parallel_size if trainer.gpus_per_node else 1
    if rollout_gpus % engine_tp:
        raise ConfigError(
            f"rollout.num_gpus ({rollout_gpus}) must be divisible by "
            f"rollout.engine_tensor_parallel_size ({engine_tp})"
        )
    data_parallel = config.validate_layout()
    if trainer.gpus_per_node and par.tensor_model_parallel_size > trainer.gpus_per_node:
        raise ConfigError(
            f"parallelism.tensor_model_parallel_size ({par.tensor_model_parallel_size}) must fit "
            f"in one node (trainer.gpus_per_node = {trainer.gpus_per_node}): TP crosses NVLink only"
        )
    return Placement(
        nnodes=trainer.nnodes,
        gpus_per_node=trainer.gpus_per_node,
        training_ranks=config.training_world_size,
        tensor_parallel=par.tensor_model_parallel_size,
        pipeline_parallel=par.pipeline_model_parallel_size,
        context_parallel=par.context_parallel_size,
        data_parallel=data_parallel,
        colocate=rollout.colocate,
        engine=rollout.engine,
        engine_tensor_parallel=engine_tp,
        num_engines=rollout_gpus // engine_tp,
        rollout_gpus=rollout_gpus,
    )


def architecture_of(config: FipoConfig) -> ArchitectureConfig | None:
    """``model.architecture``, else the fields of ``hf_model_path/config.json`` when present."""
    if config.model.architecture is not None:
        return config.model.architecture
    path = Path(config.model.hf_model_path or "") / "config.json"
    if not path.is_file():
        return None
    hf = json.loads(path.read_text())
    names = {f.name for f in dataclasses.fields(ArchitectureConfig)}
    return ArchitectureConfig(**{k: v for k, v in hf.items() if k in names})


def padded_vocab(vocab_size: int, tensor_parallel: int) -> int:
    """Vocabulary rounded up to a multiple of 128 * TP, as the model provider pads it."""
    from megatron_fipo.megatron.model import padded_vocab_size

    return padded_vocab_size(vocab_size, tensor_parallel)


def layer_parameters(arch: ArchitectureConfig) -> tuple[int, int]:
    """(TP-sharded, replicated) parameters of one transformer layer."""
    hidden, ffn = arch.hidden_size, arch.intermediate_size
    head_dim = hidden // arch.num_attention_heads
    kv = arch.num_key_value_heads * head_dim
    qkv = hidden * (hidden + 2 * kv) + ((hidden + 2 * kv) if arch.model_type == "qwen2" else 0)
    sharded = qkv + hidden * hidden + 3 * hidden * ffn  # q/k/v, output projection, SwiGLU MLP
    return sharded, 2 * hidden  # two RMSNorm weights stay whole on every TP rank


def count_parameters(
    arch: ArchitectureConfig, tensor_parallel: int, pipeline_parallel: int
) -> tuple[int, int]:
    """(whole model, most loaded GPU): stage layers / TP plus embedding or output layer / TP."""
    vocab = padded_vocab(arch.vocab_size, tensor_parallel)
    sharded, replicated = layer_parameters(arch)
    embedding = vocab * arch.hidden_size
    output = 0 if arch.tie_word_embeddings else embedding
    total = arch.num_hidden_layers * (sharded + replicated) + embedding + output + arch.hidden_size
    layers = arch.num_hidden_layers // pipeline_parallel
    stage = layers * (sharded // tensor_parallel + replicated)
    if pipeline_parallel == 1:
        ends = (embedding + output) // tensor_parallel
    else:  # first stage: embedding; last: output layer (and the tied copy when tied)
        ends = embedding // tensor_parallel
    return total, stage + ends + arch.hidden_size


def activation_bytes(config: FipoConfig, arch: ArchitectureConfig) -> float:
    """Activation memory of the most loaded stage (module docstring)."""
    par, model = config.parallelism, config.model
    tp, pp, cp = (
        par.tensor_model_parallel_size,
        par.pipeline_model_parallel_size,
        par.context_parallel_size,
    )
    tokens = par.max_tokens_per_micro_batch or par.micro_batch_size * config.max_sequence_length
    tokens_per_rank = tokens / cp
    hidden, ffn = arch.hidden_size, arch.intermediate_size
    kv = arch.num_key_value_heads * (hidden // arch.num_attention_heads)
    width = DTYPE_BYTES[model.dtype]
    # Per token and layer: tensors split by TP (q/k/v out, attention out, fc1 out, fc2 in) and
    # hidden-sized ones (norm inputs, projections' inputs) split by TP only with sequence parallel.
    split = (hidden + 2 * kv) + hidden + 2 * ffn + ffn
    whole = 4 * hidden
    sequence_parallel = par.sequence_parallel
    if sequence_parallel is None:  # as the actor resolves it (model.transformer_config_from_hf)
        sequence_parallel = model.spec == "te" and tp > 1
    per_token_layer = width * (split / tp + whole / (tp if sequence_parallel else 1))
    full_layer = tokens_per_rank * per_token_layer
    layers = arch.num_hidden_layers // pp
    in_flight = pp if pp > 1 else 1
    if model.recompute_granularity == "full":
        checkpoint = tokens_per_rank * width * hidden / (tp if sequence_parallel else 1)
        return in_flight * layers * checkpoint + full_layer
    return in_flight * layers * full_layer


def estimate_memory(
    config: FipoConfig, arch: ArchitectureConfig, placement: Placement
) -> MemoryEstimate:
    """Per-GPU bytes of one training rank (most loaded stage) and of the engine weights."""
    par = config.parallelism
    tp, pp = par.tensor_model_parallel_size, par.pipeline_model_parallel_size
    total, per_gpu = count_parameters(arch, tp, pp)
    dtype = DTYPE_BYTES[config.model.dtype]
    # Adam m and v in fp32, plus an fp32 master copy when the model itself is 16 bit.
    state_bytes = 8 + (4 if dtype < 4 else 0)
    shards = (
        placement.data_parallel * placement.context_parallel if par.use_distributed_optimizer else 1
    )
    vocab = padded_vocab(arch.vocab_size, tp)
    chunk = min(LOGPROB_CHUNK_TOKENS, config.max_sequence_length)
    return MemoryEstimate(
        params_total=total,
        params_per_gpu=per_gpu,
        weights=per_gpu * dtype,
        gradients=per_gpu * 4.0,
        optimizer=per_gpu * state_bytes / shards,
        activations=activation_bytes(config, arch),
        logits_chunk=LOGITS_COPIES * chunk * vocab / tp * 4.0,
        engine_weights=total * float(dtype) / placement.engine_tensor_parallel,
    )


def _count(num: int) -> str:
    return f"{num / 1e9:.2f} B" if num >= 1e9 else f"{num / 1e6:.2f} M"


def _placement_lines(p: Placement) -> list[str]:
    slot = "GPU" if p.gpus_per_node else "CPU slot"
    per_node = p.gpus_per_node or p.training_ranks // p.nnodes
    lines = [
        f"training ranks: {p.training_ranks} = TP {p.tensor_parallel} x PP {p.pipeline_parallel}"
        f" x CP {p.context_parallel} x DP {p.data_parallel}",
        f"rollout: {p.num_engines} {p.engine} engine(s) x TP {p.engine_tensor_parallel}",
    ]
    if p.colocate:
        lines.append(
            f"placement: colocated, one bundle per {slot} ({p.nnodes} x {per_node}); each {slot} "
            "holds a training rank and its share of an engine; the engines start first, then "
            "release all their memory (weights, KV cache) for each training phase"
        )
    else:
        lines.append(
            f"placement: disaggregated, {slot}s 0..{p.training_ranks - 1} train, "
            f"{slot}s {p.training_ranks}..{p.training_ranks + p.rollout_gpus - 1} serve the engines"
        )
    return lines


def _node_lines(config: FipoConfig) -> tuple[list[str], list[dict[str, Any]]]:
    """What each node will hold: the lines the driver prints again with the nodes' addresses
    once Ray has placed the bundles (nodes filled in order, NODE_RANK 0 first)."""
    from megatron_fipo.cluster.placement import node_lines, plan_by_node, plan_placement

    trainer = config.trainer
    nodes = plan_by_node(
        plan_placement(config), trainer.gpus_per_node or trainer.cpu_ranks_per_node
    )
    summary = [
        {"node": n.index, "train_ranks": list(n.train_ranks), "engines": list(n.engines)}
        for n in nodes
    ]
    return ["placement by node:", *(f"  {line}" for line in node_lines(nodes))], summary


def _memory_lines(config: FipoConfig, m: MemoryEstimate, p: Placement, gpu_gib: float) -> list[str]:
    par, model = config.parallelism, config.model
    shards = p.data_parallel * p.context_parallel if par.use_distributed_optimizer else 1
    recompute = model.recompute_granularity or "off"
    tokens = par.max_tokens_per_micro_batch or par.micro_batch_size * config.max_sequence_length
    rows = [
        (f"weights ({model.dtype})", m.weights),
        ("gradients (fp32 DDP buffer)", m.gradients),
        (f"optimizer (Adam, {shards} shard(s))", m.optimizer),
        (
            f"activations (recompute {recompute}, {tokens} tokens/micro-batch)",
            m.activations,
        ),
        ("log-prob logits chunk", m.logits_chunk),
    ]
    lines = [f"  {name:<58} {value / GIB:8.2f} GiB" for name, value in rows]
    lines.append(f"  {'total per training GPU':<58} {m.training_total / GIB:8.2f} GiB")
    if p.gpus_per_node:
        kv = config.rollout.mem_fraction_static * gpu_gib - m.engine_weights / GIB
        lines.append(
            f"  engine weights per GPU {m.engine_weights / GIB:.2f} GiB; KV cache budget "
            f"{config.rollout.mem_fraction_static} x {gpu_gib:g} GiB - weights = {kv:.2f} GiB"
        )
        if m.training_total / GIB > gpu_gib:
            lines.append(f"  WARNING: the training estimate exceeds {gpu_gib:g} GiB per GPU")
        if kv <= 0:
            lines.append("  WARNING: no room for the KV cache: raise rollout.mem_fraction_static")
    return lines


def lifecycle_gib(config: FipoConfig, m: MemoryEstimate, gpu_gib: float) -> dict[str, float]:
    """GiB on one colocated GPU in each phase of a step (``cluster/colocation.py``).

    The engine's static pool (weights + KV cache) is ``mem_fraction_static`` of the GPU: it
    starts before the training ranks allocate, so it gets that share. ``generate``: the pool, and
    Megatron's weights (plus its Adam state and gradients unless
    ``optimizer.offload_during_rollout``). ``train``: the engine released everything; Megatron's
    full training footprint. ``sync``: the engine's weights resumed (not its KV cache), Megatron's
    resident state and one weight bucket being assembled. Without releasing, the engine's pool
    and Megatron's training footprint add up (``no_release``)."""
    resident = m.weights
    if not config.optimizer.offload_during_rollout:
        resident += m.gradients + m.optimizer
    pool = config.rollout.mem_fraction_static * gpu_gib * GIB
    bucket = float(config.rollout.weight_sync_bucket_bytes) * 2  # the HF bucket + local shards
    phases = {
        "generate": resident + pool,
        "train": m.training_total,
        "sync": resident + m.engine_weights + bucket,
        "no_release": m.training_total + pool,
    }
    return {name: value / GIB for name, value in phases.items()}


def _lifecycle_lines(config: FipoConfig, m: MemoryEstimate, gpu_gib: float) -> list[str]:
    phases = lifecycle_gib(config, m, gpu_gib)
    peak = max(("generate", "train", "sync"), key=phases.__getitem__)
    offload = "offloaded" if config.optimizer.offload_during_rollout else "kept"
    lines = [
        "colocated step per GPU (engines release everything for training; Adam state and "
        f"gradients {offload} while the engines generate):"
    ]
    for name in ("generate", "train", "sync"):
        mark = "  <- peak" if name == peak else ""
        lines.append(f"  {name:<10} {phases[name]:8.2f} GiB{mark}")
    lines.append(
        f"  without releasing the engine's memory both budgets add up: "
        f"{phases['no_release']:.2f} GiB"
    )
    if phases[peak] > gpu_gib:
        lines.append(f"  WARNING: the {peak} phase exceeds {gpu_gib:g} GiB per GPU")
    return lines


def describe(config: FipoConfig, gpu_memory_gib: float = 80.0) -> tuple[str, dict[str, Any]]:
    """(printable report, JSON-able summary) of the layout; raises ConfigError when impossible."""
    placement = compute_placement(config)
    summary: dict[str, Any] = {"placement": dataclasses.asdict(placement)}
    per_node = placement.gpus_per_node or config.trainer.cpu_ranks_per_node
    kind = "GPUs" if placement.gpus_per_node else "CPU ranks"
    lines = [f"cluster: {placement.nnodes} node(s) x {per_node} {kind}"]
    lines += _placement_lines(placement)
    node_text, summary["nodes"] = _node_lines(config)
    lines += node_text
    arch = architecture_of(config)
    if arch is None:
        lines.append(
            "memory: no model.architecture and no hf_model_path/config.json: not estimated"
        )
        return "\n".join(lines), summary
    memory = estimate_memory(config, arch, placement)
    summary["memory_gib"] = {
        k: v / GIB for k, v in dataclasses.asdict(memory).items() if not k.startswith("params")
    }
    summary["memory_gib"]["training_total"] = memory.training_total / GIB
    summary["params_total"], summary["params_per_gpu"] = memory.params_total, memory.params_per_gpu
    lines.append(
        f"model: {_count(memory.params_total)} parameters, {_count(memory.params_per_gpu)} on the "
        "most loaded training GPU"
    )
    lines.append("memory per training GPU (estimate):")
    lines += _memory_lines(config, memory, placement, gpu_memory_gib)
    if placement.colocate and placement.gpus_per_node:
        summary["lifecycle_gib"] = lifecycle_gib(config, memory, gpu_memory_gib)
        lines += _lifecycle_lines(config, memory, gpu_memory_gib)
    return "\n".join(lines), summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Validate a layout and estimate memory per GPU.")
    parser.add_argument("--config", required=True, help="YAML recipe")
    parser.add_argument("--nnodes", type=int, help="nodes (default: trainer.nnodes)")
    parser.add_argument(
        "--gpus-per-node", type=int, help="GPUs per node (default: trainer.gpus_per_node)"
    )
    parser.add_argument("--gpu-memory-gib", type=float, default=80.0, help="memory of one GPU")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    args = parser.parse_args(argv)
    try:
        config = resize_world(
            load_config(args.config, args.overrides), args.nnodes, args.gpus_per_node
        )
        report, summary = describe(config, args.gpu_memory_gib)
    except ConfigError as error:
        print(f"layout rejected: {error}", file=sys.stderr)
        return 1
    print(json.dumps(summary, indent=2) if args.json else f"{args.config}\n{report}\nlayout OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
