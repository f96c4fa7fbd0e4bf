"""User reward functions for tests/test_rewards_user.py, loaded by dotted path ("reward_fns:...")
inside reward worker processes only (pytest puts tests/ on sys.path; spawned workers inherit it).

``mixed_reward`` misbehaves on request (the response names how), so one shared pool can exercise
every failure mode.
"""

import math
import os
import sys
import time

from megatron_fipo.rewards import RewardResult

NOT_CALLABLE = 42


def length_reward(response: str, ground_truth: str, **extra) -> float:
    """A well-behaved reward: the response length."""
    return float(len(response))


def raising_reward(response: str, ground_truth: str, **extra) -> float:
    raise RuntimeError(f"cannot score {response!r}")


def hanging_reward(response: str, ground_truth: str, **extra) -> float:
    while True:
        time.sleep(60)


def spinning_reward() -> float:
    """Busy forever without sleeping (a pathological computation)."""
    count = 0
    while True:
        count += 1


class Label(str):
    """A str subclass only this module defines: the trainer must never need to unpickle it."""


_BAD_VALUES = {
    "abc": "abc",
    "nan": math.nan,
    "inf": -math.inf,
    "bool": True,
    "none": None,
    "bad_correct": RewardResult(1.0, "yes"),  # type: ignore[arg-type]
    "nan_result": RewardResult(math.nan, False),
}


def mixed_reward(response: str, ground_truth: str, data_source: str = "none") -> float:
    """Length reward, except for responses that name a way to misbehave."""
    if response == "raise":
        return raising_reward(response, ground_truth)
    if response == "hang":
        return hanging_reward(response, ground_truth)
    if response == "spin":
        return spinning_reward()
    if response == "exit":
        sys.exit(3)
    if response == "crash":
        os._exit(7)
    if response == "pid":
        return float(os.getpid())
    if response in _BAD_VALUES:
        return _BAD_VALUES[response]
    if response == "labels":
        return RewardResult(1, True, Label("answer"), Label("why"))
    if response == "result":
        return RewardResult(0.25, ground_truth == "yes", ground_truth, f"source={data_source}")
    return length_reward(response, ground_truth)
