"""The training loop that pre-training and fine-tuning share.

`train_loop(task, cadence, start, ...)` owns everything around the step: batches built and
copied to the devices ahead of time (`prefetch`), each step's metrics fetched one step late
so the host never waits for the device (`StepMetrics`, which also applies the non-finite
policy of `train.nonfinite` and writes the logging interval's means), the evaluation and
checkpoint cadence, SIGTERM (preemption: save, then stop), and the end-of-run record
(WORKDIR/final_metrics.json). `initial_state` is the one start-up order: the workdir's own
latest checkpoint, else a fresh state (which a fine-tuning run fills from `init_from`).

What differs between the two runs comes in through a `Task`: its batches, its evaluation,
what goes into checkpoint metadata, its throughput fields and what its final record holds.
The pre-training task is in `flaxbert.train`, the fine-tuning one in `flaxbert.finetune`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import signal
import threading
import time
from typing import Any, Protocol

import jax
import ml_collections
import numpy as np

from flaxbert import checkpoint as ckpt
from flaxbert.config import require
from flaxbert.data.pretraining import prefetch
from flaxbert.monitor import MetricWriter, Progress
from flaxbert.optim import TrainState, nonfinite_in_a_row, skipped_updates
from flaxbert.run_files import log_already_finished, read_final_metrics

log = logging.getLogger("flaxbert")


class Task(Protocol):
    """What a run supplies to `train_loop`.

    - `device_batch(step0)`: the batch of the update that makes step `step0 + 1`, already on
      the devices (`parallel.put_batch`), and its count for the throughput fields (real
      tokens, or examples; all processes). Called on the prefetch thread.
    - `evaluate(state, step)`: held-out metrics, keys `eval/<name>`.
    - `checkpoint_meta(step)`: what this run adds to a checkpoint's metadata (the loop writes
      format, step, rng, skipped_updates and last_eval, the last evaluation).
    - `throughput(steps, seconds, count)`: the speed fields of a logged training row.
    - `final_record(result, write)`: called once when the run completes (not when
      preempted), checkpoints still open, `write(step, metrics)` adding rows to
      metrics.jsonl; returns what final_metrics.json holds besides `step` and `wall_time_s`.
    - `progress_keys`: the metrics the progress line shows (None: the default set).
    """

    progress_keys: tuple[str, ...] | None

    def device_batch(self, step0: int) -> tuple[Any, int]: ...

    def evaluate(self, state: TrainState, step: int) -> dict[str, float]: ...

    def checkpoint_meta(self, step: int) -> dict: ...

    def throughput(self, steps: int, seconds: float, count: int) -> dict[str, float]: ...

    def final_record(self, result: LoopResult, write) -> dict: ...


@dataclasses.dataclass(frozen=True)
class Cadence:
    """When the loop evaluates, saves and logs; `train.*` non-finite policy and prefetch."""

    num_steps: int
    log_every: int
    eval_every: int  # 0: at the end only
    save_every: int  # 0: at the end (and on SIGTERM) only
    nonfinite: str  # stop | skip
    max_consecutive_nonfinite: int
    prefetch: int = 4  # batches built ahead
    steps_key: str = "train.num_steps"  # the config key(s) that set num_steps, for messages

    def eval_at(self, step: int) -> bool:
        return step == self.num_steps or bool(self.eval_every and step % self.eval_every == 0)

    def save_at(self, step: int) -> bool:
        return step == self.num_steps or bool(self.save_every and step % self.save_every == 0)

    def log_at(self, step: int) -> bool:
        return step % self.log_every == 0 or self.eval_at(step)


@dataclasses.dataclass
class Start:
    """Where a run starts: a fresh state at step 0, or its workdir's latest checkpoint."""

    state: TrainState
    step: int
    rng: jax.Array  # the dropout key (host), saved in every checkpoint
    meta: dict  # the restored checkpoint's metadata; {} for a fresh start
    skipped: int = 0  # updates skipped for a non-finite gradient so far
    in_a_row: int = 0  # of which the last ones in a row


@dataclasses.dataclass
class LoopResult:
    state: TrainState
    start_step: int
    final_step: int
    preempted: bool  # stopped by SIGTERM after saving `final_step`
    skipped_updates: int
    train_metrics: dict[str, float]  # means over the last logging interval
    eval_metrics: dict[str, float]  # the last evaluation, keys eval/<name>
    wall_time: float  # seconds, evaluation included
    count_per_sec: float  # the task's count (tokens, examples) per training second after step 1
    already_finished: bool = False  # a re-run of a finished run: nothing trained or written


