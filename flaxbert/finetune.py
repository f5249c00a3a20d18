"""Fine-tuning: restore the encoder of a pre-training checkpoint, initialise a fresh task head,
train, evaluate, keep the best checkpoint, write predictions.

`config.freeze_encoder` trains the task head alone on the encoder's features (the feature-based
approach, BERT paper section 5.3): the encoder (`bert`) gets no gradient, no optimizer state
and no dropout.

`finetune(config, workdir)` runs any task kind (`flaxbert.finetune_tasks`) under the same
strategies (`flaxbert.sharding`) and checkpoints (`flaxbert.checkpoint`) as pre-training:
re-running the command on the same workdir resumes it. Without `config.init_from` the same
command trains from random initialisation: the baseline.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
import logging
import math
import os
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from flaxbert import checkpoint as ckpt
from flaxbert import metrics as metrics_lib
from flaxbert.config import ConfigError, require
from flaxbert.data import tasks
from flaxbert.data.pretraining import prefetch
from flaxbert.finetune_tasks import Features, PackedEpochs, make_kind, padded
from flaxbert.model import STRUCTURAL_KEYS, BertConfig, BertModel
from flaxbert.monitor import MetricWriter, Progress
from flaxbert.sharding import Parallel, make_parallel
from flaxbert.tokenizer import load_tokenizer
from flaxbert.train import (
    PreemptionWatch,
    TrainState,
    _nonfinite_counts,
    _nonfinite_message,
    accumulated_gradients,
    applied_learning_rate,
    check_consecutive_nonfinite,
    logical_dims,
    make_optimizer,
    read_final_metrics,
    skipped_updates,
    validate_loop_config,
    write_run_config,
)

log = logging.getLogger("flaxbert")

# ------------------------------------------------------------------------------ set-up


def _sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def resolve_tokenizer(config: ml_collections.ConfigDict) -> str:
    """The checkpoint's tokenizer when fine-tuning from one; else `data.tokenizer`."""
    own = config.data.tokenizer
    if config.init_from:
        path = ckpt.tokenizer_of(config.init_from)
        if not path:
            raise ConfigError(
                f"config key init_from={config.init_from!r}: that checkpoint was pre-trained on "
                "the embedded synthetic corpus and has no tokenizer, so it cannot read text"
            )
        if own and _sha256(own) != _sha256(path):
            raise ConfigError(
                f"config key data.tokenizer={own!r} differs from the tokenizer the checkpoint was "
                f"trained with ({path}); leave data.tokenizer empty to use the checkpoint's"
            )
        return path
    require(
        bool(own),
        "data.tokenizer",
        own,
        "is needed without init_from: a SentencePiece model (flaxbert train-tokenizer) or "
        "the vocab.txt of a converted checkpoint (flaxbert convert), or set "
        "init_from=PRETRAINING_WORKDIR to use its encoder and tokenizer",
    )
    require(os.path.isfile(own), "data.tokenizer", own, "no such file")
    return own


def model_config_for(config: ml_collections.ConfigDict, vocab_size: int) -> BertConfig:
    values = config.model.to_dict()
    if not values.get("vocab_size"):
        values["vocab_size"] = vocab_size
    require(
        values["vocab_size"] == vocab_size,
        "model.vocab_size",
        values["vocab_size"],
        f"does not match the tokenizer ({vocab_size} pieces); set it to 0 to follow the tokenizer",
    )
    if config.init_from:
        step_dir, meta = ckpt.read_meta(config.init_from)
        saved = meta.get("model") or meta.get("config", {}).get("model", {})
        diff = [
            f"model.{k}={values[k]} but the checkpoint has {saved[k]}"
            for k in STRUCTURAL_KEYS
            if k in saved and saved[k] != values[k]
        ]
        # The layers' layout (one stacked tree or one per layer) and the blocks' LayerNorm
        # placement: a pre-LN checkpoint read as post-LN would run, wrongly, without a word.
        layouts = {
            "scan_layers": "its layers are stored in that layout",
            "pre_layer_norm": "its blocks were trained with that LayerNorm placement",
        }
        for key, why in layouts.items():
            if bool(saved.get(key, False)) != bool(values.get(key, False)):
                diff.append(
                    f"model.{key}={values.get(key, False)} but the checkpoint has "
                    f"{saved.get(key, False)} ({why})"
                )
        if diff:
            raise ConfigError(
                f"the config does not fit the checkpoint {step_dir}: " + "; ".join(diff) + ". "
                "Pick the matching size (configs/finetune.py:TASK,VARIANT) or override these keys"
            )
    try:
        return BertConfig.from_dict(values)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def read_split(spec, path: str, limit: int, what: str):
    if not path:
        return None
    if path.startswith("tfds:"):
        result = tasks.read_tfds(path, spec, limit=limit or None)
    else:
        if not os.path.exists(path):
            raise ConfigError(f"config key data.{what}_file={path!r}: no such file")
        result = tasks.read_examples(spec, path, limit=limit or None)
    if result.skipped:
        shown = "; ".join(f"row {r}: {why}" for r, why in result.skipped[:5])
        log.warning("%s: skipped %d bad rows (%s ...)", path, len(result.skipped), shown)
    if not result.examples:
        raise ConfigError(f"config key data.{what}_file={path!r}: no examples in it")
    log.info("%s split: %d examples from %s", what, len(result.examples), path)
    return result.examples


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
    state: TrainState | None = None


