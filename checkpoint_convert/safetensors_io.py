"""Streaming safetensors I/O: read one tensor at a time, write shards tensor by tensor.

We parse the (documented, tiny) safetensors header ourselves and move bytes with plain
``readinto`` / ``pwrite`` instead of ``safetensors.safe_open``: ``safe_open`` memory-maps the whole
file, and every page it touches stays resident in this process, so peak RSS would grow with
the model instead of with the largest tensor.

File layout: 8-byte little-endian header length N, N bytes of JSON
``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}``, then the data
(offsets relative to the end of the header).
"""

from __future__ import annotations

import errno
import json
import math
import os
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from checkpoint_convert.adapters import ConversionError

DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
_MAX_HEADER = 100 * 1024 * 1024
_IO_CHUNK = 1 << 30  # Linux moves at most ~2 GiB per read/write call.


@dataclass(frozen=True, slots=True)
class TensorInfo:
    """Where one tensor lives: ``path`` and absolute byte range ``[start, end)``."""

    name: str
    path: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def read_header(path: Path) -> dict[str, TensorInfo]:
    """Parse a safetensors file's header; ConversionError for missing, corrupt or truncated files
    and for unsupported dtypes."""
    if not path.is_file():
        raise ConversionError(f"missing safetensors shard: {path}")
    file_size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise ConversionError(f"truncated safetensors shard (no header): {path}")
        (header_len,) = struct.unpack("<Q", raw)
        if header_len > min(_MAX_HEADER, file_size - 8):
            raise ConversionError(f"corrupt or truncated safetensors header in {path}")
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ConversionError(f"corrupt safetensors header in {path}: {error}") from error
    base = 8 + header_len
    infos = {}
    if not isinstance(header, dict):
        raise ConversionError(f"corrupt safetensors header in {path}: not a JSON object")
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= entry.keys():
            raise ConversionError(f"corrupt safetensors header in {path}: entry {name!r}")
        if entry["dtype"] not in DTYPES:
            raise ConversionError(
                f"unsupported dtype {entry['dtype']} for tensor {name!r} in {path}; "
                f"supported: {sorted(DTYPES)}"
            )
        begin, end = entry["data_offsets"]
        dtype, shape = DTYPES[entry["dtype"]], tuple(entry["shape"])
        if end - begin != math.prod(shape) * dtype.itemsize:
            raise ConversionError(f"tensor {name!r} in {path}: byte range does not match its shape")
        if base + end > file_size:
            raise ConversionError(
                f"truncated safetensors shard {path}: tensor {name!r} ends at byte {base + end}, "
                f"file has {file_size}"
            )
        infos[name] = TensorInfo(name, path, dtype, shape, base + begin, base + end)
    return infos


def _read_into(fd: int, view: memoryview, offset: int) -> None:
    done = 0
    while done < len(view):
        count = os.preadv(fd, [view[done : done + _IO_CHUNK]], offset + done)
        if count <= 0:
            raise ConversionError(f"unexpected end of file reading fd {fd} at byte {offset + done}")
        done += count


def _write_from(fd: int, view: memoryview, offset: int) -> None:
    done = 0
    while done < len(view):
        done += os.pwrite(fd, view[done : done + _IO_CHUNK], offset + done)


# errno values with which copy_file_range refuses a pair of files (another file system, a
# kernel without it): then bytes go through a bounce buffer instead.
_NO_KERNEL_COPY = {errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EBADF}
_BOUNCE_BYTES = 64 << 20


class _ByteMover:
    """Copies byte ranges between open files, in the kernel where it can."""

    def __init__(self) -> None:
        self.kernel_copy = hasattr(os, "copy_file_range")
        self._bounce: bytearray | None = None

    def copy(self, src_fd: int, src_offset: int, dst_fd: int, dst_offset: int, nbytes: int) -> None:
        done = 0
        while done < nbytes and self.kernel_copy:
            try:
                count = os.copy_file_range(
                    src_fd,
                    dst_fd,
                    min(nbytes - done, _IO_CHUNK),
                    src_offset + done,
                    dst_offset + done,
                )
            except OSError as error:
                if error.errno not in _NO_KERNEL_COPY or done:
                    raise
                self.kernel_copy = False
                break
            if count <= 0:
                raise ConversionError(
                    f"unexpected end of file copying from fd {src_fd} at byte {src_offset + done}"
                )
            done += count
        if done < nbytes:
            self._bounce = self._bounce or bytearray(_BOUNCE_BYTES)
            view = memoryview(self._bounce)
            while done < nbytes:
                piece = view[: min(nbytes - done, _BOUNCE_BYTES)]
                _read_into(src_fd, piece, src_offset + done)
                _write_from(dst_fd, piece, dst_offset + done)
                done += len(piece)


