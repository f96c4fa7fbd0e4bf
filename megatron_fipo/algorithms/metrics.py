"""Metric dictionaries that reduce across ranks by key suffix.

Loss functions return ``dict[str, Tensor]`` of 0-d tensors. The suffix of each key says how a
distributed caller reduces it: ``*_sum`` and ``*_count`` add, ``*_max`` takes the maximum,
``*_min`` the minimum. :func:`finalize` turns the reduced dict into plain floats, replacing each
``name_sum`` / ``name_count`` pair with ``name_mean``.
"""

from __future__ import annotations

import torch

REDUCE_OPS = ("sum", "count", "max", "min")


def reduce_op(key: str) -> str:
    """``"sum"``, ``"max"`` or ``"min"``: how ``key`` combines across ranks."""
    suffix = key.rsplit("_", 1)[-1]
    if suffix not in REDUCE_OPS:
        raise ValueError(f"metric {key!r} must end in one of {REDUCE_OPS}")
    return "sum" if suffix == "count" else suffix


def merge(into: dict[str, torch.Tensor], other: dict[str, torch.Tensor]) -> None:
    """Accumulates ``other`` into ``into`` in place (micro-batch accumulation)."""
    for key, value in other.items():
        value = value.detach().double()
        if key not in into:
            into[key] = value.clone()
            continue
        op = reduce_op(key)
        if op == "sum":
            into[key] = into[key] + value
        elif op == "max":
            into[key] = torch.maximum(into[key], value)
        else:
            into[key] = torch.minimum(into[key], value)


def finalize(metrics: dict[str, torch.Tensor]) -> dict[str, float]:
    """Plain floats; ``x_sum``/``x_count`` pairs become ``x_mean``; empty maxima become 0."""
    out: dict[str, float] = {}
    for key, value in metrics.items():
        value = float(value)
        if key.endswith("_count"):
            continue
        if key.endswith("_sum"):
            name = key[: -len("_sum")]
            count = metrics.get(name + "_count")
            if count is not None:
                out[name + "_mean"] = value / float(count) if float(count) > 0 else 0.0
                continue
        if key.endswith(("_max", "_min")) and abs(value) == float("inf"):
            value = 0.0
        out[key] = value
    return out
