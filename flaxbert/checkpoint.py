"""Checkpoints: orbax `CheckpointManager` saves, exact resume, partial (encoder) restore.

Layout of one checkpoint, `WORKDIR/checkpoints/<step>/`:

    params/     the parameters (orbax OCDBT array store, any sharding)
    opt_state/  the optimizer state, a separate item so a fine-tuning job never reads it
    meta/       JSON: step, dropout RNG key, data loader position, the resolved config and
                the tokenizer (a copy is kept at WORKDIR/tokenizer.model, or WORKDIR/vocab.txt
                for a WordPiece vocabulary from `flaxbert convert`)
    metrics/    the eval metrics the step was ranked by (only when `checkpoint.best_metric`)

A step directory appears only once complete (orbax writes into a temporary directory and
renames it), and old checkpoints are deleted only after the new one has been committed, so a
kill at any moment leaves the previous checkpoint intact. A checkpoint that is complete on
disk but unreadable (a truncated file, a missing item) is moved aside to
`WORKDIR/checkpoints.corrupt/` with a warning, and the one before it is used.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import time
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from flaxbert.config import ConfigError

log = logging.getLogger("flaxbert")

SUBDIR = "checkpoints"
TOKENIZER_FILE = "tokenizer.model"
FORMAT_VERSION = 1
_MAX_LISTED = 25  # mismatching parameters named in an error


class CheckpointMismatchError(ConfigError):
    """A checkpoint's parameters do not fit the model the config describes."""


class CheckpointNotFoundError(ConfigError):
    pass


# ------------------------------------------------------------------------------ paths


def checkpoint_directory(workdir: str, checkpoint_config=None) -> str:
    custom = checkpoint_config.get("dir", "") if checkpoint_config is not None else ""
    return os.path.abspath(custom or os.path.join(workdir, SUBDIR))


def _is_step_dir(path: str) -> bool:
    return os.path.basename(os.path.normpath(path)).isdigit() and os.path.isdir(
        os.path.join(path, "params")
    )


def resolve(path: str) -> tuple[str, int | None]:
    """A pre-training workdir, its `checkpoints/` directory or one step directory ->
    (checkpoint directory, step or None for the latest complete one). `~` is expanded (a
    `--config.init_from=~/run` override reaches us unexpanded by the shell)."""
    path = os.path.abspath(os.path.expanduser(path))
    if _is_step_dir(path):
        return os.path.dirname(path), int(os.path.basename(path))
    if os.path.isdir(os.path.join(path, SUBDIR)):
        return os.path.join(path, SUBDIR), None
    if os.path.isdir(path) and any(_is_step_dir(os.path.join(path, n)) for n in os.listdir(path)):
        return path, None
    raise CheckpointNotFoundError(
        f"no flaxbert checkpoint at {path}: give a pre-training workdir (holding {SUBDIR}/), "
        f"its {SUBDIR}/ directory, or one step directory such as {SUBDIR}/1000"
    )


# ------------------------------------------------------------------------------ shapes


def _key_name(k) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def _flat_shapes(tree) -> dict[str, tuple[int, ...]]:
    """'a/b/c' -> shape for every array leaf of a tree (arrays, ShapeDtypeStructs or orbax
    metadata); namedtuple fields and dict keys are named alike, so a saved optimizer state
    (stored as nested dicts) compares with a live one."""
    out = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        shape = getattr(leaf, "shape", None)
        if shape is None:
            shape = np.shape(leaf)
        out["/".join(_key_name(k) for k in path)] = tuple(shape)
    return out


def shape_mismatches(saved, expected, partial: bool = False) -> list[str]:
    """One line per parameter that is missing, extra (unless `partial`: a subset is wanted)
    or of another shape."""
    saved, expected = _flat_shapes(saved), _flat_shapes(expected)
    lines, structural = [], []
    for key in sorted(set(expected) if partial else set(saved) | set(expected)):
        s, e = saved.get(key), expected.get(key)
        if s == e:
            continue
        if s is None:
            structural.append(f"  {key}: missing from the checkpoint; the config expects {e}")
        elif e is None:
            structural.append(
                f"  {key}: in the checkpoint {s}; not in the model the config describes"
            )
        else:
            lines.append(f"  {key}: checkpoint {s}, config {e}")
    return structural + lines  # another number of layers shows first


