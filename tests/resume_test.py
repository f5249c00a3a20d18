"""Preemption and crashes, through the real CLI in a subprocess: a run killed with SIGKILL after
a checkpoint and started again logs exactly the losses of an uninterrupted run; SIGTERM saves
the current step and exits cleanly.

The SIGKILL lands at a known point, whatever the machine's speed: the killed run's loader
blocks for good before the batch of step N + 4 (the test wraps the CLI, the package has no
test hook), so the run is never finished when the test sees checkpoint N and the metrics of
step N + 2, and kills it there."""

import json
import os
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
    # Dropout on (tiny has none on the embedded corpus): its masks must come back with the
    # RNG state.
    "--config.model.hidden_dropout_rate=0.1",
    "--config.model.attention_dropout_rate=0.1",
]


# `python -c STALL ARGS...`: the CLI, with the training loader blocked forever before batch
# `FLAXBERT_TEST_STALL_AT` (a 0-based step: the batch of step N + 1 is batch N).
STALL = """
import os, sys, threading
from flaxbert import cli
from flaxbert.data import pretraining
stall_at, batch = int(os.environ["FLAXBERT_TEST_STALL_AT"]), pretraining.PretrainingBatches.batch
def stalled(self, step, *args, **kwargs):
    if step == stall_at:
        threading.Event().wait()  # until the test kills the process
    return batch(self, step, *args, **kwargs)
pretraining.PretrainingBatches.batch = stalled
sys.exit(cli.main(sys.argv[1:]))
"""


def _start(repo_root, workdir, *extra, stall_at=None):
    entry = ["-m", "flaxbert.cli"] if stall_at is None else ["-c", STALL]
    stall = {} if stall_at is None else {"FLAXBERT_TEST_STALL_AT": str(stall_at)}
    return subprocess.Popen(
        [sys.executable, *entry, *ARGS, "--workdir", str(workdir), *extra],
        cwd=repo_root,
        # XLA's optimisations off: compiling dominates these short runs (both runs alike).
        env={
            **os.environ,
            "PYTHONUNBUFFERED": "1",
            "JAX_DISABLE_MOST_OPTIMIZATIONS": "1",
            **stall,
        },
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
    proc = _start(repo_root, killed, steps, stall_at=N + 3)

    def past_the_checkpoint():
        # A step directory appears only when its checkpoint is complete (orbax renames it);
        # steps after it were trained and logged, and are lost with the kill.
        metrics = killed / "metrics.jsonl"
        if not (killed / "checkpoints" / str(N)).is_dir() or not metrics.exists():
            return False
        complete = metrics.read_text().split("\n")[:-1]  # the last line may be half-written
        return any(json.loads(line).get("step") == N + 2 for line in complete)

    _wait_for(past_the_checkpoint, proc)
    proc.kill()
    out, _ = proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    assert not (killed / "final_metrics.json").exists()
    assert max(r["step"] for r in _train_rows(killed)) in (N + 2, N + 3)

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
