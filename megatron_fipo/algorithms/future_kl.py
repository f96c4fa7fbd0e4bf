"""Discounted future sums: the future-KL signal of FIPO.

Computes, for every row of ``x[B, T]``::

    F_t = sum_{k >= t} gamma^(k - t) * x_k        (F_t = x_t + gamma * F_{t+1}, F_T = 0)

as a blocked reverse scan: each block of ``BLOCK`` tokens is scanned exactly with a small
``[BLOCK, BLOCK]`` decay matrix (one batched matmul), the block totals form a sequence that
obeys the same recursion with ``gamma ** BLOCK``, which is scanned recursively, and the carry
entering each block from its right is added back with ``gamma ** (BLOCK - j)``. Work is linear
in ``T``; the only decay powers ever formed have exponents below ``BLOCK``, so no power
underflows to a wrong value and fp32 stays exact to rounding at any ``T``.

Context-parallel callers (``megatron_fipo.megatron.cp_scan``) use the same pieces: scan the
local segment (:func:`discounted_future_sum`; its column 0 is the segment's decayed total),
combine the per-segment totals into right carries (:func:`right_carries`) and add the carry
entering each segment (:func:`add_right_carry`).
"""

from __future__ import annotations

import functools

import torch

from megatron_fipo.numerics import cuda_tf32

BLOCK = 64


def _check_gamma(gamma: float) -> None:
    if not 0.0 < gamma <= 1.0:
        raise ValueError(f"gamma must be in (0, 1], got {gamma}")


def _decay_powers(gamma: float, n: int, like: torch.Tensor) -> torch.Tensor:
    """``gamma ** arange(n)`` computed in fp64 and cast to ``like``'s dtype/device."""
    return _cached_powers(float(gamma), n, like.dtype, like.device)


def _block_matrix(gamma: float, size: int, like: torch.Tensor) -> torch.Tensor:
    """``D[k, j] = gamma^(k - j)`` for ``k >= j`` else 0, shape ``[size, size]``."""
    return _cached_matrix(float(gamma), size, like.dtype, like.device)


# Small constants (at most BLOCK x BLOCK) reused across calls: building them costs more than
# the scan itself at short T.
@functools.lru_cache(maxsize=256)
def _cached_powers(gamma: float, n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    exponents = torch.arange(n, dtype=torch.float64)
    return torch.pow(torch.tensor(gamma, dtype=torch.float64), exponents).to(
        device=device, dtype=dtype
    )


@functools.lru_cache(maxsize=256)
def _cached_matrix(
    gamma: float, size: int, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    idx = torch.arange(size, dtype=torch.float64)
    diff = idx[:, None] - idx[None, :]
    power = torch.pow(torch.tensor(gamma, dtype=torch.float64), diff.clamp(min=0))
    return torch.where(diff >= 0, power, 0.0).to(device=device, dtype=dtype)


def _scan(x: torch.Tensor, gamma: float) -> torch.Tensor:
    batch, length = x.shape
    if length <= BLOCK:
        return x @ _block_matrix(gamma, length, x)
    num_blocks = -(-length // BLOCK)
    padded = (
        x if length % BLOCK == 0 else torch.nn.functional.pad(x, (0, num_blocks * BLOCK - length))
    )
    local = (padded.reshape(batch * num_blocks, BLOCK) @ _block_matrix(gamma, BLOCK, x)).view(
        batch, num_blocks, BLOCK
    )
    # F at the start of each block (block totals plus everything to their right).
    starts = _scan(local[:, :, 0].contiguous(), gamma**BLOCK)
    carry = torch.nn.functional.pad(starts[:, 1:], (0, 1))  # entering block n from block n+1
    tail = _decay_powers(gamma, BLOCK + 1, x).flip(0)[:BLOCK]  # gamma^(BLOCK - j)
    out = local.addcmul_(carry.unsqueeze(-1), tail)
    return out.view(batch, num_blocks * BLOCK)[:, :length]


def discounted_future_sum(
    x: torch.Tensor, gamma: float, carry: torch.Tensor | None = None
) -> torch.Tensor:
    """``F_t = sum_{k>=t} gamma^(k-t) x_k`` along the last dim.

    Args:
        x: ``[B, T]`` (fp32 or fp64); any masking is applied by the caller (masked ``x`` = 0).
        gamma: discount in ``(0, 1]``.
        carry: optional ``[B]`` value of ``F`` just right of the segment (``F_T``), for a
            segment that continues on another rank.

    Returns:
        ``[B, T]`` in ``x``'s dtype. ``out[:, 0]`` is the segment's decayed total (with carry).
    """
    _check_gamma(gamma)
    if x.dim() != 2:
        raise ValueError(f"x must be [B, T], got shape {tuple(x.shape)}")
    if not x.dtype.is_floating_point:
        raise ValueError(f"x must be floating point, got {x.dtype}")
    if x.shape[1] == 0:
        return x.clone()
    # Full fp32 on CUDA: TF32 would cost ~3 decimal digits of the decayed sums.
    with cuda_tf32(False, active=x.is_cuda):
        out = _scan(x, gamma)
    if carry is not None:
        out = add_right_carry(out, carry, gamma)
    return out


def add_right_carry(scan: torch.Tensor, carry: torch.Tensor, gamma: float) -> torch.Tensor:
    """Adds the future sum entering a segment from its right: ``scan_t + gamma^(L-t) * carry``.

    Args:
        scan: ``[B, L]`` local scan of the segment.
        carry: ``[B]`` value of ``F`` at the first position right of the segment.
    """
    length = scan.shape[-1]
    weights = _decay_powers(gamma, length + 1, scan).flip(0)[:length]  # gamma^(L - t)
    return scan + carry.to(scan.dtype).unsqueeze(-1) * weights


def right_carries(totals: torch.Tensor, lengths: torch.Tensor, gamma: float) -> torch.Tensor:
    """Carries entering each segment from its right, from per-segment decayed totals.

    Segments ``0..K-1`` are consecutive pieces of one sequence, left to right.
    ``carry_k = total_{k+1} + gamma^len_{k+1} * carry_{k+1}``, ``carry_{K-1} = 0``.

    Args:
        totals: ``[B, K]`` decayed totals (``discounted_future_sum(segment)[:, 0]``).
        lengths: ``[K]`` or ``[B, K]`` integer segment lengths.

    Returns:
        ``[B, K]`` carries in ``totals``' dtype.
    """
    _check_gamma(gamma)
    lengths = torch.as_tensor(lengths, device=totals.device).expand_as(totals)
    decay = torch.pow(torch.tensor(float(gamma), dtype=torch.float64), lengths.double())
    decay = decay.to(totals.dtype)
    carries = torch.zeros_like(totals)
    for k in range(totals.shape[1] - 2, -1, -1):  # K = 2 * CP: a handful of steps
        carries[:, k] = totals[:, k + 1] + decay[:, k + 1] * carries[:, k + 1]
    return carries
