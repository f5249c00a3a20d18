"""What a fine-tuning run sets up before it trains: the tokenizer (the checkpoint's), the model
config (checked against the checkpoint's structure), the features of each split and the
step plan (`task_data`), and the restore of a pre-trained encoder into a fresh task model
(`restore_encoder`). `flaxbert.finetune` runs them, then the shared loop.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import os
import time
from collections.abc import Collection

import ml_collections

from flaxbert import checkpoint as ckpt
from flaxbert.config import ConfigError, require
from flaxbert.data.task_files import read_examples
from flaxbert.data.task_spec import ReaderSpec
from flaxbert.data.task_tfds import read_tfds
from flaxbert.finetune_tasks import Features, PackedEpochs, make_kind
from flaxbert.loop import validate_loop_config
from flaxbert.model_config import BertConfig, structure_from_checkpoint, user_set_keys
from flaxbert.tokenizer import load_tokenizer

log = logging.getLogger("flaxbert")


@dataclasses.dataclass
class TaskData:
    """A run's task, tokenizer, model config, features of each split and step plan."""

    kind: object  # a flaxbert.finetune_tasks kind
    labels: list[str]
    tokenizer_path: str
    model_config: BertConfig
    train: Features
    eval: Features
    test: Features | None
    packed_epochs: PackedEpochs | None  # data.packing
    steps_per_epoch: int
    num_steps: int
    eval_every: int


def task_data(config: ml_collections.ConfigDict, explicit: Collection[str] = ()) -> TaskData:
    """Reads and tokenizes the splits and plans the steps; raises ConfigError naming the key
    of anything that does not fit (files, sizes, packing, batch size). `explicit`: the config
    keys named on the command line (see `model_config_for`)."""
    d, t = config.data, config.train
    spec = ReaderSpec.from_config(d.reader)
    labels = [x for x in d.label_list.split(",") if x] if d.label_list else []
    kind = make_kind(config.kind, labels, config.metrics)
    tokenizer_path = resolve_tokenizer(config)
    tokenizer = load_tokenizer(tokenizer_path)
    model_config = model_config_for(config, tokenizer.vocab_size, explicit)
    require(
        d.max_seq_length <= model_config.max_position_embeddings,
        "data.max_seq_length",
        d.max_seq_length,
        f"exceeds model.max_position_embeddings={model_config.max_position_embeddings}",
    )
    validate_finetune_train_config(config)
    start = time.perf_counter()
    features = {}
    for what in ("train", "eval", "test"):
        examples = read_split(
            spec, d[f"{what}_file"], d.train_limit if what == "train" else d.eval_limit, what
        )
        features[what] = kind.features(examples, tokenizer, d) if examples else None
        if features[what] is not None and features[what].truncated:
            log.warning(
                "%s: %d examples longer than data.max_seq_length=%d were truncated",
                what,
                features[what].truncated,
                d.max_seq_length,
            )
    train_f, eval_f = features["train"], features["eval"]
    log.info(
        "features: %d train rows, %d eval rows (%.1fs)",
        len(train_f),
        len(eval_f),
        time.perf_counter() - start,
    )
    require(
        len(train_f) >= t.batch_size,
        "train.batch_size",
        t.batch_size,
        f"is larger than the training set ({len(train_f)} rows)",
    )
    packed, steps_per_epoch, num_steps = _step_plan(config, train_f)
    return TaskData(
        kind=kind,
        labels=labels,
        tokenizer_path=tokenizer_path,
        model_config=model_config,
        train=train_f,
        eval=eval_f,
        test=features["test"],
        packed_epochs=packed,
        steps_per_epoch=steps_per_epoch,
        num_steps=num_steps,
        eval_every=config.eval.every_steps or steps_per_epoch,
    )


def _step_plan(config, train_f: Features):
    """(packed epochs or None, steps per epoch, steps of the run)."""
    d, t = config.data, config.train
    n_train = len(train_f)
    if not d.packing:
        steps_per_epoch = n_train // t.batch_size
        return None, steps_per_epoch, t.num_steps or int(math.ceil(t.num_epochs * steps_per_epoch))
    require(
        config.kind in ("classification", "regression"),
        "data.packing",
        d.packing,
        f"is for [CLS] tasks (classification, regression), not {config.kind}",
    )
    require(d.max_pairs_per_row >= 1, "data.max_pairs_per_row", d.max_pairs_per_row, ">= 1")
    packed = PackedEpochs(
        train_f.arrays, t.batch_size, d.max_seq_length, d.max_pairs_per_row, t.seed
    )
    steps_per_epoch = len(packed.plan(0))
    log.info(
        "packing: %d examples in %d batches of %d rows (%.2f examples a row)",
        n_train,
        steps_per_epoch,
        t.batch_size,
        n_train / (steps_per_epoch * t.batch_size),
    )
    return packed, steps_per_epoch, t.num_steps or packed.steps_for(t.num_epochs)


