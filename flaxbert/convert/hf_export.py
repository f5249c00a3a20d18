"""`flaxbert convert --to-hf`: a flaxbert checkpoint (pre-training, converted or fine-tuned;
layers scanned or not) written as a HuggingFace BERT directory: the encoder and the MLM/NSP
heads it has as `model.safetensors` in PyTorch names and layouts, config.json, and the
tokenizer, a WordPiece vocabulary back in its original order or the SentencePiece model.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil

import numpy as np

from flaxbert.convert.common import (
    HF_CONFIG,
    ORIGINAL_IDS,
    SAFETENSORS,
    SENTENCEPIECE_FILE,
    ConversionError,
)
from flaxbert.convert.hf_config import hf_config_from_bert
from flaxbert.convert.hf_io import _write_json, _write_lines, user_path
from flaxbert.convert.names import _MLM_GROUPS
from flaxbert.convert.params import params_to_hf, vocabulary_order
from flaxbert.tokenizer.special import SPECIAL_TOKENS
from flaxbert.tokenizer.wordpiece import WORDPIECE_CONFIG, WORDPIECE_VOCAB, WordPieceTokenizer

log = logging.getLogger("flaxbert")


def read_params(path: str | os.PathLike) -> dict:
    """Every parameter of a checkpoint, as numpy arrays on the host (any saved sharding).

    `path` names the checkpoint as everywhere in flaxbert: a workdir (its latest complete
    step), its checkpoints/ directory, or one step directory checkpoints/STEP; relative, with
    `~` or a trailing slash. Raises `flaxbert.checkpoint.CheckpointNotFoundError` when there
    is no checkpoint there."""
    from flaxbert import checkpoint as ckpt

    step_dir, _ = ckpt.read_meta(user_path(path))
    return ckpt.host_params(step_dir)


@dataclasses.dataclass
class ExportResult:
    out_dir: str
    architecture: str
    heads: list[str]
    tokenizer: str  # 'wordpiece', 'sentencepiece' or ''
    not_exported: list[str]


def export_hf(checkpoint: str, out_dir: str) -> ExportResult:
    """Writes the checkpoint `checkpoint` names (a workdir, its checkpoints/ or a step
    directory; pre-training, converted or fine-tuned) as a HuggingFace BERT directory."""
    from safetensors.numpy import save_file

    from flaxbert import checkpoint as ckpt
    from flaxbert.tokenizer import load_tokenizer

    checkpoint = user_path(checkpoint)
    step_dir, meta = ckpt.read_meta(checkpoint)
    try:
        config = ckpt.model_config_of(meta)
    except (KeyError, TypeError, ValueError) as e:
        raise ConversionError(f"{step_dir}: no usable model config in its meta ({e})") from None
    if config.pre_layer_norm:
        raise ConversionError(
            f"{step_dir}: the model has pre-LayerNorm blocks (model.pre_layer_norm=True), which "
            "transformers' BertModel cannot represent; export works for post-LayerNorm models"
        )
    out_dir = user_path(out_dir)
    if os.path.isdir(out_dir) and os.listdir(out_dir):
        raise ConversionError(f"--out {out_dir} is not empty; give a new or empty directory")
    params = read_params(step_dir)
    if "bert" not in params:
        raise ConversionError(f"{step_dir}: no encoder (parameter group 'bert') to export")

    tokenizer_path = ckpt.tokenizer_of(checkpoint)
    tokenizer = load_tokenizer(tokenizer_path) if tokenizer_path else None
    if tokenizer is not None and tokenizer.vocab_size != config.vocab_size:
        raise ConversionError(
            f"{step_dir}: the model's vocabulary has {config.vocab_size} rows but its "
            f"tokenizer {tokenizer_path} has {tokenizer.vocab_size} pieces"
        )
    order = np.arange(config.vocab_size)
    original = _original_ids(tokenizer_path) if tokenizer_path else None
    if isinstance(tokenizer, WordPieceTokenizer) and original is not None:
        order = vocabulary_order([original[p] for p in SPECIAL_TOKENS], config.vocab_size)
    weights, architecture, heads = params_to_hf(params, config, np.argsort(order))

    os.makedirs(out_dir, exist_ok=True)
    save_file(weights, os.path.join(out_dir, SAFETENSORS), metadata={"format": "pt"})
    base = (meta.get("converted_from") or {}).get("huggingface_config")
    config_json = hf_config_from_bert(config, architecture, int(order[0]), base)
    _write_json(os.path.join(out_dir, HF_CONFIG), config_json)
    kind = _write_tokenizer(tokenizer, tokenizer_path, order, config, out_dir)
    not_exported = sorted(set(params) - {"bert", "nsp", *_MLM_GROUPS})
    log.info(
        "convert: %s -> %s (%s: encoder, %s)%s",
        step_dir,
        out_dir,
        architecture,
        ", ".join(heads) or "no heads",
        f"; not exported: {', '.join(not_exported)}" if not_exported else "",
    )
    return ExportResult(out_dir, architecture, heads, kind, not_exported)


def _write_tokenizer(tokenizer, path: str, order: np.ndarray, config, out_dir: str) -> str:
    if isinstance(tokenizer, WordPieceTokenizer):
        hf_pieces = [""] * len(order)
        for i, piece in enumerate(tokenizer.pieces):
            hf_pieces[order[i]] = piece
        _write_lines(os.path.join(out_dir, WORDPIECE_VOCAB), hf_pieces)
        tokenizer_config = {
            "tokenizer_class": "BertTokenizer",
            **tokenizer.casing.to_json(),
            "model_max_length": config.max_position_embeddings,
        }
        _write_json(os.path.join(out_dir, WORDPIECE_CONFIG), tokenizer_config)
        return "wordpiece"
    if tokenizer is not None:
        target = os.path.join(out_dir, SENTENCEPIECE_FILE)
        shutil.copyfile(path, target)
        log.warning(
            "convert: the checkpoint's tokenizer is SentencePiece, copied to %s. HuggingFace's "
            "BertTokenizer reads only a WordPiece vocab.txt, so using this model there needs a "
            "matching tokenizer: load %s with sentencepiece (ids 0-4 are %s) or wrap it in a "
            "tokenizers/transformers tokenizer yourself",
            target,
            SENTENCEPIECE_FILE,
            " ".join(SPECIAL_TOKENS),
        )
        return "sentencepiece"
    log.warning("convert: no tokenizer (pre-trained on the embedded synthetic corpus) to write")
    return ""


def _original_ids(vocab_path: str) -> dict[str, int] | None:
    path = os.path.join(os.path.dirname(os.path.abspath(vocab_path)), WORDPIECE_CONFIG)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        original = json.load(f).get(ORIGINAL_IDS)
    if original is not None and sorted(original) != sorted(SPECIAL_TOKENS):
        raise ConversionError(f"{path}: {ORIGINAL_IDS} must name {' '.join(SPECIAL_TOKENS)}")
    return original
