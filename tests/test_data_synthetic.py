"""Synthetic arithmetic task and the locally trained tokenizer (real sentencepiece + transformers)."""

from __future__ import annotations

import json
import re

import pytest

from megatron_fipo.data import load_prompt_files, load_tokenizer, tokenize_prompts
from megatron_fipo.data.synthetic import (
    SyntheticTaskConfig,
    encode_sft_pair,
    generate_rows,
    prepare_synthetic,
    read_solutions,
)
from megatron_fipo.data.templates import render_prompt

SMALL = SyntheticTaskConfig(num_train=300, num_eval=40, answer_style="mixed", seed=5)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    return prepare_synthetic(tmp_path_factory.mktemp("synthetic"), SMALL)


@pytest.fixture(scope="module")
def tokenizer(prepared):
    return load_tokenizer(prepared.tokenizer_dir / "tokenizer.model")


def _expression(content: str) -> str:
    return re.match(r"Compute (.+?)\. ", content).group(1)


def test_rows_are_seeded_correct_and_split_disjoint():
    train, evaluation = generate_rows(SMALL)
    assert (train, evaluation) == generate_rows(SMALL)
    assert generate_rows(SyntheticTaskConfig(num_train=300, num_eval=40, seed=6))[0] != train
    expressions = [_expression(r["prompt"][0]["content"]) for r in train + evaluation]
    assert len(set(expressions)) == len(expressions)
    for row, expression in zip(train + evaluation, expressions, strict=True):
        answer = row["reward_model"]["ground_truth"]
        assert answer == str(eval(expression))  # noqa: S307 - digits and + - * only
        final = row["extra_info"]["solution"].splitlines()[-1]
        assert final in (f"Answer: {answer}", f"\\boxed{{{answer}}}")
        asks_boxed = "boxed" in row["prompt"][0]["content"]
        assert asks_boxed == final.startswith("\\boxed")
    kinds = {re.sub(r"\d+", "n", e) for e in expressions}
    assert kinds == {"n + n", "n - n", "n * n", "n + n * n"}


def test_files_read_back_through_the_dapo_reader(prepared):
    report = load_prompt_files([prepared.train_file, prepared.eval_file], on_malformed_row="error")
    assert len(report.examples) == 340 and report.num_skipped == 0
    solutions = read_solutions(prepared.train_file)
    assert solutions[0].endswith(
        report.examples[0].ground_truth + ("}" * ("boxed" in solutions[0]))
    )


def test_tokenizer_loads_with_autotokenizer_and_splits_digits(prepared, tokenizer):
    assert len(tokenizer) <= SMALL.vocab_size <= 512
    assert tokenizer.eos_token == "</s>" and tokenizer.pad_token_id == 0
    pieces = tokenizer.convert_ids_to_tokens(tokenizer("Compute 1234 + 56.")["input_ids"])
    digits = [p.strip("\u2581") for p in pieces if any(c.isdigit() for c in p)]
    assert digits == list("123456")  # one token per digit
    text = "45 * 12 = 540\nAnswer: 540 (é)"
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text  # byte fallback round trip


def test_tokenizer_matches_the_sentencepiece_model(prepared, tokenizer):
    import sentencepiece as spm

    processor = spm.SentencePieceProcessor(
        model_file=str(prepared.tokenizer_dir / "tokenizer.model")
    )
    rows = [json.loads(line) for line in prepared.train_file.read_text().splitlines()[:200]]
    texts = [r["prompt"][0]["content"] for r in rows] + [r["extra_info"]["solution"] for r in rows]
    for text in texts + ["odd  spacing\tand ünïcode 007"]:
        assert tokenizer(text, add_special_tokens=False)["input_ids"] == processor.encode(text)


def test_chat_template_renders_role_markers(prepared, tokenizer):
    report = load_prompt_files([prepared.eval_file])
    example = report.examples[0]
    text = render_prompt(tokenizer, example.messages)
    assert text == f"<|user|>{example.messages[0]['content']}\n<|assistant|>"
    kept, too_long = tokenize_prompts(report.examples, tokenizer, max_prompt_length=64)
    assert len(kept) == 40 and not too_long
    assert kept[0].token_ids[0] == tokenizer.convert_tokens_to_ids("<|user|>")
    kept, too_long = tokenize_prompts(report.examples, tokenizer, max_prompt_length=8)
    assert not kept and len(too_long) == 40


def test_prepare_reuses_existing_files(prepared):
    stamp = prepared.train_file.stat().st_mtime_ns
    again = prepare_synthetic(prepared.train_file.parent.parent, SMALL)
    assert again == prepared and prepared.train_file.stat().st_mtime_ns == stamp


def test_bad_synthetic_settings_are_rejected():
    with pytest.raises(ValueError, match="kinds must be"):
        SyntheticTaskConfig(kinds=("div",))
    with pytest.raises(ValueError, match="distinct problems"):
        generate_rows(SyntheticTaskConfig(num_train=50, num_eval=5, max_operand=2, max_factor=2))


def test_sft_pairs_fit_the_tiny_length_budget(prepared, tokenizer):
    report = load_prompt_files([prepared.train_file])
    solutions = read_solutions(prepared.train_file)
    lengths = []
    for example in report.examples:
        prompt, response = encode_sft_pair(tokenizer, example.messages, solutions[example.row])
        assert response[-1] == tokenizer.eos_token_id
        assert tokenizer.decode(response[:-1]) == solutions[example.row]
        lengths.append((len(prompt), len(response)))
    # tiny-cpu.yaml: prompts <= 64 tokens; responses stay clear of the overlong buffer (64 - 16).
    assert max(p for p, _ in lengths) <= 64 and max(r for _, r in lengths) <= 48


def test_tokenizer_beside_a_qwen2_model_config_keeps_its_own_pieces(prepared, tokenizer, tmp_path):
    """An HF checkpoint directory (config.json of model_type qwen2 + our tokenizer files, as the
    warm start and megatron-to-hf write it) must load the same tokenizer, not Qwen2's."""
    import json

    from megatron_fipo.data.templates import load_tokenizer

    tokenizer.save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen2"}))
    loaded = load_tokenizer(tmp_path)
    text = "Compute 8 * 7.\nAnswer: 56"
    assert loaded(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert loaded.decode(tokenizer(text)["input_ids"]) == text
