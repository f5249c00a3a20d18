"""Sweeps: run one config at many points, each in its own workdir, then summarise them.

A config file may define `get_sweep(arg)` (or `get_sweep()`) beside `get_config(arg)`. It
returns a list of *points*; a point is a dict of dotted config keys to values (the
`--config.KEY=VALUE` overrides of that run), plus optionally the special key `config_arg`:
the argument given to `get_config` for that run, which sweeps over config variants (model
sizes, tasks). Without it the point uses the ARG of `--config FILE[:ARG]`. Build points
with the helpers below:

    from flaxbert.sweep import grid, product, variants, zip_

    def get_sweep(arg):  # 2 x 2 x 2 = 8 points, from tiny,lr=0.001,warmup=100,seed=0 on
        return product(
            variants("tiny", "mini"),
            zip_(**{"train.learning_rate": [1e-3, 3e-4], "train.warmup_steps": [100, 50]}),
            grid(**{"train.seed": [0, 1]}),
        )

`flaxbert sweep` runs each point as `python -m flaxbert.cli pretrain|finetune --config
FILE:ARG --workdir DIR/NAME --config.KEY=VALUE ...`, where NAME is made from the values that
vary (`lr=0.0001,seed=1`), skips finished points, resumes interrupted ones, and writes
DIR/sweep.json and the summary (DIR/summary.csv, summary.md, summary.png; see
flaxbert/sweep_summary.py).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import datetime
import hashlib
import inspect
import itertools
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TextIO

from flaxbert.config import ConfigError, load_config, load_module
from flaxbert.plot import read_metrics

CONFIG_ARG = "config_arg"  # a point's key for the argument given to get_config
COMMANDS = ("pretrain", "finetune")
STATUSES = ("done", "failed", "incomplete", "missing")
# Short names of common keys in point names; any other key uses its last component.
SHORT_NAMES = {
    "learning_rate": "lr",
    "batch_size": "bs",
    "weight_decay": "wd",
    "num_steps": "steps",
    "warmup_steps": "warmup",
    "num_epochs": "epochs",
}
_MAX_NAME = 100


# --- building points -------------------------------------------------------------------


def _axes(axes: Mapping[str, Sequence] | None, kw: Mapping[str, Sequence]) -> dict:
    merged = {**(axes or {}), **kw}
    for key, values in merged.items():
        if isinstance(values, str) or not isinstance(values, Sequence):
            raise ValueError(f"sweep key {key!r}: give a list of values, not {values!r}")
    return merged


def grid(axes: Mapping[str, Sequence] | None = None, /, **kw: Sequence) -> list[dict]:
    """The cartesian product: `grid(**{"train.learning_rate": [1e-4, 3e-4], "train.seed":
    [0, 1]})` gives 4 points, the last key varying fastest."""
    a = _axes(axes, kw)
    return [dict(zip(a, values, strict=True)) for values in itertools.product(*a.values())]


def zip_(axes: Mapping[str, Sequence] | None = None, /, **kw: Sequence) -> list[dict]:
    """Values taken together: `zip_(**{"train.learning_rate": [1e-4, 3e-4], "train.
    warmup_steps": [100, 50]})` gives 2 points. The lists must have the same length."""
    a = _axes(axes, kw)
    lengths = {k: len(v) for k, v in a.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"zip_ needs lists of one length; got {lengths}")
    return [dict(zip(a, values, strict=True)) for values in zip(*a.values(), strict=True)]


def product(*sweeps: Sequence[Mapping]) -> list[dict]:
    """Every combination of one point from each list, merged (a key in two lists is an error)."""
    out = []
    for combo in itertools.product(*sweeps):
        point: dict = {}
        for part in combo:
            clash = set(point) & set(part)
            if clash:
                raise ValueError(f"product: key(s) {sorted(clash)} set by two factors")
            point.update(part)
        out.append(point)
    return out


def concat(*sweeps: Sequence[Mapping]) -> list[dict]:
    """The points of each list, one list after the other."""
    return [dict(p) for sweep in sweeps for p in sweep]


def variants(*config_args: str) -> list[dict]:
    """One point per config argument: `product(variants("tiny", "mini"), grid(...))`."""
    return [{CONFIG_ARG: a} for a in config_args]


# --- naming ----------------------------------------------------------------------------


def swept_keys(points: Sequence[Mapping]) -> list[str]:
    """Keys whose value is not the same in every point (a key some points lack counts),
    in first-seen order, `config_arg` first."""
    keys = list(dict.fromkeys(k for p in points for k in p))
    swept = [k for k in keys if len({value_text(p.get(k, "")) for p in points}) > 1]
    return sorted(swept, key=lambda k: k != CONFIG_ARG)


def is_seed_key(key: str) -> bool:
    return key.rsplit(".", 1)[-1] == "seed"


def value_text(value: Any) -> str:
    return repr(value) if isinstance(value, float) else str(value)


def _sanitise(text: str) -> str:
    text = re.sub(r"[^A-Za-z0-9._,=+-]", "_", text)
    return "_" + text[1:] if text.startswith(".") else text


def point_names(points: Sequence[Mapping]) -> list[str]:
    """A readable, file-system-safe and unique name per point, from the values that vary
    across the points (`tiny,lr=0.0001,seed=1`). Depends only on the points: stable."""
    keys = swept_keys(points) or list(dict.fromkeys(k for p in points for k in p))
    short = {k: SHORT_NAMES.get(k.rsplit(".", 1)[-1], k.rsplit(".", 1)[-1]) for k in keys}
    counts = {s: list(short.values()).count(s) for s in short.values()}
    short = {k: (s if counts[s] == 1 else k) for k, s in short.items()}
    names = []
    for p in points:
        parts = []
        for k in keys:
            if k not in p:
                continue
            if k == CONFIG_ARG:
                parts.append(str(p[k]).replace(",", "-"))
            else:
                parts.append(f"{short[k]}={value_text(p[k])}")
        name = _sanitise(",".join(parts)) or "default"
        if len(name) > _MAX_NAME:
            digest = hashlib.sha1(name.encode()).hexdigest()[:8]
            name = f"{name[: _MAX_NAME - 9]}-{digest}"
        names.append(name)
    seen: dict[str, int] = {}
    for i, name in enumerate(names):
        if name in seen:
            raise ValueError(
                f"sweep points {seen[name]} and {i} are the same ({dict(points[i])}): "
                "each point needs its own values"
            )
        seen[name] = i
    return names


# --- loading a sweep -------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Point:
    """One run of a sweep."""

    name: str
    config_arg: str  # the argument given to get_config ('' = its default)
    overrides: dict[str, Any]  # dotted key -> value (the point's own, not the sweep's)
    command: str  # pretrain | finetune
    workdir: str
    argv: tuple[str, ...]  # the command line that runs it
    num_steps: int  # train.num_steps; 0 = not known in advance (fine-tuning by epochs)
    main_metric: str  # the summary's headline metric, e.g. eval/accuracy

    def to_json(self) -> dict:
        return {**dataclasses.asdict(self), "argv": list(self.argv), "shell": shell(self.argv)}


@dataclasses.dataclass(frozen=True)
class Sweep:
    config: str  # FILE[:ARG] as given
    workdir: str
    base_overrides: tuple[str, ...]  # --config.KEY=VALUE given to `flaxbert sweep`
    points: list[Point]
    swept: list[str]  # the keys that vary, `config_arg` included


def shell(argv: Sequence[str]) -> str:
    return shlex.join(argv)


def override_args(overrides: Mapping[str, Any]) -> list[str]:
    return [f"--config.{k}={value_text(v)}" for k, v in overrides.items()]


def get_points(path: str, arg: str) -> list[dict]:
    """Calls the config file's get_sweep(arg) (or get_sweep() when it takes no argument)."""
    module = load_module(path)
    if not hasattr(module, "get_sweep"):
        raise ConfigError(
            f"config file {path!r} defines no get_sweep(arg) function; see flaxbert/sweep.py "
            "and configs/sweeps/ for the format"
        )
    params = list(inspect.signature(module.get_sweep).parameters.values())
    try:
        if not params or (not arg and params[0].default is not inspect.Parameter.empty):
            points = module.get_sweep()  # no argument, or its default
        else:
            points = module.get_sweep(arg)
    except (ValueError, KeyError) as e:
        raise ConfigError(f"{path}: get_sweep({arg!r}): {e}") from None
    if not points or not all(isinstance(p, Mapping) for p in points):
        raise ConfigError(f"{path}: get_sweep must return a non-empty list of dicts")
    return [dict(p) for p in points]


