"""``fipo-eval``: avg@k / pass@k / cons@k of a checkpoint on an AIME-format dataset.

For every problem the tool samples ``--num-samples`` (n) responses through a rollout engine (the
embedded HF engine on CPU, SGLang on GPU with ``--engine sglang``; the same requests and the same
scoring either way), decodes them, extracts and checks the final answer with the math reward, and
reports (see ``tools/eval_metrics.py`` for the estimators):

- ``avg@n``: mean accuracy over all samples (the paper's AIME 2024 avg@32, top_p 0.7);
- ``pass@k``: unbiased estimator for each k in ``--pass-k`` that is <= n;
- ``cons@n``: majority vote over the extracted answers;
- response length statistics (tokens) and the clip ratio (responses cut at max new tokens).

Inputs: an HF checkpoint directory (``config.json`` + safetensors), or a Megatron ``torch_dist``
checkpoint, which is first exported to HF with ``checkpoint_convert`` (``--hf-config-dir`` names
the config / tokenizer source when the checkpoint lacks one). Data: jsonl with ``problem`` /
``answer`` or the DAPO / verl parquet layout (``prompt`` messages, ``reward_model.ground_truth``).

Outputs in ``--output-dir``: ``samples.jsonl`` (every sample: problem, sample index, response
text, token count, finish reason, extracted answer, correctness), ``results.json`` (settings,
overall and per-problem metrics) and ``results.md`` (Markdown tables).
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tools.eval_metrics import ProblemMetrics, overall_metrics, problem_metrics

logger = logging.getLogger("fipo-eval")

PROMPT_TEMPLATES = {
    "none": "{problem}",
    # The DAPO-Math-17k instruction (its AIME eval parquet carries the same wording).
    "dapo": (
        "Solve the following math problem step by step. The last line of your response should "
        "be of the form Answer: $Answer (without quotes) where $Answer is the answer to the "
        'problem.\n\n{problem}\n\nRemember to put your answer on its own line after "Answer:".'
    ),
    "boxed": "{problem}\n\nPlease reason step by step, and put your final answer within \\boxed{{}}.",
}


@dataclass(kw_only=True, slots=True)
class EvalConfig:
    """Settings of one evaluation."""

    checkpoint: str
    """HF model directory, or a Megatron torch_dist checkpoint directory (exported first)."""
    data_files: tuple[str, ...]
    """jsonl / parquet files in the AIME (problem, answer) or DAPO (prompt, reward_model) layout."""
    output_dir: str
    tokenizer: str = ""
    """Tokenizer directory; empty: the (exported) HF checkpoint directory."""
    hf_config_dir: str = ""
    """config.json + tokenizer source for exporting a Megatron checkpoint (empty: its own)."""
    engine: str = "hf"
    """"hf" (embedded transformers engine, CPU default) or "sglang" (GPU servers)."""
    num_samples: int = 32
    """n: samples per problem."""
    temperature: float = 1.0
    top_p: float = 0.7
    top_k: int = -1
    max_new_tokens: int = 20480
    max_prompt_length: int = 2048
    """Longer prompts are skipped (and listed in results.json)."""
    pass_k: tuple[int, ...] = (1, 2, 4, 8, 16, 32)
    """k values of pass@k; those above num_samples are left out."""
    prompt_template: str = "none"
    """Wraps each user message: one of PROMPT_TEMPLATES or a string with "{problem}"."""
    apply_chat_template: bool = True
    """Render prompts with the tokenizer's chat template when it has one."""
    max_problems: int = 0
    """Evaluate only the first N problems (0: all)."""
    seed: int = 0
    """Request seeds are seed * 10**6 + problem_index * num_samples + sample_index."""
    dtype: str = "float32"
    """HF engine parameter dtype (float32 / bfloat16 / float16); SGLang uses sglang_dtype."""
    max_batch_size: int = 64
    """HF engine: requests decoded together."""
    problems_per_call: int = 8
    """Problems whose samples go to the engine in one generate call (progress granularity)."""
    sglang_tp_size: int = 1
    sglang_mem_fraction: float = 0.8
    sglang_dtype: str = "bfloat16"
    reward_timeout_s: float = 10.0
    """Per-sample deadline of the math-verify comparison."""
    reward_workers: int = 2
    """math-verify worker processes (each ~100 MB)."""

    def __post_init__(self) -> None:
        if self.engine not in ("hf", "sglang"):
            raise ValueError(f"engine must be 'hf' or 'sglang', got {self.engine!r}")
        if not self.data_files:
            raise ValueError("data_files is empty: give at least one jsonl / parquet file")
        positive = ("num_samples", "max_new_tokens", "max_prompt_length", "problems_per_call")
        for name in (*positive, "reward_workers"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_problems < 0:
            raise ValueError(f"max_problems must be >= 0, got {self.max_problems}")
        if not self.pass_k or any(k < 1 for k in self.pass_k):
            raise ValueError(f"pass_k must be positive integers, got {self.pass_k}")
        template = PROMPT_TEMPLATES.get(self.prompt_template, self.prompt_template)
        if "{problem}" not in template:
            raise ValueError(
                f"prompt_template must be one of {sorted(PROMPT_TEMPLATES)} or contain "
                f"'{{problem}}', got {self.prompt_template!r}"
            )


def prompt_template_text(name_or_template: str) -> str:
    """The template string for a preset name, or the given template itself."""
    return PROMPT_TEMPLATES.get(name_or_template, name_or_template)


def is_megatron_checkpoint(path: Path) -> bool:
    """A torch_dist checkpoint: dist_checkpointing writes ``metadata.json`` + ``.metadata``."""
    return (path / ".metadata").is_file() or (
        (path / "metadata.json").is_file()
        and "sharded_backend" in (path / "metadata.json").read_text()
    )


def is_hf_checkpoint(path: Path) -> bool:
    weights = list(path.glob("*.safetensors")) + list(path.glob("pytorch_model*.bin"))
    return (path / "config.json").is_file() and bool(weights)


def resolve_checkpoint(config: EvalConfig) -> Path:
    """The HF directory to evaluate; a Megatron checkpoint is exported into the output dir."""
    path = Path(config.checkpoint)
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint {path} is not a directory")
    if is_hf_checkpoint(path):
        return path
    if not is_megatron_checkpoint(path):
        raise ValueError(
            f"checkpoint {path} is neither an HF model directory (config.json + safetensors) "
            "nor a Megatron torch_dist checkpoint (.metadata)"
        )
    from checkpoint_convert.convert import megatron_to_hf

    target = Path(config.output_dir) / "hf_export"
    logger.info("exporting Megatron checkpoint %s to HF at %s", path, target)
    hf_config_dir = Path(config.hf_config_dir) if config.hf_config_dir else None
    return megatron_to_hf(path, target, hf_config_dir=hf_config_dir, force=True, progress=False)


@dataclass(frozen=True, slots=True)
class EvalProblem:
    """One problem ready for the engine."""

    problem_id: str
    ground_truth: str
    prompt_token_ids: tuple[int, ...]


def load_problems(config: EvalConfig, tokenizer: Any) -> tuple[list[EvalProblem], list[str]]:
    """Read, template and tokenize the data; returns (problems, ids skipped as too long)."""
    from megatron_fipo.data.prompts import load_prompt_files
    from megatron_fipo.data.templates import encode_prompt

    examples = load_prompt_files(list(config.data_files), on_malformed_row="error").examples
    if config.max_problems:
        examples = examples[: config.max_problems]
    template = prompt_template_text(config.prompt_template)
    problems, too_long = [], []
    for example in examples:
        messages = [
            {**m, "content": template.format(problem=m["content"])} if m["role"] == "user" else m
            for m in example.messages
        ]
        ids = encode_prompt(tokenizer, messages, config.apply_chat_template)
        if len(ids) > config.max_prompt_length:
            too_long.append(example.id)
            continue
        problems.append(EvalProblem(example.id, example.ground_truth, tuple(ids)))
    if not problems:
        raise ValueError(
            f"no problem fits max_prompt_length={config.max_prompt_length} "
            f"({len(too_long)} too long)"
        )
    return problems, too_long


def build_engine(config: EvalConfig, model_dir: Path) -> Any:
    """The rollout engine the config names, ready to generate."""
    if config.engine == "hf":
        from megatron_fipo.rollout.hf_engine import HFEngineConfig, HFRolloutEngine

        engine_config = HFEngineConfig(
            model_path=str(model_dir),
            dtype=config.dtype,
            max_batch_size=config.max_batch_size,
            seed=config.seed,
        )
        return HFRolloutEngine(engine_config)
    from megatron_fipo.config import RolloutConfig
    from megatron_fipo.rollout.sglang_engine import SGLangEngineConfig, SGLangRolloutEngine

    # An inference-only engine: no training shares its GPUs, hence its own memory fraction.
    rollout = RolloutConfig(
        engine="sglang",
        engine_tensor_parallel_size=config.sglang_tp_size,
        mem_fraction_static=config.sglang_mem_fraction,
    )
    engine_config = SGLangEngineConfig(
        model_path=str(model_dir), rollout=rollout, dtype=config.sglang_dtype
    )
    return SGLangRolloutEngine(engine_config).start()


def stop_token_ids(tokenizer: Any, model_dir: Path) -> tuple[int, ...]:
    """EOS ids from the tokenizer and generation_config.json (SGLang and HF must agree)."""
    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    generation_config = model_dir / "generation_config.json"
    if generation_config.is_file():
        eos = json.loads(generation_config.read_text()).get("eos_token_id")
        ids.update(int(t) for t in (eos if isinstance(eos, list) else [eos]) if t is not None)
    return tuple(sorted(ids))


def generate_samples(
    engine: Any, problems: Sequence[EvalProblem], config: EvalConfig, stop_ids: tuple[int, ...]
) -> list[list[Any]]:
    """n GenerationSamples per problem, in problem order (chunks of problems_per_call)."""
    from megatron_fipo.rollout.engine import GenerationRequest, SamplingParams

    n = config.num_samples
    per_problem: list[list[Any]] = []
    started = time.perf_counter()
    for start in range(0, len(problems), config.problems_per_call):
        chunk = problems[start : start + config.problems_per_call]
        requests = [
            GenerationRequest(
                prompt_token_ids=list(problem.prompt_token_ids),
                request_id=f"{start + offset}/{j}",
                sampling=SamplingParams(
                    temperature=config.temperature,
                    top_p=config.top_p,
                    top_k=config.top_k,
                    max_new_tokens=config.max_new_tokens,
                    stop_token_ids=stop_ids,
                    seed=config.seed * 10**6 + (start + offset) * n + j,
                ),
            )
            for offset, problem in enumerate(chunk)
            for j in range(n)
        ]
        samples = engine.generate(requests)
        per_problem.extend(samples[i * n : (i + 1) * n] for i in range(len(chunk)))
        logger.info(
            "generated %d/%d problems (%.1fs)",
            len(per_problem),
            len(problems),
            time.perf_counter() - started,
        )
    return per_problem


def summarize(
    problems: Sequence[EvalProblem], records: Sequence[dict[str, Any]], config: EvalConfig
) -> tuple[dict[str, float], list[ProblemMetrics]]:
    """Overall and per-problem metrics from the sample records (problem order, n per problem)."""
    n = config.num_samples
    per_problem = []
    for index, problem in enumerate(problems):
        rows = records[index * n : (index + 1) * n]
        assert all(row["problem_id"] == problem.problem_id for row in rows)
        per_problem.append(
            problem_metrics(
                problem.problem_id,
                correct=[row["correct"] for row in rows],
                answers=[row["extracted_answer"] for row in rows],
                lengths=[row["num_tokens"] for row in rows],
                truncated=[row["finish_reason"] == "length" for row in rows],
                ks=config.pass_k,
            )
        )
    overall = overall_metrics(
        per_problem,
        [row["num_tokens"] for row in records],
        [row["finish_reason"] == "length" for row in records],
    )
    return overall, per_problem


def markdown_report(
    overall: dict[str, float], per_problem: Sequence[ProblemMetrics], config: EvalConfig
) -> str:
    """Two Markdown tables: the overall numbers, then one row per problem."""
    n = config.num_samples
    ks = [k for k in config.pass_k if k <= n]
    lines = [
        f"# fipo-eval: {config.checkpoint}",
        "",
        f"n = {n} samples per problem, temperature {config.temperature}, top_p {config.top_p}, "
        f"max new tokens {config.max_new_tokens}, engine {config.engine}",
        "",
        "| metric | value |",
        "|---|---|",
    ]
    for key, value in overall.items():
        shown = f"{value:.0f}" if key.startswith("num_") else f"{value:.4f}"
        lines.append(f"| {key} | {shown} |")
    header = ["problem", "correct", f"avg@{n}", *(f"pass@{k}" for k in ks), "voted", "cons"]
    header += ["len mean", "len max", "clipped"]
    lines += ["", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for p in per_problem:
        cells = [p.problem_id, f"{p.num_correct}/{p.num_samples}", f"{p.accuracy:.3f}"]
        cells += [f"{p.pass_at[k]:.3f}" for k in ks]
        voted = "-" if p.voted_answer is None else p.voted_answer.replace("|", "\\|")[:24]
        cells += [voted, "yes" if p.cons_correct else "no"]
        cells += [f"{p.lengths['mean']:.1f}", f"{p.lengths['max']:.0f}"]
        cells.append(f"{p.lengths['clip_ratio']:.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_outputs(
    config: EvalConfig,
    records: Sequence[dict[str, Any]],
    overall: dict[str, float],
    per_problem: Sequence[ProblemMetrics],
    extra: dict[str, Any],
) -> Path:
    """samples.jsonl, results.json and results.md in the output directory."""
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "samples.jsonl", "w", encoding="utf-8") as handle:
        for row in records:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    results = {
        "config": asdict(config),
        "overall": overall,
        "problems": [asdict(p) for p in per_problem],
        **extra,
    }
    (out / "results.json").write_text(json.dumps(results, indent=2, ensure_ascii=False))
    (out / "results.md").write_text(markdown_report(overall, per_problem, config))
    return out


def score_samples(
    problems: Sequence[EvalProblem],
    samples: Sequence[Sequence[Any]],
    tokenizer: Any,
    config: EvalConfig,
) -> list[dict[str, Any]]:
    """One record per sample (problem order): decoded text, extracted answer, correctness."""
    from megatron_fipo.rewards import MathReward

    texts, truths, rows = [], [], []
    for problem, problem_samples in zip(problems, samples):
        for index, sample in enumerate(problem_samples):
            text = tokenizer.decode(sample.response_token_ids, skip_special_tokens=True)
            texts.append(text)
            truths.append(problem.ground_truth)
            rows.append(
                {
                    "problem_id": problem.problem_id,
                    "sample_index": index,
                    "ground_truth": problem.ground_truth,
                    "response": text,
                    "num_tokens": len(sample.response_token_ids),
                    "finish_reason": sample.finish_reason,
                }
            )
    with MathReward(num_workers=config.reward_workers, timeout_s=config.reward_timeout_s) as reward:
        results = reward.score_batch(texts, truths)
    for row, result in zip(rows, results):
        row.update(extracted_answer=result.extracted, correct=result.correct, reason=result.reason)
    return rows


def run_eval(config: EvalConfig) -> dict[str, Any]:
    """Generate, score and write the outputs; returns the contents of results.json."""
    from megatron_fipo.data.templates import load_tokenizer

    started = time.perf_counter()
    model_dir = resolve_checkpoint(config)
    tokenizer = load_tokenizer(config.tokenizer or model_dir)
    problems, too_long = load_problems(config, tokenizer)
    logger.info(
        "%d problems, %d samples each (%d skipped: prompt too long)",
        len(problems),
        config.num_samples,
        len(too_long),
    )
    engine = build_engine(config, model_dir)
    try:
        samples = generate_samples(engine, problems, config, stop_token_ids(tokenizer, model_dir))
    finally:
        engine.shutdown()
    generation_s = time.perf_counter() - started
    records = score_samples(problems, samples, tokenizer, config)
    overall, per_problem = summarize(problems, records, config)
    extra = {
        "model_dir": str(model_dir),
        "skipped_too_long": too_long,
        "generation_seconds": generation_s,
        "total_seconds": time.perf_counter() - started,
    }
    out = write_outputs(config, records, overall, per_problem, extra)
    logger.info("wrote %s/results.json, results.md, samples.jsonl", out)
    return json.loads((out / "results.json").read_text())


def parse_config(argv: Sequence[str] | None = None) -> EvalConfig:
    parser = argparse.ArgumentParser(prog="fipo-eval", description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="HF model dir or Megatron torch_dist checkpoint dir")
    parser.add_argument("--data", nargs="+", required=True, help="jsonl / parquet files")
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--tokenizer", default="")
    parser.add_argument("--hf-config-dir", default="")
    parser.add_argument("--engine", choices=("hf", "sglang"), default="hf")
    parser.add_argument("-n", "--num-samples", type=int, default=32)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-p", type=float, default=0.7)
    parser.add_argument("--top-k", type=int, default=-1)
    parser.add_argument("--max-new-tokens", type=int, default=20480)
    parser.add_argument("--max-prompt-length", type=int, default=2048)
    parser.add_argument("--pass-k", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32])
    parser.add_argument(
        "--prompt-template",
        default="none",
        help=f"{'/'.join(PROMPT_TEMPLATES)} or a string containing {{problem}}",
    )
    parser.add_argument("--no-chat-template", action="store_true")
    parser.add_argument("--max-problems", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--max-batch-size", type=int, default=64)
    parser.add_argument("--problems-per-call", type=int, default=8)
    parser.add_argument("--sglang-tp-size", type=int, default=1)
    parser.add_argument("--sglang-mem-fraction", type=float, default=0.8)
    parser.add_argument("--sglang-dtype", default="bfloat16")
    parser.add_argument("--reward-timeout-s", type=float, default=10.0)
    parser.add_argument("--reward-workers", type=int, default=2)
    args = parser.parse_args(argv)
    return EvalConfig(
        checkpoint=args.checkpoint,
        data_files=tuple(args.data),
        output_dir=args.output_dir,
        tokenizer=args.tokenizer,
        hf_config_dir=args.hf_config_dir,
        engine=args.engine,
        num_samples=args.num_samples,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        max_new_tokens=args.max_new_tokens,
        max_prompt_length=args.max_prompt_length,
        pass_k=tuple(args.pass_k),
        prompt_template=args.prompt_template,
        apply_chat_template=not args.no_chat_template,
        max_problems=args.max_problems,
        seed=args.seed,
        dtype=args.dtype,
        max_batch_size=args.max_batch_size,
        problems_per_call=args.problems_per_call,
        sglang_tp_size=args.sglang_tp_size,
        sglang_mem_fraction=args.sglang_mem_fraction,
        sglang_dtype=args.sglang_dtype,
        reward_timeout_s=args.reward_timeout_s,
        reward_workers=args.reward_workers,
    )


def main(argv: Sequence[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    config = parse_config(argv)
    results = run_eval(config)
    print(Path(config.output_dir, "results.md").read_text())
    n = config.num_samples
    print(f"avg@{n} = {results['overall'][f'avg@{n}']:.4f}")


if __name__ == "__main__":
    main()
