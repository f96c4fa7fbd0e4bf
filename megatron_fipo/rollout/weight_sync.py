"""Weight resharding: the actor's TP / PP-sharded Megatron parameters -> HF-named full tensors.

Every rank of a model-parallel group calls :meth:`WeightSync.iter_hf_tensors` (or :meth:`sync`)
together. Per pipeline stage, its parameters are planned into buckets of at most
``bucket_bytes`` (full, unsharded size; one dtype per bucket). For each bucket:

1. the stage's TP ranks send their shards to TP rank 0 (point-to-point), which receives each
   piece straight into its place in one flat bucket of full Megatron tensors, placed by the
   shard's own TP partition info (dim 0 / dim 1 blocks; SwiGLU ``linear_fc1`` regrouped as
   ``[gate; up]``: the layout of the adapter's ``merge_tensor_parallel``);
2. with PP > 1 the bucket is broadcast from that stage to TP rank 0 of every stage;
3. each receiving rank maps it to HF names with ``Adapter.megatron_to_hf`` (QKV un-interleaved,
   gate/up split, vocab padding stripped) and yields the tensors.

Parameter names arrive with global layer numbers (the actor's ``named_parameters_for_sync``
renumbers PP-local layers), so stages need no offset here. Extra memory is O(one bucket): the
local flat shards (bucket / TP), the gathered pieces and the bucket buffer, plus the adapter's
split copies of the bucket's fused tensors. Yielded tensors are views into or copies of the
bucket; engines copy them into their own parameters before the next bucket is built.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.distributed as dist

from checkpoint_convert.adapters import adapter_for
from megatron_fipo.rollout import bucket_assembly as assembly
from megatron_fipo.rollout.engine import RolloutEngine
from megatron_fipo.rollout.flat_bucket import BucketPacker, FlatBucket, ReusedBuffer

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
Reach = Literal["all_ranks", "stage_leaders", "own_stage"]


@dataclass(kw_only=True, slots=True)
class WeightSyncConfig:
    """How weights travel from the actor to the engines."""

    bucket_bytes: int = 512 * 1024**2
    """Upper bound on one bucket's full-tensor bytes (a larger single tensor gets its own)."""
    reuse_buffers: bool = False
    """Keep the bucket and staging buffers between buckets and syncs instead of allocating them
    afresh (fresh host memory costs page faults: about 4x a copy on CPU). Then a yielded tensor
    is valid only until the next bucket is requested: for engines that copy each tensor as it
    arrives (HFRolloutEngine), not for ones that batch several buckets (SGLang's update buckets).
    :meth:`WeightSync.release_buffers` frees them."""
    dtype: str | None = None
    """Cast for the engine (e.g. bfloat16); None keeps the actor's parameter dtype."""

    def __post_init__(self) -> None:
        if self.bucket_bytes < 1:
            raise ValueError(f"WeightSyncConfig.bucket_bytes must be >= 1, got {self.bucket_bytes}")
        if self.dtype is not None and self.dtype not in _DTYPES:
            raise ValueError(f"WeightSyncConfig.dtype must be one of {sorted(_DTYPES)} or None")