def train_loop(
    task: Task, cadence: Cadence, start: Start, *, step_fn, parallel, checkpoints, workdir: str
) -> LoopResult:
    """Runs steps `start.step + 1 .. cadence.num_steps` of `step_fn(state, batch, rng)`; see
    the module doc. Raises FloatingPointError by the non-finite policy; closes `checkpoints`
    (waiting for the saves being written) however it ends."""
    finished = _already_finished(start, cadence, checkpoints, workdir)
    if finished is not None:
        return finished
    is_chief = jax.process_index() == 0
    wall_start = time.perf_counter()
    writer = MetricWriter(workdir, enabled=is_chief, resume_step=start.step)
    progress = Progress(cadence.num_steps, first_step=start.step, enabled=is_chief)
    metrics = StepMetrics(parallel, cadence, task, writer, progress, start.skipped, start.in_a_row)
    preemption = PreemptionWatch()
    rng = parallel.put_replicated(start.rng)
    state, step, preempted, batches = start.state, start.step, False, None
    last_eval = dict(start.meta.get("last_eval") or {})
    record = None
    try:
        batches = prefetch(
            task.device_batch, range(start.step, cadence.num_steps), cadence.prefetch
        )
        for step0, (batch, count) in batches:
            step = step0 + 1  # the step count once this update is applied
            state, device_metrics = step_fn(state, batch, rng)
            metrics.add(step, device_metrics, count)
            at_eval, at_save = cadence.eval_at(step), cadence.save_at(step)
            preempted = preemption.reached(step)
            if at_eval or at_save or preempted:
                metrics.flush()  # the step is checked (finite, or skipped) before any save
            if at_eval:
                with metrics.paused():
                    last_eval = task.evaluate(state, step)
                writer.write(step, last_eval)
            if at_save or preempted:
                meta = {"rng": ckpt.rng_to_json(start.rng), "skipped_updates": metrics.skipped}
                # The last evaluation too: a run stopped at its last step reports it on resume.
                meta.update(last_eval=last_eval, **task.checkpoint_meta(step))
                _save(checkpoints, parallel, state, step, meta, last_eval if at_eval else None)
            if preempted:
                log.warning(
                    "SIGTERM (preemption) received: saved step %d; stopping. Run the same "
                    "command again to continue.",
                    step,
                )
                break
        metrics.flush()
        if start.step >= cadence.num_steps and not last_eval:
            # Preempted at its last step: final_metrics.json was never written.
            log.info("the checkpoint is at the last step: evaluating for final_metrics.json")
            last_eval = task.evaluate(state, step)
        result = LoopResult(
            state=state,
            start_step=start.step,
            final_step=step,
            preempted=preempted,
            skipped_updates=metrics.skipped,
            train_metrics=metrics.last_row,
            eval_metrics=last_eval,
            wall_time=0.0,
            count_per_sec=metrics.count_per_sec(),
        )
        if not preempted:
            checkpoints.wait()
            record = task.final_record(result, writer.write)
    finally:
        if batches is not None:
            batches.close()  # stops the prefetch thread before anything else closes
        preemption.close()
        writer.close()
        checkpoints.close()  # waits for the saves still being written
    result.wall_time = time.perf_counter() - wall_start
    if is_chief and record is not None:
        with open(os.path.join(workdir, "final_metrics.json"), "w") as f:
            json.dump({"step": step, **record, "wall_time_s": result.wall_time}, f, indent=2)
    return result


def _already_finished(start: Start, cadence: Cadence, checkpoints, workdir: str):
    """A re-run of a run that finished (its checkpoint at the last step, final_metrics.json
    written): the result, with nothing trained, evaluated or written; else None."""
    final = read_final_metrics(workdir) if start.step >= cadence.num_steps else {}
    if not final:
        return None
    log_already_finished(checkpoints.step_dir(start.step), cadence.num_steps, cadence.steps_key)
    checkpoints.close()
    return LoopResult(
        state=start.state,
        start_step=start.step,
        final_step=start.step,
        preempted=False,
        skipped_updates=start.skipped,
        train_metrics={},
        eval_metrics={k: v for k, v in final.items() if k.startswith("eval/")},
        wall_time=0.0,
        count_per_sec=0.0,
        already_finished=True,
    )


def _save(checkpoints, parallel, state, step: int, meta: dict, eval_metrics) -> None:
    """Saves `state` at `step` with `meta` (plus the format and step) and its score."""
    meta = {"format": ckpt.FORMAT_VERSION, "step": step, **meta}
    view = parallel.to_checkpoint(state)
    blocking = checkpoints.save(step, view.params, view.opt_state, meta, eval_metrics)
    if jax.process_index() == 0:
        log.info(
            "checkpoint %s: training waited %.2fs; writing goes on in the background",
            checkpoints.step_dir(step),
            blocking,
        )


