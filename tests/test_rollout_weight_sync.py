"""Weight sync from a TP=2, PP=2 Megatron actor (4 gloo ranks) into the HF engine.

One spawned world runs the whole scenario once (actor build, sync, generation, log-probs, one
FIPO train step, sync again); the tests below check its pieces.
"""

from __future__ import annotations

import pytest
import torch
from megatron_harness import WorkerWorld

from checkpoint_convert.adapters import adapter_for
from megatron_fipo.rollout.weight_sync import ParamMeta, plan_buckets

VOCAB = 64
PROMPT = [3, 17, 42, 5, 9]
FIXED = [7, 1, 33, 60, 2, 19, 44, 8, 8, 31]  # a fixed sequence: 4 prompt + 6 response tokens
NUM_GREEDY = 3
BUCKET_BYTES = 100_000


def hf_config() -> dict:
    from megatron_fipo.megatron.check_parallel import tiny_hf_config

    return tiny_hf_config(num_layers=4, tie_word_embeddings=False, vocab_size=VOCAB)


def _actor_log_probs(actor, sequences, prompt_lengths):
    from megatron_fipo.megatron.actor import ActorBatch

    prompt_lengths = torch.tensor(prompt_lengths)
    batch = ActorBatch(
        input_ids=[torch.tensor(s) for s in sequences],
        prompt_lengths=prompt_lengths,
        response_lengths=torch.tensor([len(s) for s in sequences]) - prompt_lengths,
    )
    return actor.compute_log_probs(batch)


def _train_batch():
    from megatron_fipo.megatron.check_parallel import CheckSettings, fixed_batch

    return fixed_batch(CheckSettings(num_sequences=4, seed=5), vocab_size=VOCAB)


def scenario(rank, world_size):
    import torch.distributed as dist

    from megatron_fipo.algorithms.losses import PolicyLossConfig
    from megatron_fipo.config import OptimizerConfig
    from megatron_fipo.megatron import checkpoint
    from megatron_fipo.megatron.actor import MegatronActor
    from megatron_fipo.megatron.check_parallel import layout, model_section
    from megatron_fipo.megatron.distributed import destroy
    from megatron_fipo.rollout.engine import GenerationRequest, SamplingParams
    from megatron_fipo.rollout.hf_engine import HFRolloutEngine
    from megatron_fipo.rollout.weight_sync import WeightSync, WeightSyncConfig

    hf = hf_config()
    actor = MegatronActor(
        hf,
        model_section(hf, logprob_chunk_size=16),
        layout(tp=2, pp=2, micro_batch_size=16),
        OptimizerConfig(lr=1e-2, lr_warmup_steps=0),
        PolicyLossConfig(mode="fipo"),
        seed=3,
    )
    sync = WeightSync(
        actor.named_parameters_for_sync, hf, WeightSyncConfig(bucket_bytes=BUCKET_BYTES)
    )
    engine = HFRolloutEngine(hf_config=hf) if rank == 0 else None  # its own random init
    out: dict = {"version1": sync.sync(engine)}
    if rank == 0:
        out["stats"] = sync.stats
        out["state1"] = {k: v.clone() for k, v in engine.model.state_dict().items()}
        request = GenerationRequest(
            prompt_token_ids=PROMPT,
            sampling=SamplingParams(temperature=0.0, max_new_tokens=NUM_GREEDY),
        )
        out["greedy"] = engine.generate([request])[0]
        # The fixed sequence's log-probs from the engine by a plain full forward (no cache).
        with torch.no_grad():
            logits = engine.model(input_ids=torch.tensor([FIXED])).logits[0, 3:-1].float()
        out["engine_fixed_full"] = torch.log_softmax(logits, -1).gather(
            -1, torch.tensor(FIXED[4:])[:, None]
        )[:, 0]
    shared = [out.get("greedy")]
    dist.broadcast_object_list(shared, src=0)
    tokens = shared[0].response_token_ids
    out["actor_greedy_lp"] = _actor_log_probs(actor, [PROMPT + tokens], [len(PROMPT)])[0]
    out["actor_fixed_lp"] = _actor_log_probs(actor, [FIXED], [4])[0]
    # The actor's full next-token distribution at each greedy step: one 1-token response per
    # vocabulary entry, so its argmax continuation can be compared with the engine's.
    candidates = [PROMPT + tokens[:step] + [v] for step in range(NUM_GREEDY) for v in range(VOCAB)]
    lp = _actor_log_probs(actor, candidates, [len(c) - 1 for c in candidates])[:, 0]
    out["actor_argmax"] = lp.view(NUM_GREEDY, VOCAB).argmax(-1).tolist()
    batch = _train_batch()
    batch.old_log_probs = (
        actor.compute_log_probs(batch) + batch.old_log_probs[:, : int(batch.response_lengths.max())]
    )
    actor.train_step(batch)
    # The second sync reuses its buffers across buckets (the HF engine copies each tensor).
    reuse = WeightSync(
        actor.named_parameters_for_sync,
        hf,
        WeightSyncConfig(bucket_bytes=BUCKET_BYTES, reuse_buffers=True),
    )
    out["version2"] = reuse.sync(engine, version=sync.version + 1)
    full = checkpoint.gather_full_parameters(actor.model, vocab_size=VOCAB)
    if rank == 0:
        out["full"] = full
        out["state2"] = dict(engine.model.state_dict())
    destroy()
    return out


