import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxbert.model import BertModel
from flaxbert.model_config import BertConfig
from flaxbert.pretraining_model import BertForPreTraining

CFG = BertConfig(
    vocab_size=97,
    hidden_size=32,
    num_layers=2,
    num_heads=4,
    intermediate_size=64,
    max_position_embeddings=64,
    hidden_dropout_rate=0.0,
    attention_dropout_rate=0.0,
)

pytestmark = pytest.mark.usefixtures("fast_compiles")


def _inputs(b=3, length=16, p=4, seed=0):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(6, length + 1, size=b)
    mask = (np.arange(length)[None] < lengths[:, None]).astype(np.int32)
    ids = rng.integers(5, CFG.vocab_size, size=(b, length)).astype(np.int32) * mask
    segments = ((np.arange(length)[None] >= lengths[:, None] // 2) * mask).astype(np.int32)
    positions = np.stack([np.sort(rng.choice(n, size=p, replace=False)) for n in lengths])
    return dict(
        input_ids=jnp.asarray(ids),
        input_mask=jnp.asarray(mask),
        segment_ids=jnp.asarray(segments),
        masked_lm_positions=jnp.asarray(positions.astype(np.int32)),
    )


def _init(model, batch):
    return nn.unbox(model.init(jax.random.key(0), **batch)["params"])


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_shapes_and_dtypes(dtype):
    cfg = BertConfig(**{**CFG.__dict__, "dtype": dtype})
    model = BertForPreTraining(cfg)
    batch = _inputs()
    params = _init(model, batch)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))  # params stay float32
    out = model.apply({"params": params}, **batch)
    assert out.mlm_logits_BPV.shape == (3, 4, CFG.vocab_size)
    assert out.nsp_logits_B2.shape == (3, 2)
    assert out.mlm_logits_BPV.dtype == jnp.dtype(dtype)
    enc = BertModel(cfg).apply(
        {"params": params["bert"]}, batch["input_ids"], batch["input_mask"], batch["segment_ids"]
    )
    assert enc.sequence_BLD.shape == (3, 16, 32) and enc.pooled_BD.shape == (3, 32)
    assert np.all(np.abs(np.asarray(enc.pooled_BD, np.float32)) <= 1.0)  # tanh pooler


def test_parameter_tree_and_logical_names():
    model = BertForPreTraining(CFG)
    boxed = model.init(jax.random.key(0), **_inputs())["params"]
    specs = nn.get_partition_spec(boxed)
    layer = specs["bert"]["layer_0"]
    assert tuple(layer["attention"]["query"]["kernel"]) == ("embed", "heads", "kv")
    assert tuple(layer["attention"]["output"]["kernel"]) == ("heads", "kv", "embed")
    assert tuple(layer["intermediate"]["kernel"]) == ("embed", "mlp")
    assert tuple(layer["output"]["kernel"]) == ("mlp", "embed")
    assert tuple(specs["bert"]["embeddings"]["word_embeddings"]) == ("vocab", "embed")
    params = nn.unbox(boxed)
    assert set(params["bert"]) == {"embeddings", "layer_0", "layer_1", "pooler"}
    shapes = jax.tree.map(jnp.shape, params)
    assert shapes["bert"]["layer_1"]["attention"]["key"]["kernel"] == (32, 4, 8)
    assert shapes["bert"]["layer_1"]["intermediate"]["kernel"] == (32, 64)
    # Truncated normal(0.02): no value beyond two standard deviations, std close to 0.02.
    emb = np.asarray(params["bert"]["embeddings"]["word_embeddings"])
    assert np.abs(emb).max() <= 0.04 + 1e-6 and 0.014 < emb.std() < 0.02


def test_padding_does_not_change_real_positions():
    model = BertModel(CFG)
    batch = _inputs(b=2, length=12)
    params = _init(BertForPreTraining(CFG), batch)["bert"]
    extra = 9
    padded = {
        k: jnp.pad(batch[k], ((0, 0), (0, extra)), constant_values=v)
        for k, v in (("input_ids", 7), ("input_mask", 0), ("segment_ids", 1))
    }
    a = model.apply(
        {"params": params}, batch["input_ids"], batch["input_mask"], batch["segment_ids"]
    )
    b = model.apply(
        {"params": params}, padded["input_ids"], padded["input_mask"], padded["segment_ids"]
    )
    real = np.asarray(batch["input_mask"], bool)
    np.testing.assert_allclose(
        np.asarray(b.sequence_BLD)[:, :12][real], np.asarray(a.sequence_BLD)[real], atol=1e-5
    )
    np.testing.assert_allclose(b.pooled_BD, a.pooled_BD, atol=1e-5)
    # The padding itself must matter somewhere, or the check above proves nothing.
    c = model.apply(
        {"params": params},
        batch["input_ids"],
        jnp.ones_like(batch["input_mask"]),
        batch["segment_ids"],
    )
    assert not np.allclose(
        np.asarray(c.sequence_BLD)[real], np.asarray(a.sequence_BLD)[real], atol=1e-3
    )


