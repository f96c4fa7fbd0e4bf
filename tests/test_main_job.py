"""The main-job script (launch/train_tiny_cpu.sh) at a tiny size: it never deletes a run, it
summarises the run it trained, --resume auto continues the newest run, and a run without
evaluation still ends with a summary."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SMALL = [
    "reward.function=trainer_reward_fns:flaky_length_reward",  # random-ish model: varied rewards
    "data.train_batch_size=4",
    "data.gen_batch_size=8",
    "data.ppo_mini_batch_size=2",
    "rollout.max_response_length=16",
    "algorithm.overlong_buffer.len=4",
    "trainer.eval_before_train=false",
    "trainer.eval_freq=null",
]


def _script(out: Path, *args: str) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "TINY_OUT": str(out),
        "WARM_START_STEPS": "2",
        "PYTHONPATH": f"{ROOT / 'tests'}:{ROOT}",
    }
    return subprocess.run(
        ["bash", str(ROOT / "launch/train_tiny_cpu.sh"), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )


def _steps(run: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_main_job_keeps_runs_summarises_its_own_and_resumes(tmp_path):
    out = tmp_path / "tiny"
    older = out / "rl/20000101-000000"  # an earlier run in the default place: must survive
    (older / "checkpoints/step_000040").mkdir(parents=True)
    (older / "metrics.jsonl").write_text('{"step": 40}\n')
    explicit = tmp_path / "elsewhere"

    first = _script(out, *SMALL, "trainer.total_training_steps=1", f"trainer.output_dir={explicit}")
    assert first.returncode == 0, first.stderr[-3000:]
    assert "no held-out evaluation in this run" in first.stdout  # (an IndexError before)
    # stderr is a pipe, as a log file is: no progress bar redrawn with carriage returns.
    assert "\r" not in first.stderr and "\r" not in first.stdout
    assert f"metrics: {explicit}/metrics.jsonl" in first.stdout
    assert _steps(explicit) == [1]
    assert (older / "checkpoints/step_000040").is_dir()
    assert (older / "metrics.jsonl").read_text() == '{"step": 40}\n'

    newest = out / "rl/29990101-000000"  # the newest run under rl/: what --resume auto takes
    shutil.copytree(explicit, newest)
    second = _script(out, *SMALL, "trainer.total_training_steps=2", "--resume", "auto")
    assert second.returncode == 0, second.stderr[-3000:]
    assert f"resumed from {newest}/checkpoints/step_000001" in second.stderr
    assert f"metrics: {newest}/metrics.jsonl" in second.stdout
    assert _steps(newest) == [1, 2]
    assert (newest / "checkpoints/step_000001/COMPLETE").is_file()  # not wiped
    assert (older / "checkpoints/step_000040").is_dir() and _steps(explicit) == [1]