def file_sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def resolve_tokenizer(config: ml_collections.ConfigDict) -> str:
    """The checkpoint's tokenizer when fine-tuning from one; else `data.tokenizer`."""
    own = config.data.tokenizer
    if config.init_from:
        path = ckpt.tokenizer_of(config.init_from)
        if not path:
            raise ConfigError(
                f"config key init_from={config.init_from!r}: that checkpoint was pre-trained on "
                "the embedded synthetic corpus and has no tokenizer, so it cannot read text"
            )
        if own and file_sha256(own) != file_sha256(path):
            raise ConfigError(
                f"config key data.tokenizer={own!r} differs from the tokenizer the checkpoint was "
                f"trained with ({path}); leave data.tokenizer empty to use the checkpoint's"
            )
        return path
    require(
        bool(own),
        "data.tokenizer",
        own,
        "is needed without init_from: a SentencePiece model (flaxbert train-tokenizer) or "
        "the vocab.txt of a converted checkpoint (flaxbert convert), or set "
        "init_from=PRETRAINING_WORKDIR to use its encoder and tokenizer",
    )
    require(os.path.isfile(own), "data.tokenizer", own, "no such file")
    return own


def model_config_for(
    config: ml_collections.ConfigDict, vocab_size: int, explicit: Collection[str] = ()
) -> BertConfig:
    """The run's `BertConfig`. From a checkpoint (`init_from`) its structure (sizes, layers,
    heads, positions, layer layout, LayerNorm placement) is the checkpoint's, whatever size the
    config names, unless the user set a key (`explicit`: keys named on the command line, or a
    value other than the config's `variant` gives), which must then agree. Without one it is
    the config's. `model.vocab_size` 0 follows the tokenizer (`vocab_size` pieces).
    Raises ConfigError naming every key that does not fit."""
    values = config.model.to_dict()
    if not values.get("vocab_size"):
        values["vocab_size"] = vocab_size
    require(
        values["vocab_size"] == vocab_size,
        "model.vocab_size",
        values["vocab_size"],
        f"does not match the tokenizer ({vocab_size} pieces); set it to 0 to follow the tokenizer",
    )
    if config.init_from:
        step_dir, meta = ckpt.read_meta(config.init_from)
        saved = meta.get("model") or meta.get("config", {}).get("model", {})
        user_set = user_set_keys(values, config.get("variant", ""), explicit)
        try:
            values, taken = structure_from_checkpoint(values, saved, user_set, step_dir)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        if taken:
            log.info("model structure from the checkpoint %s: %s", step_dir, ", ".join(taken))
    try:
        return BertConfig.from_dict(values)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def read_split(spec, path: str, limit: int, what: str):
    if not path:
        return None
    if path.startswith("tfds:"):
        result = read_tfds(path, spec, limit=limit or None)
    else:
        if not os.path.exists(path):
            raise ConfigError(f"config key data.{what}_file={path!r}: no such file")
        result = read_examples(spec, path, limit=limit or None)
    if result.skipped:
        shown = "; ".join(f"row {r}: {why}" for r, why in result.skipped[:5])
        log.warning("%s: skipped %d bad rows (%s ...)", path, len(result.skipped), shown)
    if not result.examples:
        raise ConfigError(f"config key data.{what}_file={path!r}: no examples in it")
    log.info("%s split: %d examples from %s", what, len(result.examples), path)
    return result.examples


def validate_finetune_train_config(config: ml_collections.ConfigDict) -> None:
    """The train.* and checkpoint.* keys the loop reads, checked before any work starts."""
    validate_loop_config(config.train)
    mode = config.checkpoint.best_mode
    require(
        mode in ("", "max", "min"),
        "checkpoint.best_mode",
        mode,
        "choose max, min, or '' (from main_metric: min for a loss or error, else max)",
    )


def restore_encoder(state, target_params, parallel, init_from: str, init_pooler: bool):
    """Puts the checkpoint's encoder (`bert`: embeddings and layers, the pooler if asked and
    present in both) into a freshly initialised state; logs what came from where."""
    encoder = dict(target_params["bert"])
    if not init_pooler:
        encoder.pop("pooler", None)
    step_dir, _ = ckpt.read_meta(init_from)
    saved = ckpt.saved_param_groups(step_dir)
    if "pooler" in encoder and "pooler" not in saved.get("bert", []):
        encoder.pop("pooler")
    restored = ckpt.restore_params(init_from, {"bert": encoder}, step_dir=step_dir)
    placed = parallel.from_checkpoint(restored)["bert"]
    params = dict(state.params)
    params["bert"] = {**params["bert"], **placed}
    restored_names = [f"bert/{k}" for k in sorted(placed)]
    new = sorted(
        [k for k in params if k != "bert"]
        + [f"bert/{k}" for k in params["bert"] if k not in placed]
    )
    dropped = sorted(
        [k for k in saved if k != "bert"]
        + [f"bert/{k}" for k in saved.get("bert", []) if k not in placed]
    )
    log.info(
        "restored from %s: %s; freshly initialised: %s; not used from the checkpoint: %s",
        step_dir,
        ", ".join(compact_names(restored_names)),
        ", ".join(new) or "nothing",
        ", ".join(dropped) or "nothing",
    )
    return state.replace(params=params), restored_names


def compact_names(names: list[str]) -> list[str]:
    """bert/layer_0 ... bert/layer_11 -> bert/layer_0..11."""
    layers = sorted(int(n.rsplit("_", 1)[1]) for n in names if n.startswith("bert/layer_"))
    rest = [n for n in names if not n.startswith("bert/layer_")]
    if layers:
        rest.append(f"bert/layer_{layers[0]}..{layers[-1]}")
    return rest


def load_params(parallel, target_params, step_dir: str):
    restored = ckpt.restore_params(step_dir, dict(target_params), step_dir=step_dir)
    return parallel.from_checkpoint(restored)
