"""Streaming HF <-> Megatron conversion.

``hf_to_megatron``: HF safetensors -> megatron-core ``torch_dist`` checkpoint (one chunk per layer
per tensor, vocab padded), with the HF config, generation config and tokenizer files kept in
``<output>/hf_config/``. ``megatron_to_hf``: back to sharded safetensors + index. Both read one
tensor (one layer's slice) at a time and write it before reading the next, so peak memory is a
few of the largest tensors whatever the model size. Output goes to a temporary directory beside
the target and is renamed into place only when complete.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from tqdm import tqdm

from checkpoint_convert.adapters import (
    EMBEDDING,
    EXTRA_STATE_MODULES,
    OUTPUT,
    Adapter,
    ConversionError,
    MegatronTensorSpec,
    adapter_for,
)
from checkpoint_convert.megatron_io import (
    ChunkWrite,
    DistCheckpointReader,
    ObjectWrite,
    sharded_object_key,
    write_dist_checkpoint,
)
from checkpoint_convert.safetensors_io import (
    INDEX_FILE,
    PAGE,
    ByteRange,
    PlannedTensor,
    SafetensorsReader,
    ShardWriter,
    plan_shards,
)

HF_CONFIG_DIR = "hf_config"
# Names the actor's checkpoints use too (megatron_fipo.megatron.checkpoint): the HF config and
# a description of what was saved, both beside the torch_dist files.
ROOT_CONFIG = "config.json"
CHECKPOINT_META = "fipo_checkpoint.json"
DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3
# Buffers some HF checkpoints carry that are not weights.
_IGNORED_HF_SUFFIXES = ("rotary_emb.inv_freq",)


@contextlib.contextmanager
def staged_output(
    output_dir: Path, force: bool, sources: tuple[Path, ...] = (), sync: bool = True
) -> Iterator[Path]:
    """Yield a temporary directory beside ``output_dir``; on success it replaces ``output_dir``.

    ConversionError when ``output_dir`` is non-empty (unless ``force``), or is, contains or lies
    inside one of ``sources`` (``force`` replaces the whole output directory, so it must never
    hold an input). On any error the temporary directory is removed and ``output_dir`` is
    untouched. With ``sync`` the files are flushed to disk before the rename, so a crash cannot
    leave a complete-looking directory with missing data.
    """
    output_dir = Path(output_dir).absolute()
    for source in sources:
        _check_apart(output_dir, Path(source))
    if output_dir.exists() and not output_dir.is_dir():
        raise ConversionError(f"output path {output_dir} exists and is not a directory")
    if output_dir.is_dir() and any(output_dir.iterdir()) and not force:
        raise ConversionError(
            f"output directory {output_dir} is not empty (pass --force to replace it)"
        )
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.partial-", dir=output_dir.parent))
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    staging.chmod(0o777 & ~_umask())  # mkdtemp makes it private
    if sync:
        _fsync_tree(staging)
    if output_dir.exists():
        retired = staging.with_name(staging.name + ".old")
        output_dir.rename(retired)
        staging.rename(output_dir)
        shutil.rmtree(retired, ignore_errors=True)
    else:
        staging.rename(output_dir)


def _check_apart(output_dir: Path, source: Path) -> None:
    """ConversionError when the output directory is the input, contains it or is inside it."""
    target, source = output_dir.resolve(), source.resolve()
    if target == source:
        relation = "is the input directory"
    elif source.is_relative_to(target):
        relation = f"contains the input {source} (--force would delete it)"
    elif target.is_relative_to(source):
        relation = f"is inside the input directory {source}"
    else:
        return
    raise ConversionError(
        f"output directory {output_dir} {relation}; choose an output directory apart from it"
    )


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_tree(root: Path) -> None:
    for path in sorted(root.rglob("*"), reverse=True):  # files before their directories
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def read_config(path: Path) -> dict:
    if not path.is_file():
        raise ConversionError(f"missing model config: {path}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ConversionError(f"{path} is not valid JSON: {error}") from error


def _check_hf_tensors(adapter: Adapter, reader: SafetensorsReader) -> torch.dtype:
    """Names, shapes and dtype of the HF tensors against the config; returns the common dtype."""
    expected = adapter.hf_shapes()
    for name, shape in expected.items():
        info = reader.tensors.get(name)
        if info is None:
            raise ConversionError(
                f"tensor {name!r} (required by config.json) is missing from {reader.listing}"
            )
        if info.shape != shape:
            raise ConversionError(
                f"tensor {name!r} has shape {info.shape} but config.json implies {shape} "
                "(config does not match the weights)"
            )
    for name in reader.tensors.keys() - expected.keys():
        tied_head = name == "lm_head.weight" and adapter.dims.tie_embeddings
        if not tied_head and not name.endswith(_IGNORED_HF_SUFFIXES):
            raise ConversionError(
                f"unexpected tensor {name!r} in {reader.hf_dir} (not in a {adapter.dims.model_type} model with this config)"
            )
    dtypes = {reader.tensors[name].dtype for name in expected}
    if len(dtypes) != 1:
        raise ConversionError(f"mixed dtypes in {reader.hf_dir}: {sorted(map(str, dtypes))}")
    return dtypes.pop()


def _layer_name(spec: MegatronTensorSpec, layer: int) -> str:
    return spec.key.replace("decoder.layers.", f"decoder.layers.{layer}.", 1)


def _plan_chunks(
    adapter: Adapter, reader: SafetensorsReader, dtype: torch.dtype, bar: tqdm
) -> list[ChunkWrite]:
    """One ChunkWrite per (tensor, layer), layer-major so HF shards are read mostly in order.

    A chunk's data is its row pieces (``Adapter.row_pieces``: the layout
    ``Adapter.hf_to_megatron`` builds) as byte ranges of the HF files; the writer copies them
    file to file, and the vocab padding rows, which no piece covers, stay zero.
    """

    def ranges(name: str, row_bytes: int):
        def resolve() -> list[ByteRange]:
            out = []
            for piece in adapter.row_pieces(name):
                fd, offset, nbytes = reader.row_range(piece.hf_name, piece.hf_row, piece.num_rows)
                out.append(ByteRange(fd, offset, nbytes, piece.megatron_row * row_bytes))
                bar.update(nbytes)
            return out

        return resolve

    def chunk(spec: MegatronTensorSpec, layer: int | None) -> ChunkWrite:
        """The whole tensor (``layer`` None) or layer ``layer`` of the stacked ``[L, ...]``."""
        stack = () if layer is None else (adapter.dims.num_layers,)
        at = () if layer is None else (layer,)
        one = () if layer is None else (1,)
        name = spec.key if layer is None else _layer_name(spec, layer)
        return ChunkWrite(
            spec.key,
            (*stack, *spec.shape),
            (*at, *(0,) * len(spec.shape)),
            (*one, *spec.shape),
            dtype,
            ranges(name, math.prod(spec.shape[1:]) * dtype.itemsize),
        )

    specs = adapter.megatron_specs()
    ends = [s for s in specs if not s.per_layer]
    chunks = [chunk(s, None) for s in ends if s.key == EMBEDDING]
    for layer in range(adapter.dims.num_layers):
        chunks += [chunk(s, layer) for s in specs if s.per_layer]
    chunks += [chunk(s, None) for s in ends if s.key != EMBEDDING]
    return chunks


def _copy_side_files(source: Path, target: Path) -> None:
    """config.json, generation_config.json, tokenizer files: every top-level non-weight file."""
    target.mkdir(parents=True, exist_ok=True)
    for path in sorted(source.iterdir()):
        if path.is_file() and not path.name.endswith(".safetensors") and path.name != INDEX_FILE:
            shutil.copy2(path, target / path.name)


def hf_to_megatron(
    hf_dir: Path, output_dir: Path, *, force: bool = False, progress: bool = True, sync: bool = True
) -> Path:
    """Convert an HF checkpoint directory to a megatron-core ``torch_dist`` checkpoint.

    ``sync=False`` skips flushing the output to disk before it is renamed into place.
    """
    hf_dir = Path(hf_dir)
    config = read_config(hf_dir / "config.json")
    adapter = adapter_for(config)
    with SafetensorsReader(hf_dir) as reader:
        dtype = _check_hf_tensors(adapter, reader)
        total = sum(reader.tensors[n].nbytes for n in adapter.hf_shapes())
        with (
            staged_output(output_dir, force, (hf_dir,), sync) as staging,
            tqdm(
                total=total, unit="B", unit_scale=True, desc="hf->megatron", disable=not progress
            ) as bar,
        ):
            layers = adapter.dims.num_layers
            objects = [
                ObjectWrite(
                    sharded_object_key(
                        f"decoder.layers.{module}._extra_state", (layer,), (layers,)
                    ),
                    None,
                )
                for layer in range(layers)
                for module in EXTRA_STATE_MODULES
            ]
            write_dist_checkpoint(
                staging, _plan_chunks(adapter, reader, dtype, bar), objects, common={}
            )
            _copy_side_files(hf_dir, staging / HF_CONFIG_DIR)
            shutil.copy2(hf_dir / "config.json", staging / ROOT_CONFIG)
            info = {
                "kind": "model",
                "converted_from": str(hf_dir.absolute()),
                "model_type": adapter.dims.model_type,
                "vocab_size": adapter.dims.vocab_size,
                "padded_vocab_size": adapter.dims.padded_vocab_size,
                "dtype": str(dtype).removeprefix("torch."),
            }
            (staging / CHECKPOINT_META).write_text(json.dumps(info, indent=2))
    return Path(output_dir)


# ---------------------------------------------------------------- Megatron -> HF


def _check_megatron_tensors(
    adapter: Adapter, reader: DistCheckpointReader
) -> dict[str, torch.dtype]:
    """Every expected key present with the shape the config implies; returns dtypes by key."""
    dims, dtypes = adapter.dims, {}
    for spec in adapter.megatron_specs():
        entry = reader.tensor_metadata(spec.key)
        expected = (dims.num_layers, *spec.shape) if spec.per_layer else spec.shape
        actual = tuple(entry.size)
        if spec.key in (EMBEDDING, OUTPUT):
            # Any padding is fine (it depends on the TP size the checkpoint was saved with).
            ok = actual[0] >= dims.vocab_size and actual[1:] == expected[1:]
        else:
            ok = actual == expected
        if not ok:
            raise ConversionError(
                f"Megatron tensor {spec.key!r} has shape {actual} but the config implies {expected}"
            )
        if entry.properties.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ConversionError(
                f"Megatron tensor {spec.key!r} has unsupported dtype {entry.properties.dtype}"
            )
        dtypes[spec.key] = entry.properties.dtype
    return dtypes


def _megatron_blocks(adapter: Adapter, reader: DistCheckpointReader) -> Iterator[tuple]:
    """(name, stored key, offsets, sizes, per_layer) for every block to read, layer-major.

    ``name`` is the per-layer Megatron name (global layer number) the adapter maps.
    """
    specs = adapter.megatron_specs()
    ends = [s for s in specs if not s.per_layer]
    for spec in ends[:1]:  # the embedding
        size = tuple(reader.tensor_metadata(spec.key).size)
        yield spec.key, spec.key, (0,) * len(size), size, False
    for layer in range(adapter.dims.num_layers):
        for spec in (s for s in specs if s.per_layer):
            offsets = (layer,) + (0,) * len(spec.shape)
            yield _layer_name(spec, layer), spec.key, offsets, (1, *spec.shape), True
    for spec in ends[1:]:  # final norm, output layer
        size = tuple(reader.tensor_metadata(spec.key).size)
        yield spec.key, spec.key, (0,) * len(size), size, False


def _hf_plan(
    adapter: Adapter, dtypes: dict[str, torch.dtype], dtype: torch.dtype | None
) -> list[PlannedTensor]:
    key_of = {}
    for spec in adapter.megatron_specs():
        for layer in range(adapter.dims.num_layers) if spec.per_layer else [None]:
            name = spec.key if layer is None else _layer_name(spec, layer)
            for source in adapter.hf_sources(name):
                key_of.setdefault(source, spec.key)
    return [
        PlannedTensor(name, dtype or dtypes[key_of[name]], shape)
        for name, shape in adapter.hf_shapes().items()
    ]


def _row_bytes(reader: DistCheckpointReader, key: str, sizes: tuple, per_layer: bool) -> int:
    rows = math.prod(sizes[2:] if per_layer else sizes[1:])
    return rows * reader.tensor_metadata(key).properties.dtype.itemsize


def _wanted_residues(
    adapter: Adapter, reader: DistCheckpointReader, blocks: list[tuple]
) -> dict[str, int]:
    """Per HF tensor, where (modulo the page size) its data should start so that its largest
    piece copies page-aligned from the stored chunk (see safetensors_io.best_data_start)."""
    best: dict[str, tuple[int, int]] = {}  # name -> (piece bytes, residue)
    for name, key, offsets, sizes, per_layer in blocks:
        stored = reader.stored_bytes(key, offsets, sizes)
        if stored is None:
            continue
        row_bytes = _row_bytes(reader, key, sizes, per_layer)
        for piece in adapter.row_pieces(name):
            source = stored[1] + (piece.megatron_row - piece.hf_row) * row_bytes
            nbytes = piece.num_rows * row_bytes
            if nbytes > best.get(piece.hf_name, (-1, 0))[0]:
                best[piece.hf_name] = (nbytes, source % PAGE)
    return {name: residue for name, (_, residue) in best.items()}


def megatron_to_hf(
    megatron_dir: Path,
    output_dir: Path,
    *,
    hf_config_dir: Path | None = None,
    force: bool = False,
    dtype: torch.dtype | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    progress: bool = True,
    sync: bool = True,
) -> Path:
    """Convert a ``torch_dist`` checkpoint back to HF safetensors (+ index, configs, tokenizer).

    ``hf_config_dir``: where config.json, generation_config.json and tokenizer files come from
    (default: the ``hf_config/`` an import stored; for checkpoints the actor saved, only the
    ``config.json`` beside them). ``dtype``: cast the output (default: the stored dtypes).
    """
    megatron_dir = Path(megatron_dir)
    side_dir = Path(hf_config_dir) if hf_config_dir is not None else megatron_dir / HF_CONFIG_DIR
    if hf_config_dir is None and not side_dir.is_dir():
        side_dir = megatron_dir  # an actor checkpoint: config.json only
    adapter = adapter_for(read_config(side_dir / "config.json"))
    with contextlib.ExitStack() as stack:
        reader = stack.enter_context(DistCheckpointReader(megatron_dir))
        planned = _hf_plan(adapter, _check_megatron_tensors(adapter, reader), dtype)
        shards = plan_shards(planned, max_shard_bytes)
        total = sum(p.nbytes for p in planned)
        staging = stack.enter_context(
            staged_output(output_dir, force, (megatron_dir, side_dir), sync)
        )
        bar = stack.enter_context(
            tqdm(total=total, unit="B", unit_scale=True, desc="megatron->hf", disable=not progress)
        )
        names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
        blocks = list(_megatron_blocks(adapter, reader))
        wanted = _wanted_residues(adapter, reader, blocks) if dtype is None else {}
        writers = [ShardWriter(staging / n, shard, wanted) for n, shard in zip(names, shards)]
        writer_of = {p.name: w for w, shard in zip(writers, shards) for p in shard}
        for name, key, offsets, sizes, per_layer in blocks:
            pieces = adapter.row_pieces(name)
            stored = reader.stored_bytes(key, offsets, sizes) if dtype is None else None
            if stored is not None:
                # A whole stored chunk: its row pieces go file to file into the HF shards.
                fd, data_offset = stored
                row_bytes = _row_bytes(reader, key, sizes, per_layer)
                for piece in pieces:
                    bar.update(
                        writer_of[piece.hf_name].copy_rows(
                            piece.hf_name,
                            piece.hf_row,
                            piece.num_rows,
                            fd,
                            data_offset + piece.megatron_row * row_bytes,
                        )
                    )
                continue
            # Any other chunking (e.g. saved under TP > 1) or a cast: read the block, then
            # write each row piece from it.
            block = reader.read(key, offsets, sizes)
            block = block[0] if per_layer else block
            for piece in pieces:
                rows = block.narrow(0, piece.megatron_row, piece.num_rows)
                rows = rows.to(dtype) if dtype is not None else rows
                writer_of[piece.hf_name].write_rows(piece.hf_name, piece.hf_row, rows)
                bar.update(rows.numel() * rows.element_size())
        for writer in writers:
            writer.close()
        index = {
            "metadata": {"total_size": total},
            "weight_map": {p.name: names[i] for i, shard in enumerate(shards) for p in shard},
        }
        (staging / INDEX_FILE).write_text(json.dumps(index, indent=2))
        if side_dir == megatron_dir:
            shutil.copy2(side_dir / ROOT_CONFIG, staging / ROOT_CONFIG)
        else:
            _copy_side_files(side_dir, staging)
    return Path(output_dir)
