"""What runs inside the Ray actors: one training rank (:class:`TrainWorker`) and one rollout
engine (:class:`EngineWorker`).

Training ranks hold a :class:`MegatronActor` and a :class:`WeightSync`; every method is called
on all ranks together (:meth:`RayActorGroup.run_all`). A step's batch arrives once (one Ray
object, fetched once per node) and each rank runs the whole training phase on its share
(:meth:`TrainWorker.train_rollout`). After it, every rank hands the full weights to the engine
process on its own device (:mod:`megatron_fipo.cluster.engine_links`), bucket by bucket and by
reference, so peak extra memory stays about one bucket and no weight crosses the driver.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from collections.abc import Sequence
from typing import Any

import torch

from megatron_fipo.algorithms.losses import PolicyLossConfig
from megatron_fipo.config import FipoConfig, to_dict


def hf_config_of(config: FipoConfig) -> Any:
    """The transformers config of the policy: the checkpoint's, else the inline architecture."""
    from transformers import AutoConfig

    if config.model.hf_model_path:
        return AutoConfig.from_pretrained(config.model.hf_model_path)
    if config.model.architecture is None:
        raise ValueError("model.hf_model_path or model.architecture must be set")
    fields = to_dict(config.model.architecture)
    return AutoConfig.for_model(fields.pop("model_type"), **fields)


def loss_config_of(config: FipoConfig) -> PolicyLossConfig:
    algorithm = config.algorithm
    names = PolicyLossConfig.__dataclass_fields__
    return PolicyLossConfig(**{name: getattr(algorithm, name) for name in names})