class StepMetrics:
    """Each step's metrics, fetched one step late (when the next step has been dispatched),
    so the host never stalls the device; the non-finite policy applied to each; the finite
    ones averaged over the logging interval and written (metrics.jsonl, TensorBoard, the
    progress line) at `cadence.log_at` steps, with the task's throughput fields. Time spent
    in `paused()` (evaluation) counts neither against the interval's speed nor the run's."""

    def __init__(self, parallel, cadence, task, writer, progress, skipped=0, in_a_row=0):
        self.parallel, self.cadence, self.task = parallel, cadence, task
        self.writer, self.progress = writer, progress
        self.skipped, self.in_a_row = skipped, in_a_row
        self.pending = None
        self.interval: list[dict[str, float]] = []
        self.interval_count = 0
        self.interval_start = time.perf_counter()
        self.last_row: dict[str, float] = {}
        # Run throughput, from the end of the first step (which compiles) on.
        self.run_start, self.run_count, self.run_paused = None, 0, 0.0

    def add(self, step: int, device_metrics, count: int) -> None:
        """Records the step just dispatched and finishes the one before it."""
        self.flush()
        self.pending = (step, device_metrics, count)

    def flush(self) -> None:
        """Finishes the pending step now (blocks until the device has it)."""
        if self.pending is None:
            return
        step, device_metrics, count = self.pending
        self.pending = None
        metrics = self.parallel.fetch(device_metrics)
        if self.run_start is None:
            self.run_start = time.perf_counter()
        else:
            self.run_count += count
        self.skipped = int(metrics["skipped_updates"])
        problem = _nonfinite_message(step, metrics)
        if problem and self.cadence.nonfinite == "stop":
            raise FloatingPointError(
                f"{problem} ({metrics}); the update was not applied and nothing non-finite "
                "was saved. Lower train.learning_rate, check the data, use "
                "model.dtype=float32, or set train.nonfinite=skip to skip such steps"
            )
        self.in_a_row = self.in_a_row + 1 if problem else 0
        if problem:
            log.warning("%s: update skipped (%d skipped so far)", problem, self.skipped)
            check_consecutive_nonfinite(
                problem, self.in_a_row, self.cadence.max_consecutive_nonfinite
            )
        else:
            self.interval.append(metrics)
            self.interval_count += count
        if self.interval and self.cadence.log_at(step):
            self._write(step)

    def _write(self, step: int) -> None:
        now = time.perf_counter()
        n = len(self.interval)
        row = {k: float(np.mean([m[k] for m in self.interval])) for k in self.interval[0]}
        row["skipped_updates"] = self.skipped
        row.update(self.task.throughput(n, now - self.interval_start, self.interval_count))
        self.writer.write(step, row)
        if self.task.progress_keys:
            self.progress.log(step, row, keys=self.task.progress_keys)
        else:
            self.progress.log(step, row)
        self.interval.clear()
        self.interval_count, self.interval_start, self.last_row = 0, now, row

    @contextlib.contextmanager
    def paused(self):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            spent = time.perf_counter() - t0
            self.interval_start += spent
            self.run_paused += spent

    def count_per_sec(self) -> float:
        if self.run_start is None or not self.run_count:
            return 0.0
        seconds = time.perf_counter() - self.run_start - self.run_paused
        return self.run_count / seconds if seconds > 0 else 0.0


# ------------------------------------------------------------------------- start-up


def initial_state(
    checkpoints, parallel, abstract, seed: int, fresh, run_config: dict, num_steps: int
) -> Start:
    """The workdir's latest complete checkpoint (`checkpoints`) placed as `parallel` wants it,
    or `fresh(init_rng)` when there is none; the dropout key from `seed` or the checkpoint.
    A resumed config that differs from the checkpoint's is logged, key by key. Raises
    `flaxbert.checkpoint.CheckpointMismatchError` when the checkpoint does not fit
    `abstract` (the TrainState's shapes)."""
    init_rng, dropout_rng = jax.random.split(jax.random.key(seed))
    target = parallel.checkpoint_abstract(abstract)
    restored = checkpoints.restore_latest(target.params, target.opt_state)
    if restored is None:
        return Start(state=fresh(init_rng), step=0, rng=dropout_rng, meta={})
    _log_config_changes(restored.meta.get("config", {}), run_config, restored.step)
    skipped, in_a_row = nonfinite_counts(restored.opt_state)
    log.info(
        "resuming from checkpoint %s (step %d of %d): parameters, optimizer state, dropout "
        "RNG and data position restored",
        checkpoints.step_dir(restored.step),
        restored.step,
        num_steps,
    )
    return Start(
        state=placed_state(parallel, abstract, restored),
        step=restored.step,
        rng=ckpt.rng_from_json(restored.meta["rng"]),
        meta=restored.meta,
        skipped=skipped,
        in_a_row=in_a_row,
    )


