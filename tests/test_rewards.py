"""Math answer reward: extraction, math-verify comparison, deadlines and worker replacement.

Two pools are shared by the whole file (spawning a worker costs a sympy import): ``reward`` with
the default 5 s deadline and ``strict_reward`` with a 0.5 s deadline for the timeout tests.
"""

from __future__ import annotations

import os
import random
import signal
import threading
import time

import pytest

from megatron_fipo.rewards import (
    MAX_ANSWER_CHARS,
    MAX_EXAMINED_CHARS,
    MathReward,
    RewardResult,
    extract_answer,
    math_reward,
)

# Brace groups nested this deep keep math-verify's LaTeX parser busy for minutes (it is
# exponential in the depth: 15 levels already take seconds), yet the answer is only 57 chars.
SLOW_ANSWER = "{" * 25 + "1" + "}" * 25
SLOW_RESPONSE = "\\boxed{" + SLOW_ANSWER + "}"


def _warm(pool: MathReward) -> MathReward:
    # Blocks until the workers are up, so timings in the tests exclude start-up.
    assert pool.score_batch(["\\boxed{0.5}"] * 2, ["\\frac{1}{2}"] * 2)[0].correct
    return pool


@pytest.fixture(scope="module")
def reward():
    with MathReward(num_workers=2, timeout_s=5.0) as pool:
        yield _warm(pool)


@pytest.fixture(scope="module")
def strict_reward():
    with MathReward(num_workers=1, timeout_s=0.5) as pool:
        yield _warm(pool)


# ---------------------------------------------------------------- extraction (no processes)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("so the answer is \\boxed{42}.", "42"),
        ("\\boxed{\\frac{\\sqrt{3}}{2}}", "\\frac{\\sqrt{3}}{2}"),
        ("first \\boxed{3}, then finally \\boxed{5}", "5"),
        ("\\boxed{\\{1, 2\\}}", "\\{1, 2\\}"),  # escaped braces are not grouping
        ("$\\boxed 7$", "7"),
        ("\\fbox{12}", "12"),
        ("\\boxed{ x^2 }", "x^2"),
        ("\\boxedfoo{3}", None),  # another command, not a box
        ("\\boxed{}", None),
        ("\\boxed{\\frac{1}{2}", None),  # unbalanced: the final box never closes
        ("\\boxed{1} and at the end \\boxed{", None),
        ("Reasoning...\nAnswer: $42$", "42"),
        ("Reasoning...\nAnswer: 42", "42"),
        ("**Answer:** $\\frac{1}{2}$.\n", "\\frac{1}{2}"),
        ("Answer: 1\nmore thoughts\nAnswer: 2", "2"),
        ("Answer: \\boxed{9}\nAnswer: 3", "9"),  # a box beats an Answer line
        ("no answer here", None),
        ("Answer:   \n", None),
        ("", None),
    ],
)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


def test_extract_answer_rejects_non_string():
    with pytest.raises(ValueError, match="response must be a str"):
        extract_answer(None)


def test_extraction_only_examines_the_tail():
    early_box = "\\boxed{1}" + "x" * MAX_EXAMINED_CHARS
    assert extract_answer(early_box) is None
    assert extract_answer(early_box + "\\boxed{2}") == "2"


@pytest.mark.parametrize(
    "text",
    [
        "{" * 1_000_000,
        "\\boxed{" * 150_000,
        "Answer:" * 150_000,
        "\\" * 1_000_000,
        "\\boxed{" + "{" * 6000 + "1" + "}" * 6000 + "}" + "}" * 1_000_000,
    ],
    ids=["open-braces", "boxes", "answer-markers", "backslashes", "deep-then-closers"],
)
def test_extraction_is_fast_on_adversarial_text(text):
    start = time.perf_counter()
    extract_answer(text)
    assert time.perf_counter() - start < 0.5


# ---------------------------------------------------------------- scoring through the pool

