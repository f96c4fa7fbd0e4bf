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

The GEMMs (:func:`fp32_matmul`): with bf16 / fp16 hidden states and weight on CUDA, each is one
tensor-core GEMM of the half-precision operands with fp32 accumulation and an fp32 result
(``torch.mm(..., out_dtype=torch.float32)``). A product of two bf16 values is exact in fp32, so
the forward logits equal the fp32 GEMM of the same values up to the order of the fp32 sums
(the tolerance of :func:`megatron_fipo.numerics.rounding_tolerance` with depth ``H``); the
softmax and everything after it stay fp32. In the backward the fp32 logit gradients are
rounded to the weight's dtype for the two GEMMs (as Megatron's own output layer does: a
relative 2^-9 per element for bf16), and accumulated in fp32. Elsewhere (CPU, fp32 models) the
operands are upcast once (the weight once per call, not per chunk) and multiplied in fp32.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

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


HALF_DTYPES = (torch.bfloat16, torch.float16)
OUT_DTYPE_DEVICES = ("cuda", "meta")
"""Where ``torch.mm`` takes ``out_dtype`` (half-precision operands, fp32 result): CUDA, and the
meta device (shapes only; the CPU test of the GEMM path runs there)."""


def half_gemm(hidden: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether :func:`fp32_matmul` multiplies these operands in their own half precision."""
    return (
        hidden.dtype == weight.dtype
        and hidden.dtype in HALF_DTYPES
        and hidden.device.type in OUT_DTYPE_DEVICES
    )


def fp32_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` as fp32 (2-D operands of one dtype): one half-precision GEMM with an fp32
    result where the device has it (see :data:`OUT_DTYPE_DEVICES`), else an fp32 GEMM (the
    caller upcasts fp32 operands once)."""
    if a.dtype in HALF_DTYPES and a.device.type in OUT_DTYPE_DEVICES:
        return torch.mm(a, b, out_dtype=torch.float32)
    return torch.mm(a.float(), b.float())


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
        half = half_gemm(hidden, weight)
        weight_t = (weight if half else weight.float()).t()  # cast once, not per chunk
        for start in range(0, num_tokens, chunk_size):
            rows = slice(start, start + chunk_size)
            chunk = hidden[rows] if half else hidden[rows].float()
            logits = fp32_matmul(chunk, weight_t).div_(temperature)
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
        half = half_gemm(hidden, weight)
        operand = weight if half else weight.float()  # cast once, not per chunk
        for start in range(0, hidden.shape[0], ctx.chunk_size):
            rows = slice(start, start + ctx.chunk_size)
            chunk = hidden[rows] if half else hidden[rows].float()
            logits = fp32_matmul(chunk, operand.t()).div_(ctx.temperature)
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
            grad_logits = grad_logits.to(operand.dtype)  # half GEMMs take half operands
            grad_hidden[rows] = fp32_matmul(grad_logits, operand)
            grad_weight += fp32_matmul(grad_logits.t(), chunk)
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


def vocab_head(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    sequence_parallel: bool,
    temperature: float = 1.0,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    vocab_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The actor's head: :func:`chunked_log_probs` of the last stage's hidden states
    ``[S, B, H]`` (``[S / TP, B, H]`` on each TP rank under sequence parallelism) for
    ``targets`` ``[S, B]``; returns ``[S, B]`` log-probs and entropy."""
    if sequence_parallel:
        from megatron_fipo.megatron.cp_attention import gather_sequence

        # [S / TP, B, H] -> [S, B, H] over the TP group; its backward reduce-scatters (sums
        # over TP), so chunked_log_probs must not all-reduce the gradient again.
        hidden = gather_sequence(hidden, _tp_group(None))
    return chunked_log_probs(
        hidden,
        weight,
        targets,
        temperature=temperature,
        chunk_size=chunk_size,
        vocab_size=vocab_size,
        reduce_hidden_grad=not sequence_parallel,
    )


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
