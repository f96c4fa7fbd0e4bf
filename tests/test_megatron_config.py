"""The actor's config sections: one default and one validation per knob, in ``config_actor.py``.

The actor takes the run config's ``model`` / ``parallelism`` / ``optimizer`` sections as they
are (no second config layer); the rules that span them live in one function that both the run
config and the actor call.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from megatron_fipo.config import (
    ConfigError,
    ModelConfig,
    OptimizerConfig,
    ParallelismConfig,
    check_actor_sections,
    load_config,
)

TINY = Path(__file__).resolve().parent.parent / "configs/tiny-cpu.yaml"


def test_decaying_schedules_need_their_horizon():
    """A cosine / linear schedule without ``lr_decay_steps`` used to decay to min_lr right
    after the warm-up (the actor's own default horizon was warm-up + 1); it is refused now."""
    with pytest.raises(ConfigError, match=r"lr_decay_style='cosine' needs optimizer\.lr_decay"):
        load_config(TINY, ["optimizer.lr_decay_style=cosine"])
    with pytest.raises(ConfigError, match=r"lr_decay_steps \(2\) must exceed"):
        OptimizerConfig(lr_decay_style="linear", lr_decay_steps=2, lr_warmup_steps=2)
    assert OptimizerConfig(lr_decay_style="cosine", lr_decay_steps=50).lr_decay_steps == 50


def test_sgd_needs_the_plain_optimizer_named_in_one_rule():
    message = r"optimizer\.optimizer='sgd' needs parallelism\.use_distributed_optimizer=false"
    with pytest.raises(ConfigError, match=message):
        load_config(TINY, ["optimizer.optimizer=sgd", "parallelism.use_distributed_optimizer=true"])
    model = ModelConfig(hf_model_path="m", dtype="float32", spec="local")
    with pytest.raises(ConfigError, match=message):
        check_actor_sections(model, ParallelismConfig(), OptimizerConfig(optimizer="sgd"))
    check_actor_sections(
        model, ParallelismConfig(use_distributed_optimizer=False), OptimizerConfig(optimizer="sgd")
    )


def test_full_recomputation_defaults_are_filled_once():
    model = ModelConfig(hf_model_path="m", recompute_granularity="full")
    assert (model.recompute_method, model.recompute_num_layers) == ("uniform", 1)
    block = ModelConfig(
        hf_model_path="m",
        recompute_granularity="full",
        recompute_method="block",
        recompute_num_layers=3,
    )
    assert (block.recompute_method, block.recompute_num_layers) == ("block", 3)
    with pytest.raises(ConfigError, match=r"model\.recompute_num_layers=2 needs"):
        ModelConfig(hf_model_path="m", recompute_num_layers=2)
    with pytest.raises(ConfigError, match=r"model\.logprob_chunk_size must be >= 1"):
        ModelConfig(hf_model_path="m", logprob_chunk_size=0)
