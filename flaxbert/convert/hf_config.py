"""HuggingFace's config.json and flaxbert's `BertConfig`, each from the other: which
HuggingFace key each field is, transformers' defaults for keys a config.json leaves out, and
what flaxbert does not model (another activation, relative positions, a decoder), refused by
name.
"""

from __future__ import annotations

from collections.abc import Mapping

from flaxbert.convert.common import HF_CONFIG, ConversionError

_HF_DEFAULTS = {  # transformers' BertConfig defaults, for keys a config.json leaves out
    "max_position_embeddings": 512,
    "type_vocab_size": 2,
    "hidden_dropout_prob": 0.1,
    "attention_probs_dropout_prob": 0.1,
    "initializer_range": 0.02,
    "layer_norm_eps": 1e-12,
}
_FIELDS = {  # BertConfig field: HuggingFace key
    "vocab_size": "vocab_size",
    "hidden_size": "hidden_size",
    "num_layers": "num_hidden_layers",
    "num_heads": "num_attention_heads",
    "intermediate_size": "intermediate_size",
    "max_position_embeddings": "max_position_embeddings",
    "type_vocab_size": "type_vocab_size",
    "hidden_dropout_rate": "hidden_dropout_prob",
    "attention_dropout_rate": "attention_probs_dropout_prob",
    "initializer_range": "initializer_range",
    "layer_norm_eps": "layer_norm_eps",
}


def bert_config_from_hf(hf: Mapping, where: str = HF_CONFIG):
    """The flaxbert `BertConfig` of a HuggingFace BERT config; what flaxbert does not model
    (another activation, relative positions, a decoder) is refused, naming the key."""
    from flaxbert.model_config import BertConfig

    problems = []
    if hf.get("model_type", "bert") != "bert":
        problems.append(f"model_type={hf['model_type']!r}: flaxbert imports BERT (bert) only")
    if hf.get("hidden_act", "gelu") != "gelu":
        problems.append(
            f"hidden_act={hf['hidden_act']!r}: flaxbert's layers use the exact (erf) GELU, "
            "HuggingFace's 'gelu'"
        )
    if hf.get("position_embedding_type", "absolute") != "absolute":
        problems.append(
            f"position_embedding_type={hf['position_embedding_type']!r}: flaxbert has "
            "learned absolute positions only"
        )
    for key in ("is_decoder", "add_cross_attention"):
        if hf.get(key):
            problems.append(f"{key}=true: flaxbert's encoder is bidirectional, no decoder")
    required = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads")
    problems += [f"{k} is missing" for k in required + ("intermediate_size",) if k not in hf]
    if problems:
        raise ConversionError(f"{where}: cannot import: " + "; ".join(problems))
    values = {field: hf.get(key, _HF_DEFAULTS.get(key)) for field, key in _FIELDS.items()}
    try:
        return BertConfig(**values)
    except (TypeError, ValueError) as e:
        raise ConversionError(f"{where}: {e}") from None


def hf_config_from_bert(config, architecture: str, pad_token_id: int, base: Mapping | None):
    """A HuggingFace config.json for `config`; the keys of `base` (the config an imported
    model came with) are kept unless flaxbert's values replace them."""
    out = dict(base or {})
    out.update(
        architectures=[architecture],
        model_type="bert",
        hidden_act="gelu",
        position_embedding_type="absolute",
        pad_token_id=int(pad_token_id),
    )
    out.update({key: getattr(config, field) for field, key in _FIELDS.items()})
    out.setdefault("classifier_dropout", None)
    out.setdefault("use_cache", True)
    return dict(sorted(out.items()))
