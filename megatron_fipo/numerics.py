"""Numerics switches shared by the algorithm and Megatron code."""

from __future__ import annotations

import contextlib

import torch


@contextlib.contextmanager
def cuda_tf32(allow: bool, active: bool = True):
    """Inside, fp32 CUDA matmuls may (``allow``) or may not use TF32 tensor cores; the previous
    global setting comes back on exit. ``active=False`` (CPU tensors, say) changes nothing."""
    if not active:
        yield
        return
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = allow
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous
