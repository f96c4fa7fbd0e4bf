"""The run config's sections other than the actor's, and the base every section builds on.

:class:`_Section` checks the ``_num`` bounds of its fields and the section's own rules after
construction. Here: ``algorithm``, ``rollout``, ``reward``, ``data``, ``trainer`` and
``logging``; the actor's ``model`` / ``parallelism`` / ``optimizer`` are in
:mod:`megatron_fipo.config_actor`, the whole run (:class:`FipoConfig`) and loading in
:mod:`megatron_fipo.config`, which re-exports every name. Imports no torch.
"""

from __future__ import annotations

import dataclasses
import math
import operator
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from megatron_fipo.dataclass_yaml import ConfigError
from megatron_fipo.dataclass_yaml import require as _require

_dc = dataclass(kw_only=True, slots=True)


_BOUNDS = {
    "gt": (operator.gt, ">"),
    "ge": (operator.ge, ">="),
    "lt": (operator.lt, "<"),
    "le": (operator.le, "<="),
}


def _num(default: Any = dataclasses.MISSING, **bounds: float) -> Any:
    """A numeric field with bounds (``gt``, ``ge``, ``lt``, ``le``) checked after construction."""
    assert set(bounds) <= set(_BOUNDS), bounds
    return field(default=default, metadata=bounds)


class _Section:
    """Base of every section: checks the ``_num`` bounds, then the section's own rules."""

    __slots__ = ()
    SECTION: ClassVar[str] = ""

    def __post_init__(self) -> None:
        for item in dataclasses.fields(self):
            value = getattr(self, item.name)
            _require(
                not isinstance(value, float) or math.isfinite(value),
                f"{self.SECTION}.{item.name} must be a finite number, got {value!r}",
            )
            if value is None or not item.metadata:
                continue
            if not all(_BOUNDS[op][0](value, bound) for op, bound in item.metadata.items()):
                wanted = " and ".join(f"{_BOUNDS[op][1]} {b}" for op, b in item.metadata.items())
                raise ConfigError(f"{self.SECTION}.{item.name} must be {wanted}, got {value!r}")
        self._validate()

    def _validate(self) -> None:
        """Rules that involve several fields of the section."""


# ---------------------------------------------------------------------------------------------
# algorithm


@_dc
class OverlongBufferConfig(_Section):
    """DAPO's soft overlong penalty: ``min(-(len - (max_len - len_buf)) / len_buf, 0) * factor``."""

    SECTION: ClassVar[str] = "algorithm.overlong_buffer"
    enable: bool = True
    """Add the penalty to the reward of responses longer than ``max_response_length - len``."""
    len: int = _num(4096, ge=1)
    """Tokens at the end of the response budget over which the penalty ramps down to -1."""
    penalty_factor: float = _num(1.0, ge=0)
    """Scale of the penalty (1.0: a response at the hard limit loses 1.0 reward)."""


@_dc
class DynamicSamplingConfig(_Section):
    """DAPO dynamic sampling: oversample prompts, drop groups whose rewards are all equal."""

    SECTION: ClassVar[str] = "algorithm.dynamic_sampling"
    enable: bool = True
    """Filter groups with zero reward variance and generate more until the batch is full."""
    max_num_gen_batches: int = _num(10, ge=1)
    """Stop with an error after this many generation batches in one rollout step."""


