"""Context-parallel sequence layout: zigzag split of packed or padded sequences over CP ranks.

Each sequence ``i`` (prompt + response, true length ``len_i``) is padded at its end to
``P_i``, a multiple of ``2 * CP * TP``, and cut into ``2 * CP`` equal chunks. Rank ``r`` holds
chunks ``r`` and ``2 * CP - 1 - r`` (in that order): under causal attention the early chunks
are cheap and the late ones expensive, so pairing them balances the work across ranks. This
is the order megatron-core's RoPE assumes for context parallelism, so its rotary embeddings
line up with our tokens without any position side channel.

Two layouts of the local tokens, both supported everywhere (split, gather, attention, scan):

* ``packed=False`` ("bshd"): one row per sequence, every sequence padded to one common
  ``P = roundup(max_i len_i)``; local tensors are ``[B, P / CP]``. Simple, what the
  per-sequence loss expects, but ragged batches waste ``P - len_i`` tokens per row.
* ``packed=True`` ("thd"): one row holding every sequence's local chunks back to back;
  local tensors are ``[1, sum_i P_i / CP]``, and the model gets a ``PackedSeqParams`` whose
  ``cu_seqlens_*_padded`` carry the (global, padded) sequence boundaries. Only the per-sequence
  round-up to ``2 * CP * TP`` is wasted, which is what long, ragged RL responses need.

Inputs, next-token targets and masks are built on the FULL sequence before the split, so a
target that lives in the next chunk (on another rank) is still the right token. Everything
the model computes per local token at global position ``p`` predicts token ``p + 1``: local
tensors are "label aligned"; :func:`gather_to_global` can shift them back to the token
alignment of the caller's ``[B, T]`` batch.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist


def padded_length(length: int, cp_size: int, tp_size: int = 1) -> int:
    """``length`` rounded up to a multiple of ``2 * cp_size * tp_size``."""
    multiple = 2 * cp_size * tp_size
    return -(-length // multiple) * multiple


def zigzag_positions(local_length: int, cp_size: int, cp_rank: int) -> torch.Tensor:
    """Global positions ``[local_length]`` of one sequence's tokens held by ``cp_rank``.

    The sequence has ``cp_size * local_length`` tokens; the rank holds chunk ``cp_rank`` then
    chunk ``2 * cp_size - 1 - cp_rank`` (each ``local_length / 2`` long).
    """
    if cp_size == 1:
        return torch.arange(local_length)
    if local_length % 2:
        raise ValueError(
            f"a context-parallel rank must hold an even number of tokens per sequence "
            f"(two chunks), got {local_length}"
        )
    chunk = local_length // 2
    first = cp_rank * chunk + torch.arange(chunk)
    second = (2 * cp_size - 1 - cp_rank) * chunk + torch.arange(chunk)
    return torch.cat([first, second])


def packed_token_map(
    padded_lengths: Sequence[int], cp_size: int, cp_rank: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequence index and global position of each token of a packed local row.

    Args:
        padded_lengths: global padded length ``P_i`` of each packed sequence (multiples of
            ``2 * cp_size``).

    Returns:
        ``(sequence_index, positions)``, both ``[sum_i P_i / cp_size]`` int64.
    """
    sequence_parts, position_parts = [], []
    for index, length in enumerate(padded_lengths):
        if length % (2 * cp_size):
            raise ValueError(
                f"packed sequence {index} has padded length {length}, not a multiple of "
                f"2 * cp_size = {2 * cp_size}"
            )
        local = length // cp_size
        position_parts.append(zigzag_positions(local, cp_size, cp_rank))
        sequence_parts.append(torch.full((local,), index, dtype=torch.int64))
    return torch.cat(sequence_parts), torch.cat(position_parts)


