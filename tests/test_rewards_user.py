"""User reward functions ("module:function") in the reward pool: scores, every failure mode
(raise, hang, busy loop, bad return value, SystemExit, worker crash), bad paths, build_reward.

One pool is shared by most tests (``mixed``: tests/reward_fns.py:mixed_reward, 2 workers, 0.5 s
deadline); worker start-up is the cost, so the bad-path tests use a single worker each.
"""

from __future__ import annotations

import math
import os
import re
import sys
import time

import pytest

from megatron_fipo.config import RewardConfig
from megatron_fipo.rewards import MathReward, RewardPool, RewardResult, build_reward

TIMEOUT_S = 0.5


@pytest.fixture(scope="module")
def mixed():
    config = RewardConfig(function="reward_fns:mixed_reward", timeout_s=TIMEOUT_S, num_workers=2)
    with build_reward(config) as pool:
        assert type(pool) is RewardPool
        yield pool


def _score(pool: RewardPool, responses: list[str]) -> list[RewardResult]:
    return pool.score_batch(responses, ["gold"] * len(responses))


def _error(reason: str) -> RewardResult:
    return RewardResult(-1.0, False, None, reason)


def test_scores_come_back_in_order(mixed):
    responses = [f"response {'x' * i}" for i in range(20)]
    results = _score(mixed, responses)
    assert results == [RewardResult(float(len(r)), True, None, "scored") for r in responses]
    assert _score(mixed, [""]) == [RewardResult(0.0, False, None, "scored")]
    assert mixed.score_batch([], []) == []
    assert mixed.last_budget_timeouts == 0


def test_user_code_runs_only_in_workers(mixed):
    (result,) = _score(mixed, ["pid"])
    assert result.reward > 0 and int(result.reward) != os.getpid()
    # Fields of user-defined str subclasses arrive as plain values.
    (result,) = _score(mixed, ["labels"])
    assert result == RewardResult(1.0, True, "answer", "why")
    assert type(result.reward) is float and type(result.reason) is type(result.extracted) is str
    assert "reward_fns" not in sys.modules  # never imported by the trainer process


def test_extras_reach_the_function_and_results_pass_through(mixed):
    results = mixed.score_batch(
        ["result", "result", "abcd"],
        ["yes", "no", "gold"],
        [{"data_source": "aime"}, {"data_source": "dapo"}, {"data_source": "x"}],
    )
    assert results == [
        RewardResult(0.25, True, "yes", "source=aime"),
        RewardResult(0.25, False, "no", "source=dapo"),
        RewardResult(4.0, True, None, "scored"),
    ]
    assert mixed.score("result", "yes", data_source="s") == RewardResult(
        0.25, True, "yes", "source=s"
    )


def test_raising_function_scores_an_error_and_the_pool_goes_on(mixed):
    restarts = mixed.num_restarts
    results = _score(mixed, ["raise", "ok", "raise"])
    assert results == [
        _error("error: RuntimeError: cannot score 'raise'"),
        RewardResult(2.0, True, None, "scored"),
        _error("error: RuntimeError: cannot score 'raise'"),
    ]
    assert mixed.num_restarts == restarts  # an exception does not cost a worker
    # An unknown keyword is the function raising TypeError, not the pool failing.
    (result,) = mixed.score_batch(["ok"], ["gold"], [{"no_such_argument": 1}])
    assert result.reason.startswith("error: TypeError: mixed_reward() got an unexpected keyword")


@pytest.mark.parametrize("how", ["hang", "spin"])
def test_hanging_function_is_killed_at_the_deadline(mixed, how):
    restarts = mixed.num_restarts
    start = time.perf_counter()
    (result,) = _score(mixed, [how])
    elapsed = time.perf_counter() - start
    assert result == _error("timeout")
    assert TIMEOUT_S <= elapsed < TIMEOUT_S + 2.5, elapsed
    assert mixed.num_restarts == restarts + 1
    assert _score(mixed, ["after"]) == [RewardResult(5.0, True, None, "scored")]


