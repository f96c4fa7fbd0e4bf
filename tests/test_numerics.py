"""The fp32 rounding model of :mod:`megatron_fipo.numerics`: its tolerances hold for real
reorderings of fp32 sums (blocked GEMMs, sequential chains) and fail for a small real error;
the Adam bound holds for torch's AdamW, which Megatron's CPU optimizer is."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from megatron_fipo.numerics import (
    FP32_UNIT_ROUNDOFF,
    SAFETY,
    UPDATE_ROUNDINGS,
    AdamStep,
    Comparison,
    adam_update_bound,
    compare_tensors,
    gradient_depth,
    max_abs,
    rounding_tolerance,
    transformer_depth,
)


def test_tolerance_is_safety_times_unit_roundoff_times_sqrt_depth_times_size():
    assert FP32_UNIT_ROUNDOFF == 2.0**-24
    assert rounding_tolerance(3.0, 100) == SAFETY * 2.0**-24 * 10 * 3.0
    with pytest.raises(ValueError, match="depth must be >= 1"):
        rounding_tolerance(1.0, 0)


def test_comparison_and_compare_tensors():
    inside = Comparison("x", 1.0, 2.0)
    assert inside.ok and inside.ratio == 0.5 and "ratio 0.500  ok" in str(inside)
    above = Comparison("y", 3.0, 1.0)
    assert not above.ok and "ABOVE TOLERANCE" in str(above)
    assert Comparison("z", 0.0, 0.0).ok and Comparison("z", 1e-30, 0.0).ratio == math.inf
    expected = torch.tensor([1.0, -4.0], dtype=torch.float64)
    check = compare_tensors("v", expected + torch.tensor([0.0, 1e-6]), expected, 16)
    assert check.diff == pytest.approx(1e-6)
    assert check.tolerance == rounding_tolerance(4.0, 16) and check.ok
    with pytest.raises(ValueError, match=r"v: shapes differ, \(2,\) vs \(3,\)"):
        compare_tensors("v", expected, torch.zeros(3), 1)
    assert max_abs(torch.zeros(0)) == 0.0


def test_depth_counts():
    # 2 layers of hidden 32, MLP 64, head_dim 8, 40 positions, vocabulary 200.
    forward = transformer_depth(
        num_layers=2,
        hidden_size=32,
        intermediate_size=64,
        head_dim=8,
        seq_length=40,
        vocab_size=200,
    )
    assert forward == 2 * (5 * 32 + 8 + 2 * 40 + 64) + 2 * 32 + 200
    assert gradient_depth(forward, 67) == 2 * forward + 67


@pytest.mark.parametrize("inner", [64, 1024, 16384])
def test_reordered_gemm_stays_within_and_a_dropped_term_does_not(inner):
    """A row-parallel split of the inner dimension (what TP does) against one GEMM, and a
    plain sequential fp32 chain (numpy's accumulate, the longest chain any order has)
    against fp64: within the tolerance for depth ``inner``. One product left out of the
    sums (a real bug of the smallest kind) is far outside it."""
    gen = torch.Generator().manual_seed(inner)
    x = torch.randn(64, inner, generator=gen)
    w = torch.randn(inner, 48, generator=gen) / math.sqrt(inner)
    whole = x @ w
    split = sum(x[:, part] @ w[part] for part in torch.arange(inner).chunk(4))
    exact = x.double() @ w.double()
    reordered = compare_tensors("split", split, whole, inner)
    assert reordered.ok and reordered.diff > 0, reordered
    products = (x[:, :, None] * w[None]).numpy()  # [64, inner, 48] fp32 products
    chain = torch.from_numpy(np.add.accumulate(products, axis=1)[:, -1])
    sequential = compare_tensors("chain", chain, exact, inner)
    assert sequential.ok, sequential
    dropped = whole - x[:, :1] @ w[:1]
    assert compare_tensors("dropped", dropped, whole, inner).ratio > 10


def test_adam_first_step_is_nearly_sign():
    """Step 1: a(g) = g / (|g| + eps); far above its rounding a gradient's direction is
    fixed, at or below it the sign can flip (up to 2)."""
    adam = AdamStep(beta1=0.9, beta2=0.999, eps=1e-8)
    g = torch.tensor([1e-2, -1e-3, 0.0, 5e-7, 1e-9])
    torch.testing.assert_close(adam.direction(g), g.double() / (g.double().abs() + 1e-8))
    bound = adam_update_bound(g, 1e-6, adam)
    assert float(bound[0]) < 1e-9 and float(bound[1]) < 1e-7  # |g| >> tolerance
    assert float(bound[2]) == pytest.approx(1e-6 / (1e-6 + 1e-8))  # zero: one side
    # May flip sign: from about 1 to about -1, or (below eps) from 0.09 to about -1.
    assert 1.9 < float(bound[3]) < 2 and 1.0 < float(bound[4]) < 1.1
    with pytest.raises(ValueError, match="bad Adam settings"):
        AdamStep(beta1=1.0, beta2=0.999, eps=1e-8)


def _adam_before(history, step):
    """AdamStep for step ``step`` after the gradients ``history``, accumulated in fp64 as
    torch Adam does (beta1 0.9, beta2 0.999, eps 1e-8)."""
    exp_avg = exp_avg_sq = None
    for grad in history:
        grad = grad.double()
        exp_avg = 0.1 * grad if exp_avg is None else 0.9 * exp_avg + 0.1 * grad
        exp_avg_sq = 0.001 * grad**2 if exp_avg_sq is None else 0.999 * exp_avg_sq + 0.001 * grad**2
    return AdamStep(
        beta1=0.9, beta2=0.999, eps=1e-8, step=step, exp_avg=exp_avg, exp_avg_sq=exp_avg_sq
    )


def _gradients(count, gen, low, high):
    """Random signs and magnitudes spread over 10^low .. 10^high."""
    scale = 10 ** torch.empty(count, dtype=torch.float64).uniform_(low, high, generator=gen)
    return torch.randn(count, generator=gen, dtype=torch.float64) * scale


@pytest.mark.parametrize("step", [1, 2, 5])
def test_adam_bound_is_the_extreme_over_the_interval(step):
    """Dense sampling of every gradient within the tolerance never exceeds the bound, and
    the bound is the sampled extreme (tight), with moments from earlier steps."""
    gen = torch.Generator().manual_seed(step)
    count = 400
    history = [torch.randn(count, generator=gen, dtype=torch.float64) for _ in range(step - 1)]
    adam = _adam_before(history, step)
    g = _gradients(count, gen, -9, 0)
    tol = torch.full((count,), 1e-6, dtype=torch.float64)
    bound = adam_update_bound(g, tol, adam)
    offsets = torch.linspace(-1, 1, 2001, dtype=torch.float64)[:, None] * tol
    sampled = (adam.direction(g + offsets) - adam.direction(g)).abs().amax(0)
    assert bool((sampled <= bound * (1 + 1e-9) + 1e-15).all())
    assert bool((bound <= sampled * 1.01 + 1e-12).all())


def test_adam_bound_holds_for_torch_adamw():
    """Three AdamW parameters with the same two past steps take a third from gradients that
    differ within the tolerance (the second) or have one sign wrong (the third, a bug):
    the second lands within lr x the bound plus the update's rounding, the third's wrong
    element far outside it."""
    gen = torch.Generator().manual_seed(0)
    count, lr, tol = 4096, 1e-3, 1e-7
    start = torch.randn(count, generator=gen) * 0.02
    history = [torch.randn(count, generator=gen) * 1e-3 for _ in range(2)]
    grad = _gradients(count, gen, -10, -2).float()
    perturbed = grad + tol * (2 * torch.rand(count, generator=gen) - 1)
    wrong = int(grad.abs().argmax())
    flipped = grad.clone()
    flipped[wrong] = -flipped[wrong]
    params = [torch.nn.Parameter(start.clone()) for _ in range(3)]
    for param, last in zip(params, (grad, perturbed, flipped)):
        optimizer = torch.optim.AdamW([param], lr=lr, weight_decay=0.1)
        for past in [*history, last]:
            param.grad = past.clone()
            optimizer.step()
    base = params[0].detach().double()
    # The update's own rounding, on |p| + lr |direction| (the direction is about 1 at most).
    rounding = rounding_tolerance(1.0, UPDATE_ROUNDINGS["adam"]) * (base.abs() + lr)
    bound = lr * adam_update_bound(grad, tol, _adam_before(history, 3)) + rounding
    moved = (base - params[1].detach().double()).abs()
    assert bool((moved <= bound).all()), float((moved / bound).max())
    assert float(moved.max()) > 0  # the perturbation did change some updates
    bug = float((base - params[2].detach().double()).abs()[wrong])
    assert bug > 100 * float(bound[wrong]), (bug, float(bound[wrong]))
