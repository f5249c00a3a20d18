"""config.freeze_encoder, the feature-based approach: the encoder (`bert`) is bit-identical after
training while the head moves, the optimizer state holds the head alone, the encoder runs
without dropout and the head with it, under pjit and pmap, with gradient accumulation and an
exact resume."""

import json

import flax.linen
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from finetune_resume_test import _sigterm_at_eval
from shared_data import TASKS, require
from tiny import SMALL_MODEL, ko_en_pretraining_workdir

from flaxbert import checkpoint as ckpt
from flaxbert import finetune as finetune_lib
from flaxbert import finetune_tasks, optim
from flaxbert.config import load_config
from flaxbert.data.synthetic import VOCAB_SIZE
from flaxbert.finetune import finetune
from flaxbert.finetune_step import (
    ParamCounts,
    apply_task_model,
    count_params,
    make_finetune_step,
    trainable_params,
)
from flaxbert.finetune_step import optimizer_config as _optimizer_config
from flaxbert.model_config import BertConfig

pytestmark = pytest.mark.usefixtures("fast_compiles")


def _sizes(tree) -> int:
    return sum(int(np.size(x)) for x in jax.tree.leaves(tree))


def _opt_state_sizes(opt_state) -> int:
    """Elements of the optimizer state's arrays (Adam's moments), its scalar counters left out."""
    return sum(int(np.size(x)) for x in jax.tree.leaves(opt_state) if np.ndim(x) > 0)


def _assert_encoder_kept_and_head_moved(params, before):
    for a, b in zip(jax.tree.leaves(params["bert"]), jax.tree.leaves(before["bert"]), strict=True):
        np.testing.assert_array_equal(a, b)
    head, head_before = trainable_params(params, True), trainable_params(before, True)
    # Every head leaf moved. Not by a fixed amount: in a few warm-up steps a bias may move by
    # only ~3e-5 (the squad_v1 head under pjit did, in CI).
    assert head and all(
        np.max(np.abs(np.asarray(a) - np.asarray(b))) > 0
        for a, b in zip(jax.tree.leaves(head), jax.tree.leaves(head_before), strict=True)
    )


# ------------------------------------------------------------------------ the step, on its own


def _tiny_model_config(dropout: float) -> BertConfig:
    return BertConfig(
        vocab_size=VOCAB_SIZE, hidden_size=32, num_layers=2, num_heads=2,
        intermediate_size=64, max_position_embeddings=16,
        hidden_dropout_rate=dropout, attention_dropout_rate=dropout,
    )  # fmt: skip


