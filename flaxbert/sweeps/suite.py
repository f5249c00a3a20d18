"""`flaxbert evaluate-suite`: one checkpoint (or several) fine-tuned on every task of a suite,
and a leaderboard of the results.

    flaxbert evaluate-suite --init_from runs/mini-ko --suite ko --workdir runs/ko-suite \
        --baseline random --parallel 2

Each checkpoint given with `--init_from` is a *column*; `--baseline random` adds one more,
`random`: a model of the first checkpoint's structure (sizes, layers, heads, positions, layer
layout, LayerNorm placement) and tokenizer, randomly initialised. Every (column, task) pair is
a point of an ordinary sweep (`flaxbert.sweeps.runner.run_sweep`): it runs `flaxbert finetune
--config configs/finetune.py:TASK` in DIR/<column>/<task>, finished points are skipped,
interrupted ones resume, N run at a time, a failure is reported and the others go on. Then
DIR/leaderboard.csv, leaderboard.md and leaderboard.png hold one row per task (its preset's
main metric, `eval/<main_metric>` of the run's final_metrics.json) and an average row, one
column per checkpoint.

The average: every preset's main metric is on a 0-1 scale (accuracy, F1; Spearman, Pearson
and the Matthews coefficient from -1 to 1) and higher is better, so a column's average is the
plain unweighted mean of its tasks' values (x100 is the GLUE-style score). A main metric
where lower is better (a loss, an error; none of the presets) would be left out of it, and
the table says so. A column's average is only given once every task in it has finished, so
that averages always compare the same tasks.
"""

from __future__ import annotations

import csv
import dataclasses
import math
import os
import re
import sys
from collections.abc import Mapping, Sequence
from typing import TextIO

from flaxbert.config import ConfigError, load_config
from flaxbert.sweeps.points import CONFIG_ARG, Point, Sweep, override_args
from flaxbert.sweeps.status import point_status

SUITES: dict[str, tuple[str, ...]] = {
    "ko": ("nsmc", "kornli", "korsts", "klue_ner"),
    "en": ("sst2", "cola", "mrpc", "rte", "stsb", "wikiann_en", "wnut17", "squad_v1"),
}
SUITES["all"] = SUITES["ko"] + SUITES["en"]
BASELINES = ("random",)
# The model keys that make a random baseline the same network as the checkpoint:
# model_config.STRUCTURAL_KEYS and LAYOUT_KEYS (not imported here: that imports JAX).
STRUCTURE_KEYS = (
    "vocab_size",
    "hidden_size",
    "num_layers",
    "num_heads",
    "intermediate_size",
    "max_position_embeddings",
    "type_vocab_size",
    "scan_layers",
    "pre_layer_norm",
)
AVERAGE = "average"


def finetune_config_path() -> str:
    """configs/finetune.py of this checkout (the package's parent directory)."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    return os.path.join(root, "configs", "finetune.py")


def suite_tasks(suite: str) -> tuple[str, ...]:
    """The task presets of `--suite` ko, en or all."""
    if suite not in SUITES:
        raise ConfigError(f"--suite {suite!r} is unknown; choose one of {', '.join(SUITES)}")
    return SUITES[suite]


# --- columns ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Column:
    """One model fine-tuned on every task: a checkpoint, or a random initialisation."""

    name: str  # its directory under DIR and its header in the leaderboard
    about: str  # what it is, for the leaderboard's notes
    overrides: dict  # dotted config key -> value, given to every task's run


def _sanitise(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._,=+-]", "_", text).lstrip(".") or "checkpoint"


def structure_overrides(meta: Mapping) -> dict:
    """`model.KEY` -> value for the structural keys a checkpoint's meta records."""
    model = meta.get("model") or meta.get("config", {}).get("model") or {}
    if not model:
        raise ConfigError("its meta records no model config")
    return {f"model.{k}": model[k] for k in STRUCTURE_KEYS if k in model}


