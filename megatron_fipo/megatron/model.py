"""Megatron ``GPTModel`` from a Hugging Face config (Qwen2 / Qwen2.5 and Llama families).

The HF config decides the architecture (GQA, QKV bias, RMSNorm, SwiGLU, RoPE theta and
Llama-3 RoPE scaling, tied or untied embeddings); the parallel layout and dtype come from the
caller. Two layer specs:

- ``"local"``: Megatron-core's own modules; runs on CPU. With context parallelism the core
  attention is our :class:`megatron_fipo.megatron.cp_attention.ContextParallelAttention`.
- ``"te"``: TransformerEngine modules (GPU only, ``pip install megatron_fipo[gpu]``), with FP8
  and TE's own context-parallel attention.

The vocabulary is padded (:func:`padded_vocab_size`) so every TP rank holds an equal,
128-aligned slice; padded rows are never targets and their logits are ignored by nobody but
the softmax, exactly as in Megatron's own training.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

import torch
import torch.nn.functional as F

from megatron_fipo.config import (
    ModelConfig,
    ParallelismConfig,
    check_actor_sections,
    resolved_sequence_parallel,
)

SUPPORTED_MODEL_TYPES = ("qwen2", "llama")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
"""``model.dtype`` -> torch dtype."""
VOCAB_ALIGNMENT = 128


def padded_vocab_size(vocab_size: int, tensor_parallel: int) -> int:
    """Smallest multiple of ``128 * tensor_parallel`` that is >= ``vocab_size``."""
    if vocab_size < 1 or tensor_parallel < 1:
        raise ValueError(
            f"vocab_size and tensor_parallel must be >= 1, got {vocab_size}, {tensor_parallel}"
        )
    multiple = VOCAB_ALIGNMENT * tensor_parallel
    return -(-vocab_size // multiple) * multiple


def hf_value(hf_config: Any, key: str, default: Any = None) -> Any:
    """``hf_config[key]`` for a dict or a transformers ``PretrainedConfig``."""
    if isinstance(hf_config, Mapping):
        return hf_config.get(key, default)
    return getattr(hf_config, key, default)


def _model_type(hf_config: Any) -> str:
    model_type = hf_value(hf_config, "model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"hf_config.model_type={model_type!r} is not supported; expected one of {SUPPORTED_MODEL_TYPES}"
        )
    return model_type


def rope_parameters(hf_config: Any) -> dict[str, Any]:
    """RoPE settings wherever the config keeps them: transformers 5 keeps a ``rope_parameters``
    dict (``rope_theta``, ``rope_type``, scaling fields) and no ``rope_theta`` attribute; older
    configs have top-level ``rope_theta`` and ``rope_scaling``. Top-level values win."""
    merged = dict(hf_value(hf_config, "rope_parameters") or {})
    merged.update(hf_value(hf_config, "rope_scaling") or {})
    theta = hf_value(hf_config, "rope_theta")
    if theta is not None:
        merged["rope_theta"] = theta
    return merged


def rope_theta(hf_config: Any) -> float:
    """The RoPE base (10000 when the config states none, as in transformers)."""
    return float(rope_parameters(hf_config).get("rope_theta", 10000.0))


def rope_scaling_factor(hf_config: Any) -> float | None:
    """Llama-3 RoPE scaling factor, None without scaling; ValueError for other schemes.

    Megatron's built-in scaling is the Llama-3.1 rule with low/high frequency factors 1 / 4 and
    8192 original positions, so only that exact rule is accepted.
    """
    scaling = {k: v for k, v in rope_parameters(hf_config).items() if k != "rope_theta"}
    rope_type = scaling.get("rope_type", scaling.get("type"))
    if not scaling or rope_type == "default":
        return None
    expected = {
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    if rope_type != "llama3" or any(float(scaling.get(k, v)) != v for k, v in expected.items()):
        raise ValueError(
            f"hf_config.rope_scaling={scaling} is not supported: only the llama3 rule with "
            f"{expected} maps onto Megatron's rope scaling"
        )
    return float(scaling["factor"])


def transformer_config_from_hf(
    hf_config: Any, model: ModelConfig, parallel: ParallelismConfig, **overrides: Any
):
    """Megatron ``TransformerConfig`` for the HF model built as the ``model`` section says
    (dtype, spec, FP8, recomputation) under the ``parallel`` layout. ``overrides``: further
    ``TransformerConfig`` fields."""
    from megatron.core.transformer import TransformerConfig

    check_actor_sections(model, parallel)
    model_type = _model_type(hf_config)
    dtype = DTYPES[model.dtype]
    num_heads = hf_value(hf_config, "num_attention_heads")
    hidden = hf_value(hf_config, "hidden_size")
    qkv_bias = True if model_type == "qwen2" else bool(hf_value(hf_config, "attention_bias", False))
    if model_type == "llama" and hf_value(hf_config, "mlp_bias", False):
        raise ValueError(
            "hf_config.mlp_bias=True is not supported (Megatron biases all linears together)"
        )
    kwargs = dict(
        num_layers=hf_value(hf_config, "num_hidden_layers"),
        hidden_size=hidden,
        ffn_hidden_size=hf_value(hf_config, "intermediate_size"),
        num_attention_heads=num_heads,
        num_query_groups=hf_value(hf_config, "num_key_value_heads") or num_heads,
        kv_channels=hf_value(hf_config, "head_dim") or hidden // num_heads,
        normalization="RMSNorm",
        layernorm_epsilon=hf_value(hf_config, "rms_norm_eps", 1e-6),
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=qkv_bias,
        init_method_std=hf_value(hf_config, "initializer_range", 0.02),
        attention_dropout=0.0,
        hidden_dropout=0.0,
        tensor_model_parallel_size=parallel.tensor_model_parallel_size,
        pipeline_model_parallel_size=parallel.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=parallel.virtual_pipeline_model_parallel_size,
        context_parallel_size=parallel.context_parallel_size,
        sequence_parallel=resolved_sequence_parallel(model, parallel),
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        attention_softmax_in_fp32=True,
        recompute_granularity=model.recompute_granularity,
        recompute_method=model.recompute_method,
        recompute_num_layers=model.recompute_num_layers,
        **_kernel_options(model.spec),
    )
    if model.fp8 is not None:
        kwargs.update(fp8=model.fp8, fp8_recipe=model.fp8_recipe, fp8_param=model.fp8_param)
    kwargs.update(overrides)
    return TransformerConfig(**kwargs)


def _kernel_options(spec: str) -> dict[str, Any]:
    """Fused kernels exist only with CUDA (and TE); the local CPU path uses plain torch ops."""
    if spec == "te":
        return dict(
            bias_activation_fusion=True, masked_softmax_fusion=True, apply_rope_fusion=False
        )
    on_cpu = not torch.cuda.is_available()
    return dict(
        use_cpu_initialization=on_cpu,
        gradient_accumulation_fusion=False,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        apply_rope_fusion=False,
    )


def uses_own_attention(spec: str, context_parallel: int = 1, packed: bool = False) -> bool:
    """Whether the local spec puts our core attention in place of Megatron's
    ``DotProductAttention``: with CP (which Megatron's refuses), with packed rows (it refuses
    ``cu_seqlens``), and on CUDA (ours runs PyTorch's fused kernels; Megatron's materialises
    the ``[s, s]`` scores). The TE spec has TE's attention."""
    if spec != "local":
        return False
    return context_parallel > 1 or packed or torch.cuda.is_available()


