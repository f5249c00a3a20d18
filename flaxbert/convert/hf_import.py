"""`flaxbert convert --from-hf`: a HuggingFace BERT directory written as a flaxbert workdir
like `flaxbert pretrain` leaves it (`checkpoints/0/`, the vocabulary in flaxbert's order and
its casing), in named steps: read the config, tokenizer and weights, map them, then write the
vocabulary and the checkpoint, and log how to fine-tune it.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil

import numpy as np

from flaxbert.convert.common import HF_CONFIG, ORIGINAL_IDS, ConversionError
from flaxbert.convert.hf_config import bert_config_from_hf
from flaxbert.convert.hf_io import (
    _hf_tokenizer,
    _write_json,
    _write_lines,
    read_hf_config,
    read_hf_weights,
    user_path,
)
from flaxbert.convert.params import hf_to_params, vocabulary_order
from flaxbert.model_config import STRUCTURAL_KEYS
from flaxbert.tokenizer.special import SPECIAL_TOKENS
from flaxbert.tokenizer.wordpiece import (
    WORDPIECE_CONFIG,
    WORDPIECE_VOCAB,
    WordPieceCasing,
    wordpiece_casing,
)

log = logging.getLogger("flaxbert")

NO_OPTIMIZER_STATE = "no_optimizer_state"  # the opt_state item of a converted checkpoint


@dataclasses.dataclass
class ImportResult:
    workdir: str
    step_dir: str
    model: dict  # dataclasses.asdict(BertConfig)
    heads: list[str]
    weights_file: str
    original_ids: dict[str, int]
    casing: WordPieceCasing | None  # None for a SentencePiece tokenizer
    tokenizer: str = "wordpiece"  # 'wordpiece' (vocab.txt) or 'sentencepiece' (tokenizer.model)
    dropped: list[str] = dataclasses.field(default_factory=list)  # weights left out


def import_hf(
    hf_dir: str,
    workdir: str,
    lowercase: bool | None = None,
    drop_unknown: bool = False,
) -> ImportResult:
    """Writes the HuggingFace BERT in `hf_dir` as a flaxbert workdir `workdir` (see the
    module doc); both paths may be relative or start with `~`. The vocabulary is a WordPiece
    vocab.txt or, for a directory `export_hf` wrote from a SentencePiece checkpoint, its
    tokenizer.model. `lowercase` None follows `flaxbert.tokenizer.wordpiece_casing` (WordPiece
    only). `drop_unknown` leaves out the weights of heads flaxbert does not import (see
    `map_hf_names`). Raises ConversionError saying what cannot be imported and why."""
    from flaxbert import checkpoint as ckpt

    hf_dir, workdir = user_path(hf_dir), user_path(workdir)
    if not os.path.isdir(hf_dir):
        raise ConversionError(f"--from-hf {hf_dir}: no such directory")
    hf_config = read_hf_config(hf_dir)
    config = bert_config_from_hf(hf_config, os.path.join(hf_dir, HF_CONFIG))
    kind, tokenizer_path, pieces, original = _hf_tokenizer(hf_dir, config.vocab_size)
    order = vocabulary_order(original, config.vocab_size)
    casing = _casing(kind, lowercase, hf_dir, hf_config)

    weights, source = read_hf_weights(hf_dir)
    params, mapped = hf_to_params(weights, config, order, source, drop_unknown)

    directory = os.path.join(workdir, ckpt.SUBDIR)
    if os.path.isdir(directory) and os.listdir(directory):
        raise ConversionError(
            f"--workdir {workdir} already holds checkpoints ({directory}); give a new directory"
        )
    os.makedirs(workdir, exist_ok=True)
    original_ids = dict(zip(SPECIAL_TOKENS, original, strict=True))
    if kind == "wordpiece":
        out_tokenizer = _write_wordpiece(workdir, [pieces[i] for i in order], casing, original_ids)
    else:
        out_tokenizer = os.path.join(workdir, ckpt.TOKENIZER_FILE)
        shutil.copyfile(tokenizer_path, out_tokenizer + ".tmp")
        os.replace(out_tokenizer + ".tmp", out_tokenizer)
    model = dataclasses.asdict(config)
    converted_from = {
        "directory": hf_dir,
        "weights": os.path.basename(source),
        "heads": mapped.heads,
        "dropped": mapped.dropped,
        "huggingface_config": hf_config,
    }
    _save_step_0(directory, params, model, out_tokenizer, converted_from)
    result = ImportResult(
        workdir=workdir,
        step_dir=os.path.join(directory, "0"),
        model=model,
        heads=mapped.heads,
        weights_file=source,
        original_ids=original_ids,
        casing=casing,
        tokenizer=kind,
        dropped=mapped.dropped,
    )
    _log_imported(hf_dir, result)
    return result


def _casing(
    kind: str, lowercase: bool | None, hf_dir: str, hf_config: dict
) -> WordPieceCasing | None:
    """The WordPiece casing: `--lowercase` when given, else what the directory says (see
    `wordpiece_casing`); None for SentencePiece, with a warning when `--lowercase` was given."""
    if kind == "wordpiece" and lowercase is None:
        return wordpiece_casing(hf_dir, hf_config)
    if kind == "wordpiece":
        return WordPieceCasing(lowercase, source=f"--lowercase {str(lowercase).lower()}")
    if lowercase is not None:
        log.warning("convert: --lowercase applies to WordPiece only; %s is SentencePiece", kind)
    return None


def _write_wordpiece(
    workdir: str, pieces: list[str], casing: WordPieceCasing, original_ids: dict[str, int]
) -> str:
    """Writes WORKDIR/vocab.txt (the pieces in flaxbert's order) and tokenizer_config.json
    beside it (the casing and the special pieces' original ids); returns the vocab.txt path."""
    out_tokenizer = os.path.join(workdir, WORDPIECE_VOCAB)
    _write_lines(out_tokenizer, pieces)
    _write_json(
        os.path.join(workdir, WORDPIECE_CONFIG),
        {
            "tokenizer_class": "BertTokenizer",
            **casing.to_json(),
            "casing_source": casing.source,
            ORIGINAL_IDS: original_ids,
        },
    )
    return out_tokenizer


def _save_step_0(
    directory: str, params: dict, model: dict, out_tokenizer: str, converted_from: dict
) -> None:
    """Saves `params` as step 0 of the checkpoints in `directory`, with the meta of a
    pre-training checkpoint plus `converted_from`, and no optimizer state."""
    import jax

    from flaxbert import checkpoint as ckpt

    meta = {
        "format": ckpt.FORMAT_VERSION,
        "step": 0,
        "rng": ckpt.rng_to_json(jax.random.key(0)),
        "data": {"position": 0},
        "config": {"model": model},
        "tokenizer": {"path": out_tokenizer, "copy": os.path.basename(out_tokenizer)},
        "model": model,
        "converted_from": converted_from,
    }
    checkpoints = ckpt.Checkpoints(directory, keep=1, async_save=False)
    try:
        checkpoints.save(
            0,
            jax.device_put(params),
            {NO_OPTIMIZER_STATE: np.zeros((), np.int8)},  # orbax stores no empty item
            meta,
        )
        checkpoints.wait()
    finally:
        checkpoints.close()


def _log_imported(hf_dir: str, result: ImportResult) -> None:
    """Logs what was imported from where, how the vocabulary moved, and how to fine-tune."""
    original_ids, casing, model = result.original_ids, result.casing, result.model
    moved = ", ".join(f"{p} {i}->{j}" for j, (p, i) in enumerate(original_ids.items()) if i != j)
    log.info(
        "convert: %s (%s) -> %s\n  vocabulary: %s; lowercase=%s (%s)\n  fine-tune: flaxbert "
        "finetune --config configs/finetune.py:TASK,VARIANT --config.init_from=%s with the "
        "model keys %s",
        hf_dir,
        ", ".join([os.path.basename(result.weights_file), "encoder", *result.heads]),
        result.step_dir,
        f"special tokens moved to flaxbert's ids ({moved})" if moved else "kept as it was",
        casing.lowercase if casing else "n/a",
        casing.source if casing else f"{result.tokenizer} tokenizer",
        result.workdir,
        " ".join(f"{k}={model[k]}" for k in STRUCTURAL_KEYS),
    )
