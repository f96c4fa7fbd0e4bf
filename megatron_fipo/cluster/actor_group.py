"""A group of Ray actors, each holding one worker object, with torch.distributed set up.

``RayActorGroup(worker_cls, num_workers, slots)`` starts one Ray actor per slot (see
:mod:`megatron_fipo.cluster.placement`). Rank 0's actor reports its node address and a free port;
every actor then gets ``MASTER_ADDR``, ``MASTER_PORT``, ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``
and ``LOCAL_WORLD_SIZE`` and, unless ``init_process_group=False``, joins the group (gloo on
CPU, nccl on GPU) before ``worker_cls(*args, **kwargs)`` is built inside it. Code that calls
``torch.distributed`` or Megatron's ``init_distributed`` in the worker finds the group ready.

``run_all(name, *args)`` calls ``worker.name(*args)`` on every rank and returns the results in
rank order; ``run_each(name, per_rank_args)`` gives each rank its own arguments. A worker that
raises surfaces as :class:`WorkerError` with its rank and its own traceback, as soon as it
fails (the other ranks may be blocked in a collective: call :meth:`RayActorGroup.kill`).

On GPU, Ray restricts each actor's ``CUDA_VISIBLE_DEVICES`` to its GPU, so ``LOCAL_RANK`` (the
device index Megatron selects) is 0 in every actor there; on CPU it is the rank's index among
the ranks of its node.
"""

from __future__ import annotations

import datetime
import os
import socket
import traceback
from collections.abc import Sequence
from typing import Any

from megatron_fipo.cluster.placement import RayPlacement, WorkerSlot

NOSET_CUDA_VISIBLE_DEVICES = "RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES"


class WorkerError(RuntimeError):
    """A method failed inside a worker; the message carries the rank and its traceback."""


class _WorkerHost:
    """Runs inside each Ray actor: owns the distributed environment and the worker object."""

    def __init__(self) -> None:
        self.worker: Any = None
        self.rank = -1

    def node_id(self) -> str:
        import ray

        return ray.get_runtime_context().get_node_id()

    def free_port(self) -> int:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("", 0))
            return sock.getsockname()[1]

    def setup(self, env: dict[str, str], backend: str | None, timeout_minutes: float) -> None:
        """Export the torch.distributed variables and join the process group."""
        os.environ.update(env)
        self.rank = int(env["RANK"])
        if backend is None:
            return
        import torch.distributed as dist

        if backend == "nccl":
            import torch

            torch.cuda.set_device(int(env["LOCAL_RANK"]))
        dist.init_process_group(
            backend=backend,
            rank=self.rank,
            world_size=int(env["WORLD_SIZE"]),
            init_method=f"tcp://{env['MASTER_ADDR']}:{env['MASTER_PORT']}",
            timeout=datetime.timedelta(minutes=timeout_minutes),
        )

    def construct(self, worker_cls: type, args: tuple, kwargs: dict) -> _Failure | None:
        built = self._guard(worker_cls, args, kwargs, f"{worker_cls.__name__}.__init__")
        if isinstance(built, _Failure):
            return built
        self.worker = built
        return None

    def call(self, method: str, args: tuple, kwargs: dict) -> Any:
        if not hasattr(self.worker, method):
            raise AttributeError(f"{type(self.worker).__name__} has no method {method!r}")
        return self._guard(getattr(self.worker, method), args, kwargs, method)

    def _guard(self, function: Any, args: tuple, kwargs: dict, name: str) -> Any:
        # Exceptions are returned, not raised, so the driver gets this rank's traceback as text
        # even when the exception itself cannot be pickled.
        try:
            return function(*args, **kwargs)
        except Exception as error:  # noqa: BLE001 - any worker failure is reported to the driver
            return _Failure(
                self.rank, name, f"{type(error).__name__}: {error}", traceback.format_exc()
            )

    def shutdown(self) -> None:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


class _Failure:
    """A worker exception, carried back as plain text."""

    def __init__(self, rank: int, method: str, summary: str, text: str) -> None:
        self.rank, self.method, self.summary, self.text = rank, method, summary, text

    def error(self) -> WorkerError:
        return WorkerError(
            f"rank {self.rank} failed in {self.method}: {self.summary}\n"
            f"--- traceback of rank {self.rank} ---\n{self.text}"
        )