def layer_spec(spec: str, context_parallel: int = 1, own_attention: bool | None = None):
    """The transformer layer ``ModuleSpec`` for ``spec`` ("local" or "te").

    With the local spec, ``own_attention`` (default: :func:`uses_own_attention` for unpacked
    rows) puts our :class:`~megatron_fipo.megatron.cp_attention.ContextParallelAttention` in
    place of Megatron's ``DotProductAttention``."""
    from megatron.core.models.gpt import gpt_layer_specs

    if spec == "te":
        try:
            import transformer_engine  # noqa: F401
        except ImportError as error:
            raise ImportError(
                "spec='te' needs TransformerEngine: pip install 'megatron_fipo[gpu]'"
            ) from error
        return gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec()
    if spec != "local":
        raise ValueError(f"spec must be 'local' or 'te', got {spec!r}")
    layer = gpt_layer_specs.get_gpt_layer_local_spec(normalization="RMSNorm")
    if own_attention is None:
        own_attention = uses_own_attention(spec, context_parallel)
    if context_parallel > 1 and not own_attention:
        raise ValueError("the local spec needs our core attention for context_parallel > 1")
    if own_attention:
        # Megatron's local DotProductAttention refuses CP and materialises the [s, s] scores;
        # ours attends over all-gathered K/V, through PyTorch's flash / memory-efficient
        # kernels on CUDA (so long rows fit without TransformerEngine).
        from megatron_fipo.megatron.cp_attention import ContextParallelAttention

        layer.submodules.self_attention.submodules.core_attention = ContextParallelAttention
    return layer


