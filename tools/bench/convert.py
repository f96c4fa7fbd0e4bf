"""Benchmark: streaming HF <-> Megatron conversion vs copying the same safetensors bytes.

    python -m tools.bench.convert [--layers 10] [--work-dir DIR] [--repeats 2]

Writes a random Qwen2-shaped bf16 checkpoint (about 1.2 GB at the default 10 layers), then, each
in a fresh subprocess (so peak RSS is the step's own; after an untimed warm-up conversion of a
tiny model, so imports are not timed): copies the shards (``shutil.copyfile``), converts
HF -> Megatron and Megatron -> HF, in ``--repeats`` rounds. Reports GB/s (weight bytes / wall
time, best over rounds), peak-RSS growth over the step's starting RSS (imports done), and the
ratio to the copy: per round (the three steps back to back, in an order that rotates from round
to round), and their median (``vs_copy``).
The target is conversion throughput >= 0.5x the copy throughput. Every step starts after ``os.sync()``,
reads from a warm page cache and ends with its output flushed to disk (the copy fsyncs each
file, the converters sync before their final rename), so all are compared on equal terms.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

_STEP = textwrap.dedent(
    r"""
    import json, os, re, shutil, sys, time
    from pathlib import Path
    import torch
    torch.set_num_threads(1)
    from checkpoint_convert.convert import hf_to_megatron, megatron_to_hf
    from checkpoint_convert.random_checkpoint import qwen2_config, write_random_checkpoint
    step, src, dst, scratch = sys.argv[1:5]
    # Warm-up (untimed): first-call imports and allocations are not throughput.
    tiny = qwen2_config(num_layers=2, hidden_size=64, ffn_hidden_size=128, vocab_size=256,
                        num_heads=4, num_kv_heads=2)
    write_random_checkpoint(Path(scratch) / "tiny", tiny)
    hf_to_megatron(Path(scratch) / "tiny", Path(scratch) / "tiny_m", progress=False)
    megatron_to_hf(Path(scratch) / "tiny_m", Path(scratch) / "tiny_hf", progress=False)
    status = Path("/proc/self/status")
    kib = lambda field: int(re.search(field + r":\s+(\d+)", status.read_text()).group(1))
    os.sync()  # start every step with no dirty pages of earlier steps
    time.sleep(2)  # and let the virtual disk finish them (its write rate drifts otherwise)
    Path("/proc/self/clear_refs").write_text("5")  # peak (VmHWM) := current RSS
    base = kib("VmRSS")
    start, cpu_start = time.perf_counter(), time.process_time()
    if step == "copy":
        Path(dst).mkdir()
        for path in sorted(Path(src).glob("*.safetensors")):
            shutil.copyfile(path, Path(dst) / path.name)
            fd = os.open(Path(dst) / path.name, os.O_RDONLY)
            os.fsync(fd)  # conversions flush their output too
            os.close(fd)
    elif step == "hf_to_megatron":
        hf_to_megatron(src, dst, progress=False)
    else:
        megatron_to_hf(src, dst, progress=False)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    growth = (kib("VmHWM") - base) * 1024
    print(json.dumps({"seconds": seconds, "cpu_seconds": cpu, "peak_rss_growth": growth}))
    """
)


def _run_step(step: str, src: Path, dst: Path) -> dict:
    if dst.exists():
        shutil.rmtree(dst)
    scratch = dst.with_name(dst.name + "_warmup")
    shutil.rmtree(scratch, ignore_errors=True)
    child = subprocess.run(
        [sys.executable, "-c", _STEP, step, str(src), str(dst), str(scratch)],
        capture_output=True,
        text=True,
        check=False,
    )
    if child.returncode != 0:
        raise RuntimeError(f"{step} failed:\n{child.stderr}")
    return json.loads(child.stdout.strip().splitlines()[-1])


def run(work_dir: Path, num_layers: int, repeats: int) -> dict:
    """Time every step ``repeats`` times; returns the summary printed by :func:`main`."""
    from checkpoint_convert.random_checkpoint import qwen2_config, write_random_checkpoint

    config = qwen2_config(
        num_layers=num_layers,
        hidden_size=2048,
        ffn_hidden_size=5632,
        vocab_size=32000,
        num_heads=16,
        num_kv_heads=4,
    )
    source = work_dir / "hf"
    total = write_random_checkpoint(source, config, max_shard_bytes=512 << 20)
    steps = {
        "copy": (source, work_dir / "copy"),
        "hf_to_megatron": (source, work_dir / "megatron"),
        "megatron_to_hf": (work_dir / "megatron", work_dir / "hf_back"),
    }
    results: dict[str, dict] = {}
    round_ratios: dict[str, list[float]] = {"hf_to_megatron": [], "megatron_to_hf": []}
    order = list(steps)
    for round_index in range(repeats):
        # One round: the copy and both conversions back to back, so each round's ratios
        # compare steps under the same disk state (this VM's write rate drifts by up to 4x).
        # The order rotates from round to round, so no step always runs on a rested disk.
        round_seconds = {}
        for step in order[round_index % 3 :] + order[: round_index % 3]:
            src, dst = steps[step]
            outcome = _run_step(step, src, dst)
            round_seconds[step] = outcome["seconds"]
            best = results.get(step)
            if best is None or outcome["seconds"] < best["seconds"]:
                results[step] = outcome
        for step in round_ratios:
            round_ratios[step].append(round_seconds["copy"] / round_seconds[step])
    summary = {
        "weight_bytes": total,
        "largest_tensor_bytes": 32000 * 2048 * 2,
        "load_average_1min": os.getloadavg()[0],
    }
    for step, outcome in results.items():
        summary[step] = {
            "gb_per_s": round(total / outcome["seconds"] / 1e9, 3),
            "seconds": round(outcome["seconds"], 3),
            # CPU time of the process (user + sys): less sensitive to other load than wall time.
            "cpu_seconds": round(outcome["cpu_seconds"], 3),
            "peak_rss_growth_mb": round(outcome["peak_rss_growth"] / 2**20, 1),
        }
    copy_rate = summary["copy"]["gb_per_s"]
    for step, ratios in round_ratios.items():
        summary[step]["vs_copy_best"] = round(summary[step]["gb_per_s"] / copy_rate, 3)
        summary[step]["vs_copy_rounds"] = [round(r, 3) for r in ratios]
        summary[step]["vs_copy"] = round(statistics.median(ratios), 3)
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=10, help="decoder layers (~105 MB each)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--work-dir", type=Path, help="scratch directory (default: a temp dir)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(dir=args.work_dir) as scratch:
        summary = run(Path(scratch), args.layers, args.repeats)
    print(json.dumps(summary, indent=2))
    ratios = [summary[s]["vs_copy"] for s in ("hf_to_megatron", "megatron_to_hf")]
    print(f"conversion / copy throughput, median over rounds: {min(ratios):.2f}x (target >= 0.5x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
