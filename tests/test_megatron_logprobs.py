"""Chunked vocab-parallel log-probs: equal to the unchunked reference, values and gradients,
at TP=1 and TP=2 (gloo), within the fp32 rounding tolerances of :mod:`megatron_fipo.numerics`;
bf16-rounded inputs, a realistic precision bug, fail them."""

from __future__ import annotations

import pytest
import torch
from megatron_harness import WorkerWorld

from megatron_fipo.megatron.logprobs import chunked_log_probs, log_probs_from_logits
from megatron_fipo.numerics import compare_tensors

NUM_TOKENS, HIDDEN, VOCAB = 37, 16, 256
NAMES = ("log_probs", "entropy", "hidden_grad", "weight_grad")


def _depths(vocab_size: int = VOCAB) -> tuple[int, int, int, int]:
    """Terms summed along each compared quantity's path: the logit GEMM (HIDDEN) then the
    softmax sums over the vocabulary; the hidden gradient adds d_logits @ W (vocab terms),
    the weight gradient d_logits^T @ hidden (NUM_TOKENS terms)."""
    forward = HIDDEN + vocab_size
    return forward, forward, forward + vocab_size, forward + NUM_TOKENS


def _compare(got, want, vocab_size: int = VOCAB):
    return [
        compare_tensors(name, a.float(), b.float(), depth)
        for name, a, b, depth in zip(NAMES, got, want, _depths(vocab_size))
    ]


