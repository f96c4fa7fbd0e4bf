"""A persistent world of N gloo processes that runs many test cases.

Spawning a world (and importing torch + megatron in it) costs seconds per process, so a test
module starts one :class:`WorkerWorld` per world size (a module-scoped fixture) and sends it
picklable functions::

    @pytest.fixture(scope="module")
    def world2():
        with WorkerWorld(2) as world:
            yield world

    def case(rank, world_size, x):        # module-level, so spawn can pickle it by name
        ...
        return something_picklable

    results = world2.run(case, 3)          # one result per rank, in rank order

Every worker has ``torch.distributed`` initialised (gloo on loopback, the store served on
127.0.0.1 only), one thread for torch (the machine has two cores shared by all workers), the
known harmless third-party warnings filtered, and its working directory unchanged. A worker
dies with the process that created the world (also when that process is SIGKILLed), and
whatever a worker starts (Megatron's checkpoint-writer processes) dies with the worker. A case that raises on any rank makes :meth:`WorkerWorld.run` raise with every
rank's traceback; a case that hangs (a collective some rank skipped) hits ``timeout_s`` and
the world is torn down, so later cases fail fast instead of hanging.
"""

from __future__ import annotations

import atexit
import os
import queue
import traceback
from collections.abc import Callable
from typing import Any

import torch.multiprocessing as mp

from megatron_fipo import lifetime
from megatron_fipo.megatron.distributed import free_port, set_local_world_env


def _worker(rank: int, world_size: int, port: int, parent_pid: int, tasks, results) -> None:
    # PDEATHSIG follows the creating thread: worlds are made by pytest's main thread.
    lifetime.die_with_parent(parent_pid)
    lifetime.guard_group()
    set_local_world_env(rank, world_size, port)
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch
    import torch.distributed as dist

    from megatron_fipo.megatron.cpu_compat import filter_known_warnings
    from megatron_fipo.megatron.distributed import init_process_group_from_env

    filter_known_warnings()
    torch.set_num_threads(1)
    init_process_group_from_env("gloo")
    while True:
        task = tasks.get()
        if task is None:
            break
        func, args, kwargs = task
        try:
            results.put((rank, True, func(rank, world_size, *args, **kwargs)))
        except BaseException:  # noqa: BLE001 - reported to the parent with the traceback
            results.put((rank, False, traceback.format_exc()))
    dist.destroy_process_group()


class WorkerWorld:
    """``world_size`` persistent spawned processes sharing one gloo process group."""

    def __init__(self, world_size: int, timeout_s: float = 300.0) -> None:
        if world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {world_size}")
        self.world_size = world_size
        self.timeout_s = timeout_s
        context = mp.get_context("spawn")
        self._results = context.Queue()
        self._tasks = [context.Queue() for _ in range(world_size)]
        port = free_port()
        self._processes = [
            context.Process(
                target=_worker,
                args=(rank, world_size, port, os.getpid(), self._tasks[rank], self._results),
                # Not daemonic: Megatron's checkpoint save starts its own child processes.
                daemon=False,
            )
            for rank in range(world_size)
        ]
        for process in self._processes:
            process.start()
        # Non-daemonic children would block interpreter exit if a caller forgot close().
        atexit.register(self.close, force=True)

    def run(self, func: Callable[..., Any], *args: Any, **kwargs: Any) -> list[Any]:
        """Runs ``func(rank, world_size, *args, **kwargs)`` on every rank; results in rank order."""
        if not self._processes:
            raise RuntimeError("this WorkerWorld is closed (an earlier case failed or hung)")
        for task_queue in self._tasks:
            task_queue.put((func, args, kwargs))
        outcomes: dict[int, tuple[bool, Any]] = {}
        while len(outcomes) < self.world_size:
            try:
                rank, ok, value = self._results.get(timeout=self.timeout_s)
            except queue.Empty:
                self.close(force=True)
                raise TimeoutError(
                    f"{func.__name__} did not finish on ranks "
                    f"{sorted(set(range(self.world_size)) - set(outcomes))} in {self.timeout_s}s"
                ) from None
            outcomes[rank] = (ok, value)
            if not ok:
                # The other ranks are likely blocked in a collective with the failed one.
                self.close(force=True)
                raise RuntimeError(f"{func.__name__} failed on rank {rank}:\n{value}")
        return [outcomes[rank][1] for rank in range(self.world_size)]

    def close(self, force: bool = False) -> None:
        """Stops the workers (politely unless ``force``)."""
        for process, task_queue in zip(self._processes, self._tasks):
            if not force and process.is_alive():
                task_queue.put(None)
        for process in self._processes:
            process.join(timeout=0 if force else 30)
            if process.is_alive():
                process.kill()
                process.join(timeout=10)
        self._processes = []
        atexit.unregister(self.close)

    def __enter__(self) -> WorkerWorld:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
