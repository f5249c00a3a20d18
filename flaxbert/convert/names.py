"""Which HuggingFace BERT weight each flaxbert parameter is: the tables of rows (flaxbert
parameter path, transformers' PyTorch name, layout transform), the transforms between the
two layouts, Flax and TF-era names turned into PyTorch's, and which heads (pooler, MLM, NSP)
a set of weights holds (`map_hf_names`), refusing what flaxbert has no place for. No file is
read or written here.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping

import numpy as np

from flaxbert.convert.common import ConversionError, _listed

log = logging.getLogger("flaxbert")

# (flaxbert path, HuggingFace PyTorch name, layout). Layouts, HuggingFace -> flaxbert:
#   copy         the same array
#   vocab_rows   rows permuted into flaxbert's vocabulary order (`vocabulary_order`)
#   dense        (out, in) -> (in, out)
#   qkv_kernel   (N*H, D) -> (D, N, H)        qkv_bias   (N*H,) -> (N, H)
#   out_kernel   (D, N*H) -> (N, H, D)        (the attention output projection)
Row = tuple[tuple[str, ...], str, str]

_EMBEDDINGS = (  # under bert/embeddings and (prefix)embeddings.
    ("word_embeddings", "word_embeddings.weight", "vocab_rows"),
    ("position_embeddings", "position_embeddings.weight", "copy"),
    ("segment_embeddings", "token_type_embeddings.weight", "copy"),
    ("layer_norm/scale", "LayerNorm.weight", "copy"),
    ("layer_norm/bias", "LayerNorm.bias", "copy"),
)
_LAYER = (  # under bert/layer_I and (prefix)encoder.layer.I.
    *(
        row
        for n in ("query", "key", "value")
        for row in (
            (f"attention/{n}/kernel", f"attention.self.{n}.weight", "qkv_kernel"),
            (f"attention/{n}/bias", f"attention.self.{n}.bias", "qkv_bias"),
        )
    ),
    ("attention/output/kernel", "attention.output.dense.weight", "out_kernel"),
    ("attention/output/bias", "attention.output.dense.bias", "copy"),
    ("attention_layer_norm/scale", "attention.output.LayerNorm.weight", "copy"),
    ("attention_layer_norm/bias", "attention.output.LayerNorm.bias", "copy"),
    ("intermediate/kernel", "intermediate.dense.weight", "dense"),
    ("intermediate/bias", "intermediate.dense.bias", "copy"),
    ("output/kernel", "output.dense.weight", "dense"),
    ("output/bias", "output.dense.bias", "copy"),
    ("output_layer_norm/scale", "output.LayerNorm.weight", "copy"),
    ("output_layer_norm/bias", "output.LayerNorm.bias", "copy"),
)
_POOLER = (  # under bert/pooler and (prefix)pooler.
    ("kernel", "dense.weight", "dense"),
    ("bias", "dense.bias", "copy"),
)
_MLM = (  # top level, and cls.predictions.
    ("mlm_transform/kernel", "transform.dense.weight", "dense"),
    ("mlm_transform/bias", "transform.dense.bias", "copy"),
    ("mlm_layer_norm/scale", "transform.LayerNorm.weight", "copy"),
    ("mlm_layer_norm/bias", "transform.LayerNorm.bias", "copy"),
    ("mlm_output_bias", "bias", "vocab_rows"),
)
_NSP = (  # top level, and cls.seq_relationship.
    ("nsp/kernel", "weight", "dense"),
    ("nsp/bias", "bias", "copy"),
)


def _rows(table, path_prefix: str, name_prefix: str) -> list[Row]:
    return [
        (tuple((path_prefix + path).split("/")), name_prefix + name, layout)
        for path, name, layout in table
    ]


def _encoder_rows(num_layers: int, prefix: str) -> list[Row]:
    """The encoder's parameters (under `bert`) and their names (`prefix` is 'bert.' or '')."""
    rows = _rows(_EMBEDDINGS, "bert/embeddings/", prefix + "embeddings.")
    for i in range(num_layers):
        rows += _rows(_LAYER, f"bert/layer_{i}/", f"{prefix}encoder.layer.{i}.")
    return rows


