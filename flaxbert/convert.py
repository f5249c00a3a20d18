"""`flaxbert convert`: HuggingFace BERT directories into flaxbert checkpoints and back.

Import (`--from-hf DIR --workdir OUT`) reads a local HuggingFace BERT directory:
`config.json`, the weights (`model.safetensors`, a sharded `model.safetensors.index.json`,
or `flax_model.msgpack`) and the WordPiece `vocab.txt`. The weights may be a
BertForPreTraining (`bert.*`, `cls.predictions.*`, `cls.seq_relationship.*`), a
BertForMaskedLM (no pooler, no NSP head) or a bare BertModel (the encoder only, with or
without its pooler, names without `bert.`); the model built on it
(`flaxbert.model.BertForPreTraining.for_params`) has exactly those heads. A fine-tuned
model's task head (`classifier.*` of a BertForSequenceClassification) is refused, naming its
weights, unless `--drop-unknown` leaves it out. Safetensors hold PyTorch names and (out, in)
kernels, msgpack Flax names and (in, out) kernels. The vocabulary is `vocab.txt`, or the
SentencePiece `tokenizer.model` that an export of a SentencePiece checkpoint writes, so that
every flaxbert export imports back. OUT becomes a workdir like `flaxbert pretrain` leaves
it: `checkpoints/0/` (parameters and meta), `vocab.txt` and `tokenizer_config.json`, so that
`flaxbert finetune --config.init_from=OUT` and `flaxbert extract-features --workdir OUT`
take it as they take a pre-training run.

Special ids. flaxbert fixes [PAD]=0 [UNK]=1 [CLS]=2 [SEP]=3 [MASK]=4 (`flaxbert.tokenizer`);
HuggingFace's English BERT vocabularies have them at 0, 100, 101, 102, 103. The import moves
the five to the front and keeps every other piece in its original order: one permutation
(`vocabulary_order`) applied to the rows of the word embeddings, to the MLM output bias and
to the lines of OUT/vocab.txt, so the tokenizer reads flaxbert ids straight from the file.
The five original ids are kept in OUT/tokenizer_config.json (`flaxbert_original_ids`), and
the export puts every row and line back where it came from, bit for bit.

Export (`--to-hf WORKDIR --out DIR`) writes the encoder of a flaxbert checkpoint (scanned or
not) and, when the checkpoint has them, the MLM and NSP heads as `model.safetensors`
(PyTorch names and layouts), `config.json` (model_type bert, hidden_act gelu), and the
tokenizer: `vocab.txt` + `tokenizer_config.json` for WordPiece, or the SentencePiece
`tokenizer.model`, which HuggingFace's BertTokenizer cannot read.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shutil
import sys
from collections.abc import Mapping, Sequence

import numpy as np

from flaxbert.model import STRUCTURAL_KEYS
from flaxbert.tokenizer import (
    SPECIAL_TOKENS,
    WORDPIECE_CONFIG,
    WORDPIECE_VOCAB,
    WordPieceCasing,
    WordPieceTokenizer,
    read_vocab,
    wordpiece_casing,
)

log = logging.getLogger("flaxbert")

HF_CONFIG = "config.json"
SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
MSGPACK = "flax_model.msgpack"
SENTENCEPIECE_FILE = "tokenizer.model"
ORIGINAL_IDS = "flaxbert_original_ids"  # tokenizer_config.json: special piece -> HF id
NO_OPTIMIZER_STATE = "no_optimizer_state"  # the opt_state item of a converted checkpoint
_MAX_LISTED = 25


class ConversionError(ValueError):
    """A directory or checkpoint that cannot be converted; the message says what and why."""


# ------------------------------------------------------------------------------ names

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


def _listed(names: Sequence[str]) -> str:
    shown = [f"  {n}" for n in names[:_MAX_LISTED]]
    if len(names) > _MAX_LISTED:
        shown.append(f"  ... and {len(names) - _MAX_LISTED} more")
    return "\n".join(shown)


# ------------------------------------------------------------------------------ config


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
    from flaxbert.model import BertConfig

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


# ------------------------------------------------------------------------------ weights


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


def _torch_names(weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Safetensors written from a Flax model carry Flax names; turn them to PyTorch's."""
    if any(n.endswith((".kernel", ".embedding", ".scale")) for n in weights):
        return _flax_layout_to_torch(weights)
    return weights


