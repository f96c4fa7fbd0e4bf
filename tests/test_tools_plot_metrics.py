"""tools/plot_metrics.py on tiny generated metrics files."""

from __future__ import annotations

import json
import math

import pytest

pytest.importorskip("matplotlib", reason="plot_metrics needs matplotlib")

from tools.plot_metrics import (  # noqa: E402
    PANELS,
    MetricsFileError,
    main,
    panel_keys,
    plot_runs,
    read_metrics,
    smooth,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_run(path, num_steps: int, fipo: bool, seed: float) -> None:
    """Synthetic curves with the trainer's key names (fipo/* only for the FIPO run)."""
    lines = []
    for step in range(num_steps):
        record = {
            "step": step,
            "reward/mean": -0.6 + 0.9 * (1 - math.exp(-step / (8 + seed))),
            "response_length/mean": 400 + 25 * step * (1.6 if fipo else 1.0),
            "response_length/max": 2048,
            "response_length/clip_ratio": 0.01 * (step % 3),
            "actor/pg_loss": 0.05 * math.sin(step / 2 + seed),
            "actor/grad_norm": 0.3 + 0.1 * math.cos(step),
            "perf/tokens_per_s": 900.0 + seed,
            "note": "strings are ignored",
        }
        if fipo:
            record.update(
                {
                    "fipo/weight_mean": 1.0 + 0.002 * step,
                    "fipo/weight_max": 1.2,
                    "fipo/weight_clipped_mean": 0.01 * step,
                    "fipo/future_kl_mean": 0.001 * step,
                    "fipo/future_kl_max": 0.05 * step,
                    "fipo/future_kl_min": -0.04 * step,
                    "fipo/future_kl_p10": -0.01 * step,
                    "fipo/future_kl_p90": 0.01 * step,
                }
            )
        if step % 5 == 0:  # evaluated every 5 steps only: a sparse series
            record["eval/aime_accuracy"] = 0.1 + 0.004 * step * (1.3 if fipo else 1.0)
        if step == 3:
            del record["actor/grad_norm"]  # a missing key leaves a gap
        lines.append(json.dumps(record))
    lines.insert(2, "")  # blank lines are fine
    path.write_text("\n".join(lines) + "\n")


def test_read_metrics_series_and_missing_keys(tmp_path):
    path = tmp_path / "run.jsonl"
    write_run(path, 6, fipo=True, seed=0.0)
    run = read_metrics(path)
    assert [s for s, _ in run["reward/mean"]] == [0, 1, 2, 3, 4, 5]
    assert [s for s, _ in run["actor/grad_norm"]] == [0, 1, 2, 4, 5]
    assert [s for s, _ in run["eval/aime_accuracy"]] == [0, 5]
    assert "note" not in run and "step" not in run
    assert run["response_length/max"][0] == (0.0, 2048.0)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('{"step": 0, "a": 1}\n{"step": 1, "a": \n', r"run.jsonl:2: not valid JSON"),
        ('{"step": 0}\n[1, 2]\n', r"run.jsonl:2: expected a JSON object"),
        ('\n\n{"a": 1}\n', r"run.jsonl:3: missing or non-numeric 'step'"),
        ('{"step": "x"}\n', r"run.jsonl:1: missing or non-numeric 'step'"),
    ],
)
def test_read_metrics_reports_file_and_line(tmp_path, text, message):
    path = tmp_path / "run.jsonl"
    path.write_text(text)
    with pytest.raises(MetricsFileError, match=message):
        read_metrics(path)


def test_smooth_is_trailing_mean():
    assert smooth([1.0, 3.0, 5.0, 7.0], 2) == [1.0, 2.0, 4.0, 6.0]
    assert smooth([1.0, 2.0], 1) == [1.0, 2.0]
    with pytest.raises(ValueError, match="window"):
        smooth([1.0], 0)


def test_panel_keys_match_quantiles_in_pattern_order():
    future_kl = next(p for p in PANELS if p.title == "future KL")
    run = {
        k: [(0.0, 1.0)]
        for k in (
            "fipo/future_kl_p90",
            "fipo/future_kl_max",
            "fipo/future_kl_p5",
            "fipo/future_kl_mean",
            "fipo/x",
        )
    }
    assert panel_keys(future_kl, [run]) == [
        "fipo/future_kl_mean",
        "fipo/future_kl_p5",
        "fipo/future_kl_p90",
        "fipo/future_kl_max",
    ]


def test_plot_overlays_runs_and_skips_empty_panels(tmp_path):
    write_run(tmp_path / "fipo.jsonl", 12, fipo=True, seed=0.0)
    write_run(tmp_path / "dapo.jsonl", 12, fipo=False, seed=2.0)
    runs = [read_metrics(tmp_path / "fipo.jsonl"), read_metrics(tmp_path / "dapo.jsonl")]
    out = tmp_path / "curves.png"
    drawn = plot_runs(runs, ["FIPO", "DAPO"], out, smooth_window=3, extra_keys=["perf/none"])
    assert out.read_bytes()[:8] == PNG_MAGIC
    assert "future KL" in drawn and "FIPO influence weight" in drawn and "eval accuracy" in drawn
    assert "entropy" not in drawn and "perf/none" not in drawn  # no data: no panel
    # DAPO alone has no fipo/* keys, so its plot has no FIPO panels.
    drawn_dapo = plot_runs(runs[1:], ["DAPO"], tmp_path / "dapo.png")
    assert "future KL" not in drawn_dapo and "reward / accuracy" in drawn_dapo
    with pytest.raises(ValueError, match="labels"):
        plot_runs(runs, ["only one"], out)


def test_cli_writes_png_and_rejects_unknown_keys(tmp_path, capsys):
    write_run(tmp_path / "run.jsonl", 5, fipo=True, seed=1.0)
    out = tmp_path / "cli.png"
    main([str(tmp_path / "run.jsonl"), "--out", str(out), "--title", "tiny"])
    assert out.read_bytes()[:8] == PNG_MAGIC
    assert "panels" in capsys.readouterr().out
    (tmp_path / "other.jsonl").write_text('{"step": 0, "unknown/key": 1}\n')
    with pytest.raises(ValueError, match="nothing to plot"):
        main([str(tmp_path / "other.jsonl"), "--out", str(out)])
