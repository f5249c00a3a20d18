"""TrainState, optimizer, the pure pre-training train/eval steps, and the pre-training loop.

`train_step(state, batch, rng) -> (state, metrics)` is one pure function; the loop compiles
it through the strategy `config.parallel` names (`flaxbert.sharding`: `jax.jit` over a
data/fsdp/tensor mesh, or `jax.pmap`) and donates the state. Dropout randomness is
`fold_in(rng, step)` inside the step, so the same (seed, step) always draws the same masks.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
import signal
import threading
import time
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from flaxbert import checkpoint as ckpt
from flaxbert.config import ConfigError, require
from flaxbert.data.pretraining import (
    InstanceConfig,
    PretrainingBatches,
    packed_predictions,
    prefetch,
)
from flaxbert.data.sources import load_corpus
from flaxbert.model import BertConfig, BertForPreTraining
from flaxbert.monitor import MetricWriter, Progress
from flaxbert.sharding import Parallel, make_parallel

log = logging.getLogger("flaxbert")


# What every train step reports; the loop adds seq_per_sec and tokens_per_sec.
STEP_METRICS = (
    "loss",
    "mlm_loss",
    "mlm_accuracy",
    "nsp_loss",
    "nsp_accuracy",
    "learning_rate",
    "grad_norm",
    "param_norm",
    "skipped_updates",  # running total of updates dropped for a non-finite gradient
)


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    opt_state: Any


# ---------------------------------------------------------------------------- optimizer


def make_schedule(train: ml_collections.ConfigDict) -> optax.Schedule:
    """Linear warm-up to `learning_rate`, then linear/polynomial decay or a constant."""
    lr, warmup = train.learning_rate, train.warmup_steps
    decay_steps = max(train.num_steps - warmup, 1)
    if train.lr_decay == "constant":
        decay = optax.constant_schedule(lr)
    elif train.lr_decay in ("linear", "polynomial"):
        power = 1.0 if train.lr_decay == "linear" else train.lr_decay_power
        decay = optax.polynomial_schedule(lr, train.end_learning_rate, power, decay_steps)
    else:
        raise ConfigError(
            f"config key train.lr_decay={train.lr_decay!r}: choose linear, polynomial or constant"
        )
    if warmup <= 0:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), decay], [warmup])


def decay_mask(params):
    """True where weight decay applies: not on LayerNorm scales nor on any bias."""

    def decays(path, _):
        name = path[-1].key
        return not (name == "scale" or name.endswith("bias"))

    return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(train: ml_collections.ConfigDict):
    """Returns (schedule, optax transformation) for AdamW or LAMB with global-norm clipping."""
    schedule = make_schedule(train)
    kw = dict(
        b1=train.adam_b1,
        b2=train.adam_b2,
        eps=train.adam_eps,
        weight_decay=train.weight_decay,
        mask=decay_mask,
    )
    if train.optimizer == "adamw":
        opt = optax.adamw(schedule, **kw)
    elif train.optimizer == "lamb":
        opt = optax.lamb(schedule, **kw)
    else:
        raise ConfigError(f"config key train.optimizer={train.optimizer!r}: choose adamw or lamb")
    if train.max_grad_norm > 0:
        opt = optax.chain(optax.clip_by_global_norm(train.max_grad_norm), opt)
    # A non-finite gradient never reaches the parameters or the moments: the update is dropped
    # and counted (`total_notfinite`); the loop then stops or goes on (`train.nonfinite`).
    return schedule, optax.apply_if_finite(opt, max_consecutive_errors=_NEVER_GIVE_UP)


_NEVER_GIVE_UP = 2**30  # the loop, not optax, decides when too many updates were skipped


def skipped_updates(opt_state) -> jax.Array:
    """Updates dropped so far for a non-finite gradient (optax.apply_if_finite's count)."""
    return opt_state.total_notfinite


def nonfinite_in_a_row(opt_state) -> jax.Array:
    """Non-finite updates dropped in a row up to now (0 after a finite one); kept in the
    optimizer state, so `train.max_consecutive_nonfinite` counts across a resume."""
    return opt_state.notfinite_count


def applied_updates(opt_state) -> jax.Array:
    """Updates applied so far: the count the learning-rate schedule reads (int32 scalar).

    The schedule follows applied updates, not steps: `optax.apply_if_finite` leaves its inner
    optimizer (and so this count) untouched on a skipped step, so the update after a skip
    uses the learning rate the skipped one would have had. `learning_rate` in the step
    metrics is `schedule(applied_updates(opt_state))` read before the update: the one applied.
    """
    is_schedule = lambda x: isinstance(x, optax.ScaleByScheduleState)  # noqa: E731
    found = [s for s in jax.tree.leaves(opt_state, is_leaf=is_schedule) if is_schedule(s)]
    if len(found) != 1:
        raise ValueError(
            f"expected one learning-rate schedule state in the optimizer, found {len(found)}"
        )
    return found[0].count


def applied_learning_rate(schedule: optax.Schedule, opt_state) -> jax.Array:
    """The learning rate the next update of `opt_state` applies (see `applied_updates`)."""
    return schedule(applied_updates(opt_state))


def accumulated_gradients(grad_fn, params, batch, rng, grad_accum_steps: int):
    """Sums `grad_fn(params, micro_batch, micro_rng) -> (grads, sums)` over `grad_accum_steps`
    micro-batches of `batch` (every leaf (B, ...), B divisible by the count). With losses
    normalised by whole-batch denominators the sum is the whole batch's gradient.

    Micro-batch i takes rows i, i+k, i+2k, ...: each is spread over the whole batch axis, so
    under data parallelism every device keeps working on every micro-batch."""
    k = grad_accum_steps
    if k == 1:
        return grad_fn(params, batch, rng)
    micro_batches = jax.tree.map(
        lambda x: x.reshape(x.shape[0] // k, k, *x.shape[1:]).swapaxes(0, 1), batch
    )

    def accumulate(carry, inputs):
        i, micro = inputs
        out = grad_fn(params, micro, jax.random.fold_in(rng, i))
        return jax.tree.map(jnp.add, carry, out), None

    first = jax.tree.map(lambda x: x[0], micro_batches)
    shapes = jax.eval_shape(grad_fn, params, first, rng)
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
    out, _ = jax.lax.scan(accumulate, zeros, (jnp.arange(k), micro_batches))
    return out


# ------------------------------------------------------------------------------ model


def dummy_batch(batch_size: int, seq_len: int, num_predictions: int) -> dict[str, jax.Array]:
    return {
        "input_ids": jnp.zeros((batch_size, seq_len), jnp.int32),
        "input_mask": jnp.ones((batch_size, seq_len), jnp.int32),
        "segment_ids": jnp.zeros((batch_size, seq_len), jnp.int32),
        "masked_lm_positions": jnp.zeros((batch_size, num_predictions), jnp.int32),
    }


def init_params(model: BertForPreTraining, rng: jax.Array, seq_len: int, num_predictions: int):
    """Plain (unboxed) float parameters; the logical axis names are read with `param_specs`."""
    batch = dummy_batch(1, seq_len, num_predictions)
    variables = model.init(rng, **batch)
    return nn.unbox(variables["params"])


def apply_model(model, params, batch, deterministic: bool, rng=None):
    return model.apply(
        {"params": params},
        batch["input_ids"],
        batch["input_mask"],
        batch["segment_ids"],
        batch["masked_lm_positions"],
        batch.get("position_ids"),
        deterministic=deterministic,
        cls_positions=batch.get("cls_positions"),  # packed rows only
        rngs=None if deterministic else {"dropout": rng},
    )


def nsp_weights(batch) -> jax.Array:
    """1 per real sentence pair: every row unpacked; packed rows say which slots hold one."""
    if "next_sentence_weights" in batch:
        return batch["next_sentence_weights"].astype(jnp.float32)
    return jnp.ones(batch["next_sentence_labels"].shape, jnp.float32)


def pretraining_sums(model, params, batch, deterministic: bool, rng=None) -> dict[str, jax.Array]:
    """Summed (not averaged) losses and hits, so micro-batches and devices add up exactly."""
    return sums_of_outputs(apply_model(model, params, batch, deterministic, rng), batch)


def sums_of_outputs(out, batch) -> dict[str, jax.Array]:
    """`pretraining_sums` of the model's outputs `out` (a PretrainingOutput) on `batch`."""
    mlm_logits = out.mlm_logits_BPV.astype(jnp.float32)
    weights = batch["masked_lm_weights"].astype(jnp.float32)
    labels = batch["masked_lm_ids"]
    mlm_nll = optax.softmax_cross_entropy_with_integer_labels(mlm_logits, labels)
    nsp_logits = out.nsp_logits_B2.astype(jnp.float32)
    nsp_labels = batch["next_sentence_labels"]
    nsp_w = nsp_weights(batch)
    nsp_nll = optax.softmax_cross_entropy_with_integer_labels(nsp_logits, nsp_labels)
    return {
        "mlm_loss_sum": jnp.sum(mlm_nll * weights),
        "mlm_correct": jnp.sum((jnp.argmax(mlm_logits, -1) == labels) * weights),
        "mlm_count": jnp.sum(weights),
        "nsp_loss_sum": jnp.sum(nsp_nll * nsp_w),
        "nsp_correct": jnp.sum((jnp.argmax(nsp_logits, -1) == nsp_labels) * nsp_w),
        "nsp_count": jnp.sum(nsp_w),
    }


def summarise(sums: dict[str, jax.Array]) -> dict[str, jax.Array]:
    mlm_count = jnp.maximum(sums["mlm_count"], 1.0)
    nsp_count = jnp.maximum(sums["nsp_count"], 1.0)
    out = {
        "mlm_loss": sums["mlm_loss_sum"] / mlm_count,
        "mlm_accuracy": sums["mlm_correct"] / mlm_count,
        "nsp_loss": sums["nsp_loss_sum"] / nsp_count,
        "nsp_accuracy": sums["nsp_correct"] / nsp_count,
    }
    out["loss"] = out["mlm_loss"] + out["nsp_loss"]
    return out


# ------------------------------------------------------------------------------ steps


def make_train_step(
    model,
    tx,
    schedule,
    grad_accum_steps: int = 1,
    axis_name: str | None = None,
    nsp_weight: float = 1.0,
):
    """The pure step. Loss = mean MLM cross-entropy over real predictions + `nsp_weight` x
    mean NSP cross-entropy (`train.nsp_weight`; the BERT paper sums the two, weight 1; 0 trains
    the masked LM alone, as RoBERTa does); with k micro-batches the gradient equals that of
    the whole batch. The logged `loss` stays the unweighted sum, comparable across weights.

    With `axis_name` (under `jax.pmap`) each device holds a slice of the global batch: the
    denominators are the global counts and the per-device gradients and sums are summed over
    the axis, so the step gives the single-device numbers (the psum of gradients of
    sum/global-count is the pmean of per-device gradients of n * that)."""
    k = grad_accum_steps

    def global_sum(x):
        return x if axis_name is None else jax.lax.psum(x, axis_name)

    def train_step(state: TrainState, batch, rng):
        rng = jax.random.fold_in(rng, state.step)
        if axis_name is not None:  # each replica draws its own dropout masks
            rng = jax.random.fold_in(rng, jax.lax.axis_index(axis_name))
        # Denominators come from the whole batch, so summing micro-batch gradients is exact.
        mlm_denominator = jnp.maximum(global_sum(jnp.sum(batch["masked_lm_weights"])), 1.0)
        nsp_denominator = jnp.maximum(global_sum(jnp.sum(nsp_weights(batch))), 1.0)

        def loss_fn(params, micro, micro_rng):
            sums = pretraining_sums(model, params, micro, False, micro_rng)
            mlm_loss = sums["mlm_loss_sum"] / mlm_denominator
            loss = mlm_loss + nsp_weight * sums["nsp_loss_sum"] / nsp_denominator
            return loss, sums

        grad_fn = jax.grad(loss_fn, has_aux=True)
        grads, sums = accumulated_gradients(grad_fn, state.params, batch, rng, k)
        grads, sums = global_sum((grads, sums))
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = summarise(sums)
        metrics["learning_rate"] = applied_learning_rate(schedule, state.opt_state)
        metrics["grad_norm"] = optax.tree.norm(grads)
        metrics["param_norm"] = optax.tree.norm(params)
        metrics["skipped_updates"] = skipped_updates(opt_state)
        return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

    return train_step


def make_eval_step(model):
    """`eval_step(params, batch) -> sums`: `pretraining_sums` plus two (V,) histograms over
    the vocabulary, of the predicted (arg-max) and of the true pieces at the real masked
    positions, from which `evaluate` reads how varied the predictions are."""

    def eval_step(params, batch):
        out = apply_model(model, params, batch, deterministic=True)
        sums = sums_of_outputs(out, batch)
        logits_BPV = out.mlm_logits_BPV
        weights_BP = batch["masked_lm_weights"].astype(jnp.float32)
        vocab = logits_BPV.shape[-1]
        predicted_BP = jnp.argmax(logits_BPV, -1)
        sums["mlm_predicted_histogram"] = jnp.zeros(vocab).at[predicted_BP].add(weights_BP)
        sums["mlm_target_histogram"] = jnp.zeros(vocab).at[batch["masked_lm_ids"]].add(weights_BP)
        return sums

    return eval_step


def create_train_state(model, tx, rng, seq_len: int, num_predictions: int) -> TrainState:
    params = init_params(model, rng, seq_len, num_predictions)
    return TrainState(step=jnp.asarray(0, jnp.int32), params=params, opt_state=tx.init(params))


def logical_param_specs(model, seq_len: int, num_predictions: int):
    """The parameters' logical axis names (a tree of PartitionSpecs), computing nothing."""
    batch = dummy_batch(1, seq_len, num_predictions)
    boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), **batch)["params"])
    return nn.get_partition_spec(boxed)