@_dc
class AlgorithmConfig(_Section):
    """Policy loss (FIPO_SPEC steps 1-9), advantages and reward shaping."""

    SECTION: ClassVar[str] = "algorithm"
    mode: Literal["grpo", "dapo", "fipo"] = "fipo"
    """Loss: "grpo" symmetric clip, "dapo" clip-higher with f = 1, "fipo" future-KL weights."""
    clip_ratio_low: float = _num(0.2, gt=0, lt=1)
    """PPO eps_low: ratios below ``1 - clip_ratio_low`` are clipped."""
    clip_ratio_high: float = _num(0.28, gt=0)
    """PPO eps_high (DAPO clip-higher); "grpo" uses ``clip_ratio_low`` on both sides."""
    clip_ratio_c: float = _num(10.0, gt=1)
    """Dual-clip constant c: bounds the loss of negative-advantage tokens, filters the future KL."""
    decay_rate: float = _num(32.0, gt=0)
    """Future-KL half-life in tokens: ``gamma = 2 ** (-1 / decay_rate)``."""
    fipo_clip_ratio: float = _num(0.2, ge=0)
    """eps_f: influence weights clipped to ``[1 or 1 - eps_f, 1 + eps_f]``; 0: ``min(w, 10)``."""
    fipo_clip_high_only: bool = True
    """Clip influence weights to ``[1, 1 + eps_f]`` (the 32B recipe) instead of symmetrically."""
    safety_thresh: float = _num(10.0, gt=0)
    """Where A < 0 and the ratio exceeds this, the influence weight is clipped to [0.8, 1.0]."""
    norm_adv_by_std: bool = True
    """GRPO: divide group-centred rewards by the group std (False: centring only)."""
    adv_epsilon: float = _num(1e-6, gt=0)
    """Added to the group std before dividing."""
    overlong_buffer: OverlongBufferConfig = field(default_factory=OverlongBufferConfig)
    """Soft overlong reward penalty."""
    dynamic_sampling: DynamicSamplingConfig = field(default_factory=DynamicSamplingConfig)
    """Zero-variance group filter."""
    loss_agg_mode: Literal["token-mean"] = "token-mean"
    """Sum of the loss over kept tokens / the global token count of the optimizer step."""
    entropy_coeff: float = _num(0.0, ge=0)
    """Entropy bonus coefficient (0 in the recipe; entropy is still logged)."""
    use_kl_loss: bool = False
    """KL-to-reference loss; the recipe has none, so no reference model is kept."""
    ppo_epochs: int = _num(1, ge=1)
    """Passes over each rollout batch (one optimizer step per mini-batch per pass)."""

    def _validate(self) -> None:
        _require(
            self.fipo_clip_high_only or self.fipo_clip_ratio < 1,
            "algorithm.fipo_clip_ratio must be < 1 when fipo_clip_high_only is false "
            f"(the lower bound 1 - eps_f must stay positive), got {self.fipo_clip_ratio}",
        )
        _require(
            not self.use_kl_loss,
            "algorithm.use_kl_loss=true is not supported: the recipe has no KL term",
        )

    @property
    def gamma(self) -> float:
        """Per-token discount of the future-KL sum, ``2 ** (-1 / decay_rate)``."""
        return 2.0 ** (-1.0 / self.decay_rate)


# ---------------------------------------------------------------------------------------------
# rollout, reward, data


@_dc
class EvalSamplingConfig(_Section):
    """Sampling for evaluation (AIME 2024 avg@32 at top_p 0.7 in the recipe)."""

    SECTION: ClassVar[str] = "rollout.eval_sampling"
    n_samples_per_prompt: int = _num(32, ge=1)
    """Samples per eval prompt; accuracy is averaged over them (avg@n)."""
    temperature: float = _num(1.0, ge=0)
    """Eval temperature (0: greedy)."""
    top_p: float = _num(0.7, gt=0, le=1)
    """Eval nucleus sampling."""
    top_k: int = _num(-1, ge=-1)
    """Eval top-k (-1 or 0: off)."""


@_dc
class SGLangServerConfig(_Section):
    """How the SGLang engine manages its servers (the rest of its settings are the rollout
    section's: TP size, memory fraction, host, bucket size, determinism, extra arguments)."""

    SECTION: ClassVar[str] = "rollout.sglang"
    startup_timeout_s: float = _num(900.0, gt=0)
    """Seconds a server may take to answer /health after its launch (model load, CUDA graphs)."""
    request_timeout_s: float = _num(3600.0, gt=0)
    """Seconds one HTTP request may take (a long generation, a weight bucket)."""
    max_concurrent_requests: int = _num(256, ge=1)
    """Generation requests in flight per engine."""
    max_restarts: int = _num(3, ge=0)
    """Restarts allowed per server over the engine's life (then the run stops)."""


