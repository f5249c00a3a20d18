import json
import os
import subprocess
import sys
from collections import Counter

import numpy as np

from flaxbert.data.synthetic import SyntheticCorpus
from flaxbert.pretrain_step import STEP_METRICS


def _run(args, cwd, timeout=600, fast_compiles=False):
    """`flaxbert ARGS` in a subprocess. `fast_compiles`: XLA's optimisation passes off, for
    runs of a few steps whose time is mostly compiling (3.8 s less for a 3-step tiny
    pre-training, 12.9 s against 16.6 s measured; a 200-step run is 1.6x slower)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if fast_compiles:
        env["JAX_DISABLE_MOST_OPTIMIZATIONS"] = "1"
    return subprocess.run(
        [sys.executable, "-m", "flaxbert.cli", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _majority_word_rate(num_topics: int) -> float:
    """MLM accuracy of always predicting the most frequent word: the bar to beat."""
    corpus = SyntheticCorpus(300, seed=1, num_topics=num_topics)
    counts = Counter(np.concatenate([s for d in corpus.documents for s in d]).tolist())
    return max(counts.values()) / sum(counts.values())


def test_pretrain_cli_learns_both_tasks(repo_root, tmp_path):
    workdir = tmp_path / "run"
    # The quick start's shape (seq 64, no dropout) and tiny's learning rate, 600 steps: NSP
    # leaves chance between the two evaluations (eval NSP 0.506 at 300, 0.875 at 600; MLM
    # 0.466 and 0.580; measured 2026-12-01, 67 s of training on the 2-core CPU).
    steps = 600
    result = _run(
        [
            "pretrain",
            "--config",
            "configs/pretrain.py:tiny",
            "--workdir",
            str(workdir),
            f"--config.train.num_steps={steps}",
            f"--config.eval.every_steps={steps // 2}",
            "--config.train.log_every=25",
        ],
        cwd=repo_root,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    log = result.stderr + result.stdout
    assert f"step {steps}/{steps}" in log and "ETA" in log and "final eval MLM accuracy" in log

    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "loss" in r]
    eval_rows = [r for r in rows if "eval/loss" in r]
    assert [r["step"] for r in train_rows] == list(range(25, steps + 1, 25))
    assert [r["step"] for r in eval_rows] == [steps // 2, steps]
    for key in (*STEP_METRICS, "seq_per_sec", "tokens_per_sec"):
        assert all(np.isfinite(r[key]) for r in train_rows), key
    first, last = eval_rows[0], eval_rows[-1]

    # Chance is 1/137 for MLM and 1/2 for NSP; always answering the most frequent word
    # ("the", about 21%) is the stricter bar for MLM.
    baseline = _majority_word_rate(4)
    assert baseline < 0.23
    assert train_rows[0]["mlm_accuracy"] < baseline
    assert last["eval/mlm_accuracy"] > baseline + 0.04, (baseline, last)
    assert train_rows[0]["nsp_accuracy"] < 0.6
    assert last["eval/nsp_accuracy"] > 0.75, last
    assert last["eval/loss"] < first["eval/loss"] - 0.3

    assert json.loads((workdir / "config.json").read_text())["train"]["num_steps"] == steps
    final = json.loads((workdir / "final_metrics.json").read_text())
    assert final["eval/mlm_accuracy"] == last["eval/mlm_accuracy"]
    events = list((workdir / "tensorboard").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0


def test_cli_config_errors_stop_before_work(repo_root, tmp_path):
    def pretrain(override):
        args = [
            "pretrain",
            "--config",
            "configs/pretrain.py:tiny",
            "--workdir",
            str(tmp_path / "x"),
            override,
        ]
        return _run(args, cwd=repo_root)

    result = pretrain("--config.train.lerning_rate=1e-3")
    assert result.returncode == 2
    assert "train.lerning_rate" in result.stderr and "train.learning_rate" in result.stderr
    assert not (tmp_path / "x").exists()  # nothing was started
    result = pretrain("--config.train.num_steps=many")
    assert result.returncode == 2 and "train.num_steps" in result.stderr


def test_cli_help_lists_commands(repo_root):
    result = _run(["--help"], cwd=repo_root)
    assert result.returncode == 0 and "pretrain" in result.stdout
    result = _run(["pretrain", "--help"], cwd=repo_root)
    assert result.returncode == 0 and "--workdir" in result.stdout and "--config" in result.stdout
