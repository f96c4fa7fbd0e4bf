"""The Megatron actor under TP / PP / DP (gloo, CPU) against one process.

One optimizer step of the FIPO loss on a fixed ragged batch: log-probs, loss, gradient norm
and the updated parameters must match the single-process run within the tolerances derived
from fp32 rounding (:mod:`megatron_fipo.numerics`, via ``check_parallel.compare``). With SGD
at lr 1 and no clipping the parameter update IS the gradient, so those cases compare
gradients; the Adam cases exercise the distributed optimizer and clipping, each parameter
bounded through the update by the reference's gradients. A planted error (one token's
contribution dropped) fails the same comparison. Also: checkpoints saved at TP=2 reload at
TP=1 with the same log-probs, and an actor checkpoint (model + optimizer + scheduler)
resumes to the same next step.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from megatron_harness import WorkerWorld

from megatron_fipo import numerics
from megatron_fipo.megatron.check_parallel import (
    CheckSettings,
    compare,
    depths,
    fixed_batch,
    gathered_gradients,
    layout,
    run_layout,
)

ADAM = CheckSettings(optimizer="adam", num_layers=4)
SGD = CheckSettings(optimizer="sgd", num_layers=4)
TIED_SGD = CheckSettings(optimizer="sgd", num_layers=4, tie_word_embeddings=True)
# Dynamic batching: the fixed batch's sequences (6-31 tokens) in micro-batches of <= 64
# padded tokens, so 2-5 rows of varying width each ...
DYNAMIC = dataclasses.replace(ADAM, max_tokens_per_micro_batch=64, packing=False)
# ... or packed: 2-5 sequences in one row of <= 64 tokens (the default with a token budget).
PACKED = dataclasses.replace(ADAM, max_tokens_per_micro_batch=64)
# Packed rows of two sequences each, fixed micro-batch size.
PACKED_FIXED = dataclasses.replace(ADAM, packing=True)
# Gradient reduce and parameter all-gather overlapped (distributed optimizer, Adam).
OVERLAP = dataclasses.replace(ADAM, overlap=True)


def _layout_case(rank, world_size, parallel, settings, checkpoint_dir, reference, edit=None):
    return run_layout(parallel, settings, checkpoint_dir, reference, edit)


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
            result = world1.run(_layout_case, layout(), settings, directory, True)[0]
            cache[key] = (result, directory)
        return cache[key]

    return get


def _check(reference, result, settings):
    comparisons = compare(reference, result, settings)
    assert all(c.ok for c in comparisons), "\n".join(map(str, comparisons))
    assert reference["metrics"]["actor/num_tokens"] == result["metrics"]["actor/num_tokens"]
    return comparisons


@pytest.mark.parametrize(
    "parallel,settings",
    [
        (layout(tp=2), SGD),
        (layout(pp=2), ADAM),
        (layout(), SGD),  # DP = 2 in a world of two
        (layout(), ADAM),
        (layout(tp=2), TIED_SGD),
        (layout(pp=2), TIED_SGD),
        (layout(cp=2), SGD),
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
    _check(reference, result, settings)
    # The step really changed the weights (the comparison is not between two no-ops).
    assert reference["metrics"]["actor/grad_norm"] > 1e-3


def test_mixed_layouts_in_a_world_of_four(references):
    """TP=2 x PP=2; PP=2 with two virtual stages x DP=2; PP=2 x CP=2 with fixed micro-batches
    (the pipeline's receive buffer was sized for 1/CP^2 of the row: seq_length was handed to
    Megatron already divided by CP) and with packed rows; TP=2 x CP=2."""
    reference, directory = references(ADAM)
    cases = [
        (layout(tp=2, pp=2), ADAM),
        (layout(pp=2, vpp=2), ADAM),  # DP = 2 in a world of four
        (layout(pp=2, cp=2), ADAM),
        (layout(pp=2, cp=2), PACKED),
        (layout(tp=2, cp=2), ADAM),
    ]
    with WorkerWorld(4) as world4:
        results = [world4.run(_layout_case, par, s, directory, False)[0] for par, s in cases]
    for (_, settings), result in zip(cases, results):
        _check(reference, result, settings)


def _drop_one_token(batch):
    """A planted bug: one response token leaves the loss (a mask off by one at a chunk edge
    would do this), while the token count, and so the loss's divisor, stays."""
    advantages = batch.advantages[:, None].expand_as(batch.old_log_probs).clone()
    advantages[1, 2] = 0.0
    batch.advantages = advantages


