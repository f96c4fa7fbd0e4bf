"""Pure estimators for evaluating k samples per problem (no torch, no model).

For one problem with ``n`` samples of which ``c`` are correct:

- ``avg@n``: mean accuracy ``c / n`` (the paper's AIME "avg@32").
- ``pass@k`` (``k <= n``): the unbiased estimator of the probability that at least one of ``k``
  samples drawn without replacement from the ``n`` is correct,
  ``1 - C(n - c, k) / C(n, k)``, evaluated as the product ``prod_{i = n - c + 1}^{n} (1 - k / i)``
  so that no binomial coefficient (which overflows a float past n of about 1000) is formed.
- ``cons@n``: majority vote over the extracted answers of all ``n`` samples (see
  :func:`majority_vote` for the normalisation and the tie rule); the vote is correct when the
  samples carrying the winning answer were scored correct.
- response length statistics in tokens, and the clip ratio (share of samples that hit the
  max-new-tokens limit).

Overall numbers weight every problem equally (the mean of per-problem values), except the length
statistics, which pool all samples.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field


def pass_at_k(num_samples: int, num_correct: int, k: int) -> float:
    """Unbiased pass@k from ``num_correct`` correct out of ``num_samples`` samples."""
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    if not 0 <= num_correct <= num_samples:
        raise ValueError(f"num_correct must be in [0, {num_samples}], got {num_correct}")
    if not 1 <= k <= num_samples:
        raise ValueError(f"k must be in [1, num_samples={num_samples}], got {k}")
    num_wrong = num_samples - num_correct
    if num_wrong < k:
        # Every draw of k samples must contain a correct one.
        return 1.0
    # C(n-c, k) / C(n, k) = prod_{i=n-c+1}^{n} (1 - k / i): c factors, each in (0, 1].
    miss = 1.0
    for i in range(num_wrong + 1, num_samples + 1):
        miss *= 1.0 - k / i
    return 1.0 - miss


_BOXED = re.compile(r"^\\(?:boxed|fbox)\{(.*)\}$", re.DOTALL)
_TEXT = re.compile(r"\\(?:text|mathrm|textbf)\{([^{}]*)\}")
_INTEGER_WITH_COMMAS = re.compile(r"^[+-]?\d{1,3}(?:,\d{3})+$")
_NUMBER = re.compile(r"^[+-]?(?:\d+\.?\d*|\.\d+)$")


def normalize_answer(answer: str | None) -> str | None:
    """Canonical string of an extracted answer for voting; None (or blank) means no answer.

    Strips surrounding whitespace, ``$`` delimiters, one ``\\boxed{...}`` wrapper, ``\\text{..}``
    wrappers, ``\\left``/``\\right``, inner spaces and a trailing period; thousands separators
    in integers go (``1,000`` -> ``1000``); a plain decimal number is written canonically
    (``042`` -> ``42``, ``5.0`` -> ``5``, ``+3`` -> ``3``). Anything else is compared as text,
    so ``1/2`` and ``\\frac{1}{2}`` stay different votes (voting needs no symbolic solver).
    """
    if answer is None:
        return None
    text = answer.strip().strip("$").strip()
    boxed = _BOXED.match(text)
    if boxed:
        text = boxed.group(1)
    text = _TEXT.sub(r"\1", text)
    text = text.replace("\\left", "").replace("\\right", "").replace("\\!", "")
    text = re.sub(r"\s+", "", text).rstrip(".")
    if not text:
        return None
    if _INTEGER_WITH_COMMAS.match(text):
        text = text.replace(",", "")
    if _NUMBER.match(text):
        value = float(text)
        if value.is_integer() and abs(value) < 2**53:
            return str(int(value))
        return repr(value)
    return text


def majority_vote(answers: Sequence[str | None]) -> tuple[str | None, int]:
    """The most frequent normalised answer and the index of the first sample that gave it.

    Samples without an answer (None after normalisation) do not vote. Tie rule: among answers
    with the highest count, the one whose first occurrence comes earliest in sample order wins
    (deterministic and independent of string order). Returns ``(None, -1)`` when no sample
    has an answer.
    """
    counts: dict[str, int] = {}
    first_index: dict[str, int] = {}
    for index, answer in enumerate(answers):
        key = normalize_answer(answer)
        if key is None:
            continue
        counts[key] = counts.get(key, 0) + 1
        first_index.setdefault(key, index)
    if not counts:
        return None, -1
    # max over keys in first-occurrence order keeps the earliest among equal counts.
    winner = max(sorted(counts, key=first_index.__getitem__), key=counts.__getitem__)
    return winner, first_index[winner]


def _percentile(sorted_values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile ``q`` in [0, 100] of an ascending non-empty sequence."""
    position = (len(sorted_values) - 1) * q / 100.0
    low = math.floor(position)
    high = min(low + 1, len(sorted_values) - 1)
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (position - low)