def apply_task_model(
    model, params, batch, deterministic: bool, rng=None, encoder_deterministic: bool = False
):
    """The task model's outputs on `batch`. `encoder_deterministic=True` runs the encoder
    (`bert`) without dropout even when `deterministic` is False: only the head drops."""
    packed = {k: batch[k] for k in ("position_ids", "cls_positions") if k in batch}

    def run():
        return model.apply(
            {"params": params},
            batch["input_ids"],
            batch["input_mask"],
            batch["segment_ids"],
            deterministic=deterministic,
            rngs={"dropout": rng} if rng is not None else None,
            **packed,  # packed rows ([CLS] tasks with data.packing)
        )

    if encoder_deterministic and not deterministic:
        with nn.intercept_methods(_deterministic_encoder):
            return run()
    return run()


_ENCODER_CALL = inspect.signature(BertModel.__call__)


def _deterministic_encoder(next_fun, args, kwargs, context):
    """A `flax.linen.intercept_methods` interceptor: every `BertModel.__call__` gets
    `deterministic=True`, however the task head passed it (by position or by name)."""
    if context.method_name != "__call__" or not isinstance(context.module, BertModel):
        return next_fun(*args, **kwargs)
    bound = _ENCODER_CALL.bind(context.module, *args, **kwargs)
    bound.arguments["deterministic"] = True
    return next_fun(*bound.args[1:], **bound.kwargs)


# ------------------------------------------------------------------------------ frozen encoder

ENCODER = "bert"  # the task models' encoder subtree (what init_from restores)


def trainable_params(params, freeze_encoder: bool):
    """The parameters the optimizer updates: all of `params`, or with `freeze_encoder` the
    task head alone (every top-level subtree but `bert`). Raises KeyError when
    `freeze_encoder` is set and `params` has no `bert` subtree."""
    if not freeze_encoder:
        return params
    if ENCODER not in params:
        raise KeyError(f"freeze_encoder: the parameters have no {ENCODER!r} subtree to freeze")
    return {k: v for k, v in params.items() if k != ENCODER}


def with_trainable(params, trained, freeze_encoder: bool):
    """`params` with its `trainable_params` part replaced by `trained` (the same tree)."""
    if not freeze_encoder:
        return trained
    return {**trained, ENCODER: params[ENCODER]}


@dataclasses.dataclass(frozen=True)
class ParamCounts:
    """Parameter scalars the optimizer updates (`trained`) and those it never sees."""

    trained: int
    frozen: int


def count_params(params, freeze_encoder: bool) -> ParamCounts:
    """Scalars trained and frozen in `params` (arrays or ShapeDtypeStructs, unreplicated)."""
    total = sum(math.prod(x.shape) for x in jax.tree.leaves(params))
    trained = sum(
        math.prod(x.shape) for x in jax.tree.leaves(trainable_params(params, freeze_encoder))
    )
    return ParamCounts(trained=trained, frozen=total - trained)