def test_gathered_mlm_head_equals_full_logits_gathered():
    model = BertForPreTraining(CFG)
    batch = _inputs()
    params = _init(model, batch)
    out = model.apply({"params": params}, **batch)
    full = model.apply(
        {"params": params},
        batch["input_ids"],
        batch["input_mask"],
        batch["segment_ids"],
        method=BertForPreTraining.all_position_mlm_logits,
    )
    assert full.shape == (3, 16, CFG.vocab_size)
    gathered = jnp.take_along_axis(full, batch["masked_lm_positions"][..., None], axis=1)
    np.testing.assert_allclose(out.mlm_logits_BPV, gathered, rtol=1e-5, atol=1e-5)


def test_decoder_is_tied_to_word_embeddings():
    model = BertForPreTraining(CFG)
    batch = _inputs()
    params = _init(model, batch)
    # No separate decoder matrix: the only (V, D) parameter is the word-embedding table.
    vd = [
        path
        for path, x in jax.tree_util.tree_leaves_with_path(params)
        if x.shape == (CFG.vocab_size, CFG.hidden_size)
    ]
    assert len(vd) == 1 and "word_embeddings" in jax.tree_util.keystr(vd[0])

    # A token id that appears nowhere in the input still receives gradient through the
    # decoder, so the table row is used as an output embedding.
    unused = int(np.setdiff1d(np.arange(5, CFG.vocab_size), np.asarray(batch["input_ids"]))[0])

    def loss(p):
        logits = model.apply({"params": p}, **batch).mlm_logits_BPV
        return logits[..., unused].sum()

    grad = jax.grad(loss)(params)["bert"]["embeddings"]["word_embeddings"]
    assert np.abs(np.asarray(grad[unused])).sum() > 0
    # And changing that row changes the logit for that token.
    table = params["bert"]["embeddings"]["word_embeddings"]
    changed = jax.tree.map(lambda x: x, params)
    changed["bert"]["embeddings"]["word_embeddings"] = table.at[unused].add(1.0)
    before = model.apply({"params": params}, **batch).mlm_logits_BPV[..., unused]
    after = model.apply({"params": changed}, **batch).mlm_logits_BPV[..., unused]
    assert not np.allclose(before, after)


def test_dropout_is_active_only_when_not_deterministic():
    cfg = BertConfig(**{**CFG.__dict__, "hidden_dropout_rate": 0.1, "attention_dropout_rate": 0.1})
    model = BertForPreTraining(cfg)
    batch = _inputs()
    params = _init(model, batch)
    det1 = model.apply({"params": params}, **batch).nsp_logits_B2
    det2 = model.apply({"params": params}, **batch).nsp_logits_B2
    np.testing.assert_array_equal(det1, det2)
    drop = lambda k: (
        model.apply(
            {"params": params}, **batch, deterministic=False, rngs={"dropout": jax.random.key(k)}
        ).nsp_logits_B2
    )
    assert not np.allclose(drop(1), drop(2))
    np.testing.assert_array_equal(drop(3), drop(3))


def test_bert_config_validation_names_the_key():
    with pytest.raises(ValueError, match="model.hidden_size"):
        BertConfig(hidden_size=30, num_heads=4)
    with pytest.raises(ValueError, match="model.dtype"):
        BertConfig(dtype="float64")
    with pytest.raises(ValueError, match="did you mean model.num_layers"):
        BertConfig.from_dict({"num_layer": 2})
    with pytest.raises(dataclasses_frozen_error()):
        CFG.hidden_size = 64


def dataclasses_frozen_error():
    import dataclasses

    return dataclasses.FrozenInstanceError


def _without(params, heads):
    """A pre-training tree with `heads` ('pooler', 'mlm', 'nsp') taken out."""
    out = {k: v for k, v in params.items() if not ("nsp" in heads and k == "nsp")}
    if "mlm" in heads:
        out = {k: v for k, v in out.items() if not k.startswith("mlm_")}
    if "pooler" in heads:
        out["bert"] = {k: v for k, v in out["bert"].items() if k != "pooler"}
    return out