def _inputs(seed: int = 0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(NUM_TOKENS, HIDDEN, generator=gen, dtype=dtype)
    weight = torch.randn(VOCAB, HIDDEN, generator=gen, dtype=dtype) * 0.5
    targets = torch.randint(0, VOCAB, (NUM_TOKENS,), generator=gen)
    grad_lp = torch.randn(NUM_TOKENS, generator=gen, dtype=torch.float32)
    grad_ent = torch.randn(NUM_TOKENS, generator=gen, dtype=torch.float32)
    return hidden, weight, targets, grad_lp, grad_ent


def _grads(fn, hidden, weight, grad_lp, grad_ent):
    hidden = hidden.clone().requires_grad_(True)
    weight = weight.clone().requires_grad_(True)
    log_probs, entropy = fn(hidden, weight)
    (log_probs * grad_lp).sum().add((entropy * grad_ent).sum()).backward()
    return log_probs.detach(), entropy.detach(), hidden.grad, weight.grad


@pytest.mark.parametrize("chunk_size", [1, 5, 37, 100])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_chunked_equals_unchunked_single_rank(chunk_size, temperature):
    hidden, weight, targets, grad_lp, grad_ent = _inputs(dtype=torch.float32)

    def chunked(h, w):
        return chunked_log_probs(h, w, targets, temperature=temperature, chunk_size=chunk_size)

    def reference(h, w):
        return log_probs_from_logits(h @ w.t(), targets, temperature=temperature)

    got = _grads(chunked, hidden, weight, grad_lp, grad_ent)
    want = _grads(reference, hidden, weight, grad_lp, grad_ent)
    comparisons = _compare(got, want)
    assert all(c.ok for c in comparisons), "\n".join(map(str, comparisons))


def test_bf16_inputs_fail_the_fp32_tolerance():
    """The tolerances are not loose: the same chunked log-probs from hidden states and
    weights rounded to bf16 (a dtype slip on the log-prob path) fail every comparison."""
    hidden, weight, targets, grad_lp, grad_ent = _inputs(dtype=torch.float32)

    def chunked(h, w):
        return chunked_log_probs(h.bfloat16().float(), w.bfloat16().float(), targets)

    def reference(h, w):
        return log_probs_from_logits(h @ w.t(), targets)

    got = _grads(chunked, hidden, weight, grad_lp, grad_ent)
    want = _grads(reference, hidden, weight, grad_lp, grad_ent)
    comparisons = _compare(got, want)
    assert all(c.ratio > 5 for c in comparisons), "\n".join(map(str, comparisons))


def test_padded_vocab_columns_are_ignored():
    hidden, weight, targets, grad_lp, grad_ent = _inputs(dtype=torch.float32)
    targets = targets % 200

    def chunked(h, w):
        return chunked_log_probs(h, w, targets, chunk_size=9, vocab_size=200)

    def reference(h, w):
        return log_probs_from_logits(h @ w.t(), targets, vocab_size=200)

    got = _grads(chunked, hidden, weight, grad_lp, grad_ent)
    want = _grads(reference, hidden, weight, grad_lp, grad_ent)
    comparisons = _compare(got, want, vocab_size=200)
    assert all(c.ok for c in comparisons), "\n".join(map(str, comparisons))
    assert float(got[3][200:].abs().max()) == 0.0  # padded rows get no gradient


def test_leading_shape_and_bad_input():
    hidden, weight, targets, *_ = _inputs(dtype=torch.float32)
    log_probs, entropy = chunked_log_probs(
        hidden[:36].view(6, 6, HIDDEN), weight, targets[:36].view(6, 6)
    )
    assert log_probs.shape == entropy.shape == (6, 6)
    assert bool((log_probs <= 0).all()) and bool((entropy >= 0).all())
    with pytest.raises(ValueError, match="temperature"):
        chunked_log_probs(hidden, weight, targets, temperature=0.0)
    with pytest.raises(ValueError, match="differ"):
        chunked_log_probs(hidden, weight, targets[:5])


def _tp_case(rank, world_size, chunk_size, temperature, vocab_size):
    from megatron_fipo.megatron.check_parallel import layout
    from megatron_fipo.megatron.distributed import destroy, init_distributed

    init_distributed(layout(tp=world_size))
    try:
        hidden, weight, targets, grad_lp, grad_ent = _inputs(seed=3, dtype=torch.float32)
        local = VOCAB // world_size
        shard = weight[rank * local : (rank + 1) * local]

        targets = targets % vocab_size

        def chunked(h, w):
            return chunked_log_probs(
                h, w, targets, temperature=temperature, chunk_size=chunk_size, vocab_size=vocab_size
            )

        def reference(h, w):  # the unpadded vocabulary on one rank, plain torch
            logits = (h @ w[:vocab_size].t()).float() / temperature
            log_softmax = torch.log_softmax(logits, dim=-1)
            entropy = -(log_softmax.exp() * log_softmax).sum(-1)
            return log_softmax.gather(-1, targets[:, None]).squeeze(-1), entropy

        got = _grads(chunked, hidden, shard, grad_lp, grad_ent)
        want = list(_grads(reference, hidden, weight, grad_lp, grad_ent))
        want[3] = want[3][rank * local : (rank + 1) * local]
        return _compare(got, want, vocab_size)
    finally:
        destroy()


@pytest.fixture(scope="module")
def world2():
    with WorkerWorld(2) as world:
        yield world


@pytest.mark.parametrize(
    "chunk_size,temperature,vocab_size",
    [(8, 1.0, VOCAB), (1000, 0.6, VOCAB), (7, 1.0, 200), (16, 0.8, 100)],  # 100: rank 1 all padding
)
def test_tp2_equals_single_rank(world2, chunk_size, temperature, vocab_size):
    for comparisons in world2.run(_tp_case, chunk_size, temperature, vocab_size):
        assert all(c.ok for c in comparisons), "\n".join(map(str, comparisons))


def _sequence_parallel_case(rank, world_size):
    """The actor's vocab head under sequence parallelism (each TP rank holds 1/TP of the
    positions: what TE's sequence-parallel layers hand it) against the plain TP head."""
    from megatron_fipo.megatron.check_parallel import layout
    from megatron_fipo.megatron.distributed import destroy, init_distributed
    from megatron_fipo.megatron.logprobs import vocab_head

    init_distributed(layout(tp=world_size))
    try:
        hidden, weight, targets, grad_lp, grad_ent = _inputs(seed=5, dtype=torch.float32)
        rows = NUM_TOKENS - NUM_TOKENS % world_size
        hidden, targets = hidden[:rows, None], targets[:rows, None]  # [S, B=1, H]
        grad_lp, grad_ent = grad_lp[:rows, None], grad_ent[:rows, None]
        local = VOCAB // world_size
        shard = weight[rank * local : (rank + 1) * local]
        part = slice(rank * rows // world_size, (rank + 1) * rows // world_size)

        def head(sequence_parallel):
            def run(h, w):
                return vocab_head(h, w, targets, sequence_parallel=sequence_parallel, chunk_size=8)

            return run

        got = _grads(head(True), hidden[part], shard, grad_lp, grad_ent)
        want = _grads(head(False), hidden, shard, grad_lp, grad_ent)
        want = (want[0], want[1], want[2][part], want[3])  # this rank's positions
        return _compare(got, want)
    finally:
        destroy()


def test_sequence_parallel_head_equals_tensor_parallel_head(world2):
    """Sequence parallelism on CPU: megatron-core's local norms refuse it, so the layers'
    sequence-parallel path runs only with the TE spec on GPUs. What our code adds to it, the
    vocab head's gather of the positions and its gradient (reduce-scattered, not all-reduced
    again), is checked here at TP = 2: log-probs, entropy and both gradients."""
    for comparisons in world2.run(_sequence_parallel_case):
        assert all(c.ok for c in comparisons), "\n".join(map(str, comparisons))


def _recorded_ops(fn):
    """Every aten op ``fn`` dispatches, with its tensor arguments' dtypes / shapes and its
    result's dtype."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Recorder(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            inputs = [(a.dtype, tuple(a.shape)) for a in args if isinstance(a, torch.Tensor)]
            result = out.dtype if isinstance(out, torch.Tensor) else None
            self.ops.append((str(func), inputs, result))
            return out

    with Recorder() as recorder:
        fn()
    return recorder.ops


def _head_forward_backward(device: str, chunk_size: int):
    hidden = torch.randn(NUM_TOKENS, HIDDEN, device=device, dtype=torch.bfloat16)
    weight = torch.randn(VOCAB, HIDDEN, device=device, dtype=torch.bfloat16)
    hidden.requires_grad_(True)
    weight.requires_grad_(True)
    targets = torch.randint(0, VOCAB, (NUM_TOKENS,), device=device)

    def run():
        log_probs, entropy = chunked_log_probs(hidden, weight, targets, chunk_size=chunk_size)
        (log_probs.sum() + entropy.sum()).backward()

    return run


def test_bf16_head_gemms_take_bf16_operands_with_fp32_results():
    """The CUDA path, on the meta device (same dispatch, shapes only): with bf16 hidden states
    and weight every vocab GEMM (forward, and both backward ones) multiplies the bf16
    operands with an fp32 result, and no fp32 copy of the weight is made. The old code
    multiplied fp32 copies (CUDA cores, or TF32 only when the hidden states were bf16)."""
    ops = _recorded_ops(_head_forward_backward("meta", chunk_size=10))
    gemms = [op for op in ops if op[0].startswith("aten.mm")]
    assert len(gemms) == 4 + 3 * 4  # 4 chunks: 1 forward; 1 recomputed + 2 backward GEMMs each
    for name, inputs, result in gemms:
        assert name == "aten.mm.dtype", name
        assert [dtype for dtype, _ in inputs] == [torch.bfloat16] * 2 and result == torch.float32
    copies = [op for op in ops if op[0].startswith("aten._to_copy")]
    assert not [op for op in copies if op[1][0] == (torch.bfloat16, (VOCAB, HIDDEN))], copies


def test_upcast_path_casts_the_weight_once_per_pass():
    """CPU (no bf16 -> fp32 GEMM there): the operands are upcast, the weight once per forward
    and once per backward, not once per chunk (it was: 4 chunks, 4 + 4 copies of the
    [V / TP, H] weight), and the GEMMs run in fp32 on exactly the bf16 values."""
    ops = _recorded_ops(_head_forward_backward("cpu", chunk_size=10))
    weight_copies = [
        op
        for op in ops
        if op[0].startswith("aten._to_copy") and op[1][0] == (torch.bfloat16, (VOCAB, HIDDEN))
    ]
    assert len(weight_copies) == 2, weight_copies
    gemms = [op for op in ops if op[0].startswith("aten.mm")]
    assert all(dtype == torch.float32 for _, inputs, _ in gemms for dtype, _ in inputs)