CASES = [
    # (response, ground truth, correct, reason)
    ("Thus \\boxed{42}.", "42", True, "correct"),
    ("\\boxed{\\frac{1}{2}}", "0.5", True, "correct"),
    ("\\boxed{0.5}", "\\frac{1}{2}", True, "correct"),
    ("\\boxed{\\dfrac{1}{2}}", "\\frac{1}{2}", True, "correct"),
    ("\\boxed{x^2+2x+1}", "(x+1)^2", True, "correct"),
    ("\\boxed{\\frac{\\sqrt{2}}{2}}", "\\frac{1}{\\sqrt{2}}", True, "correct"),
    ("\\fbox{-7}", "-7", True, "correct"),
    ("Work.\nAnswer: $42$", "42", True, "correct"),
    ("Work.\nAnswer: 3/4", "\\frac{3}{4}", True, "correct"),
    ("**Answer:** $\\frac{1}{3}$.", "1/3", True, "correct"),
    ("\\boxed{1,000}", "1000", True, "correct"),
    ("\\boxed{x = 5}", "5", True, "correct"),
    ("\\boxed{42^\\circ}", "42", True, "correct"),
    ("Answer: The total is $42$ dollars.", "42", True, "correct"),
    ("\\boxed{41}", "42", False, "wrong"),
    ("\\boxed{\\frac{1}{3}}", "0.5", False, "wrong"),
    ("\\boxed{x^2+1}", "(x+1)^2", False, "wrong"),
    ("\\boxed{3} is tempting but \\boxed{5}", "3", False, "wrong"),
    ("Answer: $43$", "42", False, "wrong"),
    ("I give up.", "42", False, "no_answer"),
    ("\\boxed{\\frac{1}{2}", "0.5", False, "no_answer"),
    ("\\boxed{}", "1", False, "no_answer"),
]


def _check(result: RewardResult, correct: bool, reason: str) -> None:
    assert result.correct is correct, result
    assert result.reward == (1.0 if correct else -1.0), result
    assert result.reason == reason, result


@pytest.mark.parametrize("response, gold, correct, reason", CASES)
def test_score(reward, response, gold, correct, reason):
    result = reward.score(response, gold)
    _check(result, correct, reason)
    assert result.extracted == extract_answer(response)


def test_batch_matches_single_scores_and_keeps_order(reward):
    cases = CASES * 3
    results = reward.score_batch([c[0] for c in cases], [c[1] for c in cases])
    assert len(results) == len(cases)
    for result, (response, _, correct, reason) in zip(results, cases):
        _check(result, correct, reason)
        assert result.extracted == extract_answer(response)


def test_in_process_math_reward_agrees():
    for response, gold, correct, reason in CASES[::3]:
        _check(math_reward(response, gold), correct, reason)


@pytest.mark.parametrize(
    "gold, message",
    [
        ("", "is empty"),
        ("   ", "is empty"),
        ("\\frac{1}{", "unbalanced braces"),
        ("1" * (MAX_ANSWER_CHARS + 1), "characters, over"),
        ("\\frac{1}{}", "not a math expression"),  # caught by math-verify, in the worker
    ],
)
def test_malformed_ground_truth_raises(reward, gold, message):
    with pytest.raises(ValueError, match=message):
        reward.score("\\boxed{0.5}", gold)
    with pytest.raises(ValueError, match=message):
        math_reward("\\boxed{0.5}", gold)
    # The pool is still usable afterwards.
    assert reward.score("\\boxed{0.5}", "\\frac{1}{2}").correct


def test_bad_arguments(reward):
    with pytest.raises(ValueError, match="ground truth must be a str"):
        reward.score("\\boxed{1}", 1)
    with pytest.raises(ValueError, match="same length"):
        reward.score_batch(["\\boxed{1}"], ["1", "2"])
    with pytest.raises(ValueError, match="num_workers"):
        MathReward(num_workers=0)
    with pytest.raises(ValueError, match="timeout_s"):
        MathReward(timeout_s=0)


# ---------------------------------------------------------------- adversarial input and deadlines

LATEX_TOKENS = (
    "1 2 0 - + x = < \\le ^ _ { } ( ) [ ] , \\frac \\sqrt \\pi \\infty \\cup \\in "
    "\\mathbb{R} \\begin{pmatrix} \\end{pmatrix} & \\\\ \\{ \\} ! \\% \\sin \\log / . \\pm |"
).split()


def test_random_latex_never_breaks_the_pool(reward):
    rng = random.Random(0)
    answers = ["".join(rng.choices(LATEX_TOKENS, k=rng.randint(1, 10))) for _ in range(80)]
    responses = [f"\\boxed{{{a}}}" if i % 4 else f"Answer: ${a}$" for i, a in enumerate(answers)]
    golds = [rng.choice(["1", "x", "(1,2)", "\\frac{1}{2}", "x=1", "[0,\\infty)"]) for _ in answers]
    results = reward.score_batch(responses, golds)
    for result in results:
        assert result.reason in ("correct", "wrong", "no_answer", "timeout") or (
            result.reason.startswith("error: ")
        ), result
        assert result.reward == (1.0 if result.correct else -1.0)
        assert result.correct == (result.reason == "correct")