@dataclass(frozen=True)
class SequenceLayout:
    """Where each local token of one CP rank comes from.

    Local tensors have shape ``[num_rows, local_length]``: ``num_rows = 1`` when packed,
    else the number of sequences. ``sequence_index[row, j]`` and ``positions[row, j]`` name
    the sequence and the global position (0-based, within the sequence) of local token
    ``(row, j)``; positions ``>= lengths[i]`` are padding.
    """

    lengths: tuple[int, ...]
    """True length (prompt + response tokens) of each sequence."""
    padded_lengths: tuple[int, ...]
    """Global padded length of each sequence (a multiple of ``2 * cp_size``)."""
    cp_size: int
    """Context-parallel world size."""
    cp_rank: int
    """This rank's index in the context-parallel group."""
    packed: bool
    """True: all sequences in one row ("thd"); False: one padded row per sequence ("bshd")."""

    def __post_init__(self) -> None:
        if not self.lengths:
            raise ValueError("lengths must name at least one sequence")
        if len(self.padded_lengths) != len(self.lengths):
            raise ValueError("padded_lengths must have one entry per sequence")
        if self.cp_size < 1 or not 0 <= self.cp_rank < self.cp_size:
            raise ValueError(f"cp_rank {self.cp_rank} is not in a CP group of {self.cp_size}")
        for index, (length, padded) in enumerate(zip(self.lengths, self.padded_lengths)):
            if length < 1 or padded < length or padded % (2 * self.cp_size):
                raise ValueError(
                    f"sequence {index}: length {length} / padded_lengths {padded} must satisfy "
                    f"1 <= length <= padded and padded % {2 * self.cp_size} == 0"
                )
        if not self.packed and len(set(self.padded_lengths)) != 1:
            raise ValueError("an unpacked layout needs one common padded length for all rows")

    @property
    def num_sequences(self) -> int:
        return len(self.lengths)

    @property
    def num_rows(self) -> int:
        return 1 if self.packed else self.num_sequences

    @property
    def local_length(self) -> int:
        """Columns of a local tensor (tokens per row on this rank)."""
        if self.packed:
            return sum(self.padded_lengths) // self.cp_size
        return self.padded_lengths[0] // self.cp_size

    @property
    def chunk_lengths(self) -> tuple[int, ...]:
        """Length of each of the ``2 * cp_size`` chunks of each sequence."""
        return tuple(p // (2 * self.cp_size) for p in self.padded_lengths)

    def for_rank(self, cp_rank: int) -> SequenceLayout:
        """The same batch as seen by another rank of the CP group."""
        return dataclasses.replace(self, cp_rank=cp_rank)

    @functools.cached_property
    def token_map(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(sequence_index, positions)``, both ``[num_rows, local_length]`` int64."""
        if self.packed:
            sequence_index, positions = packed_token_map(
                self.padded_lengths, self.cp_size, self.cp_rank
            )
            return sequence_index.unsqueeze(0), positions.unsqueeze(0)
        row = zigzag_positions(self.local_length, self.cp_size, self.cp_rank)
        positions = row.unsqueeze(0).expand(self.num_sequences, -1).contiguous()
        sequence_index = torch.arange(self.num_sequences).unsqueeze(1).expand_as(positions)
        return sequence_index.contiguous(), positions

    @property
    def sequence_index(self) -> torch.Tensor:
        return self.token_map[0]

    @property
    def positions(self) -> torch.Tensor:
        return self.token_map[1]

    @functools.cached_property
    def valid(self) -> torch.Tensor:
        """``[num_rows, local_length]`` bool: the local token is a real (unpadded) token."""
        return self.positions < self._token_lengths

    @functools.cached_property
    def label_valid(self) -> torch.Tensor:
        """``[num_rows, local_length]`` bool: the token has a real next token (its label)."""
        return self.positions + 1 < self._token_lengths

    @property
    def _token_lengths(self) -> torch.Tensor:
        return torch.tensor(self.lengths)[self.sequence_index]

    @functools.cached_property
    def cu_seqlens_padded(self) -> torch.Tensor:
        """``[N + 1]`` int32 cumulative global padded lengths (packed sequence boundaries)."""
        return _cumulative(self.padded_lengths)


def _cumulative(lengths: Sequence[int]) -> torch.Tensor:
    return torch.tensor([0, *lengths], dtype=torch.int64).cumsum(0).to(torch.int32)


def build_layout(
    lengths: Sequence[int] | torch.Tensor,
    cp_size: int,
    cp_rank: int,
    *,
    packed: bool,
    tp_size: int = 1,
) -> SequenceLayout:
    """Layout for sequences of true ``lengths`` on rank ``cp_rank`` of a CP group.

    Each sequence is padded to a multiple of ``2 * cp_size * tp_size`` (TP so that sequence
    parallelism can split the local tokens further); unpacked rows all share the longest one.
    """
    lengths = tuple(int(n) for n in torch.as_tensor(lengths).reshape(-1).tolist())
    if tp_size < 1:
        raise ValueError(f"tp_size must be >= 1, got {tp_size}")
    if any(n < 1 for n in lengths):
        raise ValueError(f"every sequence length must be >= 1, got {list(lengths)}")
    padded = [padded_length(n, cp_size, tp_size) for n in lengths]
    if not packed:
        padded = [max(padded, default=0)] * len(lengths)
    return SequenceLayout(
        lengths=lengths,
        padded_lengths=tuple(padded),
        cp_size=cp_size,
        cp_rank=cp_rank,
        packed=packed,
    )


def split_to_local(x: torch.Tensor, layout: SequenceLayout, pad_value: float = 0) -> torch.Tensor:
    """This rank's tokens of a global batch.

    Args:
        x: ``[B, T, ...]`` global tensor, row ``i`` = sequence ``i``; positions ``>= T`` of
            a padded sequence are filled with ``pad_value``.

    Returns:
        ``[num_rows, local_length, ...]``.
    """
    if x.dim() < 2 or x.shape[0] != layout.num_sequences:
        raise ValueError(
            f"x must be [B, T, ...] with B = {layout.num_sequences} sequences, "
            f"got shape {tuple(x.shape)}"
        )
    missing = max(layout.padded_lengths) - x.shape[1]
    if missing > 0:
        pad = x.new_full((x.shape[0], missing, *x.shape[2:]), pad_value)
        x = torch.cat([x, pad], dim=1)
    sequence_index, positions = layout.token_map
    return x[sequence_index.to(x.device), positions.to(x.device)]


def local_to_global(
    locals_by_rank: Sequence[torch.Tensor],
    layout: SequenceLayout,
    total_length: int,
    fill: float = 0,
) -> torch.Tensor:
    """Reassembles ``[B, total_length, ...]`` from every CP rank's local tensor.

    Args:
        locals_by_rank: ``cp_size`` tensors ``[num_rows, local_length, ...]``, rank order.
        total_length: ``T`` of the result; positions beyond a sequence's padded length (or
            never held by any rank) get ``fill``.
    """
    if len(locals_by_rank) != layout.cp_size:
        raise ValueError(f"need {layout.cp_size} local tensors, got {len(locals_by_rank)}")
    first = locals_by_rank[0]
    width = max(total_length, max(layout.padded_lengths))
    out = first.new_full((layout.num_sequences, width, *first.shape[2:]), fill)
    for rank, local in enumerate(locals_by_rank):
        sequence_index, positions = layout.for_rank(rank).token_map
        if local.shape[:2] != sequence_index.shape:
            raise ValueError(
                f"rank {rank}'s local tensor has shape {tuple(local.shape)}, the layout needs "
                f"[{layout.num_rows}, {layout.local_length}, ...]"
            )
        out[sequence_index.to(out.device), positions.to(out.device)] = local
    return out[:, :total_length]


def labels_to_tokens(x: torch.Tensor, fill: float = 0) -> torch.Tensor:
    """Label-aligned ``[B, T, ...]`` (position p holds token p+1's value) -> token aligned."""
    out = torch.full_like(x, fill)
    out[:, 1:] = x[:, :-1]
    return out


def tokens_to_labels(x: torch.Tensor, lengths: torch.Tensor, fill: float = 0) -> torch.Tensor:
    """Token-aligned ``[B, T, ...]`` -> label aligned: ``out[:, p] = x[:, p + 1]``, ``fill``
    where ``p + 1`` is past the sequence's true length (there is no next token)."""
    out = torch.full_like(x, fill)
    out[:, :-1] = x[:, 1:]
    has_next = torch.arange(x.shape[1], device=x.device) + 1 < lengths.to(x.device).unsqueeze(1)
    has_next = has_next.view(*has_next.shape, *([1] * (x.dim() - 2)))
    return torch.where(has_next, out, torch.full_like(out, fill))


def gather_to_global(
    local: torch.Tensor,
    layout: SequenceLayout,
    total_length: int,
    group: dist.ProcessGroup | None = None,
    *,
    fill: float = 0,
    shift_to_tokens: bool = False,
) -> torch.Tensor:
    """All-gathers every CP rank's ``[num_rows, local_length, ...]`` tensor into the global
    ``[B, total_length, ...]`` batch (on every rank). No autograd: for results such as
    log-probs handed back to the driver. ``shift_to_tokens`` turns label-aligned values (what
    the model produces) into token-aligned ones (:func:`labels_to_tokens`)."""
    cp_size = dist.get_world_size(group) if layout.cp_size > 1 else 1
    if cp_size != layout.cp_size:
        raise ValueError(f"group has {cp_size} ranks, the layout was built for {layout.cp_size}")
    local = local.detach().contiguous()
    if cp_size > 1:
        stacked = local.new_empty((cp_size * local.shape[0], *local.shape[1:]))
        dist.all_gather_single(stacked, local, group=group)
        pieces = list(stacked.chunk(cp_size, dim=0))
    else:
        pieces = [local]
    out = local_to_global(pieces, layout, total_length, fill)
    return labels_to_tokens(out, fill) if shift_to_tokens else out


@dataclass(frozen=True)
class ContextParallelBatch:
    """One micro-batch in the local CP layout; every tensor is ``[num_rows, local_length]``."""

    layout: SequenceLayout
    tokens: torch.Tensor
    """Input token ids (0 on padding)."""
    labels: torch.Tensor
    """Next-token targets ``tokens[p + 1]`` taken from the full sequence (0 where none)."""
    position_ids: torch.Tensor
    """Global position of each token within its sequence (RoPE positions)."""
    label_valid: torch.Tensor
    """Bool: the label is a real token (p + 1 < the sequence's true length)."""
    label_aligned: dict[str, torch.Tensor]
    """The caller's token-aligned ``[B, T]`` tensors, shifted to the labels, then split."""
    packed_seq_params: object | None
    """megatron-core ``PackedSeqParams`` ("thd") for a packed layout, else None."""


def build_cp_batch(
    input_ids: torch.Tensor,
    lengths: torch.Tensor,
    layout: SequenceLayout,
    token_aligned: Mapping[str, torch.Tensor] | None = None,
) -> ContextParallelBatch:
    """Builds this rank's micro-batch from a right-padded global batch.

    Args:
        input_ids: ``[B, T]`` prompt + response ids, right padded.
        lengths: ``[B]`` true lengths (``<= T``, equal to ``layout.lengths``).
        token_aligned: optional ``[B, T]`` tensors aligned with ``input_ids`` (response mask,
            old log-probs, advantages ...): returned label aligned, so entry ``p`` describes
            the token the model predicts at ``p``.
    """
    lengths = torch.as_tensor(lengths).to(torch.int64)
    if input_ids.dim() != 2 or tuple(lengths.tolist()) != layout.lengths:
        raise ValueError(
            f"input_ids must be [B, T] and lengths must equal layout.lengths; got input_ids "
            f"{tuple(input_ids.shape)}, lengths {lengths.tolist()}"
        )
    if int(lengths.max()) > input_ids.shape[1]:
        raise ValueError(f"a length exceeds T = {input_ids.shape[1]}: {lengths.tolist()}")
    inside = torch.arange(input_ids.shape[1], device=input_ids.device) < lengths.to(
        input_ids.device
    ).unsqueeze(1)
    tokens = torch.where(inside, input_ids, 0)
    shifted = {}
    for name, value in (token_aligned or {}).items():
        if value.shape[:2] != input_ids.shape:
            raise ValueError(f"{name} has shape {tuple(value.shape)}, expected [B, T] prefix")
        shifted[name] = split_to_local(tokens_to_labels(value, lengths), layout)
    return ContextParallelBatch(
        layout=layout,
        tokens=split_to_local(tokens, layout),
        labels=split_to_local(tokens_to_labels(tokens, lengths), layout),
        position_ids=layout.positions.to(input_ids.device),
        label_valid=layout.label_valid.to(input_ids.device),
        label_aligned=shifted,
        packed_seq_params=(
            make_packed_seq_params(layout, input_ids.device) if layout.packed else None
        ),
    )


def make_packed_seq_params(layout: SequenceLayout, device: torch.device | str = "cpu"):
    """megatron-core ``PackedSeqParams`` ("thd") for a packed layout.

    ``cu_seqlens_*`` hold the true lengths (what TransformerEngine attends over);
    ``cu_seqlens_*_padded`` the padded ones that place the zigzag chunks: megatron's RoPE and
    :class:`~megatron_fipo.megatron.cp_attention.ContextParallelAttention` read the latter.
    """
    from megatron.core.packed_seq_params import PackedSeqParams

    if not layout.packed:
        raise ValueError("PackedSeqParams describe a packed layout; this one is unpacked")
    true = _cumulative(layout.lengths).to(device)
    padded = layout.cu_seqlens_padded.to(device)
    return PackedSeqParams(
        qkv_format="thd",
        cu_seqlens_q=true,
        cu_seqlens_kv=true,
        cu_seqlens_q_padded=padded,
        cu_seqlens_kv_padded=padded,
        max_seqlen_q=max(layout.padded_lengths),
        max_seqlen_kv=max(layout.padded_lengths),
    )