def test_a_dropped_token_fails_the_comparison(world2, references):
    """The derived tolerances are not loose: one of ~100 response tokens left out of the loss
    at TP=2 (SGD, so the parameters are the gradients) fails the parameter and gradient-norm
    comparisons by a wide margin; the log-probs, computed before the step, still pass."""
    reference, directory = references(SGD)
    tp2 = layout(tp=2)
    result = world2.run(_layout_case, tp2, SGD, directory, False, _drop_one_token)[0]
    named = {c.name.split(" ")[0]: c for c in compare(reference, result, SGD)}
    assert named["log_probs"].ok, named["log_probs"]
    assert named["params"].ratio > 10, named["params"]
    assert named["grad_norm"].ratio > 10, named["grad_norm"]


def test_realistic_small_errors_exceed_the_tolerances(references):
    """On the real reference result: a gradient 0.1% too large (lr 1 SGD moves each
    parameter by 1.001 g) and log-probs off by TF32's precision (2^-11 relative) both fail,
    while the reference compared with itself passes with all differences zero."""
    reference, _ = references(SGD)
    assert all(c.ok and c.diff == 0 for c in compare(reference, reference, SGD))
    metrics = dict(reference["metrics"])
    metrics["actor/grad_norm"] *= 1.001
    scaled = dict(
        reference,
        metrics=metrics,
        params={n: p - 1e-3 * reference["grads"][n] for n, p in reference["params"].items()},
    )
    named = {c.name.split(" ")[0]: c for c in compare(reference, scaled, SGD)}
    assert named["params"].ratio > 5 and named["grad_norm"].ratio > 5, named
    coarse = dict(reference, log_probs=reference["log_probs"] * (1 + 2.0**-11))
    named = {c.name.split(" ")[0]: c for c in compare(reference, coarse, SGD)}
    assert named["log_probs"].ratio > 5, named["log_probs"]


def test_rounding_noise_in_gradients_passes_under_adam(references):
    """What failed on an AVX-512 / AMX machine with the old bare 1e-5 on parameters. The
    reference's nonzero gradients moved by up to one rounding (u) of each tensor's largest
    gradient, less than any reordering of their sums makes, move some Adam-updated
    parameters by more than 1e-5: an element whose gradient is itself rounding noise has its
    first step ``lr g / (|g| + eps)`` decided by that noise. The bound carried through Adam
    accepts it. (Exact zeros, embedding rows of absent tokens, stay zero in every layout.)"""
    reference, _ = references(ADAM)
    optim = ADAM.optimizer_section()
    adam = numerics.AdamStep(beta1=optim.adam_beta1, beta2=optim.adam_beta2, eps=optim.adam_eps)
    gen = torch.Generator().manual_seed(0)
    params = {}
    for name, grad in reference["grads"].items():
        noise = numerics.FP32_UNIT_ROUNDOFF * numerics.max_abs(grad)
        noise = noise * (2 * torch.rand(grad.shape, generator=gen) - 1) * (grad != 0)
        shift = optim.lr * (adam.direction(grad.double() + noise) - adam.direction(grad))
        params[name] = (reference["params"][name].double() - shift).float()
    noisy = dict(reference, params=params)
    largest = max(numerics.max_abs(params[n] - reference["params"][n]) for n in params)
    assert largest > 1e-5, largest  # the old constant rejected this
    comparisons = compare(reference, noisy, ADAM)
    assert all(c.ok for c in comparisons), "\n".join(map(str, comparisons))


