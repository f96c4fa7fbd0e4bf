"""Math answer reward: +1 if a response's final answer equals the ground truth, else -1.

What it computes, per sample: ``extract_answer(response)`` (last ``\\boxed{}``, else DAPO's last
``Answer:`` line; see ``extraction.py``), then

- no answer                                   -> -1, reason "no_answer"
- answer longer than ``MAX_ANSWER_CHARS``     -> -1, reason "too_long" (never parsed)
- answer and ground truth both plain integers -> compared as integers in the calling process
- otherwise math-verify 0.9 decides: ``verify(parse(gold), parse(answer))`` -> "correct" / "wrong".

math-verify (sympy underneath) can run for seconds to forever on adversarial LaTeX (ten nested
brace groups already take seconds), and its own time limits use ``signal.alarm``, which only works
in a main thread. So ``MathReward`` is a ``RewardPool`` (``pool.py``) whose workers run
math-verify with its time limits off, under the pool's own per-sample deadline: a worker that
overruns is killed (SIGKILL) and replaced, and the sample scores -1 with reason "timeout". A
batch has a budget too (``batch_budget_s``): samples still unscored when it runs out score the
same way, so a batch of hostile answers costs the budget, not num_samples x the deadline.
Extraction and plain-integer comparisons are cheap and linear-time, so they stay in the calling
process; only the math-verify comparison is sent to a worker.
Errors raised inside math-verify score -1 with reason "error: <type>: <message>"; a worker that
dies scores its sample the same way and is replaced. Nothing a response contains can crash or
hang the caller. Model output is only parsed as text, never executed or eval'd.

Ground truths are data, not model output: a ground truth that is empty, has unbalanced braces,
is longer than ``MAX_ANSWER_CHARS``, or that math-verify cannot parse into a math expression makes
``score`` / ``score_batch`` / ``math_reward`` raise ``ValueError`` naming it, because scoring it
silently (every response wrong) would corrupt training without anyone noticing.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from functools import lru_cache
from typing import Any

from math_verify import LatexExtractionConfig, parse, verify
from sympy import Basic, MatrixBase

from megatron_fipo.rewards.extraction import braces_balanced, extract_answer
from megatron_fipo.rewards.pool import RewardPool, RewardResult

MAX_ANSWER_CHARS = 1000
"""Extracted answers (and ground truths) longer than this are never handed to math-verify."""

_PLAIN_INTEGER = re.compile(r"[+-]?\d{1,64}")
# LaTeX extraction only: math-verify's plain-expression extractor hands text to sympy's
# parse_expr, which is built on eval(); the LaTeX path builds sympy objects from a parse tree.
_LATEX_ONLY = (LatexExtractionConfig(),)


def _result(extracted: str | None, reason: str) -> RewardResult:
    correct = reason == "correct"
    return RewardResult(1.0 if correct else -1.0, correct, extracted, reason)


def check_ground_truth(ground_truth: str) -> str:
    """Return the stripped ground truth, or raise ValueError naming what is wrong with it."""
    if not isinstance(ground_truth, str):
        raise ValueError(f"ground truth must be a str, got {type(ground_truth).__name__}")
    gold = ground_truth.strip()
    if not gold:
        raise ValueError(f"ground truth {ground_truth!r} is empty")
    if len(gold) > MAX_ANSWER_CHARS:
        raise ValueError(
            f"ground truth {gold[:80]!r}... is {len(gold)} characters, over {MAX_ANSWER_CHARS}"
        )
    if not braces_balanced(gold):
        raise ValueError(f"ground truth {gold!r} has unbalanced braces")
    return gold


def _quick_verdict(extracted: str | None, gold: str) -> RewardResult | None:
    """The verdict when it needs no math-verify call, else None."""
    if extracted is None:
        return _result(None, "no_answer")
    if len(extracted) > MAX_ANSWER_CHARS:
        return _result(extracted, "too_long")
    answer = extracted.strip("$ ").rstrip(".")
    if _PLAIN_INTEGER.fullmatch(gold) and _PLAIN_INTEGER.fullmatch(answer):
        return _result(extracted, "correct" if int(answer) == int(gold) else "wrong")
    return None


class _BadGroundTruthError(Exception):
    pass


@lru_cache(maxsize=4096)
def _parse_gold(gold: str) -> list:
    """math-verify's parse of a ground truth (cached: each prompt's is reused by its group)."""
    parsed = parse("\\boxed{" + gold + "}", _LATEX_ONLY, parsing_timeout=None, raise_on_error=True)
    if not any(isinstance(item, (Basic, MatrixBase)) for item in parsed):
        raise _BadGroundTruthError(
            f"ground truth {gold!r} is not a math expression math-verify can parse"
        )
    return parsed


def _compare(extracted: str, gold: str) -> str:
    """Verdict of math-verify: "correct", "wrong" or "error: ..."; raises _BadGroundTruthError.

    No time limit here: callers run it in a worker process with a deadline, or accept the risk.
    """
    gold_parsed = _parse_gold(gold)
    # Box answers are wrapped back into a box so math-verify reads them as LaTeX; an Answer-line
    # answer with `$` math (or stray braces) is handed over as text for math-verify to search.
    if "$" in extracted or not braces_balanced(extracted):
        text = extracted
    else:
        text = "\\boxed{" + extracted + "}"
    try:
        answer = parse(text, _LATEX_ONLY, parsing_timeout=None, raise_on_error=True)
        same = verify(gold_parsed, answer, timeout_seconds=None, raise_on_error=True)
    except Exception as error:  # anything sympy raises on model output is the answer's fault
        return f"error: {type(error).__name__}: {str(error)[:200]}"
    return "correct" if same else "wrong"


def math_reward(response: str, ground_truth: str) -> RewardResult:
    """Score one response in the calling process, for one-off use (scripts, notebooks, eval).

    WARNING: no time limit. A pathological response can keep math-verify busy for minutes;
    training and anything else that scores model output at scale must use ``MathReward``.
    Raises ValueError for a malformed ground truth (see the module docstring).
    """
    gold = check_ground_truth(ground_truth)
    extracted = extract_answer(response)
    quick = _quick_verdict(extracted, gold)
    if quick is not None:
        return quick
    try:
        return _result(extracted, _compare(extracted, gold))
    except _BadGroundTruthError as error:
        raise ValueError(str(error)) from None


def _score_in_worker(extracted: str, gold: str) -> RewardResult:
    """The pool's scoring function (runs in a worker): math-verify's verdict on an extracted
    answer. Raises _BadGroundTruthError for a ground truth math-verify cannot parse."""
    return _result(extracted, _compare(extracted, gold))


def _warm_up() -> None:
    """Runs in each worker before it reports ready."""
    # We enforce deadlines ourselves; silence math-verify's "timeout is disabled" warning.
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    # sympy builds caches on first use (a cold first comparison costs ~1 s); pay that before
    # reporting ready, so it never counts against a sample's deadline.
    _compare("x^2+2x+1", "(x+1)^2")
    _compare("0.5", "\\frac{1}{2}")


class MathReward(RewardPool):
    """Math answer reward with a per-sample deadline, scored in ``num_workers`` processes.

    A ``RewardPool`` running the built-in checker: use as a context manager (or call ``close``);
    ``score_batch`` is the fast path, results come back in input order; the constructor blocks
    until the workers are up. Calls are serialised by a lock, so one instance may be shared by
    threads, but it is not parallel across them. Workers are spawned, so a script that builds a
    ``MathReward`` must keep its top level under ``if __name__ == "__main__":`` (the spawned
    interpreter re-imports the main module).

    Args:
        num_workers: worker processes (each holds a sympy/math-verify interpreter, ~100 MB).
        timeout_s: per-sample deadline for math-verify, counted from the moment the sample is
            handed to a ready worker (worker start-up does not count against it).
        batch_budget_s: time budget of one ``score_batch`` (see ``RewardPool``; None: 30
            per-sample deadlines); samples still unscored when it runs out score "timeout".
        memory_limit_mb: address-space limit of each worker (None: no limit).
        start_timeout_s: how long a worker may take to start before RuntimeError.
    """

    def __init__(
        self,
        num_workers: int = 2,
        timeout_s: float = 5.0,
        batch_budget_s: float | None = None,
        memory_limit_mb: int | None = 4096,
        start_timeout_s: float = 120.0,
    ) -> None:
        super().__init__(
            f"{__name__}:_score_in_worker",
            num_workers=num_workers,
            timeout_s=timeout_s,
            batch_budget_s=batch_budget_s,
            error_reward=-1.0,
            memory_limit_mb=memory_limit_mb,
            start_timeout_s=start_timeout_s,
            warmup=f"{__name__}:_warm_up",
        )

    def score(self, response: str, ground_truth: str, **extra: Any) -> RewardResult:
        """Score one response; raises ValueError for a malformed ground truth."""
        return self.score_batch([response], [ground_truth])[0]

    def score_batch(
        self,
        responses: Sequence[str],
        ground_truths: Sequence[str],
        extras: Sequence[Mapping[str, Any]] | None = None,
    ) -> list[RewardResult]:
        """Score ``responses[i]`` against ``ground_truths[i]``; results in input order.

        ``extras`` (per-sample fields such as ``data_source``) is accepted for the
        ``RewardPool`` interface and not used. Raises ValueError (after the batch is scored, so
        the pool stays consistent) naming the first malformed ground truth.
        """
        if len(responses) != len(ground_truths):
            raise ValueError(
                f"responses ({len(responses)}) and ground_truths ({len(ground_truths)}) "
                "must have the same length"
            )
        golds = [check_ground_truth(ground_truth) for ground_truth in ground_truths]
        results: list[RewardResult | None] = [None] * len(golds)
        jobs = []
        for index, (response, gold) in enumerate(zip(responses, golds)):
            extracted = extract_answer(response)
            results[index] = _quick_verdict(extracted, gold)
            if results[index] is None:
                jobs.append((index, (extracted, gold), {}))
        outcomes = self.run_jobs(jobs)
        bad_ground_truths = []
        for index, (extracted, _), _ in jobs:
            kind, detail = outcomes[index]
            if kind == "raised" and detail[0] == _BadGroundTruthError.__name__:
                bad_ground_truths.append(detail[1])
            results[index] = self.outcome_result(outcomes[index], extracted)
        if bad_ground_truths:
            raise ValueError(
                f"{len(bad_ground_truths)} malformed ground truth(s); first: {bad_ground_truths[0]}"
            )
        return results
