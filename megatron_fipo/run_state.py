"""Run bookkeeping around the loop: one run per output directory, verified atomic checkpoints.

Layout of ``<output_dir>``::

    .fipo-train.lock        held (flock) by the run writing here; names its holder
    config.yaml             the resolved config of the current run (older ones kept as
                            config.<time>.yaml when a later run changes it)
    metrics.jsonl           one line per step (see :mod:`megatron_fipo.metrics_log`)
    checkpoints/
        step_000010/            complete checkpoint (renamed into place as the very last step)
            actor/              Megatron dist checkpoint: model + optimizer + LR scheduler
            trainer_state.pt    step, weights version, data position, surplus groups, RNG states
            metrics.jsonl       the run's metrics up to this step: committed with the checkpoint
            config.yaml         the config that wrote it
            MANIFEST.json       size and sha256 of every file above
            COMPLETE            written after every file and the manifest are on disk (fsync)
        step_000020.partial/    being written (or left by a killed run): never picked, removed
        step_000015.damaged/    failed verification at resume: set aside, never deleted

A run killed at any moment resumes from the last complete checkpoint; a complete checkpoint
whose files no longer match their manifest (truncated, overwritten) is named, set aside and the
previous one is used (:func:`resume_candidates` + :func:`verify_checkpoint`).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import random
import re
import shutil
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

_STEP_DIR = re.compile(r"^step_(\d{6,})$")
MARKER = "COMPLETE"
MANIFEST = "MANIFEST.json"
LOCK_FILE = ".fipo-train.lock"
_READ_BYTES = 16 * 2**20


class RunDirError(RuntimeError):
    """The output directory cannot host this run (in use, not writable); the message says why."""


class CheckpointError(RuntimeError):
    """A checkpoint cannot be resumed from; the message names it and the problem."""


# ---------------------------------------------------------------------------- the output dir
class RunLock:
    """Exclusive lock of an output directory for one run (``flock``: released by the kernel
    when the holder exits, also on SIGKILL). The lock file names the holder."""

    def __init__(self, output_dir: str | Path) -> None:
        self.output_dir = Path(output_dir)
        self.path = self.output_dir / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        try:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as error:
            raise RunDirError(
                f"trainer.output_dir {self.output_dir} is not writable: {error.strerror}"
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise RunDirError(
                f"trainer.output_dir {self.output_dir} is in use by another run ({holder}); "
                "wait for it to end or choose another trainer.output_dir"
            ) from None
        holder = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "command": " ".join(sys.argv)[:300],
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the flock
            self._fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


def _read_holder(fd: int) -> str:
    try:
        holder = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
        return (
            f"fipo-train pid {holder['pid']} on {holder['host']} since {holder['started']}: "
            f"{holder['command']}"
        )
    except (ValueError, KeyError, UnicodeDecodeError):
        return "holder unknown"


def write_run_config(output_dir: str | Path, text: str) -> Path | None:
    """Write ``config.yaml``; a different existing one is kept as ``config.<time>.yaml``
    (returned) so that a resumed run with changed settings loses nothing."""
    path = Path(output_dir) / "config.yaml"
    kept = None
    if path.is_file() and path.read_text() != text:
        stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(path.stat().st_mtime))
        kept = path.with_name(f"config.{stamp}.yaml")
        os.replace(path, kept)
    atomic_write_text(path, text)
    return kept


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a synced temporary file and a rename."""
    temporary = path.with_name(path.name + ".tmp")
    with open(temporary, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


# ---------------------------------------------------------------------------- checkpoints
def checkpoint_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def checkpoint_step(path: Path) -> int:
    match = _STEP_DIR.match(path.name)
    if match is None:
        raise CheckpointError(f"{path} is not a step_NNNNNN checkpoint directory")
    return int(match.group(1))


def resume_candidates(output_dir: str | Path) -> list[Path]:
    """Complete checkpoint directories (``COMPLETE`` present), newest first."""
    root = checkpoint_root(output_dir)
    if not root.is_dir():
        return []
    complete = [
        (int(match.group(1)), path)
        for path in root.iterdir()
        if (match := _STEP_DIR.match(path.name)) and (path / MARKER).is_file()
    ]
    return [path for _, path in sorted(complete, reverse=True)]


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest complete checkpoint directory (not verified), or None."""
    candidates = resume_candidates(output_dir)
    return candidates[0] if candidates else None


def begin_checkpoint(output_dir: str | Path, step: int) -> tuple[Path, Path]:
    """``(partial_dir, final_dir)`` for ``step``; a stale partial directory is cleared."""
    root = checkpoint_root(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:06d}"
    partial = root / f"step_{step:06d}.partial"
    if partial.exists():
        shutil.rmtree(partial)
    partial.mkdir()
    return partial, final


@dataclass(frozen=True, slots=True)
class FileDigest:
    size: int
    sha256: str


def digest_files(
    root: str | Path, names: Iterable[str], sync: bool = True
) -> dict[str, FileDigest]:
    """Size and sha256 of each ``root/name``; with ``sync`` each file is also fsynced (the
    writer of a checkpoint calls this before its manifest, so the bytes hashed are on disk)."""
    root = Path(root)
    out = {}
    for name in names:
        digest = hashlib.sha256()
        size = 0
        with open(root / name, "rb") as handle:
            while chunk := handle.read(_READ_BYTES):
                digest.update(chunk)
                size += len(chunk)
            if sync:
                os.fsync(handle.fileno())
        out[name] = FileDigest(size, digest.hexdigest())
    return out


def checkpoint_files(directory: str | Path) -> list[str]:
    """Every file under ``directory`` (relative, sorted) except the manifest and the marker."""
    directory = Path(directory)
    return sorted(
        str(path.relative_to(directory))
        for path in directory.rglob("*")
        if path.is_file() and path.name not in (MANIFEST, MARKER)
    )


Digester = Callable[[Path, Sequence[str]], dict[str, FileDigest]]
"""Hashes files of a checkpoint directory: :func:`digest_files`, or the training ranks sharing
the work (``RunComponents.digest_files``)."""


def finish_checkpoint(
    partial: Path, final: Path, keep: int | None, digester: Digester | None = None
) -> None:
    """Hash and sync every file, write the manifest, then the marker, then rename into place
    and prune old checkpoints. A crash before the rename leaves only a ``.partial``."""
    digester = digester or (lambda root, names: digest_files(root, names))
    names = checkpoint_files(partial)
    digests = digester(partial, names)
    manifest = {name: {"size": d.size, "sha256": d.sha256} for name, d in digests.items()}
    atomic_write_text(partial / MANIFEST, json.dumps({"files": manifest}, indent=1) + "\n")
    for directory in {(partial / name).parent for name in names}:
        _fsync_dir(directory)
    atomic_write_text(partial / MARKER, time.strftime("%Y-%m-%dT%H:%M:%S") + "\n")
    _fsync_dir(partial)
    if final.exists():
        shutil.rmtree(final)
    os.replace(partial, final)
    root = final.parent
    _fsync_dir(root)
    for stale in root.glob("step_*.partial"):
        shutil.rmtree(stale, ignore_errors=True)
    if keep:
        complete = sorted(p for p in root.iterdir() if _STEP_DIR.match(p.name))
        for old in complete[:-keep]:
            shutil.rmtree(old, ignore_errors=True)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def verify_checkpoint(path: Path, digester: Digester | None = None) -> str | None:
    """None when ``path`` matches its manifest, else one line naming the first problem.

    Without ``digester`` only presence and sizes are checked (cheap: the CLI does this before
    Ray starts); with one, contents are hashed too. A checkpoint written before manifests
    existed has none and is accepted as unverified.
    """
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        return None
    try:
        files = json.loads(manifest_path.read_text())["files"]
    except (ValueError, KeyError, TypeError):
        return f"{MANIFEST} is unreadable"
    for name, entry in sorted(files.items()):
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        size = file.stat().st_size
        if size != entry["size"]:
            return f"{name} has {size} bytes, the manifest says {entry['size']}"
    if digester is not None:
        digests = digester(path, sorted(files))
        for name in sorted(files):
            if digests[name].sha256 != files[name]["sha256"]:
                return f"{name} does not match its sha256 (its contents changed after the save)"
    return None


def set_aside(path: Path) -> Path:
    """Rename a damaged checkpoint to ``<name>.damaged`` (never deleted; never picked)."""
    target = path.with_name(path.name + ".damaged")
    suffix = 1
    while target.exists():
        suffix += 1
        target = path.with_name(f"{path.name}.damaged{suffix}")
    os.replace(path, target)
    return target


def select_checkpoint(
    output_dir: str | Path, resume: str, digester: Digester | None = None, report: Any = print
) -> Path | None:
    """The checkpoint a run resumes from, per ``trainer.resume``.

    ``"disable"``: None. A path: that checkpoint, which must be complete and intact
    (:class:`CheckpointError` otherwise). ``"auto"``: the newest complete checkpoint that
    verifies; damaged ones are reported (one line each through ``report``), set aside, and the
    previous one is tried. None when there is none; :class:`CheckpointError` when every
    complete checkpoint is damaged (nothing would be silently started over).
    """
    if resume == "disable":
        return None
    if resume != "auto":
        path = Path(resume)
        if not (path / MARKER).is_file() or not (path / "trainer_state.pt").is_file():
            raise CheckpointError(f"trainer.resume: {path} is not a complete checkpoint")
        checkpoint_step(path)
        problem = verify_checkpoint(path, digester)
        if problem:
            raise CheckpointError(f"trainer.resume: checkpoint {path} is damaged: {problem}")
        return path
    damaged = []
    for path in resume_candidates(output_dir):
        problem = verify_checkpoint(path, digester)
        if problem is None:
            return path
        aside = set_aside(path)
        damaged.append(path.name)
        report(f"checkpoint {path.name} is damaged ({problem}); set aside as {aside.name}")
    if damaged:
        raise CheckpointError(
            f"every complete checkpoint in {checkpoint_root(output_dir)} is damaged "
            f"({', '.join(damaged)}, now *.damaged); resume from one explicitly or start a "
            "new run in another trainer.output_dir"
        )
    return None


def save_torch(value: Any, path: Path) -> None:
    """``torch.save`` through a synced temporary file and a rename."""
    temporary = path.with_name(path.name + ".tmp")
    with open(temporary, "wb") as handle:
        torch.save(value, handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def rng_state() -> dict[str, Any]:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


# ---------------------------------------------------------------------------- stopping
class StopRequest:
    """SIGTERM / SIGINT: the first asks the loop to stop after the current step (with a
    checkpoint); a second one stops at once (KeyboardInterrupt)."""

    def __init__(self) -> None:
        self.signal_name: str | None = None

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    def installed(self) -> _Handlers:
        return _Handlers(self)

    def handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt(f"second {signal.Signals(signum).name}: stopping now")
        self.signal_name = signal.Signals(signum).name
        print(
            f"fipo-train: {self.signal_name} received: stopping after the current step with a "
            f"checkpoint (send it again to stop at once)",
            file=sys.stderr,
            flush=True,
        )


class _Handlers:
    """Installs :class:`StopRequest` for SIGTERM and SIGINT while the loop runs (main thread
    only: elsewhere Python cannot install handlers and the defaults stay)."""

    def __init__(self, stop: StopRequest) -> None:
        self.stop = stop
        self.previous: dict[int, Any] = {}

    def __enter__(self) -> None:
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGTERM, signal.SIGINT):
                self.previous[signum] = signal.signal(signum, self.stop.handle)

    def __exit__(self, *exc: Any) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)