@_dc
class RolloutConfig(_Section):
    """Generation engines and sampling for training rollouts."""

    SECTION: ClassVar[str] = "rollout"
    engine: Literal["hf", "sglang"] = "sglang"
    """"sglang" on GPUs; "hf" (transformers generate) on CPU and in tests."""
    n_samples_per_prompt: int = _num(16, ge=2)
    """Responses per prompt: the GRPO group (advantages need at least 2)."""
    temperature: float = _num(1.0, gt=0)
    """Sampling temperature."""
    top_p: float = _num(1.0, gt=0, le=1)
    """Nucleus sampling."""
    top_k: int = _num(-1, ge=-1)
    """Top-k sampling (-1 or 0: off)."""
    max_prompt_length: int = _num(2048, ge=1)
    """Prompt tokens; longer prompts are filtered out when the data is loaded."""
    max_response_length: int = _num(20480, ge=1)
    """Generated tokens per response (the hard length limit)."""
    engine_tensor_parallel_size: int = _num(1, ge=1)
    """GPUs per inference engine (SGLang tp_size)."""
    mem_fraction_static: float = _num(0.6, gt=0, lt=1)
    """SGLang's static GPU memory fraction (weights + KV cache)."""
    colocate: bool = True
    """Engines share the training GPUs and release their memory while the actor trains."""
    num_gpus: int | None = _num(None, ge=1)
    """GPUs for the engines when not colocated (taken out of the training world)."""
    weight_sync_bucket_bytes: int = _num(512 * 1024 * 1024, ge=1)
    """Bytes per bucket of HF-named tensors sent to the engines after each rollout step."""
    weight_sync: Literal["ipc", "nccl"] | None = None
    """How weights reach the engines after a step (None: by placement, see
    :attr:`weight_sync_mode`). "ipc" (colocated): every training rank hands the full weights, by
    reference, to the engine process on its own GPU (CUDA IPC; shared memory on CPU). "nccl"
    (separate placement, SGLang): one rank per pipeline stage broadcasts its layers into an
    update group with every engine server."""
    host: str = "127.0.0.1"
    """Address the engine servers bind to."""
    extra_server_args: list[str] = field(default_factory=list)
    """Extra SGLang server arguments, e.g. ["--attention-backend", "fa3"]."""
    deterministic_inference: bool = False
    """SGLang: launch with --enable-deterministic-inference (batch-invariant kernels, slower), the
    only mode in which it honours per-request seeds, so a resumed run regenerates the same
    rollouts. Off: seeds are ignored and SGLang rollouts are not reproducible."""
    hf_max_batch_size: int = _num(64, ge=1)
    """HF engine: requests decoded together (larger request lists are split)."""
    sglang: SGLangServerConfig = field(default_factory=SGLangServerConfig)
    """SGLang server management: timeouts, concurrency, restarts."""
    eval_sampling: EvalSamplingConfig = field(default_factory=EvalSamplingConfig)
    """Sampling used by evaluation."""

    def _validate(self) -> None:
        _require(
            self.colocate == (self.num_gpus is None),
            f"rollout.num_gpus must be set exactly when rollout.colocate=false "
            f"(colocate={self.colocate}, num_gpus={self.num_gpus})",
        )
        _require(bool(self.host), "rollout.host must not be empty")
        _require(
            (self.weight_sync_mode == "ipc") == self.colocate,
            f"rollout.weight_sync={self.weight_sync!r} with rollout.colocate={self.colocate}: "
            "'ipc' needs the engines on the training GPUs (colocate=true), 'nccl' is for "
            "separate engine GPUs (colocate=false)",
        )
        _require(
            self.engine == "sglang" or self.weight_sync_mode == "ipc",
            "rollout.weight_sync='nccl' needs rollout.engine='sglang' (the HF engine takes "
            "weights from the training rank beside it only)",
        )

    @property
    def weight_sync_mode(self) -> str:
        """``weight_sync``, or by placement: "ipc" when colocated, else "nccl"."""
        return self.weight_sync or ("ipc" if self.colocate else "nccl")


@_dc
class RewardConfig(_Section):
    """Verifiable reward: +1 correct, -1 wrong (before the overlong penalty)."""

    SECTION: ClassVar[str] = "reward"
    function: str | None = None
    """User reward as "package.module:function" (None: the built-in math answer reward)."""
    timeout_s: float = _num(10.0, gt=0)
    """Per-sample time limit; a sample that runs over scores as wrong."""
    batch_budget_s: float | None = _num(None, gt=0)
    """Time limit of scoring one generation batch; samples still unscored when it runs out score
    as timeouts (logged as reward/budget_timeouts). None: 30 x timeout_s, which an ordinary batch
    never reaches (milliseconds per sample); it caps a batch of hostile outputs, which would
    otherwise take num_samples x timeout_s / num_workers."""
    num_workers: int = _num(4, ge=1)
    """Worker processes that check answers."""

    def _validate(self) -> None:
        _require(
            self.function is None or ":" in self.function,
            f"reward.function must look like 'package.module:function', got {self.function!r}",
        )
        _require(
            self.batch_budget_s is None or self.batch_budget_s >= self.timeout_s,
            f"reward.batch_budget_s ({self.batch_budget_s}) must be >= reward.timeout_s "
            f"({self.timeout_s}): one sample may take its whole deadline",
        )


