"""Fine-tuning: `finetune(config, workdir)`, the entry point of `flaxbert finetune`.

It restores the encoder of a pre-training (or converted) checkpoint into a task model with a
fresh head, trains, evaluates, keeps the best checkpoint and writes predictions. Without
`config.init_from` the same command trains from random initialisation: the baseline.
`config.freeze_encoder` trains the head alone on the encoder's features (the feature-based
approach, BERT paper section 5.3; `flaxbert.finetune_step`).

Every task kind (`flaxbert.finetune_tasks`) runs through the loop pre-training uses
(`flaxbert.loop`), under the same strategies (`flaxbert.sharding`) and checkpoints
(`flaxbert.checkpoint`): re-running the command on the same workdir resumes it, and does
nothing once the run has finished.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Collection

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from flaxbert import checkpoint as ckpt
from flaxbert import metrics as metrics_lib
from flaxbert.config import ConfigError
from flaxbert.finetune_setup import TaskData, load_params, restore_encoder, task_data
from flaxbert.finetune_step import (
    apply_task_model,
    count_params,
    make_finetune_step,
    optimizer_config,
    trainable_params,
)
from flaxbert.finetune_tasks import Features, padded
from flaxbert.loop import (
    Cadence,
    LoopResult,
    initial_state,
    train_loop,
)
from flaxbert.optim import TrainState, make_optimizer
from flaxbert.pretrain_step import logical_dims
from flaxbert.run_files import with_model, write_run_config
from flaxbert.sharding import Parallel, make_parallel

log = logging.getLogger("flaxbert")


@dataclasses.dataclass
class FinetuneResult:
    eval_metrics: dict[str, float]  # the last evaluation, keys eval/<metric>
    best_metrics: dict[str, float]  # the evaluation of the best checkpoint
    best_step: int
    test_metrics: dict[str, float]
    final_step: int
    wall_time: float
    train_examples_per_sec: float
    restored_groups: list[str]
    state: TrainState | None = None  # a finished run re-run: the checkpoint's, untrained
    start_step: int = 0  # the checkpoint step it resumed from (0: a fresh start)


# ------------------------------------------------------------------------------ the task


@dataclasses.dataclass(eq=False)
class FineTuning:
    """The fine-tuning task of the shared loop (`flaxbert.loop.Task`): epochs of the training
    features in a (seed, epoch) order, evaluation with predictions and the best so far,
    the test split on the best checkpoint at the end."""

    progress_keys = ("loss",)

    config: ml_collections.ConfigDict
    data: TaskData
    model: nn.Module
    parallel: Parallel
    state: dataclasses.InitVar[TrainState]  # to compile the prediction step for its sharding
    workdir: str
    run_config: dict
    tokenizer_ref: object  # what checkpoint meta names as the tokenizer
    checkpoints: ckpt.Checkpoints
    target_params: object  # the parameters' checkpoint shapes (the best one's restore)
    best: dict  # the best evaluation so far, with its step (a resume brings it back)

    def __post_init__(self, state):
        self.main = f"eval/{self.config.main_metric}"
        mode = self.config.checkpoint.best_mode
        self.best_mode = mode or metrics_lib.better_direction(self.main)
        self.test_metrics: dict[str, float] = {}
        self.train_rows = self.parallel.local_rows(self.config.train.batch_size)
        self.eval_rows = self.parallel.local_rows(self.config.eval.batch_size)
        self.predict_fn = self.parallel.predict_step(self._predict, state)

    def _predict(self, params, batch):
        return self.data.kind.predict(
            apply_task_model(self.model, params, batch, deterministic=True)
        )

    def device_batch(self, step0: int):
        # Packed rows hold a variable number of examples: count them (all processes).
        t, rows = self.config.train, self.train_rows
        if self.data.packed_epochs is not None:
            host = self.data.packed_epochs.batch(step0)
            host = {k: v[rows.start : rows.stop] for k, v in host.items()}
            return self.parallel.put_batch(host), np.count_nonzero(
                host["weight"]
            ) * jax.process_count()
        epoch, i = divmod(step0, self.data.steps_per_epoch)
        order = np.random.default_rng([t.seed, epoch]).permutation(len(self.data.train))
        idx = order[i * t.batch_size : (i + 1) * t.batch_size][rows.start : rows.stop]
        host = {k: v[idx] for k, v in self.data.train.arrays.items()}
        return self.parallel.put_batch(host), t.batch_size

    def scores(self, params, features: Features, prefix: str):
        """(metrics `prefix/<name>`, prediction rows) of `params` on `features`."""
        bs, rows = self.config.eval.batch_size, self.eval_rows
        arrays = padded(features.arrays, bs)
        outs = []
        for i in range(0, len(arrays["input_ids"]), bs):
            keys = ("input_ids", "input_mask", "segment_ids")
            batch = {k: arrays[k][i : i + bs][rows.start : rows.stop] for k in keys}
            outs.append(np.asarray(self.predict_fn(params, batch)))
        kw = {"data": self.config.data} if self.config.kind == "qa" else {}
        scores, out_rows = self.data.kind.evaluate(
            np.concatenate(outs), features, self.data.labels, **kw
        )
        return {f"{prefix}/{k}": float(v) for k, v in scores.items()}, out_rows

    def evaluate(self, state, step: int) -> dict[str, float]:
        metrics, rows = self.scores(state.params, self.data.eval, "eval")
        if self.main not in metrics:
            raise ConfigError(
                f"config key main_metric={self.config.main_metric!r} is not among the "
                f"metrics this task reports ({', '.join(k[5:] for k in metrics)})"
            )
        improved = not self.best or _better(
            metrics[self.main], self.best[self.main], self.best_mode
        )
        if improved:
            self.best = {**metrics, "step": step}
        if jax.process_index() == 0:
            shown = ", ".join(f"{k[5:]} {v:.4f}" for k, v in metrics.items())
            log.info(
                "eval at step %d (epoch %.2f): %s", step, step / self.data.steps_per_epoch, shown
            )
            workdir = self.workdir
            _write_jsonl(os.path.join(workdir, "eval_predictions.jsonl"), rows)
            if improved:
                _write_jsonl(os.path.join(workdir, "best_eval_predictions.jsonl"), rows)
        return metrics

    def checkpoint_meta(self, step: int) -> dict:
        t = self.config.train
        return {
            "data": {"position": step, "seed": t.seed, "global_batch": t.batch_size},
            "config": self.run_config,
            "tokenizer": self.tokenizer_ref,
            "model": dataclasses.asdict(self.data.model_config),
            "task": self.config.task,
            "labels": self.data.labels,
            "best": self.best,  # so that a resumed run still knows its best evaluation
        }

    def throughput(self, steps: int, seconds: float, count: int) -> dict[str, float]:
        return {"examples_per_sec": count / seconds}

    def final_record(self, result: LoopResult, write) -> dict:
        """Scores the test split (if any) with the best checkpoint; the final record."""
        step = result.final_step
        best_step = self.checkpoints.best_step() or step
        if self.data.test is not None:
            params = result.state.params
            if best_step != step:
                params = load_params(
                    self.parallel, self.target_params, self.checkpoints.step_dir(best_step)
                )
            self.test_metrics, rows = self.scores(params, self.data.test, "test")
            write(step, self.test_metrics)
            if jax.process_index() == 0:
                workdir = self.workdir
                _write_jsonl(os.path.join(workdir, "test_predictions.jsonl"), rows)
                with open(os.path.join(workdir, "test_metrics.json"), "w") as f:
                    json.dump({"best_step": best_step, **self.test_metrics}, f, indent=2)
                log.info("test (best checkpoint, step %d): %s", best_step, self.test_metrics)
        log.info(
            "done: %d steps; best %s %.4f at step %s",
            step,
            self.main,
            self.best.get(self.main, float("nan")),
            self.best.get("step"),
        )
        return {
            "num_steps": self.data.num_steps,
            **result.eval_metrics,
            "best": self.best,
            "skipped_updates": result.skipped_updates,
            "train_examples_per_sec": result.count_per_sec,
        }


# ------------------------------------------------------------------------------ entry point


def finetune(
    config: ml_collections.ConfigDict,
    workdir: str,
    parallel: Parallel | None = None,
    explicit: Collection[str] = (),
) -> FinetuneResult:
    """Fine-tunes as `config` says (see the module doc), writing everything into `workdir`;
    resumes from the workdir's latest checkpoint, and does nothing when the run has finished.
    `parallel` overrides the strategy `config.parallel` names. Raises ConfigError (a key
    that does not fit, named), CheckpointMismatchError (init_from or the workdir's checkpoint
    does not fit the model), FloatingPointError (train.nonfinite).

    From a checkpoint the model's structure is the checkpoint's (`finetune_setup.model_config_for`);
    `explicit` names the config keys the user gave on the command line, which must then fit."""
    jax.config.update("jax_threefry_partitionable", True)
    t = config.train
    data = task_data(config, explicit)
    config = with_model(config, data.model_config)
    run_config = write_run_config(config, workdir)
    tokenizer_ref = ckpt.keep_tokenizer(workdir, data.tokenizer_path)
    dims = {**logical_dims(data.model_config), "classes": max(data.kind.num_labels, 2)}
    parallel = parallel or make_parallel(
        config.parallel, dims, t.batch_size, config.eval.batch_size, t.grad_accum_steps
    )
    log.info("parallel: %s", parallel.description)
    schedule, tx = make_optimizer(optimizer_config(t, data.num_steps))
    model = data.kind.model(data.model_config)
    init_fn, logical_specs = _initialisers(model, tx, config)
    abstract = parallel.abstract_state(init_fn, logical_specs, jax.random.key(0))
    target = parallel.checkpoint_abstract(abstract)
    _log_param_counts(config, target.params)
    checkpoints = _checkpoints(config, workdir)
    restored_groups: list[str] = []

    def fresh(init_rng):
        state = parallel.create_state(init_fn, logical_specs, parallel.put_replicated(init_rng))
        if not config.init_from:
            log.info("no init_from: every parameter is freshly initialised (the baseline)")
            return state
        state, names = restore_encoder(
            state, target.params, parallel, config.init_from, config.init_pooler
        )
        restored_groups.extend(names)
        return state

    start = _initial_state(
        checkpoints, parallel, abstract, config, fresh, run_config, data.num_steps
    )
    best = dict(start.meta.get("best") or {})
    task = FineTuning(
        config,
        data,
        model,
        parallel,
        start.state,
        workdir,
        run_config,
        tokenizer_ref,
        checkpoints,
        target.params,
        best,
    )
    freeze = bool(config.freeze_encoder)
    step = make_finetune_step(
        model, data.kind, tx, schedule, parallel.axis_name, t.grad_accum_steps, freeze
    )
    _log_plan(config, data)
    result = train_loop(
        task,
        _cadence(config, data),
        start,
        step_fn=parallel.train_step(step, start.state),
        parallel=parallel,
        checkpoints=checkpoints,
        workdir=workdir,
    )
    return _result(task, result, restored_groups, parallel)


def _result(task: FineTuning, result: LoopResult, restored_groups, parallel) -> FinetuneResult:
    return FinetuneResult(
        eval_metrics=result.eval_metrics,
        best_metrics=task.best,
        best_step=task.best.get("step", result.final_step),
        test_metrics=task.test_metrics,
        final_step=result.final_step,
        wall_time=result.wall_time,
        train_examples_per_sec=result.count_per_sec,
        restored_groups=restored_groups,
        state=parallel.unreplicate(result.state),
        start_step=result.start_step,
    )


def _checkpoints(config, workdir: str) -> ckpt.Checkpoints:
    """The run's checkpoints, scored by main_metric (the best one is kept)."""
    c, main = config.checkpoint, f"eval/{config.main_metric}"
    return ckpt.Checkpoints(
        ckpt.checkpoint_directory(workdir, c),
        keep=c.keep,
        best_metric=main,
        best_mode=c.best_mode or metrics_lib.better_direction(main),
        async_save=c.async_save,
    )