def length_stats(lengths: Sequence[int], truncated: Sequence[bool]) -> dict[str, float]:
    """Mean / std / min / median / p90 / max of response lengths and the clip ratio."""
    if len(lengths) == 0:
        raise ValueError("length_stats needs at least one response length")
    if len(truncated) != len(lengths):
        raise ValueError(f"{len(truncated)} truncated flags for {len(lengths)} lengths")
    values = sorted(float(v) for v in lengths)
    mean = sum(values) / len(values)
    variance = sum((v - mean) ** 2 for v in values) / len(values)
    return {
        "mean": mean,
        "std": math.sqrt(variance),
        "min": values[0],
        "median": _percentile(values, 50.0),
        "p90": _percentile(values, 90.0),
        "max": values[-1],
        "clip_ratio": sum(bool(t) for t in truncated) / len(truncated),
    }


@dataclass(kw_only=True, slots=True)
class ProblemMetrics:
    """Metrics of one problem's ``num_samples`` samples."""

    problem_id: str
    num_samples: int
    num_correct: int
    accuracy: float
    """avg@n: num_correct / num_samples."""
    pass_at: dict[int, float]
    """k -> unbiased pass@k, for every requested k <= num_samples."""
    voted_answer: str | None
    """The normalised majority answer (None when no sample gave an answer)."""
    cons_correct: bool
    """Whether the first sample carrying the voted answer was scored correct."""
    lengths: dict[str, float] = field(default_factory=dict)
    """length_stats of this problem's responses."""


def problem_metrics(
    problem_id: str,
    correct: Sequence[bool],
    answers: Sequence[str | None],
    lengths: Sequence[int],
    truncated: Sequence[bool],
    ks: Sequence[int],
) -> ProblemMetrics:
    """Metrics of one problem; every sequence has one entry per sample (length n)."""
    num_samples = len(correct)
    if num_samples == 0:
        raise ValueError(f"problem {problem_id!r} has no samples")
    for name, values in (("answers", answers), ("lengths", lengths), ("truncated", truncated)):
        if len(values) != num_samples:
            raise ValueError(
                f"problem {problem_id!r}: {len(values)} {name} for {num_samples} samples"
            )
    num_correct = sum(bool(c) for c in correct)
    voted, index = majority_vote(answers)
    return ProblemMetrics(
        problem_id=problem_id,
        num_samples=num_samples,
        num_correct=num_correct,
        accuracy=num_correct / num_samples,
        pass_at={k: pass_at_k(num_samples, num_correct, k) for k in ks if k <= num_samples},
        voted_answer=voted,
        cons_correct=index >= 0 and bool(correct[index]),
        lengths=length_stats(lengths, truncated),
    )


def overall_metrics(
    problems: Sequence[ProblemMetrics], all_lengths: Sequence[int], all_truncated: Sequence[bool]
) -> dict[str, float]:
    """Flat summary: ``avg@n``, ``pass@k``, ``cons@n`` (means over problems, each weighted
    equally) and ``response_length/*`` pooled over all samples.

    ``n`` is the per-problem sample count, which must be the same for every problem; pass@k is
    reported for the k every problem has.
    """
    if not problems:
        raise ValueError("overall_metrics needs at least one problem")
    sample_counts = {p.num_samples for p in problems}
    if len(sample_counts) != 1:
        raise ValueError(f"problems have different sample counts {sorted(sample_counts)}")
    n = sample_counts.pop()
    num = len(problems)
    summary = {
        "num_problems": float(num),
        "num_samples_per_problem": float(n),
        f"avg@{n}": sum(p.accuracy for p in problems) / num,
    }
    common_ks = set.intersection(*(set(p.pass_at) for p in problems))
    for k in sorted(common_ks):
        summary[f"pass@{k}"] = sum(p.pass_at[k] for p in problems) / num
    summary[f"cons@{n}"] = sum(p.cons_correct for p in problems) / num
    for key, value in length_stats(all_lengths, all_truncated).items():
        summary[f"response_length/{key}"] = value
    return summary