def logical_dims(config: BertConfig) -> dict[str, int]:
    """Size of each logical axis of the model, so the rules never ask for an uneven split."""
    return {
        "vocab": config.vocab_size,
        "embed": config.hidden_size,
        "embed_out": config.hidden_size,
        "positions": config.max_position_embeddings,
        "segments": config.type_vocab_size,
        "heads": config.num_heads,
        "kv": config.head_dim,
        "mlp": config.intermediate_size,
        "classes": 2,
        "layers": config.num_layers,  # the stacked axis of model.scan_layers (never split)
    }


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


def batch_shapes(batch_size: int, seq_len: int, num_predictions: int, max_pairs: int = 0):
    """ShapeDtypeStructs of a global pre-training batch, for compiling without data;
    `max_pairs` > 0: packed rows (`flaxbert.data.pretraining.PackedRows`)."""
    i32, f32 = jnp.int32, jnp.float32
    row, preds = (batch_size, seq_len), (batch_size, num_predictions)
    shapes = {
        "input_ids": jax.ShapeDtypeStruct(row, i32),
        "input_mask": jax.ShapeDtypeStruct(row, i32),
        "segment_ids": jax.ShapeDtypeStruct(row, i32),
        "masked_lm_positions": jax.ShapeDtypeStruct(preds, i32),
        "masked_lm_ids": jax.ShapeDtypeStruct(preds, i32),
        "masked_lm_weights": jax.ShapeDtypeStruct(preds, f32),
        "next_sentence_labels": jax.ShapeDtypeStruct((batch_size,), i32),
    }
    if max_pairs:
        pairs = (batch_size, max_pairs)
        shapes["position_ids"] = jax.ShapeDtypeStruct(row, i32)
        shapes["cls_positions"] = jax.ShapeDtypeStruct(pairs, i32)
        shapes["next_sentence_labels"] = jax.ShapeDtypeStruct(pairs, i32)
        shapes["next_sentence_weights"] = jax.ShapeDtypeStruct(pairs, f32)
    return shapes


