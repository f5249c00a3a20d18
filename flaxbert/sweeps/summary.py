"""A sweep's summary: DIR/summary.csv, summary.md, summary_by_seed.csv and summary.png.

One row per point of DIR/sweep.json (written by `flaxbert sweep`): its name, status, swept
values, final and best metrics and wall time, read from the point's workdir
(final_metrics.json, test_metrics.json, metrics.jsonl). When a seed key is swept, each
metric's mean and standard deviation over the seeds, per combination of the other keys.
"""

from __future__ import annotations

import csv
import dataclasses
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

from flaxbert.config import ConfigError
from flaxbert.sweeps.logs import read_json, read_metrics
from flaxbert.sweeps.plot import save_figure, summary_figure
from flaxbert.sweeps.points import CONFIG_ARG, is_seed_key, value_text
from flaxbert.sweeps.status import STATUSES, point_status


def _lower_is_better(key: str) -> bool:
    return "loss" in key or "perplexity" in key


def point_row(point: Mapping, sweep_dir: str, swept: Sequence[str]) -> dict:
    """One summary row: name, status, swept values, final, test and best metrics, wall time.
    Best: fine-tuning's `best` evaluation (by its main metric); pre-training: each eval/*
    metric's best value over metrics.jsonl (lowest loss, highest accuracy)."""
    workdir = os.path.join(sweep_dir, point["name"])
    row: dict[str, Any] = {"name": point["name"]}
    row["status"] = point_status(workdir, point["num_steps"])
    for key in swept:
        row[key] = point["config_arg"] if key == CONFIG_ARG else point["overrides"].get(key, "")
    final = read_json(os.path.join(workdir, "final_metrics.json")) or {}
    test = read_json(os.path.join(workdir, "test_metrics.json")) or {}
    if final:
        row["step"] = final.get("step")
    for source in (final, test):
        for k, v in source.items():
            if k.startswith(("eval/", "test/")) and isinstance(v, int | float):
                row[k] = v
    best = final.get("best")
    if isinstance(best, dict):
        row.update({f"best/{k}": v for k, v in best.items() if isinstance(v, int | float)})
    elif final:
        history: dict[str, list[float]] = {}
        for r in read_metrics(workdir):
            for k, v in r.items():
                if k.startswith("eval/"):
                    history.setdefault(k, []).append(v)
        for k, values in history.items():
            row[f"best/{k}"] = min(values) if _lower_is_better(k) else max(values)
    if "wall_time_s" in final:
        row["wall_time_s"] = final["wall_time_s"]
    return row


def metric_columns(rows: Sequence[Mapping]) -> list[str]:
    keys = list(dict.fromkeys(k for r in rows for k in r))
    order = ("eval/", "test/", "best/")
    cols = [k for prefix in order for k in sorted(keys) if k.startswith(prefix)]
    return cols + (["wall_time_s"] if "wall_time_s" in keys else [])


def group_over_seeds(rows: Sequence[Mapping], swept: Sequence[str]) -> list[dict]:
    """Mean and sample standard deviation of each metric over the seed keys' values, per
    combination of the other swept keys; only finished points count. [] without seeds."""
    seeds = [k for k in swept if is_seed_key(k)]
    if not seeds:
        return []
    others = [k for k in swept if k not in seeds]
    done = [r for r in rows if r["status"] == "done"]
    metrics = metric_columns(done)
    groups: dict[tuple, list[Mapping]] = {}
    for r in rows:  # first-seen order of the combinations, finished or not
        groups.setdefault(tuple(value_text(r[k]) for k in others), [])
    for r in done:
        groups[tuple(value_text(r[k]) for k in others)].append(r)
    first = {tuple(value_text(r[k]) for k in others): r for r in reversed(rows)}
    out = []
    for key, members in groups.items():
        g: dict[str, Any] = {k: first[key][k] for k in others}
        g["n"] = len(members)
        for m in metrics:
            values = [float(r[m]) for r in members if isinstance(r.get(m), int | float)]
            if values:
                mean = sum(values) / len(values)
                var = sum((v - mean) ** 2 for v in values) / max(len(values) - 1, 1)
                g[f"{m} mean"] = mean
                g[f"{m} std"] = math.sqrt(var) if len(values) > 1 else float("nan")
        out.append(g)
    return out


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return ""
        return f"{value:.4f}" if 1e-3 <= abs(value) < 1e4 or value == 0 else f"{value:.4g}"
    return "" if value is None else str(value)


