"""Estimators of tools/eval_metrics.py against hand-computed values."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest

from tools.eval_metrics import (
    length_stats,
    majority_vote,
    normalize_answer,
    overall_metrics,
    pass_at_k,
    problem_metrics,
)


@pytest.mark.parametrize(
    ("n", "c", "k", "expected"),
    [
        (4, 1, 2, 0.5),  # 1 - C(3,2)/C(4,2) = 1 - 3/6
        (5, 2, 2, 0.7),  # 1 - C(3,2)/C(5,2) = 1 - 3/10
        (10, 3, 1, 0.3),  # pass@1 is the accuracy
        (6, 2, 3, 0.8),  # 1 - C(4,3)/C(6,3) = 1 - 4/20
        (4, 1, 4, 1.0),  # n = k: any correct sample passes
        (4, 0, 4, 0.0),  # n = k, c = 0
        (7, 0, 3, 0.0),  # c = 0
        (7, 7, 3, 1.0),  # c = n
        (5, 3, 3, 1.0),  # n - c < k: every draw holds a correct one
        (1, 1, 1, 1.0),
        (1, 0, 1, 0.0),
    ],
)
def test_pass_at_k_hand_values(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


def test_pass_at_k_matches_exact_binomials():
    for n in (1, 2, 5, 16, 32):
        for c in range(n + 1):
            for k in range(1, n + 1):
                exact = 1 - Fraction(math.comb(n - c, k), math.comb(n, k))
                assert pass_at_k(n, c, k) == pytest.approx(float(exact), abs=1e-12)


def test_pass_at_k_stable_for_large_n():
    # C(3000, 1500) overflows a float; the product form does not.
    value = pass_at_k(3000, 3, 1500)
    exact = 1 - Fraction(math.comb(2997, 1500), math.comb(3000, 1500))
    assert value == pytest.approx(float(exact), rel=1e-12)
    assert pass_at_k(3000, 1, 1) == pytest.approx(1 / 3000, rel=1e-12)


@pytest.mark.parametrize(("n", "c", "k"), [(0, 0, 1), (4, 5, 1), (4, -1, 1), (4, 1, 0), (4, 1, 5)])
def test_pass_at_k_rejects_bad_counts(n, c, k):
    with pytest.raises(ValueError):
        pass_at_k(n, c, k)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (" 42 ", "42"),
        ("$042$", "42"),
        ("\\boxed{7}", "7"),
        ("1,000", "1000"),
        ("5.0", "5"),
        ("+3", "3"),
        ("0.50", "0.5"),
        ("\\frac{1}{2}", "\\frac{1}{2}"),
        ("\\text{ yes }.", "yes"),
        ("x = 2", "x=2"),
        ("", None),
        ("  $ $ ", None),
        (None, None),
    ],
)
def test_normalize_answer(raw, expected):
    assert normalize_answer(raw) == expected


def test_majority_vote_counts_normalised_answers():
    assert majority_vote(["12", "7", "012", "12.0", "7"]) == ("12", 0)


def test_majority_vote_tie_goes_to_first_occurrence():
    # 5 and 3 both appear twice; 5 appeared first.
    assert majority_vote(["5", "3", "3", "5"]) == ("5", 0)
    assert majority_vote([None, "3", "5", "5", "3"]) == ("3", 1)
    # Tie rule does not depend on string order.
    assert majority_vote(["b", "a"]) == ("b", 0)


def test_majority_vote_ignores_missing_answers():
    assert majority_vote([None, None, "9"]) == ("9", 2)
    assert majority_vote([None, "", "  "]) == (None, -1)
    assert majority_vote([]) == (None, -1)


def test_length_stats_hand_values():
    stats = length_stats([10, 20, 30, 40], [False, False, False, True])
    assert stats["mean"] == 25.0
    assert stats["std"] == pytest.approx(math.sqrt(125.0))
    assert stats["min"] == 10.0 and stats["max"] == 40.0
    assert stats["median"] == 25.0
    assert stats["p90"] == pytest.approx(37.0)  # position 2.7 between 30 and 40
    assert stats["clip_ratio"] == 0.25
    with pytest.raises(ValueError, match="at least one"):
        length_stats([], [])
    with pytest.raises(ValueError, match="truncated"):
        length_stats([1, 2], [False])


def test_problem_metrics_cons_correct_follows_voted_sample():
    # Voted answer "4" (three votes); the grader marked those samples correct.
    metrics = problem_metrics(
        "p0",
        correct=[False, True, True, True],
        answers=["5", "4", "4.0", "$4$"],
        lengths=[3, 5, 7, 9],
        truncated=[True, False, False, False],
        ks=[1, 2, 8],
    )
    assert metrics.num_correct == 3 and metrics.accuracy == 0.75
    assert metrics.pass_at == {1: 0.75, 2: 1.0}  # k = 8 > n is left out
    assert metrics.voted_answer == "4" and metrics.cons_correct
    assert metrics.lengths["clip_ratio"] == 0.25
    # A tie between a wrong and a right answer: the first one (wrong) wins.
    tie = problem_metrics("p1", [False, True], ["1", "2"], [1, 1], [False, False], [1])
    assert tie.voted_answer == "1" and not tie.cons_correct
    # No sample has an answer: cons is wrong.
    none = problem_metrics("p2", [False], [None], [4], [True], [1])
    assert none.voted_answer is None and not none.cons_correct


def test_problem_metrics_rejects_mismatched_lengths():
    with pytest.raises(ValueError, match="answers"):
        problem_metrics("p", [True, False], ["1"], [1, 2], [False, False], [1])
    with pytest.raises(ValueError, match="no samples"):
        problem_metrics("p", [], [], [], [], [1])


def test_overall_metrics_weights_problems_equally():
    first = problem_metrics("a", [True, False], ["1", "2"], [2, 4], [False, False], [1, 2])
    second = problem_metrics("b", [False, False], ["3", "3"], [6, 8], [False, True], [1, 2])
    summary = overall_metrics([first, second], [2, 4, 6, 8], [False, False, False, True])
    assert summary["avg@2"] == 0.25
    assert summary["pass@1"] == 0.25
    assert summary["pass@2"] == 0.5
    assert summary["cons@2"] == 0.5  # "1" wins the tie in a and is right; b votes wrong "3"
    assert summary["response_length/mean"] == 5.0
    assert summary["response_length/clip_ratio"] == 0.25
    assert summary["num_problems"] == 2.0
    third = problem_metrics("c", [True], ["1"], [1], [False], [1])
    with pytest.raises(ValueError, match="different sample counts"):
        overall_metrics([first, third], [1], [False])