def make_finetune_step(
    model,
    kind,
    tx,
    schedule,
    axis_name: str | None = None,
    grad_accum_steps: int = 1,
    freeze_encoder: bool = False,
):
    """`train_step(state, batch, rng) -> (state, metrics)` for any kind: the loss is the
    kind's summed loss over the global count (examples or labelled tokens) of the whole batch,
    so pmap and pjit give the single-device numbers and `grad_accum_steps` micro-batches
    (`flaxbert.train.accumulated_gradients`) the whole batch's gradient.

    With `freeze_encoder` the loss is differentiated with respect to the head alone
    (`trainable_params`), the encoder closed over and run without dropout: no encoder
    gradient is computed, `state.opt_state` is the optimizer's state of the head parameters
    (`tx.init(trainable_params(params, True))`) and `state.params["bert"]` comes out as it
    went in. `grad_norm` is then the head gradient's norm.

    `learning_rate` in the metrics is the one the update applied (the schedule follows
    applied updates: `flaxbert.train.applied_updates`)."""

    def global_sum(x):
        return x if axis_name is None else jax.lax.psum(x, axis_name)

    def train_step(state: TrainState, batch, rng):
        rng = jax.random.fold_in(rng, state.step)
        if axis_name is not None:
            rng = jax.random.fold_in(rng, jax.lax.axis_index(axis_name))
        denominator = jnp.maximum(global_sum(kind.count(batch).astype(jnp.float32)), 1.0)
        trained = trainable_params(state.params, freeze_encoder)

        def loss_fn(trained, micro, micro_rng):
            params = with_trainable(state.params, trained, freeze_encoder)
            outputs = apply_task_model(
                model,
                params,
                micro,
                deterministic=False,
                rng=micro_rng,
                encoder_deterministic=freeze_encoder,
            )
            sums = kind.loss_sums(outputs, micro)
            return sums["loss_sum"] / denominator, sums

        grad_fn = jax.grad(loss_fn, has_aux=True)
        grads, sums = accumulated_gradients(grad_fn, trained, batch, rng, grad_accum_steps)
        grads, sums = global_sum((grads, sums))
        updates, opt_state = tx.update(grads, state.opt_state, trained)
        params = with_trainable(state.params, optax.apply_updates(trained, updates), freeze_encoder)
        metrics = {
            "loss": sums["loss_sum"] / jnp.maximum(sums["count"], 1.0),
            "learning_rate": applied_learning_rate(schedule, state.opt_state),
            "grad_norm": optax.tree.norm(grads),
            "skipped_updates": skipped_updates(opt_state),
        }
        return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

    return train_step


def _optimizer_config(train: ml_collections.ConfigDict, num_steps: int):
    t = ml_collections.ConfigDict(train.to_dict())
    t.num_steps = num_steps
    t.warmup_steps = int(round(train.warmup_fraction * num_steps))
    return t


# ------------------------------------------------------------------------------ the loop


