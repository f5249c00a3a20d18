"""flaxbert.dropout: 16-bit keep masks. The masks differ from flax.linen.Dropout's (fewer bits
per element), so what is checked is that their statistics are right: the drop rate, the
independence of neighbours that share a 32-bit word, of rows and of keys, the expectation of
the output, and that the mask does not depend on how the array is sharded."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from flaxbert import dropout
from flaxbert.dropout import Dropout, drop_threshold, keep_mask, keep_probability


@pytest.fixture(autouse=True)
def _partitionable():
    # As training sets it (flaxbert.train): random bits independent of the sharding.
    old = jax.config.jax_threefry_partitionable
    jax.config.update("jax_threefry_partitionable", True)
    yield
    jax.config.update("jax_threefry_partitionable", old)


def _within(observed: float, expected: float, n: int, sigmas: float = 5.0) -> bool:
    """A proportion of n Bernoulli(expected) trials within `sigmas` standard errors."""
    return abs(observed - expected) <= sigmas * math.sqrt(expected * (1 - expected) / n)


def test_the_drop_probability_is_the_rate_to_a_multiple_of_2_to_the_minus_16():
    assert dropout.DROPOUT_BITS == 16
    assert drop_threshold(0.1) == 6554
    assert keep_probability(0.1) == pytest.approx(1 - 6554 / 65536)
    for rate in (0.0, 0.01, 0.1, 0.15, 0.5, 0.9, 0.999):
        assert abs((1 - keep_probability(rate)) - rate) <= 2**-17
    assert drop_threshold(0.0) == 0
    assert drop_threshold(0.9999999) == 65535  # something is always kept
    for bad in (-0.1, 1.0, 1.5):
        with pytest.raises(ValueError, match="dropout rate must be in"):
            drop_threshold(bad)


@pytest.mark.parametrize("rate", [0.1, 0.5])
def test_masks_drop_at_the_rate_independently(rate):
    rows, cols = 512, 1024
    keep = np.asarray(keep_mask(jax.random.key(0), (rows, cols), rate))
    assert keep.shape == (rows, cols) and keep.dtype == bool
    p, n = keep_probability(rate), keep.size
    assert _within(keep.mean(), p, n)
    # Each column (element 2j and 2j+1 come from the two halves of one 32-bit word) and each
    # row keeps at the rate: no position is favoured.
    col_means = keep.mean(0)
    z = (col_means - p) / math.sqrt(p * (1 - p) / rows)
    assert np.abs(z).max() < 5.5 and abs(np.mean(z**2) - 1) < 0.25
    # Neighbours sharing a word are independent: P(both kept) = p^2, and so for neighbours
    # from different words, and for rows.
    pairs = [
        (keep[:, 0::2], keep[:, 1::2]),  # the two halves of a word
        (keep[:, 1:-1:2], keep[:, 2::2]),  # neighbours in adjacent words
        (keep[:-1], keep[1:]),  # adjacent rows
    ]
    for a, b in pairs:
        assert _within((a & b).mean(), p * p, a.size)
    # Another key gives an independent mask.
    other = np.asarray(keep_mask(jax.random.key(1), (rows, cols), rate))
    assert _within((keep & other).mean(), p * p, n)
    assert not np.array_equal(keep, other)


def test_the_same_key_gives_the_same_mask_and_odd_shapes_work():
    a = keep_mask(jax.random.key(3), (4, 7, 33), 0.1)
    b = keep_mask(jax.random.key(3), (4, 7, 33), 0.1)
    assert a.shape == (4, 7, 33)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # A row is read off ceil(last / 4) evaluations: 33 and 34 use the same ones.
    wide = keep_mask(jax.random.key(3), (4, 7, 34), 0.1)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(wide)[..., :33])
    assert keep_mask(jax.random.key(3), (), 0.1).shape == ()


def test_the_mask_is_the_same_on_any_sharding():
    devices = np.array(jax.devices())
    assert devices.size == 8, "tests run on 8 fake CPU devices (tests/conftest.py)"
    shape, rate, key = (16, 8, 64), 0.1, jax.random.key(7)
    reference = np.asarray(jax.jit(lambda k: keep_mask(k, shape, rate))(key))
    layouts = [
        (Mesh(devices, ("data",)), PartitionSpec("data")),
        (Mesh(devices.reshape(2, 4), ("data", "model")), PartitionSpec("data", None, "model")),
        (Mesh(devices.reshape(4, 2), ("data", "model")), PartitionSpec(None, "data", "model")),
    ]
    for mesh, spec in layouts:
        sharded = jax.jit(
            lambda k: keep_mask(k, shape, rate), out_shardings=NamedSharding(mesh, spec)
        )(key)
        np.testing.assert_array_equal(np.asarray(sharded), reference)


def test_the_module_keeps_the_expectation_and_is_the_identity_when_off():
    x = jnp.ones((256, 512), jnp.float32)
    module = Dropout(0.1)
    y = module.apply({}, x, deterministic=False, rngs={"dropout": jax.random.key(0)})
    y = np.asarray(y)
    kept = y != 0
    np.testing.assert_allclose(y[kept], 1 / keep_probability(0.1), rtol=1e-6)
    assert _within(kept.mean(), keep_probability(0.1), kept.size)
    assert abs(y.mean() - 1.0) < 5 * math.sqrt(0.1 / 0.9 / y.size) + 1e-6
    for deterministic, rate in ((True, 0.1), (False, 0.0)):
        out = Dropout(rate).apply({}, x, deterministic=deterministic)  # no RNG needed
        assert out is x
    half = Dropout(0.1).apply(
        {}, x.astype(jnp.bfloat16), deterministic=False, rngs={"dropout": jax.random.key(0)}
    )
    assert half.dtype == jnp.bfloat16


def test_each_layer_keeps_its_own_stream():
    """The module is named Dropout_<i> as flax's is, so layers draw from distinct streams."""

    class Two(nn.Module):
        @nn.compact
        def __call__(self, x):
            return Dropout(0.5)(x, False), Dropout(0.5)(x, False)

    a, b = Two().apply({}, jnp.ones((64, 64)), rngs={"dropout": jax.random.key(0)})
    assert not np.array_equal(np.asarray(a), np.asarray(b))


def test_threefry_is_jax_s_bit_for_bit():
    """flaxbert's unrolled Threefry-2x32 gives JAX's primitive's words, and the masks are the
    16-bit quarters of those words."""
    import jax.extend

    key = jax.random.key(42)
    k0, k1 = jax.random.key_data(key)
    hi = jax.random.bits(jax.random.key(1), (1000,), jnp.uint32)
    lo = jnp.arange(1000, dtype=jnp.uint32)
    theirs = jax.extend.random.threefry2x32_p.bind(k0, k1, hi, lo)
    ours = jax.jit(dropout.threefry2x32)(k0, k1, hi, lo)
    for a, b in zip(ours, theirs, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # The mask of a (2, 8) array: 2 evaluations a row, counters 0..3.
    words = jax.extend.random.threefry2x32_p.bind(
        k0, k1, jnp.zeros(4, jnp.uint32), jnp.arange(4, dtype=jnp.uint32)
    )
    quarters = np.stack([np.asarray(w) for w in words], -1).view(np.uint16).reshape(2, 8)
    expected = quarters >= drop_threshold(0.5)
    np.testing.assert_array_equal(np.asarray(keep_mask(key, (2, 8), 0.5)), expected)
