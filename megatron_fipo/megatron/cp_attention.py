"""Context-parallel core attention for megatron-core's local (non-TransformerEngine) spec.

megatron-core's ``DotProductAttention`` refuses ``context_parallel_size > 1``; on GPUs TE's
attention does the ring exchange. :class:`ContextParallelAttention` takes its place in the
local layer spec (``core_attention=ContextParallelAttention``) so CP runs, and is tested, on
CPU. Per layer and CP rank it computes::

    K, V = all_gather(K_local, V_local over the CP group)          # [CP * s, b, g, d]
    O = softmax(Q K^T * scale + causal_mask(global positions)) V    # fp32 (or wider) softmax

The causal mask compares global positions of the zigzag layout
(:mod:`megatron_fipo.megatron.context_parallel`), and with packed sequences ("thd",
``PackedSeqParams.cu_seqlens_q_padded``) also sequence identities, so a token never sees
another sequence. The K/V all-gather is differentiable: its backward reduce-scatters dK / dV
to the ranks that own the keys.

Two kernels compute the same thing:

- on CPU (tests, small runs), :func:`masked_attention` materialises the fp32 scores, memory
  ``O(s * CP * s)`` per head;
- on CUDA, :func:`fused_attention` calls ``torch.nn.functional.scaled_dot_product_attention``:
  the flash kernel for one plain causal sequence per row (CP = 1, padded rows), the
  memory-efficient kernel with the boolean mask otherwise. That is what lets the local spec
  (no TransformerEngine) train 32k-token rows on one GPU. The fused kernels keep the softmax
  statistics in fp32 but, unlike :func:`masked_attention`, do not upcast bf16 inputs.

A packed row is attended sequence by sequence (:meth:`ContextParallelAttention._packed`): each
sequence's local queries over that sequence's gathered keys only, so the work and any mask are
``O(sum_i s_i * CP * s_i)`` rather than ``O((sum_i s_i) * CP * sum_i s_i)``; at CP = 1 each is
plain causal attention, through the fused kernel also on CPU for fp32. On CUDA with CP = 1
and bf16 / fp16 the whole row is one call of PyTorch's variable-length flash kernel
(``torch.nn.attention.varlen.varlen_attn``, causal, boundaries from ``cu_seqlens``).

Attention dropout (off in every shipped config) always takes the materialised path.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from torch import Tensor

from megatron_fipo.megatron.context_parallel import packed_token_map, zigzag_positions

_CAUSAL_TYPES = (AttnMaskType.causal, AttnMaskType.padding_causal)


class _GatherSequence(torch.autograd.Function):
    """All-gather along dim 0 over a group; backward reduce-scatters (sums) the gradient."""

    @staticmethod
    def forward(ctx, x: Tensor, group: dist.ProcessGroup) -> Tensor:
        ctx.group = group
        size = dist.get_world_size(group)
        out = x.new_empty((size * x.shape[0], *x.shape[1:]))
        dist.all_gather_single(out, x.contiguous(), group=group)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        size = dist.get_world_size(ctx.group)
        out = grad.new_empty((grad.shape[0] // size, *grad.shape[1:]))
        dist.reduce_scatter_single(out, grad.contiguous(), group=ctx.group)
        return out, None


def gather_sequence(x: Tensor, group: dist.ProcessGroup | None) -> Tensor:
    """``[s, ...]`` -> ``[CP * s, ...]`` (rank order), differentiable; identity without CP."""
    if group is None or dist.get_world_size(group) == 1:
        return x
    return _GatherSequence.apply(x, group)


def token_identity(
    local_length: int,
    cp_size: int,
    cp_rank: int,
    cu_seqlens_padded: Tensor | None,
) -> tuple[Tensor, Tensor]:
    """Sequence index and global position ``[local_length]`` of one rank's tokens.

    Without ``cu_seqlens_padded`` the row is one zigzag-split sequence ("bshd"); with it, the
    row packs every sequence's local chunks back to back ("thd").
    """
    if cu_seqlens_padded is None:
        positions = zigzag_positions(local_length, cp_size, cp_rank)
        return torch.zeros_like(positions), positions
    padded = (cu_seqlens_padded[1:] - cu_seqlens_padded[:-1]).tolist()
    sequence_index, positions = packed_token_map(padded, cp_size, cp_rank)
    if sequence_index.numel() != local_length:
        raise ValueError(
            f"cu_seqlens_padded describe {sequence_index.numel()} local tokens per rank, "
            f"the packed row has {local_length}"
        )
    return sequence_index, positions


def zigzag_causal_mask(
    local_length: int,
    cp_size: int,
    cp_rank: int,
    cu_seqlens_padded: Tensor | None = None,
) -> Tensor:
    """``[s, CP * s]`` bool, True where local query ``i`` may attend gathered key ``j``.

    Gathered keys are in rank order (rank 0's tokens, then rank 1's ...), as
    :func:`gather_sequence` returns them.
    """
    query_seq, query_pos = token_identity(local_length, cp_size, cp_rank, cu_seqlens_padded)
    key_ids = [token_identity(local_length, cp_size, r, cu_seqlens_padded) for r in range(cp_size)]
    key_seq = torch.cat([seq for seq, _ in key_ids])
    key_pos = torch.cat([pos for _, pos in key_ids])
    same_sequence = query_seq.unsqueeze(1) == key_seq.unsqueeze(0)
    return same_sequence & (key_pos.unsqueeze(0) <= query_pos.unsqueeze(1))


def masked_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    allowed: Tensor,
    softmax_scale: float,
    dropout: Callable[[Tensor], Tensor] | None = None,
) -> Tensor:
    """Attention with an explicit boolean mask, softmax in fp32 (or the inputs' wider dtype).

    Args:
        query: ``[s, b, n, d]``; key / value: ``[S, b, g, d]`` with ``g`` dividing ``n`` (GQA).
        allowed: ``[s, S]`` bool, True where query ``i`` may attend key ``j``; every row must
            allow at least one key.

    Returns:
        ``[s, b, n * d]`` in ``query``'s dtype.
    """
    key, value = _expand_groups(query, key, value)
    compute = torch.promote_types(query.dtype, torch.float32)
    q = query.permute(1, 2, 0, 3).to(compute)  # [b, n, s, d]
    k = key.permute(1, 2, 3, 0).to(compute)  # [b, n, d, S]
    v = value.permute(1, 2, 0, 3).to(compute)  # [b, n, S, d]
    scores = torch.matmul(q, k) * softmax_scale
    scores = scores.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    if dropout is not None:
        probs = dropout(probs)
    return _merge_heads(torch.matmul(probs, v).to(query.dtype))


def _expand_groups(query: Tensor, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor]:
    """GQA: repeat each key / value group for the ``num_heads / num_groups`` heads it serves."""
    num_heads, num_groups = query.shape[2], key.shape[2]
    if num_heads % num_groups:
        raise ValueError(f"{num_heads} query heads are not a multiple of {num_groups} groups")
    if num_heads == num_groups:
        return key, value
    repeats = num_heads // num_groups
    return key.repeat_interleave(repeats, dim=2), value.repeat_interleave(repeats, dim=2)


def _merge_heads(context: Tensor) -> Tensor:
    """``[b, n, s, d]`` -> ``[s, b, n * d]``."""
    batch, _, seq, _ = context.shape
    return context.permute(2, 0, 1, 3).reshape(seq, batch, -1)


def fused_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    allowed: Tensor | None,
    softmax_scale: float,
) -> Tensor:
    """:func:`masked_attention` (same shapes and meaning) through PyTorch's fused kernels.

    ``allowed=None`` means plain causal attention of ``s`` queries over ``S == s`` keys, which
    selects the flash kernel on CUDA.
    """
    key, value = _expand_groups(query, key, value)
    q = query.permute(1, 2, 0, 3)  # [b, n, s, d]
    k = key.permute(1, 2, 0, 3)  # [b, n, S, d]
    v = value.permute(1, 2, 0, 3)
    if allowed is None:
        if q.shape[2] != k.shape[2]:
            raise ValueError("plain causal attention needs as many keys as queries")
        context = torch.nn.functional.scaled_dot_product_attention(
            q, k, v, is_causal=True, scale=softmax_scale
        )
    else:
        context = torch.nn.functional.scaled_dot_product_attention(
            q, k, v, attn_mask=allowed, scale=softmax_scale
        )
    return _merge_heads(context)


def varlen_causal_attention(
    query: Tensor, key: Tensor, value: Tensor, cu_seqlens: Tensor, softmax_scale: float
) -> Tensor:
    """Causal attention within each packed sequence through PyTorch's variable-length flash
    kernel (CUDA, bf16 / fp16).

    Args:
        query: ``[t, n, d]``; key / value: ``[t, g, d]`` (GQA: ``g`` divides ``n``).
        cu_seqlens: ``[N + 1]`` sequence boundaries in the row.

    Returns:
        ``[t, n * d]``.
    """
    from torch.nn.attention.varlen import varlen_attn

    bounds = cu_seqlens.to(device=query.device, dtype=torch.int32)
    longest = int((bounds[1:] - bounds[:-1]).max())
    out = varlen_attn(
        query,
        key,
        value,
        bounds,
        bounds,
        longest,
        longest,
        scale=softmax_scale,
        window_size=(-1, 0),  # causal
        enable_gqa=query.shape[1] != key.shape[1],
    )
    return out.reshape(out.shape[0], -1)


class ContextParallelAttention(MegatronModule):
    """Drop-in ``core_attention`` for the local spec that works with any CP size.

    Same constructor and forward signature as megatron-core 0.16.1's
    ``DotProductAttention``. Inputs are ``[s, b, heads, d]`` ("bshd"), or ``[t, heads, d]``
    with ``packed_seq_params.qkv_format == "thd"``; outputs ``[s, b, heads * d]`` (or
    ``[t, heads * d]``). ``attention_mask`` is not used: a local mask cannot describe keys that
    live on other ranks, so the causal mask is built from global positions (right padding
    needs no mask under causal attention). Query-key layer scaling is not applied: the softmax
    runs in fp32 (fp64 for fp64 inputs), where it changes nothing. ``fused`` (default: on
    CUDA) selects :func:`fused_attention` whenever attention dropout is inactive.
    """

    fused: bool | None = None
    """None: fused kernels on CUDA tensors only. Tests set it per instance to compare both."""

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        cp_comm_type: str | None = None,
        pg_collection: ProcessGroupCollection | None = None,
    ):
        super().__init__(config=config)
        if attn_mask_type not in _CAUSAL_TYPES:
            raise ValueError(f"ContextParallelAttention is causal only, got {attn_mask_type}")
        if config.window_size is not None:
            raise ValueError("ContextParallelAttention does not support window_size")
        if config.softmax_type != "vanilla":
            raise ValueError(f"softmax_type {config.softmax_type!r} is not supported")
        self.layer_number = max(1, layer_number)
        self.attn_mask_type = attn_mask_type
        self.attention_type = attention_type
        if pg_collection is None:
            pg_collection = ProcessGroupCollection.use_mpu_process_groups(required_pgs=["tp", "cp"])
        self.pg_collection = pg_collection
        self.tp_group = pg_collection.tp
        self.cp_group = getattr(pg_collection, "cp", None)
        if self.cp_group is None:
            self.cp_group = parallel_state.get_context_parallel_group()
        head_dim = config.kv_channels
        self.softmax_scale = softmax_scale if softmax_scale is not None else 1 / math.sqrt(head_dim)
        dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        self.attention_dropout = torch.nn.Dropout(dropout)
        self._mask_cache: dict[tuple, Tensor] = {}
        self.last_kernel = ""
        """The kernel of the last forward (``masked``, ``flash``, ``masked_fused``,
        ``per_sequence_masked``, ``per_sequence_fused``, ``varlen``); tests read it."""

    @property
    def cp_size(self) -> int:
        return dist.get_world_size(self.cp_group) if self.cp_group is not None else 1

    def _mask(self, length: int, device: torch.device) -> Tensor:
        """The zigzag causal mask of one sequence with ``length`` tokens on this rank."""
        cp_size = self.cp_size
        cp_rank = dist.get_rank(self.cp_group) if cp_size > 1 else 0
        key = (length, cp_size, cp_rank, str(device))
        if key not in self._mask_cache:
            if len(self._mask_cache) > 64:  # packed lengths change every micro-batch
                self._mask_cache.clear()
            self._mask_cache[key] = zigzag_causal_mask(length, cp_size, cp_rank).to(device)
        return self._mask_cache[key]

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        attention_mask: Tensor | None,
        attn_mask_type: AttnMaskType | None = None,
        attention_bias: Tensor | None = None,
        packed_seq_params: PackedSeqParams | None = None,
    ) -> Tensor:
        """Causal attention of the local queries over the CP group's keys (see class doc)."""
        if attention_bias is not None:
            raise ValueError("ContextParallelAttention does not support attention_bias")
        if (attn_mask_type or self.attn_mask_type) not in _CAUSAL_TYPES:
            raise ValueError(f"ContextParallelAttention is causal only, got {attn_mask_type}")
        fused = query.is_cuda if self.fused is None else self.fused
        fused = fused and not self._dropout_active
        if packed_seq_params is not None:
            if packed_seq_params.qkv_format != "thd":
                raise ValueError(f"unsupported qkv_format {packed_seq_params.qkv_format!r}")
            cu_seqlens = packed_seq_params.cu_seqlens_q_padded
            if cu_seqlens is None:
                cu_seqlens = packed_seq_params.cu_seqlens_q
            return self._packed(query, key, value, cu_seqlens, fused)
        key = gather_sequence(key, self.cp_group)
        value = gather_sequence(value, self.cp_group)
        if fused:
            plain = self.cp_size == 1
            allowed = None if plain else self._mask(query.shape[0], query.device)
            self.last_kernel = "flash" if plain else "masked_fused"
            return fused_attention(query, key, value, allowed, self.softmax_scale)
        self.last_kernel = "masked"
        allowed = self._mask(query.shape[0], query.device)
        return masked_attention(query, key, value, allowed, self.softmax_scale, self._dropout)

    def _packed(
        self, query: Tensor, key: Tensor, value: Tensor, cu_seqlens: Tensor, fused: bool
    ) -> Tensor:
        """``[t, n, d]`` queries of a packed row (``cu_seqlens``: global padded boundaries)
        -> ``[t, n * d]``, each sequence attending to its own keys only (see module doc)."""
        cp_size = self.cp_size
        if fused and cp_size == 1 and query.is_cuda and query.dtype != torch.float32:
            self.last_kernel = "varlen"
            return varlen_causal_attention(query, key, value, cu_seqlens, self.softmax_scale)
        # At CP = 1 each sequence is plain causal attention: PyTorch's flash kernel on CPU too
        # for fp32 / fp64 (it computes in the inputs' precision; ~12x the materialised path at
        # 2k tokens), unless dropout needs the probabilities.
        exact = query.dtype in (torch.float32, torch.float64)
        fused = fused or (cp_size == 1 and exact and not self._dropout_active)
        total = query.shape[0]
        key = gather_sequence(key, self.cp_group).view(cp_size, total, *key.shape[1:])
        value = gather_sequence(value, self.cp_group).view(cp_size, total, *value.shape[1:])
        bounds = (cu_seqlens // cp_size).tolist()
        if bounds[-1] != total:
            raise ValueError(
                f"cu_seqlens_padded describe {bounds[-1]} local tokens per rank, "
                f"the packed row has {total}"
            )
        self.last_kernel = "per_sequence_" + ("fused" if fused else "masked")
        outputs = []
        for start, end in zip(bounds[:-1], bounds[1:]):
            # This sequence's keys from every rank, in rank order: [CP * s_i, 1, g, d].
            keys, values = (x[:, start:end].reshape(-1, 1, *x.shape[2:]) for x in (key, value))
            queries = query[start:end].unsqueeze(1)
            if fused:
                allowed = None if cp_size == 1 else self._mask(end - start, query.device)
                out = fused_attention(queries, keys, values, allowed, self.softmax_scale)
            else:
                allowed = self._mask(end - start, query.device)
                out = masked_attention(
                    queries, keys, values, allowed, self.softmax_scale, self._dropout
                )
            outputs.append(out.squeeze(1))
        return torch.cat(outputs)

    @property
    def _dropout_active(self) -> bool:
        return self.training and self.attention_dropout.p > 0

    def _dropout(self, probs: Tensor) -> Tensor:
        if not self.training or self.attention_dropout.p == 0:
            return probs
        if self.config.sequence_parallel:
            return self.attention_dropout(probs)
        with tensor_parallel.get_cuda_rng_tracker().fork():
            return self.attention_dropout(probs)
