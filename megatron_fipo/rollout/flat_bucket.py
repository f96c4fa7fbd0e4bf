"""One weight-sync bucket as a single flat buffer of HF-named tensors, handed to another process
on the same machine without a copy in between.

The training rank packs a bucket's tensors (one dtype) into one 1-D buffer and passes a small
payload that *refers* to it: a CUDA IPC handle on GPU, the name of a shared-memory segment on
CPU (torch's ``file_system`` sharing: unrelated processes, e.g. two Ray actors, can open it).
The receiver maps the buffer, copies each tensor into its own parameter and returns; the sender
keeps the buffer alive (and unchanged) until that acknowledgement. One payload is made per
receiving process: each unpickle consumes the reference its pickle took.
"""

from __future__ import annotations

import base64
import io
import pickle
from collections.abc import Sequence
from dataclasses import dataclass
from multiprocessing.reduction import ForkingPickler

import torch
import torch.multiprocessing  # noqa: F401  (registers the tensor reductions ForkingPickler uses)


def use_file_system_sharing() -> None:
    """CPU shared-memory tensors by segment name, openable by any process of this user (the
    default passes file descriptors over a socket that needs a common multiprocessing
    parent, which Ray actors do not have). Call in both the sender and the receiver."""
    if torch.multiprocessing.get_sharing_strategy() != "file_system":
        torch.multiprocessing.set_sharing_strategy("file_system")


@dataclass(frozen=True, slots=True)
class BucketEntry:
    """Where one HF tensor lies in the flat buffer (offset and size in elements)."""

    name: str
    shape: tuple[int, ...]
    offset: int

    @property
    def numel(self) -> int:
        return int(torch.Size(self.shape).numel())


@dataclass(slots=True)
class FlatBucket:
    """HF-named tensors of one dtype laid end to end in ``buffer`` (1-D)."""

    buffer: torch.Tensor
    entries: tuple[BucketEntry, ...]

    def named_tensors(self) -> list[tuple[str, torch.Tensor]]:
        """Views into the buffer, one per entry."""
        return [
            (e.name, self.buffer[e.offset : e.offset + e.numel].view(e.shape)) for e in self.entries
        ]

    @property
    def num_bytes(self) -> int:
        return sum(e.numel for e in self.entries) * self.buffer.element_size()


class ReusedBuffer:
    """A 1-D buffer kept between buckets and syncs (allocating afresh costs page faults), in
    shared memory on CPU (another process may map it), on the requested device otherwise."""

    def __init__(self) -> None:
        self._buffer: torch.Tensor | None = None

    def take(self, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        num_bytes = numel * dtype.itemsize
        kept = self._buffer
        if kept is None or kept.numel() < num_bytes or kept.device != device:
            kept = torch.empty(num_bytes, dtype=torch.uint8, device=device)
            if device.type == "cpu":
                kept.share_memory_()
            self._buffer = kept
        return kept[:num_bytes].view(dtype)

    def release(self) -> None:
        self._buffer = None


class BucketPacker(ReusedBuffer):
    """Packs named tensors into one reused buffer (shared memory on CPU, the tensors' device
    on GPU), so a sync allocates it once rather than per bucket."""

    def pack(self, named: Sequence[tuple[str, torch.Tensor]]) -> FlatBucket:
        if not named:
            raise ValueError("an empty bucket cannot be packed")
        dtype, device = named[0][1].dtype, named[0][1].device
        entries, offset = [], 0
        for name, tensor in named:
            if tensor.dtype != dtype:
                raise ValueError(f"bucket mixes {dtype} and {tensor.dtype} ({name})")
            entries.append(BucketEntry(name, tuple(tensor.shape), offset))
            offset += tensor.numel()
        buffer = self.take(offset, dtype, device)
        for entry, (_, tensor) in zip(entries, named):
            buffer[entry.offset : entry.offset + entry.numel].view(entry.shape).copy_(tensor)
        return FlatBucket(buffer, tuple(entries))


class _TensorOnly(pickle.Unpickler):
    """Unpickles torch's tensor / storage rebuild functions and plain containers only."""

    def find_class(self, module: str, name: str):
        if module.startswith("torch") or (
            module == "builtins" and name in {"list", "tuple", "str", "int"}
        ):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"a weight payload may not refer to {module}.{name}")


def serialize_named(named: Sequence[tuple[str, torch.Tensor]]) -> str:
    """A payload referring to each tensor of ``named`` (shared memory on CPU: the tensors must
    already live there; CUDA IPC handles on GPU); :func:`open_named` maps them."""
    stream = io.BytesIO()
    ForkingPickler(stream).dump(list(named))
    return base64.b64encode(stream.getvalue()).decode()


def open_named(payload: str) -> list[tuple[str, torch.Tensor]]:
    """The tensors a :func:`serialize_named` payload refers to, mapped (not copied)."""
    return _TensorOnly(io.BytesIO(base64.b64decode(payload, validate=True))).load()
