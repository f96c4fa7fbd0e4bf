"""The Megatron checkpoint a run starts from, converted from ``model.hf_model_path`` once per
source *content*.

The conversion lands in ``<output_dir>/init_megatron/<fingerprint>/``. The fingerprint is a
sha256 over the converter's format version and the name and sha256 of every file of the HF
directory (weights, config, tokenizer), so a changed or replaced source checkpoint is converted
anew and never silently reused. File hashes are cached in ``init_megatron/hash_cache.json``
keyed by path, size, mtime and inode, so a restart does not reread tens of GB; any change to a
file's metadata rehashes it. Conversions of other sources are removed once the new one is in
place (they are derived data, recreated on demand).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from pathlib import Path

from megatron_fipo.run_state import atomic_write_text, digest_files

# Bump when checkpoint_convert's output for the same input changes.
CONVERTER_FORMAT = "hf_to_megatron/1"
INIT_DIR = "init_megatron"
_HASH_CACHE = "hash_cache.json"


def source_fingerprint(hf_dir: Path, cache_file: Path | None = None) -> str:
    """sha256 (hex) of the converter version and every file's name and contents."""
    hf_dir = Path(hf_dir)
    files = sorted(p for p in hf_dir.iterdir() if p.is_file())
    cache = _load_cache(cache_file)
    combined = hashlib.sha256(CONVERTER_FORMAT.encode())
    for path in files:
        stat = path.stat()
        key = str(path.resolve())
        identity = [stat.st_size, stat.st_mtime_ns, stat.st_ino]
        entry = cache.get(key)
        if entry is None or entry["identity"] != identity:
            digest = digest_files(path.parent, [path.name], sync=False)[path.name].sha256
            entry = cache[key] = {"identity": identity, "sha256": digest}
        combined.update(f"{path.name}\0{entry['sha256']}\n".encode())
    if cache_file is not None:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(cache_file, json.dumps(cache, indent=1) + "\n")
    return combined.hexdigest()


def _load_cache(cache_file: Path | None) -> dict:
    if cache_file is None or not cache_file.is_file():
        return {}
    try:
        cache = json.loads(cache_file.read_text())
        return cache if isinstance(cache, dict) else {}
    except ValueError:
        return {}  # a damaged cache only costs a rehash


def converted_initial_checkpoint(hf_dir: str | Path, output_dir: str | Path) -> Path:
    """The Megatron conversion of ``hf_dir`` under ``output_dir``: reused when its fingerprint
    matches, converted (atomically, by ``checkpoint_convert``) otherwise."""
    from checkpoint_convert.convert import hf_to_megatron

    hf_dir = Path(hf_dir)
    root = Path(output_dir) / INIT_DIR
    fingerprint = source_fingerprint(hf_dir, root / _HASH_CACHE)
    target = root / fingerprint[:16]
    if not (target / "source.json").is_file():
        _remove_legacy_layout(root)
        if target.exists():
            shutil.rmtree(target)  # a conversion that never got its source.json
        print(f"converting {hf_dir} to Megatron in {target}", file=sys.stderr)
        hf_to_megatron(hf_dir, target, progress=False)
        source = {"hf_model_path": str(hf_dir.resolve()), "fingerprint": fingerprint}
        atomic_write_text(target / "source.json", json.dumps(source, indent=1) + "\n")
    for other in root.iterdir():
        if other.is_dir() and other != target and (other / "source.json").is_file():
            shutil.rmtree(other)  # a conversion of an earlier source checkpoint
    return target


def _remove_legacy_layout(root: Path) -> None:
    """Before fingerprints, ``init_megatron`` itself was the (unkeyed) conversion: it cannot
    be trusted to match the source, so it is removed (it is derived data)."""
    if (root / ".metadata").is_file():
        print(f"removing unkeyed conversion {root} (made by an older version)", file=sys.stderr)
        for child in root.iterdir():
            if child.name != _HASH_CACHE:
                shutil.rmtree(child) if child.is_dir() else child.unlink()
