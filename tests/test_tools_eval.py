"""fipo-eval end to end on a tiny random Qwen2 with a locally built tokenizer.

The vocabulary is tiny on purpose ("Answer: ", "1", "2", newline, specials): a random model then
writes "Answer: <digits>" lines often enough that some samples are right and some wrong, so the
estimators see non-trivial counts. The checks recompute every reported number from the recorded
samples with the estimators of tools/eval_metrics.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from megatron_fipo.rewards import extract_answer
from tools.eval import EvalConfig, is_megatron_checkpoint, main, resolve_checkpoint
from tools.eval_metrics import majority_vote, overall_metrics, pass_at_k, problem_metrics

VOCAB = ["<pad>", "<unk>", "</s>", "Answer: ", "1", "2", "\n"]
PROBLEMS = [
    {"problem": "What is 1+1?", "answer": "2"},
    {"problem": "What is 3-2?", "answer": "1"},
    {"problem": "What is 6*2?", "answer": "12"},
]


def build_tokenizer(directory: Path):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.WordLevel({t: i for i, t in enumerate(VOCAB)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(r"Answer: |[\s\S]"), "isolated")
    tokenizer.decoder = decoders.Fuse()  # characters back together, no spaces between
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<pad>", unk_token="<unk>", eos_token="</s>"
    )
    wrapped.save_pretrained(directory)
    return wrapped


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    root = tmp_path_factory.mktemp("fipo_eval")
    model_dir = root / "model"
    tokenizer = build_tokenizer(model_dir)
    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=len(VOCAB),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=128,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    Qwen2ForCausalLM(config).save_pretrained(model_dir)
    data = root / "aime.jsonl"
    data.write_text("".join(json.dumps(p) + "\n" for p in PROBLEMS))
    return root, model_dir, data


def run(argv) -> dict:
    main([str(a) for a in [*argv, "--reward-workers", 1]])
    out = Path(argv[argv.index("--output-dir") + 1])
    return json.loads((out / "results.json").read_text())


def read_samples(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]


def test_eval_numbers_equal_estimators_on_recorded_samples(workspace):
    root, model_dir, data = workspace
    out = root / "out_hf"
    n = 6
    results = run(
        [model_dir, "--data", data, "--output-dir", out, "-n", n, "--top-p", "1.0"]
        + ["--max-new-tokens", 10, "--pass-k", 1, 2, 4, 8, "--seed", 3]
    )
    assert (out / "results.md").read_text().startswith("# fipo-eval")
    samples = read_samples(out)
    assert len(samples) == len(PROBLEMS) * n
    # The answers are integers, so correctness is integer equality of the extracted answer.
    for row in samples:
        assert row["extracted_answer"] == extract_answer(row["response"])
        answer = row["extracted_answer"]
        expected = (
            answer is not None and answer.isdigit() and int(answer) == int(row["ground_truth"])
        )
        assert row["correct"] == expected
        assert 1 <= row["num_tokens"] <= 10
        assert (row["finish_reason"] == "length") == (row["num_tokens"] == 10)
    num_correct = sum(row["correct"] for row in samples)
    assert 0 < num_correct < len(samples), "the tiny model should be right sometimes, not always"

    by_problem = [samples[i * n : (i + 1) * n] for i in range(len(PROBLEMS))]
    expected_problems = [
        problem_metrics(
            rows[0]["problem_id"],
            [r["correct"] for r in rows],
            [r["extracted_answer"] for r in rows],
            [r["num_tokens"] for r in rows],
            [r["finish_reason"] == "length" for r in rows],
            [1, 2, 4, 8],
        )
        for rows in by_problem
    ]
    for reported, expected, rows in zip(results["problems"], expected_problems, by_problem):
        assert reported["num_correct"] == expected.num_correct
        assert reported["accuracy"] == pytest.approx(expected.accuracy)
        # JSON keys are strings; k = 8 > n is left out.
        assert set(reported["pass_at"]) == {"1", "2", "4"}
        for k in (1, 2, 4):
            assert reported["pass_at"][str(k)] == pytest.approx(
                pass_at_k(n, expected.num_correct, k)
            )
        assert reported["voted_answer"] == majority_vote([r["extracted_answer"] for r in rows])[0]
        assert reported["cons_correct"] == expected.cons_correct
        assert reported["lengths"] == pytest.approx(expected.lengths)
    expected_overall = overall_metrics(
        expected_problems,
        [r["num_tokens"] for r in samples],
        [r["finish_reason"] == "length" for r in samples],
    )
    assert results["overall"] == pytest.approx(expected_overall)
    assert results["overall"][f"avg@{n}"] == pytest.approx(num_correct / len(samples))
    assert f"| avg@{n} | {expected_overall[f'avg@{n}']:.4f} |" in (out / "results.md").read_text()


def test_megatron_checkpoint_is_exported_and_gives_the_same_samples(workspace):
    from checkpoint_convert.convert import hf_to_megatron

    root, model_dir, data = workspace
    megatron_dir = hf_to_megatron(model_dir, root / "megatron", progress=False)
    assert is_megatron_checkpoint(megatron_dir)
    common = ["--data", data, "-n", 2, "--max-new-tokens", 6, "--max-problems", 1, "--seed", 1]
    hf = run([model_dir, "--output-dir", root / "greedy_hf", *common])
    meg = run(
        [megatron_dir, "--output-dir", root / "greedy_meg", "--tokenizer", model_dir, *common]
    )
    assert meg["model_dir"] == str(root / "greedy_meg" / "hf_export")
    assert [r["response"] for r in read_samples(root / "greedy_meg")] == [
        r["response"] for r in read_samples(root / "greedy_hf")
    ]
    assert meg["overall"] == hf["overall"]


def test_bad_inputs_name_the_problem(tmp_path):
    base = dict(checkpoint=str(tmp_path), data_files=("x.jsonl",), output_dir=str(tmp_path))
    with pytest.raises(ValueError, match="engine"):
        EvalConfig(**base, engine="vllm")
    with pytest.raises(ValueError, match="num_samples"):
        EvalConfig(**base, num_samples=0)
    with pytest.raises(ValueError, match="prompt_template"):
        EvalConfig(**base, prompt_template="no placeholder")
    with pytest.raises(ValueError, match="data_files"):
        EvalConfig(**{**base, "data_files": ()})
    with pytest.raises(ValueError, match="neither an HF model directory"):
        resolve_checkpoint(EvalConfig(**base))
    with pytest.raises(FileNotFoundError):
        resolve_checkpoint(EvalConfig(**{**base, "checkpoint": str(tmp_path / "missing")}))


def test_dapo_parquet_layout_with_prompt_template(workspace):
    import pyarrow as pa
    import pyarrow.parquet as pq

    root, model_dir, _ = workspace
    rows = [
        {
            "data_source": "aime",
            "prompt": [{"role": "user", "content": p["problem"]}],
            "ability": "MATH",
            "reward_model": {"ground_truth": p["answer"], "style": "rule"},
            "extra_info": {"index": i},
        }
        for i, p in enumerate(PROBLEMS[:2])
    ]
    path = root / "dapo.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    out = root / "out_parquet"
    results = run(
        [model_dir, "--data", path, "--output-dir", out, "-n", 2, "--max-new-tokens", 4]
        + ["--prompt-template", "dapo", "--pass-k", 1, 2]
    )
    assert [p["problem_id"] for p in results["problems"]] == [
        f"{path.resolve()}#{i}" for i in (0, 1)
    ]
    assert [r["ground_truth"] for r in read_samples(out)] == ["2", "2", "1", "1"]
    assert results["config"]["prompt_template"] == "dapo"
    assert set(results["overall"]) >= {"avg@2", "pass@1", "pass@2", "cons@2"}