@pytest.mark.parametrize(
    "kept",
    [("pooler", "mlm", "nsp"), ("mlm",), ("pooler", "mlm"), ("pooler",), ()],
    ids=["pretraining", "masked-lm", "masked-lm+pooler", "encoder+pooler", "encoder"],
)
def test_every_head_combination_runs(kept):
    """A tree with only some heads (as a converted BertForMaskedLM or BertModel has): every
    method that does not need a missing head gives the full model's numbers; one that does
    names the missing head instead of Flax's ScopeParamNotFoundError."""
    batch = _inputs()
    full = _init(BertForPreTraining(CFG), batch)
    params = _without(full, {"pooler", "mlm", "nsp"} - set(kept))
    from flaxbert.pretraining_model import heads_of

    assert heads_of(params) == kept
    variables = {"params": params}
    args = (batch["input_ids"], batch["input_mask"], batch["segment_ids"])
    expected = BertForPreTraining(CFG).apply({"params": full}, **batch)
    expected_all = BertForPreTraining(CFG).apply(
        {"params": full}, *args, method=BertForPreTraining.all_position_mlm_logits
    )

    # The default model (all heads) runs what the parameters allow.
    if "mlm" in kept:
        logits = BertForPreTraining(CFG).apply(
            variables, *args, method=BertForPreTraining.all_position_mlm_logits
        )
        np.testing.assert_array_equal(np.asarray(logits), np.asarray(expected_all))
    else:
        with pytest.raises(ValueError, match="no mlm head.*for_params"):
            BertForPreTraining(CFG).apply(
                variables, *args, method=BertForPreTraining.all_position_mlm_logits
            )
    if kept != ("pooler", "mlm", "nsp"):
        missing = [h for h in ("pooler", "mlm", "nsp") if h not in kept]
        with pytest.raises(ValueError, match=f"no {' / '.join(missing)} head.*for_params"):
            BertForPreTraining(CFG).apply(variables, **batch)

    # The model that fits the parameters gives the heads it has, and None for the others.
    model = BertForPreTraining.for_params(CFG, params)
    out = model.apply(variables, **batch)
    if "mlm" in kept:
        np.testing.assert_array_equal(
            np.asarray(out.mlm_logits_BPV), np.asarray(expected.mlm_logits_BPV)
        )
    else:
        assert out.mlm_logits_BPV is None
        with pytest.raises(ValueError, match="no MLM head"):
            model.apply(variables, *args, method=BertForPreTraining.all_position_mlm_logits)
    if "nsp" in kept:
        np.testing.assert_array_equal(
            np.asarray(out.nsp_logits_B2), np.asarray(expected.nsp_logits_B2)
        )
    else:
        assert out.nsp_logits_B2 is None
    # And it initialises to the same tree layout.
    fresh = _init(model, batch)
    assert jax.tree.structure(fresh) == jax.tree.structure(params)

    # The encoder: with its pooler when present, without it always.
    enc = BertModel(CFG, add_pooler="pooler" in kept).apply({"params": params["bert"]}, *args)
    np.testing.assert_array_equal(
        np.asarray(enc.sequence_BLD),
        np.asarray(BertModel(CFG).apply({"params": full["bert"]}, *args).sequence_BLD),
    )
    assert (enc.pooled_BD is not None) == ("pooler" in kept)
    no_pool = BertModel(CFG).apply({"params": params["bert"]}, *args, pool=False)
    assert no_pool.pooled_BD is None


def test_nsp_without_pooler_is_refused():
    with pytest.raises(ValueError, match="NSP head reads the pooled"):
        _init(BertForPreTraining(CFG, add_pooler=False), _inputs())