class TrainWorker:
    """One Megatron rank: old log-probs, mini-batch updates, weight sync, checkpoints."""

    def __init__(self, config: FipoConfig, init_checkpoint: str | None = None) -> None:
        from megatron_fipo.megatron.actor import MegatronActor
        from megatron_fipo.rollout.weight_sync import WeightSync, WeightSyncConfig

        torch.manual_seed(config.trainer.seed)
        self.hf_config = hf_config_of(config)
        self.actor = MegatronActor(
            self.hf_config,
            config.model,
            config.parallelism,
            config.optimizer,
            loss_config_of(config),
            temperature=config.rollout.temperature,
            seed=config.trainer.seed,
            optimizer_checkpoint_format=config.trainer.optimizer_checkpoint_format,
        )
        if init_checkpoint:
            self.actor.load(init_checkpoint, load_optimizer=False)
        self.offload_during_rollout = config.optimizer.offload_during_rollout
        self.link: Any = None
        self.route: Any = None
        self.reach = "all_ranks"
        self.weight_sync = WeightSync(
            self.actor.named_parameters_for_sync,
            self.hf_config,
            WeightSyncConfig(
                bucket_bytes=config.rollout.weight_sync_bucket_bytes, reuse_buffers=True
            ),
        )

    def train_rollout(self, batch: Any, mini_batch_rows: int, ppo_epochs: int) -> dict[str, float]:
        """The whole training phase of a step on this rank: old log-probs, then ``ppo_epochs``
        passes of one optimizer step per ``mini_batch_rows`` consecutive rows of ``batch``.

        ``batch`` (an :class:`ActorBatch`, or a Ray ref to it: one copy per node) is handed over
        once; this rank keeps its data-parallel share of every mini-batch (token balanced,
        :func:`balanced_partition`) and computes old log-probs for exactly those rows, so no
        log-prob crosses a process. Returns metrics (the same on every rank): the optimizer
        steps' averages, the engine-vs-actor log-prob agreement, and the old log-prob time.
        """
        import ray
        from megatron.core import parallel_state

        from megatron_fipo.batch import balanced_partition

        if isinstance(batch, ray.ObjectRef):
            batch = ray.get(batch)
        dp_size = parallel_state.get_data_parallel_world_size()
        dp_rank = parallel_state.get_data_parallel_rank()
        mini_batches = [
            range(start, min(start + mini_batch_rows, len(batch)))
            for start in range(0, len(batch), mini_batch_rows)
        ]
        shares = []  # this rank's rows of each mini-batch, as positions in `mine`
        mine: list[int] = []
        for rows in mini_batches:
            part = balanced_partition(batch.lengths[list(rows)], dp_size)[dp_rank]
            shares.append(list(range(len(mine), len(mine) + len(part))))
            mine.extend(rows[i] for i in part)
        local = batch.select(mine)
        self.actor.restore_train_state()  # a no-op unless offloaded after the last phase
        start = time.perf_counter()
        local.old_log_probs = self.actor.compute_log_probs(local)
        metrics = {"time/old_log_probs_s": time.perf_counter() - start}
        metrics.update(_engine_agreement(local))
        history = [
            self.actor.train_step(local.select(share))
            for _ in range(ppo_epochs)
            for share in shares
        ]
        metrics.update(average_steps(history))
        if self.offload_during_rollout:
            self.actor.offload_train_state()  # the engines' KV cache may use it while they generate
        return metrics

    def connect_engines(self, routes: list[Any]) -> None:
        """Every rank with every rank's :class:`EngineRoute` (the groups of the training ranks
        that feed one SGLang engine are created collectively, in engine order)."""
        import torch.distributed as dist

        from megatron_fipo.cluster import engine_links as links

        groups = {}
        for engine in sorted({r.engine for r in routes if r.kind == "sglang_ipc"}):
            peers = next(r.peers for r in routes if r.engine == engine)
            if len(peers) > 1:
                groups[engine] = dist.new_group(list(peers))
        route = routes[dist.get_rank()]
        self.route = route
        self.reach = "own_stage" if any(r.kind == "sglang_nccl" for r in routes) else "all_ranks"
        if route.kind == "engine_weights":
            ask = functools.partial(links.call_engine, route.handle, "weights_payload")
            self.link = links.EngineWeightsLink(ask)
        elif route.kind == "sglang_ipc":
            self.link = links.SGLangTensorLink(route, groups.get(route.engine))
        elif route.kind == "sglang_nccl":
            _check_sender(route)
            self.link = links.SGLangBroadcastLink(route, _node_address())
        else:
            self.link = None

    def sync_weights(self, version: int, engine_servers: list[list[Any]] = ()) -> int:
        """All ranks together: the weights go where this rank's route says (see
        :mod:`megatron_fipo.cluster.engine_links`); ``engine_servers``: each engine's current
        server specs (SGLang), from its ``begin_weight_update``."""
        from megatron.core import parallel_state

        if self.reach == "own_stage" and (
            parallel_state.get_data_parallel_rank() or parallel_state.get_context_parallel_rank()
        ):
            return self.weight_sync.version  # replicas hold the same weights: replica 0 sends
        if self.route.kind == "sglang_ipc":
            servers = engine_servers[self.route.engine]
        else:
            servers = [spec for specs in engine_servers for spec in specs]
        link = _LinkWithServers(self.link, servers) if self.link is not None else None
        return self.weight_sync.push(link, version, self.reach)

    def engine_route(self) -> Any:
        """This rank's :class:`EngineRoute` (set by ``connect_engines``)."""
        return self.route

    def gpu_memory(self) -> tuple[float, float] | None:
        """(free, total) GiB of this rank's GPU (every process on it counted); None without
        CUDA (e.g. Ray's logical GPUs in tests)."""
        if not torch.cuda.is_available():
            return None
        free, total = torch.cuda.mem_get_info()
        return free / 2**30, total / 2**30

    def save(self, path: str) -> None:
        self.actor.save(path)

    def digest_files(self, root: str, names: list[str]) -> dict[str, Any]:
        """Size and sha256 of checkpoint files (fsynced first): this rank's share of the work."""
        from megatron_fipo.run_state import digest_files

        return digest_files(root, names)

    def load(self, path: str) -> None:
        self.actor.load(path, load_optimizer=True)


