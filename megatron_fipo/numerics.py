"""Numerics: the fp32 rounding model behind every equivalence tolerance, and the TF32 switch.

Two fp32 computations of the same quantity that sum in different orders (a TP / PP / CP / DP
layout against one process, dynamic against fixed micro-batches, chunked against whole
log-probs, a reloaded checkpoint) differ by rounding only. Every such comparison here and in
the tests uses one model of that rounding, so a tolerance is derived, never a constant that
happened to pass on one CPU.

The model::

    tolerance = SAFETY * u * sqrt(depth) * size

``u = 2**-24`` is the unit roundoff of fp32 (:data:`FP32_UNIT_ROUNDOFF`).

``size`` is how large the compared quantity is, measured on the reference: the largest
``|value|`` of the compared tensor (log-probs, attention outputs, the scan), or, for gradients,
of the whole parameter tensor (an element whose terms cancel, such as the key part of the
fused QKV bias, whose gradient is exactly zero in exact arithmetic, still carries the rounding
of terms as large as its tensor's). Quantities that are ratios already (the gradient norm's
relative difference) have size 1.

``depth`` counts the fp32 terms summed along the longest chain of reductions that produces the
quantity: a reduction of ``n`` terms adds ``n``, reductions in sequence add up
(:func:`transformer_depth` counts a decoder layer; :func:`gradient_depth` adds the backward
path and the sum over tokens). Why ``sqrt(depth)`` and not the worst case ``depth``: each
rounding is an error of up to ``u`` times the partial result, of either sign and independent of
the others, so ``n`` of them add like a random walk to about ``u * sqrt(n)`` times the result
(summing random-sign or same-sign terms alike); the worst case ``n * u`` needs every rounding
to go the same way and would loosen every tolerance here by ``sqrt(n)``, 50 to 100x. BLAS
kernels sum in blocks, which only shortens the chains, and errors from several layers add in
quadrature, which is what adding their lengths to one depth does.

``SAFETY = 8``: the difference of two runs carries both runs' errors (``sqrt(2)``), and the
largest of ``N`` compared elements reaches about ``sqrt(2 ln N)`` standard deviations (5.3 for
a million elements): ``sqrt(2) * 5.3 = 7.4``, rounded up. The model leaves out amplification
by ill-conditioned steps (a near-tie softmax, a norm of a near-zero vector); the models and
batches compared here are well conditioned, which the measurements below confirm.

Checked, not assumed (``tests/test_numerics.py``, ``check_parallel``, the equivalence tests):
a plain sequential fp32 chain of ``n`` terms reaches about 1/16 of its tolerance at any ``n``
(the ``sqrt(n)`` growth is real), layout and reload comparisons stay below about 1/4, and
planted errors of realistic size (one token dropped, a gradient 0.1% off, TF32- or
bf16-rounded log-probs) exceed it 20 to 10^4 times.

Derived quantities propagate the tolerance of what they are computed from:

* SGD at lr 1 without clipping: the parameter update is the gradient, so the parameter
  tolerance is the gradient's, plus the rounding of the update itself (relative to
  ``|p| + lr |g|``).
* Adam (:func:`adam_update_bound`): the update direction ``m_hat / (sqrt(v_hat) + eps)`` is
  evaluated over every gradient within the gradient tolerance, using the reference's
  gradient. On the first step the direction is ``g / (|g| + eps)``, nearly ``sign(g)``: an
  element whose gradient is below its own rounding may flip sign and move by up to ``2 lr``,
  while an element well above it moves by far less than rounding. A bare parameter tolerance
  is therefore no rounding bound at all under Adam; the propagated one is, element by element.
  Later steps use the moments rebuilt from the earlier steps' gradients.
* A loss or other function of compared tensors: its first-order sensitivity times their
  tolerance (see ``check_parallel``).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch

FP32_UNIT_ROUNDOFF = 2.0**-24
"""u: the largest relative error of one fp32 rounding (round to nearest)."""
SAFETY = 8.0
"""sqrt(2) (two runs) x sqrt(2 ln 1e6) (the largest of up to a million elements), rounded up."""


UPDATE_ROUNDINGS = {"adam": 13, "sgd": 2}
"""fp32 roundings on the way to one updated parameter (the depth of the update's own rounding,
relative to ``|p| + lr |direction|``). torch AdamW: the ``(1 - lr wd)`` scaling 1, the first
moment 2, the second 4 (``g * g``, scale, decay, add), sqrt / bias correction / eps 3, addcdiv
3. SGD: ``lr * g``, subtract."""


def rounding_tolerance(size: float, depth: int) -> float:
    """``SAFETY * u * sqrt(depth) * size``: how far two fp32 evaluations of a quantity of
    ``size`` (largest ``|value|`` of the reference) may differ when ``depth`` summed terms
    are reordered (see the module docstring)."""
    if depth < 1:
        raise ValueError(f"depth must be >= 1 (terms summed), got {depth}")
    return SAFETY * FP32_UNIT_ROUNDOFF * math.sqrt(depth) * float(size)


def max_abs(tensor: torch.Tensor) -> float:
    """Largest ``|value|`` (0 for an empty tensor), in fp64."""
    return float(tensor.detach().double().abs().max()) if tensor.numel() else 0.0


@dataclass(frozen=True)
class Comparison:
    """One compared quantity: its largest difference and the tolerance derived for it."""

    name: str
    diff: float
    tolerance: float

    @property
    def ratio(self) -> float:
        """diff / tolerance: below 1 passes."""
        if self.tolerance > 0:
            return self.diff / self.tolerance
        return 0.0 if self.diff == 0 else math.inf

    @property
    def ok(self) -> bool:
        return self.diff <= self.tolerance

    def __str__(self) -> str:
        verdict = "ok" if self.ok else "ABOVE TOLERANCE"
        return (
            f"{self.name}: diff {self.diff:.3e}  tolerance {self.tolerance:.3e}  "
            f"ratio {self.ratio:.3f}  {verdict}"
        )


def compare_tensors(
    name: str, actual: torch.Tensor, expected: torch.Tensor, depth: int
) -> Comparison:
    """Largest absolute difference against ``rounding_tolerance(max|expected|, depth)``."""
    if actual.shape != expected.shape:
        raise ValueError(f"{name}: shapes differ, {tuple(actual.shape)} vs {tuple(expected.shape)}")
    diff = max_abs(actual.double() - expected.double())
    return Comparison(name, diff, rounding_tolerance(max_abs(expected), depth))


def transformer_depth(
    *,
    num_layers: int,
    hidden_size: int,
    intermediate_size: int,
    head_dim: int,
    seq_length: int,
    vocab_size: int,
) -> int:
    """Terms summed along a log-prob's forward path through a pre-norm decoder.

    Per layer: RMSNorm (``hidden``), QKV projection (``hidden``), scores (``head_dim``),
    softmax denominator and probabilities x values (``seq_length`` each), output projection
    (``hidden``), RMSNorm (``hidden``), MLP up (``hidden``) and down (``intermediate``).
    Then the final norm and output layer (``hidden`` each) and the log-softmax over
    ``vocab_size``.
    """
    per_layer = 5 * hidden_size + head_dim + 2 * seq_length + intermediate_size
    return num_layers * per_layer + 2 * hidden_size + vocab_size


def gradient_depth(forward_depth: int, num_positions: int) -> int:
    """A weight gradient: the forward path to the loss, the same path back, and the sum over
    the ``num_positions`` tokens of the step (which DP / CP / micro-batching split and
    reorder)."""
    return 2 * forward_depth + num_positions


@dataclass(frozen=True)
class AdamStep:
    """One torch Adam / AdamW step's settings and the moments before it (None: zeros)."""

    beta1: float
    beta2: float
    eps: float
    step: int = 1
    exp_avg: torch.Tensor | None = None
    exp_avg_sq: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1 and self.eps >= 0 and self.step >= 1):
            raise ValueError(f"bad Adam settings: {self}")

    def _coefficients(self, like: torch.Tensor):
        """(p, q, r, t) with ``m_hat = p + q g`` and ``v_hat = r + t g^2``, in fp64."""
        c1, c2 = 1 - self.beta1**self.step, 1 - self.beta2**self.step
        m0 = torch.zeros_like(like) if self.exp_avg is None else self.exp_avg.double()
        v0 = torch.zeros_like(like) if self.exp_avg_sq is None else self.exp_avg_sq.double()
        return (
            self.beta1 * m0 / c1,
            (1 - self.beta1) / c1,
            self.beta2 * v0 / c2,
            (1 - self.beta2) / c2,
        )

    def direction(self, grad: torch.Tensor) -> torch.Tensor:
        """``a(g) = m_hat / (sqrt(v_hat) + eps)``: the step is ``-lr a`` (plus weight decay)."""
        g = grad.double()
        p, q, r, t = self._coefficients(g)
        return (p + q * g) / ((r + t * g * g).sqrt() + self.eps)


