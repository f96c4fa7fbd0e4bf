"""The rollout batch's row selection and the token-balanced data-parallel partition."""

import torch

from megatron_fipo.batch import ActorBatch, balanced_partition


def _batch():
    prompts = torch.tensor([2, 3, 2, 4])
    responses = torch.tensor([5, 1, 3, 2])
    return ActorBatch(
        input_ids=[torch.arange(int(p + r)) for p, r in zip(prompts, responses)],
        prompt_lengths=prompts,
        response_lengths=responses,
        advantages=torch.tensor([1.0, -1.0, 0.5, 0.0]),
        old_log_probs=torch.arange(20.0).reshape(4, 5),
        rollout_log_probs=-torch.arange(20.0).reshape(4, 5),
    )


def test_select_keeps_rows_in_order_and_cuts_columns_to_the_longest():
    part = _batch().select([3, 1])
    assert [t.numel() for t in part.input_ids] == [6, 4]
    assert part.response_lengths.tolist() == [2, 1] and part.advantages.tolist() == [0.0, -1.0]
    assert part.old_log_probs.tolist() == [[15.0, 16.0], [5.0, 6.0]]
    assert part.rollout_log_probs.shape == (2, 2) and len(part) == 2
    assert part.lengths.tolist() == [6, 4]


def test_balanced_partition_evens_tokens_and_covers_every_row_once():
    lengths = [900, 100, 120, 80, 850, 60, 90, 700]
    parts = balanced_partition(lengths, 2)
    assert sorted(r for p in parts for r in p) == list(range(8))
    loads = [sum(lengths[r] for r in p) for p in parts]
    assert max(loads) - min(loads) <= max(lengths)  # greedy bound; round-robin gives 1020 here
    assert loads == [1350, 1550]
    round_robin = [sum(lengths[0::2]), sum(lengths[1::2])]
    assert max(round_robin) - min(round_robin) > max(loads) - min(loads)
    assert balanced_partition([5, 5, 5], 3) == [[0], [1], [2]]
    assert all(balanced_partition([1] * 4, 4))  # no empty part with rows >= parts