@pytest.mark.parametrize(
    "response, reason",
    [
        ("abc", "TypeError: reward function returned 'abc' (str); expected a finite number"),
        ("none", "TypeError: reward function returned None (NoneType); expected a finite number"),
        ("bool", "TypeError: reward function returned True (bool); expected a finite number"),
        ("nan", "ValueError: reward function returned nan (float); the reward must be finite"),
        ("inf", "ValueError: reward function returned -inf (float); the reward must be finite"),
        ("nan_result", "ValueError: reward function returned nan (float); the reward must be"),
        ("bad_correct", "TypeError: RewardResult.correct must be a bool, got 'yes' (str)"),
    ],
)
def test_bad_return_values_are_errors_naming_the_value(mixed, response, reason):
    (result,) = _score(mixed, [response])
    assert result.reward == -1.0 and not result.correct and result.extracted is None
    assert result.reason.startswith("error: " + reason), result.reason


def test_exit_and_crash(mixed):
    restarts = mixed.num_restarts
    exited, crashed, fine = _score(mixed, ["exit", "crash", "fine"])
    assert exited == _error("error: SystemExit: 3")
    assert crashed == _error("error: reward worker died (exit code 7)")
    assert fine == RewardResult(4.0, True, None, "scored")
    assert mixed.num_restarts == restarts + 1  # only the crash cost a worker


def test_a_batch_of_every_failure_keeps_order_and_never_hangs(mixed):
    expected = {"hang": "timeout", "spin": "timeout", "raise": "error", "abc": "error"}
    expected.update({"crash": "error", "nan": "error", "a": "scored", "bb": "scored"})
    responses = ["hang", "a", "raise", "spin", "abc", "crash", "bb", "nan", "hang", "a"]
    start = time.perf_counter()
    results = _score(mixed, responses)
    elapsed = time.perf_counter() - start
    # 3 overruns of 0.5 s on 2 workers, plus 4 worker restarts (each imports the package).
    assert elapsed < 15.0, elapsed
    assert [r.reason.split(":")[0] for r in results] == [expected[r] for r in responses]
    assert [r.reward for r in results if r.reason == "scored"] == [1.0, 2.0, 1.0]
    assert all(r.reward == -1.0 and not r.correct for r in results if r.reason != "scored")
    # The default budget (30 deadlines) is far from reached: every timeout was a sample's own.
    assert mixed.batch_budget_s == 30 * TIMEOUT_S and mixed.last_budget_timeouts == 0
    assert _score(mixed, ["end"]) == [RewardResult(3.0, True, None, "scored")]


