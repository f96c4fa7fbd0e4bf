"""Context-parallel future-KL scan: ``F_t = sum_{k>=t} gamma^(k-t) x_k`` over whole sequences
whose tokens are spread over the CP ranks in the zigzag layout of
:mod:`megatron_fipo.megatron.context_parallel`.

Each sequence is ``2 * CP`` chunks; rank ``r`` holds chunks ``r`` and ``2 * CP - 1 - r``.

1. Every rank scans each of its chunks on its own with the foundation's
   :func:`~megatron_fipo.algorithms.future_kl.discounted_future_sum` (all chunks of all
   sequences in one batched call); column 0 of a chunk's scan is its decayed total.
2. The ranks all-gather only those totals: ``2`` numbers per sequence per rank, so
   ``O(2 * CP)`` numbers per sequence in all, instead of the sequence itself.
3. Every rank orders the ``2 * CP`` totals of each sequence left to right, turns them into
   the carry entering each chunk from its right
   (:func:`~megatron_fipo.algorithms.future_kl.right_carries`) and adds the carries of its own
   two chunks (:func:`~megatron_fipo.algorithms.future_kl.add_right_carry`).

The result equals the single-rank scan of each whole (padded) sequence; chunks of different
sequences of a packed row are never combined. No autograd: FIPO detaches the scan input
(the influence weight carries no gradient), so :func:`cp_future_sum` refuses an ``x`` that
requires grad rather than silently dropping its gradient.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist

from megatron_fipo.algorithms.future_kl import (
    add_right_carry,
    discounted_future_sum,
    right_carries,
)
from megatron_fipo.megatron.context_parallel import SequenceLayout


@dataclass(frozen=True)
class ChunkIndex:
    """The local chunks of a layout as rows of one right-aligned ``[2N, width]`` matrix.

    Row ``2 * i + slot`` is this rank's ``slot``-th chunk of sequence ``i`` (slot 0 = chunk
    ``r``, slot 1 = chunk ``2 * CP - 1 - r``); ``width`` is the longest chunk. Chunks are
    aligned to the right end of their row so that :func:`add_right_carry`'s decay
    ``gamma^(width - t)`` is the right one for a shorter chunk too; the zeros on their left
    change nothing to their right. In both layouts the local tokens are exactly these chunks
    back to back, so with equal chunk lengths (always when unpacked) the matrix is a view.
    """

    slots: torch.Tensor
    """``[num_local_tokens]`` int64: where local token ``j`` sits in the flattened matrix."""
    width: int
    """Columns of the matrix (the longest chunk)."""
    first_column: torch.Tensor
    """``[2N]`` int64 column of each chunk's first token (its decayed total in a scan)."""
    chunk_lengths: torch.Tensor
    """``[N]`` int64 chunk length of each sequence."""

    @property
    def uniform(self) -> bool:
        """All chunks have the same length: the matrix is a reshape of the local tensor."""
        return int(self.first_column.max()) == 0

    @classmethod
    def from_layout(cls, layout: SequenceLayout) -> ChunkIndex:
        chunk = torch.tensor(layout.chunk_lengths, dtype=torch.int64)
        seg_lengths = chunk.repeat_interleave(2)  # [2N]
        width = int(seg_lengths.max())
        first_column = width - seg_lengths
        segment = torch.repeat_interleave(torch.arange(seg_lengths.numel()), seg_lengths)
        seg_start = torch.cumsum(seg_lengths, 0) - seg_lengths
        within = torch.arange(segment.numel()) - seg_start[segment]
        slots = segment * width + first_column[segment] + within
        return cls(slots, width, first_column, chunk)


