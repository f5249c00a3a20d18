"""Continued pre-training from a checkpoint (`flaxbert pretrain --config.init_from=W`):
domain-adaptive pre-training (Gururangan et al., 2020, "Don't Stop Pretraining"), the most
common use of a public checkpoint. The run takes from W the model's structure, the tokenizer
and every parameter group the pre-training model has (the encoder `bert` and the MLM / NSP
heads; a group W lacks starts fresh, and the log says so); the optimizer, the step count (0)
and the data position start fresh. W is only read: nothing is written into it.
"""

from __future__ import annotations

import logging
from collections.abc import Collection

import ml_collections

from flaxbert import checkpoint as ckpt
from flaxbert.config import ConfigError
from flaxbert.finetune_setup import compact_names, file_sha256
from flaxbert.model_config import structure_from_checkpoint, user_set_keys

log = logging.getLogger("flaxbert")


def continued_config(
    config: ml_collections.ConfigDict, explicit: Collection[str] = (), own_checkpoints: str = ""
) -> ml_collections.ConfigDict:
    """A copy of the pre-training `config` for a run from `config.init_from` (W): `model.*`
    structure from W unless the user set a key (`explicit`: keys named on the command line;
    see `flaxbert.model_config.user_set_keys`), `data.tokenizer` = W's tokenizer, and
    `model.vocab_size` = W's unless named on the command line. When `own_checkpoints` (the
    run's checkpoint directory) already holds a checkpoint, the run is resuming: structure and
    tokenizer come from there (the workdir keeps a copy of the tokenizer), so a resumed run
    does not need W any more.

    Raises ConfigError (CheckpointNotFoundError) when W is not a checkpoint, when a key the
    user set disagrees with W, when `data.tokenizer` is another tokenizer than W's, and when W
    and `data.corpus` do not share token ids (W from the embedded corpus continued on text, or
    the other way round)."""
    w = config.init_from
    source = w
    if own_checkpoints:
        try:
            ckpt.read_meta(own_checkpoints)
            source = own_checkpoints
        except ckpt.CheckpointNotFoundError:
            pass
    step_dir, meta = ckpt.read_meta(source)
    saved = meta.get("model") or meta.get("config", {}).get("model", {})
    values = config.model.to_dict()
    user_set = user_set_keys(values, config.get("variant", ""), explicit)
    try:
        values, taken = structure_from_checkpoint(values, saved, user_set, step_dir)
    except ValueError as e:
        raise ConfigError(f"config key init_from={w!r}: {e}") from None
    if "model.vocab_size" not in explicit and saved.get("vocab_size"):
        values["vocab_size"] = saved["vocab_size"]
    tokenizer = ckpt.tokenizer_of(source)
    d = config.data
    if not tokenizer and d.corpus:
        raise ConfigError(
            f"config key init_from={w!r}: that checkpoint was pre-trained on the embedded "
            "synthetic corpus and has no tokenizer, so it cannot read data.corpus="
            f"{d.corpus!r}; continue it on the embedded corpus (data.corpus='') or start from "
            "a checkpoint trained on text"
        )
    if tokenizer and not d.corpus:
        raise ConfigError(
            f"config key init_from={w!r}: that checkpoint reads text with {tokenizer}, and "
            "the embedded synthetic corpus (data.corpus='') has other token ids; set "
            "data.corpus to a text corpus"
        )
    if tokenizer and d.tokenizer and file_sha256(d.tokenizer) != file_sha256(tokenizer):
        raise ConfigError(
            f"config key data.tokenizer={d.tokenizer!r} differs from the tokenizer of "
            f"init_from={w!r} ({tokenizer}); leave data.tokenizer empty to use the checkpoint's"
        )
    out = config.copy_and_resolve_references()
    for key, value in values.items():
        out.model[key] = value
    out.data.tokenizer = tokenizer
    log.info(
        "continuing pre-training from %s: model structure %s, tokenizer %s",
        step_dir,
        ", ".join(taken) if taken else "as the config's",
        tokenizer or "none (embedded corpus)",
    )
    return out


def check_corpus_tokenizer(tokenizer: str, corpus_tokenizer: str) -> None:
    """A prepared corpus (`flaxbert prepare`) carries its own tokenizer: it must be the
    checkpoint's (`tokenizer`, as `continued_config` resolved it). Raises ConfigError
    otherwise."""
    if tokenizer and corpus_tokenizer and file_sha256(corpus_tokenizer) != file_sha256(tokenizer):
        raise ConfigError(
            f"config key data.corpus: it was prepared with the tokenizer {corpus_tokenizer}, "
            f"not init_from's ({tokenizer}); prepare the corpus again with --tokenizer "
            f"{tokenizer}, or give the raw text as data.corpus"
        )


def restore_pretraining_params(state, target_params: dict, parallel, init_from: str):
    """Puts every parameter group of the checkpoint `init_from` that the pre-training model has
    (`bert` and its sub-groups, the MLM and NSP heads) into the fresh `state`; groups the
    checkpoint lacks keep their fresh values. `target_params`: the restore target (the
    strategy's `checkpoint_abstract` of the params). Logs what came from where; returns the
    new state. Raises CheckpointMismatchError when a shape does not fit."""
    step_dir, _ = ckpt.read_meta(init_from)
    saved = ckpt.saved_param_groups(step_dir)
    wanted = {}
    for name, tree in target_params.items():
        if name not in saved:
            continue
        if isinstance(tree, dict):
            sub = {k: v for k, v in tree.items() if k in saved[name]}
            if sub:
                wanted[name] = sub
        else:  # a parameter at the top level, e.g. the MLM output bias
            wanted[name] = tree
    placed = parallel.from_checkpoint(ckpt.restore_params(init_from, wanted, step_dir=step_dir))
    params = dict(state.params)
    restored, fresh = [], []
    for name, tree in params.items():
        got = placed.get(name)
        if isinstance(tree, dict):
            got = got or {}
            params[name] = {**tree, **got}
            restored += [f"{name}/{k}" for k in sorted(got)]
            fresh += [f"{name}/{k}" for k in sorted(tree) if k not in got]
        elif got is not None:
            params[name] = got
            restored.append(name)
        else:
            fresh.append(name)
    log.info(
        "restored from %s: %s; freshly initialised: %s; the optimizer starts fresh at step 0",
        step_dir,
        ", ".join(compact_names(restored)),
        ", ".join(fresh) or "nothing",
    )
    return state.replace(params=params)
