"""Megatron dist checkpoints (``torch_dist`` backend), written and read piece by piece.

A ``torch_dist`` checkpoint is a ``torch.distributed.checkpoint`` (DCP) directory plus
megatron-core's ``metadata.json`` and ``common.pt``. Every ShardedTensor is stored under its
``key`` with its *global* shape (per-layer tensors stacked: ``[L, *shape]``), as any number of
chunks; loading under another TP/PP layout reads the overlapping parts. So one layout serves all
layouts, and we are free to choose the chunks: one per layer.

Writing: DCP asks the planner for each item's data (``resolve_data``) only when it writes that
item, so our planner describes all chunks up front (shapes only) and produces each chunk's data
on demand: peak memory is one chunk plus its sources, not the model.
Reading: we plan the reads of one region at a time (``create_read_items_for_chunk_list`` does the
overlap arithmetic against whatever chunks the checkpoint holds) and let the DCP reader fill
our buffer.
"""

from __future__ import annotations

import io
import json
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.utils.serialization
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
from torch.distributed.checkpoint.filesystem import _create_file_view, _StorageInfo
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import (
    LoadPlan,
    LoadPlanner,
    ReadItem,
    SavePlan,
    TensorWriteData,
    WriteItem,
    WriteItemType,
)
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list
from torch.distributed.checkpoint.state_dict_saver import save as dcp_save
from torch.distributed.checkpoint.storage import WriteResult
from torch.futures import Future

from checkpoint_convert.adapters import ConversionError
from checkpoint_convert.safetensors_io import WritebackPacer

# What megatron-core 0.16.1 writes for a torch_dist checkpoint (read by dist_checkpointing.load).
MCORE_METADATA = {
    "sharded_backend": "torch_dist",
    "sharded_backend_version": 1,
    "common_backend": "torch",
    "common_backend_version": 1,
}


@dataclass(frozen=True, slots=True)
class ChunkWrite:
    """One stored chunk: ``key`` with ``global_shape``; ``offsets`` of a block of ``sizes``;
    ``produce()`` returns its data (shape ``sizes``) when the writer gets to it."""

    key: str
    global_shape: tuple[int, ...]
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    dtype: torch.dtype
    produce: Callable[[], torch.Tensor]


@dataclass(frozen=True, slots=True)
class ObjectWrite:
    """A megatron-core ShardedObject: stored under ``unique_key`` as ``torch.save([data])``."""

    unique_key: str
    data: object


def sharded_object_key(key: str, offset: tuple[int, ...], global_shape: tuple[int, ...]) -> str:
    """megatron-core's ``ShardedObject.unique_key``: ``{key}/shard_{offsets}_{global shape}``."""
    return f"{key}/shard_{'.'.join(map(str, offset))}_{'.'.join(map(str, global_shape))}"


class _LazySavePlanner(DefaultSavePlanner):
    """A save planner whose plan comes from ChunkWrites; data is produced in ``resolve_data``."""

    def __init__(self, chunks: list[ChunkWrite], objects: list[ObjectWrite]):
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
        self._chunks = {(c.key, c.offsets): c for c in chunks}
        self._objects = {o.unique_key: o for o in objects}
        self._items = [self._tensor_item(c) for c in chunks] + [
            WriteItem(index=MetadataIndex(o.unique_key), type=WriteItemType.BYTE_IO)
            for o in objects
        ]

    @staticmethod
    def _tensor_item(chunk: ChunkWrite) -> WriteItem:
        return WriteItem(
            index=MetadataIndex(chunk.key, torch.Size(chunk.offsets)),
            type=WriteItemType.SHARD,
            tensor_data=TensorWriteData(
                chunk=ChunkStorageMetadata(torch.Size(chunk.offsets), torch.Size(chunk.sizes)),
                properties=TensorProperties(dtype=chunk.dtype),
                size=torch.Size(chunk.global_shape),
            ),
        )

    def create_local_plan(self) -> SavePlan:
        self.plan = SavePlan(self._items)
        return self.plan

    def resolve_data(self, write_item: WriteItem) -> torch.Tensor | io.BytesIO:
        if write_item.type == WriteItemType.BYTE_IO:
            buffer = io.BytesIO()
            torch.save([self._objects[write_item.index.fqn].data], buffer)
            return buffer
        chunk = self._chunks[(write_item.index.fqn, tuple(write_item.index.offset))]
        data = chunk.produce()
        if tuple(data.shape) != chunk.sizes or data.dtype != chunk.dtype:
            raise ConversionError(
                f"{chunk.key} at {chunk.offsets}: produced {tuple(data.shape)} {data.dtype}, "
                f"expected {chunk.sizes} {chunk.dtype}"
            )
        return data.contiguous()