def checkpoint_columns(init_froms: Sequence[str]) -> tuple[list[Column], list[dict]]:
    """A column per `--init_from` (named after its pre-training workdir, plus the step when
    two are steps of one run), and each checkpoint's meta."""
    from flaxbert import checkpoint as ckpt  # JAX and orbax: only when needed

    if not init_froms:
        raise ConfigError("give at least one checkpoint with --init_from")
    found = []
    for path in init_froms:
        try:
            step_dir, meta = ckpt.read_meta(path)
        except (ConfigError, OSError) as e:
            raise ConfigError(f"--init_from {path!r} is no flaxbert checkpoint: {e}") from None
        found.append((step_dir, meta))
    step_dirs = [s for s, _ in found]
    for i, s in enumerate(step_dirs):
        if s in step_dirs[:i]:
            raise ConfigError(f"--init_from {init_froms[i]!r} names checkpoint {s} again")
    runs = [os.path.basename(os.path.dirname(os.path.dirname(s))) for s in step_dirs]
    columns = []
    for step_dir, run in zip(step_dirs, runs, strict=True):
        step = os.path.basename(step_dir)
        name = _sanitise(run if runs.count(run) == 1 else f"{run}-step{step}")
        # configs/finetune.py:TASK takes the model's structure from the checkpoint.
        columns.append(Column(name, f"`{step_dir}` (step {step})", {"init_from": step_dir}))
    return columns, [m for _, m in found]


def _checked_structure(step_dir: str, meta: Mapping) -> dict:
    try:
        return structure_overrides(meta)
    except ConfigError as e:
        raise ConfigError(f"--init_from {step_dir!r}: {e}") from None


def random_column(first: Column, meta: Mapping, taken: Sequence[str]) -> Column:
    """`--baseline random`: the first checkpoint's structure and tokenizer, no init_from."""
    from flaxbert import checkpoint as ckpt

    step_dir = first.overrides["init_from"]
    tokenizer = ckpt.tokenizer_of(step_dir)
    if not tokenizer:
        raise ConfigError(
            f"--baseline random: the checkpoint {step_dir} records no tokenizer (the embedded "
            "synthetic corpus has none), so a random model of it cannot read the tasks"
        )
    own = {**_checked_structure(step_dir, meta), "data.tokenizer": tokenizer}
    name = "random" if "random" not in taken else "random-init"
    about = f"random initialisation, the structure and tokenizer of {first.name}"
    return Column(name, about, own)


# --- the sweep -------------------------------------------------------------------------


def build_suite(
    tasks: Sequence[str],
    columns: Sequence[Column],
    workdir: str,
    overrides: Sequence[str] = (),
    config_path: str | None = None,
) -> Sweep:
    """The sweep of every (column, task) pair, column by column (a column's runs after the
    first find their programs in a JAX compilation cache, when one is set), each point in
    WORKDIR/<column>/<task>; every point's config is loaded and checked first."""
    config_path = config_path or finetune_config_path()
    if not os.path.isfile(config_path):
        raise ConfigError(f"no fine-tuning config at {config_path}")
    fixed = ("init_from", *(f"model.{k}" for k in STRUCTURE_KEYS))
    for o in overrides:
        if o.removeprefix("--config.").split("=")[0] in fixed:
            raise ConfigError(
                f"{o}: evaluate-suite sets init_from and the model structure per column; "
                "give the checkpoints with --init_from"
            )
    launcher = [sys.executable, "-m", "flaxbert.cli", "finetune"]
    points = []
    for column in columns:
        for task in tasks:
            spec = f"{config_path}:{task}"
            own = override_args(column.overrides)
            try:
                config = load_config(spec, [*overrides, *own])
            except ConfigError as e:
                raise ConfigError(f"task {task}, column {column.name}: {e}") from None
            sub = os.path.join(workdir, column.name, task)
            argv = [*launcher, "--config", spec, "--workdir", sub, *overrides, *own]
            points.append(
                Point(
                    name=f"{column.name}/{task}",
                    config_arg=task,
                    overrides=dict(column.overrides),
                    command="finetune",
                    workdir=sub,
                    argv=tuple(argv),
                    num_steps=int(config.train.get("num_steps", 0)),
                    main_metric=f"eval/{config.main_metric}",
                )
            )
    return Sweep(config_path, workdir, tuple(overrides), points, [CONFIG_ARG])