def _cadence(config, data: TaskData) -> Cadence:
    t = config.train
    return Cadence(
        num_steps=data.num_steps,
        log_every=t.log_every,
        eval_every=data.eval_every,
        save_every=data.eval_every,  # at every evaluation: each checkpoint has a score
        nonfinite=t.nonfinite,
        max_consecutive_nonfinite=t.max_consecutive_nonfinite,
        steps_key="train.num_epochs (or train.num_steps)",
    )


def _log_plan(config, data: TaskData) -> None:
    log.info(
        "fine-tuning %s: %d examples, %d steps (%.2f epochs of %d steps), batch %d",
        config.task,
        len(data.train),
        data.num_steps,
        data.num_steps / data.steps_per_epoch,
        data.steps_per_epoch,
        config.train.batch_size,
    )


def _initialisers(model, tx, config):
    """(init_fn: rng -> TrainState, the parameters' logical axis names) of the task model.
    Frozen encoder: the optimizer state (moments, weight-decay masks) covers the head alone."""
    seq, freeze = config.data.max_seq_length, bool(config.freeze_encoder)

    def init_fn(rng):
        z = jnp.zeros((1, seq), jnp.int32)
        params = nn.unbox(model.init(rng, z, jnp.ones_like(z), z)["params"])
        opt_state = tx.init(trainable_params(params, freeze))
        return TrainState(step=jnp.asarray(0, jnp.int32), params=params, opt_state=opt_state)

    z = jnp.zeros((1, seq), jnp.int32)
    boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), z, jnp.ones_like(z), z))
    return init_fn, nn.get_partition_spec(boxed["params"])


