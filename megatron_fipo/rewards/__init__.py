"""Verifiable rewards. Math answers: ``MathReward`` (worker pool with deadlines), ``math_reward``."""

from megatron_fipo.rewards.extraction import MAX_EXAMINED_CHARS, extract_answer
from megatron_fipo.rewards.math_reward import (
    MAX_ANSWER_CHARS,
    MathReward,
    RewardResult,
    check_ground_truth,
    math_reward,
)

__all__ = [
    "MAX_ANSWER_CHARS",
    "MAX_EXAMINED_CHARS",
    "MathReward",
    "RewardResult",
    "check_ground_truth",
    "extract_answer",
    "math_reward",
]