def _pooler_rows(prefix: str) -> list[Row]:
    return _rows(_POOLER, "bert/pooler/", prefix + "pooler.")


MLM_ROWS = _rows(_MLM, "", "cls.predictions.")
NSP_ROWS = _rows(_NSP, "", "cls.seq_relationship.")
# HuggingFace ties these to the word embeddings and the MLM bias; flaxbert has no copies.
TIED_DECODER = ("cls.predictions.decoder.weight", "cls.predictions.decoder.bias")
# Buffers, not parameters.
BUFFERS = ("embeddings.position_ids", "embeddings.token_type_ids")


def _to_flaxbert(layout: str, w: np.ndarray, num_heads: int, order: np.ndarray) -> np.ndarray:
    if layout == "copy":
        return w
    if layout == "vocab_rows":
        return w[order]
    if layout == "dense":
        return w.T
    if layout == "qkv_kernel":
        return w.T.reshape(w.shape[1], num_heads, -1)
    if layout == "qkv_bias":
        return w.reshape(num_heads, -1)
    if layout == "out_kernel":
        return w.T.reshape(num_heads, -1, w.shape[0])
    raise AssertionError(layout)


def _to_hf(layout: str, x: np.ndarray, inverse: np.ndarray) -> np.ndarray:
    if layout == "copy":
        return x
    if layout == "vocab_rows":
        return x[inverse]
    if layout == "dense":
        return x.T
    if layout == "qkv_kernel":
        return x.reshape(x.shape[0], -1).T
    if layout == "qkv_bias":
        return x.reshape(-1)
    if layout == "out_kernel":
        return x.reshape(-1, x.shape[-1]).T
    raise AssertionError(layout)