# ------------------------------------------------------------------ checkpoints
def _save_after_step(rank, world_size, init_dir, save_dir, optimizer_format="dp_reshardable"):
    """TP=2: load initial weights, one step, save the actor; then one more step.

    Returns the second step as :func:`_second_step` does, plus its gradients and the first
    step's (they bound the second Adam update, see ``check_parallel.parameter_bounds``).
    """
    from megatron_fipo.megatron.actor import MegatronActor

    settings = ADAM
    actor = MegatronActor(
        _hf(settings),
        *settings.sections(layout(tp=world_size)),
        seed=settings.seed,
        optimizer_checkpoint_format=optimizer_format,
    )
    actor.load(init_dir, load_optimizer=False)
    first = actor.train_step(_batch_with_old(actor, settings)[0])
    first_grads = gathered_gradients(actor, first)
    actor.save(save_dir)
    second = _second_step(actor, settings)
    second["grads"] = gathered_gradients(actor, second["metrics"])
    second["previous_grads"] = [first_grads]
    return second


def _second_step(actor, settings):
    """Log-probs before the step, its metrics and the parameters after it (full on rank 0)."""
    from megatron_fipo.megatron import checkpoint

    batch, log_probs = _batch_with_old(actor, settings)
    metrics = actor.train_step(batch)
    params = checkpoint.gather_full_parameters(actor.model, vocab_size=actor.vocab_size)
    return {"log_probs": log_probs, "metrics": metrics, "params": params}


def _resume(rank, world_size, save_dir, parallel=None, load_optimizer=True):
    """A fresh actor (default: the saver's layout) loads everything and takes the next step."""
    from megatron_fipo.megatron.actor import MegatronActor

    settings = ADAM
    parallel = parallel or layout(tp=world_size)
    actor = MegatronActor(_hf(settings), *settings.sections(parallel), seed=settings.seed)
    actor.load(save_dir, load_optimizer=load_optimizer)
    steps = actor.num_steps
    return steps, _second_step(actor, settings)


def _load_weights(rank, world_size, save_dir):
    from megatron_fipo.megatron.actor import MegatronActor

    settings = ADAM
    actor = MegatronActor(_hf(settings), *settings.sections(), seed=settings.seed)
    actor.load(save_dir, load_optimizer=False)
    return actor.compute_log_probs(fixed_batch(settings))


def _hf(settings):
    from megatron_fipo.megatron.check_parallel import tiny_hf_config

    return tiny_hf_config(settings.num_layers, settings.tie_word_embeddings)


def _batch_with_old(actor, settings):
    """The fixed batch with old log-probs = current + fixed noise; and the current ones."""
    batch = fixed_batch(settings)
    with torch.no_grad():
        current = actor.compute_log_probs(batch)
    batch.old_log_probs = current.detach() + batch.old_log_probs[:, : current.shape[1]]
    return batch, current


def _check_resumed(saved, steps, resumed):
    """The resumed run's next step is the saver's: same lr; log-probs before it, loss,
    gradient norm and every parameter after it within the derived tolerances."""
    assert steps == 1
    assert resumed["metrics"]["actor/lr"] == saved["metrics"]["actor/lr"]
    _check(saved, resumed, ADAM)


def test_checkpoint_tp2_reloads_at_tp1_and_resumes(world1, world2, references, tmp_path):
    _, init_dir = references(ADAM)
    save_dir = str(tmp_path / "actor")
    saved = world2.run(_save_after_step, init_dir, save_dir)[0]
    log_probs_tp1 = world1.run(_load_weights, save_dir)[0]
    forward_depth, _ = depths(ADAM)
    reloaded = numerics.compare_tensors(
        "log_probs", log_probs_tp1, saved["log_probs"], forward_depth
    )
    assert reloaded.ok, reloaded
    # Same Adam moments after the reload, so the second update lands at the same weights.
    _check_resumed(saved, *world2.run(_resume, save_dir)[0])


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
    saved = world2.run(_save_after_step, init_dir, save_dir, "fully_reshardable")[0]
    pp2 = layout(pp=2)
    _check_resumed(saved, *world2.run(_resume, save_dir, pp2)[0])
    # Without the moments (weights only) the same step lands elsewhere: the check can fail.
    _, fresh = world2.run(_resume, save_dir, pp2, load_optimizer=False)[0]
    params = compare(saved, fresh, ADAM)[-1]
    assert params.name.startswith("params") and params.ratio > 10, params

    other_dir = str(tmp_path / "dp_reshardable")
    world2.run(_save_after_step, init_dir, other_dir)
    for message in world2.run(_resume_refused, other_dir, pp2):
        assert "saved dp_reshardable" in message and "tensor_parallel 2 -> 1" in message, message