def _batch(n=16, seq=16, labels=3, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(10, VOCAB_SIZE, size=(n, seq)).astype(np.int32)
    return {
        "input_ids": ids,
        "input_mask": np.ones_like(ids),
        "segment_ids": np.zeros_like(ids),
        "labels": rng.integers(0, labels, size=n).astype(np.int32),
        "weight": np.ones(n, np.float32),
    }


def _run_frozen_steps(repo_root, steps: int, grad_accum_steps: int, dropout: float):
    config = load_config(str(repo_root / "configs/finetune.py") + ":sst2,tiny", [])
    t = _optimizer_config(config.train, steps)
    t.learning_rate, t.warmup_steps = 0.1, 0
    schedule, tx = optim.make_optimizer(t)
    kind = finetune_tasks.SequenceKind(3, False, "accuracy")
    model = kind.model(_tiny_model_config(dropout))
    batch = _batch()
    ids = batch["input_ids"][:1]
    params = flax.linen.unbox(model.init(jax.random.key(0), ids, ids * 0 + 1, ids * 0)["params"])
    state = optim.TrainState(
        jnp.asarray(0, jnp.int32), params, tx.init(trainable_params(params, True))
    )
    step = jax.jit(
        make_finetune_step(
            model, kind, tx, schedule, grad_accum_steps=grad_accum_steps, freeze_encoder=True
        )
    )
    losses = []
    for _ in range(steps):
        state, metrics = step(state, batch, jax.random.key(1))
        losses.append(float(metrics["loss"]))
    return params, state, losses


def test_frozen_step_trains_the_head_alone_and_its_loss_falls(repo_root):
    before, state, losses = _run_frozen_steps(repo_root, 40, 1, dropout=0.1)
    after = jax.device_get(state.params)
    _assert_encoder_kept_and_head_moved(after, before)
    # The head (pooled 32 -> 3 logits) fits 16 random examples on fixed features.
    assert losses[0] == pytest.approx(np.log(3), abs=0.1)
    assert losses[-1] < 0.6, losses  # 0.46 measured; an idle head stays at 1.10
    # Adam's two moments of the head's 32 x 3 + 3 parameters, none of the encoder's ~20 000.
    head = _sizes(trainable_params(before, True))
    assert head == 32 * 3 + 3
    assert _opt_state_sizes(state.opt_state) == 2 * head
    assert _sizes(before) - head > 10_000


def test_frozen_step_accumulates_micro_batches_to_the_whole_batch(repo_root):
    """grad_accum_steps=4 gives the one-batch update (no dropout, so no rng differences)."""
    _, whole, _ = _run_frozen_steps(repo_root, 3, 1, dropout=0.0)
    _, accumulated, _ = _run_frozen_steps(repo_root, 3, 4, dropout=0.0)
    for a, b in zip(
        jax.tree.leaves(whole.params), jax.tree.leaves(accumulated.params), strict=True
    ):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_frozen_encoder_runs_without_dropout_and_the_head_keeps_it():
    cfg = _tiny_model_config(0.3)
    batch = _batch(n=4)
    ids = batch["input_ids"][:1]
    rng = jax.random.key(5)
    # QA has no dropout in its head: with the encoder deterministic, a training call is the
    # evaluation call exactly; without, the encoder's dropout changes it.
    qa = finetune_tasks.QAKind().model(cfg)
    params = flax.linen.unbox(qa.init(jax.random.key(0), ids, ids * 0 + 1, ids * 0)["params"])
    evaluation = apply_task_model(qa, params, batch, deterministic=True)
    frozen = apply_task_model(qa, params, batch, False, rng, encoder_deterministic=True)
    dropped = apply_task_model(qa, params, batch, False, rng)
    np.testing.assert_array_equal(frozen[0], evaluation[0])
    assert np.max(np.abs(np.asarray(dropped[0]) - np.asarray(evaluation[0]))) > 1e-3
    # A classification head drops its pooled input: a frozen training call still differs.
    cls = finetune_tasks.SequenceKind(3, False, "accuracy").model(cfg)
    params = flax.linen.unbox(cls.init(jax.random.key(0), ids, ids * 0 + 1, ids * 0)["params"])
    evaluation = apply_task_model(cls, params, batch, deterministic=True)
    frozen = apply_task_model(cls, params, batch, False, rng, encoder_deterministic=True)
    assert np.max(np.abs(np.asarray(frozen) - np.asarray(evaluation))) > 1e-4


def test_count_params_and_trainable_params_name_their_split():
    params = {"bert": {"w": np.zeros((4, 5))}, "classifier": {"kernel": np.zeros((5, 2))}}
    assert count_params(params, True) == ParamCounts(trained=10, frozen=20)
    assert count_params(params, False) == ParamCounts(trained=30, frozen=0)
    with pytest.raises(KeyError, match="no 'bert' subtree"):
        trainable_params({"classifier": {}}, True)


# ------------------------------------------------------------------------ the whole loop


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, repo_root):
    """A pre-training workdir of a tiny model (random weights) with a real Korean+English
    SentencePiece model, and its saved params (`tiny.ko_en_pretraining_workdir`)."""
    return ko_en_pretraining_workdir(repo_root, tmp_path_factory.mktemp("pretrained"))


def _frozen_config(repo_root, task, *extra):
    require(TASKS)  # skips off CI, fails under CI
    return load_config(
        str(repo_root / "configs/finetune.py") + f":{task},tiny",
        [
            *SMALL_MODEL,
            "--config.freeze_encoder=true",
            "--config.data.max_seq_length=64",
            "--config.data.doc_stride=32",
            "--config.data.max_query_length=16",
            "--config.data.train_limit=32",
            "--config.data.eval_limit=16",
            "--config.train.batch_size=16",
            "--config.eval.batch_size=16",
            "--config.train.learning_rate=1e-2",
            "--config.train.log_every=1",
            *extra,
        ],
    )


def _record_initial_params(monkeypatch) -> list:
    """The state's params as the loop starts (restored encoder, fresh head), on the host
    before the first step (which donates them)."""
    initial = []
    original = finetune_lib.restore_encoder

    def restore_encoder(state, target_params, parallel, *args):
        state, names = original(state, target_params, parallel, *args)
        initial.append(jax.device_get(parallel.unreplicate(state).params))
        return state, names

    monkeypatch.setattr(finetune_lib, "restore_encoder", restore_encoder)
    return initial