class RayActorGroup:
    """``num_workers`` Ray actors, each holding ``worker_cls(*worker_args, **worker_kwargs)``."""

    def __init__(
        self,
        worker_cls: type,
        num_workers: int,
        slots: Sequence[WorkerSlot],
        *,
        placement_group: Any = None,
        worker_args: tuple = (),
        worker_kwargs: dict | None = None,
        backend: str | None = "gloo",
        env: dict[str, str] | None = None,
        timeout_minutes: float = 30.0,
        name: str = "worker",
    ) -> None:
        """``backend=None`` skips the process group (e.g. for rollout engines)."""
        if num_workers < 1 or len(slots) != num_workers:
            raise ValueError(
                f"need num_workers >= 1 and one slot per worker, got {num_workers} and {len(slots)} slots"
            )
        if backend not in (None, "gloo", "nccl"):
            raise ValueError(f"backend must be 'gloo', 'nccl' or None, got {backend!r}")

        self.num_workers, self.name = num_workers, name
        self.actors = [self._start(slot, placement_group, env or {}) for slot in slots]
        try:
            self._initialise(
                slots, worker_cls, worker_args, worker_kwargs or {}, backend, timeout_minutes
            )
        except BaseException:
            self.kill()  # no half-built group keeps its resources
            raise

    def _initialise(
        self,
        slots: Sequence[WorkerSlot],
        worker_cls: type,
        worker_args: tuple,
        worker_kwargs: dict,
        backend: str | None,
        timeout_minutes: float,
    ) -> None:
        """Distributed environment and process group on every actor, then the workers."""
        import ray

        # The address Ray registered for each actor's node (what the other nodes can reach).
        node_address = {node["NodeID"]: node["NodeManagerAddress"] for node in ray.nodes()}
        addresses = [node_address[n] for n in ray.get([a.node_id.remote() for a in self.actors])]
        port = ray.get(self.actors[0].free_port.remote())
        envs = _distributed_env(addresses, port, use_gpu=backend == "nccl")
        for rank_env, slot in zip(envs, slots):
            if slot.gpu_ids:
                rank_env["FIPO_GPU_IDS"] = ",".join(map(str, slot.gpu_ids))
        self._gather(
            [a.setup.remote(e, backend, timeout_minutes) for a, e in zip(self.actors, envs)],
            "setup",
        )
        refs = [a.construct.remote(worker_cls, worker_args, worker_kwargs) for a in self.actors]
        self._gather(refs, f"{worker_cls.__name__}.__init__")

    @classmethod
    def training(cls, worker_cls: type, placement: RayPlacement, **kwargs: Any) -> RayActorGroup:
        """One worker per training rank of ``placement``, in rank order (gloo unless told)."""
        slots = placement.train_slots()
        group = placement.placement_group
        return cls(worker_cls, len(slots), slots, placement_group=group, **kwargs)

    @classmethod
    def engines(cls, worker_cls: type, placement: RayPlacement, **kwargs: Any) -> RayActorGroup:
        """One worker per rollout engine of ``placement``, without a process group by default.

        On GPU an engine spans its TP group's GPUs, so Ray is told not to narrow its
        ``CUDA_VISIBLE_DEVICES``; the engine reads its node-local GPU ids from ``FIPO_GPU_IDS``
        (e.g. "4,5,6,7": SGLang's ``base_gpu_id`` is the first, ``tp_size`` the count).
        """
        slots = placement.engine_slots()
        kwargs.setdefault("backend", None)
        kwargs.setdefault("name", "engine")
        if placement.plan.use_gpu:
            kwargs["env"] = {NOSET_CUDA_VISIBLE_DEVICES: "1", **(kwargs.get("env") or {})}
        group = placement.placement_group
        return cls(worker_cls, len(slots), slots, placement_group=group, **kwargs)

    def _start(self, slot: WorkerSlot, group: Any, env: dict[str, str]) -> Any:
        import ray
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        strategy = None
        if group is not None:
            strategy = PlacementGroupSchedulingStrategy(
                placement_group=group, placement_group_bundle_index=slot.bundle_index
            )
        host = ray.remote(_WorkerHost).options(
            num_cpus=slot.num_cpus,
            num_gpus=slot.num_gpus,
            scheduling_strategy=strategy,
            runtime_env={"env_vars": env} if env else None,
        )
        return host.remote()

    def run_all(self, method: str, *args: Any, **kwargs: Any) -> list[Any]:
        """``worker.method(*args, **kwargs)`` on every rank; results in rank order."""
        return self._gather([a.call.remote(method, args, kwargs) for a in self.actors], method)

    def run_each(self, method: str, per_rank_args: Sequence[tuple]) -> list[Any]:
        """``worker.method(*per_rank_args[rank])`` on every rank; results in rank order."""
        if len(per_rank_args) != self.num_workers:
            raise ValueError(
                f"{method}: {len(per_rank_args)} argument tuples for {self.num_workers} ranks"
            )
        refs = [
            a.call.remote(method, tuple(args), {}) for a, args in zip(self.actors, per_rank_args)
        ]
        return self._gather(refs, method)

    def run_rank(self, rank: int, method: str, *args: Any, **kwargs: Any) -> Any:
        """``worker.method(...)`` on one rank only (no collectives inside, or the others hang)."""
        ref = self.actors[rank].call.remote(method, args, kwargs)
        return self._gather([ref], method, ranks=[rank])[0]

    def _gather(self, refs: list, method: str, ranks: Sequence[int] | None = None) -> list[Any]:
        """Results in order; raises on the first failure, without waiting for the other ranks."""
        import ray

        ranks = range(len(refs)) if ranks is None else ranks
        index_of = {ref: index for index, ref in enumerate(refs)}
        results: dict[int, Any] = {}
        pending = list(refs)
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            index = index_of[done[0]]
            try:
                value = ray.get(done[0])
            except ray.exceptions.RayError as error:  # the actor process itself died
                raise WorkerError(
                    f"{self.name} rank {ranks[index]} died during {method}: {error}"
                ) from None
            if isinstance(value, _Failure):
                raise value.error()
            results[index] = value
        return [results[index] for index in range(len(refs))]

    def kill(self) -> None:
        """End every actor now (a failed collective leaves the others blocked)."""
        import ray

        for actor in self.actors:
            ray.kill(actor, no_restart=True)

    def shutdown(self) -> None:
        """Leave the process group cleanly, then end the actors."""
        import ray

        ray.get([actor.shutdown.remote() for actor in self.actors])
        self.kill()