@pytest.mark.parametrize("settings", [DYNAMIC, PACKED], ids=["padded", "packed"])
@pytest.mark.parametrize(
    "parallel,world_size",
    [
        (layout(), 1),
        (layout(pp=2), 2),
        (layout(cp=2), 2),
        (layout(tp=2), 2),
        (layout(), 2),
    ],
    ids=["single", "pp2-variable-shapes", "cp2", "tp2", "dp2"],
)
def test_token_budget_batching_matches_fixed_micro_batches(
    world1, world2, references, parallel, world_size, settings
):
    """Token-budget micro-batches, padded rows (sorted, each group padded to its own longest)
    or packed rows (several sequences per row: attention, the future-KL scan and the sequence
    drop per sequence), give the same log-probs, loss, gradient norm and updated weights as
    fixed two-row padded micro-batches."""
    reference, directory = references(ADAM)
    world = world1 if world_size == 1 else world2
    result = world.run(_layout_case, parallel, settings, directory, False)[0]
    _check(reference, result, settings)
    assert (
        result["metrics"]["actor/dropped_seqs_mean"]
        == reference["metrics"]["actor/dropped_seqs_mean"]
    )


def test_packed_fixed_size_micro_batches_match(world1, references):
    """Fixed micro_batch_size with packing=true: two sequences per packed row."""
    reference, directory = references(ADAM)
    result = world1.run(_layout_case, layout(), PACKED_FIXED, directory, False)[0]
    _check(reference, result, PACKED_FIXED)


def _steps_then_weights(rank, world_size, init_dir, settings):
    """Two optimizer steps from the initial weights; then the weights as weight sync reads
    them (full HF tensors, rank 0) and the log-probs of the batch."""
    from megatron_fipo.megatron.actor import MegatronActor
    from megatron_fipo.megatron.distributed import destroy
    from megatron_fipo.rollout.weight_sync import WeightSync, WeightSyncConfig

    actor = MegatronActor(_hf(settings), *settings.sections(), seed=settings.seed)
    try:
        actor.load(init_dir, load_optimizer=False)
        metrics = [actor.train_step(_batch_with_old(actor, settings)[0]) for _ in range(2)]
        sync = WeightSync(actor.named_parameters_for_sync, _hf(settings), WeightSyncConfig())
        weights = {name: tensor.clone() for name, tensor in sync.iter_hf_tensors()}
        return metrics, weights, actor.compute_log_probs(fixed_batch(settings))
    finally:
        destroy()


def test_overlapped_grad_reduce_and_param_gather_match(world2, references):
    """DP=2 with the distributed optimizer: overlapping the gradient reduce with the backward
    and the parameter all-gather with the next forward matches the single process; after two
    steps the weights weight sync reads are the ones the plain run has (the all-gather still
    pending after a step is finished first: each rank would otherwise send the other's half
    of the update stale) and so are the log-probs."""
    reference, directory = references(ADAM)
    _check(reference, world2.run(_layout_case, layout(), OVERLAP, directory, False)[0], OVERLAP)
    plain_steps, plain_weights, plain = world2.run(_steps_then_weights, directory, ADAM)[0]
    overlap_steps, weights, overlapped = world2.run(_steps_then_weights, directory, OVERLAP)[0]
    assert overlap_steps == plain_steps
    assert weights.keys() == plain_weights.keys()
    assert all(torch.equal(weights[name], plain_weights[name]) for name in weights)
    forward_depth, _ = depths(ADAM)
    after = numerics.compare_tensors("log_probs after two steps", overlapped, plain, forward_depth)
    assert after.ok, after


