"""Distributed checkpoints of the actor, and the parameter-shard view used by weight sync.

Format (a directory written with ``megatron.core.dist_checkpointing``, ``torch_dist`` backend):

- the Megatron sharded tensors of every model chunk under ``model0``, ``model1``, ... (one per
  virtual pipeline stage); tensor keys carry global layer numbers, so a checkpoint saved under
  one TP / PP layout loads under any other;
- for actor checkpoints also ``optimizer`` and ``scheduler``. The distributed optimizer's
  state is saved ``dp_reshardable`` (default: each rank writes its own buffers, no
  communication; reloadable under another DP size, same TP / PP) or ``fully_reshardable``
  (each DP group gathers its state into per-parameter tensors first; reloadable under any
  TP / PP / DP), chosen by ``trainer.optimizer_checkpoint_format`` (the actor's
  ``optimizer_checkpoint_format``);
- beside them ``config.json`` (the Hugging Face model config) and ``fipo_checkpoint.json``
  (what was saved: parallel layout, step, caller metadata).

Saving starts a spawn-context manager inside megatron-core: the calling script needs an
``if __name__ == "__main__":`` guard.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from megatron_fipo.megatron.model import unwrap

CHECKPOINT_META = "fipo_checkpoint.json"
HF_CONFIG = "config.json"
_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.")


@dataclass(frozen=True)
class ParamShard:
    """One parameter as held by this rank.

    ``name``: Megatron name with the GLOBAL layer number (``decoder.layers.17.mlp.linear_fc1
    .weight``); ``tensor``: the local shard (the live parameter, do not modify; a bf16 copy
    of an FP8 one); ``tensor_parallel``: split over TP ranks, along ``partition_dim`` (0 =
    output rows for column-parallel layers, vocab rows for embedding / output layer; 1 =
    input columns for row-parallel layers); ``partition_stride``: Megatron's stride (1 for every dense layer
    here); ``gated``: a SwiGLU ``linear_fc1`` whose local rows are ``[gate_r; up_r]``, so the
    full weight is ``[gate_0 .. gate_{TP-1}; up_0 .. up_{TP-1}]`` rather than a plain
    concatenation; ``tp_rank`` / ``tp_size``: where the shard sits.
    Fused ``linear_qkv`` rows are grouped per KV head: ``[q (heads/groups rows) , k, v]`` per
    group, groups split evenly over TP, so a plain dim-0 concatenation rebuilds it.
    """

    name: str
    tensor: torch.Tensor
    tensor_parallel: bool
    partition_dim: int | None
    partition_stride: int
    gated: bool
    tp_rank: int
    tp_size: int


def _global_name(model, name: str) -> str:
    match = _LAYER.match(name)
    if not match:
        return name
    layer = model.decoder.layers[int(match.group(1))]
    return f"decoder.layers.{layer.layer_number - 1}." + name[match.end() :]


def iter_param_shards(model_chunks: list, main_grad: bool = False) -> Iterator[ParamShard]:
    """This rank's :class:`ParamShard` s over all its model chunks (``main_grad``: each
    parameter's DDP gradient buffer instead of its value).

    Every parameter appears on exactly one PP stage, except that with tied embeddings the last
    stage's copy of the embedding (``output_layer.weight``) is skipped: the first stage's
    ``embedding.word_embeddings.weight`` is the one to sync. Padded vocab rows are included
    (the vocab is padded to a multiple of 128 * TP; the caller trims to the HF vocab size).
    """
    from megatron.core import parallel_state

    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    for chunk in model_chunks:
        model = unwrap(chunk)
        gated = model.config.gated_linear_unit
        for name, param in model.named_parameters():
            if name == "output_layer.weight" and model.share_embeddings_and_output_weights:
                continue
            is_tp = bool(getattr(param, "tensor_model_parallel", False))
            yield ParamShard(
                name=_global_name(model, name),
                tensor=param.main_grad.detach() if main_grad else exportable(param),
                tensor_parallel=is_tp,
                partition_dim=getattr(param, "partition_dim", None) if is_tp else None,
                partition_stride=int(getattr(param, "partition_stride", 1)),
                gated=gated and name.endswith("mlp.linear_fc1.weight"),
                tp_rank=tp_rank,
                tp_size=tp_size,
            )


def exportable(param: torch.Tensor) -> torch.Tensor:
    """A parameter as a plain tensor for weight sync: FP8 weights (TE, ``model.fp8_param``)
    are dequantized to their nominal dtype (bf16), which engines and HF tensors expect; other
    parameters are the live tensor itself (detached)."""
    from megatron.core.fp8_utils import dequantize_fp8_tensor, is_float8tensor

    if is_float8tensor(param):
        return dequantize_fp8_tensor(param.detach()).to(torch.bfloat16)
    return param.detach()


def model_sharded_state_dict(model_chunks: list) -> dict[str, Any]:
    """``{"model0": ..., "model1": ...}``: Megatron sharded state dicts of the chunks."""
    return {
        f"model{index}": unwrap(chunk).sharded_state_dict(prefix="")
        for index, chunk in enumerate(model_chunks)
    }


def _hf_config_dict(hf_config: Any) -> dict:
    return dict(hf_config) if isinstance(hf_config, dict) else hf_config.to_dict()


def _write_metadata(path: str, hf_config: Any, metadata: dict) -> None:
    if dist.get_rank() != 0:
        return
    if hf_config is not None:
        with open(os.path.join(path, HF_CONFIG), "w") as handle:
            json.dump(_hf_config_dict(hf_config), handle, indent=2, default=str)
    with open(os.path.join(path, CHECKPOINT_META), "w") as handle:
        json.dump(metadata, handle, indent=2, default=str)


def _prepare_dir(path: str) -> None:
    if dist.get_rank() == 0:
        os.makedirs(path, exist_ok=True)
    dist.barrier()


def _layout() -> dict[str, int]:
    from megatron.core import parallel_state as ps

    return {
        "tensor_parallel": ps.get_tensor_model_parallel_world_size(),
        "pipeline_parallel": ps.get_pipeline_model_parallel_world_size(),
        "context_parallel": ps.get_context_parallel_world_size(),
        "data_parallel": ps.get_data_parallel_world_size(),
    }


def save_model_checkpoint(
    model_chunks: list, path: str, hf_config: Any = None, extra_metadata: dict | None = None
) -> None:
    """Saves the model weights only (all ranks call it); ``hf_config`` goes to ``config.json``."""
    from megatron.core import dist_checkpointing

    _prepare_dir(path)
    dist_checkpointing.save(model_sharded_state_dict(model_chunks), path)
    _write_metadata(
        path, hf_config, {"kind": "model", "layout": _layout(), **(extra_metadata or {})}
    )
    dist.barrier()


@torch.no_grad()
def load_model_checkpoint(model_chunks: list, path: str) -> None:
    """Loads weights saved by :func:`save_model_checkpoint` or :func:`save_actor_checkpoint`
    into ``model_chunks`` (any TP / PP layout; the architecture must match)."""
    from megatron.core import dist_checkpointing

    if not os.path.isdir(path):
        raise FileNotFoundError(f"no checkpoint directory at {path}")
    state = dist_checkpointing.load(model_sharded_state_dict(model_chunks), path)
    for index, chunk in enumerate(model_chunks):
        unwrap(chunk).load_state_dict(state[f"model{index}"], strict=True)


OPTIMIZER_FORMATS = ("dp_reshardable", "fully_reshardable")


def save_actor_checkpoint(actor, path: str, extra_metadata: dict | None = None) -> None:
    """Model + optimizer + LR scheduler of a :class:`~megatron_fipo.megatron.actor.MegatronActor`."""
    from megatron.core import dist_checkpointing

    _prepare_dir(path)
    optimizer_format = actor.optimizer_checkpoint_format
    state = model_sharded_state_dict(actor.model)
    state["optimizer"] = actor.optimizer.sharded_state_dict(
        state, is_loading=False, metadata={"distrib_optim_sharding_type": optimizer_format}
    )
    state["scheduler"] = actor.scheduler.state_dict()
    state["num_steps"] = actor.num_steps
    dist_checkpointing.save(state, path)
    meta = {
        "kind": "actor",
        "layout": _layout(),
        "num_steps": actor.num_steps,
        "optimizer_format": optimizer_format,
        "distributed_optimizer": actor.parallelism.use_distributed_optimizer,
    }
    _write_metadata(path, actor.hf_config, {**meta, **(extra_metadata or {})})
    dist.barrier()


def _saved_optimizer_format(path: str) -> str:
    """The optimizer format an actor checkpoint was saved with; ValueError when its layout
    cannot be reloaded under the current one."""
    meta_path = os.path.join(path, CHECKPOINT_META)
    meta = {}
    if os.path.isfile(meta_path):
        with open(meta_path) as handle:
            meta = json.load(handle)
    saved = meta.get("optimizer_format", "dp_reshardable")  # checkpoints before the option
    if saved not in OPTIMIZER_FORMATS:
        raise ValueError(f"{meta_path}: unknown optimizer_format {saved!r}")
    layout, now = meta.get("layout") or {}, _layout()
    changed = [
        f"{key} {layout[key]} -> {now[key]}"
        for key in ("tensor_parallel", "pipeline_parallel")
        if key in layout and layout[key] != now[key]
    ]
    # Without the distributed optimizer the state is per parameter: reshardable either way.
    if saved == "dp_reshardable" and meta.get("distributed_optimizer", True) and changed:
        raise ValueError(
            f"the optimizer state in {path} was saved dp_reshardable, which reloads only under "
            f"the same TP / PP ({', '.join(changed)}). Resume with the saving layout, load the "
            "weights only (load_optimizer=False), or save with "
            "optimizer_checkpoint_format='fully_reshardable'"
        )
    return saved


def _materialise_optimizer_state(optimizer) -> None:
    """Creates the Adam moments of a fresh optimizer (a zero-gradient step at lr 0): Megatron
    builds the load template from the existing state, and the load then overwrites it."""
    for inner in getattr(optimizer, "chained_optimizers", [optimizer]):
        torch_optimizer = inner.optimizer
        if torch_optimizer.state:
            continue
        rates = [group["lr"] for group in torch_optimizer.param_groups]
        for group in torch_optimizer.param_groups:
            group["lr"] = 0.0
            for param in group["params"]:
                param.grad = torch.zeros_like(param)
        torch_optimizer.step()
        for group, rate in zip(torch_optimizer.param_groups, rates):
            group["lr"] = rate
        torch_optimizer.zero_grad(set_to_none=True)


def _unshare_step_counters(optimizer) -> None:
    """After a load, Megatron hands every parameter's Adam state the SAME ``step`` tensor;
    torch's Adam increments it in place once per parameter, which would inflate the step
    (and the bias correction) by the number of parameters. Give each its own copy."""
    for inner in getattr(optimizer, "chained_optimizers", [optimizer]):
        for state in inner.optimizer.state.values():
            if isinstance(state.get("step"), torch.Tensor):
                state["step"] = state["step"].clone()


@contextlib.contextmanager
def _keep_torch_adam_steps(optimizer):
    """megatron-core 0.16.1 restores a ``fully_reshardable`` state by copying every key of a
    parameter's optimizer state from the loaded tensors, but leaves torch Adam's per-parameter
    ``step`` out of those tensors (it restores it from the param groups instead), so without
    TE / Apex Adam the load fails with ``KeyError: 'step'``. For the length of the load, hand
    it each parameter's current (already restored) ``step``."""
    patched = []
    for inner in getattr(optimizer, "chained_optimizers", [optimizer]):
        setter = getattr(inner, "_set_main_param_and_optimizer_states", None)
        index_map = getattr(inner, "model_param_group_index_map", None)
        if setter is None or index_map is None:
            continue

        def with_step(model_param, tensors, inner=inner, setter=setter, index_map=index_map):
            group, order = index_map[model_param]
            state = inner.optimizer.state.get(inner.optimizer.param_groups[group]["params"][order])
            if state and "step" in state and "step" not in tensors:
                tensors = {**tensors, "step": state["step"]}
            setter(model_param, tensors)

        inner._set_main_param_and_optimizer_states = with_step
        patched.append(inner)
    try:
        yield
    finally:
        for inner in patched:
            del inner._set_main_param_and_optimizer_states  # back to the class's method


