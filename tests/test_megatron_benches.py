"""The actor's CPU benchmarks run at tiny sizes (their printed numbers are what the README
reports at full size): token-balanced DP shares, token-budget batching, packed rows."""

from __future__ import annotations

import contextlib
import io
import json

from megatron_harness import WorkerWorld


def _run(main, argv: list[str]) -> dict:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(argv) == 0
    return json.loads(out.getvalue())


def _batching_benches(rank, world_size):
    from tools.bench import dynamic_batching, packing

    tiny = ["--sequences=5", "--max-length=320", "--budget=320", "--hidden=32", "--layers=1"]
    return _run(dynamic_batching.main, tiny), _run(packing.main, [*tiny, "--rounds=1"])


def test_batching_benchmarks_run_and_packing_computes_fewer_tokens():
    with WorkerWorld(1) as world:  # a process of its own: the benches initialise Megatron
        dynamic, packed = world.run(_batching_benches)[0]
    assert dynamic["dynamic_budget_320"]["padded_tokens"] < dynamic["fixed_mbs1"]["padded_tokens"]
    assert packed["packed"]["computed_tokens"] < packed["padded"]["computed_tokens"]
    assert packed["packed"]["computed_tokens"] >= packed["real_tokens"]
    assert packed["max_log_prob_difference"] < 1e-4  # the same log-probs, to fp32 rounding


def test_token_balanced_shares_beat_round_robin():
    from tools.bench import dp_balance

    summary = _run(dp_balance.main, ["--sequences=128", "--dp", "2", "4", "--seeds=2"])
    for dp in ("dp2", "dp4"):
        balanced, round_robin = summary[dp]["balanced"], summary[dp]["round_robin"]
        assert 1.0 <= balanced["max_over_mean_tokens"] < round_robin["max_over_mean_tokens"]


def test_weight_routes_benchmark_runs_and_sends_nothing_through_the_object_store():
    """The README's per-device weight-sync row, at a tiny size (its own local Ray)."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    done = subprocess.run(
        [sys.executable, "tools/bench/weight_routes.py"]
        + ["--hidden=64", "--layers=1", "--vocab=1024", "--repeats=1", "--bucket-mb=1"],
        capture_output=True,
        text=True,
        cwd=root,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(next(line for line in done.stdout.splitlines() if line.startswith("{")))
    assert result["object_store_bytes_per_sync"] == 0
    assert 0 < result["driver_tcp_bytes_per_sync"] < 64 * 1024
    assert result["ratio"] > 0 and result["sync_gb_per_s"] > 0
