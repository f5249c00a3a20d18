"""The learning rate after a skipped (non-finite) update: the schedule follows applied updates.

`optax.apply_if_finite` leaves the inner optimizer's count alone on a skipped update, so the
update after it uses the rate the skipped one would have had. The logged `learning_rate` must
be that applied rate. It is measured here from the update itself: with Adam's b1 = b2 = 0, no
weight decay and no clipping, every parameter moves by lr * g / (|g| + eps), so the largest
move of any parameter is the applied rate (up to float32 rounding).

Settings of the reported case: lr 1.0, warm-up 10 steps, the 3rd of 5 batches non-finite:
applied rates 0.0, 0.1, (skipped), 0.2, 0.3.
"""

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tiny import tiny_overrides

from flaxbert import finetune_tasks, optim, train
from flaxbert.config import load_config
from flaxbert.data.pretraining import InstanceConfig, PretrainingBatches
from flaxbert.data.synthetic import VOCAB_SIZE, SyntheticCorpus
from flaxbert.finetune_step import make_finetune_step
from flaxbert.finetune_step import optimizer_config as _optimizer_config
from flaxbert.model_config import BertConfig

pytestmark = pytest.mark.usefixtures("fast_compiles")

SEQ, PRED, BATCH, STEPS, BAD = 32, 5, 16, 5, 2  # BAD: 0-based index of the non-finite batch
APPLIED = [0.0, 0.1, None, 0.2, 0.3]  # the rate each step applies (None: skipped)

SGD_LIKE = [  # each parameter moves by exactly lr * sign(gradient)
    "--config.train.learning_rate=1.0",
    "--config.train.adam_b1=0.0",
    "--config.train.adam_b2=0.0",
    "--config.train.adam_eps=1e-30",
    "--config.train.weight_decay=0.0",
    "--config.train.max_grad_norm=0.0",
    "--config.train.lr_decay=constant",
    "--config.train.nonfinite=skip",
    "--config.model.hidden_dropout_rate=0.0",
    "--config.model.attention_dropout_rate=0.0",
]


def _largest_move(before, after) -> float:
    return max(
        float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
        for a, b in zip(jax.tree.leaves(after), jax.tree.leaves(before), strict=True)
    )


def _check_steps(step_fn, state, batches):
    """Runs the steps; returns [(logged learning_rate, measured move) or None if skipped]."""
    seen = []
    for i, batch in enumerate(batches):
        new, metrics = step_fn(state, batch, jax.random.key(1))
        skipped = int(metrics["skipped_updates"]) > int(optim.skipped_updates(state.opt_state))
        assert skipped == (i == BAD), i
        seen.append(
            None
            if skipped
            else (float(metrics["learning_rate"]), _largest_move(state.params, new.params))
        )
        state = new
    return seen, state


def _assert_logged_is_applied(seen):
    for i, (got, want) in enumerate(zip(seen, APPLIED, strict=True)):
        if want is None:
            assert got is None, i
            continue
        logged, moved = got
        np.testing.assert_allclose(moved, want, rtol=1e-5, atol=1e-7, err_msg=f"step {i + 1}")
        np.testing.assert_allclose(logged, moved, rtol=1e-5, atol=1e-7, err_msg=f"step {i + 1}")


def _pretrain_config(repo_root, accum, *extra):
    return load_config(
        str(repo_root / "configs/pretrain.py") + ":tiny",
        [
            *tiny_overrides(SEQ, PRED, BATCH),
            *SGD_LIKE,
            "--config.train.warmup_steps=10",
            f"--config.train.num_steps={STEPS}",
            f"--config.train.grad_accum_steps={accum}",
            *extra,
        ],
    )


def _pretraining_batches():
    inst = InstanceConfig(max_seq_length=SEQ, max_predictions_per_seq=PRED, vocab_size=VOCAB_SIZE)
    source = PretrainingBatches(SyntheticCorpus(50, seed=3), inst, BATCH, seed=0)
    batches = [source.batch(i) for i in range(STEPS)]
    batches[BAD]["masked_lm_weights"] = np.full_like(batches[BAD]["masked_lm_weights"], np.nan)
    return [{k: jnp.asarray(v) for k, v in b.items()} for b in batches]


