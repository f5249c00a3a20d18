"""The pure fine-tuning step, for every task kind, with or without a frozen encoder.

`make_finetune_step(model, kind, tx, schedule, ...)` returns `train_step(state, batch, rng)
-> (state, metrics)`, compiled by the shared loop (`flaxbert.loop`) through the strategy of
`config.parallel`, like the pre-training step (`flaxbert.pretrain_step`). The loss is the
task kind's (`flaxbert.finetune_tasks`) summed loss over the whole batch's count.

`freeze_encoder` is the feature-based use of BERT (paper section 5.3): only the task head is
differentiated and holds optimizer state; the encoder (`bert`) runs without dropout.
"""

from __future__ import annotations

import dataclasses
import inspect
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax

from flaxbert.model import BertModel
from flaxbert.optim import TrainState, accumulated_gradients, applied_learning_rate, skipped_updates


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
    (`flaxbert.optim.accumulated_gradients`) the whole batch's gradient.

    With `freeze_encoder` the loss is differentiated with respect to the head alone
    (`trainable_params`), the encoder closed over and run without dropout: no encoder
    gradient is computed, `state.opt_state` is the optimizer's state of the head parameters
    (`tx.init(trainable_params(params, True))`) and `state.params["bert"]` comes out as it
    went in. `grad_norm` is then the head gradient's norm.

    `learning_rate` in the metrics is the one the update applied (the schedule follows
    applied updates: `flaxbert.optim.applied_updates`)."""

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


def optimizer_config(train: ml_collections.ConfigDict, num_steps: int) -> ml_collections.ConfigDict:
    """`config.train` with the run's step count and its warm-up in steps
    (train.warmup_fraction x steps), as `flaxbert.optim.make_optimizer` reads them."""
    t = ml_collections.ConfigDict(train.to_dict())
    t.num_steps = num_steps
    t.warmup_steps = int(round(train.warmup_fraction * num_steps))
    return t