def _distributed_env(addresses: Sequence[str], port: int, use_gpu: bool) -> list[dict[str, str]]:
    """torch.distributed variables per rank; rank 0's node is the master."""
    per_node: dict[str, int] = {}
    local_ranks = []
    for address in addresses:
        local_ranks.append(per_node.get(address, 0))
        per_node[address] = local_ranks[-1] + 1
    return [
        {
            "MASTER_ADDR": addresses[0],
            "MASTER_PORT": str(port),
            "RANK": str(rank),
            "WORLD_SIZE": str(len(addresses)),
            # Ray narrows CUDA_VISIBLE_DEVICES to the actor's own GPU: device 0 in each actor.
            "LOCAL_RANK": "0" if use_gpu else str(local_ranks[rank]),
            "LOCAL_WORLD_SIZE": str(per_node[address]),
        }
        for rank, address in enumerate(addresses)
    ]


def init_ray(num_cpus: int | None = None, num_gpus: int | None = None) -> None:
    """Join the cluster named by ``RAY_ADDRESS`` (set by launch/train_32b.sh), else start Ray here.

    A local start (one-machine runs, tests) binds to the loopback address without a dashboard;
    ``num_cpus`` / ``num_gpus`` apply only to it (a running cluster has its own).
    """
    import ray

    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, logging_level="ERROR")
        return
    ray.init(
        num_cpus=num_cpus,
        num_gpus=num_gpus,
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        logging_level="ERROR",
    )
