"""Dropout (Srivastava et al. 2014) with a keep mask drawn from 16 random bits per element.

`flax.linen.Dropout` draws a 32-bit uniform float per element (`jax.random.bernoulli`). On a
CPU those bits are most of what dropout costs: BERT drops after the embeddings, after every
attention output and feed-forward output, and on every attention probability, so a mini
(L4 H256) step at batch 32 x seq 128 draws ~17 M values. Threefry, JAX's counter-based
generator, yields 32 bits per evaluation; split into two 16-bit halves, each evaluation
serves two elements, which halves the generator's work (measured: see README, "Speed on the
CPU"). The counter-based, sharding-independent stream (`jax_threefry_partitionable`) is kept,
so the masks stay the same on any mesh and for any (seed, step), as before.

The drop probability is `rate` rounded to a multiple of 2^-16 (for 0.1: 6554 / 65536 =
0.1000061; the rounding error is at most 7.7e-6), and kept values are scaled by the
reciprocal of the *actual* keep probability, so E[output] = input exactly, as in the
inverted dropout of the BERT reference implementation (google-research/bert `dropout`,
which uses TensorFlow's `tf.nn.dropout`).

Shape suffixes as in `flaxbert.model`.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

DROPOUT_BITS = 16  # random bits per element
_LEVELS = 1 << DROPOUT_BITS


def drop_threshold(rate: float) -> int:
    """The number of the 2^16 equally likely 16-bit draws that drop an element: round(rate *
    2^16), at most 2^16 - 1 so that some element is always kept. Raises ValueError for a rate
    outside [0, 1)."""
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"dropout rate must be in [0, 1), got {rate}")
    return min(round(rate * _LEVELS), _LEVELS - 1)


def keep_probability(rate: float) -> float:
    """The probability that an element is kept: 1 - drop_threshold(rate) / 2^16."""
    return 1.0 - drop_threshold(rate) / _LEVELS


def keep_mask(key: jax.Array, shape: tuple[int, ...], rate: float) -> jax.Array:
    """A boolean mask of `shape`, True (keep) with probability `keep_probability(rate)`,
    independently per element.

    Threefry draws 32-bit words along the last axis, ceil(last / 2) of them per row; each word
    is split into its two 16-bit halves, element 2j of a row taking word j's first half and
    element 2j+1 its second (an odd last axis drops the last half of its last word). An element
    is dropped when its half is below `drop_threshold(rate)`.
    """
    if not shape:
        return keep_mask(key, (1,), rate)[0]
    *rows, last = shape
    words = jax.random.bits(key, (*rows, -(-last // 2)), jnp.uint32)
    halves = jax.lax.bitcast_convert_type(words, jnp.uint16)  # (..., words, 2)
    halves = halves.reshape(*rows, 2 * words.shape[-1])[..., :last]
    return halves >= jnp.uint16(drop_threshold(rate))


class Dropout(nn.Module):
    """Inverted dropout: zeroes each element with probability `rate` (to a multiple of 2^-16)
    and scales the kept ones by 1 / keep probability; the identity when `deterministic` or
    `rate` is 0. Draws its key from the 'dropout' RNG stream, as `flax.linen.Dropout` does
    (the module is also named Dropout_<i> by default, so each layer's stream is unchanged).

    x (any shape) -> same shape and dtype.
    """

    rate: float

    @nn.compact
    def __call__(self, x, deterministic: bool):
        if deterministic or self.rate == 0.0:
            return x
        keep = keep_mask(self.make_rng("dropout"), x.shape, self.rate)
        scale = jnp.asarray(1.0 / keep_probability(self.rate), x.dtype)
        return jnp.where(keep, x * scale, jnp.zeros((), x.dtype))
