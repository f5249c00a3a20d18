"""Two processes x 4 CPU devices, started by launch/local.sh, train exactly like 1 x 8."""

import os
import re
import subprocess
import sys

from tiny import assert_processes_train_alike

from flaxbert import train
from flaxbert.config import load_config

# A tiny run over a data=2 x fsdp=2 x tensor=2 mesh: across the two processes the data axis
# is split (each feeds its own rows), within each the fsdp and tensor axes. Dropout is on:
# its masks do not depend on the sharding.
OVERRIDES = [
    "--config.model.hidden_size=32",
    "--config.model.num_layers=2",
    "--config.model.num_heads=2",
    "--config.model.intermediate_size=64",
    "--config.model.max_position_embeddings=32",
    "--config.data.max_seq_length=32",
    "--config.data.max_predictions_per_seq=5",
    "--config.data.synthetic_documents=200",
    "--config.data.synthetic_eval_documents=20",
    "--config.train.batch_size=16",
    "--config.train.num_steps=3",
    "--config.train.warmup_steps=1",
    "--config.train.log_every=1",
    "--config.eval.batch_size=16",
    "--config.eval.num_batches=1",
    "--config.parallel.data=2",
    "--config.parallel.fsdp=2",
    "--config.parallel.tensor=2",
    # Dropout on: its masks must agree between one process and two.
    "--config.model.hidden_dropout_rate=0.1",
    "--config.model.attention_dropout_rate=0.1",
]


def test_two_processes_match_one(repo_root, tmp_path, fast_compiles):
    config_spec = str(repo_root / "configs/pretrain.py") + ":tiny"
    env = {
        **os.environ,
        "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
        "JAX_PLATFORMS": "cpu",
        "JAX_DISABLE_MOST_OPTIMIZATIONS": "1",
        "PYTHONUNBUFFERED": "1",
    }
    multi = tmp_path / "multi"
    cmd = [str(repo_root / "launch/local.sh"), "2", sys.executable, "-m", "flaxbert.cli"]
    cmd += ["pretrain", "--config", config_spec, "--workdir", str(multi), *OVERRIDES]
    proc = subprocess.Popen(
        cmd, cwd=repo_root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    # The single-process run (this process has 8 devices) while the two others work.
    single = tmp_path / "single"
    result = train.pretrain(load_config(config_spec, OVERRIDES), str(single))
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-4000:]
    assert "[0]" in out and "[1]" in out and "process 1 of 2" in out
    # The launcher's output is the runs' own log lines: no gloo connection chatter, no stray
    # bare values.
    assert "[Gloo]" not in out
    assert not re.search(r"^\[\d\] \S*$", out, re.M), out

    assert_processes_train_alike(single, multi, result)


def test_launcher_stops_the_others_when_one_fails(repo_root):
    script = 'if [ "$FLAXBERT_PROCESS_ID" = 1 ]; then exit 7; fi; sleep 60'
    result = subprocess.run(
        [str(repo_root / "launch/local.sh"), "3", "bash", "-c", script],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 7
    assert "process 1 failed (exit 7)" in result.stderr
