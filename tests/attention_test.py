import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxbert import attention
from flaxbert.attention import AttentionChoice, attend, choose_attention
from flaxbert.model import attention_mask

BASE = dict(
    backend="gpu",
    dtype="bfloat16",
    packed=False,
    dropout=False,
    jax_version="0.10.2",
    requested="",
    head_dim=64,
)

# (changes to BASE, impl, use_seq_lengths, a piece of the reason)
CASES = [
    ({}, "cudnn", True, "key_value_seq_lengths"),
    ({"backend": "cuda", "dtype": "float16", "jax_version": "0.11.0"}, "cudnn", True, "cuDNN"),
    ({"dtype": "float32"}, "xla", False, "16-bit"),
    ({"backend": "cpu"}, "xla", False, "NVIDIA"),
    ({"backend": "cpu", "dtype": "float32"}, "xla", False, "NVIDIA"),
    ({"backend": "tpu"}, "xla", False, "NVIDIA"),
    ({"backend": "rocm"}, "xla", False, "NVIDIA"),
    ({"head_dim": 12}, "xla", False, "head size"),
    ({"head_dim": 256}, "xla", False, "head size"),
    ({"packed": True}, "xla", False, "segment ids"),
    ({"packed": True, "jax_version": "0.11.1"}, "xla", False, "segment ids"),
    ({"jax_version": "0.9.0"}, "xla", False, "older"),
    ({"dropout": True}, "materialised", False, "attention_dropout_rate=0 to train on cuDNN"),
    ({"dropout": True, "jax_version": "0.11.0"}, "materialised", False, "no dropout argument"),
    ({"dropout": True, "backend": "cpu"}, "materialised", False, "no dropout argument"),
    ({"dropout": True, "packed": True}, "materialised", False, "no dropout argument"),
    ({"requested": "xla"}, "xla", False, "model.attention_impl='xla'"),
    ({"requested": "xla", "backend": "cpu", "dtype": "float32"}, "xla", False, "'xla'"),
    ({"requested": "xla", "packed": True}, "xla", False, "'xla'"),
    ({"requested": "xla", "dropout": True}, "materialised", False, "'xla'"),
    ({"requested": "cudnn"}, "cudnn", True, "cuDNN"),
    ({"requested": "cudnn", "dropout": True}, "materialised", False, "no dropout argument"),
]


@pytest.mark.parametrize("changes, impl, seq_lengths, why", CASES)
def test_choice_table(changes, impl, seq_lengths, why):
    choice = choose_attention(**{**BASE, **changes})
    assert (choice.impl, choice.use_seq_lengths) == (impl, seq_lengths)
    assert why in choice.reason
    # Pure: the same inputs give the same (frozen, comparable) answer.
    assert choose_attention(**{**BASE, **changes}) == choice


@pytest.mark.parametrize(
    "changes, why",
    [
        ({"backend": "cpu"}, "NVIDIA GPU"),
        ({"backend": "cpu", "dropout": True}, "NVIDIA GPU"),  # refused in training and eval alike
        ({"dtype": "float32"}, "16-bit"),
        ({"packed": True}, "packed"),
        ({"head_dim": 12}, "head size"),
    ],
)
def test_requested_cudnn_where_it_cannot_run_is_refused(changes, why):
    with pytest.raises(ValueError, match="model.attention_impl='cudnn'") as err:
        choose_attention(**{**BASE, "requested": "cudnn", **changes})
    assert why in str(err.value) and "model.attention_impl=''" in str(err.value)


def test_unknown_request_is_refused():
    with pytest.raises(ValueError, match="model.attention_impl='flash'"):
        choose_attention(**{**BASE, "requested": "flash"})


