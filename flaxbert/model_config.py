"""The model's hyper-parameters: `BertConfig`, the typed dataclass the modules take (built
from the `model` part of a run config, checked key by key), and `STRUCTURAL_KEYS`, the keys
that fix the parameters' shapes (a checkpoint fits a config when they agree).
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Mapping
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
