"""Model provider and CPU compatibility: HF config -> TransformerConfig mapping, vocab padding,
unsupported inputs, idempotent CPU redirections (single process, no process group)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from megatron_fipo.config import ConfigError, ModelConfig
from megatron_fipo.megatron.check_parallel import layout
from megatron_fipo.megatron.distributed import data_parallel_size
from megatron_fipo.megatron.model import (
    layer_spec,
    padded_vocab_size,
    rope_scaling_factor,
    transformer_config_from_hf,
)

QWEN = dict(
    model_type="qwen2", vocab_size=151936, hidden_size=896, intermediate_size=4864,
    num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2, rms_norm_eps=1e-6,
    rope_theta=1000000.0, tie_word_embeddings=True,
)  # fmt: skip
LLAMA = dict(
    model_type="llama", vocab_size=128256, hidden_size=256, intermediate_size=512,
    num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=4, rms_norm_eps=1e-5,
    rope_theta=500000.0, head_dim=32, attention_bias=False,
    rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                  "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
)  # fmt: skip


def _cpu_model(**fields) -> ModelConfig:
    """The model section with the local spec (the checkpoint path is never read here)."""
    return ModelConfig(hf_model_path="unused", **{"dtype": "float32", "spec": "local", **fields})


@pytest.mark.parametrize(
    "vocab,tp,expected",
    [(151936, 1, 151936), (151936, 8, 152576), (300, 1, 384), (300, 2, 512), (256, 2, 256)],
)
def test_padded_vocab_size(vocab, tp, expected):
    assert padded_vocab_size(vocab, tp) == expected
    assert expected % (128 * tp) == 0


def test_padded_vocab_size_rejects_bad_input():
    with pytest.raises(ValueError, match="vocab_size"):
        padded_vocab_size(0, 1)


def test_qwen2_mapping():
    config = transformer_config_from_hf(QWEN, _cpu_model(), layout(tp=2))
    assert (config.num_layers, config.hidden_size, config.ffn_hidden_size) == (24, 896, 4864)
    assert (config.num_attention_heads, config.num_query_groups, config.kv_channels) == (14, 2, 64)
    assert config.add_qkv_bias and not config.add_bias_linear and config.gated_linear_unit
    assert config.normalization == "RMSNorm" and config.tensor_model_parallel_size == 2
    assert config.params_dtype == torch.float32 and not config.sequence_parallel


def test_llama_mapping_and_rope_scaling():
    config = transformer_config_from_hf(LLAMA, _cpu_model(dtype="bfloat16"), layout())
    assert not config.add_qkv_bias and config.kv_channels == 32 and config.bf16
    assert rope_scaling_factor(LLAMA) == 8.0
    assert rope_scaling_factor(QWEN) is None


def test_unsupported_inputs_are_named():
    with pytest.raises(ValueError, match="model_type"):
        transformer_config_from_hf({**QWEN, "model_type": "gpt2"}, _cpu_model(), layout())
    with pytest.raises(ValueError, match="rope_scaling"):
        rope_scaling_factor({**LLAMA, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}})
    with pytest.raises(ConfigError, match="model.fp8='hybrid' needs model.spec='te'"):
        _cpu_model(fp8="hybrid")
    with pytest.raises(ValueError, match="spec"):
        layer_spec("fast")
    with pytest.raises(ValueError, match="world size 6 is not divisible"):
        data_parallel_size(layout(tp=2, pp=2), 6)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU path")
def test_te_spec_names_the_extra():
    pytest.importorskip("megatron.core")
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match=r"megatron_fipo\[gpu\]"):
            layer_spec("te")


_CPU_COMPAT_SCRIPT = """
import torch
from megatron_fipo.megatron import cpu_compat
assert cpu_compat.apply() and cpu_compat.apply() and cpu_compat.is_applied()
assert torch.cuda.current_device() == 0
torch.cuda.manual_seed(3)
state = torch.cuda.get_rng_state()
cpu_state = torch.get_rng_state()
assert torch.empty(2, device="cuda").device.type == "cpu"
assert torch.ones(2).cuda().device.type == "cpu"
assert torch.ones(2).to("cuda").device.type == "cpu"
assert torch.ones(2).type() == "torch.cuda.FloatTensor"
torch.cuda.manual_seed(4)
torch.cuda.set_rng_state(state)
assert torch.equal(torch.cuda.get_rng_state(), state)
assert torch.equal(torch.get_rng_state(), cpu_state)  # the CPU stream is left alone
print("ok")
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="redirections apply only without CUDA")
def test_cpu_compat_is_idempotent_and_redirects():
    # In a child: apply() installs a process-wide mode that must not leak into other tests.
    out = subprocess.run(
        [sys.executable, "-c", _CPU_COMPAT_SCRIPT], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-2000:]


def test_sequence_parallel_needs_the_te_spec():
    hf = dict(
        model_type="qwen2",
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    parallel = layout(tp=2, sequence_parallel=True)
    with pytest.raises(ConfigError, match="sequence_parallel=true needs model.spec='te'"):
        transformer_config_from_hf(hf, _cpu_model(), parallel)
    with pytest.raises(ConfigError, match="sequence_parallel=true needs tensor_model_parallel"):
        layout(sequence_parallel=True)


def test_rope_base_and_scaling_from_transformers_5_configs():
    """transformers 5 keeps the RoPE base in ``rope_parameters`` (no ``rope_theta`` attribute):
    a Qwen2.5-style base of 1e6 must reach Megatron, not the 10000 fallback."""
    from transformers import AutoConfig

    from megatron_fipo.megatron.model import rope_theta

    fields = {k: v for k, v in QWEN.items() if k != "model_type"}
    config = AutoConfig.for_model("qwen2", **fields)
    assert rope_theta(config) == 1e6
    assert rope_theta(config.to_dict()) == 1e6  # what a transformers-5 config.json holds
    assert rope_theta({"model_type": "qwen2"}) == 10000.0
    assert rope_scaling_factor(config) is None
    scaled = {
        "model_type": "llama",
        "rope_parameters": {**LLAMA["rope_scaling"], "rope_theta": 5e5},
    }
    assert rope_scaling_factor(scaled) == 8.0 and rope_theta(scaled) == 5e5
