"""benchmarks/torch_reference.py does flaxbert's work in PyTorch: from the same parameters and
batches (dropout off) its losses equal flaxbert's, step after step (model, loss, AdamW, weight
decay mask, clipping); and `train_throughput.py --compare-torch` reports the paired ratio."""

import functools
import json
import math
import pathlib
import re
import sys

import jax
import numpy as np
import pytest
from tiny import tiny_overrides

from flaxbert import optim, pretrain_step, train
from flaxbert.config import load_config
from flaxbert.data.pretraining import InstanceConfig, PretrainingBatches
from flaxbert.pretraining_model import BertForPreTraining

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # benchmarks/ is not part of the installed package
from benchmarks import train_throughput  # noqa: E402
from benchmarks.torch_reference import TorchBert  # noqa: E402

pytestmark = pytest.mark.usefixtures("fast_compiles")

VOCAB, SEQ, PRED, BATCH = 64, 16, 3, 4


def test_torch_reference_matches_flaxbert_losses():
    config = load_config(
        f"{REPO}/configs/pretrain.py:tiny",
        [
            "--config.model.hidden_size=32",
            "--config.model.num_layers=2",
            "--config.model.num_heads=2",
            "--config.model.intermediate_size=64",
            f"--config.model.vocab_size={VOCAB}",
            f"--config.model.max_position_embeddings={SEQ}",
            f"--config.data.max_seq_length={SEQ}",
            f"--config.data.max_predictions_per_seq={PRED}",
            "--config.model.hidden_dropout_rate=0.0",
            "--config.model.attention_dropout_rate=0.0",
            # TorchBert's learning rate is constant: no warm-up, so both take the same steps
            "--config.train.warmup_steps=0",
            "--config.train.lr_decay=constant",
        ],
    )
    model_config = train.validate_pretrain_config(config)
    model = BertForPreTraining(model_config)
    schedule, tx = optim.make_optimizer(config.train)
    init = functools.partial(
        pretrain_step.create_train_state, model, tx, seq_len=SEQ, num_predictions=PRED
    )
    state = jax.jit(init)(jax.random.key(0))  # one compile, not one per initialiser op
    step = jax.jit(pretrain_step.make_train_step(model, tx, schedule))

    rng = np.random.default_rng(0)  # ids below VOCAB; the loader pads and masks them
    documents = [
        [rng.integers(5, VOCAB, rng.integers(3, 9)).astype(np.int32) for _ in range(5)]
        for _ in range(10)
    ]
    instances = InstanceConfig(max_seq_length=SEQ, max_predictions_per_seq=PRED, vocab_size=VOCAB)
    loader = PretrainingBatches(documents, instances, BATCH, seed=0)
    batches = [loader.batch(i) for i in range(3)]
    assert (batches[0]["masked_lm_weights"] == 0).any()  # padding slots are ignored by both

    ref = TorchBert(model_config, config.train, threads=1)
    ref.load_flax_params(state.params)
    for i, batch in enumerate(batches):
        state, metrics = step(state, batch, jax.random.key(1))
        torch_loss = ref.step(ref.batch(batch))
        assert torch_loss == pytest.approx(float(metrics["loss"]), rel=1e-4), f"step {i}"


def test_compare_torch_reports_the_paired_ratio(capsys, tmp_path):
    argv = [
        "--config",
        f"{REPO}/configs/pretrain.py:tiny",
        "--steps",
        "2",
        "--warmup",
        "1",
        "--compare-torch",
        "--json",
        str(tmp_path / "result.json"),
        *tiny_overrides(seq=32, predictions=5, batch=8),
    ]
    assert train_throughput.main(argv) == 0
    out = capsys.readouterr().out
    assert re.search(r"^\| transformers \(PyTorch\) \| [0-9.]+ \|", out, re.M), out
    assert "threads: XLA:CPU" in out
    last = out.strip().splitlines()[-1]
    match = re.fullmatch(r"step_time_ratio_vs_torch=([0-9.]+)", last)
    assert match, last
    ratio = float(match.group(1))
    assert math.isfinite(ratio) and ratio > 0
    result = json.loads((tmp_path / "result.json").read_text())
    assert len(result["torch_pair_ratios"]) == 2
    assert result["step_time_ratio_vs_torch"] == pytest.approx(ratio, abs=1e-3)
    assert [r["system"] for r in result["systems"]] == ["flaxbert", "transformers (PyTorch)"]