class _LinkWithServers:
    """A link whose ``update`` also receives the engine servers of this sync."""

    def __init__(self, link: Any, servers: list[Any]) -> None:
        self.link, self.servers = link, servers

    def update(self, version: int) -> Any:
        return self.link.update(version, self.servers)

    @property
    def targets(self) -> Any:
        return self.link.targets

    def load(self, bucket: Any, last: bool) -> None:
        self.link.load(bucket, last)


def _check_sender(route: Any) -> None:
    """A ``nccl`` sender must be TP rank 0 of replica 0 of the stage it sends."""
    from megatron.core import parallel_state as ps

    where = (
        ps.get_pipeline_model_parallel_rank(),
        ps.get_tensor_model_parallel_rank(),
        ps.get_data_parallel_rank(),
        ps.get_context_parallel_rank(),
    )
    if where != (route.stage, 0, 0, 0):
        raise RuntimeError(
            f"rank {route.rank} was routed to send stage {route.stage}'s weights but is "
            f"(stage, TP, DP, CP) = {where}: the rank order is not Megatron's default"
        )


def _node_address() -> str:
    """The address of this node other nodes reach (Ray's record of it)."""
    import ray

    return ray.util.get_node_ip_address()


def _engine_agreement(batch: Any) -> dict[str, float]:
    """How far the engine's sampled-token log-probs are from the actor's recomputed ones, over
    every data-parallel rank's rows sampled with the actor's current weights (``fresh``; the
    dynamic-sampling surplus from an earlier step is left out). A weight-sync or numerics
    problem shows here first; FIPO itself uses the actor's."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    if batch.rollout_log_probs is None:
        return {}
    width = batch.old_log_probs.shape[1]
    valid = torch.arange(width) < batch.response_lengths[:, None]
    if batch.fresh is not None:
        valid = valid & batch.fresh[:, None]
    diff = (batch.rollout_log_probs[:, :width] - batch.old_log_probs).abs()
    diff = torch.where(valid, diff, 0.0).double()
    totals = torch.stack([diff.sum(), valid.sum().double()])
    largest = diff.max().reshape(1)
    device = batch.old_log_probs.device
    totals, largest = totals.to(device), largest.to(device)
    group = parallel_state.get_data_parallel_group()
    dist.all_reduce(totals, group=group)
    dist.all_reduce(largest, op=dist.ReduceOp.MAX, group=group)
    if totals[1] == 0:  # every row was surplus from an earlier step
        return {}
    return {
        "rollout/logprob_diff_mean": float(totals[0] / totals[1]),
        "rollout/logprob_diff_max": float(largest[0]),
    }


def average_steps(history: list[dict[str, float]]) -> dict[str, float]:
    """Mean over optimizer steps; ``*_max`` / ``*_min`` keys take the extreme instead."""
    out: dict[str, float] = {}
    for key in history[0]:
        values = [h[key] for h in history if key in h]
        if key.endswith("_max"):
            out[key] = max(values)
        elif key.endswith("_min"):
            out[key] = min(values)
        else:
            out[key] = sum(values) / len(values)
    out["actor/num_optimizer_steps"] = float(len(history))
    return out


class EngineWorker:
    """One rollout engine: the HF engine on CPU, an SGLang engine (its own servers) on GPU."""

    def __init__(self, config: FipoConfig, hf_config: Any, model_path: str | None = None) -> None:
        self.config = config
        threads = os.environ.get("OMP_NUM_THREADS")
        if threads:
            torch.set_num_threads(int(threads))
        rollout = config.rollout
        if rollout.engine == "hf":
            from megatron_fipo.rollout.hf_engine import HFEngineConfig, HFRolloutEngine

            self.engine = HFRolloutEngine(
                HFEngineConfig(
                    model_path=model_path or "",
                    dtype=config.model.dtype,
                    max_batch_size=rollout.hf_max_batch_size,
                    seed=config.trainer.seed,
                ),
                hf_config=hf_config,
            )
        else:
            self.engine = _sglang_engine(config, model_path)

    def generate(self, requests: Sequence[Any]) -> list[Any] | None:
        """The samples, or None when a restarted server waits for weights (sync, then retry)."""
        from megatron_fipo.rollout.engine import WeightsNeeded

        try:
            return self.engine.generate(requests)
        except WeightsNeeded:
            return None

    def release_memory(self, tags: list[str] | None = None) -> None:
        """Hand the device memory to the colocated training ranks (all, or ``tags``)."""
        self.engine.pause(tags)

    def resume_memory(self, tags: list[str] | None = None) -> None:
        self.engine.resume(tags)

    def weight_transport(self) -> str:
        """How this engine takes weights (the kind of route its training ranks use)."""
        if self.config.rollout.engine == "hf":
            return "engine_weights"
        return "sglang_ipc" if self.config.rollout.weight_sync_mode == "ipc" else "sglang_nccl"

    def begin_weight_update(self) -> list[Any]:
        """Open an update that the training ranks fill; the SGLang server specs they post to
        (the HF engine: none, its training rank writes into ``weights_payload``)."""
        return self.engine.begin_external_update()

    def weights_payload(self) -> str:
        """A reference to the HF engine's weight tensors for the training rank beside it."""
        return self.engine.weights_payload()

    def end_weight_update(self, version: int, succeeded: bool) -> None:
        self.engine.end_external_update(version, succeeded)

    def health(self) -> Any:
        return self.engine.health()

    def shutdown(self) -> None:
        self.engine.shutdown()


