"""Where a sweep's point stands, from what its workdir holds: done (final_metrics.json reached
the last step), failed, incomplete or missing. `flaxbert sweep` skips the done ones, the
summary reports each one's status, and the SLURM script asks `is_finished` before it runs a
task.
"""

from __future__ import annotations

import os

from flaxbert.sweeps.logs import read_json, read_metrics

STATUSES = ("done", "failed", "incomplete", "missing")


def is_finished(workdir: str, num_steps: int) -> bool:
    """WORKDIR/final_metrics.json exists and its step reached `num_steps`. With num_steps 0
    (fine-tuning by epochs: the count needs the data) the run's last step must be its last
    evaluation's, as it is at the end of training and not after a preemption between two."""
    final = read_json(os.path.join(workdir, "final_metrics.json"))
    if not final or "step" not in final:
        return False
    if num_steps > 0:
        return final["step"] >= num_steps
    evals = [r["step"] for r in read_metrics(workdir) if any(k.startswith("eval/") for k in r)]
    return bool(evals) and evals[-1] == final["step"]


def point_status(workdir: str, num_steps: int) -> str:
    """done, failed (the sweep's last run of it exited non-zero), incomplete (started, not
    finished: running, interrupted or preempted) or missing (never started)."""
    if is_finished(workdir, num_steps):
        return "done"
    last = read_json(os.path.join(workdir, "sweep_status.json"))
    if last and last.get("returncode"):
        return "failed"
    return "incomplete" if os.path.isdir(workdir) else "missing"
