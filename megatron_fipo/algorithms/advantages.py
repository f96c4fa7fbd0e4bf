"""Sequence-level advantages and reward shaping (GRPO / DAPO), as pure functions.

- GRPO group normalisation: ``A_i = (R_i - mean_g) / (std_g + eps)`` over the samples of one
  prompt group (``std`` unbiased, as torch's default; a group of one sample gets ``A = 0``);
  with ``norm_by_std=False``, ``A_i = R_i - mean_g`` (Dr. GRPO style).
- DAPO overlong shaping: ``penalty = min(-(len - (max_len - buffer)) / buffer, 0) * factor``,
  added to the reward of responses longer than ``max_len - buffer``.
- Dynamic sampling: keep only groups whose rewards are not all equal (those carry no signal).
"""

from __future__ import annotations

import torch


def _group_index(group_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    if group_ids.dim() != 1:
        raise ValueError(f"group_ids must be 1-D [N], got shape {tuple(group_ids.shape)}")
    _, index = torch.unique(group_ids, return_inverse=True)
    return index, int(index.max().item()) + 1 if index.numel() else 0


def grpo_advantages(
    rewards: torch.Tensor,
    group_ids: torch.Tensor,
    norm_by_std: bool = True,
    eps: float = 1e-6,
) -> torch.Tensor:
    """Group-normalised advantages.

    Args:
        rewards: ``[N]`` scalar reward per sample.
        group_ids: ``[N]`` integer id of each sample's prompt group (any values, any order).
        norm_by_std: divide by the group's standard deviation (+ ``eps``).
        eps: added to the std.

    Returns:
        ``[N]`` fp32 advantages.
    """
    if rewards.shape != group_ids.shape:
        raise ValueError(
            f"rewards {tuple(rewards.shape)} and group_ids {tuple(group_ids.shape)} must match"
        )
    values = rewards.to(torch.float64)
    index, num_groups = _group_index(group_ids)
    counts = torch.zeros(num_groups, dtype=torch.float64).index_add_(
        0, index, torch.ones_like(values)
    )
    sums = torch.zeros(num_groups, dtype=torch.float64).index_add_(0, index, values)
    mean = sums / counts
    centered = values - mean[index]
    if not norm_by_std:
        return centered.float()
    squares = torch.zeros(num_groups, dtype=torch.float64).index_add_(0, index, centered**2)
    std = torch.sqrt(squares / (counts - 1).clamp(min=1))
    return (centered / (std[index] + eps)).float()


def overlong_penalty(
    response_lengths: torch.Tensor,
    max_response_length: int,
    buffer_length: int,
    penalty_factor: float = 1.0,
) -> torch.Tensor:
    """DAPO soft overlong punishment, ``[N]`` lengths -> ``[N]`` penalties (<= 0)."""
    if not 0 < buffer_length <= max_response_length:
        raise ValueError(
            f"buffer_length must be in (0, max_response_length={max_response_length}], "
            f"got {buffer_length}"
        )
    expected = max_response_length - buffer_length
    excess = response_lengths.to(torch.float64) - expected
    return (torch.clamp(-excess / buffer_length, max=0.0) * penalty_factor).float()


def dynamic_sampling_keep(rewards: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """``[N]`` bool: True for samples whose group's rewards are not all equal."""
    if rewards.shape != group_ids.shape:
        raise ValueError(
            f"rewards {tuple(rewards.shape)} and group_ids {tuple(group_ids.shape)} must match"
        )
    index, num_groups = _group_index(group_ids)
    values = rewards.to(torch.float64)
    high = torch.full((num_groups,), -torch.inf, dtype=torch.float64).scatter_reduce(
        0, index, values, "amax"
    )
    low = torch.full((num_groups,), torch.inf, dtype=torch.float64).scatter_reduce(
        0, index, values, "amin"
    )
    return (high > low)[index]