def _flaxbert_shapes(config) -> dict[tuple[str, ...], tuple[int, ...]]:
    """Every parameter of flaxbert's BertForPreTraining for `config`, without allocating."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from flaxbert.model import BertForPreTraining

    z = jnp.zeros((1, 2), jnp.int32)
    tree = jax.eval_shape(
        lambda: BertForPreTraining(config).init(jax.random.key(0), z, z, z, z)["params"]
    )
    tree = nn.unbox(tree)
    return {
        tuple(str(getattr(k, "key", k)) for k in path): tuple(leaf.shape)
        for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
    }


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


def vocabulary_order(original_ids: Sequence[int], vocab_size: int) -> np.ndarray:
    """`order[i]` is the HuggingFace id of flaxbert id i: the special pieces first (their
    original ids in flaxbert's order [PAD] [UNK] [CLS] [SEP] [MASK]), then every other id in
    its original order. flaxbert array = HF array[order]; HF array = flaxbert array[argsort]."""
    specials = np.asarray(original_ids, dtype=np.int64)
    if (
        len(set(specials.tolist())) != len(specials)
        or not ((specials >= 0) & (specials < vocab_size)).all()
    ):
        raise ConversionError(f"original special ids {specials.tolist()} are not distinct ids")
    rest = np.setdiff1d(np.arange(vocab_size, dtype=np.int64), specials)
    return np.concatenate([specials, rest])


def special_ids(pieces: Sequence[str], where: str) -> list[int]:
    """The id of each of [PAD] [UNK] [CLS] [SEP] [MASK] in a HuggingFace vocabulary."""
    ids, problems = [], []
    for piece in SPECIAL_TOKENS:
        at = [i for i, p in enumerate(pieces) if p == piece]
        if len(at) != 1:
            problems.append(f"{piece} is {'missing' if not at else f'on lines {at}'}")
        ids.append(at[0] if at else -1)
    if problems:
        raise ConversionError(
            f"{where}: flaxbert needs each of {' '.join(SPECIAL_TOKENS)} exactly once in the "
            "vocabulary: " + "; ".join(problems)
        )
    return ids


def hf_to_params(
    weights: Mapping[str, np.ndarray],
    config,
    order: np.ndarray,
    where: str,
    drop_unknown: bool = False,
) -> tuple[dict, Mapped]:
    """flaxbert's parameter tree (float32, vocabulary rows in `order`) from HuggingFace
    weights in PyTorch names and layouts, and what was mapped (`Mapped.heads`: 'pooler',
    'mlm', 'nsp' present; `Mapped.dropped`: see `map_hf_names`). Raises ConversionError."""
    weights = _canonical(weights)
    mapped = map_hf_names(weights, config.num_layers, where, drop_unknown)
    prefix = "bert." if any(n.startswith("bert.") for n in weights) else ""
    _check_tied(weights, prefix, where)
    shapes = _flaxbert_shapes(config)
    params: dict = {}
    bad, cast = [], set()
    for path, name, layout in mapped.rows:
        w = weights[name]
        want = _hf_shape(layout, shapes[path])
        if tuple(w.shape) != want:
            bad.append(f"{name}: {tuple(w.shape)} in the file, {want} from {HF_CONFIG}")
            continue
        if w.dtype != np.float32:
            cast.add(str(w.dtype))
        w = w.astype(np.float32, copy=False)
        node = params
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = np.ascontiguousarray(_to_flaxbert(layout, w, config.num_heads, order))
    if bad:
        raise ConversionError(f"{where}: weights of the wrong shape:\n{_listed(bad)}")
    if cast:
        log.info("convert: %s weights cast to float32", ", ".join(sorted(cast)))
    return params, mapped


# ------------------------------------------------------------------------------ import


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


def user_path(path: str | os.PathLike) -> str:
    """A path as a user gives it (relative, with `~`, with a trailing slash) made absolute,
    as orbax and the messages need it."""
    return os.path.abspath(os.path.expanduser(os.fspath(path)))


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
    import jax

    from flaxbert import checkpoint as ckpt

    hf_dir, workdir = user_path(hf_dir), user_path(workdir)
    if not os.path.isdir(hf_dir):
        raise ConversionError(f"--from-hf {hf_dir}: no such directory")
    hf_config = read_hf_config(hf_dir)
    config = bert_config_from_hf(hf_config, os.path.join(hf_dir, HF_CONFIG))
    kind, tokenizer_path, pieces, original = _hf_tokenizer(hf_dir, config.vocab_size)
    order = vocabulary_order(original, config.vocab_size)
    casing = None
    if kind == "wordpiece" and lowercase is None:
        casing = wordpiece_casing(hf_dir, hf_config)
    elif kind == "wordpiece":
        casing = WordPieceCasing(lowercase, source=f"--lowercase {str(lowercase).lower()}")
    elif lowercase is not None:
        log.warning("convert: --lowercase applies to WordPiece only; %s is SentencePiece", kind)

    weights, source = read_hf_weights(hf_dir)
    params, mapped = hf_to_params(weights, config, order, source, drop_unknown)
    heads = mapped.heads

    directory = os.path.join(workdir, ckpt.SUBDIR)
    if os.path.isdir(directory) and os.listdir(directory):
        raise ConversionError(
            f"--workdir {workdir} already holds checkpoints ({directory}); give a new directory"
        )
    os.makedirs(workdir, exist_ok=True)
    original_ids = dict(zip(SPECIAL_TOKENS, original, strict=True))
    if kind == "wordpiece":
        out_tokenizer = os.path.join(workdir, WORDPIECE_VOCAB)
        _write_lines(out_tokenizer, [pieces[i] for i in order])
        _write_json(
            os.path.join(workdir, WORDPIECE_CONFIG),
            {
                "tokenizer_class": "BertTokenizer",
                **casing.to_json(),
                "casing_source": casing.source,
                ORIGINAL_IDS: original_ids,
            },
        )
    else:
        out_tokenizer = os.path.join(workdir, ckpt.TOKENIZER_FILE)
        shutil.copyfile(tokenizer_path, out_tokenizer + ".tmp")
        os.replace(out_tokenizer + ".tmp", out_tokenizer)
    model = dataclasses.asdict(config)
    meta = {
        "format": ckpt.FORMAT_VERSION,
        "step": 0,
        "rng": ckpt.rng_to_json(jax.random.key(0)),
        "data": {"position": 0},
        "config": {"model": model},
        "tokenizer": {"path": out_tokenizer, "copy": os.path.basename(out_tokenizer)},
        "model": model,
        "converted_from": {
            "directory": hf_dir,
            "weights": os.path.basename(source),
            "heads": heads,
            "dropped": mapped.dropped,
            "huggingface_config": hf_config,
        },
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
    moved = ", ".join(f"{p} {i}->{j}" for j, (p, i) in enumerate(original_ids.items()) if i != j)
    log.info(
        "convert: %s (%s) -> %s\n  vocabulary: %s; lowercase=%s (%s)\n  fine-tune: flaxbert "
        "finetune --config configs/finetune.py:TASK,VARIANT --config.init_from=%s with the "
        "model keys %s",
        hf_dir,
        ", ".join([os.path.basename(source), "encoder", *heads]),
        os.path.join(directory, "0"),
        f"special tokens moved to flaxbert's ids ({moved})" if moved else "kept as it was",
        casing.lowercase if casing else "n/a",
        casing.source if casing else f"{kind} tokenizer",
        workdir,
        " ".join(f"{k}={model[k]}" for k in STRUCTURAL_KEYS),
    )
    return ImportResult(
        workdir=workdir,
        step_dir=os.path.join(directory, "0"),
        model=model,
        heads=heads,
        weights_file=source,
        original_ids=original_ids,
        casing=casing,
        tokenizer=kind,
        dropped=mapped.dropped,
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


# ------------------------------------------------------------------------------ export


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


def _get(tree: Mapping, path: tuple[str, ...]):
    for k in path:
        tree = tree[k]
    return tree


_MLM_GROUPS = ("mlm_transform", "mlm_layer_norm", "mlm_output_bias")
_ARCHITECTURES = {  # (MLM head, NSP head) -> the HuggingFace class that has them
    (True, True): "BertForPreTraining",
    (True, False): "BertForMaskedLM",
    (False, True): "BertForNextSentencePrediction",
    (False, False): "BertModel",
}


def params_to_hf(params: Mapping, config, inverse: np.ndarray) -> tuple[dict, str, list[str]]:
    """(HuggingFace weights in PyTorch names and layouts, architecture, heads) of a flaxbert
    parameter tree (layers stacked or not); vocabulary rows go back to `inverse` order. A
    bare encoder gets BertModel's names (no `bert.` prefix). Task heads are left out."""
    from flaxbert.model import unstack_layers

    params = dict(params)
    if "layers" in params["bert"]:  # model.scan_layers: one stacked tree
        params["bert"] = unstack_layers(params["bert"])
    mlm = all(k in params for k in _MLM_GROUPS)
    nsp = "nsp" in params
    pooler = "pooler" in params["bert"]
    prefix = "bert." if (mlm or nsp) else ""
    rows = _encoder_rows(config.num_layers, prefix)
    rows += (_pooler_rows(prefix) if pooler else []) + (MLM_ROWS if mlm else [])
    rows += NSP_ROWS if nsp else []
    weights, cast = {}, set()
    for path, name, layout in rows:
        x = np.asarray(_get(params, path))
        if x.dtype not in (np.float32, np.float16):  # safetensors.numpy has no bfloat16
            cast.add(str(x.dtype))
            x = x.astype(np.float32)
        weights[name] = np.ascontiguousarray(_to_hf(layout, x, inverse))
    if cast:
        log.info("convert: %s parameters written as float32", ", ".join(sorted(cast)))
    heads = [h for h, present in (("pooler", pooler), ("mlm", mlm), ("nsp", nsp)) if present]
    return weights, _ARCHITECTURES[(mlm, nsp)], heads


def export_hf(checkpoint: str, out_dir: str) -> ExportResult:
    """Writes the checkpoint `checkpoint` names (a workdir, its checkpoints/ or a step
    directory; pre-training, converted or fine-tuned) as a HuggingFace BERT directory."""
    from safetensors.numpy import save_file

    from flaxbert import checkpoint as ckpt
    from flaxbert.model import BertConfig
    from flaxbert.tokenizer import load_tokenizer

    checkpoint = user_path(checkpoint)
    step_dir, meta = ckpt.read_meta(checkpoint)
    try:
        config = BertConfig.from_dict(meta.get("model") or meta["config"]["model"])
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


# ------------------------------------------------------------------------------ command


def add_convert_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "convert",
        help="import a HuggingFace BERT directory as a flaxbert checkpoint, or export one",
        description="--from-hf DIR --workdir OUT: import a local HuggingFace BERT directory "
        f"({HF_CONFIG}, {SAFETENSORS} or {MSGPACK}, {WORDPIECE_VOCAB}) into a flaxbert "
        "workdir that `flaxbert finetune --config.init_from=OUT` takes; the vocabulary is "
        "reordered so that [PAD] [UNK] [CLS] [SEP] [MASK] get ids 0-4. --to-hf WORKDIR --out "
        "DIR: export a flaxbert checkpoint's encoder and MLM/NSP heads in HuggingFace's "
        "format, in the original vocabulary order.",
    )
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--from-hf", metavar="DIR", help="HuggingFace BERT directory to import")
    g.add_argument(
        "--to-hf", metavar="WORKDIR", help="flaxbert workdir, checkpoints/ or step dir to export"
    )
    p.add_argument("--workdir", metavar="OUT", help="with --from-hf: the workdir to write")
    p.add_argument("--out", metavar="DIR", help="with --to-hf: the directory to write")
    p.add_argument(
        "--lowercase",
        choices=("auto", "true", "false"),
        default="auto",
        help="with --from-hf: lowercase text before WordPiece (auto: do_lower_case in "
        f"{WORDPIECE_CONFIG} or {HF_CONFIG}, else whether the directory's name contains "
        "'uncased'; default: %(default)s)",
    )
    p.add_argument(
        "--drop-unknown",
        action="store_true",
        help="with --from-hf: leave out the weights of heads flaxbert does not import (e.g. "
        "the classifier.* of a BertForSequenceClassification or BertForTokenClassification), "
        "naming them in the log, instead of refusing the directory",
    )
    return p


def run_convert(args: argparse.Namespace) -> int:
    try:
        if args.from_hf:
            if not args.workdir or args.out:
                raise ConversionError("--from-hf DIR needs --workdir OUT (and no --out)")
            lowercase = {"auto": None, "true": True, "false": False}[args.lowercase]
            import_hf(args.from_hf, args.workdir, lowercase, getattr(args, "drop_unknown", False))
        else:
            if not args.out or args.workdir:
                raise ConversionError("--to-hf WORKDIR needs --out DIR (and no --workdir)")
            export_hf(args.to_hf, args.out)
    except (ValueError, OSError) as e:  # ConversionError, ConfigError, missing files
        print(f"flaxbert convert: error: {e}", file=sys.stderr)
        return 2
    return 0
