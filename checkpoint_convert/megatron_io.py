"""Megatron dist checkpoints (``torch_dist`` backend), written and read piece by piece.

A ``torch_dist`` checkpoint is a ``torch.distributed.checkpoint`` (DCP) directory plus
megatron-core's ``metadata.json`` and ``common.pt``. Every ShardedTensor is stored under its
``key`` with its *global* shape (per-layer tensors stacked: ``[L, *shape]``), as any number of
chunks; loading under another TP/PP layout reads the overlapping parts. So one layout serves all
layouts, and we are free to choose the chunks: one per layer.

Writing: our planner describes all chunks up front (shapes only). Each chunk's data is a list
of byte ranges of source files (:class:`ByteRange`; the HF safetensors rows, in Megatron's
fused order), never a tensor: the writer emits the chunk's ``torch.save`` record (the same
zip container DCP's stock writer makes, so DCP's and megatron-core's readers load it) with a
hole where the data goes, then fills the hole file to file with ``copy_file_range``. Bytes no
range covers stay zero (the vocab padding). Peak memory is independent of the model size and
the bytes never pass through this process.

Reading: a block that is exactly one stored chunk (every chunk we write, and megatron-core's
when the saving layout had TP = 1) is located inside its record (:meth:`DistCheckpointReader.
stored_bytes`) so it too can be copied file to file. Other blocks are planned with
``create_read_items_for_chunk_list`` (the overlap arithmetic against whatever chunks the
checkpoint holds) and read by DCP's reader into our buffer.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import struct
import warnings
import zipfile
from collections import OrderedDict
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
from checkpoint_convert.safetensors_io import MOVER, PAGE, ByteRange, WritebackPacer, _write_from

# What megatron-core 0.16.1 writes for a torch_dist checkpoint (read by dist_checkpointing.load).
MCORE_METADATA = {
    "sharded_backend": "torch_dist",
    "sharded_backend_version": 1,
    "common_backend": "torch",
    "common_backend_version": 1,
}


@dataclass(frozen=True, slots=True)
class ChunkWrite:
    """One stored chunk: ``key`` with ``global_shape``; ``offsets`` of a block of ``sizes``.
    ``ranges()`` returns where its data comes from (``dest`` offsets within the chunk's
    C-contiguous bytes; uncovered bytes are zero) when the writer gets to it."""

    key: str
    global_shape: tuple[int, ...]
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    dtype: torch.dtype
    ranges: Callable[[], list[ByteRange]]


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

    def resolve_data(self, write_item: WriteItem) -> io.BytesIO:
        """Byte items only; tensor items are written by ranges (:meth:`resolve_ranges`)."""
        if write_item.type != WriteItemType.BYTE_IO:
            raise AssertionError("tensor items are resolved with resolve_ranges")
        buffer = io.BytesIO()
        torch.save([self._objects[write_item.index.fqn].data], buffer)
        return buffer

    def resolve_ranges(self, write_item: WriteItem) -> tuple[ChunkWrite, list[ByteRange]]:
        chunk = self._chunks[(write_item.index.fqn, tuple(write_item.index.offset))]
        ranges = chunk.ranges()
        nbytes = torch.Size(chunk.sizes).numel() * chunk.dtype.itemsize
        for piece in ranges:
            if piece.dest < 0 or piece.dest + piece.nbytes > nbytes:
                raise ConversionError(
                    f"{chunk.key} at {chunk.offsets}: byte range {piece.dest}+{piece.nbytes} "
                    f"outside its {nbytes} bytes"
                )
        return chunk, ranges


class _RecordBuffer:
    """The file-like object ``torch.save`` writes one record into, kept in memory.

    The one write whose buffer is ``hole`` (the placeholder tensor's storage) is skipped, not
    kept: ``hole_offset`` is where it starts in the record. The rest (the zip container, a few
    hundred bytes) is kept as ``(offset, bytes)`` pieces for :meth:`write_at`."""

    def __init__(self, hole: torch.Tensor):
        self._hole = (hole.data_ptr(), hole.nbytes)
        self.pieces: list[tuple[int, bytes]] = []
        self.length = 0
        self.hole_offset: int | None = None

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        if self.hole_offset is None and len(view) == self._hole[1] and len(view):
            if _address(view) == self._hole[0]:
                self.hole_offset = self.length
                self.length += len(view)
                return len(view)
        self.pieces.append((self.length, bytes(view)))
        self.length += len(view)
        return len(view)

    def flush(self) -> None:
        pass

    def write_at(self, fd: int, position: int) -> None:
        for offset, data in self.pieces:
            _write_from(fd, memoryview(data), position + offset)


def _address(view: memoryview) -> int:
    import numpy

    return numpy.frombuffer(view, dtype=numpy.uint8).ctypes.data


class _StreamingWriter(FileSystemWriter):
    """DCP's file writer, writing every item into one file as it goes and keeping nothing.

    torch's writer keeps the last tensor written under every key (for its safetensors mode),
    which would pin the embedding and one whole layer for the length of the save. Ours writes
    the items in plan order into one file, each as the ``torch.save`` record the stock writer
    makes (so the stock reader, and megatron-core's, read it), with the tensor data copied
    file to file into the record's data hole. Records may be separated by unused bytes (DCP
    keeps each item's offset and length): each tensor record starts where its data lands
    congruent, modulo the page size, to its largest source range.
    """

    def write_data(self, plan: SavePlan, planner) -> Future:
        file_name = f"{plan.storage_data.prefix}0.distcp"
        results, pacer = [], WritebackPacer()
        placeholders: dict[tuple, torch.Tensor] = {}
        fd = os.open(Path(self.path) / file_name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        # torch.save's per-record CRC32 would read the data (and costs more than the disk
        # write itself); torch.load (DCP's reader, megatron-core's) does not need it.
        position = 0
        with torch.utils.serialization.config.patch({"save.compute_crc32": False}):
            try:
                for item in plan.items:
                    if item.type == WriteItemType.BYTE_IO:
                        data = planner.resolve_data(item).getbuffer()
                        _write_from(fd, data, position)
                        start, length = position, len(data)
                    else:
                        start, length = self._write_tensor(
                            fd, position, item, planner, placeholders
                        )
                    pacer.wrote(fd, length)
                    info = _StorageInfo(relative_path=file_name, offset=start, length=length)
                    results.append(
                        WriteResult(index=item.index, size_in_bytes=length, storage_data=info)
                    )
                    position = start + length
            finally:
                os.close(fd)
        future: Future = Future()
        future.set_result(results)
        return future

    @staticmethod
    def _write_tensor(fd: int, position: int, item, planner, placeholders: dict) -> tuple[int, int]:
        """Write one tensor record at or after ``position``; returns its (start, length)."""
        chunk, ranges = planner.resolve_ranges(item)
        shape = (chunk.sizes, chunk.dtype)
        if shape not in placeholders:
            # Never touched: torch.save only passes its address to _RecordBuffer.write.
            placeholders.clear()
            placeholders[shape] = torch.empty(chunk.sizes, dtype=chunk.dtype)
        record = _RecordBuffer(placeholders[shape])
        torch.save(placeholders[shape], record)
        if record.hole_offset is None:
            if placeholders[shape].nbytes:
                raise AssertionError(f"torch.save did not write {chunk.key}'s data as one piece")
            record.hole_offset = record.length
        start = position
        if ranges:
            anchor = max(ranges, key=lambda piece: piece.nbytes)
            wanted = (anchor.offset - anchor.dest) % PAGE  # where the hole should start, mod PAGE
            start += (wanted - position - record.hole_offset) % PAGE
        record.write_at(fd, start)
        for piece in ranges:
            hole = start + record.hole_offset
            MOVER.copy(piece.fd, piece.offset, fd, hole + piece.dest, piece.nbytes)
        return start, record.length


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
        self._check_files()
        self._fds: dict[str, int] = {}
        self._located: dict[tuple, tuple[int, int] | None] = {}

    def _check_files(self) -> None:
        """Every file the metadata names exists and holds every item it lists."""
        ends: dict[str, int] = {}
        for info in self.metadata.storage_data.values():
            ends[info.relative_path] = max(
                ends.get(info.relative_path, 0), info.offset + info.length
            )
        for name, end in sorted(ends.items()):
            path = self.directory / name
            if not path.is_file():
                raise ConversionError(f"missing checkpoint file {path} (listed in .metadata)")
            size = path.stat().st_size
            if size < end:
                raise ConversionError(
                    f"truncated checkpoint file {path}: {size} bytes, .metadata needs {end}"
                )

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __enter__(self) -> DistCheckpointReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def stored_bytes(
        self, key: str, offsets: tuple[int, ...], sizes: tuple[int, ...]
    ) -> tuple[int, int] | None:
        """``(fd, offset)`` of the C-contiguous bytes of block ``[offsets, offsets + sizes)`` of
        ``key`` in the checkpoint's files, when that block is exactly one stored chunk kept as
        a plain ``torch.save`` record of a contiguous tensor; None otherwise (then use
        :meth:`read`)."""
        if (key, offsets, sizes) not in self._located:
            self._located[(key, offsets, sizes)] = self._stored_bytes(key, offsets, sizes)
        return self._located[(key, offsets, sizes)]

    def _stored_bytes(
        self, key: str, offsets: tuple[int, ...], sizes: tuple[int, ...]
    ) -> tuple[int, int] | None:
        entry = self.tensor_metadata(key)
        chunk = ChunkStorageMetadata(torch.Size(offsets), torch.Size(sizes))
        items = create_read_items_for_chunk_list(key, entry, [chunk])
        if len(items) != 1 or entry.chunks[items[0].storage_index.index].sizes != chunk.sizes:
            return None
        info = self.metadata.storage_data[items[0].storage_index]
        if info.transform_descriptors:
            return None
        if info.relative_path not in self._fds:
            path = self.directory / info.relative_path
            self._fds[info.relative_path] = os.open(path, os.O_RDONLY)
        fd = self._fds[info.relative_path]
        located = _locate_tensor_data(fd, info.offset, info.length)
        if located is None:
            return None
        dtype, size, stride, data_offset = located
        if dtype != entry.properties.dtype or size != tuple(sizes) or stride != _strides(sizes):
            return None
        return fd, data_offset

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
        try:
            if len(items) == 1 and entry.chunks[items[0].storage_index.index].sizes == chunk.sizes:
                block = self._load_stored_chunk(items[0])
            else:
                block = torch.empty(sizes, dtype=entry.properties.dtype)
                self._reader.read_data(LoadPlan(items), _BufferSink({key: block})).wait()
        except Exception as error:  # a damaged record: torch.load / DCP raise many kinds
            detail = (str(error).splitlines() or [""])[0][:200]
            raise ConversionError(
                f"{key}: cannot read block {offsets} + {sizes} from {self.directory} "
                f"(damaged checkpoint file?): {type(error).__name__}: {detail}"
            ) from error
        if tuple(block.shape) != tuple(sizes) or block.dtype != entry.properties.dtype:
            raise ConversionError(
                f"{key}: the stored block at {offsets} is {tuple(block.shape)} {block.dtype}, "
                f".metadata says {tuple(sizes)} {entry.properties.dtype}"
            )
        return block

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


def _strides(sizes: tuple[int, ...]) -> tuple[int, ...]:
    strides, step = [], 1
    for size in reversed(sizes):
        strides.append(step)
        step *= size
    return tuple(reversed(strides))


class _FileWindow(io.RawIOBase):
    """Bytes ``[start, start + length)`` of ``fd`` as a seekable read-only file."""

    def __init__(self, fd: int, start: int, length: int):
        self.fd, self.start, self.length, self.position = fd, start, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.position, io.SEEK_END: self.length}[whence]
        self.position = max(0, base + offset)
        return self.position

    def tell(self) -> int:
        return self.position

    def readinto(self, buffer) -> int:
        count = min(len(buffer), self.length - self.position)
        if count <= 0:
            return 0
        got = os.preadv(self.fd, [memoryview(buffer)[:count]], self.start + self.position)
        self.position += got
        return got


_STORAGE_DTYPES = {
    "FloatStorage": torch.float32,
    "BFloat16Storage": torch.bfloat16,
    "HalfStorage": torch.float16,
}


def _tensor_header(storage, storage_offset, size, stride, *rest):
    return storage, storage_offset, tuple(size), tuple(stride)


class _TensorHeaderUnpickler(pickle.Unpickler):
    """Reads a one-tensor ``data.pkl`` for its storage key, offset, size and stride only."""

    def find_class(self, module: str, name: str):
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _tensor_header
        if (module, name) == ("collections", "OrderedDict"):
            return OrderedDict
        if module == "torch" and name in _STORAGE_DTYPES:
            return _STORAGE_DTYPES[name]
        raise pickle.UnpicklingError(f"not a plain tensor record: {module}.{name}")

    def persistent_load(self, pid):
        return pid


def _member_data_offset(fd: int, start: int, member: zipfile.ZipInfo) -> int:
    """Offset (from ``start``) of a stored zip member's data, from its local header."""
    header = os.pread(fd, 30, start + member.header_offset)
    if len(header) != 30 or header[:4] != b"PK\x03\x04":
        raise zipfile.BadZipFile("bad local header")
    name_length, extra_length = struct.unpack("<HH", header[26:30])
    return member.header_offset + 30 + name_length + extra_length


def _locate_tensor_data(
    fd: int, start: int, length: int
) -> tuple[torch.dtype, tuple[int, ...], tuple[int, ...], int] | None:
    """``(dtype, size, stride, absolute data offset)`` of the tensor in the ``torch.save``
    record at ``[start, start + length)`` of ``fd``; None when it is anything else."""
    try:
        archive = zipfile.ZipFile(_FileWindow(fd, start, length))
        members = {m.filename: m for m in archive.infolist()}
        pickled = next((n for n in members if n.endswith("/data.pkl")), None)
        if pickled is None:
            return None
        prefix, member = pickled[: -len("data.pkl")], members[pickled]
        if member.compress_type != zipfile.ZIP_STORED:
            return None
        at = _member_data_offset(fd, start, member)
        raw = os.pread(fd, member.file_size, start + at)
        storage, storage_offset, size, stride = _TensorHeaderUnpickler(io.BytesIO(raw)).load()
        _, dtype, storage_key, _, numel = storage
        data = members.get(f"{prefix}data/{storage_key}")
        if data is None or data.compress_type != zipfile.ZIP_STORED:
            return None
        needed = storage_offset + torch.Size(size).numel()
        if needed > numel or numel * dtype.itemsize > data.file_size:
            return None
        data_at = _member_data_offset(fd, start, data)
        return dtype, size, stride, start + data_at + storage_offset * dtype.itemsize
    except (zipfile.BadZipFile, pickle.UnpicklingError, ValueError, TypeError, KeyError, EOFError):
        return None
