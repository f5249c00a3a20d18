"""A sweep as a SLURM array job (`flaxbert sweep --emit slurm`): DIR/sweep.sbatch runs one
point per array task, skips a finished point (asking `flaxbert.sweeps.status.is_finished`),
resumes an interrupted one and appends each point's output to its workdir's log.txt, as
`flaxbert sweep` does on one machine.
"""

from __future__ import annotations

import os
import shlex
import sys

from flaxbert.sweeps.points import Point, Sweep

_IS_FINISHED = (
    "import sys; from flaxbert.sweeps.status import is_finished; "
    "sys.exit(0 if is_finished(sys.argv[1], int(sys.argv[2])) else 1)"
)


def emit_slurm(sweep: Sweep, parallel: int | None = None) -> str:
    """Writes DIR/sweep.sbatch, a SLURM array job with one task per point; returns its path."""
    path = os.path.abspath(os.path.join(sweep.workdir, "sweep.sbatch"))
    n = len(sweep.points)
    limit = f"%{parallel}" if parallel else ""

    def argv(p: Point) -> str:
        words = [shlex.quote(w) for w in p.argv]
        if p.argv[0] == sys.executable:
            words[0] = '"$PYTHON"'
        return " ".join(words)

    cases = "\n".join(f"  {i}) cmd=({argv(p)}) ;;" for i, p in enumerate(sweep.points))
    names = " ".join(shlex.quote(p.name) for p in sweep.points)
    steps = " ".join(str(p.num_steps) for p in sweep.points)
    out_dir = os.path.abspath(sweep.workdir)
    text = f"""#!/bin/bash
# flaxbert sweep of {sweep.config}: {n} points, one SLURM array task each.
# Written by `flaxbert sweep --emit slurm`; the points are listed in sweep.json beside it.
# Edit the #SBATCH lines (GPUs, time), then:
#
#   sbatch {path}
#
# A task whose point is finished exits at once; an interrupted one resumes from its latest
# checkpoint, so resubmitting the script (or one task: sbatch --array=3 ...) is safe. Each
# point logs to its workdir's log.txt. Options given to sbatch override the #SBATCH lines,
# e.g. on nodes without GPUs: sbatch --gpus-per-task=0 --cpus-per-task=2 {path}
# When all are done:
#
#   flaxbert sweep-summary {out_dir}
#
#SBATCH --job-name=flaxbert-sweep
#SBATCH --array=0-{n - 1}{limit}
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --gpus-per-task=1
#SBATCH --cpus-per-task=8
#SBATCH --time=24:00:00
#SBATCH --output={out_dir}/slurm-%A_%a.out

set -euo pipefail
cd {shlex.quote(os.getcwd())}
PYTHON=${{PYTHON:-{shlex.quote(sys.executable)}}}
# Activate the environment flaxbert is installed in, e.g.:
# source ~/venvs/flaxbert/bin/activate

names=({names})
steps=({steps})
i=$SLURM_ARRAY_TASK_ID
case "$i" in
{cases}
  *) echo "no sweep point $i (0-{n - 1})" >&2; exit 2 ;;
esac
sub={shlex.quote(out_dir)}/${{names[$i]}}
if "$PYTHON" -c {shlex.quote(_IS_FINISHED)} "$sub" "${{steps[$i]}}"; then
  echo "${{names[$i]}}: finished, skipped"
  exit 0
fi
mkdir -p "$sub"
echo "=== flaxbert sweep, SLURM job ${{SLURM_ARRAY_JOB_ID:-}}_$i: ${{cmd[*]}}" >> "$sub/log.txt"
"${{cmd[@]}}" >> "$sub/log.txt" 2>&1
"""
    os.makedirs(sweep.workdir, exist_ok=True)
    with open(path, "w") as f:
        f.write(text)
    os.chmod(path, 0o755)
    return path
