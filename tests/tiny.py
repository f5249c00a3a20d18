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
    ]
