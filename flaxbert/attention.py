"""Which attention kernel runs, as a pure function of the platform and the config, and running it.

`jax.nn.dot_product_attention(..., implementation=None)` means XLA in current JAX, never
cuDNN, so the choice is made here and made explicitly:

requested (`model.attention_impl`), condition -> what runs:

- `''`, attention dropout active (training with rate > 0) -> `materialised`
- `''`, NVIDIA GPU, 16-bit compute, head size a multiple of 8 and <= 128, unpacked rows
  -> `cudnn`, padding given as sequence lengths
- `''`, anything else (CPU, TPU, ROCm, float32, packed rows) -> `xla`, dense mask
- `'xla'` -> `xla`, dense mask; `materialised` while attention dropout is active
- `'cudnn'` where cuDNN cannot run (not NVIDIA, float32, head size, packed) -> ValueError
- `'cudnn'` otherwise -> `cudnn` with sequence lengths; `materialised` while dropout is active

What JAX offers (checked in jax 0.10.2's `jax/_src/nn/functions.py` and
`jax/_src/cudnn/fused_attention_stablehlo.py`, and the 0.11 documentation of
`jax.nn.dot_product_attention`): no dropout argument (the cuDNN kernel's `dropout_rate` is
reachable only through the private `jax._src.cudnn` module); no segment ids or sequence
offsets (the private cuDNN function takes `q_offsets`, Hopper only; jax-ml/jax#29731 that
would expose them is open). A dense mask on the cuDNN path is turned into an additive bias
that must be (B, N|1, L, L): the (B,1,1,L) padding mask fails (jax-ml/jax#28974) and a
per-batch bias has known trouble in the backward pass (jax-ml/jax#30593). Hence padding goes
to cuDNN as `key_value_seq_lengths`, and packed rows (block-diagonal mask) go to XLA.

Shape suffixes as in `flaxbert.model`: B batch, L length, N heads, H head size, Q 1 or L.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Callable

import jax
import jax.extend.backend
import jax.numpy as jnp

log = logging.getLogger("flaxbert.attention")

IMPLS = ("cudnn", "xla", "materialised")
_NVIDIA = ("gpu", "cuda")
_SIXTEEN_BIT = ("bfloat16", "float16")
# The oldest JAX whose cuDNN attention was checked against this module (setup.cfg's minimum).
_CUDNN_CHECKED_SINCE = (0, 10, 2)
# The JAX that first takes attention dropout / segment ids in `jax.nn.dot_product_attention`:
# none yet (checked up to 0.11). Set these when one does, and use them in `attend`.
_FUSED_DROPOUT_SINCE: tuple[int, ...] | None = None
_CUDNN_SEGMENTS_SINCE: tuple[int, ...] | None = None
# cuDNN flash attention's head-size limit before Hopper (256 from Hopper on); BERT's is 64.
_CUDNN_MAX_HEAD_DIM = 128


@dataclasses.dataclass(frozen=True)
class AttentionChoice:
    impl: str  # 'cudnn' | 'xla' | 'materialised'
    use_seq_lengths: bool  # padding given as key_value_seq_lengths instead of a dense mask
    reason: str


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", text)[:3])


def _since(jax_version: str, first: tuple[int, ...] | None) -> bool:
    return first is not None and _version(jax_version) >= first


def platform() -> str:
    """`jax.default_backend()`, with 'gpu' refined to 'cuda' or 'rocm' where the runtime says."""
    backend = jax.default_backend()
    if backend == "gpu":
        version = getattr(jax.extend.backend.get_backend(), "platform_version", "").lower()
        for name in ("rocm", "cuda"):
            if name in version:
                return name
    return backend


def choose_attention(
    *,
    backend: str,
    dtype: str,
    packed: bool,
    dropout: bool,
    jax_version: str,
    requested: str,
    head_dim: int,
) -> AttentionChoice:
    """The attention implementation for this platform and config (the table in the module
    docstring). `backend` is `jax.default_backend()` (or `platform()`), `dtype` the compute
    dtype, `packed` whether rows hold several pairs (block-diagonal mask), `dropout` whether
    attention dropout is active in this call, `head_dim` the size of one head. Raises
    ValueError when `requested='cudnn'` and cuDNN cannot run here, naming
    `model.attention_impl` and what to set instead."""
    if requested not in ("", "xla", "cudnn"):
        raise ValueError(
            f"config key model.attention_impl={requested!r}: must be '', 'xla' or 'cudnn'"
        )
    no_fused_dropout = (
        f"attention dropout is active (training, model.attention_dropout_rate > 0) and jax "
        f"{jax_version}'s jax.nn.dot_product_attention has no dropout argument, so the "
        f"probabilities are materialised"
    )
    if requested == "xla":
        if dropout:
            return AttentionChoice(
                "materialised", False, f"model.attention_impl='xla': {no_fused_dropout}"
            )
        return AttentionChoice(
            "xla", False, "model.attention_impl='xla': XLA attention, dense mask"
        )

    obstacle = None
    if backend not in _NVIDIA:
        obstacle = f"the backend is {backend!r}; cuDNN flash attention needs an NVIDIA GPU"
    elif dtype not in _SIXTEEN_BIT:
        obstacle = (
            f"model.dtype={dtype!r}; cuDNN flash attention needs 16-bit compute "
            f"(bfloat16 or float16)"
        )
    elif head_dim % 8 or head_dim > _CUDNN_MAX_HEAD_DIM:
        obstacle = (
            f"the head size is {head_dim} (model.hidden_size / model.num_heads); cuDNN flash "
            f"attention needs a multiple of 8, at most {_CUDNN_MAX_HEAD_DIM}"
        )
    elif packed and not _since(jax_version, _CUDNN_SEGMENTS_SINCE):
        obstacle = (
            f"rows are packed (data.packing) and jax {jax_version}'s "
            f"jax.nn.dot_product_attention gives cuDNN no segment ids; a dense block-diagonal "
            f"mask there becomes an additive bias that is not clearly supported in the "
            f"backward pass (jax-ml/jax#30593)"
        )
    elif _version(jax_version) < _CUDNN_CHECKED_SINCE:
        obstacle = f"jax {jax_version} is older than the cuDNN path was checked against (0.10.2)"

    if requested == "cudnn" and obstacle:
        raise ValueError(
            f"config key model.attention_impl='cudnn' cannot run: {obstacle}. Set "
            f"model.attention_impl='' to pick the best available, or 'xla'"
        )
    if dropout and not _since(jax_version, _FUSED_DROPOUT_SINCE):
        hint = (
            ""
            if obstacle
            else "; set model.attention_dropout_rate=0 to train on cuDNN flash attention"
        )
        return AttentionChoice("materialised", False, no_fused_dropout + hint)
    if obstacle:
        return AttentionChoice("xla", False, f"XLA attention: {obstacle}")
    return AttentionChoice(
        "cudnn", True, "cuDNN flash attention, padding given as key_value_seq_lengths"
    )


_LOGGED: set[str] = set()


def _log_once(reason: str) -> None:
    if reason not in _LOGGED:
        _LOGGED.add(reason)
        log.info("attention: %s", reason)


def key_lengths(mask_B1QL) -> jax.Array:
    """The number of real tokens in each unpacked row, from its (B,1,1,L) padding mask, as
    cuDNN's `key_value_seq_lengths` takes it (int32). At least 1: a row of padding alone
    attends to its first key rather than to nothing (its outputs are never used)."""
    return jnp.maximum(jnp.sum(mask_B1QL[:, 0, 0, :], axis=-1, dtype=jnp.int32), 1)


def attend(
    q_BLNH,
    k_BLNH,
    v_BLNH,
    *,
    mask_B1QL,
    choice: AttentionChoice,
    dropout: Callable[[jax.Array], jax.Array] | None = None,
) -> jax.Array:
    """Self-attention as `choice` says; the output has `q_BLNH`'s shape and dtype.

    `mask_B1QL` (bool) is `flaxbert.model.attention_mask`'s. With `choice.use_seq_lengths`
    the padding goes as sequence lengths (`key_lengths`), which says only how many keys are
    real: it is right because padding is trailing in every flaxbert batch (real tokens first,
    then padding), and it needs unpacked rows (Q = 1). `dropout` is applied to the attention
    probabilities on the materialised path (the Flax module passes its own `nn.Dropout`).
    Logs each distinct `choice.reason` once per process (logger `flaxbert.attention`).
    """
    _log_once(choice.reason)
    if choice.impl == "materialised":
        h = q_BLNH.shape[-1]
        scores_BNLL = jnp.einsum("blnh,bmnh->bnlm", q_BLNH, k_BLNH).astype(jnp.float32)
        scores_BNLL = jnp.where(mask_B1QL, scores_BNLL * h**-0.5, jnp.finfo(jnp.float32).min)
        probs_BNLL = jax.nn.softmax(scores_BNLL, axis=-1).astype(q_BLNH.dtype)
        if dropout is not None:
            probs_BNLL = dropout(probs_BNLL)
        return jnp.einsum("bnlm,bmnh->blnh", probs_BNLL, v_BLNH)
    if choice.impl not in IMPLS:
        raise ValueError(f"unknown attention implementation {choice.impl!r}; one of {IMPLS}")
    if choice.use_seq_lengths:
        if mask_B1QL.shape[2] != 1:
            raise ValueError(
                "sequence lengths describe unpacked rows only; packed rows need the dense mask"
            )
        return jax.nn.dot_product_attention(
            q_BLNH,
            k_BLNH,
            v_BLNH,
            key_value_seq_lengths=key_lengths(mask_B1QL),
            implementation=choice.impl,
        )
    return jax.nn.dot_product_attention(
        q_BLNH, k_BLNH, v_BLNH, mask=mask_B1QL, implementation=choice.impl
    )
