"""A throwaway single-node SLURM cluster on this machine, for the launcher tests.

`start()` writes a slurm.conf and a munge key into a fresh directory under /tmp, starts munged,
slurmctld and slurmd there (as root, in the foreground, children of this process, on free
ports and a private munge socket, so nothing under /etc is read or changed and two clusters
on one machine do not meet), and returns once `sinfo` shows the node idle. `Cluster.stop()`
cancels the jobs left, stops the three daemons and removes the directory; should this process
die first, the kernel stops them (PR_SET_PDEATHSIG). `missing()` says why no cluster can start
here: the Debian packages slurm-wlm and munge (`.ci/run` installs them where it can) or root.

The node is `localhost` (127.0.0.1) with 2 CPUs and no GPUs, whatever the machine has, so
`jax.distributed.initialize()` finds its coordinator at localhost in any container.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import os
import pathlib
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import time

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "sinfo", "squeue", "scontrol", "scancel", "srun")
TERMINAL = {
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "NODE_FAIL",
    "OUT_OF_MEMORY",
    "PREEMPTED",
    "BOOT_FAIL",
    "DEADLINE",
}

CONF = """\
ClusterName=flaxbert-test
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={root}/munge.socket
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.log
# No cgroups, accounting or MPI: what a container allows.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SchedulerType=sched/builtin
# Start a batch job when it arrives, not up to 3 s later (~1 s from sbatch to its end).
SchedulerParameters=batch_sched_delay=0
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
# The node is declared with 2 CPUs whatever the machine has (no drain on a mismatch).
SlurmdParameters=config_overrides
# JAX's SLURM detection derives the coordinator's port from the job id: a random first id
# keeps two clusters on one machine (two test sessions) off each other's ports.
FirstJobId={first_job_id}
NodeName=localhost NodeAddr=127.0.0.1 CPUs=2 State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
"""


def missing() -> str | None:
    """Why no cluster can start here (None when one can)."""
    absent = [n for n in DAEMONS + CLIENTS if not _which(n)]
    if absent:
        return (
            f"no SLURM here ({', '.join(absent)} not found): needs the Debian packages slurm-wlm "
            "and munge (`apt-get install -y slurm-wlm munge`, which .ci/run does where it can)"
        )
    if os.geteuid() != 0:
        return "the single-node SLURM cluster (munged, slurmctld, slurmd) must be started as root"
    return None


def _which(name: str) -> str | None:
    return shutil.which(name, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Loaded here, not in the forked child (no dlopen between fork and exec).
_PRCTL = ctypes.CDLL(None, use_errno=True).prctl


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when the process that started it dies."""
    _PRCTL(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


@dataclasses.dataclass(frozen=True)
class JobState:
    """One job, or one task of an array job, as `scontrol show job` reports it at its end."""

    job_id: str  # 1234, or 1233_0 for an array task
    state: str  # COMPLETED, FAILED, ...
    exit_code: str  # "0:0": exit status, signal


@dataclasses.dataclass
class Cluster:
    """A running single-node cluster; `env()` is the environment its clients need."""

    root: pathlib.Path
    procs: dict[str, subprocess.Popen]
    start_s: float  # wall time from the first daemon started to the node idle

    @property
    def conf(self) -> pathlib.Path:
        return self.root / "slurm.conf"

    def env(self, base: dict[str, str] | None = None, **extra: str) -> dict[str, str]:
        """`base` (default os.environ) with SLURM_CONF pointing at this cluster, plus `extra`."""
        env = dict(os.environ if base is None else base)
        # Nothing of an enclosing job (tests run inside salloc) reaches this cluster's.
        outer = ("SLURM_", "SBATCH_", "SRUN_", "SALLOC_", "SQUEUE_", "SINFO_")
        env = {k: v for k, v in env.items() if not k.startswith(outer)}
        env["SLURM_CONF"] = str(self.conf)
        env["PATH"] = env.get("PATH", "") + ":/usr/sbin:/sbin"
        env.update(extra)
        return env

    def run(self, *cmd: str, **kwargs) -> subprocess.CompletedProcess:
        """A SLURM client command against this cluster; raises with its stderr on failure."""
        kwargs.setdefault("env", self.env())
        argv = [_which(cmd[0]) or cmd[0], *cmd[1:]]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=30, **kwargs)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} exited {done.returncode}: {done.stderr}")
        return done

    def submit(self, *args: str, env: dict[str, str], cwd: str | os.PathLike) -> str:
        """`sbatch ARGS` from `cwd` with `env` (SLURM_CONF is added); returns the job id."""
        done = self.run("sbatch", "--parsable", *args, env=self.env(env), cwd=cwd)
        return done.stdout.strip().split(";")[0]

    def wait(self, job_id: str, timeout: float = 300) -> list[JobState]:
        """Waits until the job (every task of an array job) has ended; returns their states.

        Polls `scontrol show job` every 0.2 s: `sbatch --wait` polls at growing intervals
        and reported a 12-second job after 42 s here."""
        deadline = time.monotonic() + timeout
        while True:
            out = self.run("scontrol", "--oneliner", "show", "job", job_id).stdout
            jobs = []
            for line in out.splitlines():
                fields = dict(w.split("=", 1) for w in line.split() if "=" in w)
                task = fields.get("ArrayTaskId")
                name = f"{fields.get('ArrayJobId')}_{task}" if task else fields["JobId"]
                jobs.append(JobState(name, fields["JobState"], fields["ExitCode"]))
            if jobs and all(j.state in TERMINAL for j in jobs):
                return sorted(jobs, key=lambda j: j.job_id)
            if time.monotonic() > deadline:
                self.run("scancel", job_id)
                raise TimeoutError(f"job {job_id} still running after {timeout} s: {jobs}")
            time.sleep(0.2)

    def stop(self) -> None:
        """Cancels the jobs left, stops slurmd, slurmctld and munged, removes the directory."""
        with contextlib.suppress(Exception):
            if self.procs.get("slurmctld") and self.procs["slurmctld"].poll() is None:
                self.run("scancel", "--user=root")
                deadline = time.monotonic() + 20
                while self.run("squeue", "--noheader").stdout.strip():
                    if time.monotonic() > deadline:
                        break
                    time.sleep(0.2)
        for name in reversed(DAEMONS):
            proc = self.procs.get(name)
            if proc is None or proc.poll() is not None:
                continue
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=15)
        shutil.rmtree(self.root, ignore_errors=True)

    def log_tail(self, lines: int = 20) -> str:
        """The last lines of each daemon's log, for an error message."""
        parts = []
        for name in ("munged.log", "slurmctld.log", "slurmd.log", "daemons.out"):
            path = self.root / name
            if path.exists():
                tail = path.read_text(errors="replace").splitlines()[-lines:]
                parts.append(f"--- {name}\n" + "\n".join(tail))
        return "\n".join(parts)