@_dc
class DataConfig(_Section):
    """Prompt datasets and batch sizes (counted in prompts, not responses)."""

    SECTION: ClassVar[str] = "data"
    train_files: list[str] = field(default_factory=list)
    """Training prompt files (verl RL parquet such as DAPO-Math-17k, or jsonl)."""
    eval_files: list[str] = field(default_factory=list)
    """Evaluation files (e.g. AIME 2024, parquet or jsonl)."""
    format: Literal["parquet", "jsonl"] | None = None
    """File format; None: from each file's extension."""
    prompt_key: str | None = None
    """Prompt column; None: detect ("prompt" chat messages, or jsonl "problem")."""
    answer_key: str | None = None
    """Ground-truth column, dotted into structs; None: "reward_model.ground_truth" or "answer"."""
    apply_chat_template: bool = True
    """Render prompts with the tokenizer's chat template."""
    train_batch_size: int = _num(512, ge=1)
    """Prompts per rollout step (after dynamic-sampling filtering)."""
    gen_batch_size: int | None = _num(None, ge=1)
    """Prompts per generation batch when dynamic sampling oversamples (None: train_batch_size)."""
    ppo_mini_batch_size: int = _num(64, ge=1)
    """Prompts per optimizer step; train_batch_size / this = optimizer steps per rollout step."""
    shuffle: bool = True
    """Shuffle the training prompts each epoch."""
    seed: int = 1
    """Seed of the prompt order."""
    on_malformed_row: Literal["skip", "error"] = "skip"
    """A malformed row is reported with file and row; "skip" counts it, "error" stops."""

    def _validate(self) -> None:
        _require(len(self.train_files) > 0, "data.train_files must list at least one file")
        _require(
            self.train_batch_size % self.ppo_mini_batch_size == 0,
            f"data.train_batch_size ({self.train_batch_size}) must be divisible by "
            f"data.ppo_mini_batch_size ({self.ppo_mini_batch_size})",
        )


# ---------------------------------------------------------------------------------------------
# trainer, logging


@_dc
class TrainerConfig(_Section):
    """Run length, checkpoints, evaluation and the cluster shape."""

    SECTION: ClassVar[str] = "trainer"
    total_epochs: int = _num(1, ge=1)
    """Passes over the training prompts."""
    total_training_steps: int | None = _num(None, ge=1)
    """Rollout steps to run (None: total_epochs over the data)."""
    save_freq: int | None = _num(10, ge=1)
    """Checkpoint every N rollout steps (None: only at the end)."""
    eval_freq: int | None = _num(10, ge=1)
    """Evaluate every N rollout steps (None: never during training)."""
    eval_before_train: bool = True
    """Evaluate the starting policy before the first step."""
    output_dir: str = "outputs/run"
    """Checkpoints, the resolved config, metrics and plots go here."""
    resume: str = "auto"
    """"auto": newest complete checkpoint in output_dir if any; "disable"; or a checkpoint path."""
    max_checkpoints_to_keep: int | None = _num(None, ge=1)
    """Delete older checkpoints beyond this many (None: keep all)."""
    optimizer_checkpoint_format: Literal["dp_reshardable", "fully_reshardable"] = "dp_reshardable"
    """Distributed-optimizer state in checkpoints: "dp_reshardable" (fast; resume under the
    same TP / PP) or "fully_reshardable" (gathered per DP group; resume under any layout)."""
    nnodes: int = _num(1, ge=1)
    """Nodes in the Ray cluster."""
    gpus_per_node: int = _num(8, ge=0)
    """GPUs per node (0: CPU-only run with gloo)."""
    cpu_ranks_per_node: int = _num(1, ge=1)
    """Training ranks per node on a CPU-only run (gpus_per_node = 0)."""
    cpus_per_node: int | None = _num(None, ge=1)
    """CPU cores Ray may use per node (None: detect)."""
    distributed_backend: Literal["nccl", "gloo"] = "nccl"
    """torch.distributed backend of the training ranks."""
    seed: int = 42
    """Seed of model init, sampling and dropout."""

    def _validate(self) -> None:
        _require(
            self.gpus_per_node > 0 or self.distributed_backend == "gloo",
            "trainer.distributed_backend must be 'gloo' when trainer.gpus_per_node is 0",
        )
        _require(bool(self.output_dir), "trainer.output_dir must not be empty")
        _require(bool(self.resume), "trainer.resume must be 'auto', 'disable' or a checkpoint path")


@_dc
class LoggingConfig(_Section):
    """Where per-step metrics go (the JSONL file lives in trainer.output_dir)."""

    SECTION: ClassVar[str] = "logging"
    experiment_name: str = "fipo"
    """Run name in TensorBoard / wandb."""
    jsonl: bool = True
    """Write ``metrics.jsonl`` (one JSON object per step)."""
    tensorboard: bool = True
    """Write TensorBoard event files."""
    wandb_project: str | None = None
    """Log to this Weights & Biases project (None: no W&B); needs ``pip install wandb``."""
    wandb_entity: str | None = None
    """W&B team or user (None: your default entity)."""
    wandb_mode: Literal["online", "offline"] = "online"
    """"offline": no network, the run is written under ``<output_dir>/wandb`` for ``wandb sync``."""
    progress_bar: bool = True
    """Show a progress bar over the steps (only when stderr is a terminal)."""