def test_batch_budget_ends_a_batch_of_hostile_samples():
    timeout_s, budget_s, num_hostile = 1.0, 3.0, 20
    responses = ["a", "bb"] + ["hang", "spin"] * (num_hostile // 2)
    with RewardPool(
        "reward_fns:mixed_reward", num_workers=2, timeout_s=timeout_s, batch_budget_s=budget_s
    ) as pool:
        start = time.perf_counter()
        results = _score(pool, responses)
        elapsed = time.perf_counter() - start
        # Without the budget: 20 samples x 1 s / 2 workers, plus a restart per sample (> 10 s).
        # After it: the kill and respawn of the 2 busy workers (Process.start returns before the
        # new interpreter imports anything) and a poll; 2 s covers that on a loaded 2-core box.
        assert budget_s <= elapsed < budget_s + 2.0, elapsed
        assert [r.reason for r in results[:2]] == ["scored", "scored"]
        assert all(r == _error("timeout") for r in results[2:])
        # Within 3 s, 2 workers can overrun their own 1 s deadline at most 3 times each; the
        # other hostile samples were ended by the budget.
        assert num_hostile - 6 <= pool.last_budget_timeouts <= num_hostile - 2
        assert pool.num_budget_timeouts == pool.last_budget_timeouts
        # The pool goes on with fresh workers, and the counter is per batch.
        assert _score(pool, ["after"]) == [RewardResult(5.0, True, None, "scored")]
        assert pool.last_budget_timeouts == 0 and pool.num_budget_timeouts >= num_hostile - 6


def test_bad_batch_arguments(mixed):
    with pytest.raises(ValueError, match="same length"):
        mixed.score_batch(["a"], ["1", "2"])
    with pytest.raises(ValueError, match=r"extras \(2\) and responses \(1\)"):
        mixed.score_batch(["a"], ["1"], [{}, {}])
    with pytest.raises(ValueError, match=r"response must be a str, got int \(sample 1\)"):
        mixed.score_batch(["a", 3], ["1", "2"])
    with pytest.raises(ValueError, match=r"ground truth must be a str, got NoneType"):
        mixed.score_batch(["a"], [None])
    with pytest.raises(ValueError, match=r"extras\[0\] must be a mapping"):
        mixed.score_batch(["a"], ["1"], ["aime"])
    with pytest.raises(ValueError, match="sample 1: arguments cannot be sent"):
        mixed.score_batch(["a", "b"], ["1", "2"], [{}, {"data_source": lambda: 0}])
    assert _score(mixed, ["still works"]) == [RewardResult(11.0, True, None, "scored")]


def test_error_reward_is_configurable():
    with RewardPool("reward_fns:raising_reward", num_workers=1, error_reward=0.0) as pool:
        assert pool.score("x", "y") == RewardResult(
            0.0, False, None, "error: RuntimeError: cannot score 'x'"
        )


@pytest.mark.parametrize(
    "path, message",
    [
        ("reward_fns:no_such_function", "module 'reward_fns' has no attribute 'no_such_function'"),
        ("reward_fns:NOT_CALLABLE", "'NOT_CALLABLE' is a int, not a callable"),
        ("no_such_module_xyz:fn", "cannot import module 'no_such_module_xyz': ModuleNotFoundError"),
        ("reward_fns_broken:reward", "RuntimeError: this reward module is broken on purpose"),
    ],
)
def test_bad_function_path_fails_at_construction(path, message):
    start = time.perf_counter()
    with pytest.raises(ValueError, match=f"reward function '{path}': .*{re.escape(message)}"):
        RewardPool(path, num_workers=1)
    assert time.perf_counter() - start < 30.0
    assert path.partition(":")[0] not in sys.modules


@pytest.mark.parametrize("path", ["reward_fns", "a:b:c", ":fn", "module:"])
def test_malformed_function_path(path):
    with pytest.raises(ValueError, match="must look like 'package.module:function'"):
        RewardPool(path)


def test_pool_arguments():
    for kwargs, field in [
        ({"num_workers": 0}, "num_workers"),
        ({"timeout_s": 0}, "timeout_s"),
        ({"timeout_s": math.inf}, "timeout_s"),
        ({"timeout_s": 2.0, "batch_budget_s": 1.0}, r"batch_budget_s must be .* >= timeout_s"),
        ({"batch_budget_s": math.inf}, "batch_budget_s must be finite"),
        ({"error_reward": math.nan}, "error_reward"),
        ({"memory_limit_mb": 1}, "memory_limit_mb"),
    ]:
        with pytest.raises(ValueError, match=field):
            RewardPool("reward_fns:length_reward", **kwargs)


def test_build_reward_without_function_is_the_math_reward():
    with build_reward(RewardConfig(num_workers=1, timeout_s=2.0, batch_budget_s=9.0)) as pool:
        assert isinstance(pool, MathReward) and pool.timeout_s == 2.0
        assert pool.batch_budget_s == 9.0
        results = pool.score_batch(
            ["\\boxed{\\frac{1}{2}}", "\\boxed{3}"], ["0.5", "4"], [{"data_source": "x"}] * 2
        )
        assert [r.reason for r in results] == ["correct", "wrong"]


def test_closed_pool_refuses_work():
    with RewardPool("reward_fns:length_reward", num_workers=1) as pool:
        assert pool.score("ab", "") == RewardResult(2.0, True, None, "scored")
    pool.close()
    with pytest.raises(RuntimeError, match="RewardPool is closed"):
        pool.score("ab", "")
