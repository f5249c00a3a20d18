"""The model's hyper-parameters: `BertConfig`, the typed dataclass the modules take (built
from the `model` part of a run config, checked key by key), and `STRUCTURAL_KEYS`, the keys
that fix the parameters' shapes (a checkpoint fits a config when they agree).
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Collection, Mapping
from typing import Any

import jax

_DTYPES = ("float32", "bfloat16", "float16")
_ATTENTION_IMPLS = ("", "xla", "cudnn")
# Activation checkpointing of each transformer block: '' keeps every activation for the
# backward pass; 'full' keeps only the block's input and recomputes the rest; 'dots' keeps the
# matmul outputs (no batch dims) and recomputes the cheap element-wise work.
REMAT_POLICIES = {
    "": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


# The keys that fix the parameters' shapes: a checkpoint fits a config when they agree.
STRUCTURAL_KEYS = (
    "vocab_size",
    "hidden_size",
    "num_layers",
    "num_heads",
    "intermediate_size",
    "max_position_embeddings",
    "type_vocab_size",
)


# The keys that fix how the saved parameters are read: one stacked tree or one per layer, and
# the blocks' LayerNorm placement (a pre-LN checkpoint read as post-LN runs, wrongly, silently).
LAYOUT_KEYS = ("scan_layers", "pre_layer_norm")

# Named model sizes: (layers L, hidden H, heads A), intermediate size 4H. After Google's compact
# BERTs (Turc et al., 2019, "Well-Read Students Learn Better") and the BERT paper (base, large).
VARIANTS = {
    "tiny": (2, 128, 2),
    "mini": (4, 256, 4),
    "small": (4, 512, 8),
    "medium": (8, 512, 8),
    "base": (12, 768, 12),
    "large": (24, 1024, 16),
    # configs/pretrain.py's CPU half-hour recipe: tiny's size with pre-LayerNorm blocks.
    "cpu30": (2, 128, 2),
}
PRE_LAYER_NORM_VARIANTS = ("cpu30",)


def variant_structure(name: str) -> dict[str, Any]:
    """The structural `model.*` values (`STRUCTURAL_KEYS` but vocab_size, and `LAYOUT_KEYS`)
    of the named size. Raises KeyError naming the sizes for an unknown name."""
    if name not in VARIANTS:
        raise KeyError(f"unknown variant {name!r}; choose one of {', '.join(VARIANTS)}")
    layers, hidden, heads = VARIANTS[name]
    return {
        "hidden_size": hidden,
        "num_layers": layers,
        "num_heads": heads,
        "intermediate_size": 4 * hidden,
        "max_position_embeddings": 512,
        "type_vocab_size": 2,
        "scan_layers": False,
        "pre_layer_norm": name in PRE_LAYER_NORM_VARIANTS,
    }


def structure_from_checkpoint(
    values: Mapping[str, Any],
    saved: Mapping[str, Any],
    user_set: Collection[str],
    where: str,
) -> tuple[dict[str, Any], list[str]]:
    """The `model.*` values of a run that starts from a checkpoint: every structural and
    layout key (`STRUCTURAL_KEYS` but vocab_size, `LAYOUT_KEYS`) the checkpoint records is
    taken from it, unless the user set it (`user_set`: keys named on the command line or
    changed from the config's size), in which case it must agree.

    `values`: the config's `model` dict; `saved`: the checkpoint's (its meta `model`).
    Returns (the new values, the `model.KEY=VALUE` strings taken from the checkpoint that
    differ from the config's). Raises ValueError naming every user-set key that disagrees,
    with `where` (the checkpoint) in the message."""
    out, taken, clash = dict(values), [], []
    for key in [k for k in STRUCTURAL_KEYS if k != "vocab_size"] + list(LAYOUT_KEYS):
        if key not in saved:
            continue
        mine, theirs = values.get(key), saved[key]
        if key in LAYOUT_KEYS:
            mine, theirs = bool(mine), bool(theirs)
        if mine == theirs:
            continue
        if key in user_set:
            clash.append(f"model.{key}={mine} but the checkpoint has {theirs}")
        else:
            out[key] = theirs
            taken.append(f"model.{key}={theirs}")
    if clash:
        raise ValueError(
            f"the config does not fit the checkpoint {where}: {'; '.join(clash)}. Leave these "
            "keys unset: a run started from a checkpoint takes its structure from it"
        )
    return out, taken


def user_set_keys(model: Mapping[str, Any], variant: str, explicit: Collection[str]) -> set[str]:
    """The `model.*` keys a user set: named on the command line (`explicit`, full
    `model.KEY` names) or holding a value other than the config's size (`variant`) gives.
    Without a known variant every structural key counts as set."""
    keys = {k.split(".", 1)[1] for k in explicit if k.startswith("model.")}
    if variant not in VARIANTS:
        return keys | set(STRUCTURAL_KEYS) | set(LAYOUT_KEYS)
    default = variant_structure(variant)
    return keys | {k for k, v in default.items() if k in model and model[k] != v}


@dataclasses.dataclass(frozen=True)
class BertConfig:
    """The model's hyper-parameters; the modules see this and nothing else of a run config."""

    vocab_size: int = 30522
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    hidden_dropout_rate: float = 0.1
    attention_dropout_rate: float = 0.1
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-12
    # Compute dtype: 'auto' is bfloat16 on GPU/TPU and float32 on CPU (where bfloat16 matmuls
    # are slower). Parameters and optimizer state stay in `param_dtype`.
    dtype: str = "float32"
    param_dtype: str = "float32"
    attention_impl: str = ""  # '' picks the best for the platform; 'xla' or 'cudnn' force one
    remat: str = ""  # '' | 'full' | 'dots': activation checkpointing of each block
    scan_layers: bool = False  # one scanned block (parameters stacked on a `layers` axis)
    # Pre-LayerNorm blocks, x = x + Attn(LN(x)); x = x + FFN(LN(x)), and a final LayerNorm
    # (`bert/final_layer_norm`) after the last one (Xiong et al., 2020). Off = the BERT paper's
    # post-LayerNorm. Pre-LN trains stably at larger learning rates without a long warm-up and
    # leaves the unigram plateau sooner on short budgets; its checkpoints have no transformers
    # BertModel equivalent (`flaxbert export` refuses them).
    pre_layer_norm: bool = False

    def __post_init__(self):
        def bad(key, why):
            raise ValueError(f"config key model.{key}={getattr(self, key)!r}: {why}")

        for key in STRUCTURAL_KEYS:
            if getattr(self, key) < 1:
                bad(key, "must be a positive integer")
        if self.hidden_size % self.num_heads:
            bad("hidden_size", f"must be divisible by model.num_heads={self.num_heads}")
        for key in ("hidden_dropout_rate", "attention_dropout_rate"):
            if not 0.0 <= getattr(self, key) < 1.0:
                bad(key, "must be in [0, 1)")
        if self.dtype not in _DTYPES + ("auto",):
            bad("dtype", f"must be one of auto, {', '.join(_DTYPES)}")
        if self.param_dtype not in _DTYPES:
            bad("param_dtype", f"must be one of {', '.join(_DTYPES)}")
        if self.attention_impl not in _ATTENTION_IMPLS:
            bad("attention_impl", "must be '', 'xla' or 'cudnn'")
        if self.remat not in REMAT_POLICIES:
            bad("remat", "must be '' (off), 'full' or 'dots'")
        if self.dtype == "auto":  # resolved once, so every module sees the same dtype
            backend = jax.default_backend()
            object.__setattr__(self, "dtype", "float32" if backend == "cpu" else "bfloat16")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> BertConfig:
        """Builds the typed config from `config.model`, naming any key it does not know."""
        known = [f.name for f in dataclasses.fields(cls)]
        for key in values:
            if key not in known:
                close = difflib.get_close_matches(key, known, n=1)
                hint = f" (did you mean model.{close[0]}?)" if close else ""
                raise ValueError(f"unknown config key model.{key}{hint}")
        return cls(**dict(values))