def load_sweep(
    spec: str,
    workdir: str,
    overrides: Sequence[str] = (),
    command: str | None = None,
    launcher: Sequence[str] | None = None,
) -> Sweep:
    """Expands `FILE[:ARG]`'s get_sweep into points and checks every point's config (unknown
    keys, wrong types) before anything runs. `launcher` replaces `python -m flaxbert.cli`."""
    path, _, arg = spec.partition(":")
    raw = get_points(path, arg)
    names = point_names(raw)
    launcher = list(launcher or [sys.executable, "-m", "flaxbert.cli"])
    points, point_configs = [], []
    for name, p in zip(names, raw, strict=True):
        config_arg = str(p.get(CONFIG_ARG, arg))
        own = {k: v for k, v in p.items() if k != CONFIG_ARG}
        point_spec = f"{path}:{config_arg}" if config_arg else path
        try:
            config = load_config(point_spec, [*overrides, *override_args(own)])
        except ConfigError as e:
            raise ConfigError(f"sweep point {name!r}: {e}") from None
        point_configs.append(config)
        cmd = command or ("finetune" if "task" in config else "pretrain")
        finetuning = "main_metric" in config
        sub = os.path.join(workdir, name)
        argv = [*launcher, cmd, "--config", point_spec, "--workdir", sub]
        points.append(
            Point(
                name=name,
                config_arg=config_arg,
                overrides=own,
                command=cmd,
                workdir=sub,
                argv=tuple(argv + list(overrides) + override_args(own)),
                num_steps=int(config.train.get("num_steps", 0)),
                main_metric=f"eval/{config.main_metric}" if finetuning else "eval/loss",
            )
        )
    check_init_from(points, point_configs)
    return Sweep(spec, workdir, tuple(overrides), points, swept_keys(raw))