def placed_state(parallel, abstract, restored: ckpt.Restored) -> TrainState:
    """A restored checkpoint -> the TrainState as `parallel` places it."""
    target = parallel.checkpoint_abstract(abstract)
    step = jax.make_array_from_process_local_data(
        target.step.sharding, np.asarray(restored.step, np.int32)
    )
    return parallel.from_checkpoint(
        TrainState(step=step, params=restored.params, opt_state=restored.opt_state)
    )


def _flat_config(tree, prefix=""):
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flat_config(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _log_config_changes(saved: dict, current: dict, step: int) -> None:
    saved, current = _flat_config(saved), _flat_config(current)
    changed = [
        f"{k} {saved.get(k, '(unset)')!r} -> {current.get(k, '(unset)')!r}"
        for k in sorted(set(saved) | set(current))
        if saved.get(k) != current.get(k)
    ]
    if changed:
        log.warning(
            "resuming from step %d with a config that differs from the checkpoint's: %s "
            "(the run will not repeat an uninterrupted one exactly)",
            step,
            "; ".join(changed),
        )


# ------------------------------------------------------------------------- config


def validate_loop_config(t: ml_collections.ConfigDict) -> None:
    """The train.* keys the loop reads in pre-training and fine-tuning alike."""
    require(t.batch_size > 0, "train.batch_size", t.batch_size, "must be positive")
    require(t.grad_accum_steps >= 1, "train.grad_accum_steps", t.grad_accum_steps, "must be >= 1")
    require(
        t.batch_size % t.grad_accum_steps == 0,
        "train.batch_size",
        t.batch_size,
        f"must be divisible by train.grad_accum_steps={t.grad_accum_steps}",
    )
    require(t.log_every > 0, "train.log_every", t.log_every, "must be positive")
    require(
        t.nonfinite in ("stop", "skip"),
        "train.nonfinite",
        t.nonfinite,
        "choose stop (name the step and stop) or skip (drop the update and count it)",
    )
    require(
        t.max_consecutive_nonfinite >= 1,
        "train.max_consecutive_nonfinite",
        t.max_consecutive_nonfinite,
        "must be >= 1",
    )


# ------------------------------------------------------------------------- non-finite


def _nonfinite_message(step: int, metrics: dict[str, float]) -> str | None:
    bad = [k for k in ("loss", "grad_norm") if not math.isfinite(metrics[k])]
    return f"non-finite {' and '.join(bad)} at step {step}" if bad else None


def check_consecutive_nonfinite(problem: str, in_a_row: int, limit: int) -> None:
    """Raises FloatingPointError once more than `limit` (train.max_consecutive_nonfinite)
    updates in a row were skipped (train.nonfinite=skip)."""
    if in_a_row > limit:
        raise FloatingPointError(
            f"{problem}: {in_a_row} non-finite steps in a row (more than "
            f"train.max_consecutive_nonfinite={limit}); stopping. Lower train.learning_rate, "
            "check the data, or use model.dtype=float32"
        )


def nonfinite_counts(opt_state) -> tuple[int, int]:
    """(skipped updates, of which the last ones in a row) of a restored optimizer state."""
    return (
        int(np.asarray(skipped_updates(opt_state))),
        int(np.asarray(nonfinite_in_a_row(opt_state))),
    )


# ------------------------------------------------------------------------- preemption


class PreemptionWatch:
    """SIGTERM (a scheduler's preemption notice) -> save at the next step, then stop cleanly.

    One process: a signal handler sets a flag. Several: JAX's preemption sync manager (set up by
    `jax.distributed.initialize`, which catches SIGTERM itself) picks one step all processes
    reach, so they all save the same step."""

    def __init__(self):
        self.requested = False
        self._previous = None
        self._multi = jax.process_count() > 1
        if not self._multi and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        self.requested = True

    def reached(self, step: int) -> bool:
        if self._multi:
            from jax.experimental import multihost_utils

            return multihost_utils.reached_preemption_sync_point(step)
        return self.requested

    def close(self):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None