@pytest.mark.parametrize("accum", [1, 2])
def test_pretraining_logs_the_applied_learning_rate(repo_root, accum):
    config = _pretrain_config(repo_root, accum)
    setup = train.setup_training(config, train.validate_pretrain_config(config))
    state = setup.init_fn(jax.random.key(0))
    seen, state = _check_steps(jax.jit(setup.train_step_fn), state, _pretraining_batches())
    _assert_logged_is_applied(seen)
    # The schedule's count is the applied updates: 4 of 5 steps.
    assert int(optim.applied_updates(state.opt_state)) == STEPS - 1 and int(state.step) == STEPS


@pytest.mark.parametrize("accum", [1, 2])
def test_finetuning_logs_the_applied_learning_rate(repo_root, accum):
    config = load_config(
        str(repo_root / "configs/finetune.py") + ":stsb,tiny",
        [
            *SGD_LIKE,
            *(o for o in tiny_overrides(SEQ, PRED, BATCH) if o.startswith("--config.model.")),
            f"--config.train.batch_size={BATCH}",
            f"--config.train.grad_accum_steps={accum}",
            "--config.train.warmup_fraction=2.0",  # 10 warm-up steps of 5
        ],
    )
    model_config = BertConfig.from_dict(
        {**config.model.to_dict(), "vocab_size": VOCAB_SIZE, "max_position_embeddings": SEQ}
    )
    kind = finetune_tasks.make_kind("regression", [], "pearson_spearman")
    model = kind.model(model_config)
    schedule, tx = optim.make_optimizer(_optimizer_config(config.train, STEPS))
    ids = jnp.zeros((1, SEQ), jnp.int32)
    params = nn.unbox(model.init(jax.random.key(0), ids, jnp.ones_like(ids), ids)["params"])
    state = optim.TrainState(
        step=jnp.asarray(0, jnp.int32), params=params, opt_state=tx.init(params)
    )
    rng = np.random.default_rng(0)
    batches = []
    for i in range(STEPS):
        batch = {
            "input_ids": rng.integers(5, VOCAB_SIZE, (BATCH, SEQ)).astype(np.int32),
            "input_mask": np.ones((BATCH, SEQ), np.int32),
            "segment_ids": np.zeros((BATCH, SEQ), np.int32),
            "labels": rng.uniform(0, 5, BATCH).astype(np.float32),
            "weight": np.ones(BATCH, np.float32),
        }
        if i == BAD:
            batch["weight"][3] = np.nan
        batches.append({k: jnp.asarray(v) for k, v in batch.items()})
    step_fn = jax.jit(make_finetune_step(model, kind, tx, schedule, grad_accum_steps=accum))
    seen, state = _check_steps(step_fn, state, batches)
    _assert_logged_is_applied(seen)
    assert int(optim.applied_updates(state.opt_state)) == STEPS - 1


def test_pretrain_loop_logs_the_applied_rate_after_a_skip(repo_root, tmp_path, monkeypatch):
    """Through the loop into metrics.jsonl, with micro-batches: step 4, the first after the
    skip, applies (and must log) 0.2, not schedule(3) = 0.3."""
    original = PretrainingBatches.batch

    def batch(self, step, with_sources=False):
        out = original(self, step, with_sources)
        if self.seed == 0 and step == BAD:
            out["masked_lm_weights"] = np.full_like(out["masked_lm_weights"], np.nan)
        return out

    monkeypatch.setattr(PretrainingBatches, "batch", batch)
    config = _pretrain_config(
        repo_root,
        2,
        "--config.train.log_every=1",
        "--config.eval.num_batches=1",
        "--config.data.synthetic_documents=60",
        "--config.data.synthetic_eval_documents=20",
    )
    result = train.pretrain(config, str(tmp_path))
    assert result.skipped_updates == 1
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    logged = {r["step"]: r["learning_rate"] for r in rows if "learning_rate" in r}
    assert sorted(logged) == [1, 2, 4, 5]
    np.testing.assert_allclose(
        [logged[s] for s in (1, 2, 4, 5)], [0.0, 0.1, 0.2, 0.3], rtol=1e-6, atol=1e-9
    )
    assert int(optim.applied_updates(result.state.opt_state)) == 4