# ------------------------------------------------------------------------------ loop


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
            f"pieces); set --config.model.vocab_size={corpus.vocab_size}",
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


def prediction_diversity(predicted_V, target_V) -> dict[str, float]:
    """How varied the masked-LM predictions are, from histograms (V,) over the vocabulary of
    the arg-max predictions and of the true pieces at the held-out masked positions.

    - `mlm_distinct_predictions`: distinct predicted pieces / distinct true pieces. A model on
      the unigram plateau (it predicts the frequent pieces whatever the context; accuracy near
      the share of the most frequent ones) scores near 0; one that reads the context climbs
      towards 1.
    - `mlm_top_prediction_share`: the share of all predictions taken by the single most
      predicted piece (on the plateau often 0.3-1.0).
    """
    predicted_V, target_V = np.asarray(predicted_V), np.asarray(target_V)
    return {
        "mlm_distinct_predictions": float(
            np.count_nonzero(predicted_V) / max(np.count_nonzero(target_V), 1)
        ),
        "mlm_top_prediction_share": float(predicted_V.max() / max(predicted_V.sum(), 1.0)),
    }


def evaluate(eval_step, params, batches: list[dict]) -> dict[str, float]:
    """Held-out metrics over `batches`: those of `summarise` and of `prediction_diversity`,
    keys `eval/<name>`."""
    totals = None
    for batch in batches:
        sums = eval_step(params, batch)
        totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
    predicted_V = totals.pop("mlm_predicted_histogram")
    target_V = totals.pop("mlm_target_histogram")
    metrics = {k: float(v) for k, v in summarise(totals).items()}
    metrics.update(prediction_diversity(jax.device_get(predicted_V), jax.device_get(target_V)))
    return {f"eval/{k}": v for k, v in metrics.items()}


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


