"""The pure pre-training step: masked-LM + next-sentence losses, the train and eval steps.

`train_step(state, batch, rng) -> (state, metrics)` is one pure function; the loop
(`flaxbert.loop`) compiles it through the strategy `config.parallel` names
(`flaxbert.sharding`: `jax.jit` over a data/fsdp/tensor mesh, or `jax.pmap`) and donates the
state. Dropout randomness is `fold_in(rng, step)` inside the step, so the same (seed, step)
always draws the same masks. Losses are computed as sums over the whole batch's counts, so
micro-batches (`flaxbert.optim.accumulated_gradients`) and devices add up exactly.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from flaxbert.model_config import BertConfig
from flaxbert.optim import TrainState, accumulated_gradients, applied_learning_rate, skipped_updates
from flaxbert.pretraining_model import BertForPreTraining

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