@dataclass(frozen=True, slots=True)
class ParamMeta:
    """One parameter as the whole pipeline sees it: full Megatron shape, owning stage."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    stage: int
    tensor_parallel: bool
    partition_dim: int | None = None
    gated: bool = False

    @property
    def numel(self) -> int:
        return int(torch.Size(self.shape).numel())

    @property
    def num_bytes(self) -> int:
        return self.numel * self.dtype.itemsize


def plan_buckets(metas: Sequence[ParamMeta], bucket_bytes: int) -> list[list[ParamMeta]]:
    """Consecutive groups of one stage and one dtype, each at most `bucket_bytes` (a parameter
    larger than that forms a bucket alone). Every parameter lands in exactly one bucket."""
    buckets: list[list[ParamMeta]] = []
    size = 0
    for meta in metas:
        last = buckets[-1][-1] if buckets else None
        fits = last is not None and size + meta.num_bytes <= bucket_bytes
        if fits and last.stage == meta.stage and last.dtype == meta.dtype:
            buckets[-1].append(meta)
            size += meta.num_bytes
        else:
            buckets.append([meta])
            size = meta.num_bytes
    return buckets


@dataclass(kw_only=True, slots=True)
class SyncStats:
    """What the last pass moved (on this rank)."""

    num_buckets: int = 0
    num_tensors: int = 0
    num_bytes: int = 0
    max_bucket_bytes: int = 0
    bucket_names: list[list[str]] = field(default_factory=list)


class WeightSync:
    """Turns the actor's parameter shards into HF-named full tensors, bucket by bucket.

    ``shards_fn()`` returns this rank's ``ParamShard`` s (``MegatronActor.named_parameters_for_sync``).
    ``tp_group`` / ``pp_group`` default to Megatron's parallel state.
    """

    def __init__(
        self,
        shards_fn: Callable[[], Iterable[Any]],
        hf_config: Any,
        config: WeightSyncConfig | None = None,
        *,
        tp_group: dist.ProcessGroup | None = None,
        pp_group: dist.ProcessGroup | None = None,
    ) -> None:
        config_dict = dict(hf_config) if isinstance(hf_config, dict) else hf_config.to_dict()
        self.adapter = adapter_for(config_dict)
        self.config = config or WeightSyncConfig()
        self._shards_fn = shards_fn
        # Data- and context-parallel replicas hold the same weights: only the replica at
        # DP rank 0 / CP rank 0 (which holds global rank 0) moves them.
        self.in_source_replica = True
        if tp_group is None or pp_group is None:
            from megatron.core import parallel_state

            tp_group = tp_group or parallel_state.get_tensor_model_parallel_group()
            pp_group = pp_group or parallel_state.get_pipeline_model_parallel_group()
            self.in_source_replica = (
                parallel_state.get_data_parallel_rank() == 0
                and parallel_state.get_context_parallel_rank() == 0
            )
        self.tp_group, self.pp_group = tp_group, pp_group
        self.version = 0
        self.stats = SyncStats()
        self._buffers: dict[str, torch.Tensor] = {}
        self._packer = BucketPacker()
        self._local = ReusedBuffer()  # this rank's shards of a bucket, packed (GPU)
        self._gathered = ReusedBuffer()  # every TP rank's, after an all-gather (GPU)
        self._peers: dict[str, dict] = {}  # TP peers' parameters, mapped (CPU)

    def _buffer(
        self, key: str, numel: int, dtype: torch.dtype, device: torch.device
    ) -> torch.Tensor:
        """A [numel] tensor: fresh, or carved from the kept byte buffer `key` when reusing."""
        if not self.config.reuse_buffers:
            return torch.empty(numel, dtype=dtype, device=device)
        num_bytes = numel * dtype.itemsize
        kept = self._buffers.get(key)
        if kept is None or kept.numel() < num_bytes or kept.device != device:
            kept = self._buffers[key] = torch.empty(num_bytes, dtype=torch.uint8, device=device)
        return kept[:num_bytes].view(dtype)

    def release_buffers(self) -> None:
        """Free the kept buffers (with ``reuse_buffers``), e.g. before a colocated train step."""
        self._buffers.clear()
        for reused in (self._packer, self._local, self._gathered):
            reused.release()
        self._peers.clear()

    def push(self, link: Any, version: int, reach: Reach = "all_ranks") -> int:
        """All ranks together: each bucket, full and HF-named, packed into one flat buffer and
        handed to ``link`` (where this rank's weights go: ``link.load(bucket, last)`` returns once
        the receiver holds it; None for a rank that sends nothing, which still takes part in
        every collective). ``link.update(version)`` brackets the whole update; a link whose
        ``targets`` are an engine's own weight tensors gets the pieces written straight into
        them. ``reach``: who gets which buckets (:meth:`iter_hf_buckets`). Returns ``version``."""
        if link is None:
            for _ in self._stream(reach, None, convert=False):
                pass
        else:
            with link.update(version):  # may map the engine's own weights: link.targets
                for bucket, last in self._stream(reach, link.targets, convert=True):
                    link.load(bucket, last)
        self.version = int(version)
        return self.version

    def _stream(
        self, reach: Reach, targets: dict[str, torch.Tensor] | None, convert: bool
    ) -> Iterator[tuple[FlatBucket, bool]]:
        if reach == "all_ranks":
            return self.iter_assembled(targets)
        named_stream = self.iter_hf_buckets(reach, convert=convert)
        return ((self._packer.pack(named), last) for named, last in named_stream)

    def iter_assembled(
        self, targets: dict[str, torch.Tensor] | None = None
    ) -> Iterator[tuple[FlatBucket | None, bool]]:
        """Every rank: each bucket as one flat buffer of HF-named tensors (shared memory on
        CPU), assembled from the TP ranks' exchanged shards in a single copy
        (:mod:`bucket_assembly`), then broadcast over PP from its stage; with ``is_last``.

        ``targets``: the engine's own weight tensors (mapped from its process): the pieces are
        then written straight into them and None is yielded per bucket (with PP > 1 they are
        copied from the broadcast flat buffer, which is yielded)."""
        tp_size = dist.get_world_size(self.tp_group)
        pp_rank, pp_size = dist.get_rank(self.pp_group), dist.get_world_size(self.pp_group)
        shards = {shard.name: shard for shard in self._shards_fn()}
        device = next(iter(shards.values())).tensor.device
        stage_metas: list[list[ParamMeta]] = [[] for _ in range(pp_size)]
        stage_metas[pp_rank] = [self._meta(shard, pp_rank) for shard in shards.values()]
        if pp_size > 1:
            dist.all_gather_object(stage_metas, stage_metas[pp_rank], group=self.pp_group)
        # Straight into an engine's weights on CPU nothing is buffered (peers' parameters are
        # read in place): one bucket per stage, one exchange and one barrier.
        in_place = targets is not None and pp_size == 1 and device.type == "cpu"
        limit = float("inf") if in_place else self.config.bucket_bytes
        plan = [
            (stage, bucket)
            for stage in range(pp_size)
            for bucket in plan_buckets(stage_metas[stage], limit)
        ]
        self.stats = SyncStats()
        for position, (stage, bucket) in enumerate(plan):
            entries = assembly.hf_entries(self.adapter, bucket)
            dtype = _DTYPES[self.config.dtype] if self.config.dtype else bucket[0].dtype
            direct = targets is not None and pp_size == 1
            if direct:  # straight into the engine's weights: no flat bucket at all
                self._assemble(bucket, shards, targets, tp_size, device)
                self._record(bucket)
                yield None, position == len(plan) - 1
                continue
            out = self._packer.take(sum(e.numel for e in entries), dtype, device)
            flat = FlatBucket(out, entries)
            if stage == pp_rank:
                views = dict(flat.named_tensors())
                self._assemble(bucket, shards, views, tp_size, device)
            if pp_size > 1:
                source = dist.get_global_rank(self.pp_group, stage)
                dist.broadcast(out, src=source, group=self.pp_group)
                if targets is not None:
                    for name, tensor in flat.named_tensors():
                        targets[name].copy_(tensor)
            self._record(bucket)
            yield flat, position == len(plan) - 1

    def _assemble(self, bucket, shards, views, tp_size, device) -> None:
        if tp_size == 1:
            local = {meta.name: shards[meta.name].tensor for meta in bucket}
            assembly.assemble(self.adapter, bucket, [local], views)
        elif device.type == "cpu":
            rank_shards = assembly.shared_shards(bucket, shards, self.tp_group, self._peers)
            assembly.assemble(self.adapter, bucket, rank_shards, views)
            del rank_shards
            dist.barrier(group=self.tp_group)  # every peer has read this rank's parameters
        else:
            numel = sum(assembly.shard_numel(meta, tp_size) for meta in bucket)
            dtype = bucket[0].dtype
            local = self._local.take(numel, dtype, device)
            gathered = self._gathered.take(numel * tp_size, dtype, device)
            rank_shards = assembly.gathered_shards(bucket, shards, self.tp_group, local, gathered)
            assembly.assemble(self.adapter, bucket, rank_shards, views)

    def sync(self, engine: RolloutEngine | None, version: int | None = None) -> int:
        """Push the current weights to `engine` (given on the driving rank, None elsewhere).

        All ranks call it together; `engine` must be on a rank of the source replica (DP rank 0,
        CP rank 0; global rank 0 is one). Returns the new weights version (previous + 1 by
        default).
        """
        version = self.version + 1 if version is None else int(version)
        if engine is not None and not self.in_source_replica:
            raise ValueError(
                "WeightSync.sync: the engine must be on a rank with DP rank 0 and CP rank 0"
            )
        if self.in_source_replica:
            stream = self.iter_hf_tensors(convert=engine is not None)
            if engine is not None:
                engine.update_weights(stream, version)
            for _ in stream:  # ranks without an engine still take part in every collective
                pass
        self.version = version
        return version

    def iter_hf_tensors(self, convert: bool = True) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield (HF name, full tensor) for every parameter; a collective over TP and PP.

        Tensors come out on TP rank 0 of every stage when `convert`; other ranks yield nothing.
        """
        for named, _ in self.iter_hf_buckets("stage_leaders", convert=convert):
            yield from named

    def iter_hf_buckets(
        self, reach: Reach = "all_ranks", convert: bool = True
    ) -> Iterator[tuple[list[tuple[str, torch.Tensor]], bool]]:
        """Yield ``(bucket, is_last)``: each bucket's (HF name, full tensor) list, and whether it
        is the last this rank yields; a collective over TP and PP.

        ``reach`` says who gets what:

        - ``all_ranks``: every rank gets every bucket (TP rank 0 gathers the stage's shards and
          broadcasts them over the TP group; each stage's buckets are then broadcast over the
          PP group), so each training rank can hand the weights to the engine process on its
          own device;
        - ``stage_leaders``: TP rank 0 of every stage gets every bucket;
        - ``own_stage``: TP rank 0 of each stage gets its own stage's buckets only (no PP
          traffic: each stage sends its layers to the engines itself).
        """
        tp_rank, pp_rank = dist.get_rank(self.tp_group), dist.get_rank(self.pp_group)
        pp_size = dist.get_world_size(self.pp_group)
        tp_size = dist.get_world_size(self.tp_group)
        everywhere = reach == "all_ranks"
        shards = {shard.name: shard for shard in self._shards_fn()}
        device = next(iter(shards.values())).tensor.device
        local_metas = [self._meta(shard, pp_rank) for shard in shards.values()]
        stage_metas: list[list[ParamMeta]] = [[] for _ in range(pp_size)]
        stage_metas[pp_rank] = local_metas
        if reach != "own_stage" and (everywhere or tp_rank == 0) and pp_size > 1:
            dist.all_gather_object(stage_metas, local_metas, group=self.pp_group)
        stages = [pp_rank] if reach == "own_stage" else list(range(pp_size))
        plan = [
            (stage, bucket)
            for stage in stages
            for bucket in plan_buckets(stage_metas[stage], self.config.bucket_bytes)
        ]
        self.stats = SyncStats()
        for position, (stage, bucket) in enumerate(plan):
            buffer = self._gather_bucket(bucket, shards) if stage == pp_rank else None
            if everywhere and stage == pp_rank and tp_size > 1:
                buffer = self._share_over_tp(bucket, buffer, device)
            if not everywhere and tp_rank != 0:
                continue
            if pp_size > 1 and reach != "own_stage":
                buffer = self._broadcast_bucket(bucket, buffer, stage, device)
            self._record(bucket)
            if convert:
                yield list(self._to_hf(bucket, buffer)), position == len(plan) - 1

    def _share_over_tp(
        self, bucket: list[ParamMeta], buffer: torch.Tensor | None, device: torch.device
    ) -> torch.Tensor:
        """TP rank 0's gathered bucket to every TP rank of the stage."""
        if buffer is None:
            buffer = self._buffer(
                "bucket", sum(meta.numel for meta in bucket), bucket[0].dtype, device
            )
        dist.broadcast(buffer, src=dist.get_global_rank(self.tp_group, 0), group=self.tp_group)
        return buffer

    def _meta(self, shard: Any, stage: int) -> ParamMeta:
        shape = list(shard.tensor.shape)
        if shard.tensor_parallel and shard.tp_size > 1:
            shape[shard.partition_dim] *= shard.tp_size
        split = shard.tensor_parallel and shard.tp_size > 1
        return ParamMeta(
            name=shard.name,
            shape=tuple(shape),
            dtype=shard.tensor.dtype,
            stage=stage,
            tensor_parallel=split,
            partition_dim=shard.partition_dim if split else None,
            gated=bool(shard.gated) and split,
        )

    def _gather_bucket(
        self, bucket: list[ParamMeta], shards: dict[str, Any]
    ) -> torch.Tensor | None:
        """TP ranks of this stage: send the bucket's shards to TP rank 0, which receives each one
        straight into its place in the flat bucket [sum of numel] of full Megatron tensors.

        Point-to-point rather than all-gather: only TP rank 0 needs the full tensors (half the
        traffic at TP = 2), and dim-0 pieces land without an extra copy.
        """
        tp_rank, tp_size = dist.get_rank(self.tp_group), dist.get_world_size(self.tp_group)
        root = dist.get_global_rank(self.tp_group, 0)
        split = [meta for meta in bucket if meta.tensor_parallel]
        if tp_rank != 0:
            pieces = [p.contiguous() for meta in split for p in _local_pieces(shards[meta.name])]
            works = [
                dist.isend(p, dst=root, group=self.tp_group, tag=i) for i, p in enumerate(pieces)
            ]
            for work in works:
                work.wait()
            return None
        device = shards[bucket[0].name].tensor.device
        out = self._buffer("bucket", sum(meta.numel for meta in bucket), bucket[0].dtype, device)
        staging = self._buffer("staging", _staging_numel(bucket, shards), bucket[0].dtype, device)
        staging_offset = 0
        works, pending = [], []
        tags = [0] * tp_size  # the i-th piece from a rank carries tag i, as it was sent
        offset = 0
        for meta in bucket:
            full = out[offset : offset + meta.numel].view(meta.shape)
            offset += meta.numel
            shard = shards[meta.name]
            if not meta.tensor_parallel:
                full.copy_(shard.tensor)
                continue
            for source in range(1, tp_size):
                for dest in _piece_views(full, shard, source, tp_size):
                    # Row blocks are contiguous and are received in place; column blocks
                    # (row-parallel weights) go through a staging tensor.
                    staged = dest
                    if not dest.is_contiguous():
                        staged = staging[staging_offset : staging_offset + dest.numel()].view(
                            dest.shape
                        )
                        staging_offset += dest.numel()
                    src = dist.get_global_rank(self.tp_group, source)
                    works.append(dist.irecv(staged, src=src, group=self.tp_group, tag=tags[source]))
                    tags[source] += 1
                    pending.append((dest, staged))
            for dest, piece in zip(_piece_views(full, shard, 0, tp_size), _local_pieces(shard)):
                dest.copy_(piece)  # overlaps with the receives in flight
        for work in works:
            work.wait()
        for dest, staged in pending:
            if staged is not dest:
                dest.copy_(staged)
        return out

    def _broadcast_bucket(
        self, bucket: list[ParamMeta], buffer: torch.Tensor | None, stage: int, device: torch.device
    ) -> torch.Tensor:
        if buffer is None:
            buffer = self._buffer(
                "bucket", sum(meta.numel for meta in bucket), bucket[0].dtype, device
            )
        dist.broadcast(buffer, src=dist.get_global_rank(self.pp_group, stage), group=self.pp_group)
        return buffer

    def _record(self, bucket: list[ParamMeta]) -> None:
        num_bytes = sum(meta.num_bytes for meta in bucket)
        self.stats.num_buckets += 1
        self.stats.num_bytes += num_bytes
        self.stats.max_bucket_bytes = max(self.stats.max_bucket_bytes, num_bytes)
        self.stats.bucket_names.append([meta.name for meta in bucket])

    def _to_hf(
        self, bucket: list[ParamMeta], buffer: torch.Tensor
    ) -> Iterator[tuple[str, torch.Tensor]]:
        dtype = _DTYPES[self.config.dtype] if self.config.dtype else None
        offset = 0
        for meta in bucket:
            full = buffer[offset : offset + meta.numel].view(meta.shape)
            offset += meta.numel
            for hf_name, tensor in self.adapter.megatron_to_hf(meta.name, full):
                self.stats.num_tensors += 1
                yield hf_name, tensor if dtype is None else tensor.to(dtype)


