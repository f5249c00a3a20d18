"""Pre-training: `pretrain(config, workdir)`, the entry point of `flaxbert pretrain`.

It checks the config, reads (or tokenizes and prepares) the corpus, builds the model, the
optimizer and the sharded state (`setup_training`), and hands the pre-training task to the
shared loop (`flaxbert.loop.train_loop`): batches of NSP pairs with MLM masks that are a pure
function of (seed, step) (`flaxbert.data.pretraining`), the pure step of
`flaxbert.pretrain_step`, held-out MLM/NSP evaluation, and checkpoints whose metadata record
the data position. Re-running the command on the same workdir resumes it.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import os
from collections.abc import Collection
from typing import Any

import jax
import ml_collections
import numpy as np
import optax

from flaxbert import checkpoint as ckpt
from flaxbert.config import ConfigError, require
from flaxbert.continued import (
    check_corpus_tokenizer,
    continued_config,
    restore_pretraining_params,
)
from flaxbert.data.instances import InstanceConfig
from flaxbert.data.packing import packed_predictions
from flaxbert.data.pretraining import PretrainingBatches
from flaxbert.data.sources import expected_vocab_size, load_corpus
from flaxbert.loop import (
    Cadence,
    LoopResult,
    initial_state,
    placed_state,
    train_loop,
    validate_loop_config,
)
from flaxbert.model_config import BertConfig
from flaxbert.optim import TrainState, make_optimizer
from flaxbert.pretrain_step import (
    batch_shapes,
    create_train_state,
    evaluate,
    logical_dims,
    logical_param_specs,
    make_eval_step,
    make_train_step,
)
from flaxbert.pretraining_model import BertForPreTraining
from flaxbert.run_files import (
    finished_checkpoint,
    log_already_finished,
    read_final_metrics,
    with_model,
    write_run_config,
)
from flaxbert.sharding import Parallel, make_parallel

log = logging.getLogger("flaxbert")


@dataclasses.dataclass
class TrainingSetup:
    """Everything the loop (and the memory preflight) compiles, built from one config."""

    model: BertForPreTraining
    schedule: optax.Schedule
    tx: optax.GradientTransformation
    parallel: Parallel
    init_fn: Any  # rng -> TrainState
    logical_specs: Any  # the parameters' logical axis names
    train_step_fn: Any  # the pure step, before compilation
    eval_step_fn: Any
    seq_len: int
    num_predictions: int  # masked-LM slots of a training row (packed rows have more)
    max_pairs: int = 0  # pairs per packed row (data.packing), 0 when rows are not packed

    def train_batch_shapes(self, batch_size: int):
        return batch_shapes(batch_size, self.seq_len, self.num_predictions, self.max_pairs)

    def create_state(self, rng) -> TrainState:
        return self.parallel.create_state(
            self.init_fn, self.logical_specs, self.parallel.put_replicated(rng)
        )

    def abstract_state(self) -> TrainState:
        return self.parallel.abstract_state(self.init_fn, self.logical_specs, jax.random.key(0))

    def compile_train_step(self, state):
        return self.parallel.train_step(self.train_step_fn, state)

    def compile_eval_step(self, state):
        return self.parallel.eval_step(self.eval_step_fn, state)


def parallel_from_config(config: ml_collections.ConfigDict, model_config: BertConfig) -> Parallel:
    """The strategy `config.parallel` names, checked against the model and the batch sizes."""
    return make_parallel(
        config.parallel,
        logical_dims(model_config),
        config.train.batch_size,
        config.eval.batch_size,
        config.train.grad_accum_steps,
    )


def setup_training(
    config: ml_collections.ConfigDict, model_config: BertConfig, parallel: Parallel | None = None
) -> TrainingSetup:
    t, d = config.train, config.data
    parallel = parallel or parallel_from_config(config, model_config)
    model = BertForPreTraining(model_config)
    schedule, tx = make_optimizer(t)
    seq, pred = d.max_seq_length, d.max_predictions_per_seq
    max_pairs = d.max_pairs_per_row if d.packing else 0
    return TrainingSetup(
        model=model,
        schedule=schedule,
        tx=tx,
        parallel=parallel,
        init_fn=functools.partial(create_train_state, model, tx, seq_len=seq, num_predictions=pred),
        logical_specs=logical_param_specs(model, seq, pred),
        train_step_fn=make_train_step(
            model,
            tx,
            schedule,
            t.grad_accum_steps,
            axis_name=parallel.axis_name,
            nsp_weight=t.nsp_weight,
        ),
        eval_step_fn=make_eval_step(model),
        seq_len=seq,
        num_predictions=(
            packed_predictions(instance_config(d, model_config.vocab_size), max_pairs)
            if max_pairs
            else pred
        ),
        max_pairs=max_pairs,
    )


def validate_pretrain_config(config: ml_collections.ConfigDict) -> BertConfig:
    """Checks everything that can be checked before work starts; returns the model config."""
    try:
        model_config = BertConfig.from_dict(config.model)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    t, d = config.train, config.data
    require(t.num_steps > 0, "train.num_steps", t.num_steps, "must be positive")
    validate_loop_config(t)
    require(
        config.eval.every_steps >= 0,
        "eval.every_steps",
        config.eval.every_steps,
        "must be >= 0 (0 = evaluate only at the end)",
    )
    require(
        d.max_seq_length <= model_config.max_position_embeddings,
        "data.max_seq_length",
        d.max_seq_length,
        f"exceeds model.max_position_embeddings={model_config.max_position_embeddings}",
    )
    require(
        d.max_predictions_per_seq <= d.max_seq_length,
        "data.max_predictions_per_seq",
        d.max_predictions_per_seq,
        "cannot exceed data.max_seq_length",
    )
    if d.packing:
        require(
            d.max_pairs_per_row >= 1, "data.max_pairs_per_row", d.max_pairs_per_row, "must be >= 1"
        )
        require(
            d.masking == "dynamic",
            "data.masking",
            d.masking,
            "data.packing needs dynamic masking (static masking fixes each instance's length)",
        )
    require(
        d.masking in ("dynamic", "static"), "data.masking", d.masking, "choose dynamic or static"
    )
    require(t.nsp_weight >= 0, "train.nsp_weight", t.nsp_weight, "must be >= 0 (0 = MLM only)")
    wanted = math.ceil(d.masked_lm_prob * d.max_seq_length)
    if d.max_predictions_per_seq < wanted:
        log.warning(
            "data.max_predictions_per_seq=%d caps the masked positions below data.masked_lm_prob"
            "=%g x data.max_seq_length=%d (%d): long pairs get fewer predictions than the rate "
            "asks; raise data.max_predictions_per_seq to %d to mask at the full rate",
            d.max_predictions_per_seq,
            d.masked_lm_prob,
            d.max_seq_length,
            wanted,
            wanted,
        )
    validate_checkpoint_config(config.checkpoint, config.eval.every_steps)
    make_optimizer(t)  # names a bad optimizer or schedule now rather than later
    return model_config


def validate_checkpoint_config(c: ml_collections.ConfigDict, eval_every: int) -> None:
    require(
        c.every_steps >= 0,
        "checkpoint.every_steps",
        c.every_steps,
        "must be >= 0 (0 = at the end only)",
    )
    require(c.keep >= 1, "checkpoint.keep", c.keep, "must be >= 1")
    require(c.best_mode in ("max", "min"), "checkpoint.best_mode", c.best_mode, "choose max or min")
    if c.best_metric:
        names = [
            f"eval/{k}" for k in ("loss", "mlm_loss", "mlm_accuracy", "nsp_loss", "nsp_accuracy")
        ]
        require(
            c.best_metric in names,
            "checkpoint.best_metric",
            c.best_metric,
            f"choose one of {', '.join(names)} (or '' to keep only the latest)",
        )
        require(
            eval_every > 0 and c.every_steps > 0 and c.every_steps % eval_every == 0,
            "checkpoint.every_steps",
            c.every_steps,
            f"must be a positive multiple of eval.every_steps={eval_every} when "
            "checkpoint.best_metric is set, so that every checkpoint has a score",
        )


def instance_config(data: ml_collections.ConfigDict, vocab_size: int) -> InstanceConfig:
    try:
        return InstanceConfig(
            max_seq_length=data.max_seq_length,
            max_predictions_per_seq=data.max_predictions_per_seq,
            masked_lm_prob=data.masked_lm_prob,
            short_seq_prob=data.short_seq_prob,
            random_next_prob=data.random_next_prob,
            mask_token_prob=data.mask_token_prob,
            random_token_prob=data.random_token_prob,
            vocab_size=vocab_size,
        )
    except ValueError as e:
        raise ConfigError(str(e)) from None


def check_vocab(corpus, model_config: BertConfig) -> None:
    """The model's vocabulary must cover the data's (match a tokenizer's exactly)."""
    if corpus.exact_vocab:
        require(
            corpus.vocab_size == model_config.vocab_size,
            "model.vocab_size",
            model_config.vocab_size,
            f"does not match the tokenizer {corpus.tokenizer_path} ({corpus.vocab_size} "
            f"pieces); leave --config.model.vocab_size out to follow the tokenizer, or set it "
            f"to {corpus.vocab_size}",
        )
    else:
        require(
            corpus.vocab_size <= model_config.vocab_size,
            "model.vocab_size",
            model_config.vocab_size,
            f"is smaller than the data's vocabulary ({corpus.vocab_size})",
        )


def make_train_batches(config: ml_collections.ConfigDict, corpus, parallel: Parallel):
    """The training loader: this process builds only the rows of the global batch that its
    devices hold. A batch is a function of (seed, step), so the loader's position is the step."""
    d, t = config.data, config.train
    loader_index, loader_count = parallel.local_rows(t.batch_size).loader_shard
    return PretrainingBatches(
        corpus.train,
        instance_config(d, corpus.vocab_size),
        t.batch_size,
        seed=t.seed,
        process_index=loader_index,
        process_count=loader_count,
        masking=d.masking,
        dupe_factor=d.dupe_factor,
        packing=d.packing,
        max_pairs_per_row=d.max_pairs_per_row,
        word_start=corpus.word_start,
        whole_word_masking=d.whole_word_masking,
        split="training split",
    )


def state_from_checkpoint(setup: TrainingSetup, restored: ckpt.Restored) -> TrainState:
    """A restored checkpoint -> the TrainState as `setup.parallel` places it."""
    return placed_state(setup.parallel, setup.abstract_state(), restored)


@dataclasses.dataclass
class PretrainResult:
    state: TrainState | None
    train_metrics: dict[str, float]  # means over the last logging interval
    eval_metrics: dict[str, float]  # the last evaluation, keys prefixed with eval/
    wall_time: float
    start_step: int = 0  # the checkpoint step it resumed from (0: a fresh start)
    final_step: int = 0
    preempted: bool = False  # stopped by SIGTERM after saving `final_step`
    skipped_updates: int = 0
    already_finished: bool = False  # a re-run of a finished run: nothing done, `state` None


class Pretraining:
    """The pre-training task of the shared loop (`flaxbert.loop.Task`): batches of the
    corpus, held-out MLM/NSP evaluation, the data position in checkpoint metadata."""

    progress_keys = None  # the progress line's default set

    def __init__(self, config, model_config, corpus, setup, state, run_config, tokenizer_ref):
        d, t = config.data, config.train
        self.config, self.model_config, self.corpus = config, model_config, corpus
        self.setup, self.parallel, self.run_config = setup, setup.parallel, run_config
        self.train_batches = make_train_batches(config, corpus, self.parallel)
        self.eval_batches = _eval_batches(config, corpus, self.parallel)
        self.eval_step = setup.compile_eval_step(state)
        self.tokenizer_ref = tokenizer_ref  # what checkpoint meta names as the tokenizer
        self.tokens_per_batch = t.batch_size * d.max_seq_length

    def device_batch(self, step0: int):
        # The global count of real tokens: this process's rows, times the processes.
        host = self.train_batches.batch(step0)
        real_tokens = np.count_nonzero(host["input_mask"]) * jax.process_count()
        return self.parallel.put_batch(host), real_tokens

    def evaluate(self, state, step: int) -> dict[str, float]:
        metrics = evaluate(self.eval_step, state.params, self.eval_batches)
        if jax.process_index() == 0:
            shown = ", ".join(f"{k[5:]} {v:.4f}" for k, v in metrics.items())
            log.info("eval at step %d: %s", step, shown)
        return metrics

    def checkpoint_meta(self, step: int) -> dict:
        d, t = self.config.data, self.config.train
        return {
            "data": {
                "position": step,  # batches consumed: the next one is batch(step)
                "seed": t.seed,
                "global_batch": t.batch_size,
                "masking": d.masking,
                "corpus": d.corpus,
            },
            "config": self.run_config,
            "tokenizer": self.tokenizer_ref,
            "model": dataclasses.asdict(self.model_config),
            "parallel": self.parallel.description,
        }

    def throughput(self, steps: int, seconds: float, count: int) -> dict[str, float]:
        batch = self.config.train.batch_size
        return {
            "seq_per_sec": steps * batch / seconds,
            "tokens_per_sec": steps * self.tokens_per_batch / seconds,
            "real_tokens_per_sec": count / seconds,  # non-padding tokens (what packing raises)
        }

    def final_record(self, result: LoopResult, write) -> dict:
        return {**result.eval_metrics, "skipped_updates": result.skipped_updates}


def _eval_batches(config, corpus, parallel) -> list[dict]:
    """The held-out batches, built once (a fixed seed, unpacked rows), this process's rows."""
    d = config.data
    source = PretrainingBatches(
        corpus.eval,
        instance_config(d, corpus.vocab_size),
        config.eval.batch_size,
        seed=config.train.seed + 1,
        split="held-out split",
        word_start=corpus.word_start,
        whole_word_masking=d.whole_word_masking,
    )
    rows = parallel.local_rows(config.eval.batch_size)
    return [
        {k: v[rows.start : rows.stop] for k, v in source.batch(i).items()}
        for i in range(config.eval.num_batches)
    ]


def pretrain(
    config: ml_collections.ConfigDict,
    workdir: str,
    parallel: Parallel | None = None,
    explicit: Collection[str] = (),
) -> PretrainResult:
    """Pre-trains as `config` says, writing everything into `workdir`; continues from the
    latest complete checkpoint in `workdir` when there is one, and does nothing (reading no
    data) when that checkpoint is at train.num_steps and final_metrics.json was written.
    With `config.init_from` a fresh run starts from that checkpoint (`flaxbert.continued`).

    `model.vocab_size` follows the data's tokenizer unless `explicit` (the config keys named
    on the command line) holds it. `parallel` (a `flaxbert.sharding` strategy) overrides the
    one `config.parallel` names.
    Raises ConfigError (a bad key, before any work), FloatingPointError (train.nonfinite)."""
    # Random bits independent of the sharding: the same dropout masks on any mesh.
    jax.config.update("jax_threefry_partitionable", True)
    config, model_config = planned_model(config, workdir, explicit)
    t, c = config.train, config.checkpoint
    done = finished_checkpoint(workdir, c, t.num_steps)
    if done is not None:
        return _already_finished(workdir, done, t.num_steps)
    follow = "model.vocab_size" not in explicit
    # A bad mesh or batch split stops the run before the data are read.
    chosen = parallel or parallel_from_config(config, model_config)
    corpus = load_corpus(config.data, workdir)
    if config.get("init_from"):
        check_corpus_tokenizer(config.data.tokenizer, corpus.tokenizer_path)
    if follow and corpus.exact_vocab and corpus.vocab_size != model_config.vocab_size:
        model_config = _with_vocab(model_config, corpus.vocab_size)
        chosen = parallel or parallel_from_config(config, model_config)
    check_vocab(corpus, model_config)
    config = with_model(config, model_config)
    run_config = write_run_config(config, workdir)
    log.info("data: %s", corpus.description)
    tokenizer_ref = ckpt.keep_tokenizer(workdir, corpus.tokenizer_path)
    setup = setup_training(config, model_config, chosen)
    log.info("parallel: %s", setup.parallel.description)
    checkpoints = ckpt.Checkpoints(
        ckpt.checkpoint_directory(workdir, c),
        keep=c.keep,
        best_metric=c.best_metric,
        best_mode=c.best_mode,
        async_save=c.async_save,
    )
    start = initial_state(
        checkpoints,
        setup.parallel,
        setup.abstract_state(),
        t.seed,
        _fresh_state(setup, config.get("init_from", "")),
        run_config,
        t.num_steps,
    )
    _log_model(setup, model_config)
    task = Pretraining(config, model_config, corpus, setup, start.state, run_config, tokenizer_ref)
    cadence = Cadence(
        num_steps=t.num_steps,
        log_every=t.log_every,
        eval_every=config.eval.every_steps,
        save_every=c.every_steps,
        nonfinite=t.nonfinite,
        max_consecutive_nonfinite=t.max_consecutive_nonfinite,
        prefetch=config.data.prefetch,
    )
    step_fn = setup.compile_train_step(start.state)
    result = train_loop(
        task,
        cadence,
        start,
        step_fn=step_fn,
        parallel=setup.parallel,
        checkpoints=checkpoints,
        workdir=workdir,
    )
    if jax.process_index() == 0 and not result.preempted:
        log.info(
            "done: %d steps in %.1fs; final eval MLM accuracy %.4f, NSP accuracy %.4f",
            result.final_step - result.start_step,
            result.wall_time,
            result.eval_metrics["eval/mlm_accuracy"],
            result.eval_metrics["eval/nsp_accuracy"],
        )
    return PretrainResult(
        state=setup.parallel.unreplicate(result.state),
        train_metrics=result.train_metrics,
        eval_metrics=result.eval_metrics,
        wall_time=result.wall_time,
        start_step=result.start_step,
        final_step=result.final_step,
        preempted=result.preempted,
        skipped_updates=result.skipped_updates,
    )


def planned_model(
    config: ml_collections.ConfigDict, workdir: str, explicit: Collection[str] = ()
) -> tuple[ml_collections.ConfigDict, BertConfig]:
    """(config, model) of a pre-training run on `workdir`, as far as they are known before
    any data is read: with `init_from`, the checkpoint's structure and tokenizer
    (`flaxbert.continued.continued_config`); `model.vocab_size` the data's tokenizer's unless
    `explicit` (the keys named on the command line) holds it. `pretrain` checks the vocabulary
    again once the corpus is loaded. Raises ConfigError naming a key that does not fit."""
    if config.get("init_from"):
        own = ckpt.checkpoint_directory(workdir, config.checkpoint)
        config = continued_config(config, explicit, own if os.path.isdir(own) else "")
    model_config = validate_pretrain_config(config)
    if "model.vocab_size" not in explicit:
        model_config = _with_vocab(model_config, expected_vocab_size(config.data, workdir))
    return config, model_config


def _fresh_state(setup: TrainingSetup, init_from: str):
    """rng -> the state a new run starts from: fresh, or filled from `init_from`."""
    if not init_from:
        return setup.create_state

    def fresh(rng):
        target = setup.parallel.checkpoint_abstract(setup.abstract_state()).params
        state = setup.create_state(rng)
        return restore_pretraining_params(state, target, setup.parallel, init_from)

    return fresh


def _with_vocab(model_config: BertConfig, vocab_size: int | None) -> BertConfig:
    if not vocab_size or vocab_size == model_config.vocab_size:
        return model_config
    log.info(
        "model.vocab_size=%d: the tokenizer's size (the config had %d; name "
        "--config.model.vocab_size to fix it)",
        vocab_size,
        model_config.vocab_size,
    )
    return dataclasses.replace(model_config, vocab_size=vocab_size)


def _log_model(setup: TrainingSetup, model_config: BertConfig) -> None:
    shapes = jax.eval_shape(setup.init_fn, jax.random.key(0)).params
    log.info(
        "model: %d layers, hidden %d, %d heads, %.2fM parameters",
        model_config.num_layers,
        model_config.hidden_size,
        model_config.num_heads,
        sum(x.size for x in jax.tree.leaves(shapes)) / 1e6,
    )


def _already_finished(workdir: str, step_dir: str, num_steps: int) -> PretrainResult:
    """A re-run of a finished pre-training: nothing is read, trained, evaluated or written."""
    step = log_already_finished(step_dir, num_steps, "train.num_steps")
    final = read_final_metrics(workdir)
    return PretrainResult(
        state=None,
        train_metrics={},
        eval_metrics={k: v for k, v in final.items() if k.startswith("eval/")},
        wall_time=0.0,
        start_step=step,
        final_step=step,
        skipped_updates=int(final.get("skipped_updates", 0)),
        already_finished=True,
    )
