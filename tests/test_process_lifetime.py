"""Every process a run starts dies with it, also after a SIGKILL (megatron_fipo/lifetime.py).

- A training run (``python -m megatron_fipo.cli``, tiny config) SIGKILLed by process group
  mid-run: every process of its session (driver, Ray's GCS / raylet / agents, the Ray actors,
  Megatron's checkpoint-writer manager and resource tracker, the reward worker) is gone within
  :data:`DEADLINE_S`.
- A driver of local Ray SIGKILLed alone (not its group): Ray's agents used to keep listening
  for 60 s; the same bound holds.
- A test-harness rank SIGKILLed: the checkpoint-writer manager it started goes with it.

Run as a script, this file is the small Ray driver of the second test.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

ROOT = Path(__file__).resolve().parents[1]
DEADLINE_S = 10.0
"""Bound on how long anything outlives a SIGKILLed run: Ray's workers notice the raylet is
gone within about 2 s; the guardians act at once."""


def _start_writer_manager() -> list[int]:
    """What a Megatron torch_dist save starts in the saving process: the writer results
    queue's manager process (spawned, with its resource tracker). Returns the new children."""
    from megatron.core.dist_checkpointing.strategies.filesystem_async import (
        _get_write_results_queue,
    )

    from megatron_fipo import lifetime

    _get_write_results_queue()
    children = psutil.Process().children(recursive=True)
    return [p.pid for p in children if not lifetime.is_guardian(p.cmdline())]


class WriterWorker:
    """A Ray worker that holds a gloo group and Megatron's checkpoint-writer manager."""

    def start_writer(self) -> dict:
        return {"pid": os.getpid(), "children": _start_writer_manager()}


def _session(sid: int) -> list[psutil.Process]:
    """Live (non-zombie) processes of session ``sid``."""
    found = []
    for process in psutil.process_iter():
        try:
            if os.getsid(process.pid) == sid and process.status() != psutil.STATUS_ZOMBIE:
                found.append(process)
        except (psutil.Error, ProcessLookupError):
            continue
    return found


def _describe(processes: list[psutil.Process]) -> list[str]:
    described = []
    for process in processes:
        try:
            described.append(f"{process.pid} {' '.join(process.cmdline())[:120]}")
        except psutil.Error:
            continue
    return described


def _wait_until_gone(sid: int, deadline_s: float) -> list[str]:
    """Survivors of session ``sid`` after ``deadline_s`` (killed then, so nothing leaks)."""
    end = time.monotonic() + deadline_s
    while (alive := _session(sid)) and time.monotonic() < end:
        time.sleep(0.1)
    survivors = _describe(alive)
    for process in alive:
        try:
            process.kill()
        except psutil.Error:
            pass
    return survivors


def _writer_managers_under_ray(sid: int) -> list[psutil.Process]:
    """Spawned multiprocessing children of Ray actors in session ``sid``."""
    found = []
    for process in _session(sid):
        try:
            parent = process.parent()
            if "multiprocessing.spawn" in " ".join(process.cmdline()) and parent is not None:
                if parent.name().startswith("ray::"):
                    found.append(process)
        except psutil.Error:
            continue
    return found


def _names(processes: list[psutil.Process]) -> str:
    return " ".join(_describe(processes))


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from megatron_fipo.data.synthetic import SyntheticTaskConfig, prepare_synthetic

    base = tmp_path_factory.mktemp("lifetime")
    paths = prepare_synthetic(base, SyntheticTaskConfig(num_train=32, num_eval=4))
    overrides = [
        f"data.train_files=[{paths.train_file}]",
        f"data.eval_files=[{paths.eval_file}]",
        f"model.tokenizer_path={paths.tokenizer_dir}",
        "model.hf_model_path=null",
        "data.train_batch_size=2",
        "data.gen_batch_size=2",
        "data.ppo_mini_batch_size=2",
        "parallelism.micro_batch_size=2",
        "rollout.n_samples_per_prompt=2",
        "rollout.max_response_length=8",
        "algorithm.overlong_buffer.len=2",
        "algorithm.dynamic_sampling.enable=false",
        "model.architecture.hidden_size=32",
        "model.architecture.intermediate_size=64",
        "model.architecture.num_hidden_layers=1",
        "model.architecture.num_attention_heads=2",
        "model.architecture.num_key_value_heads=1",
        "trainer.total_training_steps=100",
        "trainer.save_freq=1",
        "trainer.eval_before_train=false",
        f"trainer.output_dir={base / 'run'}",
    ]
    command = [sys.executable, "-m", "megatron_fipo.cli", "--config"]
    return [*command, str(ROOT / "configs/tiny-cpu.yaml"), "--quiet", *overrides], base / "run"