def test_inputs_beyond_the_tables_are_refused():
    """An input longer than max_position_embeddings (64) is refused while tracing (jit or
    not), naming both lengths; out-of-table ids in concrete arrays are refused naming the
    table, instead of the NaN that reading past a table gives."""
    cfg = BertConfig(**{**CFG.__dict__, "max_position_embeddings": 16})
    batch = _inputs(b=2, length=16)
    params = _init(BertModel(cfg), {k: v for k, v in batch.items() if k != "masked_lm_positions"})
    model = BertModel(cfg)
    ok = model.apply(
        {"params": params}, batch["input_ids"], batch["input_mask"], batch["segment_ids"]
    )
    assert np.isfinite(np.asarray(ok.sequence_BLD)).all()

    long_ids = jnp.ones((2, 17), jnp.int32)
    run = lambda ids, mask, seg: model.apply({"params": params}, ids, mask, seg)  # noqa: E731
    for call in (run, jax.jit(run)):
        with pytest.raises(
            ValueError, match=r"input length 17 exceeds .*max_position_embeddings=16"
        ):
            call(long_ids, long_ids, long_ids * 0)
    with pytest.raises(ValueError, match=r"input length 17 exceeds .*=16"):
        BertForPreTraining(cfg).apply(
            {"params": _init(BertForPreTraining(cfg), batch)},
            long_ids,
            long_ids,
            long_ids * 0,
            method=BertForPreTraining.all_position_mlm_logits,
        )

    ids, mask, seg = batch["input_ids"], batch["input_mask"], batch["segment_ids"]
    with pytest.raises(ValueError, match=r"position_ids holds ids from 3 to 18 .* 16 rows"):
        model.apply({"params": params}, ids, mask, seg, jnp.arange(3, 19)[None].repeat(2, 0))
    with pytest.raises(ValueError, match=r"position_ids has shape \(2, 8\) but input_ids has"):
        model.apply({"params": params}, ids, mask, seg, jnp.zeros((2, 8), jnp.int32))
    with pytest.raises(ValueError, match=r"input_ids holds ids from 0 to 97 .*vocab_size=97"):
        model.apply({"params": params}, ids.at[0, 0].set(97), mask, seg)
    with pytest.raises(ValueError, match=r"segment_ids holds ids from -1 to 1 .*type_vocab_size"):
        model.apply({"params": params}, ids, mask, seg.at[1, 3].set(-1))
    # Rows longer than the table are fine when their positions fit it (packed rows restart
    # them per pair); the largest position the table holds is fine.
    restarted = jnp.tile(jnp.arange(16), 2)[None].repeat(2, 0)
    twice = jnp.concatenate([ids, ids], axis=1)
    packed = model.apply(
        {"params": params}, twice, jnp.concatenate([mask, mask], 1), twice * 0, restarted
    )
    np.testing.assert_allclose(
        np.asarray(packed.sequence_BLD[:, 16:][mask > 0]),
        np.asarray(packed.sequence_BLD[:, :16][mask > 0]),
        atol=1e-5,
    )
    out = model.apply({"params": params}, ids, mask, seg, jnp.full((2, 16), 15, jnp.int32))
    assert np.isfinite(np.asarray(out.sequence_BLD)).all()


@pytest.mark.parametrize(
    "in_shape, out_shape, flax_module",
    [
        ((16,), (40,), lambda: nn.Dense(40)),  # I < O: the feed-forward intermediate
        ((40,), (16,), lambda: nn.Dense(16)),  # I > O: the feed-forward output
        ((16,), (4, 8), lambda: nn.DenseGeneral((4, 8))),  # query / key / value
        ((4, 8), (16,), lambda: nn.DenseGeneral(16, axis=(-2, -1))),  # attention output
    ],
)
def test_projection_is_flax_dense_computed_as_one_matmul(in_shape, out_shape, flax_module):
    """flaxbert's Projection (rows flattened into one matmul; on the CPU its weight gradient
    taken in XLA:CPU's fast orientation) has flax Dense / DenseGeneral's parameters, initial
    values, outputs and gradients."""
    from flaxbert.model import Projection

    cfg = BertConfig(hidden_size=16, num_heads=4, initializer_range=0.5)
    names = ("a", "b", "c")[: len(in_shape) + len(out_shape)]
    ours = Projection(in_shape, out_shape, names, cfg)
    theirs = flax_module()
    theirs = theirs.clone(kernel_init=nn.initializers.truncated_normal(stddev=0.5))
    x = jax.random.normal(jax.random.key(0), (3, 5, *in_shape))
    p_theirs = theirs.init(jax.random.key(1), x)["params"]
    p_ours = nn.unbox(ours.init(jax.random.key(1), x)["params"])
    assert jax.tree.map(jnp.shape, p_ours) == jax.tree.map(jnp.shape, p_theirs)
    np.testing.assert_array_equal(p_ours["kernel"], p_theirs["kernel"])  # same initial values
    # A bias that is not zero, the same for both from here on.
    params = dict(p_theirs, bias=jax.random.normal(jax.random.key(2), p_theirs["bias"].shape))

    def loss(module, p, x):
        y = module.apply({"params": p}, x)
        return jnp.sum(jnp.sin(y) * jnp.arange(y.size).reshape(y.shape))

    for argnums in (0, 1):  # the gradients of the parameters and of the input
        g_ours = jax.jit(jax.grad(lambda p, x: loss(ours, p, x), argnums))(params, x)
        g_theirs = jax.grad(lambda p, x: loss(theirs, p, x), argnums)(params, x)
        for a, b in zip(jax.tree.leaves(g_ours), jax.tree.leaves(g_theirs), strict=True):
            np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(
        ours.apply({"params": params}, x), theirs.apply({"params": params}, x), rtol=1e-5
    )
    with pytest.raises(ValueError, match="does not end in"):
        ours.apply({"params": params}, jnp.ones((3, 7)))


