"""Preemption and crashes, through the real CLI in a subprocess: a run killed with SIGKILL after
a checkpoint and started again logs exactly the losses of an uninterrupted run; SIGTERM saves
the current step and exits cleanly."""

import json
import os
import random
import signal
import subprocess
import sys
import time

N = 15  # checkpoint every N steps; the runs take 2N

ARGS = [
    "pretrain",
    "--config",
    "configs/pretrain.py:tiny",
    "--config.model.hidden_size=64",
    "--config.model.num_heads=2",
    "--config.model.intermediate_size=128",
    "--config.data.max_seq_length=64",
    "--config.data.max_predictions_per_seq=10",
    "--config.data.synthetic_documents=200",
    "--config.data.synthetic_eval_documents=20",
    "--config.train.batch_size=16",
    "--config.train.warmup_steps=3",
    "--config.train.log_every=1",
    "--config.eval.batch_size=16",
    "--config.eval.num_batches=1",
    f"--config.eval.every_steps={N}",
    f"--config.checkpoint.every_steps={N}",
    # Dropout on: its masks must come back with the RNG state.
    "--config.model.hidden_dropout_rate=0.1",
]


def _start(repo_root, workdir, *extra):
    return subprocess.Popen(
        [sys.executable, "-m", "flaxbert.cli", *ARGS, "--workdir", str(workdir), *extra],
        cwd=repo_root,
        # XLA's optimisations off: compiling dominates these short runs (both runs alike).
        env={**os.environ, "PYTHONUNBUFFERED": "1", "JAX_DISABLE_MOST_OPTIMIZATIONS": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _run(repo_root, workdir, *extra):
    proc = _start(repo_root, workdir, *extra)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-3000:]
    return out


def _train_rows(workdir):
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "loss" in r]


def _wait_for(predicate, proc, timeout=300):
    start = time.time()
    while not predicate():
        assert proc.poll() is None, f"the run ended early:\n{proc.stdout.read()[-3000:]}"
        assert time.time() - start < timeout, "timed out"
        time.sleep(0.01)


def test_sigkill_then_resume_repeats_the_uninterrupted_run(repo_root, tmp_path):
    steps = f"--config.train.num_steps={2 * N}"
    straight = tmp_path / "straight"
    _run(repo_root, straight, steps)

    killed = tmp_path / "killed"
    proc = _start(repo_root, killed, steps)
    # A step directory appears only when its checkpoint is complete (orbax renames it).
    _wait_for(lambda: (killed / "checkpoints" / str(N)).is_dir(), proc)
    time.sleep(random.uniform(0.0, 0.5))
    proc.kill()
    out, _ = proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    assert not (killed / "final_metrics.json").exists(), "the run ended before the kill"

    log = _run(repo_root, killed, steps)
    assert f"resuming from checkpoint {killed / 'checkpoints' / str(N)} (step {N} of {2 * N})" in (
        log
    )
    a, b = _train_rows(straight), _train_rows(killed)
    # One row per step, none left over from the killed run's steps after its checkpoint ...
    assert [r["step"] for r in b] == list(range(1, 2 * N + 1))
    # ... and the resumed steps give bit-identical numbers (JSON keeps a float's exact value).
    for ra, rb in zip(a[N:], b[N:], strict=True):
        for key in ("loss", "mlm_loss", "nsp_loss", "grad_norm", "param_norm", "learning_rate"):
            assert ra[key] == rb[key], (ra["step"], key, ra[key], rb[key])
    final_a = json.loads((straight / "final_metrics.json").read_text())
    final_b = json.loads((killed / "final_metrics.json").read_text())
    assert final_a["eval/loss"] == final_b["eval/loss"]


def test_sigterm_saves_the_current_step_and_exits_cleanly(repo_root, tmp_path):
    workdir = tmp_path / "run"
    proc = _start(repo_root, workdir, "--config.train.num_steps=100000")

    def trained_a_few_steps():
        path = workdir / "metrics.jsonl"
        return path.exists() and len(path.read_text().splitlines()) >= 3

    _wait_for(trained_a_few_steps, proc)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out[-3000:]
    assert "SIGTERM (preemption) received: saved step" in out
    saved = int(out.split("SIGTERM (preemption) received: saved step ")[1].split(";")[0])
    assert saved >= 3
    assert (workdir / "checkpoints" / str(saved) / "params").is_dir()
    assert not (workdir / "final_metrics.json").exists()

    log = _run(repo_root, workdir, f"--config.train.num_steps={saved + 2}")
    assert f"resuming from checkpoint {workdir / 'checkpoints' / str(saved)}" in log
    assert [r["step"] for r in _train_rows(workdir)][-3:] == [saved, saved + 1, saved + 2]
