"""Reads the history of an offline Weights & Biases run (tests only).

An offline run is a ``run-<id>.wandb`` file: a 7-byte header, then records in 32 KiB blocks,
each record a 7-byte header (crc32, length, kind: 1 full, 2 first, 3 middle, 4 last piece)
and a piece of a serialized ``wandb_internal_pb2.Record``. wandb's own Python reader went
into its Go core, so the tests parse the file with the protobuf classes wandb ships.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

_BLOCK = 32768
_HEADER = 7


def records(path: Path) -> list:
    from wandb.proto import wandb_internal_pb2

    raw = Path(path).read_bytes()
    assert raw[:4] == b":W&B", f"{path} is not a W&B run file"
    out, pending, position = [], b"", _HEADER
    while position + _HEADER <= len(raw):
        left = _BLOCK - position % _BLOCK
        _, length, kind = struct.unpack("<IHB", raw[position : position + _HEADER])
        if left < _HEADER or (length == 0 and kind == 0):  # block trailer padding
            position += left
            continue
        piece = raw[position + _HEADER : position + _HEADER + length]
        position += _HEADER + length
        pending = piece if kind in (1, 2) else pending + piece
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            out.append(record)
    return out


def history(run_dir: Path) -> dict[int, dict[str, float]]:
    """``{step: {metric: value}}`` of every offline run file under ``run_dir`` (resumed runs
    write one file per process)."""
    steps: dict[int, dict[str, float]] = {}
    for path in sorted(Path(run_dir).rglob("run-*.wandb")):
        for record in records(path):
            if record.WhichOneof("record_type") != "history":
                continue
            items = {
                item.key or "/".join(item.nested_key): json.loads(item.value_json)
                for item in record.history.item
            }
            steps.setdefault(int(items["_step"]), {}).update(
                {k: v for k, v in items.items() if not k.startswith("_")}
            )
    return steps


def run_ids(run_dir: Path) -> set[str]:
    return {
        record.run.run_id
        for path in Path(run_dir).rglob("run-*.wandb")
        for record in records(path)
        if record.WhichOneof("record_type") == "run"
    }
