"""The RL loop end to end on CPU (Ray, Megatron actor, HF engine, weight sync, reward pool):
a few steps, kill-and-resume determinism, malformed rows, a failing reward function, dry runs."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megatron_fipo.data.synthetic import SyntheticTaskConfig, prepare_synthetic
from megatron_fipo.run_state import begin_checkpoint, finish_checkpoint, latest_checkpoint

ROOT = Path(__file__).resolve().parents[1]
STEPS = 3


@pytest.fixture(scope="module")
def run_args(tmp_path_factory):
    base = tmp_path_factory.mktemp("tiny")
    paths = prepare_synthetic(base, SyntheticTaskConfig(num_train=64, num_eval=8))
    with paths.train_file.open("a") as handle:  # one malformed row: skipped and reported
        handle.write('{"data_source": "x", "prompt": [], "reward_model": {"ground_truth": "1"}}\n')
    overrides = [
        f"data.train_files=[{paths.train_file}]",
        f"data.eval_files=[{paths.eval_file}]",
        f"model.tokenizer_path={paths.tokenizer_dir}",
        "data.on_malformed_row=skip",
        "model.hf_model_path=null",  # random init: no warm start in the test
        "data.train_batch_size=4",
        "data.gen_batch_size=8",
        "data.ppo_mini_batch_size=2",
        "rollout.n_samples_per_prompt=4",
        "rollout.max_response_length=16",
        "rollout.eval_sampling.n_samples_per_prompt=2",
        "algorithm.overlong_buffer.len=4",
        "model.architecture.hidden_size=32",
        "model.architecture.intermediate_size=64",
        "model.architecture.num_hidden_layers=2",
        "model.architecture.num_attention_heads=2",
        "model.architecture.num_key_value_heads=1",
        "reward.function=trainer_reward_fns:flaky_length_reward",
        "reward.timeout_s=1.0",
        f"trainer.total_training_steps={STEPS}",
        "trainer.save_freq=1",
        "trainer.eval_freq=3",
        "trainer.eval_before_train=false",
    ]
    return base, overrides


def _command(config_overrides, output_dir):
    return [
        sys.executable,
        "-m",
        "megatron_fipo.cli",
        "--config",
        str(ROOT / "configs/tiny-cpu.yaml"),
        *config_overrides,
        f"trainer.output_dir={output_dir}",
    ]


def _env():
    return {**os.environ, "PYTHONPATH": f"{ROOT / 'tests'}:{ROOT}", "PYTHONUNBUFFERED": "1"}


def _metrics(output_dir):
    lines = (Path(output_dir) / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def _stable(record):
    """Everything but wall-clock measurements."""
    return {k: v for k, v in record.items() if not k.startswith(("time/", "perf/"))}


def test_run_kill_resume_matches_uninterrupted(run_args):
    base, overrides = run_args
    straight = base / "straight"
    done = subprocess.run(
        _command(overrides, straight), env=_env(), capture_output=True, text=True, timeout=900
    )
    assert done.returncode == 0, done.stderr[-4000:]
    assert "skipped 1 malformed train rows" in done.stderr and "row 64" in done.stderr
    records = _metrics(straight)
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    last = records[-1]
    assert "eval/greedy_accuracy" in last and "fipo/weight_mean" in last
    assert last["actor/num_optimizer_steps"] == 2.0
    assert last["rollout/weights_version"] == STEPS  # initial sync + one per step, pre-sync value
    assert list((straight / "tensorboard").glob("events.out.tfevents.*"))
    # oversampled groups kept for later: some step trains on the held surplus alone
    assert min(r["rollout/num_gen_batches"] for r in records) == 0
    assert latest_checkpoint(straight).name == f"step_{STEPS:06d}"

    killed = base / "killed"
    process = subprocess.Popen(
        _command(overrides, killed),
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.time() + 600
    while not (killed / "checkpoints/step_000001/COMPLETE").exists():
        assert process.poll() is None and time.time() < deadline, "run ended before step 1"
        time.sleep(0.2)
    os.killpg(process.pid, signal.SIGKILL)  # mid step 2, possibly mid checkpoint write
    process.wait()
    resumed = subprocess.run(
        [*_command(overrides, killed), "--resume", "auto"],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    again = _metrics(killed)
    assert [r["step"] for r in again] == list(range(1, STEPS + 1))
    for ours, theirs in zip(again, records):
        assert _stable(ours) == pytest.approx(_stable(theirs), rel=1e-6, abs=1e-9), ours["step"]


def test_partial_checkpoints_are_never_picked(tmp_path):
    partial, final = begin_checkpoint(tmp_path, 1)
    finish_checkpoint(partial, final, keep=None)
    begin_checkpoint(tmp_path, 2)  # a run killed while writing step 2
    (tmp_path / "checkpoints/step_000003").mkdir()  # complete marker missing
    assert latest_checkpoint(tmp_path) == final
    partial, final = begin_checkpoint(tmp_path, 4)
    finish_checkpoint(partial, final, keep=1)
    assert latest_checkpoint(tmp_path).name == "step_000004"
    assert not (tmp_path / "checkpoints/step_000001").exists()
    assert not list((tmp_path / "checkpoints").glob("*.partial"))


@pytest.mark.parametrize(
    "overrides,expected",
    [
        ([], 0),
        (["parallelism.tensor_model_parallel_size=7"], 2),
        (["parallelism.pipeline_model_parallel_size=3"], 2),
        (["rollout.max_response_length=20481"], 2),
        (["no_such_section.key=1"], 2),
    ],
)
def test_dry_run_accepts_recipe_and_rejects_broken_layouts(overrides, expected, capsys):
    from megatron_fipo.cli import train_main

    code = train_main(
        ["--config", str(ROOT / "configs/qwen2.5-32b-fipo.yaml"), "--dry-run", *overrides]
    )
    out = capsys.readouterr()
    assert code == expected, out.err
    if expected == 0:
        assert "layout OK" in out.out
    else:
        field = overrides[0].split("=")[0].rsplit(".", 1)[-1]
        assert field.split("_")[0] in out.err