MOVER = _ByteMover()
"""The process's byte mover. ``copy_file_range`` moves the bytes inside the kernel: no
user-space buffer, so none of the page faults a fresh process pays on every new buffer page
(measured here: the first ~0.6 GB a process writes from its own memory go at ~0.5 GB/s). Tests
set ``MOVER.kernel_copy = False`` to exercise the bounce-buffer path."""


@dataclass(frozen=True, slots=True)
class ByteRange:
    """``nbytes`` bytes at ``offset`` in the open file ``fd``, to land ``dest`` bytes into the
    data of the tensor being written."""

    fd: int
    offset: int
    nbytes: int
    dest: int


class WritebackPacer:
    """Flush a file to disk every ``interval`` bytes written to it.

    Converting 65 GB on a 24 GiB machine otherwise piles up gigabytes of dirty page cache
    until the kernel throttles the writer (and the final fsync takes as long); flushing as we
    go keeps the backlog bounded and the disk busy from the start.
    """

    def __init__(self, interval: int = 256 << 20):
        self.interval = interval
        self._pending: dict[int, int] = {}

    def wrote(self, fd: int, nbytes: int) -> None:
        self._pending[fd] = self._pending.get(fd, 0) + nbytes
        if self._pending[fd] >= self.interval:
            os.fdatasync(fd)
            self._pending[fd] = 0


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """A byte view of a contiguous CPU tensor (no copy)."""
    return memoryview(tensor.contiguous().view(-1).view(torch.uint8).numpy())


class SafetensorsReader:
    """All tensors of an HF checkpoint directory (single file or sharded with an index)."""

    def __init__(self, hf_dir: Path):
        self.hf_dir = Path(hf_dir)
        self.tensors: dict[str, TensorInfo] = {}
        self._fds: dict[Path, int] = {}
        index = self.hf_dir / INDEX_FILE
        # What lists the tensors (named in "missing tensor" errors).
        self.listing = index if index.is_file() else self.hf_dir / SINGLE_FILE
        if index.is_file():
            weight_map = json.loads(index.read_text()).get("weight_map")
            if not isinstance(weight_map, dict):
                raise ConversionError(f"{index} has no 'weight_map'")
            files = sorted(set(weight_map.values()))
            headers = {f: read_header(self.hf_dir / f) for f in files}
            for name, file in weight_map.items():
                if name not in headers[file]:
                    raise ConversionError(
                        f"tensor {name!r} is in {index.name} but not in shard {file}"
                    )
                self.tensors[name] = headers[file][name]
            for file, header in headers.items():
                for name in header.keys() - weight_map.keys():
                    raise ConversionError(
                        f"tensor {name!r} in shard {file} is missing from {index.name}"
                    )
        elif (self.hf_dir / SINGLE_FILE).is_file():
            self.tensors = read_header(self.hf_dir / SINGLE_FILE)
        else:
            raise ConversionError(f"no {INDEX_FILE} or {SINGLE_FILE} in {self.hf_dir}")

    def _info_fd(self, name: str) -> tuple[TensorInfo, int]:
        info = self.tensors.get(name)
        if info is None:
            raise ConversionError(f"tensor {name!r} not found in {self.hf_dir}")
        if info.path not in self._fds:
            self._fds[info.path] = os.open(info.path, os.O_RDONLY)
        return info, self._fds[info.path]

    def row_range(self, name: str, row_start: int, num_rows: int) -> tuple[int, int, int]:
        """``(fd, offset, nbytes)`` of rows ``[row_start, row_start + num_rows)`` of ``name``."""
        info, fd = self._info_fd(name)
        if row_start + num_rows > info.shape[0]:
            raise ConversionError(f"{name}: rows {row_start}+{num_rows} beyond {info.shape[0]}")
        row_bytes = info.nbytes // info.shape[0]
        return fd, info.start + row_start * row_bytes, num_rows * row_bytes

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __enter__(self) -> SafetensorsReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@dataclass(frozen=True, slots=True)
class PlannedTensor:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


PAGE = 4096
"""Copies between files run ~1.5x faster when source and destination offsets are congruent
modulo the page size (measured here: copy_file_range on ext4, 512 MB, 0.14 s vs 0.20 s): the
kernel then moves whole pages instead of re-splitting each one. Both converters place their
output data to get that."""


