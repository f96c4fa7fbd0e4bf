"""The driver's side of sharing devices between rollout engines and training ranks.

One step, colocated (``rollout.colocate``), as the loop drives it::

    generate                     engines hold weights + KV cache (+ CUDA graphs)
    release_engines()            engines release all of it  -> training has the device
    train (old log-probs, steps) the training ranks restore, then (optionally) offload their
                                 optimizer state and gradient buffers
    sync_weights(version)        engines resume their weights -> the training ranks send the new
                                 weights (engine_links) -> engines resume KV cache and graphs
    generate ...

Without colocation the engines keep their memory and only the weight update runs. On GPU the
device memory free on the training ranks' GPUs (every process on them counted) is recorded at
each boundary and reported as ``memory/free_gib_<boundary>`` (the smallest over the ranks).
"""

from __future__ import annotations

from typing import Any

from megatron_fipo.rollout.engine import WEIGHTS_TAG


class EngineLifecycle:
    """Memory hand-over and weight updates between a group of engine workers and the training
    workers (Ray actor groups)."""

    def __init__(self, workers: Any, engines: Any, *, colocated: bool, use_gpu: bool) -> None:
        self.workers = workers
        self.engines = engines
        self.colocated = colocated
        self.use_gpu = use_gpu
        self.version = -1
        """Weights version the engines hold (-1: none synced yet)."""
        self._memory: dict[str, float] = {}

    def release_engines(self) -> None:
        """After generation: colocated engines release every kind of device memory."""
        if self.colocated:
            self.engines.run_all("release_memory")
        self.record_memory("engines_released")

    def sync_weights(self, version: int) -> None:
        """Engines resume their weights' memory, the training ranks send ``version`` into the
        update the engines opened (``begin_weight_update``: the SGLang servers to post to), the
        update is closed (also when it failed), then the engines resume the rest."""
        if self.colocated:
            self.engines.run_all("resume_memory", [WEIGHTS_TAG])
        self.record_memory("weights_resumed")
        servers = self.engines.run_all("begin_weight_update")
        try:
            self.workers.run_all("sync_weights", version, servers)
        except BaseException as error:
            try:
                self.engines.run_all("end_weight_update", version, False)
            except Exception as also:  # noqa: BLE001 - the first failure is the one to report
                error.add_note(f"closing the engines' update also failed: {also}")
            raise
        self.engines.run_all("end_weight_update", version, True)
        self.version = version
        self.record_memory("weights_synced")
        if self.colocated:
            self.engines.run_all("resume_memory")  # KV cache (and CUDA graphs)
        self.record_memory("engines_resumed")

    def record_memory(self, boundary: str) -> None:
        if self.use_gpu:
            seen = [reading for reading in self.workers.run_all("gpu_memory") if reading]
            if seen:
                self._memory[f"memory/free_gib_{boundary}"] = min(free for free, _ in seen)

    def take_memory_metrics(self) -> dict[str, float]:
        metrics, self._memory = self._memory, {}
        return metrics
