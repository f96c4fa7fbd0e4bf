"""The RL loop end to end on CPU (Ray, Megatron actor, HF engine, weight sync, reward pool):
a few steps, kill-and-resume determinism, a damaged latest checkpoint, SIGTERM, a second run on
the same output dir, malformed rows, a failing reward function, dry runs."""

import json
import os
import shutil
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


def _run(overrides, output_dir, *extra, timeout=900):
    return subprocess.run(
        [*_command(overrides, output_dir), *extra],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _start(overrides, output_dir, *extra):
    return subprocess.Popen(
        [*_command(overrides, output_dir), *extra],
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def _wait_for(path, process, timeout=600):
    deadline = time.time() + timeout
    while not path.exists():
        assert process.poll() is None and time.time() < deadline, f"run ended before {path}"
        time.sleep(0.2)


def _same_metrics(ours, theirs):
    assert [r["step"] for r in ours] == [r["step"] for r in theirs]
    for mine, other in zip(ours, theirs):
        assert _stable(mine) == pytest.approx(_stable(other), rel=1e-6, abs=1e-9), mine["step"]


@pytest.fixture(scope="module")
def straight(run_args):
    """One uninterrupted run of STEPS steps (a checkpoint after each): the reference."""
    base, overrides = run_args
    output = base / "straight"
    done = _run(overrides, output)
    assert done.returncode == 0, done.stderr[-4000:]
    return output, _metrics(output), done.stderr


def test_run_kill_resume_matches_uninterrupted(run_args, straight):
    base, overrides = run_args
    straight_dir, records, stderr = straight
    assert "skipped 1 malformed train rows" in stderr and "row 64" in stderr
    assert stderr.count("skipped 1 malformed") == 1  # reported once
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    last = records[-1]
    assert "eval/greedy_accuracy" in last and "fipo/weight_mean" in last
    assert last["actor/num_optimizer_steps"] == 2.0
    assert last["reward/budget_timeouts"] == 0.0  # per-sample deadlines only, no budget cut
    assert last["rollout/weights_version"] == STEPS  # initial sync + one per step, pre-sync value
    assert list((straight_dir / "tensorboard").glob("events.out.tfevents.*"))
    # oversampled groups kept for later: some step trains on the held surplus alone
    assert min(r["rollout/num_gen_batches"] for r in records) == 0
    latest = latest_checkpoint(straight_dir)
    assert latest.name == f"step_{STEPS:06d}"
    # The step's metrics are committed with its checkpoint, with a manifest of every file.
    assert (latest / "metrics.jsonl").read_text() == (straight_dir / "metrics.jsonl").read_text()
    assert "actor/.metadata" in json.loads((latest / "MANIFEST.json").read_text())["files"]

    killed = base / "killed"
    process = _start(overrides, killed)
    _wait_for(killed / "checkpoints/step_000001/COMPLETE", process)
    os.killpg(process.pid, signal.SIGKILL)  # mid step 2, possibly mid checkpoint write
    process.wait()
    resumed = _run(overrides, killed, "--resume", "auto")
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert f"resumed from {killed / 'checkpoints/step_'}" in resumed.stderr
    _same_metrics(_metrics(killed), records)


def test_damaged_latest_checkpoint_is_named_and_the_previous_one_used(run_args, straight):
    """4 KB overwritten inside the newest checkpoint's weights (size unchanged) and a torn last
    metrics line: the resume names the damage in one line, sets it aside, resumes from the
    step before, and ends with the uninterrupted run's metrics."""
    base, overrides = run_args
    straight_dir, records, _ = straight
    damaged = base / "damaged"
    shutil.copytree(straight_dir, damaged)
    newest = damaged / f"checkpoints/step_{STEPS:06d}"
    weights = max((newest / "actor").glob("*.distcp"), key=lambda p: p.stat().st_size)
    with open(weights, "r+b") as handle:
        handle.seek(weights.stat().st_size // 2)
        handle.write(os.urandom(4096))
    with open(damaged / "metrics.jsonl", "a") as handle:
        handle.write('{"step": 4, "accur')
    resumed = _run(overrides, damaged, "--resume", "auto")
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    lines = [line for line in resumed.stderr.splitlines() if "is damaged" in line]
    assert len(lines) == 1 and f"actor/{weights.name} does not match its sha256" in lines[0]
    assert f"resumed from {damaged / f'checkpoints/step_{STEPS - 1:06d}'}" in resumed.stderr
    assert (damaged / f"checkpoints/step_{STEPS:06d}.damaged").is_dir()  # kept, not deleted
    _same_metrics(_metrics(damaged), records)


def test_sigterm_saves_and_a_second_run_is_refused(run_args, straight):
    """A second fipo-train on the same output dir is refused in seconds, naming the holder,
    and changes nothing; SIGTERM ends the first after its current step with a checkpoint and
    exit status 0; --resume auto then finishes with the uninterrupted run's metrics."""
    base, overrides = run_args
    _, records, _ = straight
    output = base / "stopped"
    # Also W&B, offline (no network): both processes log into one W&B run.
    overrides = [*overrides, "logging.wandb_project=fipo-tests", "logging.wandb_mode=offline"]
    first = _start([*overrides, "trainer.save_freq=100"], output)
    try:
        _wait_for(output / "metrics.jsonl", first)
        config_before = (output / "config.yaml").read_bytes()
        started = time.time()
        second = _run(overrides, output, timeout=120)
        assert second.returncode == 2 and time.time() - started < 60
        assert f"is in use by another run (fipo-train pid {first.pid}" in second.stderr
        assert len(second.stderr.strip().splitlines()) == 1, second.stderr
        assert (output / "config.yaml").read_bytes() == config_before
        first.send_signal(signal.SIGTERM)
        _, stderr = first.communicate(timeout=300)
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
    assert first.returncode == 0, stderr[-4000:]
    stopped_at = latest_checkpoint(output)
    assert f"stopped by SIGTERM after step {int(stopped_at.name[5:])}" in stderr
    assert "Traceback" not in stderr and "SIGABRT" not in stderr
    resumed = _run([*overrides, "trainer.save_freq=100"], output, "--resume", "auto")
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    _same_metrics(_metrics(output), records)
    from wandb_offline import history

    logged = history(output / "wandb")
    assert sorted(logged) == list(range(1, STEPS + 1))
    assert logged[STEPS]["accuracy"] == records[-1]["accuracy"]


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