def best_data_start(
    positions: Mapping[str, int], sizes: Mapping[str, int], wanted: Mapping[str, int]
) -> int:
    """The residue modulo ``PAGE`` (a multiple of 8) for the start of a file's data section that
    puts the most bytes where they are wanted: tensor ``name`` at ``positions[name]`` into the
    data wants to start at ``wanted[name]`` modulo ``PAGE`` (the residue of its source bytes,
    so file-to-file copies move whole pages)."""
    votes: dict[int, int] = {}
    for name, want in wanted.items():
        residue = (want - positions[name]) % PAGE
        if residue % 8 == 0:
            votes[residue] = votes.get(residue, 0) + sizes[name]
    return max(votes, key=votes.get) if votes else 0


class ShardWriter:
    """One safetensors file whose header is fixed up front; tensors are written in any order.

    ``wanted``: per tensor name, the residue modulo ``PAGE`` its data should start at (see
    :func:`best_data_start`); the header is padded with spaces (which the format allows) so
    that most bytes land there."""

    def __init__(
        self, path: Path, tensors: Iterable[PlannedTensor], wanted: Mapping[str, int] | None = None
    ):
        header: dict = {"__metadata__": {"format": "pt"}}
        self._offsets: dict[str, tuple[int, PlannedTensor]] = {}
        position = 0
        for planned in tensors:
            end = position + planned.nbytes
            header[planned.name] = {
                "dtype": DTYPE_NAMES[planned.dtype],
                "shape": list(planned.shape),
                "data_offsets": [position, end],
            }
            self._offsets[planned.name] = (position, planned)
            position = end
        self._written = dict.fromkeys(self._offsets, 0)
        self._pacer = WritebackPacer()
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)  # keep the data 8-byte aligned
        if wanted:
            positions = {name: position for name, (position, _) in self._offsets.items()}
            sizes = {name: planned.nbytes for name, (_, planned) in self._offsets.items()}
            start = best_data_start(positions, sizes, {n: wanted[n] for n in wanted if n in sizes})
            encoded += b" " * ((start - 8 - len(encoded)) % PAGE)
        self._base = 8 + len(encoded)
        self.path = path
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.ftruncate(self._fd, self._base + position)
        _write_from(self._fd, memoryview(struct.pack("<Q", len(encoded)) + encoded), 0)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Write the whole tensor ``name``."""
        if tuple(tensor.shape) != self._offsets[name][1].shape:
            raise ConversionError(
                f"{name}: shape {tuple(tensor.shape)}, planned {self._offsets[name][1].shape}"
            )
        self.write_rows(name, 0, tensor)

    def write_rows(self, name: str, row_start: int, rows: torch.Tensor) -> None:
        """Write ``rows`` (``[n, *row_shape]``) as rows ``[row_start, row_start + n)`` of ``name``."""
        position, planned = self._offsets[name]
        if (
            tuple(rows.shape[1:]) != planned.shape[1:]
            or rows.dtype != planned.dtype
            or row_start + rows.shape[0] > planned.shape[0]
        ):
            raise ConversionError(
                f"{name}: rows {row_start}+{tuple(rows.shape)} {rows.dtype} do not fit "
                f"{planned.shape} {planned.dtype}"
            )
        data = tensor_bytes(rows)
        row_bytes = planned.nbytes // planned.shape[0]
        _write_from(self._fd, data, self._base + position + row_start * row_bytes)
        self._written[name] += len(data)
        self._pacer.wrote(self._fd, len(data))

    def copy_rows(
        self, name: str, row_start: int, num_rows: int, src_fd: int, src_offset: int
    ) -> int:
        """Rows ``[row_start, row_start + num_rows)`` of ``name`` from ``src_fd`` at
        ``src_offset`` (same dtype and row layout), file to file; returns the bytes moved."""
        position, planned = self._offsets[name]
        if row_start + num_rows > planned.shape[0]:
            raise ConversionError(f"{name}: rows {row_start}+{num_rows} beyond {planned.shape}")
        row_bytes = planned.nbytes // planned.shape[0]
        nbytes = num_rows * row_bytes
        MOVER.copy(
            src_fd, src_offset, self._fd, self._base + position + row_start * row_bytes, nbytes
        )
        self._written[name] += nbytes
        self._pacer.wrote(self._fd, nbytes)
        return nbytes

    def close(self) -> None:
        os.close(self._fd)
        incomplete = [n for n, (_, p) in self._offsets.items() if self._written[n] != p.nbytes]
        if incomplete:
            raise ConversionError(f"{self.path.name}: tensors not fully written: {incomplete}")


def plan_shards(tensors: list[PlannedTensor], max_shard_bytes: int) -> list[list[PlannedTensor]]:
    """Split ``tensors`` (in order) into shards of at most ``max_shard_bytes`` (one tensor may exceed)."""
    shards: list[list[PlannedTensor]] = [[]]
    size = 0
    for planned in tensors:
        if shards[-1] and size + planned.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(planned)
        size += planned.nbytes
    return shards
