"""Reading and writing the files of a HuggingFace BERT directory: config.json, the weights
(`model.safetensors`, a sharded index, or `flax_model.msgpack`; `pytorch_model.bin` and
`tf_model.h5` are named with how to turn them into safetensors), the vocabulary (a WordPiece
vocab.txt or the SentencePiece tokenizer.model of a flaxbert export), and text and JSON files
written whole or not at all; paths as users type them.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

import numpy as np

from flaxbert.convert.common import (
    HF_CONFIG,
    MSGPACK,
    SAFETENSORS,
    SAFETENSORS_INDEX,
    SENTENCEPIECE_FILE,
    ConversionError,
)
from flaxbert.convert.names import _flatten, _flax_layout_to_torch, _torch_names
from flaxbert.convert.params import special_ids
from flaxbert.tokenizer.special import SPECIAL_TOKENS
from flaxbert.tokenizer.wordpiece import WORDPIECE_VOCAB, read_vocab


def user_path(path: str | os.PathLike) -> str:
    """A path as a user gives it (relative, with `~`, with a trailing slash) made absolute,
    as orbax and the messages need it."""
    return os.path.abspath(os.path.expanduser(os.fspath(path)))


def read_hf_config(directory: str) -> dict:
    path = os.path.join(directory, HF_CONFIG)
    if not os.path.isfile(path):
        raise ConversionError(
            f"{directory}: no {HF_CONFIG}; a HuggingFace BERT directory holds {HF_CONFIG}, "
            f"{SAFETENSORS} (or {MSGPACK}) and {WORDPIECE_VOCAB}"
        )
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise ConversionError(f"{path}: not a readable JSON file ({e})") from None


def read_hf_weights(directory: str) -> tuple[dict[str, np.ndarray], str]:
    """(name -> array in PyTorch names and layouts, the file read). Safetensors first."""
    single = os.path.join(directory, SAFETENSORS)
    index = os.path.join(directory, SAFETENSORS_INDEX)
    msgpack = os.path.join(directory, MSGPACK)
    if os.path.isfile(single):
        return _torch_names(_load_safetensors([single])), single
    if os.path.isfile(index):
        try:
            with open(index, encoding="utf-8") as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
        except (OSError, ValueError, KeyError) as e:
            raise ConversionError(f"{index}: not a safetensors index ({e})") from None
        paths = [os.path.join(directory, s) for s in shards]
        missing = [p for p in paths if not os.path.isfile(p)]
        if missing:
            raise ConversionError(f"{index} names shards that are missing: {', '.join(missing)}")
        return _torch_names(_load_safetensors(paths)), index
    if os.path.isfile(msgpack):
        from flax.serialization import msgpack_restore

        try:
            with open(msgpack, "rb") as f:
                tree = msgpack_restore(f.read())
        except Exception as e:  # noqa: BLE001 -- msgpack raises many kinds
            raise ConversionError(f"{msgpack}: not a Flax msgpack file ({e})") from None
        return _flax_layout_to_torch(_flatten(tree)), msgpack
    other = [
        n
        for n in ("pytorch_model.bin", "tf_model.h5")
        if os.path.exists(os.path.join(directory, n))
    ]
    hint = (
        f" It has {', '.join(other)}, which needs PyTorch or TensorFlow to read: save the model "
        f"as safetensors first (in PyTorch: `BertForPreTraining.from_pretrained(DIR)"
        f".save_pretrained(DIR, safe_serialization=True)`)."
        if other
        else ""
    )
    raise ConversionError(
        f"{directory}: no weights: expected {SAFETENSORS} (or a sharded {SAFETENSORS_INDEX}) "
        f"or {MSGPACK}.{hint}"
    )


def _load_safetensors(paths: Sequence[str]) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    out = {}
    for path in paths:
        try:
            out.update(load_file(path))
        except KeyError as e:  # safetensors.numpy knows no bfloat16
            raise ConversionError(
                f"{path}: tensors of dtype {e} cannot be read into numpy; save the model in "
                "float32 (or float16) first"
            ) from None
        except Exception as e:  # noqa: BLE001 -- a truncated or foreign file
            raise ConversionError(f"{path}: not a readable safetensors file ({e})") from None
    return out


def _hf_tokenizer(hf_dir: str, vocab_size: int):
    """(kind, path, pieces or None, original special ids) of the tokenizer in `hf_dir`: a
    WordPiece vocab.txt, else the SentencePiece tokenizer.model that `convert --to-hf` writes
    for a SentencePiece checkpoint (its special pieces already at flaxbert's ids 0-4)."""
    vocab_path = os.path.join(hf_dir, WORDPIECE_VOCAB)
    sp_path = os.path.join(hf_dir, SENTENCEPIECE_FILE)
    if os.path.isfile(vocab_path):
        pieces = read_vocab(vocab_path)
        if len(pieces) != vocab_size:
            raise ConversionError(
                f"{vocab_path} has {len(pieces)} lines but {HF_CONFIG} says "
                f"vocab_size={vocab_size}; they must agree"
            )
        return "wordpiece", vocab_path, pieces, special_ids(pieces, vocab_path)
    if os.path.isfile(sp_path):
        from flaxbert.tokenizer import Tokenizer

        try:
            tokenizer = Tokenizer.load(sp_path)
        except ValueError as e:
            raise ConversionError(str(e)) from None
        if tokenizer.vocab_size != vocab_size:
            raise ConversionError(
                f"{sp_path} has {tokenizer.vocab_size} pieces but {HF_CONFIG} says "
                f"vocab_size={vocab_size}; they must agree"
            )
        return "sentencepiece", sp_path, None, list(range(len(SPECIAL_TOKENS)))
    raise ConversionError(
        f"{hf_dir}: no {WORDPIECE_VOCAB} (nor the {SENTENCEPIECE_FILE} a flaxbert export of "
        "a SentencePiece checkpoint holds): flaxbert imports BERT with its vocabulary, needed "
        "to fine-tune on text"
    )


def _write_lines(path: str, lines: Sequence[str]) -> None:
    with open(path + ".tmp", "w", encoding="utf-8", newline="\n") as f:
        f.writelines(line + "\n" for line in lines)
    os.replace(path + ".tmp", path)


def _write_json(path: str, value) -> None:
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(value, f, indent=2, ensure_ascii=False)
        f.write("\n")
    os.replace(path + ".tmp", path)
