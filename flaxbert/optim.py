"""The optimizer and its learning-rate schedules, and the state they update.

`make_optimizer(config.train)` gives AdamW or LAMB (You et al., 2019) with global-norm
clipping, weight decay off LayerNorm scales and biases (as the reference BERT optimizer), a
linear warm-up then linear, polynomial or constant decay, all wrapped in
`optax.apply_if_finite` so that a non-finite gradient never reaches the parameters.
`accumulated_gradients` sums micro-batch gradients (train.grad_accum_steps). Pre-training
(`flaxbert.pretrain_step`) and fine-tuning (`flaxbert.finetune_step`) share all of it.
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import optax

from flaxbert.config import ConfigError


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    opt_state: Any


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