def _mismatch_error(where: str, what: str, lines: list[str], hint: str) -> CheckpointMismatchError:
    shown = lines[:_MAX_LISTED]
    if len(lines) > _MAX_LISTED:
        shown.append(f"  ... and {len(lines) - _MAX_LISTED} more")
    return CheckpointMismatchError(
        f"checkpoint {where} does not fit the config: {len(lines)} {what} differ:\n"
        + "\n".join(shown)
        + f"\n{hint}"
    )


def _config_hint(step_dir: str) -> str:
    model = ""
    try:
        with open(os.path.join(step_dir, "meta", "metadata"), encoding="utf-8") as f:
            saved = json.load(f)["config"]["model"]
        keys = ("vocab_size", "hidden_size", "num_layers", "num_heads", "intermediate_size")
        model = "The checkpoint's model: " + ", ".join(f"model.{k}={saved[k]}" for k in keys)
        model += ". "
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return (
        f"{model}Its whole config is in {os.path.join(step_dir, 'meta', 'metadata')} (key "
        "'config'): set the model keys to match it, or start a fresh run in another workdir."
    )


# ------------------------------------------------------------------------------ manager


@dataclasses.dataclass
class Restored:
    step: int
    params: Any
    opt_state: Any
    meta: dict


class Checkpoints:
    """The workdir's checkpoints: periodic asynchronous saves, retention, safe restore."""

    def __init__(
        self,
        directory: str,
        keep: int = 3,
        best_metric: str = "",
        best_mode: str = "max",
        async_save: bool = True,
    ):
        self.directory = os.path.abspath(directory)
        self.best_metric = best_metric
        policies = [ocp.checkpoint_managers.LatestN(n=keep)]
        options = dict(
            create=True,
            cleanup_tmp_directories=True,  # the remains of a save a kill interrupted
            enable_async_checkpointing=async_save,
        )
        if best_metric:

            def metric(metrics):
                return float(metrics[best_metric])

            policies.append(
                ocp.checkpoint_managers.BestN(
                    get_metric_fn=metric,
                    reverse=best_mode == "min",
                    n=1,
                    keep_checkpoints_without_metrics=False,
                )
            )
            options.update(best_fn=metric, best_mode=best_mode)
        self.manager = ocp.CheckpointManager(
            self.directory,
            item_handlers={
                "params": ocp.StandardCheckpointHandler(),
                "opt_state": ocp.StandardCheckpointHandler(),
                "meta": ocp.JsonCheckpointHandler(),
            },
            options=ocp.CheckpointManagerOptions(
                preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(policies),
                **options,
            ),
        )
        self.last_blocking_s = 0.0

    # -- saving

    def save(self, step: int, params, opt_state, meta: dict, metrics: dict | None = None):
        """Starts an asynchronous save; returns once the arrays have been copied off the
        devices (the time training waits, logged). An earlier save still in flight is waited
        for first."""
        if self.best_metric and metrics is not None and self.best_metric not in metrics:
            metrics = None  # ranked only by steps that were evaluated
        start = time.perf_counter()
        self.manager.save(
            step,
            args=ocp.args.Composite(
                params=ocp.args.StandardSave(params),
                opt_state=ocp.args.StandardSave(opt_state),
                meta=ocp.args.JsonSave(meta),
            ),
            metrics={k: float(v) for k, v in metrics.items()} if metrics else None,
            force=True,
        )
        self.last_blocking_s = time.perf_counter() - start
        return self.last_blocking_s

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()

    # -- reading

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def best_step(self) -> int | None:
        return self.manager.best_step() if self.best_metric else None

    def step_dir(self, step: int) -> str:
        return os.path.join(self.directory, str(step))

    def _quarantine(self, step: int, error: BaseException) -> None:
        where = self.step_dir(step)
        aside = os.path.join(
            self.directory + ".corrupt", f"{step}-{time.strftime('%Y%m%d-%H%M%S')}"
        )
        log.warning(
            "checkpoint %s is incomplete or corrupted (%s: %s); moving it to %s and falling "
            "back to the previous checkpoint",
            where,
            type(error).__name__,
            str(error).splitlines()[0][:300] if str(error) else "",
            aside,
        )
        if jax.process_index() == 0:
            os.makedirs(os.path.dirname(aside), exist_ok=True)
            shutil.move(where, aside)
        _sync(f"flaxbert_quarantine_{step}")
        self.manager.reload()

    def restore_latest(self, abstract_params, abstract_opt_state) -> Restored | None:
        """The newest readable checkpoint onto the given targets (ShapeDtypeStructs carrying
        the shardings wanted: any mesh), or None when there is none. Unreadable ones are set
        aside with a warning; one whose shapes do not fit the targets is an error."""
        for step in reversed(self.steps()):
            where = self.step_dir(step)
            try:
                metadata = self.manager.item_metadata(step)
                saved_params, saved_opt = metadata["params"], metadata["opt_state"]
                if saved_params is None or saved_opt is None:
                    missing = "params" if saved_params is None else "opt_state"
                    raise FileNotFoundError(f"item {missing!r} is missing")
            except Exception as e:  # noqa: BLE001 -- any unreadable checkpoint is set aside
                self._quarantine(step, e)
                continue
            lines = shape_mismatches(saved_params, abstract_params)
            if lines:
                raise _mismatch_error(where, "parameters", lines, _config_hint(where))
            lines = shape_mismatches(saved_opt, abstract_opt_state)
            if lines:
                raise _mismatch_error(
                    where,
                    "optimizer-state entries",
                    lines,
                    "The optimizer (train.optimizer, train.max_grad_norm) differs from the "
                    "one that wrote it; use the same, or start a fresh run in another workdir.",
                )
            try:
                restored = self.manager.restore(
                    step,
                    args=ocp.args.Composite(
                        params=ocp.args.StandardRestore(abstract_params),
                        opt_state=ocp.args.StandardRestore(abstract_opt_state),
                        meta=ocp.args.JsonRestore(),
                    ),
                )
                meta = restored["meta"]
                if not isinstance(meta, dict) or meta.get("step") != step:
                    raise ValueError(f"meta item is unreadable or names another step: {meta!r}")
            except Exception as e:  # noqa: BLE001
                self._quarantine(step, e)
                continue
            return Restored(step, restored["params"], restored["opt_state"], meta)
        return None


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


