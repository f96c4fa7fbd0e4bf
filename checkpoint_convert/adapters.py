"""Model-family adapters: Hugging Face names and layouts <-> Megatron-core names and layouts.

One :class:`Adapter` per family (Qwen2/Qwen2.5 and Llama share HF names; they differ in the QKV
bias rule and in which config fields they accept). The same adapter serves the offline converter
and the rollout weight sync, so both see one definition of the fused layouts:

- ``linear_qkv`` (weight ``[G * (Q/G + 2) * D, H]``, bias ``[G * (Q/G + 2) * D]``): per query group
  ``g`` the rows ``[q heads of g..., k_g, v_g]``, groups in order. Tensor parallelism splits whole
  groups, so concatenating TP shards along dim 0 gives this global layout.
- ``linear_fc1`` (weight ``[2F, H]``): ``cat[gate, up]`` in the global (checkpoint) layout. A TP
  shard holds ``cat[gate_shard, up_shard]``; :func:`merge_tensor_parallel` rebuilds the global form.
- embedding / output layer: rows padded to the Megatron vocabulary (zeros), stripped on export.

Megatron names come in two spellings for the layer norms: the local spec's module names
(``input_layernorm.weight``, ``pre_mlp_layernorm.weight``) and the TransformerEngine ones fused into
the next linear (``self_attention.linear_qkv.layer_norm_weight``, ``mlp.linear_fc1.layer_norm_weight``).
Dist checkpoints use the TE spelling for both specs (megatron-core maps the local names when it
builds the sharded state dict), so :data:`CANONICAL` per-layer names are the TE ones.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch

from megatron_fipo.megatron.model import padded_vocab_size, rope_scaling_factor

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_MOE_FIELDS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_intermediate_size")
# Activations the Megatron model computes (SwiGLU with SiLU); transformers reads both as SiLU.
SUPPORTED_ACTIVATIONS = ("silu", "swish")
_LAYER_NAME = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
_HF_LAYER_NAME = re.compile(r"^model\.layers\.(\d+)\.(.+)$")

# Per-layer Megatron names (TE spelling, as in dist checkpoints) and the local-spec aliases.
QKV_NORM = "self_attention.linear_qkv.layer_norm_weight"
QKV_WEIGHT = "self_attention.linear_qkv.weight"
QKV_BIAS = "self_attention.linear_qkv.bias"
PROJ_WEIGHT = "self_attention.linear_proj.weight"
FC1_NORM = "mlp.linear_fc1.layer_norm_weight"
FC1_WEIGHT = "mlp.linear_fc1.weight"
FC2_WEIGHT = "mlp.linear_fc2.weight"
LOCAL_ALIASES = {"input_layernorm.weight": QKV_NORM, "pre_mlp_layernorm.weight": FC1_NORM}
EMBEDDING = "embedding.word_embeddings.weight"
FINAL_NORM = "decoder.final_layernorm.weight"
OUTPUT = "output_layer.weight"
# Linear modules whose (empty) ``_extra_state`` megatron-core records per layer.
EXTRA_STATE_MODULES = (
    "self_attention.linear_proj",
    "self_attention.linear_qkv",
    "mlp.linear_fc1",
    "mlp.linear_fc2",
)


class ConversionError(ValueError):
    """Bad input to a conversion: the message names the file, tensor or config field."""


def _get(config: Mapping, key: str, default=None):
    value = config.get(key, default)
    return default if value is None else value


@dataclass(frozen=True, kw_only=True, slots=True)
class ModelDims:
    """The sizes that fix every weight's shape (read from an HF ``config.json``)."""

    model_type: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_query_groups: int
    head_dim: int
    ffn_hidden_size: int
    vocab_size: int
    padded_vocab_size: int
    tie_embeddings: bool
    qkv_bias: bool

    @property
    def qkv_rows(self) -> int:
        return (self.num_heads + 2 * self.num_query_groups) * self.head_dim

    @classmethod
    def from_hf_config(cls, config: Mapping) -> ModelDims:
        """Validate ``config`` (an HF config.json dict) and read the sizes.

        Raises :class:`ConversionError` for MoE, unknown families or missing / inconsistent fields.
        """
        model_type = config.get("model_type")
        for field in _MOE_FIELDS:
            if config.get(field):
                raise ConversionError(
                    f"config.{field}={config[field]!r}: mixture-of-experts models are not supported"
                )
        if model_type not in ADAPTERS:
            raise ConversionError(
                f"config.model_type={model_type!r} is not supported; expected one of "
                f"{sorted(ADAPTERS)} (architectures={config.get('architectures')})"
            )
        for field in ("num_hidden_layers", "hidden_size", "num_attention_heads"):
            if not isinstance(config.get(field), int) or config[field] < 1:
                raise ConversionError(
                    f"config.{field} must be a positive int, got {config.get(field)!r}"
                )
        for field in ("intermediate_size", "vocab_size"):
            if not isinstance(config.get(field), int) or config[field] < 1:
                raise ConversionError(
                    f"config.{field} must be a positive int, got {config.get(field)!r}"
                )
        heads = config["num_attention_heads"]
        groups = _get(config, "num_key_value_heads", heads)
        if heads % groups:
            raise ConversionError(
                f"config.num_attention_heads={heads} is not divisible by num_key_value_heads={groups}"
            )
        head_dim = _get(config, "head_dim", config["hidden_size"] // heads)
        check_model_math(config)
        ADAPTERS[model_type].check_config(config)
        return cls(
            model_type=model_type,
            num_layers=config["num_hidden_layers"],
            hidden_size=config["hidden_size"],
            num_heads=heads,
            num_query_groups=groups,
            head_dim=head_dim,
            ffn_hidden_size=config["intermediate_size"],
            vocab_size=config["vocab_size"],
            # TP=1 padding: loading under a larger TP pads further (megatron-core lets the
            # embedding and output layer load with a different padded vocab).
            padded_vocab_size=padded_vocab_size(config["vocab_size"], 1),
            tie_embeddings=bool(config.get("tie_word_embeddings", False)),
            qkv_bias=ADAPTERS[model_type].qkv_bias(config),
        )


def check_model_math(config: Mapping) -> None:
    """Refuse config fields (both families) that change what the model computes in a way the
    Megatron model does not: weights would convert cleanly and then run a different function.

    Raises :class:`ConversionError` naming the field and its value.
    """
    act = config.get("hidden_act", "silu")
    if act not in SUPPORTED_ACTIVATIONS:
        raise ConversionError(
            f"config.hidden_act={act!r} is not supported: the Megatron model computes SwiGLU "
            f"with SiLU ({' or '.join(map(repr, SUPPORTED_ACTIVATIONS))})"
        )
    # transformers 5 writes RoPE settings into rope_parameters; older configs use rope_scaling.
    field = "rope_scaling" if config.get("rope_scaling") else "rope_parameters"
    rope = config.get(field) or {}
    if not isinstance(rope, Mapping):
        raise ConversionError(f"config.{field}={rope!r} must be a mapping")
    try:
        rope_scaling_factor({"rope_scaling": dict(rope)})
    except (ValueError, KeyError, TypeError):
        raise ConversionError(
            f"config.{field}={dict(rope)} is not supported: Megatron's RoPE has no scaling but "
            "the llama3 rule (low/high frequency factors 1 and 4, 8192 original positions)"
        ) from None
    theta = config.get("rope_theta", rope.get("rope_theta"))
    if theta is not None and not (
        isinstance(theta, (int, float)) and math.isfinite(theta) and float(theta).is_integer()
    ):
        raise ConversionError(
            f"config.rope_theta={theta!r} is not supported: Megatron's rotary base is an integer"
        )
    partial = config.get("partial_rotary_factor", rope.get("partial_rotary_factor"))
    if partial not in (None, 1, 1.0):
        raise ConversionError(
            f"config.partial_rotary_factor={partial!r} is not supported (rotary on every dim)"
        )
    layer_types = config.get("layer_types") or []
    other = sorted({kind for kind in layer_types if kind != "full_attention"})
    if other:
        raise ConversionError(
            f"config.layer_types has {other}: only full attention is supported by the Megatron "
            "model"
        )


# ---------------------------------------------------------------- fused layouts


def interleave_qkv(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_query_groups: int
) -> torch.Tensor:
    """HF ``q [Q*D, ...]``, ``k [G*D, ...]``, ``v [G*D, ...]`` -> Megatron ``[G*(Q/G+2)*D, ...]``.

    Works for weights (``[., H]``) and biases (1-D): per group, its query heads then k then v.
    """
    if not (q.dtype == k.dtype == v.dtype):
        raise ConversionError(f"q/k/v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    rest = q.shape[1:]
    groups = num_query_groups
    fused = torch.cat(
        [q.reshape(groups, -1, *rest), k.reshape(groups, -1, *rest), v.reshape(groups, -1, *rest)],
        dim=1,
    )
    return fused.reshape(-1, *rest)


def split_qkv(
    qkv: torch.Tensor, num_heads: int, num_query_groups: int, head_dim: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of :func:`interleave_qkv`: ``[G*(Q/G+2)*D, ...]`` -> contiguous ``(q, k, v)``."""
    rest = qkv.shape[1:]
    per_group = num_heads // num_query_groups
    grouped = qkv.reshape(num_query_groups, per_group + 2, head_dim, *rest)
    q = grouped[:, :per_group].reshape(num_heads * head_dim, *rest).contiguous()
    k = grouped[:, per_group].reshape(num_query_groups * head_dim, *rest).contiguous()
    v = grouped[:, per_group + 1].reshape(num_query_groups * head_dim, *rest).contiguous()
    return q, k, v


def fuse_gate_up(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """HF ``gate_proj [F, H]`` and ``up_proj [F, H]`` -> Megatron ``linear_fc1 [2F, H]``."""
    if gate.dtype != up.dtype:
        raise ConversionError(f"gate/up dtypes differ: {gate.dtype}, {up.dtype}")
    return torch.cat([gate, up], dim=0)


def split_gate_up(fc1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Megatron global ``linear_fc1 [2F, H]`` -> contiguous ``(gate [F, H], up [F, H])``."""
    gate, up = fc1.chunk(2, dim=0)
    return gate.contiguous(), up.contiguous()


def pad_vocab(weight: torch.Tensor, padded_rows: int) -> torch.Tensor:
    """``[V, H]`` -> ``[V_pad, H]`` with zero rows appended."""
    if weight.shape[0] == padded_rows:
        return weight
    padded = weight.new_zeros(padded_rows, *weight.shape[1:])
    padded[: weight.shape[0]] = weight
    return padded


# ---------------------------------------------------------------- names


def split_layer_name(megatron_name: str) -> tuple[int | None, str]:
    """``decoder.layers.3.<suffix>`` -> ``(3, canonical suffix)``; other names -> ``(None, name)``."""
    match = _LAYER_NAME.match(megatron_name)
    if match is None:
        return None, megatron_name
    suffix = match.group(2)
    return int(match.group(1)), LOCAL_ALIASES.get(suffix, suffix)


_TP_DIM = {QKV_WEIGHT: 0, QKV_BIAS: 0, PROJ_WEIGHT: 1, FC2_WEIGHT: 1, EMBEDDING: 0, OUTPUT: 0}


def merge_tensor_parallel(megatron_name: str, shards: Sequence[torch.Tensor]) -> torch.Tensor:
    """TP shards of one parameter (rank order) -> the global tensor :meth:`Adapter.megatron_to_hf` takes.

    Layer norms are replicated (shard 0 is returned); ``linear_fc1`` shards are
    ``cat[gate_r, up_r]`` and are regrouped into ``cat[gate, up]``.
    """
    _, suffix = split_layer_name(megatron_name)
    if len(shards) == 1 or suffix in (QKV_NORM, FC1_NORM, FINAL_NORM):
        return shards[0]
    if suffix == FC1_WEIGHT:
        halves = [shard.chunk(2, dim=0) for shard in shards]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=0)
    if suffix not in _TP_DIM:
        raise ConversionError(f"no tensor-parallel layout known for {megatron_name!r}")
    return torch.cat(list(shards), dim=_TP_DIM[suffix])


# ---------------------------------------------------------------- the adapter


@dataclass(frozen=True, slots=True)
class MegatronTensorSpec:
    """One dist-checkpoint tensor: ``key`` as stored, per-layer ``shape``; stacked over a
    leading layer axis (``[L, *shape]``) when ``per_layer``."""

    key: str
    shape: tuple[int, ...]
    per_layer: bool


@dataclass(frozen=True, slots=True)
class Adapter:
    """Name mapping and layouts for one model family, bound to a model's :class:`ModelDims`."""

    dims: ModelDims

    # Family rules (overridden per family).
    @staticmethod
    def check_config(config: Mapping) -> None:
        """Raise :class:`ConversionError` for config features the family mapping cannot express."""

    @staticmethod
    def qkv_bias(config: Mapping) -> bool:
        raise NotImplementedError

    # Shapes.
    def hf_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every HF tensor the model must have (``lm_head`` only when untied), with its shape."""
        d = self.dims
        shapes = {"model.embed_tokens.weight": (d.vocab_size, d.hidden_size)}
        for layer in range(d.num_layers):
            p = f"model.layers.{layer}."
            shapes[p + "input_layernorm.weight"] = (d.hidden_size,)
            shapes[p + "self_attn.q_proj.weight"] = (d.num_heads * d.head_dim, d.hidden_size)
            shapes[p + "self_attn.k_proj.weight"] = (d.num_query_groups * d.head_dim, d.hidden_size)
            shapes[p + "self_attn.v_proj.weight"] = (d.num_query_groups * d.head_dim, d.hidden_size)
            if d.qkv_bias:
                shapes[p + "self_attn.q_proj.bias"] = (d.num_heads * d.head_dim,)
                shapes[p + "self_attn.k_proj.bias"] = (d.num_query_groups * d.head_dim,)
                shapes[p + "self_attn.v_proj.bias"] = (d.num_query_groups * d.head_dim,)
            shapes[p + "self_attn.o_proj.weight"] = (d.hidden_size, d.num_heads * d.head_dim)
            shapes[p + "post_attention_layernorm.weight"] = (d.hidden_size,)
            shapes[p + "mlp.gate_proj.weight"] = (d.ffn_hidden_size, d.hidden_size)
            shapes[p + "mlp.up_proj.weight"] = (d.ffn_hidden_size, d.hidden_size)
            shapes[p + "mlp.down_proj.weight"] = (d.hidden_size, d.ffn_hidden_size)
        shapes["model.norm.weight"] = (d.hidden_size,)
        if not d.tie_embeddings:
            shapes["lm_head.weight"] = (d.vocab_size, d.hidden_size)
        return shapes

    def megatron_specs(self) -> list[MegatronTensorSpec]:
        """The dist-checkpoint tensors, in the order the converter writes them."""
        d = self.dims
        specs = [MegatronTensorSpec(EMBEDDING, (d.padded_vocab_size, d.hidden_size), False)]
        per_layer = [
            (QKV_NORM, (d.hidden_size,)),
            (QKV_WEIGHT, (d.qkv_rows, d.hidden_size)),
            (QKV_BIAS, (d.qkv_rows,)),
            (PROJ_WEIGHT, (d.hidden_size, d.num_heads * d.head_dim)),
            (FC1_NORM, (d.hidden_size,)),
            (FC1_WEIGHT, (2 * d.ffn_hidden_size, d.hidden_size)),
            (FC2_WEIGHT, (d.hidden_size, d.ffn_hidden_size)),
        ]
        for suffix, shape in per_layer:
            if suffix != QKV_BIAS or d.qkv_bias:
                specs.append(MegatronTensorSpec(f"decoder.layers.{suffix}", shape, True))
        specs.append(MegatronTensorSpec(FINAL_NORM, (d.hidden_size,), False))
        if not d.tie_embeddings:
            specs.append(MegatronTensorSpec(OUTPUT, (d.padded_vocab_size, d.hidden_size), False))
        return specs

    # Names.
    def hf_sources(self, megatron_name: str) -> list[str]:
        """HF tensor names that make up one Megatron tensor (per-layer name, global layer number)."""
        layer, suffix = split_layer_name(megatron_name)
        if layer is None:
            sources = {
                EMBEDDING: ["model.embed_tokens.weight"],
                FINAL_NORM: ["model.norm.weight"],
                OUTPUT: ["lm_head.weight"],
            }
        else:
            if not 0 <= layer < self.dims.num_layers:
                raise ConversionError(
                    f"{megatron_name!r}: layer {layer} outside [0, {self.dims.num_layers})"
                )
            attn, mlp = f"model.layers.{layer}.self_attn.", f"model.layers.{layer}.mlp."
            sources = {
                QKV_NORM: [f"model.layers.{layer}.input_layernorm.weight"],
                QKV_WEIGHT: [attn + f"{p}_proj.weight" for p in "qkv"],
                QKV_BIAS: [attn + f"{p}_proj.bias" for p in "qkv"],
                PROJ_WEIGHT: [attn + "o_proj.weight"],
                FC1_NORM: [f"model.layers.{layer}.post_attention_layernorm.weight"],
                FC1_WEIGHT: [mlp + "gate_proj.weight", mlp + "up_proj.weight"],
                FC2_WEIGHT: [mlp + "down_proj.weight"],
            }
        if suffix not in sources or (suffix == QKV_BIAS and not self.dims.qkv_bias):
            raise ConversionError(f"no HF counterpart for Megatron tensor {megatron_name!r}")
        if suffix == OUTPUT and self.dims.tie_embeddings:
            return sources[EMBEDDING]
        return sources[suffix]

    def hf_to_megatron(
        self, megatron_name: str, get_hf: Callable[[str], torch.Tensor]
    ) -> torch.Tensor:
        """The Megatron tensor ``megatron_name`` (global layout, vocab padded), built from the HF
        tensors that ``get_hf(hf_name)`` returns."""
        _, suffix = split_layer_name(megatron_name)
        tensors = [get_hf(name) for name in self.hf_sources(megatron_name)]
        if suffix in (QKV_WEIGHT, QKV_BIAS):
            return interleave_qkv(*tensors, self.dims.num_query_groups)
        if suffix == FC1_WEIGHT:
            return fuse_gate_up(*tensors)
        if suffix in (EMBEDDING, OUTPUT):
            return pad_vocab(tensors[0], self.dims.padded_vocab_size)
        return tensors[0]

    def megatron_to_hf(
        self, megatron_name: str, tensor: torch.Tensor
    ) -> list[tuple[str, torch.Tensor]]:
        """One Megatron tensor (global layout: TP shards merged with :func:`merge_tensor_parallel`,
        global layer number; local or TE spelling) -> its HF ``(name, tensor)`` pairs, vocab
        padding stripped. With tied embeddings ``output_layer.weight`` maps to nothing."""
        _, suffix = split_layer_name(megatron_name)
        if suffix == OUTPUT and self.dims.tie_embeddings:
            return []
        names = self.hf_sources(megatron_name)
        d = self.dims
        if suffix in (QKV_WEIGHT, QKV_BIAS):
            parts = split_qkv(tensor, d.num_heads, d.num_query_groups, d.head_dim)
        elif suffix == FC1_WEIGHT:
            parts = split_gate_up(tensor)
        elif suffix in (EMBEDDING, OUTPUT):
            if tensor.shape[0] < d.vocab_size:
                raise ConversionError(
                    f"{megatron_name}: {tensor.shape[0]} rows < vocab_size {d.vocab_size}"
                )
            parts = (tensor[: d.vocab_size],)
        else:
            parts = (tensor,)
        return list(zip(names, parts, strict=True))

    def row_pieces(self, megatron_name: str) -> list[RowPiece]:
        """The fused layout of ``megatron_name`` as row copies (the streaming converter reads and
        writes these in place, with no intermediate tensors).

        Same layout as :meth:`hf_to_megatron`: per query group its q rows, k rows, v rows for
        ``linear_qkv``; gate then up for ``linear_fc1``; the vocab rows (padding rows are not
        covered: zeros) for the embedding and output layer; one full piece otherwise.
        """
        _, suffix = split_layer_name(megatron_name)
        names, d = self.hf_sources(megatron_name), self.dims
        if suffix in (QKV_WEIGHT, QKV_BIAS):
            per_group = d.num_heads // d.num_query_groups
            q_rows, stride = per_group * d.head_dim, (per_group + 2) * d.head_dim
            pieces = []
            for group in range(d.num_query_groups):
                base = group * stride
                pieces += [
                    RowPiece(names[0], group * q_rows, base, q_rows),
                    RowPiece(names[1], group * d.head_dim, base + q_rows, d.head_dim),
                    RowPiece(names[2], group * d.head_dim, base + q_rows + d.head_dim, d.head_dim),
                ]
            return pieces
        if suffix == FC1_WEIGHT:
            ffn = d.ffn_hidden_size
            return [RowPiece(names[0], 0, 0, ffn), RowPiece(names[1], 0, ffn, ffn)]
        if suffix in (EMBEDDING, OUTPUT):
            return [RowPiece(names[0], 0, 0, d.vocab_size)]
        # Norms, o_proj, down_proj and the final norm all have hidden_size rows.
        return [RowPiece(names[0], 0, 0, d.hidden_size)]


@dataclass(frozen=True, slots=True)
class RowPiece:
    """Rows ``[hf_row, hf_row + num_rows)`` of HF tensor ``hf_name`` are rows
    ``[megatron_row, megatron_row + num_rows)`` of the Megatron tensor (dim 0)."""

    hf_name: str
    hf_row: int
    megatron_row: int
    num_rows: int


class Qwen2Adapter(Adapter):
    """Qwen2 / Qwen2.5: QKV bias always, no other biases, tied or untied embeddings."""

    @staticmethod
    def qkv_bias(config: Mapping) -> bool:
        return True

    @staticmethod
    def check_config(config: Mapping) -> None:
        if config.get("use_sliding_window") and config.get("sliding_window"):
            raise ConversionError(
                "config.use_sliding_window=True is not supported by the Megatron model"
            )


class LlamaAdapter(Adapter):
    """Llama 2/3: no biases (``attention_bias`` would also bias ``o_proj``, which the Megatron
    model here does not have, so it is refused like ``mlp_bias``)."""

    @staticmethod
    def qkv_bias(config: Mapping) -> bool:
        return False

    @staticmethod
    def check_config(config: Mapping) -> None:
        for field in ("attention_bias", "mlp_bias"):
            if config.get(field):
                raise ConversionError(f"config.{field}=True is not supported for llama")


ADAPTERS: dict[str, type[Adapter]] = {"qwen2": Qwen2Adapter, "llama": LlamaAdapter}


def adapter_for(config: Mapping) -> Adapter:
    """The family adapter for an HF config dict (validated; see :meth:`ModelDims.from_hf_config`)."""
    dims = ModelDims.from_hf_config(config)
    return ADAPTERS[dims.model_type](dims)
