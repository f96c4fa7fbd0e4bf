"""Prompt rendering and tokenization: chat messages -> text -> prompt token ids.

When ``apply_chat_template`` is on and the tokenizer carries a chat template, the template renders
the messages (``tokenizer.apply_chat_template(..., add_generation_prompt=True)``). Otherwise the
plain fallback format below is used, so a base model without a template still sees a stable,
documented layout::

    System: <system content>

    User: <user content>

    Assistant:

(one ``Role: content`` block per message, blocks separated by a blank line, then ``Assistant:``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from megatron_fipo.data.prompts import PromptExample

FALLBACK_GENERATION_PROMPT = "Assistant:"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def has_chat_template(tokenizer: Any) -> bool:
    """Whether ``tokenizer`` (a transformers tokenizer) carries a chat template."""
    return bool(getattr(tokenizer, "chat_template", None))


def render_fallback(messages: Sequence[dict[str, str]]) -> str:
    """The plain fallback format (module docstring), ending with the generation prompt."""
    blocks = [f"{m['role'].capitalize()}: {m['content']}" for m in messages]
    return "\n\n".join([*blocks, FALLBACK_GENERATION_PROMPT])


def render_prompt(
    tokenizer: Any, messages: Sequence[dict[str, str]], apply_chat_template: bool = True
) -> str:
    """Prompt text for generation: the tokenizer's chat template when wanted and present."""
    if apply_chat_template and has_chat_template(tokenizer):
        return tokenizer.apply_chat_template(
            list(messages), tokenize=False, add_generation_prompt=True
        )
    return render_fallback(messages)


def encode_prompt(
    tokenizer: Any, messages: Sequence[dict[str, str]], apply_chat_template: bool = True
) -> list[int]:
    """Prompt token ids [P]. Chat templates write their own special tokens, so none are added."""
    text = render_prompt(tokenizer, messages, apply_chat_template)
    templated = apply_chat_template and has_chat_template(tokenizer)
    return list(tokenizer(text, add_special_tokens=not templated)["input_ids"])


@dataclass(frozen=True, slots=True)
class TokenizedPrompt:
    """A prompt ready for an engine."""

    example: PromptExample
    token_ids: tuple[int, ...]
    """Prompt token ids [P], 1 <= P <= max_prompt_length."""


def tokenize_prompts(
    examples: Sequence[PromptExample],
    tokenizer: Any,
    *,
    max_prompt_length: int,
    apply_chat_template: bool = True,
) -> tuple[list[TokenizedPrompt], list[PromptExample]]:
    """Tokenize every example; returns (kept, too_long) where too_long exceed max_prompt_length."""
    kept, too_long = [], []
    for example in examples:
        ids = encode_prompt(tokenizer, example.messages, apply_chat_template)
        if len(ids) > max_prompt_length:
            too_long.append(example)
        else:
            kept.append(TokenizedPrompt(example=example, token_ids=tuple(ids)))
    return kept, too_long


def tokenizer_directory(path: str | Path) -> Path:
    """The HF tokenizer directory for ``path``: the directory itself, or the folder holding a file.

    ``model.tokenizer_path`` may name a directory or a file inside one (e.g. the sentencepiece
    ``tokenizer.model`` that :mod:`megatron_fipo.data.synthetic` saves next to its HF files).
    """
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    if not path.exists():
        raise FileNotFoundError(f"tokenizer path {path} does not exist")
    if not any((folder / name).is_file() for name in _TOKENIZER_FILES):
        raise ValueError(
            f"tokenizer path {path}: {folder} holds none of {list(_TOKENIZER_FILES)}; "
            "save the tokenizer with transformers' save_pretrained there"
        )
    return folder


# Tokenizer classes that are a plain tokenizer.json (e.g. our local sentencepiece tokenizer).
_PLAIN_TOKENIZER_CLASSES = ("TokenizersBackend", "PreTrainedTokenizerFast")


def load_tokenizer(path: str | Path) -> Any:
    """The tokenizer in :func:`tokenizer_directory` (local files only).

    ``AutoTokenizer`` picks the model family's tokenizer class from a ``config.json`` beside
    the files even when ``tokenizer_config.json`` names a plain ``tokenizer.json`` tokenizer
    (transformers 5), which would replace our tokenizer's normalizer and decoder with
    Qwen2's byte-level ones. A plain one is therefore loaded by that class directly.
    """
    import json

    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    folder = tokenizer_directory(path)
    config_file = folder / "tokenizer_config.json"
    declared = (
        json.loads(config_file.read_text()).get("tokenizer_class")
        if config_file.is_file()
        else None
    )
    if declared in _PLAIN_TOKENIZER_CLASSES:
        return PreTrainedTokenizerFast.from_pretrained(str(folder), local_files_only=True)
    return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