@torch.no_grad()  # the optimizer copies into views of parameters that require grad
def load_actor_checkpoint(actor, path: str, *, load_optimizer: bool = True) -> None:
    """Restores what :func:`save_actor_checkpoint` wrote, in the format it was saved with.
    A ``dp_reshardable`` optimizer state needs the saving run's TP / PP layout (DP may
    differ), a ``fully_reshardable`` one loads under any; ``load_optimizer=False`` takes the
    weights only."""
    from megatron.core import dist_checkpointing

    if not os.path.isdir(path):
        raise FileNotFoundError(f"no checkpoint directory at {path}")
    if not load_optimizer:
        load_model_checkpoint(actor.model, path)
        actor.optimizer.reload_model_params()
        return
    optimizer_format = _saved_optimizer_format(path)
    _materialise_optimizer_state(actor.optimizer)
    state = model_sharded_state_dict(actor.model)
    state["optimizer"] = actor.optimizer.sharded_state_dict(
        state, is_loading=True, metadata={"distrib_optim_sharding_type": optimizer_format}
    )
    state["scheduler"] = None
    state["num_steps"] = None
    loaded = dist_checkpointing.load(state, path)
    for index, chunk in enumerate(actor.model):
        unwrap(chunk).load_state_dict(loaded[f"model{index}"], strict=True)
    with _keep_torch_adam_steps(actor.optimizer):
        actor.optimizer.load_state_dict(loaded["optimizer"])
    _unshare_step_counters(actor.optimizer)
    actor.scheduler.load_state_dict(loaded["scheduler"])
    actor.num_steps = int(loaded["num_steps"])


