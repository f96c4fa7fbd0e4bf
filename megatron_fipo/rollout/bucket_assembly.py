"""A weight-sync bucket assembled straight into the engines' layout, for every TP rank at once.

The TP ranks of a stage exchange their shards of the bucket's parameters: on GPU one
``all_gather_into_tensor`` of each rank's packed shards; on CPU (a TP group shares a node) only
references to the live parameters, kept in named shared memory, so a peer reads them in place.
Every rank then copies each piece of every shard once, straight into its place in the HF
tensors (a flat bucket, or the weights of the engine beside it). No full Megatron-layout tensor
is ever built.

The pieces compose two layouts:

- Megatron's TP split (:func:`shard_segments`): dim-0 blocks for column-parallel layers, the
  fused QKV and the vocab; a SwiGLU ``linear_fc1`` shard is a gate block and an up block; dim-1
  column blocks for row-parallel layers (``linear_proj``, ``linear_fc2``);
- the adapter's row pieces of the full tensor (``Adapter.row_pieces``): QKV rows un-interleaved
  into q, k and v, fc1 into gate and up, vocab padding rows dropped.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist

from checkpoint_convert.adapters import OUTPUT, split_layer_name
from megatron_fipo.rollout.flat_bucket import BucketEntry


def exported(adapter: Any, megatron_name: str) -> bool:
    """Whether the tensor has an HF counterpart (a tied output layer has none)."""
    return not (split_layer_name(megatron_name)[1] == OUTPUT and adapter.dims.tie_embeddings)


def hf_entries(adapter: Any, metas: Sequence[Any]) -> tuple[BucketEntry, ...]:
    """The HF tensors of a bucket of Megatron parameters, laid end to end."""
    shapes = adapter.hf_shapes()
    entries, offset = [], 0
    for meta in metas:
        if not exported(adapter, meta.name):
            continue
        for name in adapter.hf_sources(meta.name):
            entry = BucketEntry(name, tuple(shapes[name]), offset)
            entries.append(entry)
            offset += entry.numel
    return tuple(entries)


def shard_numel(meta: Any, tp_size: int) -> int:
    return meta.numel // tp_size if meta.tensor_parallel else meta.numel


def shard_shape(meta: Any, tp_size: int) -> tuple[int, ...]:
    shape = list(meta.shape)
    if meta.tensor_parallel:
        shape[meta.partition_dim] //= tp_size
    return tuple(shape)


def shard_segments(meta: Any, rank: int, tp_size: int) -> list[tuple[int, int, int, int]]:
    """Where TP rank ``rank``'s shard lies in the full tensor: ``(dim, full_start, length,
    shard_start)`` blocks along ``dim``. Replicated tensors: rank 0's copy, whole."""
    if not meta.tensor_parallel:
        return [(0, 0, meta.shape[0], 0)] if rank == 0 else []
    if meta.partition_dim == 1:
        columns = meta.shape[1] // tp_size
        return [(1, rank * columns, columns, 0)]
    if meta.gated:  # [gate_0 .. gate_{TP-1}; up_0 .. up_{TP-1}]; the shard is [gate_r; up_r]
        half = meta.shape[0] // 2
        rows = half // tp_size
        return [(0, rank * rows, rows, 0), (0, half + rank * rows, rows, rows)]
    rows = meta.shape[0] // tp_size
    return [(0, rank * rows, rows, 0)]


def shared_shards(
    metas: Sequence[Any], shards: dict[str, Any], group: Any, mapped: dict[str, dict]
) -> list[dict]:
    """CPU: every TP rank's shards of ``metas`` (``{name: tensor}`` per rank, rank order), read
    in place. Each rank's parameters live in named shared memory (moved there the first time:
    views stay valid) and only references travel; a peer maps them once and keeps the mapping
    while the storage stays. The parameters must not change until every rank has read them
    (the caller's barrier). ``mapped``: the peers' opened payloads, kept between calls (a
    payload names the same storage for as long as it exists; reopening it would fault every
    page in again)."""
    from megatron_fipo.rollout.flat_bucket import open_named, serialize_named

    local = {meta.name: shards[meta.name].tensor.detach() for meta in metas}
    for tensor in local.values():
        if not tensor.is_shared():
            tensor.share_memory_()
    size, rank = dist.get_world_size(group), dist.get_rank(group)
    payloads: list[Any] = [None] * size
    dist.all_gather_object(payloads, serialize_named(list(local.items())), group=group)
    out = []
    for peer, payload in enumerate(payloads):
        if peer == rank:
            out.append(local)
            continue
        if payload not in mapped:
            if len(mapped) > 256:  # storages that changed leave stale entries: start afresh
                mapped.clear()
            mapped[payload] = dict(open_named(payload))
        out.append(mapped[payload])
    return out


def gathered_shards(
    metas: Sequence[Any], shards: dict[str, Any], group: Any, local: torch.Tensor, out: torch.Tensor
) -> list[dict]:
    """Every TP rank's shards of ``metas`` by one ``all_gather_into_tensor`` (GPU): this rank's
    packed into ``local``, everyone's into ``out`` (``TP x`` its size)."""
    size = dist.get_world_size(group)
    offset = 0
    for meta in metas:
        tensor = shards[meta.name].tensor
        local[offset : offset + tensor.numel()].view(tensor.shape).copy_(tensor)
        offset += tensor.numel()
    dist.all_gather_into_tensor(out, local, group=group)
    per_rank = []
    for flat in out.view(size, -1):
        views, offset = {}, 0
        for meta in metas:
            numel = shard_numel(meta, size)
            views[meta.name] = flat[offset : offset + numel].view(shard_shape(meta, size))
            offset += numel
        per_rank.append(views)
    return per_rank


def assemble(
    adapter: Any,
    metas: Sequence[Any],
    rank_shards: Sequence[dict[str, torch.Tensor]],
    views: dict[str, torch.Tensor],
) -> None:
    """Copy every piece of every rank's shards (``{name: shard}`` per TP rank, rank order) into
    the HF tensors ``views`` (by name: slices of a flat bucket, or an engine's own weights)."""
    tp_size = len(rank_shards)
    for meta in metas:
        if not exported(adapter, meta.name):
            continue
        pieces = adapter.row_pieces(meta.name)
        for rank, shards in enumerate(rank_shards):
            for segment in shard_segments(meta, rank, tp_size):
                _copy_segment(views, pieces, shards[meta.name], segment)


def _copy_segment(views: dict, pieces: list, shard: torch.Tensor, segment: tuple) -> None:
    dim, start, length, shard_start = segment
    if dim == 1:  # a column block of a row-parallel weight; its HF tensor keeps the layout
        (piece,) = pieces
        views[piece.hf_name][:, start : start + length].copy_(shard)
        return
    for piece in pieces:
        low = max(piece.megatron_row, start)
        high = min(piece.megatron_row + piece.num_rows, start + length)
        if low >= high:
            continue
        destination = piece.hf_row + low - piece.megatron_row
        source = shard_start + low - start
        views[piece.hf_name][destination : destination + high - low].copy_(
            shard[source : source + high - low]
        )