def data_parallel_scenario(rank, world_size):
    """TP = 2, DP = 2: only the DP-rank-0 replica moves weights; the engine gets all of them."""
    from megatron_fipo.megatron import checkpoint
    from megatron_fipo.megatron.actor import MegatronActor
    from megatron_fipo.megatron.check_parallel import layout, model_section
    from megatron_fipo.megatron.distributed import destroy
    from megatron_fipo.rollout.hf_engine import HFRolloutEngine
    from megatron_fipo.rollout.weight_sync import WeightSync, WeightSyncConfig

    hf = hf_config()
    actor = MegatronActor(hf, model_section(hf), layout(tp=2), seed=4)
    sync = WeightSync(
        actor.named_parameters_for_sync, hf, WeightSyncConfig(bucket_bytes=BUCKET_BYTES)
    )
    engine = HFRolloutEngine(hf_config=hf) if rank == 0 else None
    sync.sync(engine)
    full = checkpoint.gather_full_parameters(actor.model, vocab_size=VOCAB)
    out = {"in_source_replica": sync.in_source_replica, "num_buckets": sync.stats.num_buckets}
    if rank == 0:
        out |= {"full": full, "state": dict(engine.model.state_dict())}
    destroy()
    return out


@pytest.fixture(scope="module")
def world():
    with WorkerWorld(4, timeout_s=400) as world:
        yield world


@pytest.fixture(scope="module")
def result(world):
    return world.run(scenario)[0]


def test_only_the_source_replica_moves_weights_under_data_parallel(world, result):
    outs = world.run(data_parallel_scenario)
    assert [o["in_source_replica"] for o in outs] == [True, True, False, False]
    assert outs[0]["num_buckets"] > 0 and outs[2]["num_buckets"] == 0
    adapter = adapter_for(hf_config())
    for name, full in outs[0]["full"].items():
        assert torch.equal(
            adapter.hf_to_megatron(name, outs[0]["state"].__getitem__)[: full.shape[0]], full
        ), name


def test_engine_log_probs_equal_actor_compute_log_probs(result):
    greedy = result["greedy"]
    torch.testing.assert_close(
        torch.tensor(greedy.log_probs), result["actor_greedy_lp"][:NUM_GREEDY], atol=1e-4, rtol=0
    )
    torch.testing.assert_close(
        result["engine_fixed_full"], result["actor_fixed_lp"][:6], atol=1e-4, rtol=0
    )


