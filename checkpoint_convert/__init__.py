"""Hugging Face <-> Megatron-core checkpoint conversion (``fipo-convert``).

- :mod:`checkpoint_convert.adapters`: per-family name mapping and fused layouts (QKV grouping,
  gate/up, vocab padding), shared with the rollout weight sync;
- :mod:`checkpoint_convert.convert`: streaming ``hf_to_megatron`` / ``megatron_to_hf``;
- :mod:`checkpoint_convert.verify`: logits of transformers vs the Megatron model under TP/PP;
- :mod:`checkpoint_convert.safetensors_io`, :mod:`checkpoint_convert.megatron_io`: the
  tensor-at-a-time readers and writers underneath.
"""
