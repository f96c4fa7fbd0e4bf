"""A synthetic, verifiable math task and a matching tiny tokenizer, for CPU runs and tests.

Problems are small-integer expressions (``23 + 58``, ``41 - 17``, ``7 * 8``, ``3 + 4 * 6``) drawn
with a seed; each has an exact integer answer and a short worked solution (kept under
``extra_info.solution`` for the supervised warm start). Files are written in the DAPO-Math-17k
schema as jsonl, so they go through the same reader, template and reward as real data. Prompts
ask for the result on a final ``Answer: <number>`` line or in ``\\boxed{}``.

The tokenizer is a sentencepiece BPE model trained on the task text with digits split one per
token (so arithmetic is learnable digit by digit) and byte fallback (any text encodes), rebuilt
as a ``tokenizers`` BPE and saved with transformers' ``save_pretrained`` plus a small chat
template, so ``AutoTokenizer.from_pretrained(dir)`` loads it. The sentencepiece file is kept as
``tokenizer.model`` in the same directory.

Command line: ``python -m megatron_fipo.data.synthetic --out outputs/tiny-cpu`` writes
``data/train.jsonl``, ``data/eval.jsonl`` and ``tokenizer/`` there (skipped when already present
with the same settings).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

DATA_SOURCE = "synthetic_arithmetic"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")
# Role markers, then the content; the assistant turn ends with the eos token.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}"
    "{% if message['role'] == 'assistant' %}</s>{% endif %}{{ '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
_INSTRUCTION = {
    "answer": "End with a line 'Answer: <number>'.",
    "boxed": "Put the final answer in \\boxed{}.",
}


@dataclass(kw_only=True, slots=True)
class SyntheticTaskConfig:
    """What to generate."""

    num_train: int = 4000
    """Training problems."""
    num_eval: int = 200
    """Held-out problems (no expression appears in both splits)."""
    max_operand: int = 50
    """Largest operand of + and -; products use operands up to ``max_factor``."""
    max_factor: int = 12
    """Largest operand of *."""
    kinds: tuple[str, ...] = ("add", "sub", "mul", "mixed")
    """Problem kinds, drawn uniformly: a + b, a - b (a >= b), a * b, a + b * c."""
    answer_style: Literal["answer", "boxed", "mixed"] = "answer"
    """How the prompt asks for the result: 'Answer:' line, \\boxed{}, or either at random."""
    seed: int = 0
    """Seed of the draw."""
    vocab_size: int = 384
    """Tokenizer pieces (256 of them are the byte-fallback pieces); must fit the model vocab."""

    def __post_init__(self) -> None:
        for name in ("num_train", "num_eval", "max_operand", "max_factor"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        unknown = set(self.kinds) - {"add", "sub", "mul", "mixed"}
        if not self.kinds or unknown:
            raise ValueError(
                f"kinds must be a non-empty subset of add/sub/mul/mixed, got {self.kinds}"
            )
        if self.answer_style not in ("answer", "boxed", "mixed"):
            raise ValueError(f"answer_style must be answer|boxed|mixed, got {self.answer_style!r}")
        if not 300 <= self.vocab_size <= 4096:
            raise ValueError(
                f"vocab_size must be in [300, 4096] (bytes + pieces), got {self.vocab_size}"
            )


@dataclass(frozen=True, slots=True)
class Problem:
    """One arithmetic problem."""

    expression: str
    """E.g. ``3 + 4 * 6``."""
    answer: int
    solution_steps: tuple[str, ...]
    """Worked lines, e.g. ``("4 * 6 = 24", "3 + 24 = 27")``."""


def make_problem(kind: str, rng: random.Random, config: SyntheticTaskConfig) -> Problem:
    """Draw one problem of ``kind``."""
    top, factor = config.max_operand, config.max_factor
    if kind == "add":
        a, b = rng.randint(0, top), rng.randint(0, top)
        return Problem(f"{a} + {b}", a + b, (f"{a} + {b} = {a + b}",))
    if kind == "sub":
        a, b = sorted((rng.randint(0, top), rng.randint(0, top)), reverse=True)
        return Problem(f"{a} - {b}", a - b, (f"{a} - {b} = {a - b}",))
    if kind == "mul":
        a, b = rng.randint(0, factor), rng.randint(0, factor)
        return Problem(f"{a} * {b}", a * b, (f"{a} * {b} = {a * b}",))
    if kind == "mixed":
        a, b, c = rng.randint(0, top), rng.randint(0, factor), rng.randint(0, factor)
        steps = (f"{b} * {c} = {b * c}", f"{a} + {b * c} = {a + b * c}")
        return Problem(f"{a} + {b} * {c}", a + b * c, steps)
    raise ValueError(f"unknown problem kind {kind!r}")


def _unique_problems(config: SyntheticTaskConfig, rng: random.Random) -> Iterator[Problem]:
    seen: set[str] = set()
    attempts = 0
    while True:
        problem = make_problem(rng.choice(config.kinds), rng, config)
        attempts += 1
        if problem.expression not in seen:
            seen.add(problem.expression)
            attempts = 0
            yield problem
        elif attempts > 10_000:
            raise ValueError(
                f"cannot draw {config.num_train + config.num_eval} distinct problems with "
                f"max_operand={config.max_operand}, max_factor={config.max_factor}; raise them"
            )


def format_row(problem: Problem, style: str, index: int, split: str) -> dict[str, Any]:
    """A DAPO-schema row; ``extra_info.solution`` is the worked answer in the asked style."""
    final = f"Answer: {problem.answer}" if style == "answer" else f"\\boxed{{{problem.answer}}}"
    return {
        "data_source": DATA_SOURCE,
        "prompt": [
            {"role": "user", "content": f"Compute {problem.expression}. {_INSTRUCTION[style]}"}
        ],
        "ability": "math",
        "reward_model": {"ground_truth": str(problem.answer), "style": "rule"},
        "extra_info": {
            "index": index,
            "split": split,
            "solution": "\n".join([*problem.solution_steps, final]),
        },
    }


def generate_rows(config: SyntheticTaskConfig) -> tuple[list[dict], list[dict]]:
    """(train rows, eval rows); the same config always gives the same rows."""
    rng = random.Random(config.seed)
    problems = _unique_problems(config, rng)
    splits = {"eval": config.num_eval, "train": config.num_train}
    rows: dict[str, list[dict]] = {}
    for split, count in splits.items():  # eval first: its draw does not depend on num_train
        rows[split] = []
        for index in range(count):
            style = config.answer_style
            style = rng.choice(("answer", "boxed")) if style == "mixed" else style
            rows[split].append(format_row(next(problems), style, index, split))
    return rows["train"], rows["eval"]


def write_jsonl(rows: list[dict], path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")


def read_solutions(path: str | Path) -> dict[int, str]:
    """``extra_info.solution`` of a synthetic jsonl file by row (for the supervised warm start)."""
    with Path(path).open(encoding="utf-8") as handle:
        rows = [json.loads(line) for line in handle if line.strip()]
    return {row_index: row["extra_info"]["solution"] for row_index, row in enumerate(rows)}


def encode_sft_pair(
    tokenizer: Any, messages: Any, solution: str, apply_chat_template: bool = True
) -> tuple[list[int], list[int]]:
    """(prompt ids [P], response ids [R]) for the supervised warm start.

    The prompt is encoded exactly as the rollout encodes it; the response is the worked
    solution followed by the eos token, which is where generation stops during RL.
    """
    from megatron_fipo.data.templates import encode_prompt

    prompt = encode_prompt(tokenizer, messages, apply_chat_template)
    response = list(tokenizer(solution, add_special_tokens=False)["input_ids"])
    return prompt, [*response, tokenizer.eos_token_id]


def tokenizer_corpus(rows: list[dict]) -> Iterator[str]:
    """Text the tokenizer is trained on: rendered prompts, solutions and every digit and sign."""
    from megatron_fipo.data.templates import render_fallback

    yield "0123456789 + - * = ( ) . , : ? ! { } \\boxed{} Answer: " + " ".join(ROLE_TOKENS)
    for row in rows:
        yield render_fallback(row["prompt"])
        yield row["prompt"][0]["content"]
        yield row["extra_info"]["solution"]


@dataclass(frozen=True, slots=True)
class SyntheticPaths:
    """Where :func:`prepare_synthetic` put things."""

    train_file: Path
    eval_file: Path
    tokenizer_dir: Path


def prepare_synthetic(
    out_dir: str | Path, config: SyntheticTaskConfig | None = None
) -> SyntheticPaths:
    """Write ``data/train.jsonl``, ``data/eval.jsonl`` and ``tokenizer/`` under ``out_dir``.

    Reuses what is there when ``synthetic.json`` records the same settings, so a second run of
    the tiny job does not regenerate (and re-tokenize) anything.
    """
    from megatron_fipo.data.local_tokenizer import train_tokenizer

    config = config or SyntheticTaskConfig()
    out_dir = Path(out_dir)
    paths = SyntheticPaths(
        out_dir / "data" / "train.jsonl", out_dir / "data" / "eval.jsonl", out_dir / "tokenizer"
    )
    stamp = out_dir / "synthetic.json"
    settings = json.dumps(dataclasses.asdict(config), sort_keys=True)
    complete = all(p.exists() for p in (paths.train_file, paths.eval_file, paths.tokenizer_dir))
    if complete and stamp.is_file() and stamp.read_text() == settings:
        return paths
    train_rows, eval_rows = generate_rows(config)
    write_jsonl(train_rows, paths.train_file)
    write_jsonl(eval_rows, paths.eval_file)
    # Build the tokenizer in a scratch folder and move it in whole, so a crash never leaves a
    # half-written tokenizer directory that a later run would trust.
    with tempfile.TemporaryDirectory(dir=out_dir) as scratch:
        train_tokenizer(
            tokenizer_corpus(train_rows),
            scratch,
            vocab_size=config.vocab_size,
            role_tokens=ROLE_TOKENS,
            chat_template=CHAT_TEMPLATE,
        )
        if paths.tokenizer_dir.exists():
            shutil.rmtree(paths.tokenizer_dir)
        shutil.copytree(scratch, paths.tokenizer_dir)
    paths.tokenizer_dir.chmod(0o755)  # the scratch folder was private
    stamp.write_text(settings)
    return paths


def main(argv: list[str] | None = None) -> None:
    defaults = SyntheticTaskConfig()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="output directory (e.g. outputs/tiny-cpu)")
    parser.add_argument("--num-train", type=int, default=defaults.num_train)
    parser.add_argument("--num-eval", type=int, default=defaults.num_eval)
    parser.add_argument("--answer-style", default="answer", choices=("answer", "boxed", "mixed"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    config = SyntheticTaskConfig(
        num_train=args.num_train,
        num_eval=args.num_eval,
        answer_style=args.answer_style,
        seed=args.seed,
    )
    paths = prepare_synthetic(args.out, config)
    print(f"train: {paths.train_file}\neval: {paths.eval_file}\ntokenizer: {paths.tokenizer_dir}")


if __name__ == "__main__":
    main()