def _metric_reduction(rank, world_size):
    """Rank-dependent metric dicts through the actor's reduction, counting collectives."""
    import torch.distributed as dist

    from megatron_fipo.megatron import actor as actor_lib
    from megatron_fipo.megatron.distributed import destroy, init_distributed

    init_distributed(layout())
    names = ("all_reduce", "all_gather_single", "all_gather", "broadcast", "all_gather_object")
    calls = []
    originals = {name: getattr(dist, name) for name in names}

    def counted(name):
        def call(*args, **kwargs):
            calls.append(name)
            return originals[name](*args, **kwargs)

        return call

    outputs = [
        {
            f"actor/x{i}_sum": torch.tensor(float(rank + i), dtype=torch.float64),
            f"actor/x{i}_count": torch.tensor(2.0, dtype=torch.float64),
            f"actor/y{i}_max": torch.tensor(float(rank - i)),
            f"actor/y{i}_min": torch.tensor(float(rank - i)),
            "actor/loss_sum": torch.tensor(0.5 * (rank + 1), dtype=torch.float64),
        }
        for i in range(12)
    ]
    try:
        for name in names:
            setattr(dist, name, counted(name))
        result = actor_lib.reduce_metrics(outputs, torch.device("cpu"))
    finally:
        for name, original in originals.items():
            setattr(dist, name, original)
        destroy()
    return calls, result


def test_metrics_are_reduced_in_one_collective(world2):
    """49 metric keys over two DP ranks: one collective (it was one all-reduce per key), and
    each key still reduced by its suffix."""
    for calls, result in world2.run(_metric_reduction):
        assert calls == ["all_gather_single"], calls
        assert result["actor/x3_mean"] == (3 + 4) * 12 / (2 * 2 * 12)  # sums over ranks / counts
        assert result["actor/y3_max"] == 1 - 3 and result["actor/y3_min"] == -3
        assert result["actor/loss"] == 0.5 * 12 + 1.0 * 12


def _entropy_bonus_case(rank, world_size, coeff):
    from megatron_fipo.algorithms.losses import PolicyLossConfig
    from megatron_fipo.megatron.actor import MegatronActor

    settings = ADAM
    actor = MegatronActor(_hf(settings), *settings.sections(), seed=settings.seed)
    batch = _batch_with_old(actor, settings)[0]
    batch.loss_config = PolicyLossConfig(entropy_coeff=coeff)
    metrics = actor.train_step(batch)
    return metrics, actor.compute_log_probs(fixed_batch(settings))


def test_entropy_bonus_enters_the_loss(world1):
    """algorithm.entropy_coeff (it was accepted and ignored before): the loss drops by
    coeff x the token-mean entropy (to the fp32 rounding of the token sums), and the update
    changes the log-probs by more than rounding."""
    plain, after_plain = world1.run(_entropy_bonus_case, 0.0)[0]
    bonus, after_bonus = world1.run(_entropy_bonus_case, 0.05)[0]
    bonus_term = 0.05 * plain["actor/entropy_mean"]
    num_tokens = int(plain["actor/num_tokens"])
    tolerance = numerics.rounding_tolerance(abs(plain["actor/loss"]) + bonus_term, num_tokens)
    assert abs(bonus["actor/loss"] - (plain["actor/loss"] - bonus_term)) <= tolerance
    forward_depth = depths(ADAM)[0]
    same_entropy = numerics.rounding_tolerance(
        plain["actor/entropy_mean"], forward_depth + num_tokens
    )
    assert abs(bonus["actor/entropy_mean"] - plain["actor/entropy_mean"]) <= same_entropy
    changed = numerics.compare_tensors("log_probs", after_bonus, after_plain, forward_depth)
    assert not changed.ok, changed


def _train_worker_sections(rank, world_size):
    from pathlib import Path

    from megatron_fipo.cluster.workers import TrainWorker
    from megatron_fipo.config import load_config
    from megatron_fipo.megatron.distributed import destroy

    tiny = Path(__file__).resolve().parent.parent / "configs/tiny-cpu.yaml"
    overrides = ["model.hf_model_path=null", "model.logprob_chunk_size=8"]
    overrides += ["optimizer.lr_decay_style=cosine", "optimizer.lr_decay_steps=7"]
    config = load_config(tiny, overrides)
    actor = TrainWorker(config).actor
    try:
        return (
            actor.model_config is config.model,
            actor.parallelism is config.parallelism,
            actor.optimizer_config is config.optimizer,
            actor.scheduler.lr_decay_steps,
            actor.temperature == config.rollout.temperature,
        )
    finally:
        destroy()