def finetune(
    config: ml_collections.ConfigDict, workdir: str, parallel: Parallel | None = None
) -> FinetuneResult:
    jax.config.update("jax_threefry_partitionable", True)
    d, t = config.data, config.train
    spec = tasks.ReaderSpec.from_config(d.reader)
    labels = [x for x in d.label_list.split(",") if x] if d.label_list else []
    kind = make_kind(config.kind, labels, config.metrics)
    tokenizer_path = resolve_tokenizer(config)
    tokenizer = load_tokenizer(tokenizer_path)
    model_config = model_config_for(config, tokenizer.vocab_size)
    require(
        d.max_seq_length <= model_config.max_position_embeddings,
        "data.max_seq_length",
        d.max_seq_length,
        f"exceeds model.max_position_embeddings={model_config.max_position_embeddings}",
    )
    validate_finetune_train_config(config)
    is_chief = jax.process_index() == 0
    config_dict = write_run_config(config, workdir)
    tokenizer_ref = ckpt.keep_tokenizer(workdir, tokenizer_path)

    train_examples = read_split(spec, d.train_file, d.train_limit, "train")
    eval_examples = read_split(spec, d.eval_file, d.eval_limit, "eval")
    test_examples = read_split(spec, d.test_file, d.eval_limit, "test")
    start = time.perf_counter()
    train_f = kind.features(train_examples, tokenizer, d)
    eval_f = kind.features(eval_examples, tokenizer, d)
    test_f = kind.features(test_examples, tokenizer, d) if test_examples else None
    for name, f in (("train", train_f), ("eval", eval_f), ("test", test_f)):
        if f is not None and f.truncated:
            log.warning(
                "%s: %d examples longer than data.max_seq_length=%d were truncated",
                name,
                f.truncated,
                d.max_seq_length,
            )
    log.info(
        "features: %d train rows, %d eval rows (%.1fs)",
        len(train_f),
        len(eval_f),
        time.perf_counter() - start,
    )

    n_train = len(train_f)
    require(
        n_train >= t.batch_size,
        "train.batch_size",
        t.batch_size,
        f"is larger than the training set ({n_train} rows)",
    )
    packed_epochs = None
    if d.packing:
        require(
            config.kind in ("classification", "regression"),
            "data.packing",
            d.packing,
            f"is for [CLS] tasks (classification, regression), not {config.kind}",
        )
        require(d.max_pairs_per_row >= 1, "data.max_pairs_per_row", d.max_pairs_per_row, ">= 1")
        packed_epochs = PackedEpochs(
            train_f.arrays, t.batch_size, d.max_seq_length, d.max_pairs_per_row, t.seed
        )
        steps_per_epoch = len(packed_epochs.plan(0))
        num_steps = t.num_steps or packed_epochs.steps_for(t.num_epochs)
        log.info(
            "packing: %d examples in %d batches of %d rows (%.2f examples a row)",
            n_train,
            steps_per_epoch,
            t.batch_size,
            n_train / (steps_per_epoch * t.batch_size),
        )
    else:
        steps_per_epoch = n_train // t.batch_size
        num_steps = t.num_steps or int(math.ceil(t.num_epochs * steps_per_epoch))
    eval_every = config.eval.every_steps or steps_per_epoch
    dims = {**logical_dims(model_config), "classes": max(kind.num_labels, 2)}
    parallel = parallel or make_parallel(
        config.parallel, dims, t.batch_size, config.eval.batch_size, t.grad_accum_steps
    )
    log.info("parallel: %s", parallel.description)
    schedule, tx = make_optimizer(_optimizer_config(t, num_steps))
    model = kind.model(model_config)
    seq = d.max_seq_length

    freeze = bool(config.freeze_encoder)

    def init_fn(rng):
        z = jnp.zeros((1, seq), jnp.int32)
        params = nn.unbox(model.init(rng, z, jnp.ones_like(z), z)["params"])
        # Frozen: the optimizer state (moments, weight-decay masks) covers the head alone.
        opt_state = tx.init(trainable_params(params, freeze))
        return TrainState(step=jnp.asarray(0, jnp.int32), params=params, opt_state=opt_state)

    def boxed_specs():
        z = jnp.zeros((1, seq), jnp.int32)
        boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), z, jnp.ones_like(z), z))
        return nn.get_partition_spec(boxed["params"])

    logical_specs = boxed_specs()
    abstract = parallel.abstract_state(init_fn, logical_specs, jax.random.key(0))

    c = config.checkpoint
    main = f"eval/{config.main_metric}"
    best_mode = c.best_mode or metrics_lib.better_direction(main)
    checkpoints = ckpt.Checkpoints(
        ckpt.checkpoint_directory(workdir, c),
        keep=c.keep,
        best_metric=main,
        best_mode=best_mode,
        async_save=c.async_save,
    )
    rng = jax.random.key(t.seed)
    init_rng, dropout_rng = jax.random.split(rng)
    target = parallel.checkpoint_abstract(abstract)
    counts_of_params = count_params(target.params, freeze)
    log.info(
        "parameters: %d trained, %d frozen%s",
        counts_of_params.trained,
        counts_of_params.frozen,
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
    try:
        restored = checkpoints.restore_latest(target.params, target.opt_state)
    except ckpt.CheckpointMismatchError as e:
        if "optimizer-state" not in str(e):
            raise
        raise ckpt.CheckpointMismatchError(
            f"{e}\nOr config key freeze_encoder={freeze} differs from the run that wrote it "
            "(a frozen encoder has no optimizer state): use the same value."
        ) from None
    restored_groups: list[str] = []
    # What the run reports at its end comes back with a resume: the best evaluation so far
    # (its predictions are in best_eval_predictions.jsonl), the last one, the counters.
    best, last_eval, counts = {}, {}, NonfiniteCounts()
    if restored is not None:
        start_step = restored.step
        dropout_rng = ckpt.rng_from_json(restored.meta["rng"])
        state = _placed(parallel, abstract, restored)
        best = dict(restored.meta.get("best") or {})
        last_eval = dict(restored.meta.get("last_eval") or {})
        counts = NonfiniteCounts(*_nonfinite_counts(restored.opt_state))
        log.info(
            "resuming fine-tuning from %s (best %s so far: %s at step %s)",
            checkpoints.step_dir(start_step),
            main,
            best.get(main, "none"),
            best.get("step", "-"),
        )
    else:
        start_step = 0
        state = parallel.create_state(init_fn, logical_specs, parallel.put_replicated(init_rng))
        if config.init_from:
            state, restored_groups = restore_encoder(
                state, target.params, parallel, config.init_from, config.init_pooler
            )
        else:
            log.info("no init_from: every parameter is freshly initialised (the baseline)")
    dropout_rng_host = dropout_rng
    dropout_rng = parallel.put_replicated(dropout_rng)

    step_fn = parallel.train_step(
        make_finetune_step(
            model, kind, tx, schedule, parallel.axis_name, t.grad_accum_steps, freeze
        ),
        state,
    )

    def predict(params, batch):
        return kind.predict(apply_task_model(model, params, batch, deterministic=True))

    predict_fn = parallel.predict_step(predict, state)
    eval_bs = config.eval.batch_size
    eval_rows = parallel.local_rows(eval_bs)

    def run_predictions(params, features: Features) -> np.ndarray:
        arrays = padded(features.arrays, eval_bs)
        outs = []
        for i in range(0, len(arrays["input_ids"]), eval_bs):
            batch = {
                k: v[i : i + eval_bs][eval_rows.start : eval_rows.stop]
                for k, v in arrays.items()
                if k in ("input_ids", "input_mask", "segment_ids")
            }
            outs.append(np.asarray(predict_fn(params, batch)))
        return np.concatenate(outs)

    def evaluate(params, features: Features, prefix: str):
        predictions = run_predictions(params, features)
        kw = {"data": d} if config.kind == "qa" else {}
        scores, rows = kind.evaluate(predictions, features, labels, **kw)
        return {f"{prefix}/{k}": float(v) for k, v in scores.items()}, rows

    train_rows = parallel.local_rows(t.batch_size)

    def train_batch(step: int):
        if packed_epochs is not None:
            rows = packed_epochs.batch(step)
            return {k: v[train_rows.start : train_rows.stop] for k, v in rows.items()}
        epoch, i = divmod(step, steps_per_epoch)
        order = np.random.default_rng([t.seed, epoch]).permutation(n_train)
        idx = order[i * t.batch_size : (i + 1) * t.batch_size][train_rows.start : train_rows.stop]
        return {k: v[idx] for k, v in train_f.arrays.items()}

    writer = MetricWriter(workdir, enabled=is_chief, resume_step=start_step)
    progress = Progress(num_steps, first_step=start_step, enabled=is_chief)
    log.info(
        "fine-tuning %s: %d examples, %d steps (%.2f epochs of %d steps), batch %d",
        config.task,
        n_train,
        num_steps,
        num_steps / steps_per_epoch,
        steps_per_epoch,
        t.batch_size,
    )
    interval = []
    interval_start = time.perf_counter()
    train_time, trained_examples, interval_examples = 0.0, 0, 0
    preemption = PreemptionWatch()
    step = start_step
    best_file = os.path.join(workdir, "best_eval_predictions.jsonl")
    batches = None
    preempted = False
    # A finished run re-run does nothing; one preempted at its last step only writes
    # final_metrics.json, which it had not.
    finished_before = start_step >= num_steps and bool(read_final_metrics(workdir))
    if start_step >= num_steps:
        log.info(
            "the checkpoint is at step %d, the run has %d steps: already finished, nothing to "
            "train (%s)",
            start_step,
            num_steps,
            "final_metrics.json is left as it is"
            if finished_before
            else "writing final_metrics.json, which its preempted last step had not",
        )
    try:
        pending = None

        def device_batch(step):
            # Built and copied to the devices on the prefetch thread, ahead of its step. Packed
            # rows hold a variable number of examples: count them (all processes).
            host = train_batch(step)
            examples = (
                np.count_nonzero(host["weight"]) * jax.process_count()
                if packed_epochs is not None
                else t.batch_size
            )
            return parallel.put_batch(host), examples

        batches = prefetch(device_batch, range(start_step, num_steps), 4)
        for step0, (batch, examples) in batches:
            step = step0 + 1
            t0 = time.perf_counter()
            state, metrics = step_fn(state, batch, dropout_rng)
            interval_examples += examples
            if pending is not None:
                _finish(pending, parallel, t, interval, counts)
            pending = (step, metrics)
            at_eval = step == num_steps or step % eval_every == 0
            preempted = preemption.reached(step)
            if at_eval or preempted or step % t.log_every == 0:
                _finish(pending, parallel, t, interval, counts)
                pending = None
                jax.block_until_ready(state.step)
            if step > start_step + 1:  # the first step compiles
                train_time += time.perf_counter() - t0
                trained_examples += examples
            if interval and (step % t.log_every == 0 or at_eval):
                now = time.perf_counter()
                mean = {k: float(np.mean([m[k] for m in interval])) for k in interval[0]}
                mean["examples_per_sec"] = interval_examples / (now - interval_start)
                interval_examples = 0
                writer.write(step, mean)
                progress.log(step, mean, keys=("loss",))
                interval.clear()
                interval_start = now
            if at_eval:
                eval_start = time.perf_counter()
                last_eval, rows = evaluate(state.params, eval_f, "eval")
                if main not in last_eval:
                    raise ConfigError(
                        f"config key main_metric={config.main_metric!r} is not among the "
                        f"metrics this task reports ({', '.join(k[5:] for k in last_eval)})"
                    )
                writer.write(step, last_eval)
                improved = not best or _better(last_eval[main], best[main], best_mode)
                if improved:
                    best = {**last_eval, "step": step}
                if is_chief:
                    log.info(
                        "eval at step %d (epoch %.2f): %s",
                        step,
                        step / steps_per_epoch,
                        ", ".join(f"{k[5:]} {v:.4f}" for k, v in last_eval.items()),
                    )
                    _write_jsonl(os.path.join(workdir, "eval_predictions.jsonl"), rows)
                    if improved:
                        _write_jsonl(best_file, rows)
                interval_start += time.perf_counter() - eval_start
            if at_eval or preempted:
                view = parallel.to_checkpoint(state)
                meta = {
                    "format": ckpt.FORMAT_VERSION,
                    "step": step,
                    "rng": ckpt.rng_to_json(dropout_rng_host),
                    "data": {"position": step, "seed": t.seed, "global_batch": t.batch_size},
                    "config": config_dict,
                    "tokenizer": tokenizer_ref,
                    "model": dataclasses.asdict(model_config),
                    "task": config.task,
                    "labels": labels,
                    "best": best,  # so that a resumed run still knows its best evaluation
                    "last_eval": last_eval,
                    "skipped_updates": counts.skipped,
                }
                checkpoints.save(
                    step, view.params, view.opt_state, meta, last_eval if at_eval else None
                )
            if preempted:
                log.warning("SIGTERM received: saved step %d; stopping", step)
                break
        if pending is not None:
            _finish(pending, parallel, t, interval, counts)
        checkpoints.wait()
        best_step = checkpoints.best_step() or step
        test_metrics = {}
        if test_f is not None:
            params = state.params
            if best_step != step:
                params = _load_params(parallel, target.params, checkpoints.step_dir(best_step))
            test_metrics, test_rows = evaluate(params, test_f, "test")
            writer.write(step, test_metrics)
            if is_chief:
                _write_jsonl(os.path.join(workdir, "test_predictions.jsonl"), test_rows)
                with open(os.path.join(workdir, "test_metrics.json"), "w") as f:
                    json.dump({"best_step": best_step, **test_metrics}, f, indent=2)
                log.info("test (best checkpoint, step %d): %s", best_step, test_metrics)
    finally:
        if batches is not None:
            batches.close()  # stops the prefetch thread before anything else closes
        preemption.close()
        writer.close()
        checkpoints.close()
    wall = time.perf_counter() - start
    speed = trained_examples / train_time if train_time else 0.0
    # Written when the run ends (not when preempted, nor when it had finished before).
    if is_chief and not preempted and not finished_before:
        with open(os.path.join(workdir, "final_metrics.json"), "w") as f:
            json.dump(
                {
                    "step": step,
                    "num_steps": num_steps,
                    **last_eval,
                    "best": best,
                    "skipped_updates": counts.skipped,
                    "train_examples_per_sec": speed,
                    "wall_time_s": wall,
                },
                f,
                indent=2,
            )
        log.info(
            "done: %d steps; best %s %.4f at step %s",
            step,
            main,
            best.get(main, float("nan")),
            best.get("step"),
        )
    return FinetuneResult(
        eval_metrics=last_eval,
        best_metrics=best,
        best_step=best.get("step", step),
        test_metrics=test_metrics,
        final_step=step,
        wall_time=wall,
        train_examples_per_sec=speed,
        restored_groups=restored_groups,
        state=parallel.unreplicate(state),
    )


def validate_finetune_train_config(config: ml_collections.ConfigDict) -> None:
    """The train.* and checkpoint.* keys the loop reads, checked before any work starts."""
    validate_loop_config(config.train)
    mode = config.checkpoint.best_mode
    require(
        mode in ("", "max", "min"),
        "checkpoint.best_mode",
        mode,
        "choose max, min, or '' (from main_metric: min for a loss or error, else max)",
    )


@dataclasses.dataclass
class NonfiniteCounts:
    """Updates skipped for a non-finite gradient: in all, and the last ones in a row."""

    skipped: int = 0
    in_a_row: int = 0


def _better(value: float, best: float, mode: str) -> bool:
    return value < best if mode == "min" else value > best


def _finish(pending, parallel, t, interval, counts: NonfiniteCounts):
    step, device_metrics = pending
    metrics = parallel.fetch(device_metrics)
    counts.skipped = int(metrics["skipped_updates"])
    problem = _nonfinite_message(step, metrics)
    counts.in_a_row = counts.in_a_row + 1 if problem else 0
    if problem:
        if t.nonfinite == "stop":
            raise FloatingPointError(
                f"{problem}; the update was not applied. Lower train.learning_rate or set "
                "train.nonfinite=skip"
            )
        log.warning("%s: update skipped (%d so far)", problem, counts.skipped)
        check_consecutive_nonfinite(problem, counts.in_a_row, t.max_consecutive_nonfinite)
        return
    interval.append(metrics)


def _write_jsonl(path: str, rows: list[dict]) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def _placed(parallel, abstract, restored):
    target = parallel.checkpoint_abstract(abstract)
    step = jax.make_array_from_process_local_data(
        target.step.sharding, np.asarray(restored.step, np.int32)
    )
    return parallel.from_checkpoint(
        TrainState(step=step, params=restored.params, opt_state=restored.opt_state)
    )


def _load_params(parallel, target_params, step_dir: str):
    restored = ckpt.restore_params(step_dir, dict(target_params), step_dir=step_dir)
    return parallel.from_checkpoint(restored)


def restore_encoder(state, target_params, parallel, init_from: str, init_pooler: bool):
    """Puts the checkpoint's encoder (`bert`: embeddings and layers, the pooler if asked and
    present in both) into a freshly initialised state; logs what came from where."""
    encoder = dict(target_params["bert"])
    if not init_pooler:
        encoder.pop("pooler", None)
    step_dir, _ = ckpt.read_meta(init_from)
    saved = ckpt.saved_param_groups(step_dir)
    if "pooler" in encoder and "pooler" not in saved.get("bert", []):
        encoder.pop("pooler")
    restored = ckpt.restore_params(init_from, {"bert": encoder}, step_dir=step_dir)
    placed = parallel.from_checkpoint(restored)["bert"]
    params = dict(state.params)
    params["bert"] = {**params["bert"], **placed}
    restored_names = [f"bert/{k}" for k in sorted(placed)]
    new = sorted(
        [k for k in params if k != "bert"]
        + [f"bert/{k}" for k in params["bert"] if k not in placed]
    )
    dropped = sorted(
        [k for k in saved if k != "bert"]
        + [f"bert/{k}" for k in saved.get("bert", []) if k not in placed]
    )
    log.info(
        "restored from %s: %s; freshly initialised: %s; not used from the checkpoint: %s",
        step_dir,
        ", ".join(_compact(restored_names)),
        ", ".join(new) or "nothing",
        ", ".join(dropped) or "nothing",
    )
    return state.replace(params=params), restored_names


def _compact(names: list[str]) -> list[str]:
    """bert/layer_0 ... bert/layer_11 -> bert/layer_0..11."""
    layers = sorted(int(n.rsplit("_", 1)[1]) for n in names if n.startswith("bert/layer_"))
    rest = [n for n in names if not n.startswith("bert/layer_")]
    if layers:
        rest.append(f"bert/layer_{layers[0]}..{layers[-1]}")
    return rest
