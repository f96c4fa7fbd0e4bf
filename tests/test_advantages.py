"""GRPO advantages, DAPO overlong shaping and the dynamic-sampling filter."""

import pytest
import torch

from megatron_fipo.algorithms.advantages import (
    dynamic_sampling_keep,
    grpo_advantages,
    overlong_penalty,
)


def test_grpo_matches_per_group_formula():
    rewards = torch.tensor([1.0, -1.0, -1.0, 1.0, 1.0, 1.0, 0.5])
    groups = torch.tensor([7, 7, 7, 3, 3, 3, 9])  # arbitrary ids, one singleton group
    adv = grpo_advantages(rewards, groups)
    g = torch.tensor([1.0, -1.0, -1.0])
    expected = (g - g.mean()) / (g.std() + 1e-6)
    torch.testing.assert_close(adv[:3], expected)
    torch.testing.assert_close(adv[3:6], torch.zeros(3))
    assert adv[6].item() == 0.0
    plain = grpo_advantages(rewards, groups, norm_by_std=False)
    torch.testing.assert_close(plain[:3], g - g.mean())


def test_grpo_interleaved_groups_and_bad_shapes():
    rewards = torch.tensor([1.0, 0.0, -1.0, 2.0])
    groups = torch.tensor([0, 1, 0, 1])
    adv = grpo_advantages(rewards, groups)
    assert adv[0] > 0 > adv[2] and adv[3] > 0 > adv[1]
    with pytest.raises(ValueError, match="group_ids"):
        grpo_advantages(rewards, torch.tensor([0, 1]))


def test_overlong_penalty_recipe_numbers():
    lengths = torch.tensor([100, 16384, 16385, 18432, 20480])
    pen = overlong_penalty(lengths, max_response_length=20480, buffer_length=4096)
    torch.testing.assert_close(pen, torch.tensor([0.0, 0.0, -1 / 4096, -0.5, -1.0]))
    half = overlong_penalty(lengths, 20480, 4096, penalty_factor=0.5)
    torch.testing.assert_close(half, pen * 0.5)
    with pytest.raises(ValueError, match="buffer_length"):
        overlong_penalty(lengths, 100, 200)


def test_dynamic_sampling_drops_constant_groups():
    rewards = torch.tensor([1.0, 1.0, -1.0, 1.0, -1.0, -1.0, 0.3])
    groups = torch.tensor([0, 0, 1, 1, 2, 2, 3])
    keep = dynamic_sampling_keep(rewards, groups)
    assert keep.tolist() == [False, False, True, True, False, False, False]
