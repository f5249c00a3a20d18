"""What a run leaves in its workdir besides checkpoints and metrics: config.json (the run's
config) and final_metrics.json (written once, when a run completes), and from them whether a
run has already finished (its re-run then does nothing).
"""

from __future__ import annotations

import json
import logging
import os

import jax
import ml_collections

from flaxbert import checkpoint as ckpt

log = logging.getLogger("flaxbert")


def write_run_config(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Creates the workdir, writes config.json (process 0) and returns the config as a dict."""
    os.makedirs(workdir, exist_ok=True)
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config.to_json_best_effort(indent=2) + "\n")
    return json.loads(config.to_json_best_effort())


def with_model(config: ml_collections.ConfigDict, model_config) -> ml_collections.ConfigDict:
    """A copy of `config` whose `model` keys hold the values the run really uses (`model_config`,
    a BertConfig: a vocabulary that follows the tokenizer, a structure taken from a checkpoint),
    so that config.json records the model that was built. `config` itself is not changed."""
    import dataclasses

    out = config.copy_and_resolve_references()
    for key, value in dataclasses.asdict(model_config).items():
        if key in out.model and key != "dtype":  # dtype 'auto' stays as the user wrote it
            out.model[key] = value
    return out


def read_final_metrics(workdir: str) -> dict:
    """WORKDIR/final_metrics.json, or {} when it is absent or unreadable."""
    try:
        with open(os.path.join(workdir, "final_metrics.json"), encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def finished_checkpoint(workdir: str, checkpoint_config, num_steps: int) -> str | None:
    """The step directory of a run that has already finished: its latest checkpoint is at
    `num_steps` or later and it wrote final_metrics.json (a run preempted at its last step
    has not, and goes through the loop once more to write it). None otherwise."""
    final = read_final_metrics(workdir)
    directory = ckpt.checkpoint_directory(workdir, checkpoint_config)
    if not final or not os.path.isdir(directory):
        return None
    try:
        step_dir, meta = ckpt.read_meta(directory)
    except ckpt.CheckpointNotFoundError:
        return None
    return step_dir if int(meta.get("step", -1)) >= num_steps else None


def log_already_finished(step_dir: str, num_steps: int, key: str) -> int:
    """Says that a re-run of a finished run does nothing; returns the checkpoint's step."""
    step = int(os.path.basename(step_dir))
    log.info(
        "the run is already finished: checkpoint %s is at step %d, %s=%d; nothing to do "
        "(final_metrics.json is left as it is; raise %s to train on)",
        step_dir,
        step,
        key,
        num_steps,
        key,
    )
    return step
