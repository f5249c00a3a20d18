"""Running a sweep on this machine (`flaxbert sweep`): each unfinished point as its own
subprocess, some at a time, its output appended to its workdir's log.txt and its exit status
to sweep_status.json; finished points are skipped, interrupted ones resume from their latest
checkpoint (the command does that), a failure is reported and the others go on, Ctrl-C stops
the running points cleanly; then the summary. `dry_run` prints the commands instead.
"""

from __future__ import annotations

import concurrent.futures
import datetime
import json
import os
import signal
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from typing import TextIO

from flaxbert.sweeps.points import Point, Sweep, shell, write_sweep_json
from flaxbert.sweeps.status import is_finished
from flaxbert.sweeps.summary import write_summary

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

    todo = _unfinished(sweep.points, say)
    failures: list[str] = []

    def run_one(i: int, p: Point) -> None:
        if _STOPPING.is_set():
            return
        if not _run_point(p, f"[{i}/{n}] {p.name}", runner, say):
            with lock:
                failures.append(p.name)

    _run_all(todo, parallel, run_one, say)
    paths = write_summary(sweep.workdir, metric=metric)
    say(f"summary: {', '.join(paths)}")
    if failures:
        say(f"{len(failures)} of {n} points failed: {', '.join(failures)}")
        return 1
    say(f"all {n} points done")
    return 0


def _unfinished(points: Sequence[Point], say: Callable[[str], None]) -> list[tuple[int, Point]]:
    """The points to run, with their number from 1; each finished one is reported skipped."""
    todo = []
    for i, p in enumerate(points, 1):
        if is_finished(p.workdir, p.num_steps):
            say(f"[{i}/{len(points)}] {p.name}: finished, skipped")
        else:
            todo.append((i, p))
    return todo


def _run_all(
    todo: Sequence[tuple[int, Point]],
    parallel: int,
    run_one: Callable[[int, Point], None],
    say: Callable[[str], None],
) -> None:
    """run_one(i, point) for each point, `parallel` at a time. Ctrl-C cancels the points not
    started, stops the running ones (each saves a checkpoint) and is raised again."""
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


def _run_point(
    p: Point, tag: str, runner: Callable[[Point, TextIO], int], say: Callable[[str], None]
) -> bool:
    """Runs one point (a resumed one when its workdir exists), writes its sweep_status.json and
    says how it went; returns whether it is done."""
    resumed = os.path.isdir(p.workdir)
    os.makedirs(p.workdir, exist_ok=True)
    log_path = os.path.join(p.workdir, "log.txt")
    say(f"{tag}: {'resuming' if resumed else 'running'} (log: {log_path})")
    start = time.perf_counter()
    code, error = _run_logged(p, log_path, runner)
    seconds = time.perf_counter() - start
    finished = is_finished(p.workdir, p.num_steps)
    with open(os.path.join(p.workdir, "sweep_status.json"), "w") as f:
        json.dump({"returncode": code, "finished": finished, "seconds": seconds}, f)
    if code == 0 and finished:
        say(f"{tag}: done in {seconds:.1f}s")
        return True
    why = error or _why_failed(code, p.num_steps)
    say(f"{tag}: FAILED, {why} after {seconds:.1f}s; last lines of {log_path}:\n{tail(log_path)}")
    return False


def _run_logged(p: Point, log_path: str, runner: Callable[[Point, TextIO], int]) -> tuple[int, str]:
    """The runner's exit code, its output after a header line in the log, and '' or why it
    could not run (then the code is 127 and the traceback is in the log)."""
    with open(log_path, "a") as log:
        stamp = datetime.datetime.now().isoformat(timespec="seconds")
        log.write(f"=== flaxbert sweep, {stamp}: {shell(p.argv)}\n")
        log.flush()
        try:
            return runner(p, log), ""
        except Exception as e:  # a command that cannot start is a failed point
            log.write(traceback.format_exc())
            return 127, f"could not run it ({type(e).__name__}: {e})"


def _why_failed(code: int, num_steps: int) -> str:
    if code < 0:
        return f"killed by signal {-code}"
    if code:
        return f"exit code {code}"
    return f"exit code 0 but not finished (step {num_steps or 'end'} not reached)"


def dry_run(sweep: Sweep, out: TextIO | None = None) -> None:
    """Prints each point's command (a finished one as a comment) and runs nothing."""
    out = out or sys.stdout
    for p in sweep.points:
        done = is_finished(p.workdir, p.num_steps)
        print(f"# {p.name}{' (finished: would be skipped)' if done else ''}", file=out)
        print(shell(p.argv), file=out)
