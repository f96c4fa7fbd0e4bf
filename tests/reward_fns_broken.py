"""A reward module whose import fails (tests/test_rewards_user.py: bad paths)."""

raise RuntimeError("this reward module is broken on purpose")


def reward(response: str, ground_truth: str) -> float:
    return 0.0