def write_run_config(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Creates the workdir, writes config.json (process 0) and returns the config as a dict."""
    os.makedirs(workdir, exist_ok=True)
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config.to_json_best_effort(indent=2) + "\n")
    return json.loads(config.to_json_best_effort())


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


def _nonfinite_counts(opt_state) -> tuple[int, int]:
    """(skipped updates, of which the last ones in a row) of a restored optimizer state."""
    return (
        int(np.asarray(skipped_updates(opt_state))),
        int(np.asarray(nonfinite_in_a_row(opt_state))),
    )


def read_final_metrics(workdir: str) -> dict:
    """WORKDIR/final_metrics.json, or {} when it is absent or unreadable."""
    try:
        with open(os.path.join(workdir, "final_metrics.json"), encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def finished_checkpoint(workdir: str, checkpoint_config, num_steps: int) -> str | None:
    """The step directory of a run that has already finished: its latest checkpoint is at
    `num_steps` or later and it wrote final_metrics.json (a run preempted at its last step
    has not, and goes through the loop once more to write it). None otherwise."""
    final = read_final_metrics(workdir)
    directory = ckpt.checkpoint_directory(workdir, checkpoint_config)
    if not final or not os.path.isdir(directory):
        return None
    try:
        step_dir, meta = ckpt.read_meta(directory)
    except ckpt.CheckpointNotFoundError:
        return None
    return step_dir if int(meta.get("step", -1)) >= num_steps else None


def _already_finished(workdir: str, step_dir: str, num_steps: int) -> PretrainResult:
    """A re-run of a finished pre-training: nothing is read, trained, evaluated or written."""
    step = int(os.path.basename(step_dir))
    log.info(
        "the run is already finished: checkpoint %s is at step %d, train.num_steps=%d; nothing "
        "to do (final_metrics.json is left as it is; raise train.num_steps to train on)",
        step_dir,
        step,
        num_steps,
    )
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


def state_from_checkpoint(setup: TrainingSetup, restored: ckpt.Restored) -> TrainState:
    """A restored checkpoint -> the TrainState as `setup.parallel` places it."""
    target = setup.parallel.checkpoint_abstract(setup.abstract_state())
    step = jax.make_array_from_process_local_data(
        target.step.sharding, np.asarray(restored.step, np.int32)
    )
    return setup.parallel.from_checkpoint(
        TrainState(step=step, params=restored.params, opt_state=restored.opt_state)
    )


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


def pretrain(
    config: ml_collections.ConfigDict, workdir: str, parallel: Parallel | None = None
) -> PretrainResult:
    """Pre-trains as `config` says, writing everything into `workdir`; continues from the
    latest complete checkpoint in `workdir` when there is one.

    `parallel` (a `flaxbert.sharding` strategy) overrides the one `config.parallel` names.
    """
    # Random bits independent of the sharding: the same dropout masks on any mesh.
    jax.config.update("jax_threefry_partitionable", True)
    model_config = validate_pretrain_config(config)
    done = finished_checkpoint(workdir, config.checkpoint, config.train.num_steps)
    if done is not None:
        return _already_finished(workdir, done, config.train.num_steps)
    # A bad mesh or batch split stops the run before the data are read.
    parallel = parallel or parallel_from_config(config, model_config)
    d = config.data
    require(
        d.masking in ("dynamic", "static"), "data.masking", d.masking, "choose dynamic or static"
    )
    corpus = load_corpus(d, workdir)
    check_vocab(corpus, model_config)
    inst = instance_config(d, corpus.vocab_size)
    t = config.train
    is_chief = jax.process_index() == 0
    config_dict = write_run_config(config, workdir)
    log.info("data: %s", corpus.description)
    tokenizer_ref = ckpt.keep_tokenizer(workdir, corpus.tokenizer_path)

    setup = setup_training(config, model_config, parallel)
    parallel = setup.parallel
    log.info("parallel: %s", parallel.description)

    train_batches = make_train_batches(config, corpus, parallel)
    masking = dict(word_start=corpus.word_start, whole_word_masking=d.whole_word_masking)
    eval_source = PretrainingBatches(
        corpus.eval,
        inst,
        config.eval.batch_size,
        seed=t.seed + 1,
        split="held-out split",
        **masking,
    )
    eval_rows = parallel.local_rows(config.eval.batch_size)
    eval_batches = [
        {k: v[eval_rows.start : eval_rows.stop] for k, v in eval_source.batch(i).items()}
        for i in range(config.eval.num_batches)
    ]

    c = config.checkpoint
    checkpoints = ckpt.Checkpoints(
        ckpt.checkpoint_directory(workdir, c),
        keep=c.keep,
        best_metric=c.best_metric,
        best_mode=c.best_mode,
        async_save=c.async_save,
    )
    rng = jax.random.key(t.seed)
    init_rng, dropout_rng = jax.random.split(rng)
    abstract = setup.abstract_state()
    target = parallel.checkpoint_abstract(abstract)
    restored = checkpoints.restore_latest(target.params, target.opt_state)
    if restored is None:
        start_step = 0
        state = setup.create_state(init_rng)
    else:
        start_step = restored.step
        meta = restored.meta
        _log_config_changes(meta.get("config", {}), config_dict, start_step)
        dropout_rng = ckpt.rng_from_json(meta["rng"])
        state = state_from_checkpoint(setup, restored)
        log.info(
            "resuming from checkpoint %s (step %d of %d): parameters, optimizer state, dropout "
            "RNG and data position restored",
            checkpoints.step_dir(start_step),
            start_step,
            t.num_steps,
        )
    dropout_rng_host = dropout_rng
    dropout_rng = parallel.put_replicated(dropout_rng)
    num_params = sum(x.size for x in jax.tree.leaves(jax.eval_shape(setup.init_fn, rng).params))
    log.info(
        "model: %d layers, hidden %d, %d heads, %.2fM parameters",
        model_config.num_layers,
        model_config.hidden_size,
        model_config.num_heads,
        num_params / 1e6,
    )

    train_step = setup.compile_train_step(state)
    eval_step = setup.compile_eval_step(state)
    writer = MetricWriter(workdir, enabled=is_chief, resume_step=start_step)
    progress = Progress(t.num_steps, first_step=start_step, enabled=is_chief)
    tokens_per_batch = t.batch_size * inst.max_seq_length

    start_time = time.perf_counter()
    interval: list[dict[str, float]] = []
    interval_start, last_train, last_eval = time.perf_counter(), {}, {}
    # (step, device metrics, real tokens): fetched one step late so the host never stalls.
    pending = None
    # Counters that a resumed run continues (they live in the optimizer state).
    skipped, consecutive = (0, 0) if restored is None else _nonfinite_counts(restored.opt_state)

    def finish(step, device_metrics, real_tokens):
        nonlocal interval_start, last_train, skipped, consecutive
        metrics = parallel.fetch(device_metrics)
        metrics["real_tokens"] = real_tokens
        skipped = int(metrics["skipped_updates"])
        problem = _nonfinite_message(step, metrics)
        if problem and t.nonfinite == "stop":
            raise FloatingPointError(
                f"{problem} ({metrics}); the update was not applied and nothing non-finite "
                "was saved. Lower train.learning_rate, check the data, use "
                "model.dtype=float32, or set train.nonfinite=skip to skip such steps"
            )
        consecutive = consecutive + 1 if problem else 0
        if problem:
            log.warning("%s: update skipped (%d skipped so far)", problem, skipped)
            check_consecutive_nonfinite(problem, consecutive, t.max_consecutive_nonfinite)
        else:
            interval.append(metrics)
        if interval and (step % t.log_every == 0 or step == t.num_steps):
            now = time.perf_counter()
            mean = {k: float(np.mean([m[k] for m in interval])) for k in interval[0]}
            mean["skipped_updates"] = skipped
            mean["seq_per_sec"] = len(interval) * t.batch_size / (now - interval_start)
            mean["tokens_per_sec"] = len(interval) * tokens_per_batch / (now - interval_start)
            # Non-padding tokens (what packing raises).
            real = mean.pop("real_tokens") * len(interval)
            mean["real_tokens_per_sec"] = real / (now - interval_start)
            writer.write(step, mean)
            progress.log(step, mean)
            interval.clear()
            interval_start, last_train = now, mean

    def save(step, state, eval_metrics):
        view = parallel.to_checkpoint(state)
        meta = {
            "format": ckpt.FORMAT_VERSION,
            "step": step,
            "rng": ckpt.rng_to_json(dropout_rng_host),
            "data": {
                "position": step,  # batches consumed: the next one is batch(step)
                "seed": t.seed,
                "global_batch": t.batch_size,
                "masking": d.masking,
                "corpus": d.corpus,
            },
            "skipped_updates": skipped,
            "config": config_dict,
            "tokenizer": tokenizer_ref,
            "model": dataclasses.asdict(model_config),
            "parallel": parallel.description,
        }
        blocking = checkpoints.save(step, view.params, view.opt_state, meta, eval_metrics)
        if is_chief:
            log.info(
                "checkpoint %s: training waited %.2fs; writing goes on in the background",
                checkpoints.step_dir(step),
                blocking,
            )

    preemption = PreemptionWatch()
    preempted = False
    step = start_step
    batches = None
    try:
        steps = range(start_step, t.num_steps)

        def device_batch(step):
            # Built and copied to the devices on the prefetch thread, ahead of its step; with
            # the global count of real tokens (this process's rows, times the processes).
            host = train_batches.batch(step)
            return parallel.put_batch(host), np.count_nonzero(host["input_mask"]) * (
                jax.process_count()
            )

        batches = prefetch(device_batch, steps, config.data.prefetch)
        for step0, (batch, real_tokens) in batches:
            step = step0 + 1  # the step count once this update is applied
            state, metrics = train_step(state, batch, dropout_rng)
            if pending is not None:
                finish(*pending)
            pending = (step, metrics, real_tokens)
            every, save_every = config.eval.every_steps, c.every_steps
            at_eval = step == t.num_steps or (every and step % every == 0)
            at_save = step == t.num_steps or (save_every and step % save_every == 0)
            preempted = preemption.reached(step)
            if at_eval or at_save or preempted:
                # The step is checked (finite, or skipped) before anything is saved.
                finish(*pending)
                pending = None
            if at_eval:
                eval_start = time.perf_counter()
                last_eval = evaluate(eval_step, state.params, eval_batches)
                writer.write(step, last_eval)
                if is_chief:
                    log.info(
                        "eval at step %d: %s",
                        step,
                        ", ".join(f"{k[5:]} {v:.4f}" for k, v in last_eval.items()),
                    )
                # Evaluation time does not count against training speed.
                interval_start += time.perf_counter() - eval_start
            if at_save or preempted:
                save(step, state, last_eval if at_eval else None)
            if preempted:
                log.warning(
                    "SIGTERM (preemption) received: saved step %d; stopping. Run the same "
                    "command again to continue.",
                    step,
                )
                break
        if pending is not None:
            finish(*pending)
        if start_step >= t.num_steps:
            # Preempted at its last step: final_metrics.json was never written.
            log.info(
                "the checkpoint is at step %d, train.num_steps=%d: nothing to train; evaluating "
                "to write final_metrics.json (raise train.num_steps to train on)",
                start_step,
                t.num_steps,
            )
            last_eval = evaluate(eval_step, state.params, eval_batches)
    finally:
        if batches is not None:
            batches.close()  # stops the prefetch thread before anything else closes
        preemption.close()
        writer.close()
        checkpoints.close()  # waits for the saves still being written
    wall = time.perf_counter() - start_time
    if is_chief and not preempted:
        with open(os.path.join(workdir, "final_metrics.json"), "w") as f:
            json.dump(
                {"step": step, **last_eval, "skipped_updates": skipped, "wall_time_s": wall},
                f,
                indent=2,
            )
        log.info(
            "done: %d steps in %.1fs; final eval MLM accuracy %.4f, NSP accuracy %.4f",
            step - start_step,
            wall,
            last_eval["eval/mlm_accuracy"],
            last_eval["eval/nsp_accuracy"],
        )
    return PretrainResult(
        state=parallel.unreplicate(state),
        train_metrics=last_train,
        eval_metrics=last_eval,
        wall_time=wall,
        start_step=start_step,
        final_step=step,
        preempted=preempted,
        skipped_updates=skipped,
    )