def start(timeout: float = 60) -> Cluster:
    """Starts the cluster and waits for its node to be idle (raises with the logs if not)."""
    t0 = time.monotonic()
    # munged wants its socket's directory searchable by all and not writable by others.
    root = pathlib.Path(tempfile.mkdtemp(prefix="flaxbert-slurm-", dir="/tmp"))
    root.chmod(0o711)
    for sub in ("state", "spool"):
        (root / sub).mkdir()
    key = root / "munge.key"
    key.write_bytes(os.urandom(128))
    key.chmod(0o600)
    conf = CONF.format(
        ctld_port=_free_port(),
        slurmd_port=_free_port(),
        root=root,
        first_job_id=random.randrange(1000, 1_000_000),
    )
    (root / "slurm.conf").write_text(conf)
    cluster = Cluster(root, {}, 0.0)
    out = open(root / "daemons.out", "ab")
    commands = {
        "munged": [
            _which("munged"),
            "--foreground",
            f"--socket={root}/munge.socket",
            f"--key-file={key}",
            f"--pid-file={root}/munged.pid",
            f"--log-file={root}/munged.log",
            f"--seed-file={root}/munged.seed",
        ],
        "slurmctld": [_which("slurmctld"), "-D", "-f", str(root / "slurm.conf")],
        "slurmd": [_which("slurmd"), "-D", "-N", "localhost", "-f", str(root / "slurm.conf")],
    }
    try:
        for name in DAEMONS:
            cluster.procs[name] = subprocess.Popen(
                commands[name],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                preexec_fn=_die_with_parent,
            )
            if name == "munged":
                _until(lambda: (root / "munge.socket").exists(), cluster, timeout, "munged")
        _until(lambda: _idle(cluster), cluster, timeout, "the node to be idle")
    except BaseException:
        cluster.stop()
        raise
    finally:
        out.close()
    cluster.start_s = time.monotonic() - t0
    return cluster


def _idle(cluster: Cluster) -> bool:
    try:
        done = cluster.run("sinfo", "--noheader", "--nodes=localhost", "--format=%t")
    except RuntimeError:  # slurmctld not answering yet
        return False
    return done.stdout.strip() == "idle"


def _until(ready, cluster: Cluster, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        dead = [n for n, p in cluster.procs.items() if p.poll() is not None]
        if dead or time.monotonic() > deadline:
            why = f"{', '.join(dead)} exited" if dead else f"no {what} after {timeout} s"
            raise RuntimeError(
                f"single-node SLURM cluster did not start: {why}\n" + (cluster.log_tail())
            )
        time.sleep(0.1)
