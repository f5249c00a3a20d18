"""The speed switches change the speed, not the numbers: bf16 compute, rematerialisation,
scan over layers, and sequence packing (pre-training and fine-tuning)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tiny import tiny_overrides

from flaxbert import pretrain_step, sharding, train
from flaxbert.config import load_config
from flaxbert.data.instances import InstanceConfig
from flaxbert.data.packing import (
    MIN_PACKED_PAIR,
    PackedRows,
    fill_packed,
    packed_predictions,
    plan_packing,
)
from flaxbert.data.pretraining import PretrainingBatches
from flaxbert.data.synthetic import VOCAB_SIZE, SyntheticCorpus
from flaxbert.finetune_tasks import PackedEpochs, SequenceKind
from flaxbert.model import stack_layers, unstack_layers
from flaxbert.model_config import BertConfig
from flaxbert.pretraining_model import BertForPreTraining
from flaxbert.task_heads import BertForSequenceClassification
from flaxbert.tokenizer import CLS_ID, SEP_ID

pytestmark = pytest.mark.usefixtures("fast_compiles")

SEQ, PRED = 32, 5
MODEL = BertConfig(
    vocab_size=VOCAB_SIZE,
    hidden_size=32,
    num_layers=3,
    num_heads=2,
    intermediate_size=64,
    max_position_embeddings=SEQ,
)


def _max_diff(a, b) -> float:
    return max(jax.tree.leaves(jax.tree.map(lambda x, y: float(jnp.max(jnp.abs(x - y))), a, b)))


def _short_batch(rows=16, seed=0):
    """Unpacked instances that are all short (short_seq_prob=1): the case packing is for."""
    inst = InstanceConfig(
        max_seq_length=SEQ, max_predictions_per_seq=PRED, short_seq_prob=1.0, vocab_size=VOCAB_SIZE
    )
    loader = PretrainingBatches(SyntheticCorpus(60, seed=5), inst, rows, seed=seed)
    return inst, loader.batch(0)


def _loss_and_grads(model, params, batch, deterministic=True, rng=None):
    def loss(p, batch, rng):
        sums = pretrain_step.pretraining_sums(model, p, batch, deterministic, rng)
        return pretrain_step.summarise(sums)["loss"], sums

    (value, sums), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params, batch, rng)
    return value, sums, grads


# ------------------------------------------------------------------------ remat and scan


@pytest.fixture(scope="module")
def plain():
    model = BertForPreTraining(MODEL)
    params = pretrain_step.init_params(model, jax.random.key(0), SEQ, PRED)
    _, batch = _short_batch()
    return model, params, {k: jnp.asarray(v) for k, v in batch.items()}


@pytest.fixture(scope="module")
def plain_grads(plain):
    """The plain model's (loss, grads): deterministic, and with dropout (rng 7)."""
    model, params, batch = plain
    deterministic = _loss_and_grads(model, params, batch)
    dropout = _loss_and_grads(model, params, batch, False, jax.random.key(7))
    return {True: (deterministic[0], deterministic[2]), False: (dropout[0], dropout[2])}


@pytest.mark.parametrize("remat", ["full", "dots"])
def test_remat_gives_the_same_gradients_with_dropout(plain, plain_grads, remat):
    _, params, batch = plain
    rng = jax.random.key(7)
    loss0, g0 = plain_grads[False]
    other = BertForPreTraining(dataclasses.replace(MODEL, remat=remat))
    loss1, _, g1 = _loss_and_grads(other, params, batch, False, rng)
    assert float(loss1) == pytest.approx(float(loss0), abs=1e-6)
    assert _max_diff(g0, g1) < 1e-6


@pytest.mark.parametrize("remat", ["", "full"])
def test_scanned_layers_give_the_same_loss_and_gradients(plain, plain_grads, remat):
    _, params, batch = plain
    loss0, g0 = plain_grads[True]
    scanned = BertForPreTraining(dataclasses.replace(MODEL, scan_layers=True, remat=remat))
    # The scanned model's own parameter tree is the stacked layout of the plain one's.
    own = pretrain_step.init_params(scanned, jax.random.key(0), SEQ, PRED)
    stacked = {**params, "bert": stack_layers(params["bert"], MODEL.num_layers)}
    assert jax.tree.structure(own) == jax.tree.structure(stacked)
    assert own["bert"]["layers"]["layer"]["attention"]["query"]["kernel"].shape[0] == 3
    loss1, _, g1 = _loss_and_grads(scanned, stacked, batch)
    assert float(loss1) == pytest.approx(float(loss0), abs=1e-5)
    g1 = {**g1, "bert": unstack_layers(g1["bert"])}
    assert _max_diff(g0, g1) < 1e-5


