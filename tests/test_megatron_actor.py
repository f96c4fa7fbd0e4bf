"""The Megatron actor under TP / PP / DP (gloo, CPU) against one process.

One optimizer step of the FIPO loss on a fixed ragged batch: log-probs, loss, gradient norm
and the updated parameters must match the single-process run to ~1e-5 (fp32). With SGD at
lr 1 and no clipping the parameter update IS the gradient, so those cases compare gradients
exactly; the Adam cases exercise the distributed optimizer and clipping. Also: checkpoints
saved at TP=2 reload at TP=1 with identical log-probs, and an actor checkpoint (model +
optimizer + scheduler) resumes to the same next step.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from megatron_harness import WorkerWorld

from megatron_fipo.megatron.check_parallel import (
    TOLERANCES,
    CheckSettings,
    compare,
    fixed_batch,
    run_layout,
)
from megatron_fipo.megatron.distributed import ParallelConfig

ADAM = CheckSettings(optimizer="adam", num_layers=4)
SGD = CheckSettings(optimizer="sgd", num_layers=4)
TIED_SGD = CheckSettings(optimizer="sgd", num_layers=4, tie_word_embeddings=True)
# Dynamic batching: the fixed batch's sequences (6-31 tokens) in micro-batches of <= 64
# padded tokens, so 2-5 rows of varying width each.
DYNAMIC = dataclasses.replace(ADAM, max_tokens_per_micro_batch=64)


def _layout_case(rank, world_size, parallel, settings, checkpoint_dir, reference):
    return run_layout(parallel, settings, checkpoint_dir, reference)


@pytest.fixture(scope="module")
def world1():
    with WorkerWorld(1) as world:
        yield world


@pytest.fixture(scope="module")
def world2():
    with WorkerWorld(2) as world:
        yield world


@pytest.fixture(scope="module")
def references(world1, tmp_path_factory):
    """Single-process results (and initial-weight checkpoints) per settings."""
    cache = {}

    def get(settings):
        key = dataclasses.astuple(settings)
        if key not in cache:
            directory = str(tmp_path_factory.mktemp("init") / "ckpt")
            result = world1.run(_layout_case, ParallelConfig(), settings, directory, True)[0]
            cache[key] = (result, directory)
        return cache[key]

    return get


def _check(reference, result):
    diffs = compare(reference, result)
    for key, value in diffs.items():
        assert value <= TOLERANCES[key], diffs
    assert reference["metrics"]["actor/num_tokens"] == result["metrics"]["actor/num_tokens"]
    return diffs


@pytest.mark.parametrize(
    "parallel,settings",
    [
        (ParallelConfig(tensor_parallel=2), SGD),
        (ParallelConfig(pipeline_parallel=2), ADAM),
        (ParallelConfig(data_parallel=2), SGD),
        (ParallelConfig(data_parallel=2), ADAM),
        (ParallelConfig(tensor_parallel=2), TIED_SGD),
        (ParallelConfig(pipeline_parallel=2), TIED_SGD),
        (ParallelConfig(context_parallel=2), SGD),
    ],
    ids=[
        "tp2-sgd",
        "pp2-adam",
        "dp2-sgd",
        "dp2-adam-distopt",
        "tp2-tied",
        "pp2-tied",
        "cp2-sgd",
    ],
)
def test_layout_matches_single_process(world2, references, parallel, settings):
    reference, directory = references(settings)
    result = world2.run(_layout_case, parallel, settings, directory, False)[0]
    _check(reference, result)
    # The step really changed the weights (the comparison is not between two no-ops).
    assert reference["metrics"]["actor/grad_norm"] > 1e-3


def test_mixed_tp2_pp2_and_vpp(references):
    """TP=2 x PP=2, and PP=2 with two virtual stages x DP=2, in a world of four."""
    reference, directory = references(ADAM)
    with WorkerWorld(4) as world4:
        mixed = world4.run(
            _layout_case,
            ParallelConfig(tensor_parallel=2, pipeline_parallel=2),
            ADAM,
            directory,
            False,
        )[0]
        interleaved = world4.run(
            _layout_case,
            ParallelConfig(pipeline_parallel=2, virtual_pipeline=2, data_parallel=2),
            ADAM,
            directory,
            False,
        )[0]
    _check(reference, mixed)
    _check(reference, interleaved)


# ------------------------------------------------------------------ checkpoints
def _save_after_step(rank, world_size, init_dir, save_dir, optimizer_format="dp_reshardable"):
    """TP=2: load initial weights, one step, save the actor; then one more step."""
    from megatron_fipo.megatron.actor import MegatronActor

    settings = ADAM
    actor_cfg, optim_cfg = settings.actor_configs()
    actor_cfg = dataclasses.replace(actor_cfg, optimizer_checkpoint_format=optimizer_format)
    actor = MegatronActor(
        _hf(settings), ParallelConfig(tensor_parallel=world_size), actor_cfg, optim_cfg
    )
    actor.load(init_dir, load_optimizer=False)
    batch = _batch_with_old(actor, settings)
    actor.train_step(batch)
    actor.save(save_dir)
    log_probs = actor.compute_log_probs(batch)
    second = actor.train_step(_batch_with_old(actor, settings))  # as _resume builds it
    return log_probs, second, actor.compute_log_probs(batch)


def _resume(rank, world_size, save_dir, parallel=None, load_optimizer=True):
    """A fresh actor (default: the saver's layout) loads everything and takes the next step."""
    from megatron_fipo.megatron.actor import MegatronActor

    settings = ADAM
    actor_cfg, optim_cfg = settings.actor_configs()
    parallel = parallel or ParallelConfig(tensor_parallel=world_size)
    actor = MegatronActor(_hf(settings), parallel, actor_cfg, optim_cfg)
    actor.load(save_dir, load_optimizer=load_optimizer)
    batch = _batch_with_old(actor, settings)
    steps = actor.num_steps
    second = actor.train_step(batch)
    return steps, second, actor.compute_log_probs(batch)


def _load_weights(rank, world_size, save_dir):
    from megatron_fipo.megatron.actor import MegatronActor

    settings = ADAM
    actor_cfg, optim_cfg = settings.actor_configs()
    actor = MegatronActor(_hf(settings), ParallelConfig(), actor_cfg, optim_cfg)
    actor.load(save_dir, load_optimizer=False)
    return actor.compute_log_probs(fixed_batch(settings))


def _hf(settings):
    from megatron_fipo.megatron.check_parallel import tiny_hf_config

    return tiny_hf_config(settings.num_layers, settings.tie_word_embeddings)


def _batch_with_old(actor, settings):
    batch = fixed_batch(settings)
    with torch.no_grad():
        current = actor.compute_log_probs(batch)
    batch.old_log_probs = current.detach() + batch.old_log_probs[:, : current.shape[1]]
    return batch


def test_checkpoint_tp2_reloads_at_tp1_and_resumes(world1, world2, references, tmp_path):
    _, init_dir = references(ADAM)
    save_dir = str(tmp_path / "actor")
    saved = world2.run(_save_after_step, init_dir, save_dir)
    log_probs_tp2, second_tp2, after_second = saved[0]
    log_probs_tp1 = world1.run(_load_weights, save_dir)[0]
    assert float((log_probs_tp2 - log_probs_tp1).abs().max()) < 1e-5
    steps, second_resumed, after_resumed = world2.run(_resume, save_dir)[0]
    assert steps == 1
    for key in ("actor/loss", "actor/grad_norm", "actor/lr"):
        assert abs(second_tp2[key] - second_resumed[key]) < 1e-6, key
    # Same Adam moments after the reload, so the second update lands at the same weights.
    assert float((after_second - after_resumed).abs().max()) < 1e-6


def _resume_refused(rank, world_size, save_dir, parallel):
    try:
        _resume(rank, world_size, save_dir, parallel)
    except ValueError as error:
        return str(error)
    return "loaded"


def test_fully_reshardable_optimizer_resumes_under_another_layout(world2, references, tmp_path):
    """Saved at TP=2 after one Adam step, resumed at PP=2: the second step (loss, gradient
    norm) and the weights after it match the run that went on at TP=2, so the Adam moments
    came back. A dp_reshardable save refuses that layout change, naming it."""
    _, init_dir = references(ADAM)
    save_dir = str(tmp_path / "actor")
    saved = world2.run(_save_after_step, init_dir, save_dir, "fully_reshardable")
    _, second_tp2, after_second = saved[0]
    steps, second_pp2, after_pp2 = world2.run(
        _resume, save_dir, ParallelConfig(pipeline_parallel=2)
    )[0]
    assert steps == 1
    for key in ("actor/loss", "actor/grad_norm", "actor/lr"):
        assert abs(second_tp2[key] - second_pp2[key]) < 1e-5, key
    assert float((after_second - after_pp2).abs().max()) < 1e-5
    # Without the moments (weights only) the same step lands elsewhere: the check can fail.
    _, _, after_fresh = world2.run(
        _resume, save_dir, ParallelConfig(pipeline_parallel=2), load_optimizer=False
    )[0]
    assert float((after_second - after_fresh).abs().max()) > 1e-3

    other_dir = str(tmp_path / "dp_reshardable")
    world2.run(_save_after_step, init_dir, other_dir)
    for message in world2.run(_resume_refused, other_dir, ParallelConfig(pipeline_parallel=2)):
        assert "saved dp_reshardable" in message and "tensor_parallel 2 -> 1" in message, message


@pytest.mark.parametrize(
    "parallel",
    [
        ParallelConfig(),
        ParallelConfig(pipeline_parallel=2),
        ParallelConfig(context_parallel=2),
        ParallelConfig(tensor_parallel=2),
        ParallelConfig(data_parallel=2),
    ],
    ids=["single", "pp2-variable-shapes", "cp2", "tp2", "dp2"],
)
def test_dynamic_batching_matches_fixed_micro_batches(world1, world2, references, parallel):
    """Token-budget micro-batches (sorted, each padded to its own longest row) give the same
    log-probs, loss, gradient norm and updated weights as fixed two-row micro-batches."""
    reference, directory = references(ADAM)
    world = (
        world1 if parallel.model_parallel_size == 1 and parallel.data_parallel is None else world2
    )
    _check(reference, world.run(_layout_case, parallel, DYNAMIC, directory, False)[0])


def test_dynamic_batching_plan():
    """Every row exactly once, longest first, within the budget; a row over it is named."""
    from megatron_fipo.megatron.actor import ActorConfig, plan_micro_batches

    config = ActorConfig(max_tokens_per_micro_batch=48)
    lengths = torch.tensor([5, 30, 9, 17, 3, 12, 44, 8])
    plan = plan_micro_batches(lengths, config, cp=2, tp=1)
    rows = torch.cat([r for r, _ in plan])
    assert sorted(rows.tolist()) == list(range(8))
    assert lengths[rows].tolist() == sorted(lengths.tolist(), reverse=True)
    for group, common in plan:
        assert common % 4 == 0 and common >= int(lengths[group].max())
        assert len(group) * common <= 48
    assert [len(g) for g, _ in plan] == [1, 1, 2, 4]  # 44 | 30 | 17+12 | 9+8+5+3
    with pytest.raises(ValueError, match="exceeds max_tokens_per_micro_batch=48"):
        plan_micro_batches(torch.tensor([10, 49]), config, cp=2, tp=1)  # 49 pads to 52 for CP = 2


def _entropy_bonus_case(rank, world_size, coeff):
    from megatron_fipo.algorithms.losses import PolicyLossConfig
    from megatron_fipo.megatron.actor import MegatronActor

    settings = ADAM
    actor_cfg, optim_cfg = settings.actor_configs()
    actor = MegatronActor(_hf(settings), ParallelConfig(), actor_cfg, optim_cfg)
    batch = _batch_with_old(actor, settings)
    batch.loss_config = PolicyLossConfig(entropy_coeff=coeff)
    metrics = actor.train_step(batch)
    return metrics, actor.compute_log_probs(fixed_batch(settings))


def test_entropy_bonus_enters_the_loss(world1):
    """algorithm.entropy_coeff (it was accepted and ignored before): the loss drops by exactly
    coeff x the token-mean entropy, and the update changes."""
    plain, after_plain = world1.run(_entropy_bonus_case, 0.0)[0]
    bonus, after_bonus = world1.run(_entropy_bonus_case, 0.05)[0]
    expected = plain["actor/loss"] - 0.05 * plain["actor/entropy_mean"]
    assert abs(bonus["actor/loss"] - expected) < 1e-6
    assert bonus["actor/entropy_mean"] == pytest.approx(plain["actor/entropy_mean"], abs=1e-9)
    assert float((after_plain - after_bonus).abs().max()) > 1e-5