def test_engine_greedy_equals_actor_argmax(result):
    assert result["greedy"].response_token_ids == result["actor_argmax"]


def test_weights_bit_exact_after_train_step_and_sync(result):
    assert (result["version1"], result["version2"]) == (1, 2)
    adapter = adapter_for(hf_config())
    state = result["state2"]
    changed = 0
    for name, full in result["full"].items():
        rebuilt = adapter.hf_to_megatron(name, state.__getitem__)[: full.shape[0]]
        assert torch.equal(rebuilt, full), name
        before = adapter.hf_to_megatron(name, result["state1"].__getitem__)[: full.shape[0]]
        changed += not torch.equal(before, full)
    assert changed == len(result["full"])  # the train step moved every tensor; the sync followed


def test_buckets_cover_every_parameter_once_and_respect_the_size(result):
    stats = result["stats"]
    names = [name for bucket in stats.bucket_names for name in bucket]
    assert sorted(names) == sorted(result["full"])  # each parameter once, all stages
    assert stats.num_buckets > 4
    assert stats.max_bucket_bytes <= BUCKET_BYTES
    assert stats.num_tensors == len(adapter_for(hf_config()).hf_shapes())  # every HF tensor sent


def test_plan_buckets_bounds_and_order():
    metas = [
        ParamMeta(name=f"p{i}", shape=(n,), dtype=dtype, stage=stage, tensor_parallel=False)
        for i, (n, dtype, stage) in enumerate(
            [(10, torch.float32, 0), (10, torch.float32, 0), (30, torch.float32, 0), (5, torch.bfloat16, 0),
             (5, torch.bfloat16, 0), (4, torch.float32, 1), (100, torch.float32, 1)]
        )
    ]  # fmt: skip
    buckets = plan_buckets(metas, bucket_bytes=80)
    assert [[m.name for m in b] for b in buckets] == [
        ["p0", "p1"],
        ["p2"],
        ["p3", "p4"],
        ["p5"],
        ["p6"],
    ]
    for bucket in buckets:
        assert len(bucket) == 1 or sum(m.num_bytes for m in bucket) <= 80
        assert len({(m.stage, m.dtype) for m in bucket}) == 1


def test_streaming_engine_receives_tensors_before_the_last_bucket_is_built():
    """Peak extra memory is one bucket: with a lazy stream the consumer sees the first bucket's
    tensors while later buckets do not exist yet (single process, TP = PP = 1)."""
    import torch.distributed as dist

    from megatron_fipo.megatron.distributed import init_process_group_from_env

    created = not dist.is_initialized()
    if created:
        init_process_group_from_env("gloo")
    try:
        _check_streaming()
    finally:
        if created:
            dist.destroy_process_group()


def _check_streaming():
    import torch.distributed as dist

    from megatron_fipo.rollout.weight_sync import WeightSync, WeightSyncConfig

    shapes = adapter_for(hf_config()).megatron_specs()
    shards = []
    for spec in shapes:
        count = hf_config()["num_hidden_layers"] if spec.per_layer else 1
        for layer in range(count):
            name = (
                spec.key.replace("decoder.layers.", f"decoder.layers.{layer}.")
                if spec.per_layer
                else spec.key
            )
            shards.append(_Shard(name, torch.randn(spec.shape)))
    group = dist.group.WORLD
    sync = WeightSync(
        lambda: shards,
        hf_config(),
        WeightSyncConfig(bucket_bytes=BUCKET_BYTES),
        tp_group=group,
        pp_group=group,
    )
    seen_buckets = [sync.stats.num_buckets for _ in sync.iter_hf_tensors()]
    assert seen_buckets[0] == 1 and seen_buckets[-1] == sync.stats.num_buckets > 4


class _Shard:
    def __init__(self, name, tensor):
        self.name, self.tensor = name, tensor
        self.tensor_parallel, self.partition_dim, self.tp_size, self.tp_rank = False, None, 1, 0
        self.gated = False
