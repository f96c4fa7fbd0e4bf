"""Prompt data: readers (DAPO-Math-17k parquet, jsonl, AIME), chat templates, resumable order.

The synthetic arithmetic task and its locally trained tokenizer live in ``synthetic`` and
``local_tokenizer`` (imported on demand: they pull in sentencepiece and transformers).
"""

from megatron_fipo.data.prompts import (
    DataError,
    LoadReport,
    MalformedRow,
    PromptExample,
    load_from_config,
    load_prompt_files,
    read_prompt_file,
)
from megatron_fipo.data.sampler import GroupBuffer, PromptDataLoader, PromptSampler
from megatron_fipo.data.templates import (
    TokenizedPrompt,
    encode_prompt,
    load_tokenizer,
    render_prompt,
    tokenize_prompts,
)

__all__ = [
    "DataError",
    "GroupBuffer",
    "LoadReport",
    "MalformedRow",
    "PromptDataLoader",
    "PromptExample",
    "PromptSampler",
    "TokenizedPrompt",
    "encode_prompt",
    "load_from_config",
    "load_prompt_files",
    "load_tokenizer",
    "read_prompt_file",
    "render_prompt",
    "tokenize_prompts",
]