def test_stack_unstack_round_trip(plain):
    _, params, _ = plain
    back = unstack_layers(stack_layers(params["bert"], MODEL.num_layers))
    assert jax.tree.structure(back) == jax.tree.structure(params["bert"])
    assert _max_diff(back, params["bert"]) == 0.0


def _tiny_setup(repo_root, overrides, devices):
    config = load_config(
        str(repo_root / "configs/pretrain.py") + ":tiny", [*tiny_overrides(), *overrides]
    )
    model_config = train.validate_pretrain_config(config)
    parallel = sharding.make_parallel(
        config.parallel,
        pretrain_step.logical_dims(model_config),
        config.train.batch_size,
        config.eval.batch_size,
        devices=devices,
    )
    return config, model_config, train.setup_training(config, model_config, parallel)


def test_scan_and_remat_train_under_a_2x2x2_mesh(repo_root):
    """Scanned + rematerialised layers on data 2 x fsdp 2 x tensor 2: the stacked `layers`
    axis stays whole, and a step gives the loss and gradient norm of the plain model on one
    device with the same (stacked) parameters."""
    no_dropout = ["--config.model.hidden_dropout_rate=0", "--config.model.attention_dropout_rate=0"]
    _, _, plain = _tiny_setup(
        repo_root, [*no_dropout, "--config.parallel.data=1"], jax.devices()[:1]
    )
    _, model_config, scanned = _tiny_setup(
        repo_root,
        [
            *no_dropout,
            "--config.model.scan_layers=True",
            "--config.model.remat=full",
            "--config.parallel.data=2",
            "--config.parallel.fsdp=2",
            "--config.parallel.tensor=2",
        ],
        jax.devices(),
    )
    state0 = plain.create_state(jax.random.key(0))
    state1 = scanned.create_state(jax.random.key(0))
    kernel = state1.params["bert"]["layers"]["layer"]["intermediate"]["kernel"]
    assert kernel.shape[0] == model_config.num_layers
    assert kernel.sharding.spec[0] is None  # the layer axis is never split
    assert "tensor" in str(kernel.sharding.spec)  # the rest is, as without scan
    host = jax.device_get(state0.params)
    stacked = {**host, "bert": stack_layers(host["bert"], model_config.num_layers)}
    shardings = jax.tree.map(lambda x: x.sharding, state1.params)
    state1 = state1.replace(params=jax.device_put(stacked, shardings))

    inst = InstanceConfig(max_seq_length=SEQ, max_predictions_per_seq=PRED, vocab_size=VOCAB_SIZE)
    batch = PretrainingBatches(SyntheticCorpus(50, seed=1), inst, 16, seed=0).batch(0)
    results = []
    for setup, state in ((plain, state0), (scanned, state1)):
        step = setup.compile_train_step(state)
        p = setup.parallel
        _, metrics = step(state, p.put_batch(batch), p.put_replicated(jax.random.key(1)))
        results.append(p.fetch(metrics))
    assert results[1]["loss"] == pytest.approx(results[0]["loss"], abs=1e-5)
    assert results[1]["grad_norm"] == pytest.approx(results[0]["grad_norm"], rel=1e-4)


# ------------------------------------------------------------------------------ bf16


def test_bf16_follows_the_float32_loss_curve(repo_root):
    """bfloat16 compute, float32 parameters and optimizer state: 20 steps of the tiny model
    track the float32 run (same data, same init)."""
    steps = 20
    curves = {}
    for dtype in ("float32", "bfloat16"):
        config, _, setup = _tiny_setup(
            repo_root,
            [
                f"--config.model.dtype={dtype}",
                f"--config.train.num_steps={steps}",
                "--config.train.learning_rate=3e-3",
                "--config.parallel.data=1",
            ],
            jax.devices()[:1],
        )
        parallel = setup.parallel
        state = setup.create_state(jax.random.key(0))
        leaves = jax.tree.leaves((state.params, state.opt_state))
        assert all(x.dtype != jnp.bfloat16 for x in leaves)  # float32 master state
        inst = train.instance_config(config.data, VOCAB_SIZE)
        loader = PretrainingBatches(SyntheticCorpus(200, seed=1), inst, 16, seed=0)
        step = setup.compile_train_step(state)
        rng = jax.random.key(1)
        curve = []
        for i in range(steps):
            state, metrics = step(state, parallel.put_batch(loader.batch(i)), rng)
            curve.append(float(metrics["loss"]))
        curves[dtype] = np.array(curve)
    f32, bf16 = curves["float32"], curves["bfloat16"]
    assert f32[-10:].mean() < f32[:5].mean() - 0.3  # it learns
    # bf16 rounding (8 bits of mantissa) moves each step's loss a little, never the trend.
    # Measured on CPU: at most 5e-4 a step, 2.2e-4 on the mean of the last ten; a float32 run
    # from another initialisation seed differs by up to 0.064 and 0.051. The bounds sit ~10x
    # above the first and ~10x below the second; bf16 that computes in float32 differs by 0.
    diff = np.abs(bf16 - f32)
    assert 1e-6 < np.max(diff) < 5e-3, diff
    assert abs(bf16[-10:].mean() - f32[-10:].mean()) < 3e-3


