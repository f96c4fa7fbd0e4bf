"""Verifiable rewards in worker processes with deadlines.

``RewardPool`` runs any ``"package.module:function"`` reward; ``MathReward`` is that pool running
the built-in math answer checker; ``build_reward(config.reward)`` picks one. ``math_reward``
scores one answer in the calling process (no deadline).
"""

from megatron_fipo.rewards.extraction import MAX_EXAMINED_CHARS, extract_answer
from megatron_fipo.rewards.math_reward import (
    MAX_ANSWER_CHARS,
    MathReward,
    check_ground_truth,
    math_reward,
)
from megatron_fipo.rewards.pool import RewardPool, RewardResult, build_reward, resolve_function

__all__ = [
    "MAX_ANSWER_CHARS",
    "MAX_EXAMINED_CHARS",
    "MathReward",
    "RewardPool",
    "RewardResult",
    "build_reward",
    "check_ground_truth",
    "extract_answer",
    "math_reward",
    "resolve_function",
]