def build_gpt_model(
    hf_config: Any,
    config,
    *,
    pre_process: bool = True,
    post_process: bool = True,
    spec: str = "local",
    vp_stage: int | None = None,
    own_attention: bool | None = None,
):
    """One ``GPTModel`` (one pipeline chunk) for ``hf_config`` with ``TransformerConfig`` ``config``.

    Returns a model whose forward yields vocab-parallel logits ``[B, S, V_pad / TP]``
    (or, inside :func:`hidden_states_only`, final hidden states ``[S, B, H]``).
    """
    from megatron.core.models.gpt import GPTModel

    _model_type(hf_config)
    vocab = padded_vocab_size(hf_value(hf_config, "vocab_size"), config.tensor_model_parallel_size)
    scaling = rope_scaling_factor(hf_config)
    return GPTModel(
        config=config,
        transformer_layer_spec=layer_spec(spec, config.context_parallel_size, own_attention),
        vocab_size=vocab,
        max_sequence_length=hf_value(hf_config, "max_position_embeddings", 4096),
        pre_process=pre_process,
        post_process=post_process,
        parallel_output=True,
        share_embeddings_and_output_weights=bool(hf_value(hf_config, "tie_word_embeddings", False)),
        position_embedding_type="rope",
        rotary_base=int(rope_theta(hf_config)),
        rope_scaling=scaling is not None,
        rope_scaling_factor=scaling or 8.0,
        vp_stage=vp_stage,
    )


def build_model_chunks(
    hf_config: Any, config, *, spec: str = "local", own_attention: bool | None = None
) -> list:
    """This rank's model chunks: one per virtual pipeline stage (one without VPP).

    Pipeline position decides ``pre_process`` (embedding) / ``post_process`` (final norm and
    output layer) per chunk, as Megatron's ``get_model`` does.
    """
    from megatron.core import parallel_state

    vpp = parallel_state.get_virtual_pipeline_model_parallel_world_size()
    chunks = []
    for stage in range(vpp or 1):
        vp_stage = stage if vpp else None
        chunks.append(
            build_gpt_model(
                hf_config,
                config,
                pre_process=parallel_state.is_pipeline_first_stage(
                    ignore_virtual=False, vp_stage=vp_stage
                ),
                post_process=parallel_state.is_pipeline_last_stage(
                    ignore_virtual=False, vp_stage=vp_stage
                ),
                spec=spec,
                vp_stage=vp_stage,
                own_attention=own_attention,
            )
        )
    return chunks


def unwrap(module):
    """The ``GPTModel`` inside DDP / Float16 wrappers."""
    while hasattr(module, "module"):
        module = module.module
    return module


def output_weight(model) -> torch.Tensor:
    """The output-layer weight ``[V_pad / TP, H]`` of a post-process chunk (tied or not)."""
    model = unwrap(model)
    if model.share_embeddings_and_output_weights:
        return model.shared_embedding_or_output_weight()
    return model.output_layer.weight


@contextlib.contextmanager
def hidden_states_only(model) -> Iterator[None]:
    """Make a post-process chunk return final-normed hidden states ``[S, B, H]`` instead of logits.

    The log-prob code then forms logits chunk by chunk from these and :func:`output_weight`,
    so the full ``[S, B, V]`` logits never exist. GPTModel returns the decoder output (final
    norm included) when ``post_process`` is off; the output layer and its weight stay put.
    """
    model = unwrap(model)
    previous = model.post_process
    model.post_process = False
    try:
        yield
    finally:
        model.post_process = previous


def causal_attention_mask(seq_len: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Megatron-style boolean mask ``[1, 1, S, S]`` (True = masked) for causal attention.

    The local spec needs it explicitly: its unfused softmax has no implicit causal mask.
    """
    return torch.ones(seq_len, seq_len, dtype=torch.bool, device=device).triu(1)[None, None]