def check_init_from(points: Sequence[Point], configs: Sequence) -> None:
    """Every point's `init_from` names a readable checkpoint, before any point runs (else
    each one would fail on its own, after its start-up)."""
    checked: set[str] = set()
    for point, config in zip(points, configs, strict=True):
        init_from = config.get("init_from", "") or ""
        if not init_from or init_from in checked:
            continue
        from flaxbert.checkpoint import read_meta  # JAX and orbax: only when needed

        try:
            read_meta(init_from)
        except (ConfigError, OSError) as e:
            raise ConfigError(
                f"sweep point {point.name!r}: config key init_from={init_from!r} is no "
                f"checkpoint ({e}); give a pre-training workdir, its checkpoints/ directory or "
                "one checkpoints/STEP directory"
            ) from None
        checked.add(init_from)


def write_sweep_json(sweep: Sweep) -> str:
    os.makedirs(sweep.workdir, exist_ok=True)
    path = os.path.join(sweep.workdir, "sweep.json")
    data = {
        "config": sweep.config,
        "overrides": list(sweep.base_overrides),
        "swept": sweep.swept,
        "points": [p.to_json() for p in sweep.points],
    }
    with open(path, "w") as f:
        json.dump(data, f, indent=2, default=str)
    return path


# --- running ---------------------------------------------------------------------------


def read_json(path: str) -> dict | None:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def is_finished(workdir: str, num_steps: int) -> bool:
    """WORKDIR/final_metrics.json exists and its step reached `num_steps`. With num_steps 0
    (fine-tuning by epochs: the count needs the data) the run's last step must be its last
    evaluation's, as it is at the end of training and not after a preemption between two."""
    final = read_json(os.path.join(workdir, "final_metrics.json"))
    if not final or "step" not in final:
        return False
    if num_steps > 0:
        return final["step"] >= num_steps
    evals = [r["step"] for r in read_metrics(workdir) if any(k.startswith("eval/") for k in r)]
    return bool(evals) and evals[-1] == final["step"]


def point_status(workdir: str, num_steps: int) -> str:
    """done, failed (the sweep's last run of it exited non-zero), incomplete (started, not
    finished: running, interrupted or preempted) or missing (never started)."""
    if is_finished(workdir, num_steps):
        return "done"
    last = read_json(os.path.join(workdir, "sweep_status.json"))
    if last and last.get("returncode"):
        return "failed"
    return "incomplete" if os.path.isdir(workdir) else "missing"


# The default runner's processes, so that Ctrl-C can stop them; none start once it is set.
_RUNNING: set[subprocess.Popen] = set()
_RUNNING_LOCK = threading.Lock()
_STOPPING = threading.Event()