VOCAB_PARALLEL_PARAMS = ("embedding.word_embeddings.weight", "output_layer.weight")


def gather_full_parameters(
    model_chunks: list, dst: int = 0, vocab_size: int | None = None, main_grad: bool = False
) -> dict[str, torch.Tensor] | None:
    """Full (unsharded, fp32) parameters by global Megatron name, on rank ``dst`` only.

    ``vocab_size``: trim the padded vocab rows of :data:`VOCAB_PARALLEL_PARAMS` to it.
    ``main_grad``: gather the DDP gradient buffers instead (read-only; for checks). After a
    step they hold the reduced gradient the optimizer used, whole on every rank only when
    data_parallel is 1 or the distributed optimizer is off (else each DP rank's shard).

    All ranks must call it. TP shards are all-gathered inside each TP group (SwiGLU
    ``linear_fc1`` as ``[gate; up]``), then one rank per pipeline stage sends its tensors to
    ``dst``. Meant for checks and small models: everything passes through ``dst``'s memory.
    """
    from megatron.core import parallel_state as ps

    group = ps.get_tensor_model_parallel_group()
    local = {}
    for shard in iter_param_shards(model_chunks, main_grad=main_grad):
        tensor = shard.tensor.float().contiguous()
        if shard.tensor_parallel and shard.tp_size > 1:
            pieces = [torch.empty_like(tensor) for _ in range(shard.tp_size)]
            dist.all_gather(pieces, tensor, group=group)
            if shard.gated:
                halves = [piece.chunk(2, dim=0) for piece in pieces]
                pieces = [half[0] for half in halves] + [half[1] for half in halves]
            tensor = torch.cat(pieces, dim=shard.partition_dim)
        if vocab_size is not None and shard.name in VOCAB_PARALLEL_PARAMS:
            tensor = tensor[:vocab_size]
        local[shard.name] = tensor
    sender = (
        ps.get_tensor_model_parallel_rank() == 0
        and ps.get_data_parallel_rank() == 0
        and ps.get_context_parallel_rank() == 0
    )
    gathered = [None] * dist.get_world_size() if dist.get_rank() == dst else None
    dist.gather_object(local if sender else {}, gathered, dst=dst)
    if gathered is None:
        return None
    return {name: tensor for part in gathered for name, tensor in part.items()}
