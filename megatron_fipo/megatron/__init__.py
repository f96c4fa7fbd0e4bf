"""Everything Megatron-core: the actor that computes old log-probs and FIPO updates.

Modules (importing this package does not import megatron-core):

- :mod:`cpu_compat`: the one place Megatron's CUDA calls are redirected (CPU + gloo only).
- :mod:`distributed`: :func:`init_distributed` (from the ``parallelism`` config section),
  :func:`destroy`.
- :mod:`model`: ``GPTModel`` from an HF Qwen2 / Llama config (``transformer_config_from_hf``,
  ``build_gpt_model``, ``build_model_chunks``, ``padded_vocab_size``).
- :mod:`context_parallel`, :mod:`cp_attention`, :mod:`cp_scan`: zigzag CP layout, CP attention
  for the local spec, the CP future-KL scan.
- :mod:`logprobs`: vocab-parallel log-probs / entropy, chunked along the sequence.
- :mod:`actor`: :class:`MegatronActor` (``compute_log_probs``, ``train_step``, ``save`` /
  ``load``, ``named_parameters_for_sync``), built from the ``model`` / ``parallelism`` /
  ``optimizer`` config sections.
- :mod:`checkpoint`: distributed checkpoints and :class:`ParamShard` for weight sync.
- :mod:`check_parallel`: ``python -m megatron_fipo.megatron.check_parallel --tp 2 --pp 2``.
"""