def test_auto_dtype_is_float32_on_cpu():
    assert BertConfig(dtype="auto").dtype == "float32"
    with pytest.raises(ValueError, match="model.remat"):
        BertConfig(remat="some")


# ------------------------------------------------------------------------ packing


def test_packed_rows_give_the_unpacked_loss_and_gradients(plain):
    model, params, _ = plain
    _, batch = _short_batch(rows=16, seed=3)
    # Rows 4x as long as the instances (positions restart per pair, so the position table
    # of SEQ entries suffices).
    k, row_len = 4, 4 * SEQ
    plan = plan_packing(batch["input_mask"].sum(1), 4, row_len, k)
    placement = plan[0]
    assert len(placement) > 4  # the 4 rows hold more pairs than 4
    packed = PackedRows(4, row_len, k, k * PRED, ("next_sentence_labels",), "next_sentence_weights")
    packed = fill_packed(batch, placement, packed).arrays
    unpacked = {key: v[placement[:, 0]] for key, v in batch.items()}
    loss_u, sums_u, g_u = _loss_and_grads(model, params, unpacked)
    loss_p, sums_p, g_p = _loss_and_grads(model, params, packed)
    for key in ("mlm_count", "nsp_count", "mlm_correct", "nsp_correct"):
        assert float(sums_p[key]) == float(sums_u[key])
    assert float(loss_p) == pytest.approx(float(loss_u), abs=1e-5)
    assert _max_diff(g_u, g_p) < 1e-5
    # Fewer rows, the same real tokens.
    assert np.count_nonzero(packed["input_mask"]) == unpacked["input_mask"].sum()


def test_packing_loader_fills_rows_with_well_formed_pairs():
    inst = InstanceConfig(max_seq_length=64, max_predictions_per_seq=10, vocab_size=VOCAB_SIZE)
    corpus = SyntheticCorpus(300, seed=2)
    k = 4
    loader = PretrainingBatches(corpus, inst, 16, seed=0, packing=True, max_pairs_per_row=k)
    b = loader.batch(5)
    again = loader.batch(5)
    assert all(np.array_equal(b[key], again[key]) for key in b)  # pure in (seed, step)
    assert b["masked_lm_positions"].shape == (16, packed_predictions(inst, k))
    assert b["next_sentence_labels"].shape == (16, k)
    used = (b["input_mask"] > 0).sum(1)
    pairs = b["next_sentence_weights"].sum(1)
    # A row stops taking pairs only when full of slots or nearly full of tokens.
    assert np.all((pairs == k) | (64 - used < MIN_PACKED_PAIR))
    for r in range(16):
        for j in range(int(pairs[r])):
            span = np.flatnonzero(b["input_mask"][r] == j + 1)
            start = b["cls_positions"][r, j]
            assert span[0] == start and np.all(np.diff(span) == 1)  # contiguous
            ids = b["input_ids"][r, span]
            assert ids[0] == CLS_ID and ids[-1] == SEP_ID and np.sum(ids == SEP_ID) >= 1
            assert np.array_equal(b["position_ids"][r, span], np.arange(len(span)))
            seg = b["segment_ids"][r, span]
            assert seg[0] == 0 and seg[-1] == 1 and np.all(np.diff(seg) >= 0)
        preds = b["masked_lm_positions"][r][b["masked_lm_weights"][r] > 0]
        assert np.all(b["input_mask"][r, preds] > 0)  # predictions only on real tokens
        assert np.all(b["input_ids"][r, preds] != CLS_ID)
    assert used.mean() > 0.8 * 64  # rows come out nearly full
    # Hosts build their own rows: their union is the single-host batch.
    halves = [
        PretrainingBatches(
            corpus,
            inst,
            16,
            seed=0,
            packing=True,
            max_pairs_per_row=k,
            process_index=i,
            process_count=2,
        ).batch(5)
        for i in range(2)
    ]
    for key in b:
        assert np.array_equal(np.concatenate([h[key] for h in halves]), b[key])


def test_packing_is_refused_with_static_masking(repo_root):
    config = load_config(
        str(repo_root / "configs/pretrain.py") + ":tiny",
        ["--config.data.packing=True", "--config.data.masking=static"],
    )
    with pytest.raises(Exception, match="data.packing needs dynamic masking"):
        train.validate_pretrain_config(config)


