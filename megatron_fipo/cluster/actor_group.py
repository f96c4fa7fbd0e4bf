"""A group of Ray actors, each holding one worker object, with torch.distributed set up.

``RayActorGroup(worker_cls, num_workers, slots)`` starts one Ray actor per slot (see
:mod:`megatron_fipo.cluster.placement`). Rank 0's actor listens on the rendezvous address
(:func:`rendezvous_address`: loopback when every rank is on one machine, else rank 0's node
address) and reports the port; every actor then gets ``MASTER_ADDR``, ``MASTER_PORT``,
``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and ``LOCAL_WORLD_SIZE`` and, unless ``backend=None``,
joins the group (gloo on CPU, nccl on GPU) before ``worker_cls(*args, **kwargs)`` is built
inside it. Code that calls ``torch.distributed`` or Megatron's ``init_distributed`` in the worker
finds the group ready.

Each actor leads its own process group, and a guardian ends that group as soon as the actor is
gone, however it ended (:func:`megatron_fipo.lifetime.guard_group`): what the worker started,
such as Megatron's checkpoint-writer processes, never outlives it. The actors filter the known
harmless third-party warnings (:func:`megatron_fipo.megatron.cpu_compat.filter_known_warnings`).

``run_all(name, *args)`` calls ``worker.name(*args)`` on every rank and returns the results in
rank order; ``run_each(name, per_rank_args)`` gives each rank its own arguments. A worker that
raises surfaces as :class:`WorkerError` with its rank and its own traceback, as soon as it
fails (the other ranks may be blocked in a collective: call :meth:`RayActorGroup.kill`). When
a rank's node leaves the cluster (its raylet died, the machine went down), the call raises
:class:`NodeLostError` instead, one line naming the node, once Ray has declared it dead (Ray's
health check: about 15 s); a rank whose collective broke because a peer's node went away is
reported the same way.

Ranks on several machines rendezvous on rank 0's node address, and every rank's gloo groups
listen on its own node's address (:func:`bind_gloo_to`), not on what the host name resolves to
(often 127.0.0.1 through /etc/hosts, which another node would then be told to connect to).

On GPU, Ray restricts each actor's ``CUDA_VISIBLE_DEVICES`` to its GPU, so ``LOCAL_RANK`` (the
device index Megatron selects) is 0 in every actor there; on CPU it is the rank's index among
the ranks of its node.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import time
import traceback
from collections.abc import Iterator, Sequence
from typing import Any

from megatron_fipo import lifetime
from megatron_fipo.cluster.placement import RayPlacement, WorkerSlot

NOSET_CUDA_VISIBLE_DEVICES = "RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES"
LOOPBACK = "127.0.0.1"
# Ray's switch for "no multi-node cluster"; off, it keeps a loopback node address as given.
RAY_SINGLE_MACHINE_SWITCH = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
NODE_ADDRESS_ENV = "FIPO_NODE_ADDRESS"
"""Set for ranks of a world that spans machines: the rank's node address (gloo listens there)."""
LOST_NODE_WAIT_S = 35.0
"""How long a rank whose connection broke waits for Ray to declare its node dead (Ray's health
check misses 5 beats 3 s apart: about 15 s) before it is reported as a plain worker death."""
PEER_GRACE_S = 20.0
"""When a rank raises, how long the other ranks get to show that one of them is gone (a peer
whose node died breaks the collective the raising rank was in). With LOST_NODE_WAIT_S it keeps a
lost node's error within a minute of the loss."""


class WorkerError(RuntimeError):
    """A method failed inside a worker; the message carries the rank and its traceback."""


class NodeLostError(WorkerError):
    """A Ray node holding ranks of a group left the cluster; the message is one line."""