def _hf_shape(layout: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The HuggingFace shape of a parameter of flaxbert shape `shape`."""
    if layout == "dense":
        return shape[::-1]
    if layout == "qkv_kernel":
        return (shape[1] * shape[2], shape[0])
    if layout == "qkv_bias":
        return (shape[0] * shape[1],)
    if layout == "out_kernel":
        return (shape[2], shape[0] * shape[1])
    return shape


def _flax_layout_to_torch(flat: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Flax names and layouts (as transformers' Flax models save them: `...query.kernel`
    (in, out), `...embedding`, LayerNorm `scale`) -> PyTorch names and layouts."""
    out = {}
    for name, a in flat.items():
        base, _, leaf = name.rpartition(".")
        if leaf == "kernel" and np.ndim(a) == 2:
            name, a = f"{base}.weight", np.asarray(a).T
        elif leaf in ("embedding", "scale"):
            name = f"{base}.weight"
        out[name] = a
    return out


def _flatten(tree: Mapping, prefix: str = "") -> dict[str, np.ndarray]:
    out = {}
    for k, v in tree.items():
        if isinstance(v, Mapping):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = np.asarray(v)
    return out


def _canonical(weights: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Old TF-converted checkpoints name LayerNorm's parameters gamma and beta."""
    out = {}
    for name, a in weights.items():
        base, _, leaf = name.rpartition(".")
        if base.endswith("LayerNorm") and leaf in ("gamma", "beta"):
            name = f"{base}.{'weight' if leaf == 'gamma' else 'bias'}"
        out[name] = a
    return out


def _torch_names(weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Safetensors written from a Flax model carry Flax names; turn them to PyTorch's."""
    if any(n.endswith((".kernel", ".embedding", ".scale")) for n in weights):
        return _flax_layout_to_torch(weights)
    return weights


@dataclasses.dataclass
class Mapped:
    rows: list[Row]  # the parameters present, and where each comes from
    heads: list[str]  # 'pooler', 'mlm', 'nsp' present
    dropped: list[str] = dataclasses.field(default_factory=list)  # left out (drop_unknown)


def _in_encoder(name: str, prefix: str) -> bool:
    """Whether a HuggingFace weight name lies inside the encoder (`bert.` or, for a bare
    BertModel, its embeddings/encoder/pooler) rather than in a head beside it."""
    if prefix:
        return name.startswith(prefix)
    return name.startswith(("embeddings.", "encoder.", "pooler."))


def map_hf_names(
    weights: Mapping[str, np.ndarray], num_layers: int, where: str, drop_unknown: bool = False
) -> Mapped:
    """Which flaxbert parameter each HuggingFace weight becomes. A missing encoder weight,
    a head present in part, or a name that is neither a parameter flaxbert has nor a known
    buffer or tied copy stops the import, listing them all; except that with `drop_unknown`
    the weights of heads flaxbert does not import (outside the encoder, e.g. the
    `classifier.*` of a BertForSequenceClassification) are left out, and listed in the log
    and in `Mapped.dropped`. Raises ConversionError."""
    prefix = "bert." if any(n.startswith("bert.") for n in weights) else ""
    rows = _encoder_rows(num_layers, prefix)
    missing = [name for _, name, _ in rows if name not in weights]
    heads = []
    for head, group in (
        ("pooler", _pooler_rows(prefix)),
        ("mlm", MLM_ROWS),
        ("nsp", NSP_ROWS),
    ):
        present = [name for _, name, _ in group if name in weights]
        if present:
            heads.append(head)
            rows += group
            missing += [name for _, name, _ in group if name not in weights]
    known = {name for _, name, _ in rows}
    known |= {prefix + b for b in BUFFERS}
    if "mlm" in heads:
        known |= set(TIED_DECODER)
    unknown = sorted(n for n in weights if n not in known)
    task_heads = [n for n in unknown if not _in_encoder(n, prefix)]
    if not missing and unknown and unknown == task_heads:
        if not drop_unknown:
            raise ConversionError(
                f"{where}: holds {len(unknown)} weight(s) of head(s) flaxbert does not import "
                "(a fine-tuned model, e.g. BertForSequenceClassification or "
                "BertForTokenClassification?):\n"
                f"{_listed(unknown)}\n"
                "flaxbert imports the encoder with the pooler, MLM and NSP heads. To import "
                "the encoder without these weights, run again with --drop-unknown "
                "(`flaxbert convert --from-hf DIR --workdir OUT --drop-unknown`; in Python "
                "import_hf(..., drop_unknown=True)); fine-tuning then adds a fresh head."
            )
        log.warning(
            "convert: --drop-unknown: left out %d weight(s) flaxbert does not import:\n%s",
            len(unknown),
            _listed(unknown),
        )
        return Mapped(rows, heads, dropped=unknown)
    if missing or unknown:
        parts = []
        if missing:
            parts.append(f"{len(missing)} weight(s) missing:\n{_listed(missing)}")
        if unknown:
            parts.append(f"{len(unknown)} weight(s) flaxbert has no place for:\n{_listed(unknown)}")
        raise ConversionError(
            f"{where}: not a BERT with {num_layers} layers as config.json says "
            "(flaxbert imports BertForPreTraining, BertForMaskedLM or BertModel weights): "
            + "\n".join(parts)
        )
    if "nsp" in heads and "pooler" not in heads:
        raise ConversionError(
            f"{where}: has an NSP head (cls.seq_relationship.*) but no pooler "
            f"({prefix}pooler.dense.*), which the NSP head reads; such a model cannot run"
        )
    return Mapped(rows, heads)


def _check_tied(weights: Mapping[str, np.ndarray], prefix: str, where: str) -> None:
    decoder, decoder_bias = TIED_DECODER
    pairs = (
        (decoder, prefix + "embeddings.word_embeddings.weight"),
        (decoder_bias, "cls.predictions.bias"),
    )
    for copy, original in pairs:
        if copy in weights and not np.array_equal(weights[copy], weights[original]):
            raise ConversionError(
                f"{where}: {copy} differs from {original}: flaxbert's MLM decoder is tied to "
                "the word embeddings (and its bias to the MLM bias); an untied model cannot "
                "be imported"
            )


_MLM_GROUPS = ("mlm_transform", "mlm_layer_norm", "mlm_output_bias")
_ARCHITECTURES = {  # (MLM head, NSP head) -> the HuggingFace class that has them
    (True, True): "BertForPreTraining",
    (True, False): "BertForMaskedLM",
    (False, True): "BertForNextSentencePrediction",
    (False, False): "BertModel",
}
