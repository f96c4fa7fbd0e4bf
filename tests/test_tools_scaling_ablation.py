"""tools/scaling_ablation.py: the memory tracker, the growth fit and a tiny sweep end to end."""

from __future__ import annotations

import csv

import pytest
import torch

from tools.scaling_ablation import (
    CSV_COLUMNS,
    Measurement,
    PeakMemory,
    fit_exponents,
    log_log_slope,
    main,
)

MIB_FLOATS = 2**20 // 4


def test_peak_memory_counts_live_storages_only():
    existing = torch.zeros(MIB_FLOATS)
    with PeakMemory() as tracker:
        first = torch.ones(MIB_FLOATS)  # 1 MiB
        second = first * 2  # 2 MiB live
        del first
        third = torch.ones(MIB_FLOATS)  # back to 2 MiB live
        existing.add_(1)  # in place on an older tensor: nothing new
        view = third[:10]  # a view shares the storage: nothing new
    assert tracker.peak == 2 * 2**20
    assert tracker.current == 2 * 2**20
    del second, third, view
    assert tracker.current == 0


def test_log_log_slope_recovers_exponents():
    lengths = [1024, 2048, 4096, 8192]
    assert log_log_slope(lengths, [3.0 * n for n in lengths]) == pytest.approx(1.0)
    assert log_log_slope(lengths, [0.5 * n**2 for n in lengths]) == pytest.approx(2.0)
    with pytest.raises(ValueError, match="two different lengths"):
        log_log_slope([8, 8], [1.0, 2.0])


def test_fit_uses_largest_ok_points_per_row():
    rows = [
        Measurement(bench="scan", variant="single", length=n, cp_size=1, time_ms=t, peak_mem_mb=n)
        for n, t in ((256, 50.0), (512, 1.0), (1024, 2.0), (2048, 4.0), (4096, 8.0))
    ]
    rows.append(Measurement(bench="scan", variant="single", length=8192, cp_size=1, status="oom"))
    rows += [
        Measurement(bench="actor", variant="train_step", length=n, cp_size=1, time_ms=1.0)
        for n in (64, 128)  # two points: no fit
    ]
    (fit,) = fit_exponents(rows)
    # The overhead-dominated 256 point and the oom row are left out.
    assert (fit["min_length"], fit["max_length"]) == (512, 4096)
    assert fit["time_exponent"] == pytest.approx(1.0)
    assert fit["memory_exponent"] == pytest.approx(1.0)


@pytest.mark.slow  # two spawned gloo worlds
def test_tiny_sweep_writes_csv_fit_and_plot(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    # A 3 MiB budget: naive log-probs at 1024 (4 MiB of logits and friends) must be skipped.
    main(
        ["--lengths", "256,512,1024", "--actor-lengths", "32,64,128", "--cp-sizes", "1,2"]
        + ["--batch-size", "4", "--hidden-size", "32", "--vocab-size", "256", "--repeats", "1"]
        + ["--logprob-chunk-size", "128", "--actor-hidden-size", "32", "--actor-vocab-size", "128"]
        + [
            "--threads",
            "1",
            "--min-time-s",
            "0",
            "--max-mem-gb",
            str(3 / 1024),
            "--output-dir",
            str(tmp_path),
        ]
    )
    with open(tmp_path / "scaling.csv") as handle:
        reader = csv.DictReader(handle)
        assert tuple(reader.fieldnames) == CSV_COLUMNS
        rows = list(reader)
    keyed = {(r["bench"], r["variant"], r["cp_size"], int(r["length"])): r for r in rows}
    expected = [("scan", "single", "1"), ("logprobs", "chunked", "1"), ("logprobs", "naive", "1")]
    expected += [("scan", "cp", "2"), ("actor", "train_step", "1"), ("actor", "train_step", "2")]
    for bench, variant, cp in expected:
        lengths = (32, 64, 128) if bench == "actor" else (256, 512, 1024)
        for length in lengths:
            assert (bench, variant, cp, length) in keyed
    skipped = keyed[("logprobs", "naive", "1", 1024)]
    assert skipped["status"] == "skipped" and "max-mem-gb" in skipped["note"]
    for key in [("scan", "single", "1", 1024), ("scan", "cp", "2", 1024)]:
        assert keyed[key]["status"] == "ok" and float(keyed[key]["time_ms"]) > 0
        # B = 4 fp32 rows of T = 1024 come out of the scan: at least 16 KiB.
        assert float(keyed[key]["peak_mem_mb"]) >= 4 * 1024 * 4 / 2**20
    chunked, naive = (
        keyed[("logprobs", "chunked", "1", 512)],
        keyed[("logprobs", "naive", "1", 512)],
    )
    assert float(naive["peak_mem_mb"]) > float(chunked["peak_mem_mb"]) > 0
    assert keyed[("actor", "train_step", "1", 128)]["status"] == "ok"
    with open(tmp_path / "scaling_fit.csv") as handle:
        fits = {(r["bench"], r["variant"], r["cp_size"]) for r in csv.DictReader(handle)}
    assert ("scan", "single", "1") in fits and ("actor", "train_step", "1") in fits
    assert ("logprobs", "naive", "1") not in fits  # two points left after the skip
    assert (tmp_path / "scaling.png").read_bytes()[:4] == b"\x89PNG"
    assert "growth exponent" in capsys.readouterr().out
