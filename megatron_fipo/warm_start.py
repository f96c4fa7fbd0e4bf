"""Supervised warm start for the tiny CPU run: teach a randomly initialised model the answer
format (and some arithmetic) so that RL starts from a policy whose samples sometimes succeed.

The supervised data is deliberately imperfect, as real SFT data is: in ``biased_fraction`` of
the worked solutions the final ``Answer:`` line is off by one from the (correct) worked result.
The warm-started policy therefore usually reports a wrong final answer even when its working is
right, and only the verifiable reward can tell it which habit to keep. A 0.9M-parameter model
learns little new arithmetic from a few minutes of RL, but it does learn this: the CPU run shows
the loop correcting a systematic error of its starting policy from the reward alone.

Objective: token-mean cross entropy of the worked solution plus eos given the prompt (prompt
tokens carry no loss), AdamW with a linear warm-up and cosine decay. The model is the
transformers model of ``model.architecture``; the result is an HF checkpoint directory (weights,
config, tokenizer) that the run then converts to Megatron with ``checkpoint_convert`` like any
user checkpoint. A stamp of the settings makes a second call return the cached directory.

Usage: ``python -m megatron_fipo.warm_start --config configs/tiny-cpu.yaml --out DIR [--steps N]``
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from megatron_fipo.config import FipoConfig, load_config, to_dict
from megatron_fipo.data.prompts import load_prompt_files
from megatron_fipo.data.synthetic import encode_sft_pair, read_solutions
from megatron_fipo.data.templates import load_tokenizer


@dataclass(kw_only=True, slots=True)
class WarmStartConfig:
    """Supervised phase settings."""

    steps: int = 600
    batch_size: int = 32
    lr: float = 2e-3
    warmup_steps: int = 30
    weight_decay: float = 0.01
    seed: int = 0
    biased_fraction: float = 0.6
    """Share of solutions whose final ``Answer:`` line is off by one (see the module doc)."""


def bias_final_answer(solution: str) -> str:
    """The same solution with its last ``Answer: N`` line reporting ``N + 1``."""
    head, sep, answer = solution.rpartition("Answer: ")
    if not sep or not answer.strip().lstrip("-").isdigit():
        raise ValueError(f"solution has no integer 'Answer:' line: {solution!r}")
    return f"{head}{sep}{int(answer) + 1}"


def _pairs(
    config: FipoConfig, tokenizer, settings: WarmStartConfig
) -> list[tuple[list[int], list[int]]]:
    path = config.data.train_files[0]
    solutions = read_solutions(path)
    report = load_prompt_files([path], on_malformed_row="error")
    rng = random.Random(settings.seed + 1)
    pairs = []
    for ex in report.examples:
        solution = solutions[ex.row]
        if rng.random() < settings.biased_fraction:
            solution = bias_final_answer(solution)
        pairs.append(
            encode_sft_pair(tokenizer, ex.messages, solution, config.data.apply_chat_template)
        )
    return pairs


def _collate(pairs: list[tuple[list[int], list[int]]], pad_id: int):
    width = max(len(p) + len(r) for p, r in pairs)
    ids = torch.full((len(pairs), width), pad_id, dtype=torch.long)
    labels = torch.full((len(pairs), width), -100, dtype=torch.long)
    mask = torch.zeros(len(pairs), width, dtype=torch.long)
    for row, (prompt, response) in enumerate(pairs):
        sequence = prompt + response
        ids[row, : len(sequence)] = torch.tensor(sequence)
        labels[row, len(prompt) : len(sequence)] = torch.tensor(response)
        mask[row, : len(sequence)] = 1
    return ids, labels, mask


def train(config: FipoConfig, settings: WarmStartConfig, out_dir: Path) -> Path:
    """Runs the supervised phase (or returns the cached result) and returns the HF directory."""
    from transformers import AutoConfig, AutoModelForCausalLM

    stamp = json.dumps(
        {
            "warm_start": dataclasses.asdict(settings),
            "architecture": to_dict(config.model.architecture),
            "train_files": list(config.data.train_files),
            "apply_chat_template": config.data.apply_chat_template,
        },
        sort_keys=True,
    )
    if (out_dir / "warm_start.json").is_file() and (
        out_dir / "warm_start.json"
    ).read_text() == stamp:
        print(f"warm start: cached at {out_dir}", file=sys.stderr)
        return out_dir
    torch.manual_seed(settings.seed)
    rng = random.Random(settings.seed)
    tokenizer = load_tokenizer(config.model.tokenizer_path)
    fields = to_dict(config.model.architecture)
    model = AutoModelForCausalLM.from_config(
        AutoConfig.for_model(fields.pop("model_type"), **fields)
    )
    pairs = _pairs(config, tokenizer, settings)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay
    )
    start = time.perf_counter()
    model.train()
    for step in range(settings.steps):
        scale = min(1.0, (step + 1) / settings.warmup_steps)
        scale *= 0.5 * (1 + math.cos(math.pi * step / settings.steps))
        for group in optimizer.param_groups:
            group["lr"] = settings.lr * scale
        ids, labels, mask = _collate(rng.sample(pairs, settings.batch_size), tokenizer.pad_token_id)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if step % 100 == 0 or step == settings.steps - 1:
            print(
                f"warm start: step {step}/{settings.steps} loss {loss.item():.3f} "
                f"({time.perf_counter() - start:.0f}s)",
                file=sys.stderr,
                flush=True,
            )
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    (out_dir / "warm_start.json").write_text(stamp)
    return out_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Supervised warm start (tiny CPU run).")
    parser.add_argument("--config", required=True)
    parser.add_argument("--out", required=True, help="HF checkpoint directory to write")
    parser.add_argument("--steps", type=int, default=WarmStartConfig().steps)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    config = load_config(args.config, args.overrides)
    if config.model.architecture is None:
        raise SystemExit("warm start needs model.architecture in the config")
    train(config, WarmStartConfig(steps=args.steps), Path(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
