"""Training curves from metrics JSONL files, several runs overlaid (e.g. FIPO vs DAPO).

Each input file holds one JSON object per line: a numeric ``step`` and flat metric keys such as
``reward/mean``, ``response_length/mean`` or ``fipo/future_kl_p90``. Every panel below collects
the keys that match its patterns; a panel no run has data for is left out, and a key missing
from some lines just leaves gaps. Colour tells runs apart, line style tells a panel's keys
apart. A malformed line is reported with its file and line number.

Usage::

    python tools/plot_metrics.py fipo/metrics.jsonl dapo/metrics.jsonl \
        --labels FIPO DAPO --out curves.png [--smooth 5] [--extra actor/lr]
"""

from __future__ import annotations

import argparse
import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402


@dataclass(frozen=True, slots=True)
class Panel:
    title: str
    patterns: tuple[str, ...]
    """Full-match regular expressions over metric keys."""
    log_y: bool = False


PANELS: tuple[Panel, ...] = (
    Panel("reward / accuracy", (r"reward/mean", r"accuracy")),
    Panel("eval accuracy", (r"eval/.*accuracy", r"eval/.*avg@\d+")),
    Panel("rollout groups solved", (r"rollout/solve_(none|all)",)),
    Panel("response length (tokens)", (r"response_length/(mean|max|median)", r"eval/.*_length")),
    Panel("response clip ratio", (r"response_length/clip_ratio",)),
    Panel("FIPO influence weight", (r"fipo/weight_(mean|max|min)",)),
    Panel("FIPO weight clipped fraction", (r"fipo/weight_clipped_mean",)),
    Panel(
        "future KL", (r"fipo/future_kl_mean", r"fipo/future_kl_p\d+", r"fipo/future_kl_(min|max)")
    ),
    Panel("policy loss", (r"actor/pg_loss(_mean|_sum)?", r"actor/loss")),
    Panel("grad norm", (r"actor/grad_norm",), log_y=True),
    Panel("entropy", (r"actor/entropy(_mean)?",)),
    Panel("throughput (tokens/s)", (r"perf/.*tokens_per_s",)),
)


class MetricsFileError(ValueError):
    """A metrics file line that is not a JSON object with a numeric ``step``."""


Run = dict[str, list[tuple[float, float]]]
"""metric key -> [(step, value)] in file order."""


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def read_metrics(path: str | Path) -> Run:
    """Parse a metrics JSONL file into per-key (step, value) series.

    Blank lines are skipped; values that are not numbers (strings, lists, null) are ignored, as
    are non-finite values (they would break the axis limits).
    """
    series: Run = {}
    with open(path, encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise MetricsFileError(
                    f"{path}:{line_number}: not valid JSON ({error.msg})"
                ) from None
            if not isinstance(record, dict):
                raise MetricsFileError(f"{path}:{line_number}: expected a JSON object")
            step = record.get("step")
            if not _is_number(step):
                raise MetricsFileError(f"{path}:{line_number}: missing or non-numeric 'step'")
            for key, value in record.items():
                if key != "step" and _is_number(value) and math.isfinite(value):
                    series.setdefault(key, []).append((float(step), float(value)))
    return series


def smooth(values: Sequence[float], window: int) -> list[float]:
    """Trailing moving average over ``window`` points (1 = unchanged)."""
    if window < 1:
        raise ValueError(f"smooth window must be >= 1, got {window}")
    out, total = [], 0.0
    for index, value in enumerate(values):
        total += value
        if index >= window:
            total -= values[index - window]
        out.append(total / min(index + 1, window))
    return out


def panel_keys(panel: Panel, runs: Sequence[Run]) -> list[str]:
    """Keys of any run that match the panel, sorted by pattern order, then name."""
    keys: set[str] = set()
    for run in runs:
        keys.update(k for k in run if any(re.fullmatch(p, k) for p in panel.patterns))

    def order(key: str) -> tuple[int, str]:
        # Zero-pad numbers so that p5 sorts before p10.
        natural = re.sub(r"\d+", lambda m: m.group().zfill(6), key)
        return next(i for i, p in enumerate(panel.patterns) if re.fullmatch(p, key)), natural

    return sorted(keys, key=order)


def plot_runs(
    runs: Sequence[Run],
    labels: Sequence[str],
    out_path: str | Path,
    *,
    smooth_window: int = 1,
    extra_keys: Sequence[str] = (),
    columns: int = 3,
    title: str = "",
) -> list[str]:
    """Draw every non-empty panel into one PNG; returns the titles of the panels drawn."""
    if len(runs) != len(labels):
        raise ValueError(f"{len(labels)} labels for {len(runs)} runs")
    panels = list(PANELS) + [Panel(key, (re.escape(key),)) for key in extra_keys]
    filled = [(panel, panel_keys(panel, runs)) for panel in panels]
    filled = [(panel, keys) for panel, keys in filled if keys]
    if not filled:
        raise ValueError("no known metric keys in the given files; nothing to plot")
    rows = math.ceil(len(filled) / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(5.0 * columns, 3.4 * rows), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    styles = ("-", "--", ":", "-.", (0, (5, 1, 1, 1, 1, 1)), (0, (1, 3)), (0, (8, 3)))
    for axis, (panel, keys) in zip(axes.flat, filled):
        for run_index, (run, label) in enumerate(zip(runs, labels)):
            for key_index, key in enumerate(keys):
                points = run.get(key)
                if not points:
                    continue
                steps = [s for s, _ in points]
                values = smooth([v for _, v in points], smooth_window)
                name = label if len(keys) == 1 else f"{label}: {key.rsplit('/', 1)[-1]}"
                axis.plot(
                    steps,
                    values,
                    color=colors[run_index % len(colors)],
                    linestyle=styles[key_index % len(styles)],
                    label=name,
                )
        axis.set_title(panel.title)
        axis.set_xlabel("step")
        if panel.log_y:
            axis.set_yscale("log")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    for axis in list(axes.flat)[len(filled) :]:
        axis.set_visible(False)
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(out_path, dpi=100)
    plt.close(figure)
    return [panel.title for panel, _ in filled]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="+", help="metrics JSONL files, one per run")
    parser.add_argument("--labels", nargs="+", help="run names (default: the parent folder)")
    parser.add_argument("--out", default="metrics.png", help="output PNG path")
    parser.add_argument("--smooth", type=int, default=1, help="moving-average window in points")
    parser.add_argument("--extra", nargs="*", default=[], help="more keys, one panel each")
    parser.add_argument("--title", default="", help="figure title")
    args = parser.parse_args(argv)
    labels = args.labels or [Path(f).parent.name or Path(f).stem for f in args.files]
    runs = [read_metrics(path) for path in args.files]
    drawn = plot_runs(
        runs, labels, args.out, smooth_window=args.smooth, extra_keys=args.extra, title=args.title
    )
    print(f"wrote {args.out}: {len(drawn)} panels ({', '.join(drawn)})")


if __name__ == "__main__":
    main()
