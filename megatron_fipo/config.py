"""Typed run configuration: one dataclass per component, loaded from YAML plus overrides.

A run is described by :class:`FipoConfig`, whose sections are handed to the components that use
them (``algorithm`` to the losses and advantages, ``parallelism`` to the Megatron actor, ...).
:func:`load_config` reads a YAML recipe, applies ``key.sub=value`` overrides (values parsed as
YAML), rejects unknown keys and values of the wrong type with the dotted key named, and runs
the cross-field checks. :meth:`FipoConfig.validate_layout` adds the checks that need the
world size (the launcher's dry run calls it). This module imports no torch.
"""

from __future__ import annotations

import dataclasses
import json
import math
import operator
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml

from megatron_fipo import dataclass_yaml
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
# model


@_dc
class ArchitectureConfig(_Section):
    """Qwen2 / Llama architecture in Hugging Face field names (maps 1:1 to an HF config)."""

    SECTION: ClassVar[str] = "model.architecture"
    model_type: Literal["qwen2", "llama"] = "qwen2"
    """HF model family; qwen2 has a bias on q/k/v, llama none."""
    vocab_size: int = _num(ge=1)
    """Vocabulary size (Megatron pads it for TP itself)."""
    hidden_size: int = _num(ge=1)
    """Model width."""
    intermediate_size: int = _num(ge=1)
    """SwiGLU MLP width."""
    num_hidden_layers: int = _num(ge=1)
    """Transformer layers."""
    num_attention_heads: int = _num(ge=1)
    """Query heads."""
    num_key_value_heads: int = _num(ge=1)
    """Key/value heads (GQA groups; Megatron's num_query_groups)."""
    max_position_embeddings: int = _num(32768, ge=1)
    """Longest position the RoPE tables cover."""
    rope_theta: float = _num(1000000.0, gt=0)
    """RoPE base."""
    rms_norm_eps: float = _num(1e-6, gt=0)
    """RMSNorm epsilon."""
    tie_word_embeddings: bool = False
    """Share the input embedding with the output layer."""

    def _validate(self) -> None:
        heads, groups = self.num_attention_heads, self.num_key_value_heads
        _require(
            self.hidden_size % heads == 0,
            f"model.architecture.hidden_size ({self.hidden_size}) must be divisible by "
            f"num_attention_heads ({heads})",
        )
        _require(
            heads % groups == 0,
            f"model.architecture.num_attention_heads ({heads}) must be divisible by "
            f"num_key_value_heads ({groups})",
        )


@_dc
class ModelConfig(_Section):
    """Which model to train and how Megatron builds it."""

    SECTION: ClassVar[str] = "model"
    hf_model_path: str | None = None
    """HF model directory (config.json, safetensors, tokenizer); its weights start the run."""
    architecture: ArchitectureConfig | None = None
    """Inline architecture: random init for tiny models, or layout checks without the download."""
    tokenizer_path: str | None = None
    """Tokenizer directory or sentencepiece model file; None: ``hf_model_path``."""
    megatron_checkpoint_path: str | None = None
    """Converted Megatron checkpoint to start from instead of converting ``hf_model_path``."""
    dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    """Parameter and compute dtype (float32 on CPU)."""
    spec: Literal["local", "te"] = "te"
    """Megatron layer spec: "local" (pure torch, runs on CPU) or "te" (TransformerEngine, FP8)."""
    fp8: Literal["e4m3", "hybrid"] | None = None
    """FP8 format of the TE layers (None: off); "hybrid" = e4m3 forward, e5m2 gradients."""
    fp8_recipe: Literal["delayed", "tensorwise", "blockwise", "mxfp8"] = "delayed"
    """TE FP8 scaling recipe ("mxfp8" needs Blackwell GPUs)."""
    fp8_param: bool = False
    """Keep the TE weights themselves in FP8 (saves memory; needs fp8)."""
    recompute_granularity: Literal["full", "selective"] | None = None
    """Activation recomputation (gradient checkpointing); None: off."""
    recompute_method: Literal["uniform", "block"] | None = None
    """How "full" recomputation groups the layers."""
    recompute_num_layers: int | None = _num(None, ge=1)
    """Layers per recompute group ("uniform") or recomputed layers per stage ("block").
    With "full" recomputation and neither set: "uniform", 1 layer per group (only each layer's
    input is kept, the usual long-context setting)."""
    logprob_chunk_size: int = _num(1024, ge=1)
    """Token positions per chunk of the vocab head (log-probs, entropy): its extra memory is
    chunk x vocab / TP fp32 values, whatever the sequence length."""

    def _validate(self) -> None:
        _require(
            self.hf_model_path is not None or self.architecture is not None,
            "model.hf_model_path or model.architecture must be set",
        )
        if self.recompute_granularity == "full":
            # Megatron refuses full recomputation without a method: one default, here.
            self.recompute_method = self.recompute_method or "uniform"
            if self.recompute_num_layers is None:
                self.recompute_num_layers = 1
        if self.fp8 is not None:
            _require(
                self.spec == "te" and self.dtype == "bfloat16",
                f"model.fp8={self.fp8!r} needs model.spec='te' and "
                f"model.dtype='bfloat16', got {self.spec!r} and {self.dtype!r}",
            )
        _require(not self.fp8_param or self.fp8 is not None, "model.fp8_param=true needs model.fp8")
        for name in ("recompute_method", "recompute_num_layers"):
            _require(
                getattr(self, name) is None or self.recompute_granularity == "full",
                f"model.{name}={getattr(self, name)!r} needs recompute_granularity='full'",
            )


