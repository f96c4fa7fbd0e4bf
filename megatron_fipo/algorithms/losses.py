"""Policy losses: FIPO, DAPO and GRPO, as pure tensor functions.

The objective really computed (FIPO_SPEC steps 1-8), per response token ``t`` of sequence ``i``::

    l = clamp(logp - old_logp, -20, 20),  r = exp(l)
    x = l * M * 1[l <= log c]                                  (detached)
    F_t = sum_{k>=t} gamma^(k-t) x_k,  gamma = 2^(-1/decay_rate)
    f = clip(exp(F), 1, 1+eps_f)        (high-only; or [1-eps_f, 1+eps_f]; or min(., 10) if eps_f=0)
    f = clip(f, 0.8, 1.0)   where A < 0 and r > safety_thresh  (detached)
    At = A * f
    L_clip = max(-At r, -At clip(r, 1-eps_low, 1+eps_high));  L = min(L_clip, -At c) where At < 0
    sequences with > 1 token of (A < 0, L_clip > -At c) are dropped
    loss = sum_{kept tokens} L / num_tokens

"dapo" is the same with ``f = 1`` and no sequence drop; "grpo" additionally uses the symmetric
clip ``[1 - eps_low, 1 + eps_low]``. Gradients flow only through ``log_probs``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from megatron_fipo.algorithms.future_kl import discounted_future_sum

FutureSumFn = Callable[[torch.Tensor, float], torch.Tensor]
SequenceSumFn = Callable[[torch.Tensor], torch.Tensor]
MODES = ("grpo", "dapo", "fipo")
_LOG_RATIO_BOUND = 20.0
_UNCLIPPED_WEIGHT_CAP = 10.0  # f = min(w, 10) when fipo_clip_ratio == 0
_SAFETY_RANGE = (0.8, 1.0)


@dataclass(kw_only=True, slots=True)
class PolicyLossConfig:
    """Knobs of the policy loss; defaults are the Qwen2.5-32B FIPO recipe."""

    mode: str = "fipo"
    """"grpo" (symmetric clip), "dapo" (clip-higher, f = 1) or "fipo"."""
    clip_ratio_low: float = 0.2
    """eps_low: ratios are clipped below at 1 - eps_low."""
    clip_ratio_high: float = 0.28
    """eps_high: ratios are clipped above at 1 + eps_high (ignored by "grpo")."""
    clip_ratio_c: float = 10.0
    """Dual-clip constant c (> 1); also the high-ratio filter of the future-KL input."""
    decay_rate: float = 32.0
    """Future-KL half-life in tokens: gamma = 2 ** (-1 / decay_rate)."""
    fipo_clip_ratio: float = 0.2
    """eps_f: influence weights are clipped to [1, 1 + eps_f] (or [1 - eps_f, 1 + eps_f])."""
    fipo_clip_high_only: bool = True
    """Clip the influence weight only from above (lower bound 1.0)."""
    safety_thresh: float = 10.0
    """Where A < 0 and the ratio exceeds this, f is clipped to [0.8, 1.0]."""
    entropy_coeff: float = 0.0
    """Entropy bonus: the actor subtracts ``entropy_coeff`` x the token-mean entropy of the
    response tokens (0 in the recipe; not part of :func:`compute_policy_loss`)."""

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if not self.entropy_coeff >= 0:
            raise ValueError(f"entropy_coeff must be >= 0, got {self.entropy_coeff}")
        for name in ("clip_ratio_low", "clip_ratio_high", "decay_rate", "safety_thresh"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if not self.clip_ratio_low < 1:
            raise ValueError(f"clip_ratio_low must be < 1, got {self.clip_ratio_low}")
        if not self.clip_ratio_c > 1:
            raise ValueError(f"clip_ratio_c must be > 1, got {self.clip_ratio_c}")
        if not 0 <= self.fipo_clip_ratio < 1:
            raise ValueError(f"fipo_clip_ratio must be in [0, 1), got {self.fipo_clip_ratio}")

    @property
    def gamma(self) -> float:
        return 2.0 ** (-1.0 / self.decay_rate)


def influence_weights(
    log_ratio: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    config: PolicyLossConfig,
    future_sum_fn: FutureSumFn | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """FIPO steps 2-5 on detached tensors, all ``[B, T]``.

    Returns ``(f, future_kl, clipped)``: the applied weight, the future KL ``F`` and a bool mask
    of tokens whose raw weight ``exp(F)`` was clipped (by the range or the safety cap).
    """
    scan = future_sum_fn or discounted_future_sum
    keep = (log_ratio <= math.log(config.clip_ratio_c)).to(log_ratio.dtype)
    future_kl = scan(log_ratio * mask * keep, config.gamma)
    # exp overflows past F ~ 88 in fp32; every clip bound is < e^30, so capping F changes nothing.
    weight = torch.exp(future_kl.clamp(max=30.0))
    eps = config.fipo_clip_ratio
    if eps == 0:
        low, high = 0.0, _UNCLIPPED_WEIGHT_CAP
    elif config.fipo_clip_high_only:
        low, high = 1.0, 1.0 + eps
    else:
        low, high = 1.0 - eps, 1.0 + eps
    f = weight.clamp(low, high)
    unsafe = (advantages < 0) & (torch.exp(log_ratio) > config.safety_thresh)
    f = torch.where(unsafe, f.clamp(*_SAFETY_RANGE), f)
    return f, future_kl, (f != weight)


def compute_policy_loss(
    log_probs: torch.Tensor,
    old_log_probs: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    config: PolicyLossConfig,
    num_tokens: float | torch.Tensor | None = None,
    future_sum_fn: FutureSumFn | None = None,
    sequence_sum_fn: SequenceSumFn | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Token-mean policy loss of one micro-batch.

    Args:
        log_probs: ``[B, T]`` current log-probs of the sampled tokens (requires grad).
        old_log_probs: ``[B, T]`` log-probs of the rollout policy, recomputed by the trainer.
        advantages: ``[B]`` sequence advantages or ``[B, T]`` per token.
        response_mask: ``[B, T]`` 1 on response tokens, 0 on padding / prompt.
        config: loss knobs.
        num_tokens: divisor for the summed loss: the global response-token count of the
            optimizer step (across micro-batches and DP / CP ranks); None -> kept tokens here.
        future_sum_fn: the reverse scan ``(x[B, T], gamma) -> F[B, T]``; context-parallel
            callers inject their CP scan here. Defaults to :func:`discounted_future_sum`.
        sequence_sum_fn: ``values[B, T] -> [B, T]``, each token's value replaced by the sum
            over its whole sequence (the sequence-drop count). Defaults to a row sum; CP callers,
            whose rows hold only part of a sequence, inject a sum across the CP group.

    Returns:
        ``(loss, metrics)``; metrics are 0-d tensors reduced by key suffix
        (see :mod:`megatron_fipo.algorithms.metrics`).
    """
    if log_probs.shape != old_log_probs.shape or log_probs.shape != response_mask.shape:
        raise ValueError(
            f"log_probs {tuple(log_probs.shape)}, old_log_probs {tuple(old_log_probs.shape)} "
            f"and response_mask {tuple(response_mask.shape)} must have the same [B, T] shape"
        )
    dtype = torch.promote_types(log_probs.dtype, torch.float32)  # fp32 at least, fp64 kept
    log_probs = log_probs.to(dtype)
    mask = response_mask.to(dtype)
    adv = advantages.detach().to(dtype)
    adv = adv.unsqueeze(-1).expand_as(log_probs) if adv.dim() == 1 else adv
    log_ratio = (log_probs - old_log_probs.detach().to(dtype)).clamp(
        -_LOG_RATIO_BOUND, _LOG_RATIO_BOUND
    )
    ratio = torch.exp(log_ratio)
    stats: dict[str, torch.Tensor] = {}
    if config.mode == "fipo":
        f, future_kl, clipped = influence_weights(
            log_ratio.detach(), adv, mask, config, future_sum_fn
        )
        scaled_adv = adv * f
    else:
        scaled_adv = adv
    high = config.clip_ratio_low if config.mode == "grpo" else config.clip_ratio_high
    loss_unclipped = -scaled_adv * ratio
    loss_clipped = -scaled_adv * ratio.clamp(1.0 - config.clip_ratio_low, 1.0 + high)
    loss_clip = torch.maximum(loss_unclipped, loss_clipped)
    dual_bound = -scaled_adv * config.clip_ratio_c
    per_token = torch.where(scaled_adv < 0, torch.minimum(loss_clip, dual_bound), loss_clip)
    kept = mask
    num_seqs = torch.tensor(float(log_probs.shape[0]), dtype=torch.float64)
    num_dropped = torch.zeros((), dtype=torch.float64, device=log_probs.device)
    if config.mode == "fipo":
        offending = ((adv < 0) & (loss_clip.detach() > dual_bound) & (mask > 0)).to(dtype)
        if sequence_sum_fn is None:
            in_sequence = offending.sum(-1, keepdim=True).expand_as(offending)
        else:
            in_sequence = sequence_sum_fn(offending)
        drop_token = in_sequence > 1
        kept = mask * (~drop_token).to(mask.dtype)
        if sequence_sum_fn is None:
            num_dropped = (drop_token & (mask > 0)).any(-1).sum().to(torch.float64)
        else:
            # Rows are not sequences (packed rows, CP chunks): count each sequence once, by
            # its response tokens, each carrying 1 / the sequence's response length.
            share = mask.double() / sequence_sum_fn(mask).double().clamp(min=1.0)
            num_seqs = share.sum()
            num_dropped = (share * drop_token).sum()
    num_kept = kept.sum()
    divisor = num_tokens if num_tokens is not None else num_kept.clamp(min=1.0)
    loss = (per_token * kept).sum() / divisor
    tokens = mask > 0
    stats.update(_sum_count("actor/pg_clipfrac", (loss_clipped > loss_unclipped).detach(), tokens))
    stats.update(_sum_count("actor/dual_clipfrac", (per_token < loss_clip).detach(), tokens))
    stats.update(_sum_count("actor/ppo_kl", -log_ratio.detach(), tokens))
    stats.update(_extremes("actor/ratio", ratio.detach(), tokens))
    stats["actor/pg_loss_sum"] = (per_token.detach() * kept).sum()
    stats["actor/kept_tokens_sum"] = num_kept.detach()
    stats["actor/dropped_seqs_sum"] = num_dropped
    stats["actor/dropped_seqs_count"] = num_seqs.to(num_dropped.device)
    if config.mode == "fipo":
        stats.update(_sum_count("fipo/weight", f, tokens))
        stats.update(_extremes("fipo/weight", f, tokens))
        stats.update(_sum_count("fipo/weight_clipped", clipped, tokens))
        stats.update(_sum_count("fipo/future_kl", future_kl, tokens))
        stats.update(_extremes("fipo/future_kl", future_kl, tokens))
    return loss, stats


def _sum_count(name: str, values: torch.Tensor, where: torch.Tensor) -> dict[str, torch.Tensor]:
    values = values.to(torch.float64)
    return {
        f"{name}_sum": torch.where(where, values, 0.0).sum(),
        f"{name}_count": where.sum().to(torch.float64),
    }


def _extremes(name: str, values: torch.Tensor, where: torch.Tensor) -> dict[str, torch.Tensor]:
    values = values.to(torch.float64)
    return {
        f"{name}_max": torch.where(where, values, -math.inf).amax(),
        f"{name}_min": torch.where(where, values, math.inf).amin(),
    }