def _staging_numel(bucket: list[ParamMeta], shards: dict[str, Any]) -> int:
    """Elements of the pieces that arrive from other TP ranks but land non-contiguously
    (dim-1 blocks of row-parallel weights)."""
    total = 0
    for meta in bucket:
        shard = shards[meta.name]
        if meta.tensor_parallel and shard.partition_dim == 1:
            total += shard.tensor.numel() * (shard.tp_size - 1)
    return total


def _local_pieces(shard: Any) -> list[torch.Tensor]:
    """A TP shard as the pieces that land contiguously along its partition dim of the full
    tensor: a SwiGLU ``linear_fc1`` shard ``[gate_r; up_r]`` is two pieces, others one."""
    return list(shard.tensor.chunk(2, dim=0)) if shard.gated else [shard.tensor]


def _piece_views(full: torch.Tensor, shard: Any, rank: int, tp_size: int) -> list[torch.Tensor]:
    """Views of `full` where TP rank `rank`'s pieces (:func:`_local_pieces` order) belong.

    Megatron's layouts: column-parallel weights, QKV and vocab rows split dim 0 into equal
    blocks; row-parallel weights split dim 1; ``linear_fc1`` is ``[gate_0..gate_{TP-1};
    up_0..up_{TP-1}]`` (the same layout as the adapter's ``merge_tensor_parallel``).
    """
    dim = shard.partition_dim
    if shard.gated:
        half = full.shape[0] // 2
        size = half // tp_size
        return [full.narrow(0, rank * size, size), full.narrow(0, half + rank * size, size)]
    size = full.shape[dim] // tp_size
    return [full.narrow(dim, rank * size, size)]