def run_subprocess(point: Point, log: TextIO) -> int:
    """The default runner: the point's command, stdout and stderr appended to its log."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with _RUNNING_LOCK:
        if _STOPPING.is_set():
            return -signal.SIGTERM
        proc = subprocess.Popen(point.argv, stdout=log, stderr=subprocess.STDOUT, env=env)
        _RUNNING.add(proc)
    try:
        return proc.wait()
    finally:
        with _RUNNING_LOCK:
            _RUNNING.discard(proc)


def _stop_running() -> None:
    """SIGTERM to the points still running: flaxbert saves a checkpoint and exits."""
    with _RUNNING_LOCK:
        _STOPPING.set()
        for proc in _RUNNING:
            if proc.poll() is None:
                proc.terminate()


def tail(path: str, lines: int = 15) -> str:
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-lines:])
    except OSError:
        return ""


def run_sweep(
    sweep: Sweep,
    parallel: int = 1,
    runner: Callable[[Point, TextIO], int] = run_subprocess,
    out: TextIO | None = None,
    metric: str | None = None,
) -> int:
    """Runs the unfinished points, `parallel` at a time, then writes the summary. Returns 0
    when every point is done, 1 otherwise (each failure is reported as it happens)."""
    out = out or sys.stdout
    write_sweep_json(sweep)
    lock = threading.Lock()
    n = len(sweep.points)

    def say(text: str) -> None:
        with lock:
            print(text, file=out, flush=True)

    todo = []
    for i, p in enumerate(sweep.points, 1):
        if is_finished(p.workdir, p.num_steps):
            say(f"[{i}/{n}] {p.name}: finished, skipped")
        else:
            todo.append((i, p))
    failures: list[str] = []

    def run_one(i: int, p: Point) -> None:
        if _STOPPING.is_set():
            return
        resumed = os.path.isdir(p.workdir)
        os.makedirs(p.workdir, exist_ok=True)
        log_path = os.path.join(p.workdir, "log.txt")
        say(f"[{i}/{n}] {p.name}: {'resuming' if resumed else 'running'} (log: {log_path})")
        start = time.perf_counter()
        with open(log_path, "a") as log:
            stamp = datetime.datetime.now().isoformat(timespec="seconds")
            log.write(f"=== flaxbert sweep, {stamp}: {shell(p.argv)}\n")
            log.flush()
            try:
                code, error = runner(p, log), ""
            except Exception as e:  # a command that cannot start is a failed point
                log.write(traceback.format_exc())
                code, error = 127, f"could not run it ({type(e).__name__}: {e})"
        seconds = time.perf_counter() - start
        finished = is_finished(p.workdir, p.num_steps)
        with open(os.path.join(p.workdir, "sweep_status.json"), "w") as f:
            json.dump({"returncode": code, "finished": finished, "seconds": seconds}, f)
        if code == 0 and finished:
            say(f"[{i}/{n}] {p.name}: done in {seconds:.1f}s")
            return
        if error:
            why = error
        elif code < 0:
            why = f"killed by signal {-code}"
        elif code:
            why = f"exit code {code}"
        else:
            why = f"exit code 0 but not finished (step {p.num_steps or 'end'} not reached)"
        with lock:
            failures.append(p.name)
        say(
            f"[{i}/{n}] {p.name}: FAILED, {why} after {seconds:.1f}s; last lines of "
            f"{log_path}:\n{tail(log_path)}"
        )

    _STOPPING.clear()
    pool = concurrent.futures.ThreadPoolExecutor(max(1, parallel))
    try:
        futures = [pool.submit(run_one, i, p) for i, p in todo]
        for future in concurrent.futures.as_completed(futures):
            future.result()
    except KeyboardInterrupt:
        pool.shutdown(wait=False, cancel_futures=True)
        _stop_running()
        say(
            "interrupted: the running points save a checkpoint and stop; run the same command "
            "again to resume them"
        )
        raise
    finally:
        pool.shutdown(wait=True)
    from flaxbert.sweep_summary import write_summary

    paths = write_summary(sweep.workdir, metric=metric)
    say(f"summary: {', '.join(paths)}")
    if failures:
        say(f"{len(failures)} of {n} points failed: {', '.join(failures)}")
        return 1
    say(f"all {n} points done")
    return 0


def dry_run(sweep: Sweep, out: TextIO | None = None) -> None:
    """Prints each point's command (a finished one as a comment) and runs nothing."""
    out = out or sys.stdout
    for p in sweep.points:
        done = is_finished(p.workdir, p.num_steps)
        print(f"# {p.name}{' (finished: would be skipped)' if done else ''}", file=out)
        print(shell(p.argv), file=out)


