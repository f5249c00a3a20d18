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

    def __init__(self, workdir: str, enabled: bool = True):
        self.enabled = enabled
        self._jsonl = self._tb = None
        if enabled:
            os.makedirs(workdir, exist_ok=True)
            self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a", encoding="utf-8")
            from tensorboardX import SummaryWriter  # imported here: only the writer needs it

            self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

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