def local_chunk_scan(
    x: torch.Tensor, index: ChunkIndex, gamma: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Step 1: scan every local chunk on its own.

    Args:
        x: ``[num_rows, local_length]`` local scan input.

    Returns:
        ``(scan, totals)``: ``scan`` ``[2N, width]`` right-aligned chunk scans, ``totals``
        ``[N, 2]`` the decayed total of each local chunk (slot order).
    """
    rows = index.first_column.numel()
    if index.uniform:
        chunks = x.reshape(rows, index.width)
    else:
        chunks = x.new_zeros(rows * index.width)
        chunks.index_copy_(0, index.slots.to(x.device), x.reshape(-1))
        chunks = chunks.view(rows, index.width)
    scan = discounted_future_sum(chunks, gamma)
    row_ids = torch.arange(rows, device=x.device)
    totals = scan[row_ids, index.first_column.to(x.device)]
    return scan, totals.view(-1, 2)


def own_carries(
    all_totals: torch.Tensor, index: ChunkIndex, cp_rank: int, gamma: float
) -> torch.Tensor:
    """Step 3a: the carries entering this rank's chunks.

    Args:
        all_totals: ``[CP, N, 2]`` every rank's local totals (rank order).

    Returns:
        ``[N, 2]`` carry entering each local chunk from its right (slot order).
    """
    cp_size = all_totals.shape[0]
    ranks = torch.arange(cp_size, device=all_totals.device)
    ordered = all_totals.new_empty((all_totals.shape[1], 2 * cp_size))  # [N, 2CP] left to right
    ordered[:, ranks] = all_totals[:, :, 0].T
    ordered[:, 2 * cp_size - 1 - ranks] = all_totals[:, :, 1].T
    lengths = index.chunk_lengths.to(all_totals.device).unsqueeze(1).expand_as(ordered)
    carries = right_carries(ordered, lengths, gamma)
    return carries[:, [cp_rank, 2 * cp_size - 1 - cp_rank]]


def apply_carries(
    scan: torch.Tensor, carries: torch.Tensor, index: ChunkIndex, like: torch.Tensor, gamma: float
) -> torch.Tensor:
    """Step 3b: add each chunk's carry; return the chunks in ``like``'s local shape."""
    full = add_right_carry(scan, carries.reshape(-1), gamma)
    if index.uniform:
        return full.reshape(like.shape)
    return full.reshape(-1).index_select(0, index.slots.to(scan.device)).view(like.shape)


def cp_future_sum(
    x: torch.Tensor,
    gamma: float,
    layout: SequenceLayout,
    group: dist.ProcessGroup | None = None,
    index: ChunkIndex | None = None,
) -> torch.Tensor:
    """Discounted future sum of whole sequences from this rank's zigzag chunks.

    Args:
        x: ``[num_rows, local_length]`` local scan input in ``layout`` (fp32 or fp64, no grad).
        gamma: discount in ``(0, 1]``.
        layout: this rank's layout; ``group`` is its CP group (None with ``cp_size == 1``).
        index: ``ChunkIndex.from_layout(layout)``, when the caller already has it.

    Returns:
        ``[num_rows, local_length]``: ``F`` of each local token over its whole sequence.
    """
    if x.shape != (layout.num_rows, layout.local_length):
        raise ValueError(
            f"x must be [{layout.num_rows}, {layout.local_length}] for this layout, "
            f"got {tuple(x.shape)}"
        )
    if x.requires_grad:
        raise ValueError("cp_future_sum has no backward: pass a detached x")
    index = index or ChunkIndex.from_layout(layout)
    scan, totals = local_chunk_scan(x, index, gamma)
    if layout.cp_size > 1:
        gathered = totals.new_empty((layout.cp_size * totals.shape[0], 2))
        dist.all_gather_single(gathered, totals.contiguous(), group=group)
        all_totals = gathered.view(layout.cp_size, -1, 2)
    else:
        all_totals = totals.unsqueeze(0)
    carries = own_carries(all_totals, index, layout.cp_rank, gamma)
    return apply_carries(scan, carries, index, x, gamma)


def make_cp_future_sum(
    layout: SequenceLayout, group: dist.ProcessGroup | None = None
) -> Callable[[torch.Tensor, float], torch.Tensor]:
    """``future_sum_fn`` for :func:`megatron_fipo.algorithms.losses.compute_policy_loss`:
    ``(x[num_rows, local_length], gamma) -> F`` over whole sequences under ``layout``."""
    index = ChunkIndex.from_layout(layout)

    def future_sum(x: torch.Tensor, gamma: float) -> torch.Tensor:
        return cp_future_sum(x, gamma, layout, group, index)

    return future_sum


@dataclass(frozen=True)
class ExchangeBytes:
    """Bytes each CP rank receives for one scan."""

    scan: int
    """Our scan: the other ranks' per-chunk totals."""
    full_gather: int
    """All-gather-then-scan: the other ranks' whole local sequences."""

    @property
    def ratio(self) -> float:
        """``full_gather / scan`` (how many times less our scan moves)."""
        return self.full_gather / self.scan if self.scan else float("inf")


def exchange_bytes(layout: SequenceLayout, dtype: torch.dtype = torch.float32) -> ExchangeBytes:
    """Bytes received per rank by :func:`cp_future_sum` vs gathering the full sequences."""
    item = torch.empty((), dtype=dtype).element_size()
    others = layout.cp_size - 1
    return ExchangeBytes(
        scan=others * 2 * layout.num_sequences * item,
        full_gather=others * layout.num_rows * layout.local_length * item,
    )


def make_cp_sequence_sum(
    layout: SequenceLayout, group: dist.ProcessGroup | None = None
) -> Callable[[torch.Tensor], torch.Tensor]:
    """``sequence_sum_fn`` for :func:`compute_policy_loss`: ``values[num_rows, local_length]``
    -> each token's value replaced by the sum over its whole sequence, across the CP group
    (FIPO's sequence drop counts offending tokens over the whole response). Exchanges one
    number per sequence."""
    sequence_index = layout.sequence_index

    def sequence_sum(values: torch.Tensor) -> torch.Tensor:
        index = sequence_index.to(values.device)
        totals = values.new_zeros(layout.num_sequences)
        totals.index_add_(0, index.reshape(-1), values.reshape(-1))
        if group is not None and dist.get_world_size(group) > 1:
            dist.all_reduce(totals, group=group)
        return totals[index]

    return sequence_sum
