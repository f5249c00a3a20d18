"""Fine-tuning: encoder restore, every head's loss and decoding, end-to-end runs on slices of
the shared tasks, and feature extraction."""

import json

import flax.linen
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from shared_data import TASKS, require
from tiny import SMALL_MODEL, ko_en_pretraining_workdir

from flaxbert import checkpoint as ckpt
from flaxbert import finetune_tasks, optim
from flaxbert.config import ConfigError, load_config, override_keys
from flaxbert.features import extract_features
from flaxbert.finetune import finetune

pytestmark = pytest.mark.usefixtures("fast_compiles")


def _tasks_dir():
    require(TASKS)
    return TASKS


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, repo_root):
    """A pre-training workdir of a tiny model (random weights) with a real Korean+English
    SentencePiece model, and its saved params (`tiny.ko_en_pretraining_workdir`)."""
    return ko_en_pretraining_workdir(repo_root, tmp_path_factory.mktemp("pretrained"))


def _ft_config(repo_root, task, *extra):
    return load_config(
        str(repo_root / "configs/finetune.py") + f":{task},tiny",
        [
            *SMALL_MODEL,
            "--config.data.max_seq_length=64",
            "--config.train.batch_size=16",
            "--config.eval.batch_size=16",
            "--config.train.log_every=1",
            *extra,
        ],
    )


def test_restore_keeps_encoder_bit_identical_and_adds_a_fresh_head(repo_root, tmp_path, pretrained):
    _tasks_dir()
    workdir, saved = pretrained
    config = _ft_config(
        repo_root,
        "nsmc",
        f"--config.init_from={workdir}",
        "--config.data.train_limit=32",
        "--config.data.eval_limit=16",
        "--config.train.num_steps=2",
        "--config.train.learning_rate=0.0",  # AdamW moves nothing: what was restored stays
        "--config.model.hidden_dropout_rate=0.0",
    )
    result = finetune(config, str(tmp_path / "ft"))
    params = jax.device_get(result.state.params)
    for a, b in zip(jax.tree.leaves(params["bert"]), jax.tree.leaves(saved["bert"]), strict=True):
        np.testing.assert_array_equal(a, b)
    assert params["classifier"]["kernel"].shape == (32, 2)
    assert "bert/embeddings" in result.restored_groups and "bert/pooler" in result.restored_groups
    assert sum(g.startswith("bert/layer_") for g in result.restored_groups) == 2


def test_config_that_does_not_fit_the_checkpoint_is_named(repo_root, tmp_path, pretrained):
    _tasks_dir()
    workdir, _ = pretrained
    config = _ft_config(repo_root, "nsmc", f"--config.init_from={workdir}")
    config.unlock()
    config.model.hidden_size = 64
    config.model.num_layers = 3
    with pytest.raises(ConfigError, match="model.hidden_size=64 but the checkpoint has 32"):
        finetune(config, str(tmp_path / "ft"))
    config = _ft_config(
        repo_root, "nsmc", f"--config.init_from={workdir}", "--config.model.scan_layers=True"
    )
    with pytest.raises(ConfigError, match="model.scan_layers=True but the checkpoint has False"):
        finetune(config, str(tmp_path / "ft2"))
    # A post-LN checkpoint read as pre-LN (or the reverse) would run without error, wrongly.
    config = _ft_config(
        repo_root, "nsmc", f"--config.init_from={workdir}", "--config.model.pre_layer_norm=True"
    )
    with pytest.raises(ConfigError, match="model.pre_layer_norm=True but the checkpoint has False"):
        finetune(config, str(tmp_path / "ft3"))


