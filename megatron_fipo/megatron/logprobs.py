"""Log-probs of target tokens and entropy from vocab-parallel logits, chunked along the sequence.

Under tensor parallelism each rank holds the output-layer rows of its vocab slice
``[V / TP, H]``. For ``N`` token positions with final hidden states ``h[N, H]`` and targets
``y[N]`` we compute, in fp32 and at temperature ``tau``::

    z = h @ W.T / tau                            (vocab-parallel: this rank's columns only)
    log p(y) = z_y - logsumexp(z)                (max, sum-exp and z_y reduced over the TP group)
    H = logsumexp(z) - sum_j softmax(z)_j z_j    (entropy)

:func:`chunked_log_probs` forms ``z`` for ``chunk_size`` positions at a time, in the forward and
again (recomputed) in the backward, so the extra memory is O(chunk_size x V / TP) and the
``[N, V]`` logits never exist: a 20k-token response with a 152k vocabulary would otherwise
need a 12 GB fp32 tensor. :func:`log_probs_from_logits` is the plain reference on materialised
vocab-parallel logits (tests and the memory benchmark compare the two).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_fipo.numerics import cuda_tf32

DEFAULT_CHUNK_SIZE = 1024
# Logit given to padded vocab columns: exp() underflows to exactly 0, and unlike -inf it
# keeps 0 * logit finite in the entropy terms.
_MASKED_LOGIT = -1e30


def _all_reduce(tensor: torch.Tensor, op, group) -> torch.Tensor:
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(tensor, op=op, group=group)
    return tensor


def _vocab_range(local_vocab: int, group) -> tuple[int, int]:
    rank = dist.get_rank(group) if group is not None and dist.get_world_size(group) > 1 else 0
    return rank * local_vocab, (rank + 1) * local_vocab


def _mask_padding(logits: torch.Tensor, vocab_size: int | None, group) -> torch.Tensor:
    """Drops the padded vocab columns (global id >= ``vocab_size``) from the softmax, so the
    result matches the unpadded HF model whatever padding the TP layout used."""
    start, end = _vocab_range(logits.shape[-1], group)
    if vocab_size is not None and end > vocab_size:
        logits[:, max(vocab_size - start, 0) :] = _MASKED_LOGIT
    return logits


def tensor_core_fp32_matmul(like: torch.Tensor):
    """For bf16 / fp16 ``like`` on CUDA: let the fp32 vocab GEMMs below run on tensor cores
    (TF32) while inside. Their inputs are upcast bf16 / fp16 values, which TF32's 10-bit
    mantissa holds exactly, so the forward logits are the fp32 products, accumulated in fp32;
    only the backward's fp32 logit gradients are rounded to TF32. Without it these GEMMs run on
    the CUDA cores: a profile on an H200 (``tools/bench/gpu_check.py``, part ``profile``) put
    them at ~0.8 s of a 1.3 s step of a 1B model. No effect on CPU or for fp32 models."""
    return cuda_tf32(True, active=like.is_cuda and like.dtype in (torch.bfloat16, torch.float16))


def _chunk_statistics(logits: torch.Tensor, targets: torch.Tensor, group) -> tuple:
    """For fp32 scaled logits ``z[n, V/TP]``: probabilities ``p[n, V/TP]``, log Z ``[n]``,
    target logit ``[n]`` and E_p[z] ``[n]``, all reduced over the TP group."""
    start, end = _vocab_range(logits.shape[-1], group)
    # In-place where possible: this chunk's [n, V/TP] buffers dominate the memory.
    row_max = _all_reduce(logits.max(dim=-1).values, dist.ReduceOp.MAX, group)
    probs = torch.sub(logits, row_max[:, None]).exp_()
    sum_exp = _all_reduce(probs.sum(dim=-1), dist.ReduceOp.SUM, group)
    probs.div_(sum_exp[:, None])
    in_range = (targets >= start) & (targets < end)
    local_index = (targets - start).clamp(0, logits.shape[-1] - 1)
    target_logit = logits.gather(-1, local_index[:, None]).squeeze(-1) * in_range
    mean_logit = (probs * logits).sum(dim=-1)
    target_logit, mean_logit = _all_reduce(
        torch.stack([target_logit, mean_logit]), dist.ReduceOp.SUM, group
    )
    log_normalizer = row_max + torch.log(sum_exp)
    return probs, log_normalizer, target_logit, mean_logit, in_range, local_index


class _ChunkedLogProbs(torch.autograd.Function):
    """Autograd for chunked log-probs/entropy; the backward recomputes each chunk's logits."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature, chunk_size, group, vocab_size):
        num_tokens = hidden.shape[0]
        log_probs = torch.empty(num_tokens, dtype=torch.float32, device=hidden.device)
        entropy = torch.empty_like(log_probs)
        with tensor_core_fp32_matmul(hidden):
            for start in range(0, num_tokens, chunk_size):
                rows = slice(start, start + chunk_size)
                logits = (hidden[rows].float() @ weight.float().t()).div_(temperature)
                logits = _mask_padding(logits, vocab_size, group)
                _, log_z, target_logit, mean_logit, _, _ = _chunk_statistics(
                    logits, targets[rows], group
                )
                log_probs[rows] = target_logit - log_z
                entropy[rows] = log_z - mean_logit
        ctx.save_for_backward(hidden, weight, targets)
        ctx.temperature, ctx.chunk_size, ctx.group = temperature, chunk_size, group
        ctx.vocab_size = vocab_size
        return log_probs, entropy

    @staticmethod
    def backward(ctx, grad_log_probs, grad_entropy):
        hidden, weight, targets = ctx.saved_tensors
        grad_hidden = torch.zeros_like(hidden, dtype=torch.float32)
        grad_weight = torch.zeros_like(weight, dtype=torch.float32)
        weight32 = weight.float()
        with tensor_core_fp32_matmul(hidden):
            for start in range(0, hidden.shape[0], ctx.chunk_size):
                rows = slice(start, start + ctx.chunk_size)
                hidden32 = hidden[rows].float()
                logits = (hidden32 @ weight32.t()).div_(ctx.temperature)
                logits = _mask_padding(logits, ctx.vocab_size, ctx.group)
                probs, _, _, mean_logit, in_range, local_index = _chunk_statistics(
                    logits, targets[rows], ctx.group
                )
                # d logp_y / dz = onehot(y) - p ;  dH / dz = -p * (z - E_p[z]); two [n, V/TP]
                # buffers (logits, probs) are reused in place for all of it.
                if grad_entropy is not None:
                    entropy_term = logits.sub_(mean_logit[:, None]).mul_(probs)
                    entropy_term.mul_(grad_entropy[rows, None])
                grad_logits = probs.mul_(-grad_log_probs[rows, None])
                if grad_entropy is not None:
                    grad_logits.sub_(entropy_term)
                onehot_grad = (grad_log_probs[rows] * in_range)[:, None]
                grad_logits.scatter_add_(-1, local_index[:, None], onehot_grad)
                grad_logits.div_(ctx.temperature)
                grad_hidden[rows] = grad_logits @ weight32
                grad_weight += grad_logits.t() @ hidden32
        grads = grad_hidden.to(hidden.dtype), grad_weight.to(weight.dtype)
        return (*grads, None, None, None, None, None)


