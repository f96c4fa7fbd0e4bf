"""Per-device weight routes: where each training rank's weights go after a step, and the links
that deliver a bucket there. Nothing crosses the driver or the Ray object store: the driver only
computes the routes (once) and opens / closes each engine's update session.

``rollout.weight_sync``:

- ``ipc`` (colocated: an engine's processes share the training ranks' devices). Every training
  rank holds each full HF-named bucket (:meth:`WeightSync.iter_hf_buckets`, ``all_ranks``) and
  hands it, by reference (``flat_bucket``: a CUDA IPC handle, or a shared-memory name on CPU),
  to the engine process on its own device:

  - :class:`EngineWeightsLink`: the HF engine on this bundle shares its weight tensors (its
    update payload maps them here) and the rank assembles each bucket's pieces straight into
    them: one copy from the exchanged shards to the engine's weights, nothing sent per bucket;
  - :class:`SGLangTensorLink`: SGLang TP rank ``tp_index`` of the engine spanning this rank's
    device. The engine's training ranks gather their payloads on the first of them, which posts
    them in one ``/update_weights_from_tensor`` (payload ``i`` for TP rank ``i``), then tells
    the others the server has answered (until then each keeps its buffer).

- ``nccl`` (separate placement): TP rank 0 of data-parallel / context-parallel replica 0 of each
  pipeline stage broadcasts its own stage's buckets (``own_stage``) into an update group of its
  own with every engine server rank (:class:`SGLangBroadcastLink`), rendezvousing on its node's
  address.

Links: ``link.update(version, servers)`` brackets an update (``servers``: the engine's current
server specs, which change when a server is restarted); ``link.load(bucket, last)`` returns when
the receiver holds the bucket.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch.distributed as dist

from megatron_fipo.rollout.flat_bucket import FlatBucket, use_file_system_sharing

RouteKind = Literal["engine_weights", "sglang_ipc", "sglang_nccl", "none"]


@dataclass(frozen=True, slots=True)
class EngineRoute:
    """Where training rank ``rank`` sends its weights."""

    rank: int
    kind: RouteKind
    engine: int | None = None
    """The engine fed (ipc), None otherwise."""
    tp_index: int = 0
    """Which TP rank of that engine (ipc)."""
    peers: tuple[int, ...] = ()
    """The training ranks feeding the same engine, by its TP rank (ipc; the first posts)."""
    handle: Any = None
    """The engine worker's Ray actor handle (``engine_weights``: the rank asks it directly for
    its weights' payload, so not even those references pass through the driver)."""
    stage: int = 0
    """The pipeline stage this rank sends (``sglang_nccl``)."""


def colocated_routes(
    train_bundles: Sequence[int],
    engine_bundles: Sequence[Sequence[int]],
    transport: RouteKind,
    handles: Sequence[Any] = (),
) -> list[EngineRoute]:
    """One route per training rank: the engine TP rank on the rank's own bundle (device)."""
    owner = {b: r for r, b in enumerate(train_bundles)}
    where = {
        bundle: (index, position)
        for index, bundles in enumerate(engine_bundles)
        for position, bundle in enumerate(bundles)
    }
    routes = []
    for rank, bundle in enumerate(train_bundles):
        if bundle not in where:
            routes.append(EngineRoute(rank, "none"))
            continue
        index, position = where[bundle]
        peers = tuple(owner[b] for b in engine_bundles[index])
        handle = handles[index] if transport == "engine_weights" else None
        routes.append(EngineRoute(rank, transport, index, position, peers, handle))
    return routes


def broadcast_routes(world_size: int, senders: dict[int, int]) -> list[EngineRoute]:
    """``nccl`` routes: ``senders`` maps a sending rank to its pipeline stage; others send none."""
    return [
        EngineRoute(rank, "sglang_nccl", stage=senders[rank])
        if rank in senders
        else EngineRoute(rank, "none")
        for rank in range(world_size)
    ]


def call_engine(handle: Any, method: str, *args: Any) -> Any:
    """``method(*args)`` on an engine worker's actor; its failure is raised here."""
    import ray

    from megatron_fipo.cluster.actor_group import _Failure

    result = ray.get(handle.call.remote(method, args, {}))
    if isinstance(result, _Failure):
        raise result.error()
    return result


class EngineWeightsLink:
    """Writes straight into the weights of the engine on this bundle (the HF engine): the
    engine's update payload maps its weight tensors here (shared memory on CPU, CUDA IPC on GPU),
    and the bucket assembly copies each piece into them (``targets``); nothing is sent per
    bucket. The engine records the version when the driver closes the update.

    ``payload()``: the engine's ``weights_payload``, asked for at each update (a training
    worker asks the engine worker's Ray actor through :func:`call_engine`; the GPU check asks
    an engine process over a pipe)."""

    def __init__(self, payload: Callable[[], str]) -> None:
        self.payload = payload
        self.targets: dict[str, Any] | None = None
        self._payload: str | None = None
        use_file_system_sharing()

    @contextlib.contextmanager
    def update(self, version: int, servers: Sequence[Any] = ()) -> Iterator[None]:
        from megatron_fipo.rollout.flat_bucket import open_named

        payload = self.payload()
        if payload != self._payload:
            # New storage (first sync, or the engine moved its weights: on GPU a release and
            # resume does). Otherwise the mapping stays, and with it its populated page tables.
            self.targets, self._payload = None, None
            self.targets, self._payload = dict(open_named(payload)), payload
        try:
            yield
        finally:
            if not keeps_mapping(self.targets):
                # CUDA IPC: while this process maps the engine's blocks, the engine cannot free
                # them, so its release after the next generation would hand nothing back.
                self.targets, self._payload = None, None

    def load(self, bucket: FlatBucket, last: bool) -> None:
        """Nothing to send: the pieces are already in the engine's weights."""


