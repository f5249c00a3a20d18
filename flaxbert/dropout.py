"""Dropout (Srivastava et al. 2014) with a keep mask drawn from 16 random bits per element.

`flax.linen.Dropout` draws a 32-bit uniform float per element (`jax.random.bernoulli`). On a
CPU those bits are most of what dropout costs: BERT drops after the embeddings, after every
attention output and feed-forward output, and on every attention probability, so a mini
(L4 H256) step at batch 32 x seq 128 draws ~17 M values. Threefry-2x32, JAX's counter-based
generator, yields 64 bits per evaluation (JAX's 32-bit draw XORs them into one word); split
into four 16-bit quarters, each evaluation serves four elements, a quarter of the generator's
work (measured: `benchmarks/cpu_levers.py`, README "Speed on the CPU"). The counters are the
elements' indices, as in JAX's partitionable threefry (`jax_threefry_partitionable`), so the
masks are the same on any mesh and a pure function of the key, hence of (seed, step).

The drop probability is `rate` rounded to a multiple of 2^-16 (for 0.1: 6554 / 65536 =
0.1000061; the rounding error is at most 7.7e-6), and kept values are scaled by the
reciprocal of the *actual* keep probability, so E[output] = input exactly, as in the
inverted dropout of the BERT reference implementation (google-research/bert `dropout`,
which uses TensorFlow's `tf.nn.dropout`).

Shape suffixes as in `flaxbert.model`.
"""

from __future__ import annotations

import math

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


# Threefry-2x32 with 20 rounds (Salmon, Moraes, Dror and Shaw 2011, "Parallel random
# numbers: as easy as 1, 2, 3", SC'11; the Random123 specification): rotation constants of the
# even and odd groups of four rounds, and the key-schedule parity constant.
_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))
_KEY_PARITY = 0x1BD11BDA


def _rotl(v, r: int):
    return (v << jnp.uint32(r)) | (v >> jnp.uint32(32 - r))


def threefry2x32(k0, k1, x0, x1) -> tuple[jax.Array, jax.Array]:
    """Threefry-2x32 (20 rounds) of the counter pairs (x0, x1) under the key (k0, k1), all
    uint32 (any broadcastable shapes): the two output words.

    Bit for bit the function of JAX's `threefry2x32_p` (tests/dropout_test.py checks it), but
    written as plain element-wise operations: on the CPU JAX lowers that primitive as a rolled
    loop over the rounds, each pass writing whole arrays, whereas these unrolled rounds fuse
    with the comparison and the select of dropout into one pass over the elements (3x faster
    for a mini step's masks; `benchmarks/cpu_levers.py`).
    """
    ks = (k0, k1, k0 ^ k1 ^ jnp.uint32(_KEY_PARITY))
    x0, x1 = x0 + ks[0], x1 + ks[1]
    for i in range(5):  # 5 groups of 4 rounds, a key injection after each
        for r in _ROTATIONS[i % 2]:
            x0 = x0 + x1
            x1 = _rotl(x1, r) ^ x0
        x0 = x0 + ks[(i + 1) % 3]
        x1 = x1 + ks[(i + 2) % 3] + jnp.uint32(i + 1)
    return x0, x1


def _threefry_words(key: jax.Array, shape: tuple[int, ...]) -> tuple[jax.Array, jax.Array]:
    """Both 32-bit output words of Threefry-2x32 at every counter of `shape`: counter = the
    row-major index of the element (high word 0), as JAX's partitionable threefry numbers them,
    so each shard computes its own part and the result does not depend on the sharding. (JAX's
    own 32-bit draw XORs the two words into one; keeping both gives twice the bits per
    evaluation.)"""
    k1, k2 = jax.random.key_data(key)
    index = jnp.zeros(shape, jnp.uint32)
    stride = 1
    for axis in reversed(range(len(shape))):
        index = index + jax.lax.broadcasted_iota(jnp.uint32, shape, axis) * jnp.uint32(stride)
        stride *= shape[axis]
    return threefry2x32(k1, k2, jnp.zeros((), jnp.uint32), index)


def _is_threefry(key: jax.Array) -> bool:
    return "threefry" in str(jax.random.key_impl(key))


def keep_mask(key: jax.Array, shape: tuple[int, ...], rate: float) -> jax.Array:
    """A boolean mask of `shape`, True (keep) with probability `keep_probability(rate)`,
    independently per element.

    Each row (the last axis) is read off ceil(last / 4) Threefry evaluations, each giving two
    32-bit words, each word two 16-bit halves: element 4j + i takes half i of evaluation j
    (the tail of the last evaluation is unused when 4 does not divide the row). An element is
    dropped when its half is below `drop_threshold(rate)`. With a non-threefry key (another
    `jax_default_prng_impl`), or 2^32 counters or more, the halves come from
    `jax.random.bits` 32-bit words instead (two elements a word). Raises ValueError for a rate
    outside [0, 1).
    """
    threshold = jnp.uint16(drop_threshold(rate))
    if not shape:
        return keep_mask(key, (1,), rate)[0]
    *rows, last = shape
    if _is_threefry(key) and math.prod(rows) * -(-last // 4) < 2**32:
        words = jnp.stack(_threefry_words(key, (*rows, -(-last // 4))), axis=-1)  # (..., w, 2)
    else:
        words = jax.random.bits(key, (*rows, -(-last // 2)), jnp.uint32)
    halves = jax.lax.bitcast_convert_type(words, jnp.uint16)  # (..., w, [2,] 2)
    halves = halves.reshape(*rows, -1)[..., :last]
    return halves >= threshold


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
