"""What every step of `flaxbert convert` shares: the error it raises (`ConversionError`, a
ValueError whose message says what cannot be converted and why), the names of the files in
a HuggingFace BERT directory, and how a long list of weight names is shown in a message.
"""

from __future__ import annotations

from collections.abc import Sequence

HF_CONFIG = "config.json"
SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
MSGPACK = "flax_model.msgpack"
SENTENCEPIECE_FILE = "tokenizer.model"
ORIGINAL_IDS = "flaxbert_original_ids"  # tokenizer_config.json: special piece -> HF id
_MAX_LISTED = 25


class ConversionError(ValueError):
    """A directory or checkpoint that cannot be converted; the message says what and why."""


def _listed(names: Sequence[str]) -> str:
    shown = [f"  {n}" for n in names[:_MAX_LISTED]]
    if len(names) > _MAX_LISTED:
        shown.append(f"  ... and {len(names) - _MAX_LISTED} more")
    return "\n".join(shown)
