"""The sections the Megatron actor receives: ``model`` (with its ``architecture``),
``parallelism`` and ``optimizer``, and the rules and padding multiples that span them.

The actor takes these sections as they are; :func:`check_actor_sections` holds the rules that
span them (called by :class:`megatron_fipo.config.FipoConfig` and by the Megatron code, which
may be given the sections alone), :func:`padding_multiples` the token multiples the actor pads
to. Re-exported by :mod:`megatron_fipo.config`. Imports no torch.
"""

from __future__ import annotations

import math
from typing import ClassVar, Literal

from megatron_fipo.config_sections import _dc, _num, _Section
from megatron_fipo.dataclass_yaml import require as _require

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