# --- the leaderboard -------------------------------------------------------------------


def lower_is_better(metric: str) -> bool:
    """A loss or an error: left out of the average (no preset's main metric is one)."""
    name = metric.rsplit("/", 1)[-1].lower()
    return any(word in name for word in ("loss", "error", "perplexity"))


@dataclasses.dataclass(frozen=True)
class Leaderboard:
    """Per task, its main metric and each column's value (a float), or why it has none:
    failed, incomplete, missing (never started) or n/a (finished without the metric)."""

    tasks: list[str]
    metrics: dict[str, str]  # task -> eval/<main metric>
    columns: list[str]
    cells: dict[tuple[str, str], float | str]  # (task, column) -> value or status
    averaged: list[str]  # the tasks in the average
    average: dict[str, float | str]  # column -> mean, or 'incomplete (k/n)'


def read_leaderboard(sweep: Sweep, columns: Sequence[Column]) -> Leaderboard:
    """Every point's main metric from its final_metrics.json (done points only)."""
    from flaxbert.run_files import read_final_metrics

    by_name = {p.name: p for p in sweep.points}
    tasks = list(dict.fromkeys(p.config_arg for p in sweep.points))
    names = [c.name for c in columns]
    metrics = {p.config_arg: p.main_metric for p in sweep.points}
    cells: dict[tuple[str, str], float | str] = {}
    for task in tasks:
        for column in names:
            p = by_name[f"{column}/{task}"]
            status = point_status(p.workdir, p.num_steps)
            value = read_final_metrics(p.workdir).get(p.main_metric)
            if status != "done":
                cells[task, column] = status
            elif isinstance(value, int | float) and math.isfinite(value):
                cells[task, column] = float(value)
            else:
                cells[task, column] = "n/a"
    averaged = [t for t in tasks if not lower_is_better(metrics[t])]
    average: dict[str, float | str] = {}
    for column in names:
        values = [cells[t, column] for t in averaged]
        numbers = [v for v in values if isinstance(v, float)]
        if not averaged:
            average[column] = "n/a"
        elif len(numbers) == len(values):
            average[column] = sum(numbers) / len(numbers)
        else:
            average[column] = f"incomplete ({len(numbers)}/{len(values)})"
    return Leaderboard(tasks, metrics, names, cells, averaged, average)


def _cell(value: float | str) -> str:
    return f"{value:.4f}" if isinstance(value, float) else value


def leaderboard_rows(board: Leaderboard) -> list[dict]:
    """The table: task, metric and one value per column; the average row last."""
    rows = []
    for task in board.tasks:
        row = {"task": task, "metric": board.metrics[task].removeprefix("eval/")}
        rows.append(row | {c: board.cells[task, c] for c in board.columns})
    about = f"mean of {len(board.averaged)} main metrics (0-1)"
    rows.append({"task": AVERAGE, "metric": about} | board.average)
    return rows


def leaderboard_notes(board: Leaderboard, columns: Sequence[Column], workdir: str) -> list[str]:
    """What the table's values are, how the average is made, and what each column is."""
    left_out = [t for t in board.tasks if t not in board.averaged]
    notes = [
        "Each value is the task's main metric on its dev split: `eval/<metric>` of "
        f"`{workdir}/<column>/<task>/final_metrics.json` (the run's last evaluation).",
        "All main metrics are on a 0-1 scale (accuracy, F1; Spearman, Pearson and the Matthews "
        "coefficient range from -1 to 1), higher is better, so the average is their plain, "
        "unweighted mean over the tasks (x100 gives a GLUE-style score), given only when "
        "every task of the column has finished.",
    ]
    if left_out:
        notes.append(f"Left out of the average (lower is better): {', '.join(left_out)}.")
    notes += [f"- **{c.name}**: {c.about}" for c in columns]
    return notes