def keeps_mapping(targets: dict[str, Any] | None) -> bool:
    """Whether a training rank may keep the engine's weights mapped between updates: shared
    memory on CPU, yes (the engine's storage stays, and the populated page tables make the next
    sync about 2x faster); CUDA IPC, no (a mapped block stays allocated in the engine)."""
    return bool(targets) and all(not t.is_cuda for t in targets.values())


class SGLangTensorLink:
    """Feeds SGLang TP rank ``route.tp_index`` of the engine on this device (see module doc).

    ``group``: the process group of ``route.peers`` (None when the engine has one TP rank).
    """

    def __init__(self, route: EngineRoute, group: Any, timeout_s: float = 3600.0) -> None:
        self.route = route
        self.group = group
        self.timeout_s = timeout_s
        self._server: Any = None
        self._version = -1
        self.targets = None  # buckets are sent, not written in place
        use_file_system_sharing()  # CPU tests; on GPU the buffers are CUDA (IPC handles)

    @property
    def posts(self) -> bool:
        return self.route.tp_index == 0

    @contextlib.contextmanager
    def update(self, version: int, servers: Sequence[Any] = ()) -> Iterator[None]:
        from megatron_fipo.rollout.sglang_server import ServerClient

        self._version = int(version)
        self._server = ServerClient(servers[0]) if self.posts else None
        yield

    def load(self, bucket: FlatBucket, last: bool) -> None:
        from megatron_fipo.rollout.sglang_server import (
            serialize_named_tensors,
            tensor_bucket_payload,
        )

        # SGLang's format: [(name, tensor)], here views of this rank's one flat buffer (one
        # storage: the server maps it once).
        payloads = self._gather(serialize_named_tensors(bucket.named_tensors()))
        error = None
        if self.posts:
            try:
                body = tensor_bucket_payload(payloads, last=last, version=self._version)
                self._server.post_ok("/update_weights_from_tensor", body, self.timeout_s)
            except Exception as failure:  # noqa: BLE001 - every peer must learn of it
                error = f"{type(failure).__name__}: {failure}"
        # The server has opened every payload's buffer (or failed): peers may reuse theirs.
        error = self._broadcast_from_first(error)
        if error is not None:
            raise RuntimeError(f"engine {self.route.engine}: weight bucket refused: {error}")

    def _gather(self, payload: str) -> list[str]:
        if self.group is None:
            return [payload]
        gathered: list[str] | None = [""] * len(self.route.peers) if self.posts else None
        dist.gather_object(payload, gathered, dst=self.route.peers[0], group=self.group)
        return gathered or []

    def _broadcast_from_first(self, value: str | None) -> str | None:
        if self.group is None:
            return value
        holder = [value]
        dist.broadcast_object_list(holder, src=self.route.peers[0], group=self.group)
        return holder[0]


class SGLangBroadcastLink:
    """Sends this pipeline stage's buckets to every engine server over an update group of its
    own (this rank is its rank 0), built on first use and rebuilt when the servers change."""

    def __init__(self, route: EngineRoute, address: str, timeout_s: float = 3600.0) -> None:
        self.route = route
        self.address = address
        """This node's address, which the servers (on other nodes) connect to."""
        self.timeout_s = timeout_s
        self.group_name = f"fipo_weights_stage{route.stage}"
        self.targets = None  # buckets are broadcast, not written in place
        self._group: Any = None
        self._servers: list[Any] = []
        self._specs: tuple[Any, ...] = ()
        self._version = -1

    @contextlib.contextmanager
    def update(self, version: int, servers: Sequence[Any] = ()) -> Iterator[None]:
        from megatron_fipo.rollout.sglang_server import ServerClient, join_update_group

        self._version = int(version)
        specs = tuple(servers)
        if specs != self._specs:
            self._leave()
            self._servers = [ServerClient(spec) for spec in specs]
            tp_sizes = {spec.tp_size for spec in specs}
            if len(tp_sizes) != 1:
                raise ValueError(f"engine servers must share one TP size, got {sorted(tp_sizes)}")
            self._group = join_update_group(
                self._servers,
                host=self.address,
                tp_size=tp_sizes.pop(),
                group_name=self.group_name,
                backend="nccl" if _cuda() else "gloo",
                timeout_s=self.timeout_s,
            )
            self._specs = specs
        yield

    def load(self, bucket: FlatBucket, last: bool) -> None:
        from megatron_fipo.rollout.sglang_server import broadcast_bucket

        try:
            broadcast_bucket(
                self._servers,
                self._group,
                bucket.named_tensors(),
                group_name=self.group_name,
                last=last,
                version=self._version,
                timeout_s=self.timeout_s,
            )
        except Exception:
            self._leave()  # a broadcast left unmatched: the group is out of step
            raise

    def _leave(self) -> None:
        from megatron_fipo.rollout.sglang_server import leave_update_group

        if self._group is not None:
            with contextlib.suppress(Exception):
                leave_update_group(self._servers, self._group, self.group_name)
        self._group, self._servers, self._specs = None, [], ()


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()