_IS_FINISHED = (
    "import sys; from flaxbert.sweep import is_finished; "
    "sys.exit(0 if is_finished(sys.argv[1], int(sys.argv[2])) else 1)"
)


def emit_slurm(sweep: Sweep, parallel: int | None = None) -> str:
    """Writes DIR/sweep.sbatch, a SLURM array job with one task per point; returns its path."""
    path = os.path.abspath(os.path.join(sweep.workdir, "sweep.sbatch"))
    n = len(sweep.points)
    limit = f"%{parallel}" if parallel else ""

    def argv(p: Point) -> str:
        words = [shlex.quote(w) for w in p.argv]
        if p.argv[0] == sys.executable:
            words[0] = '"$PYTHON"'
        return " ".join(words)

    cases = "\n".join(f"  {i}) cmd=({argv(p)}) ;;" for i, p in enumerate(sweep.points))
    names = " ".join(shlex.quote(p.name) for p in sweep.points)
    steps = " ".join(str(p.num_steps) for p in sweep.points)
    out_dir = os.path.abspath(sweep.workdir)
    text = f"""#!/bin/bash
# flaxbert sweep of {sweep.config}: {n} points, one SLURM array task each.
# Written by `flaxbert sweep --emit slurm`; the points are listed in sweep.json beside it.
# Edit the #SBATCH lines (GPUs, time), then:
#
#   sbatch {path}
#
# A task whose point is finished exits at once; an interrupted one resumes from its latest
# checkpoint, so resubmitting the script (or one task: sbatch --array=3 ...) is safe. Each
# point logs to its workdir's log.txt. When all are done:
#
#   flaxbert sweep-summary {out_dir}
#
#SBATCH --job-name=flaxbert-sweep
#SBATCH --array=0-{n - 1}{limit}
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --gpus-per-task=1
#SBATCH --cpus-per-task=8
#SBATCH --time=24:00:00
#SBATCH --output={out_dir}/slurm-%A_%a.out

set -euo pipefail
cd {shlex.quote(os.getcwd())}
PYTHON=${{PYTHON:-{shlex.quote(sys.executable)}}}
# Activate the environment flaxbert is installed in, e.g.:
# source ~/venvs/flaxbert/bin/activate

names=({names})
steps=({steps})
i=$SLURM_ARRAY_TASK_ID
case "$i" in
{cases}
  *) echo "no sweep point $i (0-{n - 1})" >&2; exit 2 ;;
esac
sub={shlex.quote(out_dir)}/${{names[$i]}}
if "$PYTHON" -c {shlex.quote(_IS_FINISHED)} "$sub" "${{steps[$i]}}"; then
  echo "${{names[$i]}}: finished, skipped"
  exit 0
fi
mkdir -p "$sub"
echo "=== flaxbert sweep, SLURM job ${{SLURM_ARRAY_JOB_ID:-}}_$i: ${{cmd[*]}}" >> "$sub/log.txt"
"${{cmd[@]}}" >> "$sub/log.txt" 2>&1
"""
    os.makedirs(sweep.workdir, exist_ok=True)
    with open(path, "w") as f:
        f.write(text)
    os.chmod(path, 0o755)
    return path


# --- command line ----------------------------------------------------------------------


def add_sweep_parsers(commands) -> None:
    """`flaxbert sweep` and `flaxbert sweep-summary`."""
    p = commands.add_parser(
        "sweep",
        help="run a config's get_sweep() points, each in DIR/<point>, and summarise them",
        description="Run every point of the config file's get_sweep(ARG) as its own "
        "`flaxbert pretrain|finetune` subprocess in WORKDIR/<point name>, its output in "
        "WORKDIR/<point name>/log.txt. Finished points are skipped, interrupted ones resume "
        "from their latest checkpoint, a failed one is reported and the others go on (exit "
        "status 1 at the end). Writes WORKDIR/sweep.json and the summary (see sweep-summary). "
        "--config.KEY=VALUE overrides apply to every point. Point format: flaxbert/sweep.py.",
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
    from flaxbert.sweep_summary import write_summary

    try:
        paths = write_summary(args.workdir, args.metric)
    except ConfigError as e:
        print(f"flaxbert sweep-summary: error: {e}", file=sys.stderr)
        return 2
    print("\n".join(open(paths[1]).read().splitlines()))
    print(f"wrote {', '.join(paths)}")
    return 0
