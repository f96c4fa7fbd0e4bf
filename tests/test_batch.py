"""The rollout batch's row selection and the token-balanced data-parallel partition."""

import dataclasses

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


def _agreement_case(rank, world_size):
    from megatron_fipo.cluster.workers import _engine_agreement
    from megatron_fipo.megatron.check_parallel import layout
    from megatron_fipo.megatron.distributed import destroy, init_distributed

    init_distributed(layout())  # data parallel over the two processes
    try:
        rows = 3
        actor = torch.full((rows, 4), -1.0)
        engine = actor.clone()
        engine[0, 1] += 1e-6 * (rank + 1)  # a fresh row: rounding-size disagreement
        engine[2, 0] += 0.9  # surplus from an earlier step: sampled with older weights
        batch = ActorBatch(
            input_ids=[torch.zeros(6, dtype=torch.int64)] * rows,
            prompt_lengths=torch.full((rows,), 2),
            response_lengths=torch.tensor([4, 2, 4]),
            old_log_probs=actor,
            rollout_log_probs=engine,
            fresh=torch.tensor([True, True, False]),
        )
        with_fresh = _engine_agreement(batch)
        everything = _engine_agreement(dataclasses.replace(batch, fresh=None))
        only_surplus = _engine_agreement(batch.select([2]))
        return with_fresh, everything, only_surplus
    finally:
        destroy()


def test_engine_agreement_leaves_out_rows_sampled_with_older_weights():
    """The engine-vs-actor log-prob metric compares only rows sampled with the actor's current
    weights; dynamic-sampling surplus carried over from an earlier step is one version old."""
    from megatron_harness import WorkerWorld

    with WorkerWorld(2) as world:
        results = world.run(_agreement_case)
    for with_fresh, everything, only_surplus in results:
        # 2 ranks x 6 valid fresh tokens; the largest difference is rank 1's 2e-6
        assert abs(with_fresh["rollout/logprob_diff_max"] - 2e-6) < 1e-7
        assert abs(with_fresh["rollout/logprob_diff_mean"] - 3e-6 / 12) < 1e-8
        assert everything["rollout/logprob_diff_max"] > 0.8  # without the mask the surplus shows
        assert only_surplus == {}
