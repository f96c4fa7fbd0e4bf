"""A weight-sync bucket assembled straight into the engines' layout, for every TP rank at once.

Each TP rank packs its local shards of the bucket's parameters into one flat buffer; the ranks
exchange those buffers (one ``all_gather_into_tensor``; on CPU, shared-memory names instead,
since the ranks of a TP group share a node); then every rank copies each piece of every shard
once, straight into its place in a flat buffer of HF-named tensors (the buffer the engine beside
it reads). No full Megatron-layout tensor is ever built.

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
from megatron_fipo.rollout.flat_bucket import BucketEntry, FlatBucket, open_shared, share


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


def pack_local(metas: Sequence[Any], shards: dict[str, Any], out: torch.Tensor) -> None:
    """This rank's shards of ``metas``, end to end in ``out`` (1-D)."""
    offset = 0
    for meta in metas:
        tensor = shards[meta.name].tensor
        out[offset : offset + tensor.numel()].view(tensor.shape).copy_(tensor)
        offset += tensor.numel()


def exchange(local: torch.Tensor, group: Any, gathered: torch.Tensor | None) -> list[torch.Tensor]:
    """Every TP rank's packed shards (``local`` of each), in rank order.

    CPU: ``local`` lives in shared memory and only its name travels (the ranks of a TP group
    share a node); the caller must keep every peer's buffer unchanged until all ranks have read
    (a barrier). Otherwise one ``all_gather_into_tensor`` into ``gathered``.
    """
    size = dist.get_world_size(group)
    if local.device.type == "cpu":
        names: list[Any] = [None] * size
        dist.all_gather_object(names, share_tensor(local), group=group)
        return [local if i == dist.get_rank(group) else open_tensor(n) for i, n in enumerate(names)]
    dist.all_gather_into_tensor(gathered, local, group=group)
    return list(gathered.view(size, -1))


def share_tensor(tensor: torch.Tensor) -> str:
    return share(FlatBucket(tensor, ()))


def open_tensor(payload: str) -> torch.Tensor:
    return open_shared(payload).buffer


def assemble(
    adapter: Any,
    metas: Sequence[Any],
    rank_flats: Sequence[torch.Tensor],
    views: dict[str, torch.Tensor],
) -> None:
    """Copy every piece of every rank's shards into the HF tensors ``views`` (by name: slices of
    a flat bucket, or an engine's own weights)."""
    tp_size = len(rank_flats)
    offset = 0
    for meta in metas:
        numel = shard_numel(meta, tp_size)
        if exported(adapter, meta.name):
            pieces = adapter.row_pieces(meta.name)
            for rank, flat in enumerate(rank_flats):
                shard = flat[offset : offset + numel].view(shard_shape(meta, tp_size))
                for segment in shard_segments(meta, rank, tp_size):
                    _copy_segment(views, pieces, shard, segment)
        offset += numel


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
