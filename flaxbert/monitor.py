"""Run output: `metrics.jsonl`, TensorBoard events (tensorboardX, no TensorFlow), progress lines."""

from __future__ import annotations

import json
import logging
import math
import os
import time

log = logging.getLogger("flaxbert")


class MetricWriter:
    """Appends one JSON object per call to `metrics.jsonl` and the same scalars to TensorBoard.

    Only one process of a multi-host job writes (`enabled=jax.process_index() == 0`).
    """

    def __init__(self, workdir: str, enabled: bool = True, resume_step: int = 0):
        """`resume_step`: the step the run starts from. Rows after it (written by an
        interrupted run past its last checkpoint) are dropped from `metrics.jsonl`, and
        TensorBoard is told to purge its events after it, so the logs read as one run."""
        self.enabled = enabled
        self._jsonl = self._tb = None
        if enabled:
            os.makedirs(workdir, exist_ok=True)
            path = os.path.join(workdir, "metrics.jsonl")
            _truncate_after(path, resume_step)
            self._jsonl = open(path, "a", encoding="utf-8")
            self._tb = _summary_writer()(
                os.path.join(workdir, "tensorboard"), purge_step=resume_step + 1
            )

    def write(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        row = {"step": int(step), **{k: float(v) for k, v in metrics.items()}}
        self._jsonl.write(json.dumps(row) + "\n")
        self._jsonl.flush()
        for key, value in metrics.items():
            self._tb.add_scalar(key, float(value), int(step))
        self._tb.flush()

    def close(self) -> None:
        if self._jsonl:
            self._jsonl.close()
            self._tb.close()
            self._jsonl = self._tb = None


def _truncate_after(path: str, step: int) -> None:
    """Keeps the rows of a metrics.jsonl up to `step` (a torn last line is dropped too)."""
    if not os.path.exists(path):
        return
    kept = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                row = json.loads(line)
            except ValueError:
                continue  # a line cut short by a kill
            if row.get("step", 0) <= step:
                kept.append(line if line.endswith("\n") else line + "\n")
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(kept)
    os.replace(tmp, path)


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


class Progress:
    """Step, total, headline metrics and ETA on one line per logged step."""

    def __init__(self, total_steps: int, first_step: int = 0, enabled: bool = True):
        self.total = total_steps
        self.first = first_step
        self.start = time.perf_counter()
        self.enabled = enabled

    def line(
        self, step: int, metrics: dict[str, float], keys=("loss", "mlm_accuracy", "nsp_accuracy")
    ) -> str:
        done = step - self.first
        elapsed = time.perf_counter() - self.start
        eta = elapsed / done * (self.total - step) if done > 0 else float("nan")
        parts = [f"step {step}/{self.total} ({100 * step / max(self.total, 1):.0f}%)"]
        parts += [f"{k} {metrics[k]:.4f}" for k in keys if k in metrics]
        if "seq_per_sec" in metrics:
            parts.append(f"{metrics['seq_per_sec']:.0f} seq/s")
        parts.append(f"elapsed {format_duration(elapsed)}, ETA {format_duration(eta)}")
        return " | ".join(parts)

    def log(self, step: int, metrics: dict[str, float], **kw) -> None:
        if self.enabled:
            log.info(self.line(step, metrics, **kw))


def _summary_writer():
    """tensorboardX's SummaryWriter, imported on first use. tensorboardX imports torch when it
    is installed (for `add_graph` and torch tensors, which flaxbert never passes it): 3.3 s of
    start-up in every run on the 2-core CPU machine, measured with `python -c "import
    tensorboardX"` (3.9 s against 0.6 s). Unless torch is already loaded, it is hidden while
    tensorboardX loads, so tensorboardX takes its numpy-only path; torch stays importable."""
    import sys

    if "torch" in sys.modules:
        from tensorboardX import SummaryWriter

        return SummaryWriter
    sys.modules["torch"] = None  # `import torch` raises ImportError while this is set
    try:
        from tensorboardX import SummaryWriter
    finally:
        del sys.modules["torch"]
    return SummaryWriter