def leaderboard_figure(board: Leaderboard):
    """Grouped bars: one group per task and the average, one bar per column."""
    from flaxbert.sweeps.plot import _figure

    groups = [*board.tasks, AVERAGE]
    fig, (ax,) = _figure(1, width=max(6.0, 1.1 * len(groups) * max(1, len(board.columns))))
    width = 0.8 / max(1, len(board.columns))
    for i, column in enumerate(board.columns):
        values = [board.cells[t, column] for t in board.tasks] + [board.average[column]]
        xs = [g + (i - (len(board.columns) - 1) / 2) * width for g in range(len(groups))]
        heights = [v if isinstance(v, float) else 0.0 for v in values]
        ax.bar(xs, heights, width, label=column)
        for x, v in zip(xs, values, strict=True):
            text = f"{v:.3f}" if isinstance(v, float) else v.split(" ")[0]
            y = max(v, 0.0) if isinstance(v, float) else 0.0  # above the bar, or the axis
            ax.annotate(text, (x, y), ha="center", va="bottom", rotation=90, fontsize="x-small")
    labels = [f"{t}\n{board.metrics[t].removeprefix('eval/')}" for t in board.tasks]
    ax.set_xticks(range(len(groups)), [*labels, AVERAGE])
    ax.axhline(0, color="black", linewidth=0.5)
    ax.margins(y=0.15)  # room for the labels above the bars
    ax.set_ylabel("main metric (0-1)")
    ax.set_title("dev main metric per task")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize="small")
    return fig


def write_leaderboard(sweep: Sweep, columns: Sequence[Column]) -> list[str]:
    """Writes DIR/leaderboard.csv, leaderboard.md and leaderboard.png; returns the paths."""
    from flaxbert.sweeps.plot import save_figure

    board = read_leaderboard(sweep, columns)
    rows = leaderboard_rows(board)
    header = ["task", "metric", *board.columns]
    base = os.path.join(sweep.workdir, "leaderboard")
    paths = [f"{base}.csv", f"{base}.md", f"{base}.png"]
    with open(paths[0], "w", newline="") as f:
        writer = csv.DictWriter(f, header)
        writer.writeheader()
        writer.writerows(rows)
    md = [f"# Leaderboard: {sweep.workdir}", ""]
    md += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    md += ["| " + " | ".join(_cell(r[c]) for c in header) + " |" for r in rows]
    md += ["", *leaderboard_notes(board, columns, sweep.workdir)]
    with open(paths[1], "w") as f:
        f.write("\n".join(md) + "\n")
    save_figure(leaderboard_figure(board), paths[2])
    return paths


# --- the command -----------------------------------------------------------------------


def suite_columns(init_froms: Sequence[str], baseline: str | None) -> list[Column]:
    """The checkpoint columns, then the baseline's."""
    columns, metas = checkpoint_columns(init_froms)
    if baseline:
        if baseline not in BASELINES:
            raise ConfigError(f"--baseline {baseline!r}: choose {', '.join(BASELINES)}")
        columns.append(random_column(columns[0], metas[0], [c.name for c in columns]))
    return columns


def run_suite(
    init_froms: Sequence[str],
    suite: str,
    workdir: str,
    overrides: Sequence[str] = (),
    parallel: int = 1,
    baseline: str | None = None,
    out: TextIO | None = None,
) -> int:
    """Fine-tunes every column on every task of the suite (see the module doc), writes the
    leaderboard (also when a task failed or on Ctrl-C) and prints its table. Returns 0 when
    every run is done, else 1."""
    from flaxbert.sweeps.runner import run_sweep

    out = out or sys.stdout
    tasks = suite_tasks(suite)
    columns = suite_columns(init_froms, baseline)
    sweep = build_suite(tasks, columns, os.path.abspath(workdir), overrides)
    code = 1
    try:
        code = run_sweep(sweep, parallel, out=out)
    finally:
        paths = write_leaderboard(sweep, columns)
        with open(paths[1]) as f:
            print("\n" + f.read(), file=out)
        print(f"leaderboard: {', '.join(paths)}", file=out, flush=True)
    return code
