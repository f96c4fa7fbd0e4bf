"""Micro-batch plans (no process group): every row once, within the token budget, packed rows
first-fit, and the padding rules (2 * CP * TP per sequence; with FP8 every rank's GEMMs get a
multiple of the alignment)."""

from __future__ import annotations

import pytest
import torch

from megatron_fipo.config import ModelConfig, padding_multiples
from megatron_fipo.megatron.check_parallel import layout
from megatron_fipo.megatron.micro_batches import plan_micro_batches

CPU = ModelConfig(hf_model_path="m", dtype="float32", spec="local")
FP8 = ModelConfig(hf_model_path="m", dtype="bfloat16", spec="te", fp8="e4m3")
LENGTHS = torch.tensor([5, 30, 9, 17, 3, 12, 44, 8])


def _rows(plan) -> list[int]:
    return torch.cat([p.rows for p in plan]).tolist()


def test_padded_rows_longest_first_within_the_budget():
    """Unpacked: each group padded to its first (longest) row; a row over the budget is named."""
    config = layout(cp=2, max_tokens_per_micro_batch=48, packing=False)
    plan = plan_micro_batches(LENGTHS, config, CPU)
    assert sorted(_rows(plan)) == list(range(8))
    assert LENGTHS[_rows(plan)].tolist() == sorted(LENGTHS.tolist(), reverse=True)
    for item in plan:
        assert not item.packed and len(set(item.padded_lengths)) == 1
        assert item.padded_lengths[0] % 4 == 0
        assert item.padded_lengths[0] >= int(LENGTHS[item.rows].max())
        assert item.num_tokens <= 48
    assert [len(p.rows) for p in plan] == [1, 1, 2, 4]  # 44 | 30 | 17+12 | 9+8+5+3
    with pytest.raises(ValueError, match="exceeds parallelism.max_tokens_per_micro_batch=48"):
        plan_micro_batches(torch.tensor([10, 49]), config, CPU)  # 49 pads to 52 for CP = 2