def adam_update_bound(
    grad: torch.Tensor, grad_tolerance: torch.Tensor | float, adam: AdamStep
) -> torch.Tensor:
    """Elementwise bound on how far Adam's update direction can move when the gradient moves
    by up to ``grad_tolerance`` from ``grad`` (multiply by lr for the parameter change).

    With ``m = beta1 exp_avg + (1 - beta1) g`` and ``v = beta2 exp_avg_sq + (1 - beta2) g^2``
    bias-corrected, ``a(g) = (p + q g) / (sqrt(r + t g^2) + eps)``. Without ``eps`` it has at
    most one stationary point, ``g* = q r / (p t)``, so its extremes over
    ``[g - tol, g + tol]`` lie at the ends or there (``eps`` moves it to second order only;
    with ``p = 0``, as on the first step, ``a`` is monotone). Returns
    ``max |a(g') - a(g)|`` over that interval, in fp64.
    """
    g = grad.double()
    tol = torch.as_tensor(grad_tolerance, dtype=torch.float64).expand_as(g)
    p, q, r, t = adam._coefficients(g)
    low, high = g - tol, g + tol
    has_extremum = p != 0
    stationary = torch.where(has_extremum, q * r / torch.where(has_extremum, p * t, 1.0), g)
    stationary = torch.minimum(torch.maximum(stationary, low), high)
    centre = adam.direction(g)
    return torch.stack([(adam.direction(x) - centre).abs() for x in (low, high, stationary)]).amax(
        0
    )


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
