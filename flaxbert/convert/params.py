"""HuggingFace weights into flaxbert's parameter tree and back, through the rows of
`flaxbert.convert.names`: shapes checked against the model `config.json` describes, float32
on import, and the vocabulary permutation (`vocabulary_order`) that puts the special pieces at
flaxbert's fixed ids and every other piece in its original order.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import numpy as np

from flaxbert.convert.common import HF_CONFIG, ConversionError, _listed
from flaxbert.convert.names import (
    _ARCHITECTURES,
    _MLM_GROUPS,
    MLM_ROWS,
    NSP_ROWS,
    Mapped,
    _canonical,
    _check_tied,
    _encoder_rows,
    _hf_shape,
    _pooler_rows,
    _to_flaxbert,
    _to_hf,
    map_hf_names,
)
from flaxbert.tokenizer.special import SPECIAL_TOKENS

log = logging.getLogger("flaxbert")


def _flaxbert_shapes(config) -> dict[tuple[str, ...], tuple[int, ...]]:
    """Every parameter of flaxbert's BertForPreTraining for `config`, without allocating."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from flaxbert.pretraining_model import BertForPreTraining

    z = jnp.zeros((1, 2), jnp.int32)
    tree = jax.eval_shape(
        lambda: BertForPreTraining(config).init(jax.random.key(0), z, z, z, z)["params"]
    )
    tree = nn.unbox(tree)
    return {
        tuple(str(getattr(k, "key", k)) for k in path): tuple(leaf.shape)
        for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
    }


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


def _get(tree: Mapping, path: tuple[str, ...]):
    for k in path:
        tree = tree[k]
    return tree


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
