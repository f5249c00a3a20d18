"""The SLURM launchers under a real SLURM: a single-node cluster (tests/slurm_cluster.py) runs
launch/slurm.sbatch as 2 tasks x 4 CPU devices, which must train exactly like 1 process x 8
(and, with a stand-in `flaxbert`, gives one task per node all the GPUs and a CPU node none),
and a `flaxbert sweep --emit slurm` array job, which must run each point once and skip the
finished ones when submitted again.

Skipped, saying why, where the Debian packages slurm-wlm and munge are absent or the tests do
not run as root; .ci/run installs the packages where it can.
"""

import json
import os
import re
import sys

import pytest
import slurm_cluster
from tiny import assert_processes_train_alike, tiny_overrides

from flaxbert import cli, train
from flaxbert.config import load_config

# As tests/multihost_test.py, a tiny run over a data=2 x fsdp=2 x tensor=2 mesh (across the
# two tasks the data axis is split, within each the fsdp and tensor axes), made cheaper: one
# layer, no dropout (its masks across processes are multihost_test's to check): compiling
# dominates these runs, and a one-layer model without dropout starts about a third faster.
SMALL = [
    *(o for o in tiny_overrides(seq=32, predictions=5, batch=16) if "dropout" not in o),
    "--config.model.num_layers=1",
]
OVERRIDES = [
    *SMALL,
    "--config.data.synthetic_documents=200",
    "--config.data.synthetic_eval_documents=20",
    "--config.train.num_steps=3",
    "--config.train.log_every=1",
    "--config.eval.every_steps=0",
    "--config.eval.num_batches=1",
    "--config.parallel.data=2",
    "--config.parallel.fsdp=2",
    "--config.parallel.tensor=2",
]


@pytest.fixture(scope="module")
def cluster():
    """One single-node SLURM cluster for the module's tests, stopped after them."""
    reason = slurm_cluster.missing()
    if reason:
        pytest.skip(reason)
    c = slurm_cluster.start()
    print(f"single-node SLURM cluster up in {c.start_s:.1f}s ({c.root})")
    yield c
    c.stop()


@pytest.fixture
def job_env(repo_root, tmp_path):
    """What a job needs to run this checkout's flaxbert with this interpreter, on the CPU:
    `flaxbert` on PATH is a wrapper for `sys.executable -m flaxbert.cli`, and PYTHONPATH
    holds the repository (whatever is installed elsewhere)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    wrapper = bin_dir / "flaxbert"
    wrapper.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m flaxbert.cli "$@"\n')
    wrapper.chmod(0o755)
    path = os.environ.get("PYTHONPATH")
    return {
        **os.environ,
        "PATH": f"{bin_dir}:{os.environ.get('PATH', '')}",
        "PYTHONPATH": f"{repo_root}:{path}" if path else str(repo_root),
        "JAX_PLATFORMS": "cpu",
        "JAX_DISABLE_MOST_OPTIMIZATIONS": "1",
        "PYTHONUNBUFFERED": "1",
    }


def _assert_completed(cluster, states, *outputs):
    logs = "\n".join(p.read_text()[-4000:] for p in outputs if p.exists())
    bad = [s for s in states if (s.state, s.exit_code) != ("COMPLETED", "0:0")]
    assert not bad, f"{bad}\n{logs}\n{cluster.log_tail()}"


def test_sbatch_two_tasks_train_like_one_process(
    cluster, repo_root, tmp_path, job_env, fast_compiles
):
    config_spec = str(repo_root / "configs/pretrain.py") + ":tiny"
    multi, out = tmp_path / "multi", tmp_path / "job.out"
    env = {
        **job_env,
        "CONFIG": config_spec,
        "WORKDIR": str(multi),
        "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
    }
    layout = ["--nodes=1", "--ntasks-per-node=2", "--cpus-per-task=1", "--gpus-per-node=0"]
    job = cluster.submit(
        *layout, f"--output={out}", "launch/slurm.sbatch", *OVERRIDES, env=env, cwd=repo_root
    )
    # The single-process run (this process has 8 devices) while the job's two tasks work.
    single = tmp_path / "single"
    result = train.pretrain(load_config(config_spec, OVERRIDES), str(single))
    _assert_completed(cluster, cluster.wait(job), out)

    # JAX found the job's layout in SLURM's variables: two processes of 4 devices each.
    text = out.read_text()
    for i in (0, 1):
        assert re.search(rf"^{i}: .*process {i} of 2 \(slurm\); 4 local of 8 devices$", text, re.M)
    assert_processes_train_alike(single, multi, result)


def test_sbatch_gives_one_task_per_node_all_the_gpus(cluster, repo_root, tmp_path):
    """Which devices each task may use, as the script exports them to `flaxbert` (a stand-in
    here that prints them): with one task per node, all the GPUs SLURM bound the job to; on
    a node without GPUs (no CUDA_VISIBLE_DEVICES, no nvidia-smi), nothing, and no error."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "flaxbert"
    fake.write_text('#!/bin/sh\necho "ids=${JAX_LOCAL_DEVICE_IDS:-none} $*"\n')
    fake.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "WORKDIR": "w"}
    cases = [  # tasks per node, CUDA_VISIBLE_DEVICES, what each task sees
        (1, None, ["0: ids=none"]),
        (1, "4,5,6", ["0: ids=0,1,2"]),  # JAX numbers the visible GPUs from 0
        (2, "4,5", ["0: ids=none", "1: ids=none"]),  # JAX gives task k GPU k itself
    ]
    jobs = []
    for tasks, visible, _ in cases:  # all submitted, then waited for: they overlap
        out = tmp_path / f"{tasks}-{visible}.out"
        case_env = {**env, "CUDA_VISIBLE_DEVICES": visible} if visible else env
        job = cluster.submit(
            *("--nodes=1", f"--ntasks-per-node={tasks}", "--cpus-per-task=1"),
            *("--gpus-per-node=0", f"--output={out}", "launch/slurm.sbatch", "--x=1"),
            env=case_env,
            cwd=repo_root,
        )
        jobs.append((job, out))
    for (job, out), (tasks, visible, expected) in zip(jobs, cases, strict=True):
        _assert_completed(cluster, cluster.wait(job), out)
        lines = sorted(out.read_text().splitlines())
        command = "pretrain --config configs/pretrain.py:base --workdir w --x=1"
        assert lines == [f"{e} {command}" for e in expected], (tasks, visible)