def _mean_std(mean: float | None, std: float | None) -> str:
    if mean is None:
        return ""
    return _fmt(mean) if std is None or math.isnan(std) else f"{_fmt(mean)} ± {_fmt(std)}"


def _markdown_table(
    rows: Sequence[Mapping], columns: Sequence[str], exact: Sequence[str] = ()
) -> list[str]:
    """Metrics rounded to 4 decimals; the `exact` columns (swept values) as given."""

    def cell(r: Mapping, c: str) -> str:
        return value_text(r.get(c, "")) if c in exact else _fmt(r.get(c))

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r, c) for c in columns) + " |" for r in rows]
    return lines


def _write_csv(path: str, rows: Sequence[Mapping], columns: Sequence[str]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


@dataclasses.dataclass(frozen=True)
class Summary:
    rows: list[dict]
    columns: list[str]
    grouped: list[dict]  # mean/std over seeds; [] when no seed key is swept
    grouped_columns: list[str]
    swept: list[str]
    metric: str  # the headline metric of the plot


def summarise(sweep_dir: str, metric: str | None = None) -> Summary:
    """Reads DIR/sweep.json and every point's workdir."""
    meta = read_json(os.path.join(sweep_dir, "sweep.json"))
    if meta is None:
        raise ConfigError(f"no readable sweep.json in {sweep_dir!r}: run `flaxbert sweep` first")
    swept = meta["swept"]
    rows = [point_row(p, sweep_dir, swept) for p in meta["points"]]
    columns = ["name", "status", *swept, "step", *metric_columns(rows)]
    grouped = group_over_seeds(rows, swept)
    others = [k for k in swept if not is_seed_key(k)]
    grouped_columns = [*others, "n"]
    if grouped:
        stats = list(dict.fromkeys(k for g in grouped for k in g if k not in grouped_columns))
        grouped_columns += stats
    if metric and metric not in columns:  # the default may be missing while points run
        known = ", ".join(metric_columns(rows)) or "none yet: no point has finished"
        raise ConfigError(
            f"--metric {metric!r}: no point of {sweep_dir} has it; its metric columns are {known}"
        )
    metric = metric or meta["points"][0]["main_metric"]
    return Summary(rows, columns, grouped, grouped_columns, swept, metric)


def write_summary(sweep_dir: str, metric: str | None = None) -> list[str]:
    """Writes DIR/summary.csv, summary.md (and summary_by_seed.csv when seeds are swept) and
    summary.png; returns the paths."""
    s = summarise(sweep_dir, metric)
    paths = [os.path.join(sweep_dir, "summary.csv"), os.path.join(sweep_dir, "summary.md")]
    _write_csv(paths[0], s.rows, s.columns)
    counts = ", ".join(f"{sum(r['status'] == x for r in s.rows)} {x}" for x in STATUSES)
    md = [f"# Sweep summary: {sweep_dir}", "", f"{len(s.rows)} points: {counts}.", ""]
    md += _markdown_table(s.rows, s.columns, s.swept)
    if s.grouped:
        seeds = ", ".join(k for k in s.swept if is_seed_key(k))
        md += ["", f"## Mean and standard deviation over {seeds} (finished points)", ""]
        keys = [c for c in s.grouped_columns if not c.endswith((" mean", " std"))]
        means = [c[: -len(" mean")] for c in s.grouped_columns if c.endswith(" mean")]
        table = [
            {**g, **{m: _mean_std(g.get(m + " mean"), g.get(m + " std")) for m in means}}
            for g in s.grouped
            if g["n"]
        ]
        md += _markdown_table(table, keys + means, s.swept)
        grouped_csv = os.path.join(sweep_dir, "summary_by_seed.csv")
        _write_csv(grouped_csv, s.grouped, s.grouped_columns)
        paths.append(grouped_csv)
    with open(paths[1], "w") as f:
        f.write("\n".join(md) + "\n")
    png = os.path.join(sweep_dir, "summary.png")
    save_figure(summary_figure(s.rows, s.swept, s.metric), png)
    return [*paths, png]
