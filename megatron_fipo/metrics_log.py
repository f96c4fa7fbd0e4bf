"""Per-step metrics: ``metrics.jsonl`` (always), TensorBoard and Weights & Biases when configured.

``metrics.jsonl`` holds one JSON object per step (``{"step": N, key: value, ...}``). Each line
is flushed and fsynced as it is written, and the trainer writes a step's line *before* that
step's checkpoint, which keeps a copy of the file (:meth:`MetricsLogger.snapshot`): the metrics
of every checkpointed step are committed with it. On resume the file is restored from the
checkpoint's copy (:meth:`MetricsLogger.restore`), so a line torn by a kill, or lines of steps
after the checkpoint (they are redone), never reach the resumed run's file.

Weights & Biases (``logging.wandb_project``): ``logging.wandb_mode`` "online", or "offline"
(no network: the run is written under ``<output_dir>/wandb`` for a later ``wandb sync``). The
W&B run id is kept in ``<output_dir>/wandb_run_id`` so a resumed run continues the same W&B run.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import sys
from pathlib import Path
from typing import Any

METRICS_FILE = "metrics.jsonl"
WANDB_ID_FILE = "wandb_run_id"


class MetricsLogger:
    """Writes each step's metrics to every configured sink."""

    def __init__(self, output_dir: str | Path, logging_config: Any, run_config: dict) -> None:
        self.output_dir = Path(output_dir)
        self.path = self.output_dir / METRICS_FILE
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self._config = logging_config
        self._run_config = run_config
        self._tensorboard = None
        self._wandb = None
        if logging_config.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tensorboard = SummaryWriter(str(self.output_dir / "tensorboard"))

    def start_wandb(self) -> None:
        """Open (or, after a resume, reopen) the W&B run; a no-op unless configured."""
        config = self._config
        if not config.wandb_project or self._wandb is not None:
            return
        try:
            import wandb
        except ImportError:
            raise RuntimeError(
                "logging.wandb_project is set but wandb is not installed: pip install wandb"
            ) from None
        id_file = self.output_dir / WANDB_ID_FILE
        run_id = id_file.read_text().strip() if id_file.is_file() else secrets.token_hex(4)
        id_file.write_text(run_id + "\n")
        self._wandb = wandb.init(
            project=config.wandb_project,
            entity=config.wandb_entity,
            name=config.experiment_name,
            id=run_id,
            resume="allow",
            mode=config.wandb_mode,
            dir=str(self.output_dir),
            config=self._run_config,
        )

    def restore(self, checkpoint: Path, step: int) -> str:
        """Make ``metrics.jsonl`` hold exactly the lines committed with ``checkpoint`` (a
        checkpoint without a copy, from before copies existed: keep the lines of steps <= step).
        Returns a short note of what changed, for the resume message."""
        committed = checkpoint / METRICS_FILE
        if committed.is_file():
            before = _count_lines(self.path)
            shutil.copyfile(committed, self.path)
            after = _count_lines(self.path)
            return f"metrics.jsonl restored to {after} lines (had {before})"
        kept = []
        if self.path.is_file():
            for number, line in enumerate(self.path.read_text().splitlines(), 1):
                try:
                    record = json.loads(line)
                except ValueError:
                    print(f"metrics: dropped unreadable {self.path}:{number}", file=sys.stderr)
                    continue
                if record.get("step", 0) <= step:
                    kept.append(line)
        self.path.write_text("".join(line + "\n" for line in kept))
        return f"metrics.jsonl kept {len(kept)} lines of steps <= {step}"

    def snapshot(self, checkpoint_dir: Path) -> None:
        """Copy ``metrics.jsonl`` (every line so far) into a checkpoint being written."""
        if self.path.is_file():
            shutil.copyfile(self.path, checkpoint_dir / METRICS_FILE)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        record = {"step": step, **{k: float(v) for k, v in sorted(metrics.items())}}
        if self._config.jsonl:
            with self.path.open("a") as handle:
                handle.write(json.dumps(record) + "\n")
                handle.flush()
                os.fsync(handle.fileno())
        if self._tensorboard is not None:
            for key, value in metrics.items():
                self._tensorboard.add_scalar(key, value, step)
            self._tensorboard.flush()
        if self._wandb is not None:
            self._wandb.log(dict(metrics), step=step)

    def close(self) -> None:
        if self._tensorboard is not None:
            self._tensorboard.close()
            self._tensorboard = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


def _count_lines(path: Path) -> int:
    if not path.is_file():
        return 0
    with path.open("rb") as handle:
        return sum(1 for _ in handle)