def _saved_opt_state_sizes(workdir) -> int:
    c = ckpt.Checkpoints(workdir / "checkpoints")
    metadata = c.manager.item_metadata(c.steps()[-1])
    c.close()
    return sum(
        int(np.prod(x.shape)) for x in jax.tree.leaves(metadata["opt_state"]) if len(x.shape) > 0
    )


@pytest.mark.parametrize(
    "task, strategy",
    [
        ("nsmc", "pjit"),  # classification, 8-way data parallel mesh
        ("nsmc", "pmap"),
        ("klue_ner", "pmap"),  # token classification
        ("squad_v1", "pjit"),  # QA, on a 2 x 2 x 2 mesh (fsdp and tensor shards)
    ],
)
def test_finetune_keeps_the_restored_encoder(
    repo_root, tmp_path, pretrained, caplog, monkeypatch, task, strategy
):
    workdir, saved = pretrained
    initial = _record_initial_params(monkeypatch)
    extra = [f"--config.parallel.strategy={strategy}"]
    if task == "squad_v1":
        extra += ["--config.parallel.data=2", "--config.parallel.fsdp=2"]
        extra += ["--config.parallel.tensor=2"]
    config = _frozen_config(
        repo_root, task, f"--config.init_from={workdir}", "--config.train.num_steps=4", *extra
    )
    out = tmp_path / "ft"
    with caplog.at_level("INFO", logger="flaxbert"):
        result = finetune(config, str(out))
    params = jax.device_get(result.state.params)
    _assert_encoder_kept_and_head_moved(params, initial[0])
    # What was restored, not a fresh encoder (no pooler in the token and QA models).
    restored = {k: saved["bert"][k] for k in params["bert"]}
    for a, b in zip(jax.tree.leaves(params["bert"]), jax.tree.leaves(restored), strict=True):
        np.testing.assert_array_equal(a, b)
    head = _sizes(trainable_params(params, True))
    assert _opt_state_sizes(jax.device_get(result.state.opt_state)) == 2 * head
    assert _saved_opt_state_sizes(out) == 2 * head
    frozen = _sizes(params["bert"])
    assert f"parameters: {head} trained, {frozen} frozen" in caplog.text
    assert "without init_from" not in caplog.text
    losses = [json.loads(x).get("loss") for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(np.isfinite(x) for x in losses if x is not None)


def test_resume_of_a_frozen_run_ends_where_an_uninterrupted_one_does(
    repo_root, tmp_path, pretrained, caplog, monkeypatch
):
    """Regression (stsb) from random features (no init_from: the run warns), pmap with two
    micro-batches and dropout in the head: SIGTERM at the 2nd evaluation (step 4), the step
    after it saved, the rerun resumes it; final params and optimizer state are bit-identical
    to those of a run never stopped."""
    workdir, _ = pretrained
    config = _frozen_config(
        repo_root,
        "stsb",
        f"--config.data.tokenizer={ckpt.tokenizer_of(str(workdir))}",
        "--config.data.train_limit=64",
        "--config.train.num_steps=8",
        "--config.eval.every_steps=2",
        "--config.train.grad_accum_steps=2",
        "--config.parallel.strategy=pmap",
    )
    with caplog.at_level("WARNING", logger="flaxbert"):
        straight = finetune(config, str(tmp_path / "straight"))
    assert "freeze_encoder without init_from" in caplog.text
    interrupted = tmp_path / "interrupted"
    with monkeypatch.context() as m:
        _sigterm_at_eval(m, 2)
        first = finetune(config, str(interrupted))
    assert first.final_step == 5 and not (interrupted / "final_metrics.json").exists()
    second = finetune(config, str(interrupted))
    assert second.final_step == straight.final_step == 8
    want, got = jax.device_get(straight.state), jax.device_get(second.state)
    for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got), strict=True):
        np.testing.assert_array_equal(a, b)
    # From the stop (step 5) to the end the head moved on the same frozen random features.
    _assert_encoder_kept_and_head_moved(want.params, jax.device_get(first.state.params))
    # The same workdir without freeze_encoder: its optimizer state does not fit, and the error
    # names the key.
    config.unlock()
    config.freeze_encoder = False
    with pytest.raises(ckpt.CheckpointMismatchError, match="config key freeze_encoder=False"):
        finetune(config, str(interrupted))