def test_deeply_nested_answer_is_rejected_quickly(reward):
    start = time.perf_counter()
    result = reward.score("\\boxed{" + "{" * 6000 + "1" + "}" * 6000 + "}", "1")
    assert time.perf_counter() - start < 1.0
    _check(result, False, "too_long")


def test_huge_response_is_scored_quickly(reward):
    filler = "Let me think. " * 75_000  # ~1 MB
    start = time.perf_counter()
    results = reward.score_batch(
        [filler + "\\boxed{\\frac{1}{2}}", filler, "{" * 1_000_000 + "\\boxed{7}"],
        ["0.5", "7", "7"],
    )
    assert time.perf_counter() - start < 2.0
    assert [r.reason for r in results] == ["correct", "no_answer", "correct"]


def test_timeout_fires_and_worker_is_replaced(strict_reward):
    restarts = strict_reward.num_restarts
    start = time.perf_counter()
    result = strict_reward.score(SLOW_RESPONSE, "1")
    elapsed = time.perf_counter() - start
    _check(result, False, "timeout")
    assert result.extracted == SLOW_ANSWER
    assert 0.5 <= elapsed < 3.0, elapsed
    assert strict_reward.num_restarts == restarts + 1
    # The replacement worker scores the next sample correctly.
    _check(strict_reward.score("\\boxed{\\dfrac{1}{2}}", "0.5"), True, "correct")


def test_timeout_in_a_batch_keeps_order(strict_reward):
    responses = ["\\boxed{0.5}", SLOW_RESPONSE, "\\boxed{\\frac{2}{4}}", "\\boxed{0.25}"]
    results = strict_reward.score_batch(responses, ["\\frac{1}{2}"] * 4)
    assert [r.reason for r in results] == ["correct", "timeout", "correct", "wrong"]


def test_batch_budget_caps_a_batch_of_hostile_answers():
    # One worker, 1 s per sample: 8 slow answers would take 8 s plus 8 worker restarts (each a
    # sympy import and warm-up); with a 2 s budget the batch ends after the first overrun.
    budget_s = 2.0
    with _warm(MathReward(num_workers=1, timeout_s=1.0, batch_budget_s=budget_s)) as pool:
        responses = ["\\boxed{\\frac{1}{2}}"] + [SLOW_RESPONSE] * 8 + ["\\boxed{7}"]
        start = time.perf_counter()
        results = pool.score_batch(responses, ["0.5"] + ["1"] * 8 + ["7"])
        elapsed = time.perf_counter() - start
        assert elapsed < budget_s + 1.5, elapsed  # + killing and respawning one worker
        assert [r.reason for r in results] == ["correct"] + ["timeout"] * 8 + ["correct"]
        assert all(r.extracted == SLOW_ANSWER and r.reward == -1.0 for r in results[1:9])
        # At most 2 samples could run to their own 1 s deadline inside the budget.
        assert 6 <= pool.last_budget_timeouts <= 7
        _check(pool.score("\\boxed{\\dfrac{1}{2}}", "0.5"), True, "correct")
        assert pool.last_budget_timeouts == 0


def test_worker_killed_while_idle_is_replaced(reward):
    os.kill(reward._workers[0].process.pid, signal.SIGKILL)
    reward._workers[0].process.join(timeout=5)
    results = reward.score_batch(["\\boxed{0.5}"] * 4, ["\\frac{1}{2}"] * 4)
    assert all(r.correct for r in results)


def test_worker_killed_mid_sample_scores_it_as_error(reward):
    restarts = reward.num_restarts

    def kill_busy_worker():
        deadline = time.monotonic() + 5.0
        while time.monotonic() < deadline:
            busy = [w for w in reward._workers if w.task_id is not None]
            if busy:
                time.sleep(0.1)
                os.kill(busy[0].process.pid, signal.SIGKILL)
                return
            time.sleep(0.01)

    killer = threading.Thread(target=kill_busy_worker)
    killer.start()
    result = reward.score(SLOW_RESPONSE, "1")
    killer.join()
    assert result.reason.startswith("error: reward worker died"), result
    assert not result.correct
    assert reward.num_restarts == restarts + 1
    _check(reward.score("\\boxed{x^2+2x+1}", "(x+1)^2"), True, "correct")


def test_closed_pool_refuses_work():
    pool = MathReward(num_workers=1)
    pool.close()
    pool.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        pool.score_batch(["\\boxed{\\frac{1}{2}}"], ["0.5"])