# ------------------------------------------------------------------------------ fine-tuning


def read_meta(path: str) -> tuple[str, dict]:
    """(step directory, meta) of the checkpoint `path` names (see `resolve`)."""
    directory, step = resolve(path)
    if step is None:
        steps = sorted(
            int(n) for n in os.listdir(directory) if _is_step_dir(os.path.join(directory, n))
        )
        if not steps:
            raise CheckpointNotFoundError(f"no complete checkpoint in {directory}")
        step = steps[-1]
    step_dir = os.path.join(directory, str(step))
    meta_file = os.path.join(step_dir, "meta", "metadata")
    try:
        with open(meta_file, encoding="utf-8") as f:
            return step_dir, json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointNotFoundError(f"cannot read {meta_file}: {e}") from None


def model_config_of(meta: dict, dropout: bool = True):
    """The `BertConfig` a checkpoint's `meta` records (`model`, or the run config's
    `config.model`); with `dropout=False` both dropout rates are 0, the model as inference
    (feature extraction, fill-mask) runs it. Raises what `BertConfig.from_dict` raises, or
    KeyError / TypeError for a meta without a model config."""
    from flaxbert.model_config import BertConfig

    values = meta.get("model") or meta["config"]["model"]
    if not dropout:
        values = {**values, "hidden_dropout_rate": 0.0, "attention_dropout_rate": 0.0}
    return BertConfig.from_dict(values)


def _params_item(step_dir: str):
    """(orbax handler, path) of a checkpoint's `params` item, read on its own.

    The item is one part of a CheckpointManager step: the step's metadata file
    (_CHECKPOINT_METADATA) is in the step directory, not in the item's. A `Checkpointer` opened
    on the item directory looks for it there and warns "Metadata file does not exist" on every
    read; the item's own handler reads the item alone. Close the handler after use."""
    return ocp.PyTreeCheckpointHandler(), epath.Path(step_dir) / "params"


def _saved_params_tree(step_dir: str) -> dict:
    handler, path = _params_item(step_dir)
    try:
        return handler.metadata(path).tree
    finally:
        handler.close()


