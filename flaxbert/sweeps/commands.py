"""The command lines of sweeps: `flaxbert sweep` (run a config's get_sweep points here, print
their commands, or write a SLURM array job), `flaxbert sweep-summary` (the summary of a
sweep, finished or not) and `flaxbert evaluate-suite` (checkpoints fine-tuned on every task of
a suite, and their leaderboard; flaxbert/sweeps/suite.py). Their errors are one line on
stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import sys

from flaxbert.config import ConfigError
from flaxbert.sweeps.points import COMMANDS, load_sweep, write_sweep_json
from flaxbert.sweeps.runner import dry_run, run_sweep
from flaxbert.sweeps.slurm import emit_slurm
from flaxbert.sweeps.suite import BASELINES, SUITES, run_suite
from flaxbert.sweeps.summary import write_summary


def add_sweep_parsers(commands) -> None:
    """`flaxbert sweep`, `flaxbert sweep-summary` and `flaxbert evaluate-suite`."""
    _add_sweep_parser(commands)
    _add_summary_parser(commands)
    _add_suite_parser(commands)


def _add_sweep_parser(commands) -> None:
    p = commands.add_parser(
        "sweep",
        help="run a config's get_sweep() points, each in DIR/<point>, and summarise them",
        description="Run every point of the config file's get_sweep(ARG) as its own "
        "`flaxbert pretrain|finetune` subprocess in WORKDIR/<point name>, its output in "
        "WORKDIR/<point name>/log.txt. Finished points are skipped, interrupted ones resume "
        "from their latest checkpoint, a failed one is reported and the others go on (exit "
        "status 1 at the end). Writes WORKDIR/sweep.json and the summary (see sweep-summary). "
        "--config.KEY=VALUE overrides apply to every point. Point format: "
        "flaxbert/sweeps/points.py.",
    )
    p.add_argument(
        "--config",
        required=True,
        metavar="FILE[:ARG]",
        help="a config file defining get_config(arg) and get_sweep(arg), e.g. "
        "configs/sweeps/sst2_lr_seed.py; ARG goes to both (a point's config_arg replaces "
        "it for get_config)",
    )
    p.add_argument("--workdir", required=True, help="the sweep directory; one subdirectory a point")
    p.add_argument(
        "--parallel",
        type=int,
        default=1,
        metavar="N",
        help="run N points at a time on this machine (default 1); with --emit slurm, at most "
        "N array tasks at a time",
    )
    p.add_argument("--dry-run", action="store_true", help="print each point's command; run nothing")
    p.add_argument(
        "--emit",
        choices=["slurm"],
        help="write WORKDIR/sweep.sbatch (a SLURM array job, one task a point) and "
        "sweep.json instead of running, and print how to submit it",
    )
    p.add_argument(
        "--command",
        choices=COMMANDS,
        help="the flaxbert command of every point (default: finetune when the config has a "
        "'task' key, else pretrain)",
    )
    p.add_argument(
        "--metric",
        help="the summary plot's metric, a summary.csv column (default: finetune eval/<the "
        "config's main_metric>, pretrain eval/loss)",
    )
    p.set_defaults(func=run_sweep_command)


def _add_summary_parser(commands) -> None:
    p = commands.add_parser(
        "sweep-summary",
        help="write a sweep's summary.csv, summary.md and summary.png",
        description="Summarise the sweep in WORKDIR (as listed in its sweep.json), finished or "
        "not: summary.csv and summary.md hold one row per point (name, status done / failed "
        "/ incomplete / missing, the swept values, final eval/* and test/* metrics, best "
        "metrics, wall time); when a seed key is swept, summary.md and summary_by_seed.csv "
        "also give each metric's mean and standard deviation over seeds; summary.png plots "
        "the main metric against each swept key.",
    )
    p.add_argument("workdir", metavar="WORKDIR", help="the --workdir of `flaxbert sweep`")
    p.add_argument(
        "--metric",
        help="the plot's metric, a summary.csv column such as eval/accuracy or "
        "best/eval/accuracy (default: the points' main metric)",
    )
    p.set_defaults(func=run_summary_command)


def _add_suite_parser(commands) -> None:
    p = commands.add_parser(
        "evaluate-suite",
        help="fine-tune checkpoints on every task of a suite and write a leaderboard",
        description="Fine-tune each --init_from checkpoint (and, with --baseline random, a "
        "random initialisation of the first one's structure and tokenizer) on every task "
        "preset of the suite (ko: nsmc kornli korsts klue_ner; en: sst2 cola mrpc rte stsb "
        "wikiann_en wnut17 squad_v1; all: both) with configs/finetune.py:TASK, each run in "
        "WORKDIR/<column>/<task> as a point of a sweep: finished runs are skipped, "
        "interrupted ones resume, a failed one is reported and the others go on (exit status "
        "1 at the end). Then WORKDIR/leaderboard.csv, leaderboard.md (also printed) and "
        "leaderboard.png: each task's main metric (eval/<main_metric> of final_metrics.json) "
        "and their average, one column per checkpoint. --config.KEY=VALUE overrides apply to "
        "every run, e.g. --config.data.train_limit=200 --config.train.num_epochs=1.",
    )
    p.add_argument(
        "--init_from",
        "--init-from",
        dest="init_from",
        action="append",
        required=True,
        metavar="CHECKPOINT",
        help="a pre-training workdir, its checkpoints/ directory or one checkpoints/STEP "
        "directory; give it several times to compare checkpoints side by side",
    )
    p.add_argument("--suite", required=True, choices=list(SUITES), help="the tasks to run")
    p.add_argument("--workdir", required=True, help="the suite's directory; one subdirectory a run")
    p.add_argument(
        "--parallel", type=int, default=1, metavar="N", help="run N fine-tunings at a time"
    )
    p.add_argument(
        "--baseline",
        choices=BASELINES,
        help="add a column: random initialisation, the first checkpoint's structure and tokenizer",
    )
    p.set_defaults(func=run_suite_command)


METRIC_PREFIXES = ("eval/", "test/", "best/eval/", "best/test/")


def check_metric_name(metric: str) -> None:
    """A plot metric must be a summary.csv metric column: refused before anything runs."""
    if not (metric.startswith(METRIC_PREFIXES) or metric == "wall_time_s"):
        raise ConfigError(
            f"--metric {metric!r} is not a summary.csv metric column: give eval/NAME, "
            "test/NAME, best/eval/NAME or wall_time_s, e.g. eval/accuracy or eval/loss"
        )


def run_sweep_command(args: argparse.Namespace) -> int:
    overrides = getattr(args, "config_overrides", [])
    try:
        sweep = load_sweep(args.config, args.workdir, overrides, args.command)
        if args.dry_run:
            dry_run(sweep)
            return 0
        if args.emit == "slurm":
            write_sweep_json(sweep)
            path = emit_slurm(sweep, args.parallel if args.parallel > 1 else None)
            print(f"wrote {path} ({len(sweep.points)} array tasks). Submit it with:")
            print(f"  sbatch {path}")
            print(f"then, when the tasks are done: flaxbert sweep-summary {args.workdir}")
            return 0
        if args.metric:
            check_metric_name(args.metric)
        return run_sweep(sweep, args.parallel, metric=args.metric)
    except (ConfigError, ValueError) as e:
        print(f"flaxbert sweep: error: {e}", file=sys.stderr)
        return 2


def run_summary_command(args: argparse.Namespace) -> int:
    try:
        paths = write_summary(args.workdir, args.metric)
    except ConfigError as e:
        print(f"flaxbert sweep-summary: error: {e}", file=sys.stderr)
        return 2
    print("\n".join(open(paths[1]).read().splitlines()))
    print(f"wrote {', '.join(paths)}")
    return 0


def run_suite_command(args: argparse.Namespace) -> int:
    """`flaxbert evaluate-suite`: runs the suite and writes its leaderboard (see suite.py)."""
    overrides = getattr(args, "config_overrides", [])
    try:
        return run_suite(
            args.init_from, args.suite, args.workdir, overrides, args.parallel, args.baseline
        )
    except (ConfigError, ValueError) as e:
        print(f"flaxbert evaluate-suite: error: {e}", file=sys.stderr)
        return 2
