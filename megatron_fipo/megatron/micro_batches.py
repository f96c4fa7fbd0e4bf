"""The actor's micro-batches: which sequences go together, and how one is laid out on a rank.

:func:`plan_micro_batches` groups the rows of a batch (see ``parallelism`` in
:mod:`megatron_fipo.config`):

- fixed size (``micro_batch_size``): consecutive rows;
- token budget (``max_tokens_per_micro_batch``): rows sorted longest first, each put into the
  first micro-batch it fits in (first-fit decreasing), so a 20k-token response and twenty
  500-token ones make two micro-batches, not one padded to 20k x 21 tokens.

and lays each group out as padded rows (one per sequence, all padded to the group's longest)
or as one packed row (``parallelism.packing``: the sequences back to back, each padded only to
``2 * CP * TP``; the model gets their boundaries as ``cu_seqlens``). With FP8 the row is
padded further so every rank's GEMMs see an aligned token count
(:func:`megatron_fipo.config.padding_multiples`): the last packed sequence takes the extra
padding (its tail is masked out of the loss like any padding).

:func:`build_micro_batch` then turns one plan into this CP rank's :class:`MicroBatch`
(:mod:`~megatron_fipo.megatron.context_parallel` does the zigzag split), with the sequence-aware
future-KL scan and sequence sum whenever a row holds several sequences or part of one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from megatron_fipo.batch import ActorBatch
from megatron_fipo.config import ModelConfig, ParallelismConfig, padding_multiples, round_up
from megatron_fipo.megatron import context_parallel

TRAINING_FIELDS = ("response_mask", "old_log_probs", "advantages")


@dataclass(frozen=True)
class MicroBatchPlan:
    """The rows of one micro-batch and the padded length of each (a common one when not
    packed)."""

    rows: torch.Tensor
    """``[n]`` int64 rows of the (padded) batch."""
    padded_lengths: tuple[int, ...]
    """Global padded length of each sequence (multiples of ``2 * CP * TP``)."""
    packed: bool

    @property
    def num_tokens(self) -> int:
        """Tokens the model computes for this micro-batch (padding included)."""
        if self.packed:
            return sum(self.padded_lengths)
        return len(self.padded_lengths) * self.padded_lengths[0]


@dataclass(kw_only=True, slots=True)
class MicroBatch:
    """One micro-batch as this CP rank feeds it to the model and the loss (device tensors).

    ``tokens`` / ``position_ids`` / ``targets``: ``[rows, S_local]`` (one row when packed;
    targets: the next token of each position); the training fields are label aligned
    ``[rows, S_local]``; ``rows``: the sequences' rows in the actor's batch (>= its size:
    fixed-size padding rows).
    """

    rows: torch.Tensor
    tokens: torch.Tensor
    position_ids: torch.Tensor
    attention_mask: torch.Tensor | None
    """Causal mask for Megatron's own local attention (local spec, CP = 1, unpacked, CPU);
    None wherever the attention masks by itself (ours, TE)."""
    targets: torch.Tensor
    layout: context_parallel.SequenceLayout
    cp_group: Any
    prompt_lengths: torch.Tensor
    response_lengths: torch.Tensor
    packed_seq_params: Any = None
    """megatron-core ``PackedSeqParams`` ("thd") of a packed row, else None."""
    response_mask: torch.Tensor | None = None
    old_log_probs: torch.Tensor | None = None
    advantages: torch.Tensor | None = None
    future_sum_fn: Any = None
    """The sequence-aware reverse scan (None: every row is one whole sequence)."""
    sequence_sum_fn: Any = None
    """The per-sequence sum (None: every row is one whole sequence)."""


def plan_micro_batches(
    lengths: torch.Tensor, parallelism: ParallelismConfig, model: ModelConfig
) -> list[MicroBatchPlan]:
    """Micro-batches of the rows of ``lengths`` (see the module doc); every row appears once.

    ValueError when one sequence alone exceeds ``max_tokens_per_micro_batch``.
    """
    sequence, row = padding_multiples(model, parallelism)
    sizes = [round_up(int(n), sequence) for n in lengths.reshape(-1).tolist()]
    budget = parallelism.max_tokens_per_micro_batch
    if budget is None:
        step = parallelism.micro_batch_size
        groups = [
            list(range(start, min(start + step, len(sizes))))
            for start in range(0, len(sizes), step)
        ]
    else:
        for index, size in enumerate(sizes):
            if round_up(size, row) > budget:
                cp, tp = parallelism.context_parallel_size, parallelism.tensor_model_parallel_size
                raise ValueError(
                    f"a sequence of {int(lengths[index])} tokens (padded to {round_up(size, row)}"
                    f" for CP={cp}, TP={tp}) exceeds parallelism.max_tokens_per_micro_batch="
                    f"{budget}"
                )
        # Longest first by true length (ties: batch order), as the padded sizes can tie.
        order = sorted(range(len(sizes)), key=lambda i: (-int(lengths[i]), i))
        pack = _first_fit if parallelism.packed else _longest_first
        groups = pack(order, sizes, budget, row)
    if parallelism.packed:
        return [_packed_plan(group, sizes, row) for group in groups]
    if budget is None:  # one shape for the whole schedule
        common = round_up(max(sizes), row)
        return [MicroBatchPlan(torch.tensor(g), (common,) * len(g), False) for g in groups]
    return [
        MicroBatchPlan(torch.tensor(g), (round_up(sizes[g[0]], row),) * len(g), False)
        for g in groups
    ]


def _longest_first(
    order: list[int], sizes: list[int], budget: int, multiple: int
) -> list[list[int]]:
    """Padded rows (``order``: longest first): a group takes the next row while rows x its
    first (longest) row's padded length stays within the budget."""
    groups: list[list[int]] = []
    for index in order:
        if groups and (len(groups[-1]) + 1) * round_up(sizes[groups[-1][0]], multiple) <= budget:
            groups[-1].append(index)
        else:
            groups.append([index])
    return groups