SWEEP = """
from flaxbert.config import load_module
from flaxbert.sweeps.points import grid

_PRETRAIN = load_module({pretrain!r})


def get_config(arg="tiny"):
    return _PRETRAIN.get_config(arg)


def get_sweep():
    return grid(**{{"train.learning_rate": [1e-3, 3e-3]}})
"""


def test_sweep_array_job_runs_each_point_once(
    cluster, repo_root, tmp_path, job_env, monkeypatch, capsys
):
    config = tmp_path / "sweep_config.py"
    config.write_text(SWEEP.format(pretrain=str(repo_root / "configs/pretrain.py")))
    root = tmp_path / "sweep"
    steps = ["--config.train.num_steps=2", "--config.train.log_every=1"]
    small = [
        *SMALL,
        "--config.train.batch_size=8",
        "--config.data.synthetic_documents=100",
        "--config.data.synthetic_eval_documents=10",
        "--config.eval.num_batches=1",
        "--config.eval.batch_size=8",
    ]
    monkeypatch.chdir(repo_root)  # the script runs its points from here
    argv = ["sweep", "--config", str(config), "--workdir", str(root), *steps, *small]
    assert cli.main([*argv, "--emit", "slurm"]) == 0
    script = root / "sweep.sbatch"
    assert f"sbatch {script}" in capsys.readouterr().out
    names = ["lr=0.001", "lr=0.003"]
    env = {**job_env, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    # The script asks for a GPU and 8 CPUs per task; this node has 2 CPUs and no GPU.
    cpu = ["--cpus-per-task=1", "--gpus-per-task=0"]

    job = cluster.submit(*cpu, str(script), env=env, cwd=repo_root)
    states = cluster.wait(job)
    outs = [root / f"slurm-{job}_{i}.out" for i in (0, 1)]
    logs = [root / n / "log.txt" for n in names]
    _assert_completed(cluster, states, *outs, *logs)
    assert [s.job_id for s in states] == [f"{job}_0", f"{job}_1"]
    finals = {}
    for i, name in enumerate(names):
        final = root / name / "final_metrics.json"
        assert json.loads(final.read_text())["step"] == 2, name
        finals[name] = (final.read_bytes(), final.stat().st_mtime_ns)
        log = logs[i].read_text()
        assert log.startswith(f"=== flaxbert sweep, SLURM job {job}_{i}: "), log[:300]
        command = log.splitlines()[0]
        assert f" --workdir {root / name} " in command
        assert command.endswith(f" --config.train.learning_rate={name[3:]}")
        assert "done: 2 steps" in log
    rates = [json.loads((root / n / "config.json").read_text())["train"] for n in names]
    assert [r["learning_rate"] for r in rates] == [1e-3, 3e-3]
    before = [log.read_text() for log in logs]

    # Submitted again: both points are finished, so each task says so and runs nothing.
    again = cluster.submit(*cpu, str(script), env=env, cwd=repo_root)
    _assert_completed(cluster, cluster.wait(again), *logs)
    for i, name in enumerate(names):
        out = (root / f"slurm-{again}_{i}.out").read_text()
        assert out.strip() == f"{name}: finished, skipped"
        final = root / name / "final_metrics.json"
        assert (final.read_bytes(), final.stat().st_mtime_ns) == finals[name]
        assert logs[i].read_text() == before[i]
