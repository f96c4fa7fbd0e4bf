"""Run bookkeeping around the loop: atomic checkpoints with resume, and metric logging.

Checkpoint layout under ``<output_dir>/checkpoints/``::

    step_000010/          complete checkpoint (renamed into place as the very last step)
        actor/            Megatron dist checkpoint: model + optimizer + LR scheduler
        trainer_state.pt  step, weights version, data position, surplus groups, RNG states
        COMPLETE          marker written after everything else
    step_000020.partial/  being written (or left by a killed run): never picked, removed later

``latest_checkpoint`` returns the newest directory with ``COMPLETE``; a run killed at any
moment therefore resumes from the last fully written step.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

_STEP_DIR = re.compile(r"^step_(\d{6,})$")
MARKER = "COMPLETE"


def checkpoint_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest complete checkpoint directory, or None."""
    root = checkpoint_root(output_dir)
    if not root.is_dir():
        return None
    complete = [
        (int(match.group(1)), path)
        for path in root.iterdir()
        if (match := _STEP_DIR.match(path.name)) and (path / MARKER).is_file()
    ]
    return max(complete)[1] if complete else None


def begin_checkpoint(output_dir: str | Path, step: int) -> tuple[Path, Path]:
    """``(partial_dir, final_dir)`` for ``step``; a stale partial directory is cleared."""
    root = checkpoint_root(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:06d}"
    partial = root / f"step_{step:06d}.partial"
    if partial.exists():
        shutil.rmtree(partial)
    partial.mkdir()
    return partial, final


def finish_checkpoint(partial: Path, final: Path, keep: int | None) -> None:
    """Marks ``partial`` complete, renames it to ``final`` and prunes old checkpoints."""
    (partial / MARKER).write_text(time.strftime("%Y-%m-%dT%H:%M:%S") + "\n")
    if final.exists():
        shutil.rmtree(final)
    os.replace(partial, final)
    root = final.parent
    for stale in root.glob("step_*.partial"):
        shutil.rmtree(stale, ignore_errors=True)
    if keep:
        complete = sorted(p for p in root.iterdir() if _STEP_DIR.match(p.name))
        for old in complete[:-keep]:
            shutil.rmtree(old, ignore_errors=True)


def rng_state() -> dict[str, Any]:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


class MetricsLogger:
    """Per-step metrics to ``metrics.jsonl`` (always), TensorBoard and wandb when configured."""

    def __init__(self, output_dir: str | Path, logging_config: Any, run_config: dict) -> None:
        self.path = Path(output_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._jsonl = logging_config.jsonl
        self._tensorboard = None
        self._wandb = None
        if logging_config.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tensorboard = SummaryWriter(str(Path(output_dir) / "tensorboard"))
        if logging_config.wandb_project:
            import wandb  # optional: only when configured

            self._wandb = wandb.init(
                project=logging_config.wandb_project,
                name=logging_config.experiment_name,
                config=run_config,
            )

    def truncate_after(self, step: int) -> None:
        """On resume, drop lines of steps after the checkpoint (they will be redone)."""
        if not self.path.is_file():
            return
        lines = self.path.read_text().splitlines()
        kept = [line for line in lines if line.strip() and json.loads(line).get("step", 0) <= step]
        self.path.write_text("".join(line + "\n" for line in kept))

    def log(self, step: int, metrics: dict[str, float]) -> None:
        record = {"step": step, **{k: float(v) for k, v in sorted(metrics.items())}}
        if self._jsonl:
            with self.path.open("a") as handle:
                handle.write(json.dumps(record) + "\n")
        if self._tensorboard is not None:
            for key, value in metrics.items():
                self._tensorboard.add_scalar(key, value, step)
            self._tensorboard.flush()
        if self._wandb is not None:
            self._wandb.log(metrics, step=step)

    def close(self) -> None:
        if self._tensorboard is not None:
            self._tensorboard.close()
        if self._wandb is not None:
            self._wandb.finish()