def test_a_run_killed_by_process_group_leaves_nothing(tiny_run):
    command, output = tiny_run
    log = (output.parent / "run.log").open("w")
    run = subprocess.Popen(command, stdout=log, stderr=log, start_new_session=True, cwd=ROOT)
    try:
        end = time.monotonic() + 300
        while not (output / "checkpoints/step_000001/COMPLETE").exists():
            assert run.poll() is None, (output.parent / "run.log").read_text()[-3000:]
            assert time.monotonic() < end, "no checkpoint within 300 s"
            time.sleep(0.2)
        names = _names(_session(run.pid))
        # The scenario is the real one: Ray, its agents, and Megatron's writer manager are up.
        for part in ("raylet", "gcs_server", "ray::DashboardAgent"):
            assert part in names, f"{part} not running: {names}"
        assert _writer_managers_under_ray(run.pid), names
    finally:
        os.killpg(run.pid, signal.SIGKILL)
        run.wait()
    survivors = _wait_until_gone(run.pid, DEADLINE_S)
    assert not survivors, f"alive {DEADLINE_S} s after the kill: {survivors}"


def test_a_ray_driver_killed_alone_leaves_nothing():
    driver = subprocess.Popen(
        [sys.executable, __file__],
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
        cwd=ROOT,
    )
    try:
        line = driver.stdout.readline()
        assert line, "the driver ended before its workers were up"
        workers = json.loads(line)
        names = _names(_session(driver.pid))
        assert "ray::RuntimeEnvAgent" in names and "ray::DashboardAgent" in names, names
        assert all(worker["children"] for worker in workers), workers
    finally:
        driver.kill()  # the driver only: Ray's processes must notice by themselves
        driver.wait()
    survivors = _wait_until_gone(driver.pid, DEADLINE_S)
    assert not survivors, f"alive {DEADLINE_S} s after the kill: {survivors}"


def _writer_children(rank: int, world_size: int) -> list[int]:
    return _start_writer_manager()


def test_a_killed_harness_rank_takes_its_children_along():
    from megatron_harness import WorkerWorld

    world = WorkerWorld(1)
    (children,) = world.run(_writer_children)
    assert children, "the writer manager did not start"
    world.close(force=True)  # SIGKILL, as after a hung case
    end = time.monotonic() + DEADLINE_S
    while (alive := [pid for pid in children if _running(pid)]) and time.monotonic() < end:
        time.sleep(0.1)
    for pid in alive:
        os.kill(pid, signal.SIGKILL)
    assert not alive, f"children of the killed rank still alive after {DEADLINE_S} s: {alive}"


def _running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


LEAKY_TEST = """
import subprocess

def test_leaks():
    # sh exits at once: its sleep is orphaned, re-parented to the session's pytest
    command = "sleep 600 >/dev/null 2>&1 & echo $!"
    out = subprocess.run(["sh", "-c", command], capture_output=True, text=True)
    open("leaked.pid", "w").write(out.stdout.strip())
"""


def test_the_session_check_fails_a_test_run_that_leaks_and_ends_the_leak(tmp_path):
    shutil.copy(Path(__file__).with_name("conftest.py"), tmp_path / "conftest.py")
    (tmp_path / "test_leaky.py").write_text(LEAKY_TEST)
    env = {**os.environ, "FIPO_TEST_LEFTOVER_GRACE_S": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_leaky.py"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    leaked = int((tmp_path / "leaked.pid").read_text())
    assert done.returncode == pytest.ExitCode.TESTS_FAILED, done.stdout[-2000:]
    assert "1 passed" in done.stdout and "leaked processes" in done.stdout, done.stdout[-2000:]
    assert f"pid {leaked}: sleep 600" in done.stdout, done.stdout[-2000:]
    assert not _running(leaked), "the session check left the leaked process alive"


def _ray_driver() -> None:
    """Local Ray as the trainer starts it, two gloo ranks each holding a writer manager;
    prints the workers' pids as one JSON line, then waits to be killed."""
    from megatron_fipo.cluster import RayActorGroup, WorkerSlot, init_ray

    init_ray(num_cpus=2)
    slots = [WorkerSlot(bundle_index=0, num_cpus=0.5, num_gpus=0.0) for _ in range(2)]
    group = RayActorGroup(WriterWorker, 2, slots, backend="gloo")
    print(json.dumps(group.run_all("start_writer")), flush=True)
    time.sleep(600)


if __name__ == "__main__":
    _ray_driver()