def _zero_feed_forward_output(params):
    """Zeroes the feed-forward output projection (`output`, not `attention/output`) of every
    layer, so that residual branch adds exactly 0."""

    def zero(path, x):
        names = [getattr(k, "key", "") for k in path]
        return jnp.zeros_like(x) if names[-2] == "output" and "attention" not in names else x

    return jax.tree_util.tree_map_with_path(zero, params)


def _layer_norm_ref(x, scale, bias):
    return (
        scale * (x - x.mean(-1, keepdims=True)) / jnp.sqrt(x.var(-1, keepdims=True) + 1e-12) + bias
    )


@pytest.mark.parametrize("scan", [False, True])
def test_pre_layer_norm_blocks(scan):
    """Pre-LN (Xiong et al., 2020): x + Attn(LN(x)) then x + FFN(LN(x)), and one final
    LayerNorm; post-LN: LN(x + Attn(x)) then LN(x + FFN(x)). Checked on a one-layer encoder
    whose feed-forward branch is zeroed, against the attention module applied by hand."""
    from flaxbert.model import SelfAttention, attention_mask

    batch = _inputs()
    base = {**CFG.__dict__, "num_layers": 1, "scan_layers": scan}
    pre = BertModel(BertConfig(**{**base, "pre_layer_norm": True}))
    post = BertModel(BertConfig(**base))
    args = (batch["input_ids"], batch["input_mask"], batch["segment_ids"])
    pre_params = nn.unbox(pre.init(jax.random.key(0), *args)["params"])
    post_params = nn.unbox(post.init(jax.random.key(0), *args)["params"])
    # The same parameter tree plus `final_layer_norm`, and the same initial values.
    assert set(pre_params) - set(post_params) == {"final_layer_norm"}
    for a, b in zip(
        jax.tree.leaves({k: v for k, v in pre_params.items() if k != "final_layer_norm"}),
        jax.tree.leaves(post_params),
        strict=True,
    ):
        np.testing.assert_array_equal(a, b)

    # Distinct scales and biases: final LN (2, 0.5), the block's attention LN (3, -1).
    def distinct(path, x):
        names = [getattr(k, "key", "") for k in path]
        if names[0] == "final_layer_norm":
            return x * 0 + (2.0 if names[-1] == "scale" else 0.5)
        if "attention_layer_norm" in names:
            return x * 0 + (3.0 if names[-1] == "scale" else -1.0)
        return x

    mask = attention_mask(batch["input_mask"], packed=False)
    cfg = BertConfig(**base)
    for model, params, is_pre in ((pre, pre_params, True), (post, post_params, False)):
        params = _zero_feed_forward_output(jax.tree_util.tree_map_with_path(distinct, params))
        layer = params["layers"]["layer"] if scan else params["layer_0"]
        if scan:
            layer = jax.tree.map(lambda x: x[0], layer)

        def attn(h, layer=layer):
            return SelfAttention(cfg).apply({"params": layer["attention"]}, h, mask, True)

        out = model.apply({"params": params}, *args, all_layers=True)
        e = out.hidden_states[0]
        if is_pre:
            expect = _layer_norm_ref(e + attn(_layer_norm_ref(e, 3.0, -1.0)), 2.0, 0.5)
        else:  # the output LN has scale 1 and bias 0
            expect = _layer_norm_ref(_layer_norm_ref(e + attn(e), 3.0, -1.0), 1.0, 0.0)
        np.testing.assert_allclose(out.sequence_BLD, expect, atol=2e-4)
        np.testing.assert_allclose(out.hidden_states[-1], expect, atol=2e-4)


def test_pre_layer_norm_scanned_equals_unrolled():
    from flaxbert.model import stack_layers

    batch = _inputs()
    args = (batch["input_ids"], batch["input_mask"], batch["segment_ids"])
    flat = BertModel(BertConfig(**{**CFG.__dict__, "pre_layer_norm": True}))
    scanned = BertModel(BertConfig(**{**CFG.__dict__, "pre_layer_norm": True, "scan_layers": True}))
    params = nn.unbox(flat.init(jax.random.key(1), *args)["params"])
    expect = flat.apply({"params": params}, *args).sequence_BLD
    got = scanned.apply({"params": stack_layers(params, CFG.num_layers)}, *args).sequence_BLD
    np.testing.assert_allclose(got, expect, atol=1e-5)
