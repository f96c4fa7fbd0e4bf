"""Run bookkeeping without Ray: the output-dir lock, verified checkpoints and their fallback,
metrics committed with checkpoints, config.yaml kept, the content-keyed initial conversion,
and the CLI's one-line errors before anything starts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from megatron_fipo.init_checkpoint import converted_initial_checkpoint, source_fingerprint
from megatron_fipo.metrics_log import MetricsLogger
from megatron_fipo.run_state import (
    MANIFEST,
    CheckpointError,
    RunDirError,
    RunLock,
    begin_checkpoint,
    digest_files,
    finish_checkpoint,
    latest_checkpoint,
    save_torch,
    select_checkpoint,
    verify_checkpoint,
    write_run_config,
)

ROOT = Path(__file__).resolve().parents[1]


def _checkpoint(output_dir: Path, step: int, payload: bytes = b"x" * 10000) -> Path:
    partial, final = begin_checkpoint(output_dir, step)
    (partial / "actor").mkdir()
    (partial / "actor" / "__0_0.distcp").write_bytes(payload)
    save_torch({"step": step}, partial / "trainer_state.pt")
    finish_checkpoint(partial, final, keep=None)
    return final


# ---------------------------------------------------------------------------- lock
_HOLD = """
import sys, time
from megatron_fipo.run_state import RunLock
RunLock(sys.argv[1]).acquire()
print("locked", flush=True)
time.sleep(60)
"""


def test_second_run_in_one_output_dir_is_refused_naming_the_holder(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLD, str(tmp_path)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunDirError, match=f"in use by another run .*pid {holder.pid}"):
            RunLock(tmp_path).acquire()
    finally:
        holder.kill()  # SIGKILL: the kernel drops the flock with the process
        holder.wait()
    RunLock(tmp_path).acquire().release()


def test_unwritable_output_dir_is_named(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(RunDirError, match="a_file/run is not writable"):
        RunLock(blocker / "run").acquire()


# ---------------------------------------------------------------------------- checkpoints
def test_checkpoint_has_a_manifest_of_every_file_and_verifies(tmp_path):
    final = _checkpoint(tmp_path, 1)
    manifest = json.loads((final / MANIFEST).read_text())["files"]
    assert sorted(manifest) == ["actor/__0_0.distcp", "trainer_state.pt"]
    assert manifest["actor/__0_0.distcp"]["size"] == 10000
    assert verify_checkpoint(final, lambda root, names: digest_files(root, names)) is None


def test_truncated_file_falls_back_to_the_previous_checkpoint(tmp_path):
    first = _checkpoint(tmp_path, 1)
    second = _checkpoint(tmp_path, 2)
    with open(second / "trainer_state.pt", "r+b") as handle:
        handle.truncate(100)
    said = []
    assert select_checkpoint(tmp_path, "auto", report=said.append) == first
    assert len(said) == 1 and "\n" not in said[0]
    assert "step_000002 is damaged (trainer_state.pt has 100 bytes" in said[0]
    assert (tmp_path / "checkpoints/step_000002.damaged/trainer_state.pt").is_file()  # kept
    assert latest_checkpoint(tmp_path) == first


def test_overwritten_bytes_are_found_by_their_hash(tmp_path):
    first = _checkpoint(tmp_path, 1)
    second = _checkpoint(tmp_path, 2)
    with open(second / "actor/__0_0.distcp", "r+b") as handle:
        handle.seek(4000)
        handle.write(b"\0" * 4096)  # 4 KB overwritten: the size is unchanged
    assert select_checkpoint(tmp_path, "auto") == second  # sizes alone cannot see it
    said = []
    hashing = lambda root, names: digest_files(root, names)  # noqa: E731
    assert select_checkpoint(tmp_path, "auto", hashing, report=said.append) == first
    assert "actor/__0_0.distcp does not match its sha256" in said[0]


def test_explicit_or_all_damaged_checkpoints_are_errors(tmp_path):
    only = _checkpoint(tmp_path, 1)
    (only / "actor/__0_0.distcp").write_bytes(b"short")
    with pytest.raises(CheckpointError, match="step_000001 is damaged: actor/__0_0.distcp has 5"):
        select_checkpoint(tmp_path, str(only))
    with pytest.raises(CheckpointError, match="every complete checkpoint .* is damaged"):
        select_checkpoint(tmp_path, "auto", report=lambda _: None)
    with pytest.raises(CheckpointError, match="is not a complete checkpoint"):
        select_checkpoint(tmp_path, str(tmp_path / "nowhere"))
    assert select_checkpoint(tmp_path / "empty", "auto") is None
    assert select_checkpoint(tmp_path, "disable") is None


def test_a_crash_before_the_marker_leaves_no_complete_checkpoint(tmp_path, monkeypatch):
    first = _checkpoint(tmp_path, 1)
    partial, final = begin_checkpoint(tmp_path, 2)
    (partial / "trainer_state.pt").write_bytes(b"data")

    def crash(*args):
        raise OSError("disk gone")

    monkeypatch.setattr("megatron_fipo.run_state.atomic_write_text", crash)
    with pytest.raises(OSError):
        finish_checkpoint(partial, final, keep=None)
    assert latest_checkpoint(tmp_path) == first and not final.exists()


def test_every_file_and_the_manifest_reach_the_disk_before_the_marker(tmp_path, monkeypatch):
    """A power cut after COMPLETE must not leave files only in the page cache: every file of
    the checkpoint, the manifest and their directories are fsynced before the marker exists."""
    partial, final = begin_checkpoint(tmp_path, 1)
    (partial / "actor").mkdir()
    (partial / "actor" / "__0_0.distcp").write_bytes(b"w" * 5000)
    save_torch({"step": 1}, partial / "trainer_state.pt")
    synced: list[tuple[str, bool]] = []  # (what was fsynced, whether the marker existed then)
    real_fsync = os.fsync

    def spy(fd):
        path = os.readlink(f"/proc/self/fd/{fd}")
        marker = (partial / "COMPLETE").exists() or (final / "COMPLETE").exists()
        synced.append((path, marker))
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", spy)
    finish_checkpoint(partial, final, keep=None)
    before_marker = {Path(path).name for path, marker in synced if not marker}
    for name in ("__0_0.distcp", "trainer_state.pt", "actor", partial.name):
        assert name in before_marker, (name, synced)
    assert any(Path(path).name.startswith(MANIFEST) for path, m in synced if not m), synced
    marker_synced = [path for path, marker in synced if marker]
    assert marker_synced, "the marker itself and the renamed directory are synced too"


def test_sigint_and_sigterm_ask_for_a_stop_and_a_second_signal_stops_at_once(capsys):
    """What Ctrl-C does to a run (the SIGTERM run in test_trainer.py shows the loop's side)."""
    import signal

    from megatron_fipo.run_state import StopRequest

    for signum in (signal.SIGINT, signal.SIGTERM):
        before = signal.getsignal(signum)
        stop = StopRequest()
        with stop.installed():
            os.kill(os.getpid(), signum)
            time.sleep(0.05)  # the handler runs in the main thread between bytecodes
            assert stop.requested and stop.signal_name == signal.Signals(signum).name
            with pytest.raises(KeyboardInterrupt, match="second"):
                os.kill(os.getpid(), signum)
                time.sleep(0.05)
        assert signal.getsignal(signum) is before  # the previous handler is back
        err = capsys.readouterr().err
        assert f"{signal.Signals(signum).name} received: stopping after the current step" in err


# ---------------------------------------------------------------------------- metrics, config
class _Logging:
    jsonl = True
    tensorboard = False
    wandb_project = None


def test_metrics_are_restored_from_the_checkpoint_copy(tmp_path):
    logger = MetricsLogger(tmp_path, _Logging(), {})
    for step in (1, 2):
        logger.log(step, {"loss": float(step)})
    partial, final = begin_checkpoint(tmp_path, 2)
    logger.snapshot(partial)
    finish_checkpoint(partial, final, keep=None)
    logger.log(3, {"loss": 3.0})
    with open(logger.path, "a") as handle:
        handle.write('{"step": 4, "lo')  # torn by a kill mid-write
    note = logger.restore(final, 2)
    steps = [json.loads(line)["step"] for line in logger.path.read_text().splitlines()]
    assert steps == [1, 2] and "restored to 2 lines (had 4)" in note


def test_metrics_without_a_copy_keep_earlier_steps_and_skip_a_torn_line(tmp_path, capsys):
    logger = MetricsLogger(tmp_path, _Logging(), {})
    logger.path.write_text('{"step": 1}\n{"step": 2}\n{"step": 3}\n{"st')
    logger.restore(tmp_path / "old_checkpoint", 2)
    assert logger.path.read_text() == '{"step": 1}\n{"step": 2}\n'
    assert "dropped unreadable" in capsys.readouterr().err


def test_changed_config_keeps_the_previous_one(tmp_path):
    assert write_run_config(tmp_path, "a: 1\n") is None
    assert write_run_config(tmp_path, "a: 1\n") is None
    kept = write_run_config(tmp_path, "a: 2\n")
    assert kept.read_text() == "a: 1\n" and (tmp_path / "config.yaml").read_text() == "a: 2\n"


# ---------------------------------------------------------------------------- initial checkpoint
def _hf_checkpoint(directory: Path, seed: int) -> Path:
    from checkpoint_convert.random_checkpoint import qwen2_config, write_random_checkpoint

    config = qwen2_config(
        num_layers=1, hidden_size=16, ffn_hidden_size=32, vocab_size=64, num_heads=2, num_kv_heads=1
    )
    write_random_checkpoint(directory, config, dtype=torch.float32, seed=seed)
    return directory


def test_initial_conversion_is_keyed_by_source_content(tmp_path):
    source = _hf_checkpoint(tmp_path / "hf", seed=0)
    run = tmp_path / "run"
    first = converted_initial_checkpoint(source, run)
    stamp = (first / "source.json").stat().st_mtime_ns
    assert converted_initial_checkpoint(source, run) == first  # reused, not reconverted
    assert (first / "source.json").stat().st_mtime_ns == stamp
    # Same names and shapes, other weights (a re-trained warm start): converted anew.
    time.sleep(0.01)
    _hf_checkpoint(source, seed=1)
    second = converted_initial_checkpoint(source, run)
    assert second != first and not first.exists()
    # Another model path with the first weights: its own conversion, not the stale one.
    other = _hf_checkpoint(tmp_path / "other", seed=0)
    assert converted_initial_checkpoint(other, run).name == first.name


def test_fingerprint_cache_rehashes_changed_files(tmp_path):
    source = _hf_checkpoint(tmp_path / "hf", seed=0)
    cache = tmp_path / "cache.json"
    before = source_fingerprint(source, cache)
    assert source_fingerprint(source, cache) == before
    config = json.loads((source / "config.json").read_text())
    config["rms_norm_eps"] = 1e-5
    (source / "config.json").write_text(json.dumps(config))
    assert source_fingerprint(source, cache) != before


def test_legacy_unkeyed_conversion_is_not_reused(tmp_path):
    source = _hf_checkpoint(tmp_path / "hf", seed=0)
    legacy = tmp_path / "run/init_megatron"
    legacy.mkdir(parents=True)
    (legacy / ".metadata").write_text("old")
    target = converted_initial_checkpoint(source, tmp_path / "run")
    assert not (legacy / ".metadata").exists() and (target / "source.json").is_file()


# ---------------------------------------------------------------------------- CLI errors
def _cli(*args, cwd=ROOT):
    return subprocess.run(
        [sys.executable, "-m", "megatron_fipo.cli", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
        timeout=300,
    )


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    from megatron_fipo.data.synthetic import SyntheticTaskConfig, prepare_synthetic

    return prepare_synthetic(
        tmp_path_factory.mktemp("task"), SyntheticTaskConfig(num_train=64, num_eval=4)
    )


@pytest.mark.parametrize(
    "args,message",
    [
        (["--config", "no/such.yaml"], "No such file or directory: no/such.yaml"),
        (["model.tokenizer_path=/none"], "tokenizer path /none does not exist"),
        (["data.train_files=[/nowhere.jsonl]"], "/nowhere.jsonl"),
        (["model.hf_model_path=/no/model"], "/no/model"),
    ],
)
def test_user_mistakes_are_one_line_without_traceback(args, message, synthetic, tmp_path):
    if args[0] != "--config":
        args = [
            "--config",
            "configs/tiny-cpu.yaml",
            f"model.tokenizer_path={synthetic.tokenizer_dir}",
            f"data.train_files=[{synthetic.train_file}]",
            f"data.eval_files=[{synthetic.eval_file}]",
            "model.hf_model_path=null",
            *args,
        ]
    done = _cli(*args, f"trainer.output_dir={tmp_path / 'run'}")
    assert done.returncode == 2, done.stderr
    assert message in done.stderr and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr


def test_refused_resume_changes_nothing_in_the_output_dir(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("earlier: run\n")
    done = _cli(
        "--config",
        "configs/tiny-cpu.yaml",
        f"trainer.output_dir={run}",
        "--resume",
        str(run / "checkpoints/step_000007"),
    )
    assert done.returncode == 2 and "is not a complete checkpoint" in done.stderr, done.stderr
    assert (run / "config.yaml").read_text() == "earlier: run\n"
    assert "Traceback" not in done.stderr


# ---------------------------------------------------------------------------- W&B
class _WandbLogging:
    jsonl = True
    tensorboard = False
    wandb_project = "fipo-tests"
    wandb_entity = None
    wandb_mode = "offline"
    experiment_name = "offline"


def test_wandb_offline_logs_every_step_and_a_resume_continues_the_same_run(tmp_path):
    pytest.importorskip("wandb", reason="wandb is in the dev extras")
    from wandb_offline import history, run_ids

    first = MetricsLogger(tmp_path, _WandbLogging(), {"seed": 1})
    first.start_wandb()
    first.log(1, {"reward/mean": 0.5, "actor/loss": 1.5})
    first.log(2, {"reward/mean": 0.75, "actor/loss": 1.25})
    first.close()
    resumed = MetricsLogger(tmp_path, _WandbLogging(), {"seed": 1})
    resumed.start_wandb()  # after a resume: the same W&B run id
    resumed.log(3, {"reward/mean": 1.0, "actor/loss": 1.0})
    resumed.close()
    import wandb

    wandb.teardown()  # its service process would otherwise live as long as this one
    logged = history(tmp_path / "wandb")
    assert sorted(logged) == [1, 2, 3]
    assert logged[2] == {"reward/mean": 0.75, "actor/loss": 1.25}
    assert run_ids(tmp_path / "wandb") == {(tmp_path / "wandb_run_id").read_text().strip()}