def test_packed_rows_first_fit_and_waste_only_the_round_up():
    """Packed (the default with a budget): first-fit decreasing into rows of <= 48 tokens,
    each sequence padded to a multiple of 4 (CP = 2) only: 140 tokens for 128 real ones in
    three rows, where padded rows of the same budget compute 164 in four."""
    config = layout(cp=2, max_tokens_per_micro_batch=48)
    plan = plan_micro_batches(LENGTHS, config, CPU)
    assert all(item.packed for item in plan)
    assert sorted(_rows(plan)) == list(range(8))
    for item in plan:
        sizes = item.padded_lengths
        assert all(size % 4 == 0 for size in sizes) and item.num_tokens <= 48
        assert all(size == -(-int(n) // 4) * 4 for size, n in zip(sizes, LENGTHS[item.rows]))
    # padded sizes 44 | 32 + 12 | 20 + 12 + 8 + 8, and the last 4 back into the first row
    assert [p.rows.tolist() for p in plan] == [[6, 4], [1, 5], [3, 2, 7, 0]]
    assert sum(p.num_tokens for p in plan) == 140
    padded = plan_micro_batches(
        LENGTHS, layout(cp=2, max_tokens_per_micro_batch=48, packing=False), CPU
    )
    assert sum(p.num_tokens for p in padded) == 164
    fixed = plan_micro_batches(LENGTHS, layout(micro_batch_size=3, packing=True), CPU)
    assert [p.rows.tolist() for p in fixed] == [[0, 1, 2], [3, 4, 5], [6, 7]]
    assert fixed[0].padded_lengths == (6, 30, 10)  # multiples of 2 (CP = TP = 1)


@pytest.mark.parametrize(
    "model,parallel,expected",
    [
        (CPU, layout(tp=8, cp=2), (32, 32)),
        (FP8, layout(), (2, 16)),
        (FP8, layout(tp=8, cp=2), (32, 256)),
        (FP8, layout(tp=2, cp=1), (4, 32)),
        (ModelConfig(hf_model_path="m", spec="te", fp8="e4m3", fp8_recipe="mxfp8"),
         layout(tp=8, cp=2), (32, 512)),
    ],
    ids=["bf16", "fp8-1gpu", "fp8-tp8-cp2", "fp8-tp2", "mxfp8-tp8-cp2"],
)  # fmt: skip
def test_padding_multiples(model, parallel, expected):
    """Without FP8 a row is padded like its sequences (2 * CP * TP); with FP8 each rank's row
    share (row / CP, and / TP once sequence-parallel) must be a multiple of 16 (32: mxfp8):
    lcm(16, 2 * TP * CP) = 32 would leave TP8 x CP2 ranks 2 tokens each."""
    assert padding_multiples(model, parallel) == expected


def test_fp8_rows_align_every_ranks_tokens():
    """FP8, TP 2 x CP 2, packed: each sequence stays a multiple of 8; each row's total is a
    multiple of 64, so each rank's 1/CP (and 1/(CP*TP)) share is a multiple of 16; the last
    sequence of a row takes the extra padding. Padded rows round their common length."""
    config = layout(tp=2, cp=2, max_tokens_per_micro_batch=256)
    lengths = torch.tensor([100, 7, 33, 60, 2])
    plan = plan_micro_batches(lengths, config, FP8)
    assert sorted(_rows(plan)) == list(range(5))
    for item in plan:
        assert item.num_tokens % 64 == 0 and item.num_tokens <= 256
        assert all(size % 8 == 0 for size in item.padded_lengths)
        minimal = [-(-int(n) // 8) * 8 for n in lengths[item.rows]]
        assert list(item.padded_lengths[:-1]) == minimal[:-1]  # only the last one grows
        assert item.padded_lengths[-1] - minimal[-1] < 64
    unpacked = plan_micro_batches(lengths, layout(tp=2, cp=2, micro_batch_size=2), FP8)
    assert {item.padded_lengths[0] for item in unpacked} == {128}  # 100 -> 104 -> 128
    with pytest.raises(ValueError, match=r"padded to 320"):
        plan_micro_batches(torch.tensor([300]), config, FP8)


def test_fp8_budget_check_in_the_run_config():
    """The run config refuses a budget that cannot hold one full sequence after the FP8
    round-up, naming the padded size."""
    from pathlib import Path

    from megatron_fipo.config import ConfigError, load_config

    big = Path(__file__).resolve().parent.parent / "configs/qwen2.5-32b-fipo.yaml"
    ok = load_config(big, ["model.fp8=e4m3"])  # 22528 = 88 x 256: holds
    assert ok.parallelism.max_tokens_per_micro_batch == 22528
    with pytest.raises(ConfigError, match=r"padded to 22784 .*FP8 alignment"):
        load_config(big, ["model.fp8=e4m3", "rollout.max_response_length=20512"])


def test_packed_rows_drop_and_count_sequences_not_rows():
    """FIPO's sequence drop on a packed row equals the unpacked one: the loss, and the dropped
    sequences counted per sequence (1 of 3); a row-wise count said 1 of 1."""
    from megatron_fipo.algorithms.losses import PolicyLossConfig, compute_policy_loss
    from megatron_fipo.megatron.context_parallel import build_layout, split_to_local
    from megatron_fipo.megatron.cp_scan import make_cp_future_sum, make_cp_sequence_sum

    lengths = [6, 5, 7]
    gen = torch.Generator().manual_seed(0)
    mask = (torch.arange(7) < torch.tensor(lengths)[:, None]).float()
    mask[:, 0] = 0.0  # a prompt token
    log_probs = -torch.rand(3, 7, generator=gen)
    old = log_probs - 0.1 * torch.rand(3, 7, generator=gen)
    old[1, 2:4] = log_probs[1, 2:4] - 3.0  # two ratios of e^3 > c = 10: sequence 1 drops
    advantages = torch.tensor([1.0, -1.0, -1.0])[:, None].expand(3, 7)
    config = PolicyLossConfig()
    plain_loss, plain = compute_policy_loss(log_probs, old, advantages, mask, config, 40.0)
    layout = build_layout(lengths, 1, 0, packed=True)
    local = [split_to_local(x, layout) for x in (log_probs, old, advantages, mask)]
    packed_loss, packed = compute_policy_loss(
        *local,
        config,
        40.0,
        future_sum_fn=make_cp_future_sum(layout),
        sequence_sum_fn=make_cp_sequence_sum(layout),
    )
    assert float(plain["actor/dropped_seqs_sum"]) == 1.0
    for key in ("actor/dropped_seqs_sum", "actor/dropped_seqs_count"):
        assert float(packed[key]) == pytest.approx(float(plain[key]), rel=1e-12), key
    tolerance = 8 * 2**-24 * float(plain_loss.abs()) * 18**0.5  # 18 summed tokens, reordered
    assert abs(float(packed_loss) - float(plain_loss)) <= tolerance
