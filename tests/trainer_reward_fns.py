"""Reward functions for tests/test_trainer.py (loaded by dotted path inside reward workers).

``flaky_length_reward`` is deterministic in the response text: most responses score by length,
about one in eight raises and about one in twenty hangs, so a few-step run exercises the pool's
error and deadline paths inside the real loop without becoming nondeterministic.
"""

import time
import zlib


def flaky_length_reward(response: str, ground_truth: str, **extra) -> float:
    bucket = zlib.crc32(response.encode()) % 40
    if bucket < 5:
        raise RuntimeError("this reward function fails on purpose")
    if bucket < 7:
        time.sleep(3600)
    return float(len(response) % 11)