def test_packed_pretraining_step_runs_and_reports_real_tokens(repo_root, tmp_path):
    config = load_config(
        str(repo_root / "configs/pretrain.py") + ":tiny",
        [
            *tiny_overrides(),
            "--config.data.packing=True",
            "--config.data.short_seq_prob=0.5",
            "--config.train.num_steps=2",
            "--config.train.log_every=2",
            "--config.eval.num_batches=1",
            "--config.eval.every_steps=2",
            "--config.data.synthetic_documents=200",
            "--config.data.synthetic_eval_documents=40",
        ],
    )
    result = train.pretrain(config, str(tmp_path))
    assert result.final_step == 2
    assert np.isfinite(result.eval_metrics["eval/loss"])
    m = result.train_metrics
    assert 0 < m["real_tokens_per_sec"] <= m["tokens_per_sec"] * 1.0001


# ------------------------------------------------------------------- fine-tuning packing


def _features(n=40, seed=0):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(5, 14, size=n)
    ids = np.zeros((n, SEQ), np.int32)
    mask = np.zeros((n, SEQ), np.int32)
    seg = np.zeros((n, SEQ), np.int32)
    for i, length in enumerate(lengths):
        ids[i, :length] = rng.integers(10, VOCAB_SIZE, size=length)
        ids[i, 0], ids[i, length - 1] = CLS_ID, SEP_ID
        mask[i, :length] = 1
        seg[i, length // 2 : length] = 1
    return {
        "input_ids": ids,
        "input_mask": mask,
        "segment_ids": seg,
        "labels": rng.integers(0, 3, size=n).astype(np.int32),
        "weight": np.ones(n, np.float32),
    }


def test_packed_epochs_visit_every_example_once_per_epoch():
    arrays = _features(40)
    epochs = PackedEpochs(arrays, 4, SEQ, 4, seed=0)
    for epoch in range(2):
        seen = np.concatenate([p[:, 0] for p in epochs.plan(epoch)])
        assert sorted(seen.tolist()) == list(range(40))
    n0 = len(epochs.plan(0))
    assert n0 < 40 // 4  # fewer batches than unpacked
    assert epochs.locate(n0) == (1, 0)
    assert epochs.steps_for(1.5) == n0 + int(np.ceil(0.5 * len(epochs.plan(1))))
    b = epochs.batch(n0 + 1)
    again = PackedEpochs(arrays, 4, SEQ, 4, seed=0).batch(n0 + 1)  # pure in (seed, step)
    assert all(np.array_equal(b[k], again[k]) for k in b)
    assert b["labels"].shape == (4, 4) and b["weight"].sum() == len(epochs.plan(1)[1])


@pytest.mark.parametrize("regression", [False, True])
def test_packed_classification_gives_the_unpacked_loss(regression):
    arrays = _features(24, seed=1)
    if regression:
        arrays["labels"] = arrays["labels"].astype(np.float32) * 0.7
    kind = SequenceKind(3, regression, "accuracy")
    model = BertForSequenceClassification(MODEL, kind.num_labels)
    z = jnp.zeros((1, SEQ), jnp.int32)
    params = model.init(jax.random.key(0), z, jnp.ones_like(z), z)["params"]
    epochs = PackedEpochs(arrays, 4, SEQ, 4, seed=0)
    packed = epochs.batch(0)
    plan = epochs.plan(0)[0]  # (example, row) placements
    # The examples in the order of the packed slots: row by row, in plan order within a row.
    index = np.concatenate([plan[plan[:, 1] == row, 0] for row in range(4)])
    slots = packed["weight"] > 0
    np.testing.assert_array_equal(packed["labels"][slots], arrays["labels"][index])
    unpacked = {k: v[index] for k, v in arrays.items()}

    @jax.jit
    def loss(batch, extra):
        out = model.apply(
            {"params": params},
            batch["input_ids"],
            batch["input_mask"],
            batch["segment_ids"],
            **extra,
        )
        sums = kind.loss_sums(out, batch)
        return sums["loss_sum"] / sums["count"], sums["count"], out

    lp, cp, out_p = loss(packed, {k: packed[k] for k in ("position_ids", "cls_positions")})
    lu, cu, out_u = loss(unpacked, {})
    assert float(cp) == float(cu) == len(index)
    assert float(lp) == pytest.approx(float(lu), abs=1e-5)
    # Each example's own outputs, not only the mean loss: measured on CPU, the packed logits
    # equal the unpacked ones exactly, while letting a row's examples attend to each other
    # moves them by 5e-5 (logits of size 1e-2 at this initialisation, the loss by only 6e-6).
    np.testing.assert_allclose(np.asarray(out_p)[slots], np.asarray(out_u), rtol=0, atol=5e-6)