def _log_param_counts(config, params) -> None:
    freeze = bool(config.freeze_encoder)
    counts = count_params(params, freeze)
    log.info(
        "parameters: %d trained, %d frozen%s",
        counts.trained,
        counts.frozen,
        " (freeze_encoder: the task head alone is trained on the encoder's features)"
        if freeze
        else "",
    )
    if freeze and not config.init_from:
        log.warning(
            "freeze_encoder without init_from: the frozen encoder keeps its random "
            "initialisation, so the head trains on random features (a baseline); set "
            "init_from=PRETRAINING_WORKDIR to train it on pre-trained ones"
        )


def _initial_state(checkpoints, parallel, abstract, config, fresh, run_config, num_steps):
    """`flaxbert.loop.initial_state`, naming freeze_encoder when the optimizer state of the
    workdir's checkpoint does not fit (a frozen encoder has none)."""
    try:
        start = initial_state(
            checkpoints, parallel, abstract, config.train.seed, fresh, run_config, num_steps
        )
    except ckpt.CheckpointMismatchError as e:
        if "optimizer-state" not in str(e):
            raise
        raise ckpt.CheckpointMismatchError(
            f"{e}\nOr config key freeze_encoder={bool(config.freeze_encoder)} differs from the "
            "run that wrote it (a frozen encoder has no optimizer state): use the same value."
        ) from None
    if start.step:
        best = start.meta.get("best") or {}
        log.info(
            "best eval/%s so far: %s at step %s",
            config.main_metric,
            best.get(f"eval/{config.main_metric}", "none"),
            best.get("step", "-"),
        )
    return start


def _better(value: float, best: float, mode: str) -> bool:
    return value < best if mode == "min" else value > best


def _write_jsonl(path: str, rows: list[dict]) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