def host_params(step_dir: str) -> dict:
    """Every parameter of the checkpoint in `step_dir` (checkpoints/STEP), as numpy arrays on
    the host, whatever sharding it was saved with."""
    handler, path = _params_item(step_dir)
    try:
        tree = handler.metadata(path).tree
        restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
        return handler.restore(path, args=ocp.args.PyTreeRestore(restore_args=restore_args))
    finally:
        handler.close()


def saved_param_groups(step_dir: str) -> dict[str, list[str]]:
    """Top-level parameter groups of a checkpoint and the names directly under each."""
    tree = _saved_params_tree(step_dir)
    return {k: sorted(v) if isinstance(v, dict) else [] for k, v in tree.items()}


def restore_params(path: str, abstract_subtree: dict, step_dir: str | None = None):
    """Only the chosen top-level parameter groups (e.g. `{'bert': ...}`, the encoder) of a
    checkpoint, placed as `abstract_subtree`'s shardings say (any mesh); the optimizer state
    and the other groups are not read.

    `abstract_subtree` maps top-level names to trees of ShapeDtypeStructs. Returns the restored
    subtree. Shapes that do not fit stop with a `CheckpointMismatchError` naming them."""
    if step_dir is None:
        step_dir, _ = read_meta(path)
    saved = _saved_params_tree(step_dir)
    missing = [k for k in abstract_subtree if k not in saved]
    if missing:
        raise CheckpointMismatchError(
            f"checkpoint {step_dir} has no parameter group(s) {', '.join(missing)} "
            f"(it has {', '.join(sorted(saved))})"
        )
    lines = shape_mismatches(
        {k: saved[k] for k in abstract_subtree}, abstract_subtree, partial=True
    )
    if lines:
        raise _mismatch_error(step_dir, "parameters", lines, _config_hint(step_dir))
    handler, path = _params_item(step_dir)
    try:
        return handler.restore(
            path,
            args=ocp.args.PyTreeRestore(
                item=abstract_subtree,
                restore_args=ocp.checkpoint_utils.construct_restore_args(abstract_subtree),
                partial_restore=True,
            ),
        )
    finally:
        handler.close()


def tokenizer_of(path: str) -> str:
    """The tokenizer a checkpoint was trained with: a SentencePiece model, or the WordPiece
    vocab.txt of a converted one ('' for the embedded synthetic corpus, which has none)."""
    step_dir, meta = read_meta(path)
    ref = meta.get("tokenizer") or {}
    workdir = os.path.dirname(os.path.dirname(step_dir))
    candidates = [os.path.join(workdir, ref["copy"])] if ref.get("copy") else []
    candidates += [ref["path"]] if ref.get("path") else []
    for c in candidates:
        if os.path.exists(c):
            return c
    if candidates:
        raise CheckpointNotFoundError(
            f"the tokenizer of {step_dir} is gone: looked for {', '.join(candidates)}"
        )
    return ""


def keep_tokenizer(workdir: str, tokenizer_path: str) -> dict:
    """Copies the tokenizer into the workdir (once) and returns the reference for `meta`: a
    SentencePiece model as tokenizer.model, a WordPiece vocabulary (`flaxbert convert`) as
    vocab.txt with a tokenizer_config.json stating its casing."""
    from flaxbert.tokenizer import WORDPIECE_VOCAB, is_wordpiece_vocab, write_wordpiece_config

    if not tokenizer_path:
        return {}
    wordpiece = is_wordpiece_vocab(tokenizer_path)
    name = WORDPIECE_VOCAB if wordpiece else TOKENIZER_FILE
    target = os.path.join(workdir, name)
    if jax.process_index() == 0:
        if os.path.abspath(tokenizer_path) != os.path.abspath(target):
            shutil.copyfile(tokenizer_path, target + ".tmp")
            os.replace(target + ".tmp", target)
        if wordpiece:
            write_wordpiece_config(tokenizer_path, workdir)
    return {"path": os.path.abspath(tokenizer_path), "copy": name}


def rng_to_json(key) -> list[int]:
    return [int(x) for x in np.asarray(jax.random.key_data(key)).ravel()]


def rng_from_json(data) -> jax.Array:
    return jax.random.wrap_key_data(np.asarray(data, dtype=np.uint32))