class _StreamingWriter(FileSystemWriter):
    """DCP's file writer without its per-key tensor cache.

    torch's writer keeps the last tensor written under every key (for its safetensors mode),
    which would pin the embedding and one whole layer for the length of the save. Ours writes
    the items in plan order into one file, each with ``torch.save`` exactly as the stock writer
    does (so the stock reader, and megatron-core's, read it), and keeps nothing. Each item is
    fully written before the next is resolved, so producers may reuse one buffer.
    """

    def write_data(self, plan: SavePlan, planner) -> Future:
        file_name = f"{plan.storage_data.prefix}0.distcp"
        results, pacer = [], WritebackPacer()
        # torch.save's per-record CRC32 costs more than the disk write itself; torch.load
        # (DCP's reader, megatron-core's) does not need it.
        with (
            torch.utils.serialization.config.patch({"save.compute_crc32": False}),
            open(Path(self.path) / file_name, "wb") as stream,
        ):
            for item in plan.items:
                data = planner.resolve_data(item)
                offset = stream.tell()
                if item.type == WriteItemType.BYTE_IO:
                    stream.write(data.getbuffer())
                else:
                    torch.save(data, stream)
                length = stream.tell() - offset
                stream.flush()
                pacer.wrote(stream.fileno(), length)
                info = _StorageInfo(relative_path=file_name, offset=offset, length=length)
                results.append(
                    WriteResult(index=item.index, size_in_bytes=length, storage_data=info)
                )
                del data
        future: Future = Future()
        future.set_result(results)
        return future


def write_dist_checkpoint(
    directory: Path, chunks: list[ChunkWrite], objects: list[ObjectWrite], common: dict
) -> None:
    """Write a megatron-core ``torch_dist`` checkpoint into ``directory`` (which must exist)."""
    writer = _StreamingWriter(str(directory), sync_files=False)
    with warnings.catch_warnings():
        # "torch.distributed is disabled ...": a single-process save is exactly the intent.
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        planner = _LazySavePlanner(chunks, objects)
        dcp_save({}, storage_writer=writer, planner=planner, no_dist=True)
    torch.save(common, directory / "common.pt")
    (directory / "metadata.json").write_text(json.dumps(MCORE_METADATA))


class _BufferSink(LoadPlanner):
    """The planner side of ``FileSystemReader.read_data``: read items land in ``buffers[key]``."""

    def __init__(self, buffers: dict[str, torch.Tensor]):
        self.buffers = buffers

    def resolve_tensor(self, read_item: ReadItem) -> torch.Tensor:
        target = self.buffers[read_item.dest_index.fqn]
        for dim, (start, length) in enumerate(zip(read_item.dest_offsets, read_item.lengths)):
            target = target.narrow(dim, start, length)
        return target

    def commit_tensor(self, read_item: ReadItem, tensor: torch.Tensor) -> None:
        pass

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        raise AssertionError("byte items are not read through _BufferSink")

    # The remaining planner steps are not used by read_data.
    def set_up_planner(self, *args, **kwargs) -> None: ...
    def create_local_plan(self) -> LoadPlan: ...
    def create_global_plan(self, global_plan): ...
    def finish_plan(self, central_plan): ...


class DistCheckpointReader:
    """Read regions of the tensors in a ``torch_dist`` checkpoint (any stored chunking)."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        if not (self.directory / ".metadata").is_file():
            raise ConversionError(f"{self.directory} is not a torch_dist checkpoint (no .metadata)")
        config = self.directory / "metadata.json"
        backend = (
            json.loads(config.read_text()).get("sharded_backend") if config.is_file() else None
        )
        if backend != "torch_dist":
            raise ConversionError(
                f"{self.directory}: sharded_backend={backend!r} in metadata.json, expected 'torch_dist'"
            )
        self._reader = FileSystemReader(str(self.directory))
        self.metadata: Metadata = self._reader.read_metadata()
        self._reader.set_up_storage_reader(self.metadata, True)

    def tensor_metadata(self, key: str) -> TensorStorageMetadata:
        entry = self.metadata.state_dict_metadata.get(key)
        if not isinstance(entry, TensorStorageMetadata):
            raise ConversionError(
                f"tensor {key!r} missing from the Megatron checkpoint {self.directory}"
            )
        return entry

    def read(self, key: str, offsets: tuple[int, ...], sizes: tuple[int, ...]) -> torch.Tensor:
        """The block ``[offsets, offsets + sizes)`` of tensor ``key``, in its stored dtype."""
        entry = self.tensor_metadata(key)
        chunk = ChunkStorageMetadata(torch.Size(offsets), torch.Size(sizes))
        items = create_read_items_for_chunk_list(key, entry, [chunk])
        covered = sum(torch.Size(item.lengths).numel() for item in items)
        if covered != torch.Size(sizes).numel():
            raise ConversionError(f"{key}: the checkpoint does not cover block {offsets} + {sizes}")
        if len(items) == 1 and entry.chunks[items[0].storage_index.index].sizes == chunk.sizes:
            return self._load_stored_chunk(items[0])
        buffer = torch.empty(sizes, dtype=entry.properties.dtype)
        self._reader.read_data(LoadPlan(items), _BufferSink({key: buffer})).wait()
        return buffer

    def _load_stored_chunk(self, item: ReadItem) -> torch.Tensor:
        """A stored chunk exactly as saved: loaded once, without the reader's copy into a buffer."""
        info = self.metadata.storage_data[item.storage_index]
        if info.transform_descriptors:  # compressed etc.: let DCP's reader undo it
            buffer = torch.empty(
                tuple(item.lengths),
                dtype=self.tensor_metadata(item.storage_index.fqn).properties.dtype,
            )
            self._reader.read_data(
                LoadPlan([item]), _BufferSink({item.dest_index.fqn: buffer})
            ).wait()
            return buffer
        with open(self.directory / info.relative_path, "rb") as stream:
            view = _create_file_view(stream, info.offset, info.length)
            return torch.load(view, map_location="cpu", weights_only=True)