def _sglang_engine(config: FipoConfig, model_path: str | None) -> Any:
    """An SGLang engine on the GPUs Ray reserved for this actor (``FIPO_GPU_IDS``)."""
    from megatron_fipo.rollout.sglang_engine import SGLangRolloutEngine

    return SGLangRolloutEngine(_sglang_engine_config(config, model_path)).start()


def _sglang_engine_config(config: FipoConfig, model_path: str | None) -> Any:
    """The engine's settings from the run config. ``FIPO_GPU_IDS`` lists the physical GPUs Ray
    reserved (it leaves CUDA_VISIBLE_DEVICES unset here): the servers and the staging of tensor
    updates use them, starting at the first."""
    from megatron_fipo.rollout.sglang_engine import SGLangEngineConfig

    rollout = config.rollout
    path = model_path or config.model.hf_model_path
    if not path:
        raise ValueError("rollout.engine=sglang needs model.hf_model_path (the servers load it)")
    gpu_ids = [int(i) for i in os.environ.get("FIPO_GPU_IDS", "0").split(",")]
    if os.environ.get(SERVERS_ON_NODE_ADDRESS) == "1":
        rollout = dataclasses.replace(rollout, host=server_host(rollout.host, _node_address()))
    return SGLangEngineConfig(
        model_path=path, rollout=rollout, dtype=config.model.dtype, base_gpu_id=gpu_ids[0]
    )


SERVERS_ON_NODE_ADDRESS = "FIPO_SERVERS_ON_NODE_ADDRESS"
"""Set (to "1") for engine workers whose servers other nodes must reach (see
:func:`servers_reached_from_other_nodes`)."""


def servers_reached_from_other_nodes(config: FipoConfig, node_addresses: Sequence[str]) -> bool:
    """Whether training ranks on other nodes talk to the SGLang servers themselves: with the
    ``nccl`` route each pipeline stage's sending rank posts the update requests, and in a run
    over several machines it may sit on another node. Colocated (``ipc``), the posting rank
    shares the engine's node, and the driver reaches servers only through their engine worker."""
    return (
        config.rollout.engine == "sglang"
        and config.rollout.weight_sync_mode == "nccl"
        and len(set(node_addresses)) > 1
    )


def server_host(configured: str, node_address: str) -> str:
    """Where servers that other nodes must reach listen: the node's address in place of a
    loopback ``rollout.host`` (the default); any other configured address is kept."""
    loopback = configured.startswith("127.") or configured in ("localhost", "::1")
    return node_address if loopback else configured