class _WorkerHost:
    """Runs inside each Ray actor: owns the distributed environment and the worker object."""

    def __init__(self) -> None:
        from megatron_fipo.megatron.cpu_compat import filter_known_warnings

        lifetime.guard_group()
        filter_known_warnings()
        self.worker: Any = None
        self.rank = -1
        self._listener: Any = None

    def node_id(self) -> str:
        import ray

        return ray.get_runtime_context().get_node_id()

    def reserve_rendezvous(self, address: str) -> int:
        """Rank 0: listen on ``address`` (only) on a free port, held until :meth:`setup`."""
        from megatron_fipo.megatron.distributed import listen_socket

        self._listener = listen_socket(address)
        return self._listener.getsockname()[1]

    def setup(self, env: dict[str, str], backend: str | None, timeout_minutes: float) -> None:
        """Export the torch.distributed variables and join the process group."""
        os.environ.update(env)
        self.rank = int(env["RANK"])
        if backend is None:
            return
        if NODE_ADDRESS_ENV in env and "GLOO_SOCKET_IFNAME" not in os.environ:
            bind_gloo_to(env[NODE_ADDRESS_ENV])
        import torch.distributed as dist

        from megatron_fipo.megatron.distributed import rendezvous_store

        if backend == "nccl":
            import torch

            torch.cuda.set_device(int(env["LOCAL_RANK"]))
        world_size, timeout = int(env["WORLD_SIZE"]), datetime.timedelta(minutes=timeout_minutes)
        listener, self._listener = self._listener, None
        store = rendezvous_store(
            env["MASTER_ADDR"], int(env["MASTER_PORT"]), self.rank, world_size, timeout, listener
        )
        dist.init_process_group(
            backend=backend, store=store, rank=self.rank, world_size=world_size, timeout=timeout
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
        self.nodes: dict[str, dict[str, Any]] = {}
        """``ray.nodes()`` entries by node id, as they were when the group started."""
        self.node_ids: list[str] = []
        """The Ray node of each rank."""
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
        self.nodes = {node["NodeID"]: node for node in ray.nodes()}
        self.node_ids = ray.get([a.node_id.remote() for a in self.actors])
        addresses = [self.nodes[n]["NodeManagerAddress"] for n in self.node_ids]
        master = rendezvous_address(addresses)
        port = (
            None if backend is None else ray.get(self.actors[0].reserve_rendezvous.remote(master))
        )
        envs = _distributed_env(addresses, master, port, use_gpu=backend == "nccl")
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
        """Results in order; raises on the first failure, without waiting for the other ranks
        (but see :data:`PEER_GRACE_S`)."""
        import ray

        ranks = list(range(len(refs))) if ranks is None else list(ranks)
        index_of = {ref: index for index, ref in enumerate(refs)}
        results: dict[int, Any] = {}
        pending = list(refs)
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            index = index_of[done[0]]
            value, gone = _fetch(done[0])
            if gone is not None:  # the actor process itself is gone
                raise self._actor_gone(ranks[index], method, gone)
            if isinstance(value, _Failure):
                raise self._failure(value, pending, [ranks[index_of[r]] for r in pending], method)
            results[index] = value
        return [results[index] for index in range(len(refs))]

    def _failure(
        self, failure: _Failure, pending: list, pending_ranks: list[int], method: str
    ) -> WorkerError:
        """The error for a rank that raised: its own, unless another rank turns out gone within
        :data:`PEER_GRACE_S` (a collective breaks when a peer's node dies)."""
        import ray

        if pending:
            done, _ = ray.wait(pending, num_returns=len(pending), timeout=PEER_GRACE_S)
            for ref in done:
                _, gone = _fetch(ref)
                if gone is not None:
                    return self._actor_gone(pending_ranks[pending.index(ref)], method, gone)
        return failure.error()

    def _actor_gone(self, rank: int, method: str, error: Exception) -> WorkerError:
        """:class:`NodeLostError` when the rank's node left the cluster, else the death itself.

        A lost connection to the actor (``ActorUnavailableError``) comes seconds before Ray
        declares the node dead, so that case waits up to :data:`LOST_NODE_WAIT_S`; for any other
        error (an actor Ray already calls dead, a call that failed outside the worker's guard)
        the node's state is known now.
        """
        import ray

        node_id = self.node_ids[rank]
        unavailable = isinstance(error, ray.exceptions.ActorUnavailableError)
        patience = LOST_NODE_WAIT_S if unavailable else 0.0
        deadline = time.monotonic() + patience
        while (state := _node_state(node_id)) is None and time.monotonic() < deadline:
            time.sleep(0.5)
        if state is None:
            return WorkerError(f"{self.name} rank {rank} died during {method}: {error}")
        on_it = [r for r, n in enumerate(self.node_ids) if n == node_id]
        return NodeLostError(
            f"{describe_node(self.nodes[node_id])} left the cluster during {method} ({state}); "
            f"{self.name} rank(s) {', '.join(map(str, on_it))} ran there"
        )

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


def _fetch(ref: Any) -> tuple[Any, Exception | None]:
    """(result, None), or (None, the error) when Ray could not deliver the result (the actor is
    gone, or the call failed outside the worker's guard)."""
    import ray

    try:
        return ray.get(ref), None
    except ray.exceptions.RayError as error:
        return None, error


def _node_state(node_id: str) -> str | None:
    """Why Ray declared the node dead; None while it is alive."""
    import ray

    for node in ray.nodes():
        if node["NodeID"] == node_id and not node["Alive"]:
            return node.get("DeathReasonMessage") or "declared dead by Ray"
    return None


def describe_node(node: dict[str, Any]) -> str:
    """``node 10.0.0.2 (NODE_RANK 1, Ray node <id>)`` from a ``ray.nodes()`` entry."""
    from megatron_fipo.cluster.placement import node_rank_of

    rank = node_rank_of(node.get("Resources") or {})
    named = f"NODE_RANK {rank}, " if rank is not None else ""
    return f"node {node['NodeManagerAddress']} ({named}Ray node {node['NodeID']})"


def bind_gloo_to(address: str) -> None:
    """Every gloo process group this process makes from now on listens on ``address``.

    torch gives a gloo group the device of ``GLOO_SOCKET_IFNAME`` or, unset, of the address the
    host name resolves to, which /etc/hosts often maps to 127.0.0.1: the other nodes would be
    told to connect to that. torch takes another device only through the options of
    ``ProcessGroupGloo``, so the class its group factory calls is replaced by one that passes a
    device on ``address`` (the node's Ray address, which the other nodes reach).
    """
    from torch.distributed import distributed_c10d

    current = distributed_c10d.ProcessGroupGloo
    torch_gloo = getattr(current, "torch_class", current)  # bound before: start from torch's

    class NodeBoundGloo(torch_gloo):
        torch_class = torch_gloo

        def __init__(self, store, rank, size, timeout=datetime.timedelta(minutes=30)):
            options = torch_gloo._Options()
            options._devices = [torch_gloo.create_device(hostname=address)]
            options._timeout = timeout
            super().__init__(store, rank, size, options)

    distributed_c10d.ProcessGroupGloo = NodeBoundGloo


def rendezvous_address(node_addresses: Sequence[str]) -> str:
    """The address rank 0 serves the rendezvous on, from each rank's node address (rank order).

    Every rank on one machine: loopback, so nothing outside the machine can reach the store or
    the collectives. Ranks on several machines (a multi-node run, ``RAY_ADDRESS``): rank 0's
    node address, the one address the other machines can reach; this is the only case that
    listens on a non-loopback interface.
    """
    if len(set(node_addresses)) == 1:
        return LOOPBACK
    return node_addresses[0]


def _distributed_env(
    addresses: Sequence[str], master: str, port: int | None, use_gpu: bool
) -> list[dict[str, str]]:
    """torch.distributed variables per rank; ``port`` None: no process group (no MASTER_*)."""
    per_node: dict[str, int] = {}
    local_ranks = []
    for address in addresses:
        local_ranks.append(per_node.get(address, 0))
        per_node[address] = local_ranks[-1] + 1
    shared: dict[str, str] = {}
    if port is not None:
        shared = {"MASTER_ADDR": master, "MASTER_PORT": str(port)}
        if master == LOOPBACK:
            from megatron_fipo.megatron.distributed import one_machine_network_env

            shared.update(one_machine_network_env())
    spans_machines = port is not None and master != LOOPBACK
    return [
        {
            **shared,
            **({NODE_ADDRESS_ENV: address} if spans_machines else {}),
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

    A local start (one-machine runs, tests) binds every Ray port to 127.0.0.1 (GCS, raylet,
    object manager, the workers' gRPC servers, the runtime-env agent) and runs no dashboard.
    What it starts ends with this process, also after a ``kill -9``
    (:func:`megatron_fipo.lifetime.guard_descendants`). ``num_cpus`` / ``num_gpus`` apply only
    to a local start (a running cluster has its own). Either way this process filters the known
    harmless third-party warnings.
    """
    import ray

    from megatron_fipo.megatron.cpu_compat import filter_known_warnings

    filter_known_warnings()
    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, logging_level="ERROR")
        return
    with _loopback_node():
        ray.init(
            num_cpus=num_cpus,
            num_gpus=num_gpus,
            include_dashboard=False,
            _node_ip_address=LOOPBACK,
            logging_level="ERROR",
        )
    lifetime.guard_descendants()


@contextlib.contextmanager
def _loopback_node() -> Iterator[None]:
    """Let a local Ray start keep 127.0.0.1 as its node address.

    ``ray.init`` replaces a loopback ``_node_ip_address`` by the machine's outward address
    unless Ray's multi-node switch (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER``) is off. The
    variable is read when ray is first imported, which may have happened already here, so
    the constant it sets is switched too. Ray's processes (started inside) inherit the
    variable and are told ``--node-ip-address=127.0.0.1``; their servers then listen on
    127.0.0.1 only. Both are restored afterwards, so a later ``RAY_ADDRESS`` join is unaffected.
    """
    from ray._private import ray_constants

    saved_env, saved_flag = (
        os.environ.get(RAY_SINGLE_MACHINE_SWITCH),
        ray_constants.ENABLE_RAY_CLUSTER,
    )
    os.environ[RAY_SINGLE_MACHINE_SWITCH] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved_flag
        if saved_env is None:
            os.environ.pop(RAY_SINGLE_MACHINE_SWITCH)
        else:
            os.environ[RAY_SINGLE_MACHINE_SWITCH] = saved_env
