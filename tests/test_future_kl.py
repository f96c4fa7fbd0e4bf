"""The blocked reverse scan against an O(T^2) brute force, properties, and the CP pieces."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_fipo.algorithms.future_kl import (
    BLOCK,
    add_right_carry,
    discounted_future_sum,
    right_carries,
)

GAMMA = 2.0 ** (-1.0 / 32)


def brute_force(x: torch.Tensor, gamma: float) -> torch.Tensor:
    """F_t = sum_{k>=t} gamma^(k-t) x_k with an explicit [T, T] matrix, in fp64."""
    length = x.shape[-1]
    k = torch.arange(length, dtype=torch.float64)
    diff = k[None, :] - k[:, None]  # [t, k]
    weights = torch.where(diff >= 0, gamma ** diff.clamp(min=0), torch.zeros(()))
    return x.double() @ weights.T


@pytest.mark.parametrize("length", [1, 2, 7, BLOCK - 1, BLOCK, BLOCK + 1, 3 * BLOCK + 5, 1000])
@pytest.mark.parametrize("gamma", [GAMMA, 0.5, 0.999, 1.0])
def test_matches_brute_force_fp64(length, gamma):
    x = torch.randn(3, length, dtype=torch.float64, generator=torch.Generator().manual_seed(length))
    out = discounted_future_sum(x, gamma)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, brute_force(x, gamma), rtol=1e-12, atol=1e-12)


def test_recursion_definition_fp32_long():
    """fp32 relative error under 1e-5 at T = 32768 against the exact fp64 recursion."""
    length = 32768
    x = torch.randn(2, length, generator=torch.Generator().manual_seed(0)).double()
    exact = torch.empty_like(x)
    acc = torch.zeros(2, dtype=torch.float64)
    for t in range(length - 1, -1, -1):  # the spec's recursion, literally
        acc = x[:, t] + GAMMA * acc
        exact[:, t] = acc
    out = discounted_future_sum(x.float(), GAMMA)
    rel = ((out.double() - exact).abs().max() / exact.abs().max()).item()
    assert rel < 1e-5, rel
    # also with gamma = 1 (a plain reverse cumsum), where values grow with T
    ones = discounted_future_sum(torch.ones(1, length), 1.0)
    expected = torch.arange(length, 0, -1, dtype=torch.float64)
    assert ((ones.double() - expected).abs() / expected).max().item() < 1e-5


@settings(max_examples=40, deadline=None)
@given(
    length=st.integers(1, 300),
    scale=st.floats(-3, 3),
    shift=st.integers(0, 40),
    seed=st.integers(0, 2**16),
)
def test_properties(length, scale, shift, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, length, dtype=torch.float64, generator=gen)
    y = torch.randn(2, length, dtype=torch.float64, generator=gen)
    fx, fy = discounted_future_sum(x, GAMMA), discounted_future_sum(y, GAMMA)
    # linearity
    torch.testing.assert_close(discounted_future_sum(scale * x + y, GAMMA), scale * fx + fy)
    # shift: prepending `shift` zeros leaves the tail unchanged and fills the head with decays
    padded = torch.nn.functional.pad(x, (shift, 0))
    fp = discounted_future_sum(padded, GAMMA)
    torch.testing.assert_close(fp[:, shift:], fx)
    if shift:
        torch.testing.assert_close(fp[:, 0], fx[:, 0] * GAMMA**shift)
    # masks: zeros at the end never influence earlier tokens; a masked token adds nothing
    mask = (torch.rand(2, length, generator=gen) > 0.3).double()
    masked = discounted_future_sum(x * mask, GAMMA)
    torch.testing.assert_close(masked, brute_force(x * mask, GAMMA))
    # recursion F_t = x_t + gamma F_{t+1}
    torch.testing.assert_close(fx[:, :-1], x[:, :-1] + GAMMA * fx[:, 1:])


@pytest.mark.parametrize("cuts", [[0, 10, 75, 300], [0, 1, 2, 3, 300], [0, 128, 256, 300]])
def test_segments_with_right_carries_equal_whole(cuts):
    """The context-parallel recipe: scan segments alone, combine totals, add carries."""
    x = torch.randn(4, 300, dtype=torch.float64)
    whole = discounted_future_sum(x, GAMMA)
    pieces = [x[:, a:b] for a, b in zip(cuts[:-1], cuts[1:])]
    scans = [discounted_future_sum(p, GAMMA) for p in pieces]
    totals = torch.stack([s[:, 0] for s in scans], dim=1)
    lengths = torch.tensor([p.shape[1] for p in pieces])
    carries = right_carries(totals, lengths, GAMMA)
    joined = torch.cat([add_right_carry(s, carries[:, k], GAMMA) for k, s in enumerate(scans)], 1)
    torch.testing.assert_close(joined, whole, rtol=1e-12, atol=1e-12)
    # the carry argument of discounted_future_sum does the same for the first piece
    first = discounted_future_sum(pieces[0], GAMMA, carry=carries[:, 0])
    torch.testing.assert_close(first, whole[:, : cuts[1]], rtol=1e-12, atol=1e-12)


def test_ragged_lengths_per_row():
    lengths = torch.tensor([[3, 5], [8, 0]])
    totals = torch.tensor([[1.0, 2.0], [4.0, 0.0]], dtype=torch.float64)
    carries = right_carries(totals, lengths, 0.5)
    assert carries[:, 1].tolist() == [0.0, 0.0]
    assert carries[:, 0].tolist() == [2.0, 0.0]


def test_bad_input():
    with pytest.raises(ValueError, match="gamma"):
        discounted_future_sum(torch.zeros(1, 4), 1.5)
    with pytest.raises(ValueError, match=r"\[B, T\]"):
        discounted_future_sum(torch.zeros(4), 0.5)
    with pytest.raises(ValueError, match="floating"):
        discounted_future_sum(torch.zeros(1, 4, dtype=torch.long), 0.5)
    assert discounted_future_sum(torch.zeros(2, 0), 0.5).shape == (2, 0)


def test_no_quadratic_memory():
    """At T = 20480 the scan's temporaries stay O(T): no [T, T] or [T, 128] matrices."""
    x = torch.randn(1, 20480)
    seen = []

    class Spy(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if isinstance(out, torch.Tensor):
                seen.append(out.numel())
            return out

    with Spy():
        discounted_future_sum(x, GAMMA)
    assert max(seen) <= 2 * x.numel() + BLOCK * BLOCK
    assert math.isfinite(max(seen))