# ---------------------------------------------------------------------------------------------
# parallelism, optimizer


@_dc
class ParallelismConfig(_Section):
    """Megatron layout of the training ranks, in Megatron's own argument names."""

    SECTION: ClassVar[str] = "parallelism"
    tensor_model_parallel_size: int = _num(1, ge=1)
    """TP: shards each layer's weights across this many ranks."""
    pipeline_model_parallel_size: int = _num(1, ge=1)
    """PP: splits the layers into this many stages."""
    virtual_pipeline_model_parallel_size: int | None = _num(None, ge=2)
    """Interleaved pipeline chunks per stage (None: not interleaved)."""
    context_parallel_size: int = _num(1, ge=1)
    """CP: splits each sequence into 2*CP zigzag chunks across this many ranks."""
    sequence_parallel: bool | None = None
    """Shard norm / dropout activations along the sequence over the TP ranks (None: on with
    model.spec "te" and TP > 1, off otherwise). Needs model.spec "te"."""
    use_distributed_optimizer: bool = True
    """Shard optimizer state (and fp32 master weights) over the data-parallel ranks."""
    micro_batch_size: int = _num(1, ge=1)
    """Sequences per micro-batch when ``max_tokens_per_micro_batch`` is None."""
    max_tokens_per_micro_batch: int | None = _num(None, ge=1)
    """Dynamic batching: micro-batches of at most this many (padded) tokens, sequences grouped
    by length, so short responses are not padded to the longest one of the batch."""
    packing: bool | None = None
    """Pack each micro-batch's sequences into one row ("thd", with ``cu_seqlens``; each
    sequence padded only to a multiple of 2 * CP * TP) instead of one row per sequence padded
    to the micro-batch's longest. None: on with ``max_tokens_per_micro_batch`` (the long-tailed
    RL batches it is for), off with fixed ``micro_batch_size``."""
    overlap_grad_reduce: bool = False
    """Overlap the data-parallel gradient reduce with the backward pass (bucket by bucket)."""
    overlap_param_gather: bool = False
    """Overlap the distributed optimizer's parameter all-gather with the next forward pass;
    needs use_distributed_optimizer and overlap_grad_reduce."""

    def _validate(self) -> None:
        _require(
            self.virtual_pipeline_model_parallel_size is None
            or self.pipeline_model_parallel_size > 1,
            "parallelism.virtual_pipeline_model_parallel_size needs pipeline_model_parallel_size > 1",
        )
        _require(
            not self.sequence_parallel or self.tensor_model_parallel_size > 1,
            "parallelism.sequence_parallel=true needs tensor_model_parallel_size > 1",
        )
        _require(
            not self.overlap_param_gather
            or (self.use_distributed_optimizer and self.overlap_grad_reduce),
            "parallelism.overlap_param_gather=true needs use_distributed_optimizer=true and "
            "overlap_grad_reduce=true",
        )

    @property
    def packed(self) -> bool:
        """Whether micro-batches are packed rows (``packing``, resolved)."""
        if self.packing is None:
            return self.max_tokens_per_micro_batch is not None
        return self.packing

    @property
    def model_parallel_size(self) -> int:
        """Ranks holding one model replica: TP * PP * CP."""
        tp, pp = self.tensor_model_parallel_size, self.pipeline_model_parallel_size
        return tp * pp * self.context_parallel_size


