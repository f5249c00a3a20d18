"""Plots of runs and sweeps (matplotlib, Agg backend, no display).

`flaxbert plot WORKDIR... --out curves.png` draws the curves of each run's metrics.jsonl: one
subplot per metric, one line per run. `flaxbert.sweeps.summary` uses `summary_figure` for a
sweep's summary.png. Matplotlib is imported only when a figure is drawn.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
from collections.abc import Iterable, Mapping, Sequence

from flaxbert.sweeps.logs import read_metrics
from flaxbert.sweeps.points import is_seed_key

LOSSES = ("loss", "eval/loss")  # always first in the default metrics, when present


def _task_metric_names() -> set[str]:
    from flaxbert.data.tasks import METRIC_SETS

    return {name for names in METRIC_SETS.values() for name in names}


def default_metrics(keys: Iterable[str]) -> list[str]:
    """Train and eval loss, every accuracy-like key, and fine-tuning's task metrics (eval/f1,
    eval/pearson, ...) among `keys`. test/* keys (one value at the end) are left out."""
    present = [k for k in dict.fromkeys(keys) if k != "step" and not k.startswith("test/")]
    task = {f"eval/{m}" for m in _task_metric_names()}
    chosen = [k for k in LOSSES if k in present]
    chosen += sorted(k for k in present if "accuracy" in k and "/" not in k)
    chosen += sorted(k for k in present if ("accuracy" in k or k in task) and "/" in k)
    return list(dict.fromkeys(chosen))


def run_labels(workdirs: Sequence[str]) -> list[str]:
    """Each workdir's last path component, or as many trailing components as make the labels
    unique (runs/a/seed=1 and runs/b/seed=1 → a/seed=1, b/seed=1)."""
    parts = [os.path.normpath(os.path.abspath(w)).split(os.sep) for w in workdirs]
    depth = 1
    while True:
        labels = ["/".join(p[-depth:]) for p in parts]
        if len(set(labels)) == len(labels) or depth >= max(map(len, parts)):
            return labels
        depth += 1


@dataclasses.dataclass(frozen=True)
class Curve:
    run: str  # the label of the run
    steps: list[int]
    values: list[float]


def curves(workdirs: Sequence[str], metrics: Sequence[str] | None = None) -> dict[str, list]:
    """What `flaxbert plot` draws: metric -> one Curve per run that logged it, the metrics
    in order (default: `default_metrics` over every run's keys)."""
    rows = {label: read_metrics(w) for label, w in zip(run_labels(workdirs), workdirs, strict=True)}
    for label, w in zip(rows, workdirs, strict=True):
        if not rows[label]:
            raise ValueError(f"{w}: no metrics.jsonl rows (is it a flaxbert workdir?)")
    keys = [k for run in rows.values() for r in run for k in r]
    if metrics:
        missing = [m for m in metrics if m not in keys]
        if missing:
            known = ", ".join(sorted(set(keys) - {"step"}))
            raise ValueError(f"metric(s) {', '.join(missing)} in no run; the runs have: {known}")
    out: dict[str, list[Curve]] = {}
    for m in metrics or default_metrics(keys):
        out[m] = []
        for label, run in rows.items():
            points = [(r["step"], r[m]) for r in run if m in r and "step" in r]
            if points:
                out[m].append(Curve(label, [s for s, _ in points], [v for _, v in points]))
    return out


def _figure(num_axes: int, width: float = 5.0, height: float = 3.6):
    from matplotlib.figure import Figure

    cols = min(3, max(num_axes, 1))
    rows = max(1, math.ceil(num_axes / cols))
    fig = Figure(figsize=(width * cols, height * rows), layout="constrained")
    axes = [fig.add_subplot(rows, cols, i + 1) for i in range(max(num_axes, 1))]
    return fig, axes


def curves_figure(data: Mapping[str, Sequence[Curve]]):
    """One subplot per metric, one labelled line per run; returns the matplotlib Figure."""
    fig, axes = _figure(len(data))
    for ax, (metric, lines) in zip(axes, data.items(), strict=False):
        for c in lines:
            ax.plot(c.steps, c.values, marker="o" if len(c.steps) < 3 else None, label=c.run)
        ax.set_title(metric)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if lines:
            ax.legend(fontsize="small")
    return fig


def save_figure(fig, path: str) -> str:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)  # the Agg canvas: PNG without a display
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=100)
    return path


def plot_runs(workdirs: Sequence[str], out: str, metrics: Sequence[str] | None = None):
    """Draws the curves of the runs into `out` (PNG, or any format matplotlib knows from the
    extension); returns the Figure."""
    fig = curves_figure(curves(workdirs, metrics))
    save_figure(fig, out)
    return fig


# --- a sweep's summary figure ----------------------------------------------------------


def _is_number(v) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def summary_figure(rows: Sequence[Mapping], swept: Sequence[str], metric: str):
    """`metric` of each finished point against each swept key (seed keys only when nothing
    else is swept): one subplot per key, points coloured by the values of the other keys,
    a line through each colour's mean at each value. Returns the Figure."""
    keys = [k for k in swept if not is_seed_key(k)] or list(swept)
    done = [r for r in rows if r.get("status") == "done" and _is_number(r.get(metric))]
    fig, axes = _figure(len(keys))
    if not keys or not done:
        axes[0].text(0.5, 0.5, f"no finished point has {metric}", ha="center", va="center")
        axes[0].set_axis_off()
        return fig
    for ax, key in zip(axes, keys, strict=False):
        others = [k for k in keys if k != key]
        numeric = all(_is_number(r[key]) for r in done)
        order = list(dict.fromkeys(str(r[key]) for r in done))

        def x_of(r, numeric=numeric, order=order, key=key):
            return r[key] if numeric else order.index(str(r[key]))

        groups: dict[str, list[Mapping]] = {}
        for r in done:
            label = ", ".join(f"{k}={r[k]}" for k in others)
            groups.setdefault(label, []).append(r)
        for label, members in groups.items():
            xs = [x_of(r) for r in members]
            ys = [r[metric] for r in members]
            dots = ax.scatter(xs, ys, label=label or None, alpha=0.7)
            means = {}
            for x, y in zip(xs, ys, strict=True):
                means.setdefault(x, []).append(y)
            mx = sorted(means)
            ax.plot(mx, [sum(means[x]) / len(means[x]) for x in mx], color=dots.get_facecolor()[0])
        if numeric:
            values = sorted({r[key] for r in done})
            if min(values) > 0 and max(values) / min(values) >= 10:
                ax.set_xscale("log")
            if len(values) <= 8:  # a tick at each swept value, written as in the config
                ax.minorticks_off()
                ax.set_xticks(values, [repr(v) if isinstance(v, float) else v for v in values])
        else:
            ax.set_xticks(range(len(order)), order)
        ax.set_xlabel(key)
        ax.set_ylabel(metric)
        ax.set_title(f"{metric} by {key}")
        ax.grid(alpha=0.3)
        if any(groups):
            ax.legend(fontsize="small")
    return fig


# --- command line ----------------------------------------------------------------------


def add_plot_parser(commands) -> argparse.ArgumentParser:
    p = commands.add_parser(
        "plot",
        help="draw loss and accuracy curves of one or several runs into one PNG",
        description="Read each WORKDIR/metrics.jsonl (pre-training or fine-tuning) and draw "
        "one subplot per metric, one line per run labelled by its workdir name. Default "
        "metrics: train loss, eval/loss, every metric with 'accuracy' in its name and the "
        "fine-tuning task metrics (eval/f1, eval/pearson, eval/spearman, "
        "eval/matthews_corrcoef, ...) that any run logged. For live curves use TensorBoard "
        "on the same workdirs: tensorboard --logdir runs/",
    )
    p.add_argument("workdirs", nargs="+", metavar="WORKDIR", help="run directories")
    p.add_argument("--out", default="curves.png", help="the image to write (default curves.png)")
    p.add_argument(
        "--metrics",
        metavar="M1,M2,...",
        help="comma-separated metrics.jsonl keys to draw instead of the default, e.g. "
        "loss,eval/loss,eval/mlm_accuracy",
    )
    return p


def run_plot(args: argparse.Namespace) -> int:
    metrics = [m for m in (args.metrics or "").split(",") if m] or None
    try:
        fig = plot_runs(args.workdirs, args.out, metrics)
    except ValueError as e:
        print(f"flaxbert plot: error: {e}", file=sys.stderr)
        return 2
    titles = [ax.get_title() for ax in fig.axes]
    print(f"wrote {args.out}: {len(args.workdirs)} run(s); {', '.join(titles)}")
    return 0