def test_structure_comes_from_the_checkpoint_whatever_the_variant(repo_root, tmp_path, pretrained):
    """`configs/finetune.py:TASK` names no size (mini by default): from a tiny checkpoint the
    model is the checkpoint's, and config.json records what was built. A structural key the
    user names on the command line must agree, even when it equals the variant's value."""
    _tasks_dir()
    workdir, saved = pretrained
    saved_model = ckpt.read_meta(workdir)[1]["model"]
    overrides = [
        f"--config.init_from={workdir}",
        "--config.data.max_seq_length=32",
        "--config.data.train_limit=16",
        "--config.data.eval_limit=16",
        "--config.train.batch_size=16",
        "--config.eval.batch_size=16",
        "--config.train.num_steps=1",
    ]
    spec = str(repo_root / "configs/finetune.py") + ":nsmc"
    config = load_config(spec, overrides)
    assert config.model.hidden_size == 256 != saved_model["hidden_size"]  # mini's
    result = finetune(config, str(tmp_path / "ft"))
    assert result.final_step == 1
    built = json.loads((tmp_path / "ft/config.json").read_text())["model"]
    keys = ("hidden_size", "num_layers", "num_heads", "intermediate_size", "vocab_size")
    assert {k: built[k] for k in keys} == {k: saved_model[k] for k in keys}
    shapes = jax.tree.map(np.shape, jax.device_get(result.state.params["bert"]))
    assert shapes == jax.tree.map(np.shape, saved["bert"])

    named = [*overrides, "--config.model.hidden_size=256"]  # mini's own value, said out loud
    with pytest.raises(ConfigError, match="model.hidden_size=256 but the checkpoint has 32"):
        finetune(load_config(spec, named), str(tmp_path / "ft2"), explicit=override_keys(named))
    assert not (tmp_path / "ft2" / "checkpoints").exists()