def _tp_group(group):
    if group is not None:
        return group
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        return parallel_state.get_tensor_model_parallel_group()
    return None


def chunked_log_probs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    temperature: float = 1.0,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    group=None,
    vocab_size: int | None = None,
    reduce_hidden_grad: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probs and entropy ``([...], [...])`` fp32 of ``targets`` from hidden states.

    ``hidden``: ``[..., H]`` final hidden states (any leading shape, e.g. ``[S, B]``);
    ``weight``: this rank's output-layer slice ``[V / TP, H]``; ``targets``: ``[...]`` token ids
    in the full (padded) vocabulary; ``group``: the TP group (default: Megatron's);
    ``vocab_size``: the true vocabulary size (columns past it are padding and ignored);
    ``reduce_hidden_grad=False`` when the caller's own op already sums the hidden-state
    gradient over TP (a sequence-parallel gather, whose backward reduce-scatters).
    Gradients flow to ``hidden`` (summed over TP ranks, as a column-parallel layer's input
    gradient must be) and to ``weight``.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if hidden.shape[:-1] != targets.shape:
        raise ValueError(f"hidden {tuple(hidden.shape)} and targets {tuple(targets.shape)} differ")
    group = _tp_group(group)
    if reduce_hidden_grad and group is not None and dist.get_world_size(group) > 1:
        from megatron.core.tensor_parallel import copy_to_tensor_model_parallel_region

        # Identity forward; all-reduces the hidden-state gradient over TP in backward.
        hidden = copy_to_tensor_model_parallel_region(hidden)
    lead = targets.shape
    log_probs, entropy = _ChunkedLogProbs.apply(
        hidden.reshape(-1, hidden.shape[-1]),
        weight,
        targets.reshape(-1).long(),
        float(temperature),
        int(chunk_size),
        group,
        vocab_size,
    )
    return log_probs.view(lead), entropy.view(lead)


def log_probs_from_logits(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    temperature: float = 1.0,
    group=None,
    vocab_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference (unchunked) log-probs and entropy from vocab-parallel logits ``[..., V / TP]``.

    Materialises fp32 logits gathered over TP: O(N x V) memory. For tests and benchmarks.
    """
    group = _tp_group(group)
    logits = logits.float() / temperature
    if group is not None and dist.get_world_size(group) > 1:
        from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

        logits = gather_from_tensor_model_parallel_region(logits)
    if vocab_size is not None:
        logits = logits[..., :vocab_size]
    log_softmax = torch.log_softmax(logits, dim=-1)
    log_probs = log_softmax.gather(-1, targets.long().unsqueeze(-1)).squeeze(-1)
    entropy = -(log_softmax.exp() * log_softmax).sum(dim=-1)
    return log_probs, entropy
