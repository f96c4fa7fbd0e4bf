"""Per-device weight routes: which engine process each training rank feeds, and the links that
deliver a bucket there.

Colocated placement puts an engine's processes on the devices of training ranks (one engine
spans ``rollout.engine_tensor_parallel_size`` bundles). After a step, every training rank holds
each full HF-named bucket (:meth:`WeightSync.iter_hf_buckets` with ``everywhere``) and hands it
to the engine process on its own device, by reference (``flat_bucket``): nothing crosses the
driver, the Ray object store or another device. The driver only computes the routes, once.

Links (``link.update(version)`` brackets an update; ``link.load(bucket)`` returns when the
engine holds the bucket, so the sender may reuse the buffer):

- :class:`RayEngineLink`: an engine actor on the same node (the HF engine, CPU or GPU); the
  payload (a shared-memory name or CUDA IPC handle, about a kilobyte) goes as a Ray actor-call
  argument, inline, never through the object store.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from megatron_fipo.rollout.flat_bucket import FlatBucket, share, use_file_system_sharing


@dataclass(frozen=True, slots=True)
class EngineRoute:
    """Where training rank ``rank`` sends its weights: TP rank ``tp_index`` of engine
    ``engine`` (None: this rank feeds no engine)."""

    rank: int
    engine: int | None
    tp_index: int = 0
    handle: Any = None
    """The engine worker's Ray actor handle."""


def colocated_routes(
    train_bundles: Sequence[int], engine_bundles: Sequence[Sequence[int]], handles: Sequence[Any]
) -> list[EngineRoute]:
    """One route per training rank: the engine TP rank on the rank's own bundle (device)."""
    where = {
        bundle: (engine, index)
        for engine, bundles in enumerate(engine_bundles)
        for index, bundle in enumerate(bundles)
    }
    routes = []
    for rank, bundle in enumerate(train_bundles):
        engine, index = where.get(bundle, (None, 0))
        handle = None if engine is None else handles[engine]
        routes.append(EngineRoute(rank, engine, index, handle))
    return routes


def call_engine(handle: Any, method: str, *args: Any) -> Any:
    """``method(*args)`` on an engine worker's actor; its failure is raised here."""
    import ray

    from megatron_fipo.cluster.actor_group import _Failure

    result = ray.get(handle.call.remote(method, args, {}))
    if isinstance(result, _Failure):
        raise result.error()
    return result


class RayEngineLink:
    """Feeds an engine actor on this node: one shared-buffer payload per bucket."""

    def __init__(self, handle: Any) -> None:
        self.handle = handle
        self._version = -1
        use_file_system_sharing()

    @contextlib.contextmanager
    def update(self, version: int) -> Iterator[None]:
        self._version = int(version)
        yield

    def load(self, bucket: FlatBucket) -> None:
        call_engine(self.handle, "load_bucket", share(bucket), self._version)