@pytest.mark.parametrize(
    "task, main, packing",
    [
        ("nsmc", "accuracy", True),  # packed training rows
        ("stsb", "pearson", False),
        ("klue_ner", "f1", False),
        ("squad_v1", "f1", False),
    ],
)
def test_finetune_end_to_end_on_a_slice(repo_root, tmp_path, pretrained, task, main, packing):
    _tasks_dir()
    workdir, _ = pretrained
    extra = ["--config.data.max_seq_length=64", "--config.data.doc_stride=32"]
    extra += [f"--config.data.packing={packing}"]
    if task == "squad_v1":
        extra += ["--config.data.max_query_length=16"]
    config = _ft_config(
        repo_root,
        task,
        f"--config.init_from={workdir}",
        "--config.data.train_limit=48",
        "--config.data.eval_limit=16",
        "--config.train.num_epochs=2",
        *extra,
    )
    out = tmp_path / "ft"
    result = finetune(config, str(out))
    assert f"eval/{main}" in result.best_metrics
    assert np.isfinite(result.best_metrics[f"eval/{main}"])
    rows = [json.loads(x) for x in (out / "eval_predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 16
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("loss" in m and np.isfinite(m["loss"]) for m in metrics)
    assert (out / "checkpoints").is_dir() and result.train_examples_per_sec > 0
    if packing:  # 48 short reviews, 16 rows a batch: fewer steps than 2 epochs of 3 batches
        assert result.final_step < 6


def test_sequence_heads_losses_and_predictions():
    kind = finetune_tasks.SequenceKind(3, False, "accuracy")
    logits = jnp.array([[2.0, 0.0, 0.0], [0.0, 0.0, 5.0]])
    batch = {"labels": jnp.array([0, 1]), "weight": jnp.array([1.0, 0.0])}
    sums = kind.loss_sums(logits, batch)
    # Only row 0 counts: -log softmax([2, 0, 0])[0] = log(e^2 + 2) - 2
    np.testing.assert_allclose(sums["loss_sum"], np.log(np.exp(2) + 2) - 2, rtol=1e-6)
    assert float(sums["count"]) == 1.0
    assert kind.predict(logits).tolist() == [0, 2]

    reg = finetune_tasks.SequenceKind(1, True, "pearson_spearman")
    sums = reg.loss_sums(
        jnp.array([[1.5], [0.0]]),
        {"labels": jnp.array([1.0, 2.0]), "weight": jnp.array([1.0, 1.0])},
    )
    np.testing.assert_allclose(sums["loss_sum"], 0.25 + 4.0)


def test_token_and_qa_losses_ignore_what_has_no_label():
    kind = finetune_tasks.TokenKind(["O", "B-PER", "I-PER"])
    logits = jnp.zeros((1, 4, 3))
    batch = {
        "label_ids": jnp.array([[finetune_tasks.IGNORE, 1, finetune_tasks.IGNORE, 0]]),
        "weight": jnp.array([1.0]),
    }
    sums = kind.loss_sums(logits, batch)
    np.testing.assert_allclose(sums["loss_sum"], 2 * np.log(3), rtol=1e-6)
    assert float(sums["count"]) == 2

    qa = finetune_tasks.QAKind()
    start = jnp.array([[0.0, 10.0, 0.0]])
    end = jnp.array([[0.0, 0.0, 10.0]])
    sums = qa.loss_sums(
        (start, end),
        {
            "start_positions": jnp.array([1]),
            "end_positions": jnp.array([2]),
            "weight": jnp.array([1.0]),
        },
    )
    assert float(sums["loss_sum"]) < 1e-3
    assert qa.predict((start, end)).shape == (1, 3, 2)


def test_extract_features_per_token_and_pooled(tmp_path, pretrained):
    workdir, saved = pretrained
    text = tmp_path / "in.txt"
    text.write_text("영화가 정말 재미있었다\nIt was a dark night. ||| The end.\n", encoding="utf-8")
    s = extract_features(str(workdir), str(text), str(tmp_path / "out"), layers="-1,-2")
    matrix = np.load(tmp_path / "out.npy")
    index = [json.loads(x) for x in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert matrix.shape == (s["rows"], 64) and len(index) == 2
    assert index[1]["rows"][0] == index[0]["rows"][1] == len(index[0]["token_ids"])
    assert index[1]["token_ids"].count(3) == 2  # a pair: [SEP] after each segment
    # The last layer's vectors equal the encoder's own output.
    from flaxbert.model import BertModel
    from flaxbert.model_config import BertConfig

    meta = ckpt.read_meta(str(workdir))[1]
    model = BertModel(BertConfig.from_dict(meta["model"]), add_pooler=False)
    ids = jnp.asarray([index[0]["token_ids"]])
    params = {k: v for k, v in saved["bert"].items() if k != "pooler"}
    out = model.apply({"params": params}, ids, jnp.ones_like(ids), jnp.zeros_like(ids))
    a, b = index[0]["rows"]
    np.testing.assert_allclose(matrix[a:b, :32], np.asarray(out.sequence_BLD[0]), atol=2e-5)

    pooled = extract_features(
        str(workdir), str(text), str(tmp_path / "cls"), layers="-1", pooling="cls"
    )
    assert np.load(tmp_path / "cls.npy").shape == (2, 32) and pooled["rows"] == 2
    with pytest.raises(ValueError, match="out of range"):
        extract_features(str(workdir), str(text), str(tmp_path / "x"), layers="-4")
    bad = tmp_path / "bad.txt"
    bad.write_text("fine\n\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad.txt:2: empty text"):
        extract_features(str(workdir), str(bad), str(tmp_path / "x"))


def test_cli_finetune_without_encoder_or_tokenizer_says_what_to_do(repo_root, tmp_path, capsys):
    from flaxbert import cli

    code = cli.main(
        [
            "finetune",
            "--config",
            str(repo_root / "configs/finetune.py") + ":sst2",
            "--workdir",
            str(tmp_path),
        ]
    )
    err = capsys.readouterr().err
    assert code == 2
    assert "data.tokenizer" in err and "init_from" in err


def test_pmap_and_sharded_meshes_train_like_data_parallel(repo_root, tmp_path, pretrained):
    _tasks_dir()
    workdir, _ = pretrained
    finals = {}
    for name, extra in {
        "data8": [],
        "pmap": ["--config.parallel.strategy=pmap"],
        "2x2x2": [
            "--config.parallel.data=2",
            "--config.parallel.fsdp=2",
            "--config.parallel.tensor=2",
        ],
    }.items():
        config = _ft_config(
            repo_root,
            "nsmc",
            f"--config.init_from={workdir}",
            "--config.data.train_limit=32",
            "--config.data.eval_limit=16",
            "--config.train.num_steps=3",
            "--config.model.hidden_dropout_rate=0.0",
            "--config.model.attention_dropout_rate=0.0",
            *extra,
        )
        finals[name] = jax.device_get(finetune(config, str(tmp_path / name)).state.params)
    for name in ("pmap", "2x2x2"):
        for a, b in zip(
            jax.tree.leaves(finals[name]), jax.tree.leaves(finals["data8"]), strict=True
        ):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6, err_msg=name)


def test_finetune_step_fits_a_small_batch(repo_root):
    """The fine-tuning step learns: 40 steps of the real step and optimizer (no dropout) on
    one batch of 16 random examples drive its loss from chance (ln 3) to a fraction of it."""
    from flaxbert.data.synthetic import VOCAB_SIZE
    from flaxbert.finetune_step import make_finetune_step
    from flaxbert.finetune_step import optimizer_config as _optimizer_config
    from flaxbert.model_config import BertConfig
    from flaxbert.task_heads import BertForSequenceClassification

    config = load_config(str(repo_root / "configs/finetune.py") + ":sst2,tiny", [])
    t = _optimizer_config(config.train, 40)
    t.learning_rate, t.warmup_steps = 3e-3, 0
    schedule, tx = optim.make_optimizer(t)
    model_config = BertConfig(
        vocab_size=VOCAB_SIZE, hidden_size=32, num_layers=2, num_heads=2,
        intermediate_size=64, max_position_embeddings=16,
        hidden_dropout_rate=0.0, attention_dropout_rate=0.0,
    )  # fmt: skip
    kind = finetune_tasks.SequenceKind(3, False, "accuracy")
    model = BertForSequenceClassification(model_config, kind.num_labels)
    rng = np.random.default_rng(0)
    ids = rng.integers(10, VOCAB_SIZE, size=(16, 16)).astype(np.int32)
    batch = {
        "input_ids": ids,
        "input_mask": np.ones_like(ids),
        "segment_ids": np.zeros_like(ids),
        "labels": rng.integers(0, 3, size=16).astype(np.int32),
        "weight": np.ones(16, np.float32),
    }
    params = model.init(jax.random.key(0), ids[:1], batch["input_mask"][:1], ids[:1] * 0)
    params = flax.linen.unbox(params["params"])
    state = optim.TrainState(jnp.asarray(0, jnp.int32), params, tx.init(params))
    step = jax.jit(make_finetune_step(model, kind, tx, schedule))
    losses = []
    for _ in range(40):
        state, metrics = step(state, batch, jax.random.key(1))
        losses.append(float(metrics["loss"]))
    # At random initialisation the logits are near zero: the loss starts at ln 3 = 1.10.
    assert losses[0] == pytest.approx(np.log(3), abs=0.1)
    assert losses[-1] < 0.35, losses  # 0.17 measured; an idle step stays at 1.10
    assert int(state.step) == 40
    moved = {
        jax.tree_util.keystr(path): float(jnp.max(jnp.abs(a - b)))
        for (path, a), b in zip(
            jax.tree_util.tree_leaves_with_path(state.params), jax.tree.leaves(params), strict=True
        )
    }
    # Every parameter moves but the attention key biases (softmax ignores a shift of a row).
    assert all(v > 1e-3 for k, v in moved.items() if "['key']['bias']" not in k), moved
