import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from flaxbert import loop, optim, pretrain_step
from flaxbert.config import load_config
from flaxbert.data.pretraining import InstanceConfig, PretrainingBatches
from flaxbert.data.synthetic import VOCAB_SIZE, SyntheticCorpus
from flaxbert.model_config import BertConfig
from flaxbert.pretraining_model import BertForPreTraining

SEQ, PRED = 32, 5

pytestmark = pytest.mark.usefixtures("fast_compiles")


def _setup(repo_root, optimizer="adamw", dropout=0.0, **train_overrides):
    config = load_config(
        str(repo_root / "configs/pretrain.py") + ":tiny",
        [
            f"--config.train.optimizer={optimizer}",
            "--config.train.warmup_steps=2",
            "--config.train.num_steps=10",
            *[f"--config.train.{k}={v}" for k, v in train_overrides.items()],
        ],
    )
    model_cfg = BertConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=32,
        num_layers=2,
        num_heads=2,
        intermediate_size=64,
        max_position_embeddings=SEQ,
        hidden_dropout_rate=dropout,
        attention_dropout_rate=dropout,
    )
    model = BertForPreTraining(model_cfg)
    schedule, tx = optim.make_optimizer(config.train)
    state = pretrain_step.create_train_state(model, tx, jax.random.key(0), SEQ, PRED)
    return config, model, schedule, tx, state


def _batch(batch_size=8, step=0):
    corpus = SyntheticCorpus(50, seed=3)
    inst = InstanceConfig(max_seq_length=SEQ, max_predictions_per_seq=PRED, vocab_size=VOCAB_SIZE)
    return {
        k: jnp.asarray(v)
        for k, v in PretrainingBatches(corpus, inst, batch_size, seed=0).batch(step).items()
    }


@pytest.mark.parametrize("optimizer", ["adamw", "lamb"])
def test_grad_accumulation_matches_one_large_batch(repo_root, optimizer):
    _, model, schedule, tx, state = _setup(repo_root, optimizer)
    batch = _batch(8)
    one = jax.jit(pretrain_step.make_train_step(model, tx, schedule, 1))
    four = jax.jit(pretrain_step.make_train_step(model, tx, schedule, 4))
    s1, m1 = one(state, batch, jax.random.key(1))
    s4, m4 = four(state, batch, jax.random.key(1))
    # Micro-batches hold different numbers of predictions: a mean of micro-batch means would
    # differ, so equality shows the loss is the whole batch's.
    weights = np.asarray(batch["masked_lm_weights"]).reshape(2, 4, -1).swapaxes(0, 1)
    assert len({w.sum() for w in weights}) > 1
    for key in ("loss", "mlm_loss", "mlm_accuracy", "nsp_loss", "nsp_accuracy", "grad_norm"):
        np.testing.assert_allclose(m4[key], m1[key], rtol=1e-5, err_msg=key)
    for a, b in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s4.params), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    assert int(s4.step) == 1


def test_train_step_learns_and_reports_all_metrics(repo_root):
    config, model, schedule, tx, state = _setup(repo_root, dropout=0.1, lr_decay="constant")
    step = jax.jit(pretrain_step.make_train_step(model, tx, schedule), donate_argnums=(0,))
    batch = _batch(8)
    losses = []
    for _ in range(20):
        state, metrics = step(state, batch, jax.random.key(0))
        losses.append(float(metrics["loss"]))
    assert (
        set(metrics)
        >= set(pretrain_step.STEP_METRICS)
        >= {
            "loss",
            "mlm_loss",
            "mlm_accuracy",
            "nsp_loss",
            "nsp_accuracy",
            "learning_rate",
            "grad_norm",
            "param_norm",
        }
    )
    assert losses[-1] < losses[0] - 1.0  # memorising one batch must be easy
    np.testing.assert_allclose(
        metrics["loss"], metrics["mlm_loss"] + metrics["nsp_loss"], rtol=1e-6
    )


def test_weight_decay_skips_layer_norm_and_biases(repo_root):
    _, model, schedule, tx, state = _setup(repo_root, max_grad_norm=0.0, weight_decay=0.5)
    mask = optim.decay_mask(state.params)
    assert not mask["bert"]["layer_0"]["attention_layer_norm"]["scale"]
    assert not mask["bert"]["layer_0"]["attention"]["query"]["bias"]
    assert not mask["mlm_output_bias"]
    assert mask["bert"]["layer_0"]["attention"]["query"]["kernel"]
    assert mask["bert"]["embeddings"]["word_embeddings"]
    # With zero gradients only weight decay moves parameters: kernels shrink, the rest stays.
    zeros = jax.tree.map(jnp.zeros_like, state.params)
    opt_state = state.opt_state
    for _ in range(3):  # past the first step, where the warm-up learning rate is 0
        updates, opt_state = tx.update(zeros, opt_state, state.params)
    flat = jax.tree_util.tree_leaves_with_path(updates)
    for path, u in flat:
        name = path[-1].key
        if name == "scale" or name.endswith("bias"):
            assert np.all(np.asarray(u) == 0), jax.tree_util.keystr(path)
        else:
            assert np.abs(np.asarray(u)).max() > 0, jax.tree_util.keystr(path)


def test_schedule_warms_up_then_decays(repo_root):
    config = load_config(
        str(repo_root / "configs/pretrain.py") + ":tiny",
        [
            "--config.train.learning_rate=1e-3",
            "--config.train.warmup_steps=10",
            "--config.train.num_steps=110",
        ],
    )
    s = optim.make_schedule(config.train)
    np.testing.assert_allclose(
        [s(0), s(5), s(10), s(60), s(110)], [0.0, 5e-4, 1e-3, 5e-4, 0.0], atol=1e-9
    )
    config.train.lr_decay = "polynomial"
    config.train.lr_decay_power = 2.0
    np.testing.assert_allclose(optim.make_schedule(config.train)(60), 1e-3 * 0.25, rtol=1e-6)