def _qkv_and_mask(dtype=jnp.float32, b=4, length=16, n=2, h=8, packed=False):
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.normal(size=(b, length, n, h)), dtype) for _ in range(3))
    lengths = np.array([length, 11, 6, 1])[:b]  # a full row, padded rows, one real token
    input_mask = (np.arange(length)[None] < lengths[:, None]).astype(np.int32)
    if packed:  # two pairs in each row, then padding
        input_mask = input_mask * np.where(np.arange(length)[None] < lengths[:, None] // 2, 1, 2)
    return q, k, v, attention_mask(jnp.asarray(input_mask), packed=packed), lengths


XLA_DENSE = AttentionChoice("xla", False, "test: xla, dense mask")
XLA_LENGTHS = AttentionChoice("xla", True, "test: xla, sequence lengths")
MATERIALISED = AttentionChoice("materialised", False, "test: materialised")


def test_sequence_lengths_count_the_real_tokens():
    *_, mask, lengths = _qkv_and_mask()
    np.testing.assert_array_equal(attention.key_lengths(mask), lengths)
    assert attention.key_lengths(mask).dtype == jnp.int32
    # A row of padding alone still attends to something: no NaN from an empty softmax.
    empty = jnp.zeros((1, 1, 1, 16), bool)
    np.testing.assert_array_equal(attention.key_lengths(empty), [1])


def test_sequence_lengths_equal_the_dense_mask_on_trailing_padding():
    q, k, v, mask, lengths = _qkv_and_mask()
    dense = attend(q, k, v, mask_B1QL=mask, choice=XLA_DENSE)
    by_lengths = attend(q, k, v, mask_B1QL=mask, choice=XLA_LENGTHS)
    # Every query, padding ones too (they see the real keys in both).
    np.testing.assert_allclose(by_lengths, dense, rtol=1e-6, atol=1e-6)
    # And the padding keys really are ignored: changing them changes nothing.
    noise = jnp.where(jnp.arange(16)[None, :, None, None] >= lengths[:, None, None, None], 9.0, 0)
    moved = attend(q, k + noise, v + noise, mask_B1QL=mask, choice=XLA_LENGTHS)
    np.testing.assert_allclose(moved, by_lengths, rtol=1e-6, atol=1e-6)


def test_sequence_lengths_refuse_packed_rows():
    q, k, v, mask, _ = _qkv_and_mask(packed=True)
    with pytest.raises(ValueError, match="unpacked rows only"):
        attend(q, k, v, mask_B1QL=mask, choice=XLA_LENGTHS)


@pytest.mark.parametrize("packed", [False, True])
def test_materialised_equals_xla_without_dropout(packed):
    q, k, v, mask, _ = _qkv_and_mask(packed=packed)
    xla = attend(q, k, v, mask_B1QL=mask, choice=XLA_DENSE)
    mat = attend(q, k, v, mask_B1QL=mask, choice=MATERIALISED)
    assert mat.shape == q.shape and mat.dtype == q.dtype
    np.testing.assert_allclose(mat, xla, rtol=1e-5, atol=1e-6)


def test_materialised_applies_the_dropout_callable_to_the_probabilities():
    q, k, v, mask, _ = _qkv_and_mask()
    seen = []

    def dropout(probs_BNLL):
        seen.append(probs_BNLL)
        return jnp.zeros_like(probs_BNLL)

    out = attend(q, k, v, mask_B1QL=mask, choice=MATERIALISED, dropout=dropout)
    assert np.all(np.asarray(out) == 0)
    (probs,) = seen
    assert probs.shape == (4, 2, 16, 16) and probs.dtype == q.dtype
    np.testing.assert_allclose(np.asarray(probs).sum(-1), 1.0, rtol=1e-5)
    # Masked keys get no probability.
    assert np.all(np.asarray(probs)[~np.broadcast_to(np.asarray(mask), probs.shape)] == 0)


def test_each_reason_is_logged_once(caplog):
    attention._LOGGED.clear()
    q, k, v, mask, _ = _qkv_and_mask()
    other = AttentionChoice("xla", False, "test: another reason")
    with caplog.at_level(logging.INFO, logger="flaxbert.attention"):
        for choice in (XLA_DENSE, XLA_DENSE, other, XLA_DENSE, other):
            attend(q, k, v, mask_B1QL=mask, choice=choice)
    messages = [r.getMessage() for r in caplog.records if r.name == "flaxbert.attention"]
    assert messages == ["attention: test: xla, dense mask", "attention: test: another reason"]


def test_the_model_asks_for_cudnn_on_an_nvidia_gpu_and_says_why_not_otherwise(
    monkeypatch, fast_compiles
):
    """`SelfAttention`'s wiring: the platform, dtype, packing and dropout it passes. The
    platform is faked as an NVIDIA GPU; what runs is XLA (no cuDNN here), the choice recorded."""
    from flaxbert.model import BertModel
    from flaxbert.model_config import BertConfig

    seen = []

    def spy(q, k, v, *, mask_B1QL, choice, dropout=None):
        seen.append((choice.impl, choice.use_seq_lengths, dropout is not None, choice.reason))
        run = (
            choice
            if choice.impl == "materialised"
            else XLA_LENGTHS
            if choice.use_seq_lengths
            else XLA_DENSE
        )
        return attend(q, k, v, mask_B1QL=mask_B1QL, choice=run, dropout=dropout)

    monkeypatch.setattr(attention, "platform", lambda: "gpu")
    monkeypatch.setattr(attention, "attend", spy)
    cfg = BertConfig(
        vocab_size=50,
        hidden_size=32,
        num_layers=1,
        num_heads=2,
        intermediate_size=32,
        max_position_embeddings=16,
        dtype="bfloat16",
        attention_dropout_rate=0.1,
    )
    model = BertModel(cfg)
    ids = jnp.ones((2, 16), jnp.int32)
    mask = (jnp.arange(16)[None] < jnp.array([[16], [9]])).astype(jnp.int32)
    # Traced only (eval_shape): the choice is made while tracing, nothing needs to run.
    params = jax.eval_shape(model.init, jax.random.key(0), ids, mask, jnp.zeros_like(ids))
    trace = lambda *args, **kw: jax.eval_shape(lambda p: model.apply(p, *args, **kw), params)
    seen.clear()
    trace(ids, mask, jnp.zeros_like(ids))
    assert seen[0][:3] == ("cudnn", True, False) and len(seen) == 1
    seen.clear()
    trace(
        ids,
        mask,
        jnp.zeros_like(ids),
        deterministic=False,
        rngs={"dropout": jax.random.key(1)},
    )
    assert seen[0][:3] == ("materialised", False, True) and len(seen) == 1
    assert "model.attention_dropout_rate=0" in seen[0][3]
    seen.clear()
    pairs = jnp.array([[1] * 8 + [2] * 6 + [0] * 2] * 2, jnp.int32)  # two pairs per row
    positions = jnp.array([list(range(8)) + list(range(6)) + [0, 0]] * 2, jnp.int32)
    trace(
        ids,
        pairs,
        jnp.zeros_like(ids),
        position_ids=positions,
        cls_positions=jnp.array([[0, 8]] * 2, jnp.int32),
    )
    assert seen[0][:3] == ("xla", False, False) and "packed" in seen[0][3]
