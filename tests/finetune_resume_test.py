"""The fine-tuning loop across steps and runs: what a run reports at its end (best evaluation,
best predictions, skipped-update count) survives a SIGTERM and a resume; the best checkpoint
follows checkpoint.best_mode; train.max_consecutive_nonfinite stops a run.

The SIGTERM is sent at a known point (by the process to itself, from the metric writer, as it
writes the third evaluation row), not after a sleep.
"""

import json
import os
import signal

import jax
import numpy as np
import pytest
from shared_data import DATA, corpus_head, require

from flaxbert import checkpoint as ckpt
from flaxbert import loop
from flaxbert.config import load_config
from flaxbert.finetune import finetune
from flaxbert.monitor import MetricWriter
from flaxbert.tokenizer import train_tokenizer

pytestmark = pytest.mark.usefixtures("fast_compiles")

EVAL_EVERY, STEPS = 4, 24  # 64 examples / batch 8 = 8 steps an epoch, 3 epochs
POISONED = 2  # 1-based step whose batch gives a NaN loss (train.nonfinite=skip)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    require(DATA / "tasks" / "stsb")  # skips off CI, fails under CI
    tmp = tmp_path_factory.mktemp("sp")
    text = corpus_head("en_gutenberg.txt", 1500, tmp / "en.txt")
    return train_tokenizer([str(text)], 1000, str(tmp / "sp"), max_sentences=4000, num_threads=1)


def _config(repo_root, tokenizer, *extra):
    return load_config(
        str(repo_root / "configs/finetune.py") + ":stsb,tiny",
        [
            f"--config.data.tokenizer={tokenizer}",
            "--config.data.train_limit=64",
            "--config.data.eval_limit=64",
            "--config.data.max_seq_length=48",
            "--config.train.batch_size=8",
            "--config.eval.batch_size=8",
            "--config.train.num_epochs=3",
            f"--config.eval.every_steps={EVAL_EVERY}",
            f"--config.train.log_every={EVAL_EVERY}",
            "--config.train.nonfinite=skip",
            *extra,
        ],
    )


def _poison(monkeypatch, steps):
    """The batches of these (1-based) steps get a NaN example weight: a non-finite loss."""
    original = loop.prefetch

    def prefetch(make, steps_range, depth):
        def poisoned(step0):
            batch, examples = make(step0)
            if step0 + 1 in steps:
                w = batch["weight"]
                bad = np.full(w.shape, np.nan, np.float32)
                batch = {**batch, "weight": jax.device_put(bad, w.sharding)}
            return batch, examples

        return original(poisoned, steps_range, depth)

    monkeypatch.setattr(loop, "prefetch", prefetch)


def _sigterm_at_eval(monkeypatch, n):
    """SIGTERM to this process while the n-th evaluation row is written (the loop's handler
    is installed then; it saves the next step and stops)."""

    class Writer(MetricWriter):
        evals = 0

        def write(self, step, metrics):
            super().write(step, metrics)
            if any(k.startswith("eval/") for k in metrics):
                Writer.evals += 1
                if Writer.evals == n:
                    os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(loop, "MetricWriter", Writer)


def _eval_rows(workdir):
    rows = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "eval/pearson" in r]


def test_resumed_run_reports_the_true_best(repo_root, tmp_path, tokenizer, monkeypatch):
    config = _config(repo_root, tokenizer)
    _poison(monkeypatch, {POISONED})
    straight = tmp_path / "straight"
    finetune(config, str(straight))
    want = json.loads((straight / "final_metrics.json").read_text())
    evals = _eval_rows(straight)
    assert [r["step"] for r in evals] == list(range(EVAL_EVERY, STEPS + 1, EVAL_EVERY))
    best_row = max(evals, key=lambda r: r["eval/pearson"])
    # The case of the report: the best evaluation comes before the SIGTERM (3rd evaluation)
    # and a later one is worse than it, so forgetting it shows.
    assert best_row["step"] <= 3 * EVAL_EVERY
    assert want["best"]["step"] == best_row["step"]
    assert want["best"]["eval/pearson"] == best_row["eval/pearson"]
    assert want["skipped_updates"] == 1 and want["step"] == STEPS

    interrupted = tmp_path / "interrupted"
    with monkeypatch.context() as m:
        _sigterm_at_eval(m, 3)
        first = finetune(config, str(interrupted))
    assert first.final_step == 3 * EVAL_EVERY + 1  # saved at the step after the signal
    assert not (interrupted / "final_metrics.json").exists()
    assert (interrupted / "checkpoints" / str(3 * EVAL_EVERY + 1)).is_dir()

    second = finetune(config, str(interrupted))
    got = json.loads((interrupted / "final_metrics.json").read_text())
    assert second.best_step == best_row["step"] and second.final_step == STEPS
    assert got["best"] == want["best"]
    assert got["skipped_updates"] == want["skipped_updates"] == 1
    assert [r["step"] for r in _eval_rows(interrupted)] == [r["step"] for r in evals]
    for name in ("best_eval_predictions.jsonl", "eval_predictions.jsonl"):
        assert (interrupted / name).read_text() == (straight / name).read_text(), name

    # A finished run re-run does nothing and leaves final_metrics.json as it is.
    before = (interrupted / "final_metrics.json").stat().st_mtime_ns
    again = finetune(config, str(interrupted))
    assert again.final_step == STEPS
    assert (interrupted / "final_metrics.json").stat().st_mtime_ns == before


def test_best_checkpoint_follows_best_mode(repo_root, tmp_path, tokenizer):
    """checkpoint.best_mode=min: the best is the lowest main_metric, for the final record and
    for the checkpoint kept as the best."""
    config = _config(
        repo_root,
        tokenizer,
        "--config.checkpoint.best_mode=min",
        "--config.train.num_epochs=1",
        "--config.checkpoint.async_save=False",
    )
    result = finetune(config, str(tmp_path))
    evals = _eval_rows(tmp_path)
    worst = min(evals, key=lambda r: r["eval/pearson"])
    assert len(evals) == 2 and evals[0]["eval/pearson"] != evals[1]["eval/pearson"]
    assert result.best_step == worst["step"]
    final = json.loads((tmp_path / "final_metrics.json").read_text())
    assert final["best"]["eval/pearson"] == worst["eval/pearson"]
    c = ckpt.Checkpoints(tmp_path / "checkpoints", best_metric="eval/pearson", best_mode="min")
    assert c.best_step() == worst["step"] and worst["step"] in c.steps()
    c.close()


def test_max_consecutive_nonfinite_stops_finetuning(repo_root, tmp_path, tokenizer, monkeypatch):
    _poison(monkeypatch, set(range(3, STEPS + 1)))
    config = _config(repo_root, tokenizer, "--config.train.max_consecutive_nonfinite=2")
    with pytest.raises(
        FloatingPointError,
        match=r"at step 5: 3 non-finite steps in a row \(more than "
        r"train.max_consecutive_nonfinite=2\)",
    ):
        finetune(config, str(tmp_path))


def test_unknown_best_mode_is_named(repo_root, tmp_path, tokenizer):
    from flaxbert.config import ConfigError

    config = _config(repo_root, tokenizer, "--config.checkpoint.best_mode=lowest")
    with pytest.raises(ConfigError, match="checkpoint.best_mode"):
        finetune(config, str(tmp_path))