def _first_fit(order: list[int], sizes: list[int], budget: int, multiple: int) -> list[list[int]]:
    """Packed rows (``order``: longest first): each sequence into the first row whose tokens
    (rounded up to the row multiple) stay within the budget."""
    groups: list[list[int]] = []
    totals: list[int] = []
    for index in order:
        for slot, total in enumerate(totals):
            if round_up(total + sizes[index], multiple) <= budget:
                groups[slot].append(index)
                totals[slot] += sizes[index]
                break
        else:
            groups.append([index])
            totals.append(sizes[index])
    return groups


def _packed_plan(group: list[int], sizes: list[int], multiple: int) -> MicroBatchPlan:
    padded = [sizes[index] for index in group]
    padded[-1] += round_up(sum(padded), multiple) - sum(padded)  # FP8 alignment, if any
    return MicroBatchPlan(torch.tensor(group), tuple(padded), True)


def pad_batch(batch: ActorBatch, num_rows_multiple: int, with_training_data: bool) -> dict:
    """Right-padded token-aligned ``[B_pad, T]`` tensors; B padded to a multiple of
    ``num_rows_multiple`` with one-token dummy sequences that carry no response."""
    prompt = torch.as_tensor(batch.prompt_lengths, dtype=torch.int64).reshape(-1)
    response = torch.as_tensor(batch.response_lengths, dtype=torch.int64).reshape(-1)
    num_real = len(batch.input_ids)
    if not num_real or prompt.numel() != num_real or response.numel() != num_real:
        raise ValueError(
            f"batch has {num_real} input_ids, {prompt.numel()} prompt_lengths and "
            f"{response.numel()} response_lengths; they must match and be non-empty"
        )
    lengths = prompt + response
    for index, ids in enumerate(batch.input_ids):
        if ids.dim() != 1 or ids.numel() != int(lengths[index]) or int(prompt[index]) < 1:
            raise ValueError(
                f"sequence {index}: input_ids has {ids.numel()} tokens but prompt_lengths + "
                f"response_lengths = {int(lengths[index])} (prompt must be >= 1 token)"
            )
    num_rows = -(-num_real // num_rows_multiple) * num_rows_multiple
    extra = num_rows - num_real
    total = int(lengths.max())
    input_ids = torch.zeros(num_rows, total, dtype=torch.int64)
    for index, ids in enumerate(batch.input_ids):
        input_ids[index, : ids.numel()] = ids
    prompt = torch.cat([prompt, torch.ones(extra, dtype=torch.int64)])
    response = torch.cat([response, torch.zeros(extra, dtype=torch.int64)])
    padded = dict(
        input_ids=input_ids,
        lengths=prompt + response,
        prompt_lengths=prompt,
        response_lengths=response,
    )
    if with_training_data:
        padded.update(_training_tensors(batch, prompt, response, num_rows, total))
    return padded


def _training_tensors(batch, prompt, response, num_rows, total) -> dict[str, torch.Tensor]:
    """Response mask, old log-probs and per-token advantages, token aligned ``[B_pad, T]``."""
    width = int(response.max())
    old = torch.as_tensor(batch.old_log_probs, dtype=torch.float32)
    advantages = torch.as_tensor(batch.advantages, dtype=torch.float32)
    num_real = old.shape[0]
    if old.dim() != 2 or old.shape[1] < width:
        raise ValueError(f"old_log_probs must be [B, T_resp>={width}], got {tuple(old.shape)}")
    if advantages.dim() == 1:
        advantages = advantages[:, None].expand(-1, width)
    if advantages.shape[0] != num_real or advantages.shape[1] < width:
        raise ValueError(
            f"advantages must be [B] or [B, T_resp>={width}], got {tuple(advantages.shape)}"
        )
    column = torch.arange(width)
    positions = (prompt[:num_real, None] + column).clamp(max=total - 1)
    valid = column < response[:num_real, None]
    out = {name: torch.zeros(num_rows, total) for name in TRAINING_FIELDS}
    for name, values in (
        ("response_mask", valid.float()),
        ("old_log_probs", old),
        ("advantages", advantages),
    ):
        out[name][:num_real].scatter_(1, positions, torch.where(valid, values[:, :width], 0.0))
    return out


def build_micro_batch(
    padded: dict,
    plan: MicroBatchPlan,
    *,
    cp_rank: int,
    cp_group: Any,
    device: torch.device,
    with_training_data: bool,
    causal_mask: bool,
) -> MicroBatch:
    """This CP rank's :class:`MicroBatch` of ``plan`` over the :func:`pad_batch` tensors.
    ``causal_mask``: build Megatron's dense ``[S, S]`` mask (only its own local attention
    needs one)."""
    from megatron_fipo.megatron import model as model_lib
    from megatron_fipo.megatron.cp_scan import make_cp_future_sum, make_cp_sequence_sum

    rows = plan.rows
    lengths = padded["lengths"][rows]
    cp_size = 1 if cp_group is None else torch.distributed.get_world_size(cp_group)
    layout = context_parallel.SequenceLayout(
        lengths=tuple(lengths.tolist()),
        padded_lengths=plan.padded_lengths,
        cp_size=cp_size,
        cp_rank=cp_rank,
        packed=plan.packed,
    )
    width = min(max(plan.padded_lengths), padded["input_ids"].shape[1])  # the group's columns
    names = TRAINING_FIELDS if with_training_data else ()
    cp_batch = context_parallel.build_cp_batch(
        padded["input_ids"][rows, :width],
        lengths,
        layout,
        {name: padded[name][rows, :width] for name in names},
    )
    micro = MicroBatch(
        rows=rows,
        tokens=cp_batch.tokens.to(device),
        position_ids=cp_batch.position_ids.to(device),
        attention_mask=(
            model_lib.causal_attention_mask(cp_batch.tokens.shape[1], device)
            if causal_mask
            else None
        ),
        targets=cp_batch.labels.to(device),
        layout=layout,
        cp_group=cp_group,
        prompt_lengths=padded["prompt_lengths"][rows].to(device),
        response_lengths=padded["response_lengths"][rows].to(device),
        packed_seq_params=(
            context_parallel.make_packed_seq_params(layout, device) if plan.packed else None
        ),
        **{name: value.to(device) for name, value in cp_batch.label_aligned.items()},
    )
    if with_training_data and (plan.packed or cp_group is not None):
        # A row that is not one whole sequence: scan and count per sequence (across CP).
        micro.future_sum_fn = make_cp_future_sum(layout, cp_group)
        micro.sequence_sum_fn = make_cp_sequence_sum(layout, cp_group)
    return micro


def response_columns(local_values: torch.Tensor, micro: MicroBatch, width: int) -> torch.Tensor:
    """Label-aligned local ``[rows, S_local]`` values -> ``[sequences, width]`` per response
    token.

    Gathers over the CP group (every sequence whole on every CP rank, unpacked) and shifts so
    that column ``j`` is the value for response token ``j`` (predicted at position
    ``prompt + j - 1``); 0 past each response.
    """
    layout = micro.layout
    full = context_parallel.gather_to_global(
        local_values, layout, max(layout.padded_lengths), micro.cp_group, shift_to_tokens=True
    )
    column = torch.arange(width, device=full.device)
    positions = (micro.prompt_lengths[:, None] + column).clamp(max=full.shape[1] - 1)
    valid = column < micro.response_lengths[:, None]
    return torch.where(valid, full.gather(1, positions), 0.0)