@_dc
class OptimizerConfig(_Section):
    """AdamW (Megatron's "adam", decoupled weight decay) and the learning-rate schedule."""

    SECTION: ClassVar[str] = "optimizer"
    optimizer: Literal["adam", "sgd"] = "adam"
    """"adam" (AdamW); "sgd" (plain SGD: its update is lr x the gradient, which the layout
    equivalence checks use to compare gradients). SGD needs
    ``parallelism.use_distributed_optimizer=false`` (Megatron's distributed optimizer is Adam)."""
    lr: float = _num(1e-6, gt=0)
    """Peak learning rate."""
    min_lr: float = _num(0.0, ge=0)
    """Floor of the decaying schedules (<= lr)."""
    lr_warmup_steps: int = _num(10, ge=0)
    """Linear warm-up from 0, in optimizer steps."""
    lr_decay_style: Literal["constant", "cosine", "linear"] = "constant"
    """Schedule after warm-up."""
    lr_decay_steps: int | None = _num(None, ge=1)
    """Optimizer steps (warm-up included) over which cosine / linear decay to min_lr; required
    by those styles (the actor cannot know the run's length), unused by "constant"."""
    weight_decay: float = _num(0.1, ge=0)
    """Decoupled weight decay."""
    adam_beta1: float = _num(0.9, ge=0, lt=1)
    """Adam beta1."""
    adam_beta2: float = _num(0.999, ge=0, lt=1)
    """Adam beta2."""
    adam_eps: float = _num(1e-8, gt=0)
    """Adam epsilon."""
    clip_grad: float = _num(1.0, ge=0)
    """Global gradient-norm clip (0: no clipping)."""
    sgd_momentum: float = _num(0.0, ge=0, lt=1)
    """Momentum of "sgd" (unused by "adam")."""
    offload_during_rollout: bool = False
    """Colocated runs: move the Adam state (and fp32 main weights) to host memory and drop the
    gradient buffers after each training phase, so the engines' KV cache can use that memory
    while they generate; both come back before the next training phase."""

    def _validate(self) -> None:
        _require(
            self.min_lr <= self.lr,
            f"optimizer.min_lr ({self.min_lr}) must be <= optimizer.lr ({self.lr})",
        )
        _require(
            self.lr_decay_style == "constant" or self.lr_decay_steps is not None,
            f"optimizer.lr_decay_style={self.lr_decay_style!r} needs optimizer.lr_decay_steps "
            "(the number of optimizer steps to decay over)",
        )
        _require(
            self.lr_decay_steps is None or self.lr_decay_steps > self.lr_warmup_steps,
            f"optimizer.lr_decay_steps ({self.lr_decay_steps}) must exceed "
            f"optimizer.lr_warmup_steps ({self.lr_warmup_steps})",
        )


def resolved_sequence_parallel(model: ModelConfig, parallelism: ParallelismConfig) -> bool:
    """``parallelism.sequence_parallel``, or when None: on with the TE spec and TP > 1."""
    if parallelism.sequence_parallel is None:
        return model.spec == "te" and parallelism.tensor_model_parallel_size > 1
    return parallelism.sequence_parallel


FP8_TOKEN_ALIGNMENT = {"mxfp8": 32}
"""Tokens an FP8 GEMM's token dimension must be a multiple of, per recipe (others: 16), as
megatron-core's ``fp8_utils.get_fp8_align_size`` states for TransformerEngine."""


def padding_multiples(model: ModelConfig, parallelism: ParallelismConfig) -> tuple[int, int]:
    """``(per sequence, per micro-batch row)``: the token multiples the actor pads to.

    Each sequence: ``2 * CP * TP`` (the zigzag split's 2 * CP chunks, each split again over
    the TP ranks by sequence parallelism). Each micro-batch row, with FP8: also a multiple of
    ``align * CP * TP`` so that every rank's tokens, ``row / CP`` (``row / (CP * TP)`` under
    sequence parallelism, where the FP8 inputs are cast before the all-gather), are a
    multiple of the GEMM alignment ``align`` (16; 32 for mxfp8). A plain ``lcm(16, 2 * CP *
    TP)`` would leave a rank's share of it unaligned whenever CP * TP > 1.
    """
    cp, tp = parallelism.context_parallel_size, parallelism.tensor_model_parallel_size
    sequence = 2 * cp * tp
    if model.fp8 is None:
        return sequence, sequence
    align = FP8_TOKEN_ALIGNMENT.get(model.fp8_recipe, 16)
    return sequence, math.lcm(sequence, align * cp * tp)


def round_up(value: int, multiple: int) -> int:
    """``value`` rounded up to a multiple of ``multiple``."""
    return -(-value // multiple) * multiple


def check_actor_sections(
    model: ModelConfig, parallelism: ParallelismConfig, optimizer: OptimizerConfig | None = None
) -> None:
    """The rules that span the sections the Megatron actor receives. :class:`FipoConfig` checks
    them for a run; the Megatron code, which may be given the sections alone, calls this too
    (without ``optimizer`` when it builds a model only)."""
    _require(
        not parallelism.sequence_parallel or model.spec == "te",
        "parallelism.sequence_parallel=true needs model.spec='te' (megatron-core's local "
        "norms do not support sequence parallelism)",
    )
    if optimizer is not None:
        _require(
            optimizer.optimizer == "adam" or not parallelism.use_distributed_optimizer,
            f"optimizer.optimizer={optimizer.optimizer!r} needs parallelism."
            "use_distributed_optimizer=false (Megatron's distributed optimizer is Adam)",
        )


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