@pytest.mark.parametrize("max_norm", [0.0, 1.0])
def test_gradients_are_clipped_by_global_norm(repo_root, max_norm):
    _, _, _, tx, state = _setup(repo_root, max_grad_norm=max_norm)
    huge = jax.tree.map(lambda x: jnp.full_like(x, 1e3), state.params)
    _, opt_state = tx.update(huge, state.opt_state, state.params)
    # Adam's first moment after one step is (1 - b1) * the gradient it was given.
    mu = [
        s
        for s in jax.tree.leaves(opt_state, is_leaf=lambda x: hasattr(x, "mu"))
        if hasattr(s, "mu")
    ][0].mu
    seen = float(optax.tree.norm(mu)) / (1 - 0.9)
    expected = max_norm if max_norm else float(optax.tree.norm(huge))
    np.testing.assert_allclose(seen, expected, rtol=1e-4)


def test_nonfinite_message_names_the_step_and_quantity():
    assert loop._nonfinite_message(7, {"loss": float("nan"), "grad_norm": 1.0}) == (
        "non-finite loss at step 7"
    )
    assert "loss and grad_norm" in loop._nonfinite_message(
        3, {"loss": float("inf"), "grad_norm": float("nan")}
    )
    assert loop._nonfinite_message(2, {"loss": 1.0, "grad_norm": 1.0}) is None


def test_train_step_compiles_once(repo_root):
    import chex

    _, model, schedule, tx, state = _setup(repo_root)
    step = jax.jit(
        chex.assert_max_traces(pretrain_step.make_train_step(model, tx, schedule), n=1),
        donate_argnums=(0,),
    )
    for i in range(3):
        state, _ = step(state, _batch(8, step=i), jax.random.key(0))
    assert int(state.step) == 3


def test_nsp_weight_scales_the_nsp_term_of_the_objective(repo_root):
    """train.nsp_weight: loss = MLM + w x NSP. With w = 0 the NSP head gets no gradient (its
    bias, which has no weight decay, stays put); the gradient of w = 2 is that of MLM + 2 NSP,
    read off the NSP bias (only the NSP term reaches it)."""
    _, model, schedule, tx, state = _setup(
        repo_root, max_grad_norm=0.0, weight_decay=0.0, warmup_steps=0, lr_decay="constant"
    )
    batch = _batch(8)
    bias = lambda s: np.asarray(s.params["nsp"]["bias"])  # noqa: E731
    moved = {}
    for w in (0.0, 1.0, 2.0):
        step = jax.jit(pretrain_step.make_train_step(model, tx, schedule, nsp_weight=w))
        new, metrics = step(state, batch, jax.random.key(1))
        moved[w] = bias(new) - bias(state)
        # The logged loss is the unweighted sum whatever the weight.
        np.testing.assert_allclose(
            metrics["loss"], metrics["mlm_loss"] + metrics["nsp_loss"], rtol=1e-6
        )
    np.testing.assert_array_equal(moved[0.0], 0.0)
    assert np.abs(moved[1.0]).min() > 0
    # Adam's first step moves each parameter by ~lr x sign(g): the same direction for w=1, 2.
    np.testing.assert_array_equal(np.sign(moved[2.0]), np.sign(moved[1.0]))


def test_prediction_diversity_tells_the_unigram_plateau_from_reading_the_context():
    targets = np.zeros(50)
    targets[[3, 4, 5, 6, 7, 8, 9, 10]] = [10, 5, 5, 5, 5, 5, 5, 10]  # 8 distinct pieces
    plateau = np.zeros(50)
    plateau[3] = 50  # predicts the most frequent piece every time
    reading = targets.copy()
    reading[[4, 11]] = [3, 2]  # 9 distinct predictions, the most frequent 10 of 50
    assert pretrain_step.prediction_diversity(plateau, targets) == {
        "mlm_distinct_predictions": 1 / 8,
        "mlm_top_prediction_share": 1.0,
    }
    got = pretrain_step.prediction_diversity(reading, targets)
    assert got["mlm_distinct_predictions"] == 9 / 8
    assert got["mlm_top_prediction_share"] == 10 / 50


def test_evaluate_reports_the_diversity_of_masked_predictions(repo_root):
    _, model, _, _, state = _setup(repo_root)
    eval_step = jax.jit(pretrain_step.make_eval_step(model))
    batches = [_batch(8, step=s) for s in range(2)]
    metrics = pretrain_step.evaluate(eval_step, state.params, batches)
    predicted = []
    targets = []
    for b in batches:
        logits = pretrain_step.apply_model(model, state.params, b, True).mlm_logits_BPV
        keep = np.asarray(b["masked_lm_weights"]) > 0
        predicted += list(np.asarray(jnp.argmax(logits, -1))[keep])
        targets += list(np.asarray(b["masked_lm_ids"])[keep])
    counts = np.bincount(predicted)
    assert metrics["eval/mlm_distinct_predictions"] == pytest.approx(
        len(set(predicted)) / len(set(targets))
    )
    assert metrics["eval/mlm_top_prediction_share"] == pytest.approx(counts.max() / len(predicted))
    assert {"eval/mlm_accuracy", "eval/nsp_accuracy", "eval/loss"} <= set(metrics)
