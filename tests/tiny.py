"""Config overrides for a model small enough that tests are bound by compiling, not running."""

from flaxbert.data.synthetic import VOCAB_SIZE


def tiny_overrides(seq: int = 32, predictions: int = 5, batch: int = 16) -> list[str]:
    return [
        "--config.model.hidden_size=32",
        "--config.model.num_layers=2",
        "--config.model.num_heads=2",
        "--config.model.intermediate_size=64",
        f"--config.model.max_position_embeddings={seq}",
        f"--config.model.vocab_size={VOCAB_SIZE}",
        f"--config.data.max_seq_length={seq}",
        f"--config.data.max_predictions_per_seq={predictions}",
        f"--config.train.batch_size={batch}",
        "--config.train.warmup_steps=1",
        "--config.eval.batch_size=16",
        # Dropout on, as the training path runs it (`tiny` has none on the embedded corpus).
        "--config.model.hidden_dropout_rate=0.1",
        "--config.model.attention_dropout_rate=0.1",
    ]


# The encoder of the fine-tuning tests: L2 H32, 64 positions.
SMALL_MODEL = [
    "--config.model.hidden_size=32",
    "--config.model.num_layers=2",
    "--config.model.num_heads=2",
    "--config.model.intermediate_size=64",
    "--config.model.max_position_embeddings=64",
]


def ko_en_pretraining_workdir(repo_root, tmp):
    """A pre-training workdir as `flaxbert pretrain` leaves it, `tmp/run`, at step 7: a
    checkpoint of `SMALL_MODEL` (random weights) whose meta names a real Korean+English
    SentencePiece model (1500 pieces, trained on the heads of the shared corpora, in `tmp`).
    Returns (workdir, the saved params as host arrays). Skips (fails under CI) without the
    shared corpora."""
    import dataclasses
    import json

    import jax
    from shared_data import corpus_head

    from flaxbert import checkpoint as ckpt
    from flaxbert import train
    from flaxbert.config import load_config
    from flaxbert.tokenizer import Tokenizer, train_tokenizer

    ko = corpus_head("ko_nsmc_reviews.txt", 3000, tmp / "ko.txt")
    en = corpus_head("en_gutenberg.txt", 1500, tmp / "en.txt")
    sp = train_tokenizer(
        [str(ko), str(en)], 1500, str(tmp / "sp"), max_sentences=8000, num_threads=1
    )
    config = load_config(
        str(repo_root / "configs/pretrain.py") + ":tiny",
        [
            *SMALL_MODEL,
            f"--config.model.vocab_size={Tokenizer.load(sp).vocab_size}",
            "--config.data.max_seq_length=64",
        ],
    )
    model_config = train.validate_pretrain_config(config)
    setup = train.setup_training(config, model_config)
    state = setup.create_state(jax.random.key(3))
    workdir = tmp / "run"
    workdir.mkdir()
    ref = ckpt.keep_tokenizer(str(workdir), sp)
    view = setup.parallel.to_checkpoint(state)
    c = ckpt.Checkpoints(workdir / "checkpoints")
    meta = {
        "step": 7,
        "rng": [0, 1],
        "config": json.loads(config.to_json_best_effort()),
        "model": dataclasses.asdict(model_config),
        "tokenizer": ref,
    }
    c.save(7, view.params, view.opt_state, meta)
    c.close()
    return workdir, jax.device_get(state.params)


def metrics_rows(workdir) -> list[dict]:
    """Every row of WORKDIR/metrics.jsonl."""
    import json

    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def assert_processes_train_alike(single, multi, result) -> None:
    """A 3-step run in two processes (`multi`) logged what the same run in one process
    (`single`, whose PretrainResult is `result`) did: one row per step (only process 0
    writes), the same losses and norms and the same final evaluation (rtol 1e-5)."""
    import numpy as np

    one, two = metrics_rows(single), metrics_rows(multi)
    assert [r["step"] for r in two] == [r["step"] for r in one] == [1, 2, 3, 3]
    for key in ("loss", "mlm_loss", "nsp_loss", "grad_norm", "param_norm"):
        np.testing.assert_allclose(
            [r[key] for r in two[:3]], [r[key] for r in one[:3]], rtol=1e-5, err_msg=key
        )
    np.testing.assert_allclose(two[3]["eval/loss"], one[3]["eval/loss"], rtol=1e-5)
    assert one[3]["eval/loss"] == result.eval_metrics["eval/loss"]
