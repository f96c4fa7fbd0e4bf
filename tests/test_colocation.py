"""Colocated training and rollout: the actor's training state leaves the device between steps
and comes back unchanged; the engines release and retake memory in the loop's order."""

from __future__ import annotations

import pytest
import torch
from megatron_harness import WorkerWorld

from megatron_fipo.megatron.check_parallel import CheckSettings, fixed_batch, tiny_hf_config

ADAM = CheckSettings(optimizer="adam", num_layers=2)


@pytest.fixture(scope="module")
def world1():
    with WorkerWorld(1) as world:
        yield world


def _two_steps(rank, world_size, offload_between):
    from megatron_fipo.megatron import checkpoint
    from megatron_fipo.megatron.actor import MegatronActor
    from megatron_fipo.megatron.distributed import destroy

    actor = MegatronActor(tiny_hf_config(ADAM.num_layers), *ADAM.sections(), seed=ADAM.seed)
    try:
        sizes = []
        for _ in range(2):
            batch = fixed_batch(ADAM)
            current = actor.compute_log_probs(batch)
            batch.old_log_probs = current + batch.old_log_probs[:, : current.shape[1]]  # noise
            actor.train_step(batch)
            if offload_between:
                actor.offload_train_state()
                sizes.append(
                    sum(
                        b.grad_data.untyped_storage().size() for c in actor.model for b in c.buffers
                    )
                )
                with pytest.raises(RuntimeError, match="offloaded"):
                    actor.train_step(batch)
                actor.restore_train_state()
        params = checkpoint.gather_full_parameters(actor.model, vocab_size=actor.vocab_size)
        return params, sizes
    finally:
        destroy()


def test_offloaded_training_state_comes_back_unchanged(world1):
    """Two Adam steps with the optimizer state and gradient buffers offloaded and restored
    between them land on exactly the weights of two steps without."""
    plain, _ = world1.run(_two_steps, False)[0]
    offloaded, sizes = world1.run(_two_steps, True)[0]
    assert sizes == [0, 0]  # the gradient buffers' storage really was released
    assert plain.keys() == offloaded.keys()
    assert all(torch.equal(plain[name], offloaded[name]) for name in plain)