def test_the_training_rank_hands_the_actor_its_config_sections(world1):
    """One config layer: the actor holds the run config's sections themselves (no field-by-field
    copy with defaults of its own); the optimizer's decay horizon reaches the scheduler."""
    assert world1.run(_train_worker_sections)[0] == (True, True, True, 7, True)


def _head_input_dtype(rank, world_size):
    """The dtype of the hidden states that reach a bf16 actor's vocab head."""
    from megatron_fipo.megatron import actor as actor_lib
    from megatron_fipo.megatron.check_parallel import model_section
    from megatron_fipo.megatron.distributed import destroy

    seen = []
    original = actor_lib.vocab_head

    def spy(hidden, *args, **kwargs):
        seen.append(hidden.dtype)
        return original(hidden, *args, **kwargs)

    settings = ADAM
    _, parallel, optimizer = settings.sections()
    hf = _hf(settings)
    actor = actor_lib.MegatronActor(
        hf, model_section(hf, dtype="bfloat16"), parallel, optimizer, seed=settings.seed
    )
    actor_lib.vocab_head = spy
    try:
        actor.compute_log_probs(fixed_batch(settings))
    finally:
        actor_lib.vocab_head = original
        destroy()
    return seen


def test_bf16_actor_hands_bf16_hidden_states_to_the_vocab_head(world1):
    """megatron-core's Float16Module upcasts the last stage's output to fp32 by default, so the
    head saw fp32 and its GEMMs never took the bf16 path; the actor now asks for the model's
    own dtype."""
    seen = world1.run(_head_input_dtype)[0]
    assert seen and set(seen) == {torch.bfloat16}, seen


def _masks_and_kernels(rank, world_size, settings):
    from megatron_fipo.megatron.actor import MegatronActor
    from megatron_fipo.megatron.cp_attention import ContextParallelAttention
    from megatron_fipo.megatron.distributed import destroy

    actor = MegatronActor(_hf(settings), *settings.sections(), seed=settings.seed)
    try:
        micro_batches = actor._micro_batches(fixed_batch(settings), with_training_data=False)
        actor.compute_log_probs(fixed_batch(settings))
        kernels = {
            module.last_kernel
            for chunk in actor.model
            for module in chunk.modules()
            if isinstance(module, ContextParallelAttention)
        }
        masks = [micro.attention_mask is not None for micro in micro_batches]
        packed = [micro.packed_seq_params is not None for micro in micro_batches]
        return masks, packed, kernels
    finally:
        destroy()


def test_dense_masks_only_for_megatrons_own_attention(world1):
    """Packed rows go through our attention, one sequence at a time, and build no [S, S] mask;
    padded rows at CP = 1 on CPU still use Megatron's DotProductAttention, which needs one
    (on CUDA they take our flash path, which needs none: ``model.uses_own_attention``)."""
    masks, packed, kernels = world1.run(_masks_and_kernels, PACKED)[0]
    assert all(packed) and not any(masks) and kernels == {"per_sequence_fused"}
    masks, packed, kernels = world1.run(_masks_and_kernels, ADAM)[0]
    assert all(masks) and not any(packed) and kernels == set()


def test_check_parallel_command_accepts_pp_x_cp():
    """The user-facing check at PP 2 x CP 2 (the layout whose pipeline buffers had the wrong
    shape): four gloo processes against one, every quantity within its derived tolerance."""
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-m", "megatron_fipo.megatron.check_parallel"]
        + ["--tp", "1", "--pp", "2", "--cp", "2", "--dp", "1", "--num-layers", "2"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    assert "tp=1 pp=2 cp=2 dp=1" in lines[0] and lines[-1] == "OK", done.stdout
