"""Typed run configuration: one dataclass per component, loaded from YAML plus overrides.

A run is described by :class:`FipoConfig`, whose sections are handed to the components that use
them (``algorithm`` to the losses and advantages, ``parallelism`` to the Megatron actor, ...).
:func:`load_config` reads a YAML recipe, applies ``key.sub=value`` overrides (values parsed as
YAML), rejects unknown keys and values of the wrong type with the dotted key named, and runs
the cross-field checks. :meth:`FipoConfig.validate_layout` adds the checks that need the
world size (the launcher's dry run calls it). This module imports no torch.

The sections are defined in :mod:`megatron_fipo.config_actor` (``model``, ``parallelism``,
``optimizer``: what the Megatron actor receives) and :mod:`megatron_fipo.config_sections` (the
others, and the ``_Section`` base); this module re-exports every public name, so import them
from here.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Mapping
from dataclasses import field
from pathlib import Path
from typing import Any

import yaml

from megatron_fipo import dataclass_yaml
from megatron_fipo.config_actor import (
    FP8_TOKEN_ALIGNMENT,
    ArchitectureConfig,
    ModelConfig,
    OptimizerConfig,
    ParallelismConfig,
    check_actor_sections,
    padding_multiples,
    resolved_sequence_parallel,
    round_up,
)
from megatron_fipo.config_sections import (
    AlgorithmConfig,
    DataConfig,
    DynamicSamplingConfig,
    EvalSamplingConfig,
    LoggingConfig,
    OverlongBufferConfig,
    RewardConfig,
    RolloutConfig,
    SGLangServerConfig,
    TrainerConfig,
    _dc,
)
from megatron_fipo.dataclass_yaml import ConfigError
from megatron_fipo.dataclass_yaml import require as _require

__all__ = [
    "FP8_TOKEN_ALIGNMENT",
    "AlgorithmConfig",
    "ArchitectureConfig",
    "ConfigError",
    "DataConfig",
    "DynamicSamplingConfig",
    "EvalSamplingConfig",
    "FipoConfig",
    "LoggingConfig",
    "ModelConfig",
    "OptimizerConfig",
    "OverlongBufferConfig",
    "ParallelismConfig",
    "RewardConfig",
    "RolloutConfig",
    "SGLangServerConfig",
    "TrainerConfig",
    "apply_overrides",
    "check_actor_sections",
    "check_model_checkpoint",
    "from_dict",
    "load_config",
    "padding_multiples",
    "resolved_sequence_parallel",
    "round_up",
    "save_config",
    "to_dict",
    "to_yaml",
]


# ---------------------------------------------------------------------------------------------
# root


@_dc
class FipoConfig:
    """A whole run. Each component receives its own section."""

    model: ModelConfig
    """What to train."""
    data: DataConfig
    """Prompts and batch sizes."""
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    """Loss, advantages, reward shaping."""
    parallelism: ParallelismConfig = field(default_factory=ParallelismConfig)
    """Megatron layout."""
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    """AdamW and schedule."""
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    """Generation."""
    reward: RewardConfig = field(default_factory=RewardConfig)
    """Answer checking."""
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    """Run length, checkpoints, cluster."""
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    """Metrics sinks."""

    def __post_init__(self) -> None:
        check_actor_sections(self.model, self.parallelism, self.optimizer)
        self._check_lengths()
        self._check_devices()
        evals = [f"trainer.eval_freq={self.trainer.eval_freq}"] if self.trainer.eval_freq else []
        evals += ["trainer.eval_before_train=true"] if self.trainer.eval_before_train else []
        _require(
            bool(self.data.eval_files) or not evals,
            f"data.eval_files is empty but {' and '.join(evals)}; add eval files or set "
            "trainer.eval_freq=null trainer.eval_before_train=false",
        )

    @property
    def max_sequence_length(self) -> int:
        """Longest prompt + response in tokens."""
        return self.rollout.max_prompt_length + self.rollout.max_response_length

    @property
    def training_world_size(self) -> int:
        """Training ranks implied by the cluster shape (rollout GPUs excluded when not colocated)."""
        trainer = self.trainer
        if trainer.gpus_per_node == 0:
            return trainer.nnodes * trainer.cpu_ranks_per_node
        return trainer.nnodes * trainer.gpus_per_node - (self.rollout.num_gpus or 0)

    def _check_lengths(self) -> None:
        total, par = self.max_sequence_length, self.parallelism
        cp, tp = par.context_parallel_size, par.tensor_model_parallel_size
        # Packing pads every sequence to a multiple of 2*CP*TP (zigzag chunks, then the sequence-
        # parallel split inside each chunk); a full-length sample must fit without truncation.
        _require(
            cp == 1 or total % (2 * cp * tp) == 0,
            f"rollout.max_prompt_length + rollout.max_response_length ({total}) must be divisible "
            f"by 2 * parallelism.context_parallel_size * tensor_model_parallel_size ({2 * cp * tp})",
        )
        limit = par.max_tokens_per_micro_batch
        sequence, row = padding_multiples(self.model, par)
        padded = round_up(round_up(total, sequence), row)  # as the actor pads a row
        _require(
            limit is None or limit >= padded,
            f"parallelism.max_tokens_per_micro_batch ({limit}) must hold one full sequence: "
            f"rollout.max_prompt_length + max_response_length = {total}, padded to {padded} "
            f"(a multiple of 2 * context_parallel_size * tensor_model_parallel_size"
            f"{', and of the FP8 alignment' if row != sequence else ''})",
        )
        buffer = self.algorithm.overlong_buffer
        _require(
            not buffer.enable or buffer.len < self.rollout.max_response_length,
            f"algorithm.overlong_buffer.len ({buffer.len}) must be below "
            f"rollout.max_response_length ({self.rollout.max_response_length})",
        )
        arch = self.model.architecture
        _require(
            arch is None or arch.max_position_embeddings >= total,
            f"model.architecture.max_position_embeddings ({arch and arch.max_position_embeddings}) "
            f"must cover rollout.max_prompt_length + max_response_length ({total})",
        )

    def _check_devices(self) -> None:
        gpus, rollout = self.trainer.gpus_per_node, self.rollout
        _require(
            rollout.colocate or not self.optimizer.offload_during_rollout,
            "optimizer.offload_during_rollout=true needs rollout.colocate=true (separate engine "
            "GPUs do not compete with training for memory)",
        )
        if gpus == 0:
            _require(
                rollout.engine == "hf",
                "rollout.engine must be 'hf' when trainer.gpus_per_node is 0",
            )
            _require(
                self.model.spec == "local",
                "model.spec must be 'local' when trainer.gpus_per_node is 0",
            )
            _require(
                rollout.colocate, "rollout.colocate=false needs GPUs (trainer.gpus_per_node > 0)"
            )
            return
        _require(
            gpus % rollout.engine_tensor_parallel_size == 0,
            f"trainer.gpus_per_node ({gpus}) must be divisible by "
            f"rollout.engine_tensor_parallel_size ({rollout.engine_tensor_parallel_size})",
        )
        total = self.trainer.nnodes * gpus
        _require(
            rollout.num_gpus is None or rollout.num_gpus < total,
            f"rollout.num_gpus ({rollout.num_gpus}) must leave training GPUs out of "
            f"trainer.nnodes * trainer.gpus_per_node = {total}",
        )

    def validate_layout(self, world_size: int | None = None) -> int:
        """Check the Megatron layout against ``world_size`` training ranks; return the DP size.

        ``world_size`` defaults to :attr:`training_world_size`. Head and layer counts are checked
        only when ``model.architecture`` is given.
        """
        par = self.parallelism
        world = self.training_world_size if world_size is None else world_size
        tp, pp, cp = (
            par.tensor_model_parallel_size,
            par.pipeline_model_parallel_size,
            par.context_parallel_size,
        )
        _require(world >= 1, f"world size must be >= 1, got {world}")
        _require(
            world % par.model_parallel_size == 0,
            f"world size {world} must be divisible by parallelism.tensor_model_parallel_size * "
            f"pipeline_model_parallel_size * context_parallel_size = {tp}*{pp}*{cp}",
        )
        arch = self.model.architecture
        if arch is not None:
            self._check_architecture_split(arch)
        data_parallel = world // par.model_parallel_size
        sequences = self.data.ppo_mini_batch_size * self.rollout.n_samples_per_prompt
        _require(
            sequences % data_parallel == 0,
            f"data.ppo_mini_batch_size * rollout.n_samples_per_prompt ({sequences} sequences) must "
            f"be divisible by the data-parallel size {data_parallel}",
        )
        per_rank = sequences // data_parallel
        _require(
            par.max_tokens_per_micro_batch is not None or per_rank % par.micro_batch_size == 0,
            f"{per_rank} sequences per data-parallel rank and mini-batch must be divisible by "
            f"parallelism.micro_batch_size ({par.micro_batch_size})",
        )
        return data_parallel

    def _check_architecture_split(self, arch: ArchitectureConfig) -> None:
        par = self.parallelism
        tp = par.tensor_model_parallel_size
        for name in ("num_attention_heads", "num_key_value_heads"):
            value = getattr(arch, name)
            _require(
                value % tp == 0,
                f"model.architecture.{name} ({value}) must be divisible by "
                f"parallelism.tensor_model_parallel_size ({tp})",
            )
        stages = par.pipeline_model_parallel_size * (par.virtual_pipeline_model_parallel_size or 1)
        _require(
            arch.num_hidden_layers % stages == 0,
            f"model.architecture.num_hidden_layers ({arch.num_hidden_layers}) must be divisible by "
            f"parallelism.pipeline_model_parallel_size * virtual_pipeline_model_parallel_size ({stages})",
        )


# ---------------------------------------------------------------------------------------------
# the checkpoint that runs


def check_model_checkpoint(config: FipoConfig) -> None:
    """Check the config against ``model.hf_model_path/config.json``, the model that actually runs.

    Every ``model.architecture`` field (defaults included) must equal the checkpoint's value
    where config.json states it, and ``rollout.max_prompt_length + max_response_length`` must
    fit the checkpoint's ``max_position_embeddings``. Raises :class:`ConfigError` naming each
    field and both values. Reads one JSON file (cheap, no torch), so the CLI calls it before
    anything heavy starts; it does nothing without ``hf_model_path`` or when its config.json is
    absent (a dry run without the weights, or a warm start that has yet to write it).
    """
    if not config.model.hf_model_path:
        return
    path = Path(config.model.hf_model_path) / "config.json"
    if not path.is_file():
        return
    try:
        checkpoint = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ConfigError(f"model.hf_model_path: cannot read {path}: {error}") from None
    _require(isinstance(checkpoint, dict), f"model.hf_model_path: {path} is not a JSON object")
    arch = config.model.architecture
    if arch is not None:
        differ = [
            f"{name} {getattr(arch, name)!r} != {_checkpoint_value(checkpoint, name)!r}"
            for name in (item.name for item in dataclasses.fields(ArchitectureConfig))
            if _checkpoint_value(checkpoint, name) not in (None, getattr(arch, name))
        ]
        _require(
            not differ,
            f"model.architecture disagrees with {path} ({'; '.join(differ)}): the checkpoint is "
            "what runs, so fix model.architecture or remove it",
        )
    positions, total = checkpoint.get("max_position_embeddings"), config.max_sequence_length
    _require(
        not isinstance(positions, int) or total <= positions,
        f"rollout.max_prompt_length + max_response_length ({total}) exceeds the "
        f"max_position_embeddings ({positions}) of {path}",
    )


def _checkpoint_value(checkpoint: dict[str, Any], name: str) -> Any:
    """A field of an HF config.json; transformers 5 writes rope_theta inside rope_parameters."""
    rope = checkpoint.get("rope_parameters")
    if name == "rope_theta" and "rope_theta" not in checkpoint and isinstance(rope, dict):
        return rope.get("rope_theta")
    return checkpoint.get(name)


# ---------------------------------------------------------------------------------------------
# loading, overrides, saving


def load_config(path: str | Path, overrides: Iterable[str] = ()) -> FipoConfig:
    """Read a YAML recipe, apply ``key.sub=value`` overrides, type-check and validate."""
    path = Path(path)
    try:
        data = dataclass_yaml.load_yaml(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML: {error}") from None
    except ConfigError as error:
        raise ConfigError(f"{path}: {error}") from None
    try:
        return from_dict(apply_overrides(data, overrides))
    except ConfigError as error:
        raise ConfigError(f"{path}: {error}") from None


def apply_overrides(data: Mapping[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """Copy of the YAML-shaped ``data`` with each ``key.sub=value`` override applied."""
    return dataclass_yaml.apply_overrides(FipoConfig, data, overrides)


def from_dict(data: Mapping[str, Any]) -> FipoConfig:
    """Build and validate a :class:`FipoConfig` from nested mappings (the YAML layout)."""
    return dataclass_yaml.build(FipoConfig, data)


def to_dict(config: Any) -> dict[str, Any]:
    """Nested plain dict of a config (or of one section)."""
    return dataclasses.asdict(config)


def to_yaml(config: Any) -> str:
    """YAML text that :func:`load_config` reads back to an equal config."""
    return yaml.safe_dump(to_dict(config), sort_keys=False, default_flow_style=False)


def save_config(config: FipoConfig, path: str | Path) -> None:
    """Write the resolved config next to a run's outputs."""
    Path(path).write_text(to_yaml(config))
