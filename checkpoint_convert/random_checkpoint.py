"""Random-weight HF checkpoints of any size, written tensor by tensor (tests and benchmarks).

Small models for numeric tests are better made with transformers (``from_config`` +
``save_pretrained``); this writer exists for the large ones: it never holds more than one
tensor, so a checkpoint bigger than RAM can be produced to measure streaming conversion.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from checkpoint_convert.adapters import adapter_for
from checkpoint_convert.safetensors_io import INDEX_FILE, PlannedTensor, ShardWriter, plan_shards


def qwen2_config(
    *,
    num_layers: int,
    hidden_size: int,
    ffn_hidden_size: int,
    vocab_size: int,
    num_heads: int,
    num_kv_heads: int,
    tie_embeddings: bool = False,
) -> dict:
    """A Qwen2 ``config.json`` dict with the given sizes."""
    return {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "hidden_act": "silu",
        "hidden_size": hidden_size,
        "intermediate_size": ffn_hidden_size,
        "num_hidden_layers": num_layers,
        "num_attention_heads": num_heads,
        "num_key_value_heads": num_kv_heads,
        "vocab_size": vocab_size,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "tie_word_embeddings": tie_embeddings,
        "use_sliding_window": False,
    }


def write_random_checkpoint(
    out_dir: Path,
    config: dict,
    *,
    dtype: torch.dtype = torch.bfloat16,
    max_shard_bytes: int = 1 << 30,
    seed: int = 0,
) -> int:
    """Write ``config.json`` and random safetensors shards (+ index) to ``out_dir``.

    Returns the number of weight bytes. Values are ``N(0, 0.02)`` (norm weights 1), drawn one
    tensor at a time.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    planned = [
        PlannedTensor(name, dtype, shape) for name, shape in adapter_for(config).hf_shapes().items()
    ]
    shards = plan_shards(planned, max_shard_bytes)
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    generator = torch.Generator().manual_seed(seed)
    for file_name, shard in zip(names, shards):
        writer = ShardWriter(out_dir / file_name, shard)
        for item in shard:
            if len(item.shape) == 1:
                tensor = torch.ones(item.shape, dtype=dtype)
            else:
                tensor = torch.empty(item.shape, dtype=torch.float32)
                tensor = tensor.normal_(0.0, 0.02, generator=generator).to(dtype)
            writer.write(item.name, tensor)
        writer.close()
    index = {
        "metadata": {"total_size": sum(p.nbytes for p in planned)},
        "weight_map": {p.name: names[i] for i, shard in enumerate(shards) for p in shard},
    }
    (out_dir / INDEX_FILE).write_text(json.dumps(index, indent=2))
    return index["metadata"]["total_size"]
