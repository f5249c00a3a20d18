"""BERT in Flax linen: embeddings, the post-LayerNorm encoder and the pooler.

The hyper-parameters they take are `flaxbert.model_config.BertConfig`.

The heads on top live apart: the masked-LM and next-sentence heads in
`flaxbert.pretraining_model`, the fine-tuning task heads in `flaxbert.task_heads`.

`model.pre_layer_norm` switches the blocks to pre-LayerNorm (Xiong et al., 2020, "On Layer
Normalization in the Transformer Architecture"), with one more LayerNorm after the last block.

Every parameter carries logical axis names (`nn.with_logical_partitioning`) and the main
activations carry logical constraints, so one rules table (see `flaxbert.mesh_rules`) decides
how the model is laid out on a device mesh. Without a mesh the names cost nothing.

Shape suffixes: B batch, L sequence length, D hidden size, N heads, H head size, F the
feed-forward (intermediate) size, P masked-LM predictions per sequence, V vocabulary.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from flaxbert import attention
from flaxbert.dropout import Dropout
from flaxbert.model_config import REMAT_POLICIES, BertConfig

_LogicallyPartitioned = nn.LogicallyPartitioned


def _partitioned(init, names: tuple[str | None, ...]):
    return lambda *args, **kw: _LogicallyPartitioned(init(*args, **kw), names)


def _dense_init(config: BertConfig, names: tuple[str | None, ...]):
    return _partitioned(nn.initializers.truncated_normal(stddev=config.initializer_range), names)


def _zeros(names):
    return _partitioned(nn.initializers.zeros_init(), names)


def _layer_norm(config: BertConfig, name: str) -> nn.LayerNorm:
    # LayerNorm statistics are computed in float32 even under bfloat16 compute.
    return nn.LayerNorm(
        epsilon=config.layer_norm_eps,
        dtype=config.dtype,
        param_dtype=config.param_dtype,
        scale_init=_partitioned(nn.initializers.ones_init(), ("embed",)),
        bias_init=_zeros(("embed",)),
        name=name,
    )


@jax.custom_vjp
def _rows_matmul(x_RI, w_IO):
    """x_RI @ w_IO, with its weight gradient taken in the orientation XLA:CPU runs fastest.

    Autodiff's weight gradient is the (I, O) matrix x^T g; XLA:CPU (jax 0.10) computes it at
    about half speed when I > O (measured: (4096, 1024)^T (4096, 256) 40-48 ms against 23-27
    ms for the (256, 1024) product on one core), and folds a transpose of the other product
    back into it. So for I > O the gradient is (g^T x)^T, the product kept apart by an
    optimization barrier. Same values (a sum over the same rows); CPU only (`Projection`)."""
    return x_RI @ w_IO


def _rows_matmul_fwd(x_RI, w_IO):
    return x_RI @ w_IO, (x_RI, w_IO)


def _rows_matmul_bwd(residuals, g_RO):
    x_RI, w_IO = residuals
    dx_RI = g_RO @ w_IO.T
    if w_IO.shape[0] > w_IO.shape[1]:
        dw_IO = jax.lax.optimization_barrier(g_RO.T @ x_RI).T
    else:
        dw_IO = x_RI.T @ g_RO
    return dx_RI, dw_IO


_rows_matmul.defvjp(_rows_matmul_fwd, _rows_matmul_bwd)


class Projection(nn.Module):
    """An affine map of the last axes: x (..., *in_shape) -> (..., *out_shape), computed as one
    2-D matmul (every leading axis flattened into the rows) plus a bias.

    The parameters are those of flax's Dense / DenseGeneral, under the same names and shapes:
    `kernel` (*in_shape, *out_shape), initialised on the flat (prod(in), prod(out)) matrix and
    reshaped as DenseGeneral does (so initial values and checkpoints are unchanged), and `bias`
    out_shape. Why not those modules: their matmul contracts x's feature axes directly, and the
    weight gradient then contracts over both B and L; XLA:CPU (jax 0.10) runs that one outside
    its fast YNNPACK path and with an extra transpose of the activations. Flattened rows give
    a plain (B·L, in) x (in, out) matmul whose gradients are plain matmuls too (measured by
    `benchmarks/cpu_levers.py`; see the README, "Speed on the CPU"). Compute in `dtype`.
    """

    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    names: tuple[str | None, ...]  # logical axes of the kernel; the bias takes the out ones
    config: BertConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        n_in, n_out = math.prod(self.in_shape), math.prod(self.out_shape)
        normal = nn.initializers.truncated_normal(stddev=cfg.initializer_range)

        def kernel_init(key, shape, dtype):
            return _LogicallyPartitioned(
                normal(key, (n_in, n_out), dtype).reshape(shape), self.names
            )

        kernel = self.param(
            "kernel", kernel_init, (*self.in_shape, *self.out_shape), cfg.param_dtype
        )
        bias = self.param(
            "bias", _zeros(self.names[len(self.in_shape) :]), self.out_shape, cfg.param_dtype
        )
        lead = x.shape[: x.ndim - len(self.in_shape)]
        if x.shape[len(lead) :] != tuple(self.in_shape):
            raise ValueError(
                f"{self.name}: input of shape {x.shape} does not end in {self.in_shape}"
            )
        rows_R = x.reshape(-1, n_in).astype(cfg.dtype)
        matmul = _rows_matmul if jax.default_backend() == "cpu" else jnp.matmul
        y_R = matmul(rows_R, kernel.reshape(n_in, n_out).astype(cfg.dtype))
        y_R = y_R + bias.reshape(n_out).astype(cfg.dtype)
        return y_R.reshape(*lead, *self.out_shape)


def _dense(
    config: BertConfig, features: int, names: tuple[str, str], name: str, inputs: int = 0
) -> Projection:
    """A Dense layer from `inputs` (default: the hidden size) to `features`."""
    return Projection((inputs or config.hidden_size,), (features,), names, config, name=name)


class Embeddings(nn.Module):
    """Word + learned position + segment embeddings, then LayerNorm and dropout."""

    config: BertConfig

    def setup(self):
        cfg = self.config
        init = lambda names: _dense_init(cfg, names)
        self.word_embeddings = self.param(
            "word_embeddings",
            init(("vocab", "embed")),
            (cfg.vocab_size, cfg.hidden_size),
            cfg.param_dtype,
        )
        self.position_embeddings = self.param(
            "position_embeddings",
            init(("positions", "embed")),
            (cfg.max_position_embeddings, cfg.hidden_size),
            cfg.param_dtype,
        )
        self.segment_embeddings = self.param(
            "segment_embeddings",
            init(("segments", "embed")),
            (cfg.type_vocab_size, cfg.hidden_size),
            cfg.param_dtype,
        )
        self.layer_norm = _layer_norm(cfg, "layer_norm")
        self.dropout = Dropout(cfg.hidden_dropout_rate)

    def _table(self, table, name: str):
        # Gathered over the model axis before the lookup (as fsdp does with every weight):
        # looking rows up in a table split along `embed` gives activations split along `embed`,
        # which the partitioner can only move onto the batch axis by replicating them.
        return nn.with_logical_constraint(table, (name, None))

    def __call__(self, input_ids_BL, segment_ids_BL, position_ids_BL, deterministic: bool):
        x_BLD = (
            jnp.take(self._table(self.word_embeddings, "vocab"), input_ids_BL, axis=0)
            + jnp.take(self._table(self.position_embeddings, "positions"), position_ids_BL, axis=0)
            + jnp.take(self._table(self.segment_embeddings, "segments"), segment_ids_BL, axis=0)
        )
        x_BLD = self.layer_norm(x_BLD)
        return self.dropout(x_BLD, deterministic=deterministic).astype(self.config.dtype)

    def attend(self, x_BPD):
        """Logits against the word-embedding matrix: the decoder is tied to the input table."""
        table_VD = self._table(self.word_embeddings, "vocab").astype(self.config.dtype)
        return jnp.einsum("bpd,vd->bpv", x_BPD, table_VD)


def attend_heads(cfg: BertConfig, q_BLNH, k_BLNH, v_BLNH, mask_B1QL, deterministic: bool):
    """Multi-head attention of q, k, v (B, L, N, H) under `mask_B1QL`, with the implementation
    `flaxbert.attention.choose_attention` picks and attention-probability dropout while
    training. Called inside a module's compact method: its Dropout is that module's."""
    dropout = not deterministic and cfg.attention_dropout_rate > 0.0
    choice = attention.choose_attention(
        backend=attention.platform(),
        dtype=cfg.dtype,
        packed=mask_B1QL.shape[2] > 1,
        dropout=dropout,
        jax_version=jax.__version__,
        requested=cfg.attention_impl,
        head_dim=q_BLNH.shape[-1],
    )
    drop = Dropout(cfg.attention_dropout_rate)
    return attention.attend(
        q_BLNH,
        k_BLNH,
        v_BLNH,
        mask_B1QL=mask_B1QL,
        choice=choice,
        dropout=(lambda p_BNLL: drop(p_BNLL, deterministic=False)) if dropout else None,
    )


class SelfAttention(nn.Module):
    config: BertConfig

    @nn.compact
    def __call__(self, x_BLD, mask_B1QL, deterministic: bool):
        """`mask_B1QL` (bool): which keys each query may see; Q is 1 (padding only: the same
        keys for every query) or L (packed rows: each pair sees only itself)."""
        cfg = self.config
        n, h = cfg.num_heads, cfg.head_dim

        def project(name):
            return Projection((cfg.hidden_size,), (n, h), ("embed", "heads", "kv"), cfg, name=name)

        qkv_axes = ("batch", "length", "heads", "kv")
        q_BLNH = nn.with_logical_constraint(project("query")(x_BLD), qkv_axes)
        k_BLNH = nn.with_logical_constraint(project("key")(x_BLD), qkv_axes)
        v_BLNH = nn.with_logical_constraint(project("value")(x_BLD), qkv_axes)
        out_BLNH = attend_heads(cfg, q_BLNH, k_BLNH, v_BLNH, mask_B1QL, deterministic)

        out_BLNH = nn.with_logical_constraint(out_BLNH, qkv_axes)
        return Projection((n, h), (cfg.hidden_size,), ("heads", "kv", "embed"), cfg, name="output")(
            out_BLNH
        )


class TransformerLayer(nn.Module):
    """One transformer block. Post-LayerNorm as in the BERT paper (the default):
    x = LN(x + Attn(x)); x = LN(x + FFN(x)). With `model.pre_layer_norm`:
    x = x + Attn(LN(x)); x = x + FFN(LN(x)) (Xiong et al., 2020). The two LayerNorms keep
    their names (`attention_layer_norm`, `output_layer_norm`) in both layouts."""

    config: BertConfig

    @nn.compact
    def __call__(self, x_BLD, mask_B1QL, deterministic: bool):
        cfg = self.config
        pre = cfg.pre_layer_norm
        act_axes = ("batch", "length", "embed")
        attention_norm = _layer_norm(cfg, "attention_layer_norm")
        attn_in_BLD = attention_norm(x_BLD) if pre else x_BLD
        attn_BLD = SelfAttention(cfg, name="attention")(attn_in_BLD, mask_B1QL, deterministic)
        attn_BLD = Dropout(cfg.hidden_dropout_rate)(attn_BLD, deterministic=deterministic)
        x_BLD = x_BLD + attn_BLD if pre else attention_norm(x_BLD + attn_BLD)
        x_BLD = nn.with_logical_constraint(x_BLD, act_axes)

        output_norm = _layer_norm(cfg, "output_layer_norm")
        ffn_in_BLD = output_norm(x_BLD) if pre else x_BLD
        h_BLF = _dense(cfg, cfg.intermediate_size, ("embed", "mlp"), "intermediate")(ffn_in_BLD)
        h_BLF = nn.with_logical_constraint(h_BLF, ("batch", "length", "mlp"))
        h_BLF = nn.gelu(h_BLF, approximate=False)
        h_BLD = _dense(
            cfg, cfg.hidden_size, ("mlp", "embed"), "output", inputs=cfg.intermediate_size
        )(h_BLF)
        h_BLD = Dropout(cfg.hidden_dropout_rate)(h_BLD, deterministic=deterministic)
        x_BLD = x_BLD + h_BLD if pre else output_norm(x_BLD + h_BLD)
        return nn.with_logical_constraint(x_BLD, act_axes)


@flax.struct.dataclass
class EncoderOutput:
    sequence_BLD: jax.Array
    # The pooled [CLS] vector: (B, D), or (B, K, D) for packed rows (one per pair).
    pooled_BD: jax.Array | None
    # With `all_layers=True`: the embedding output then each layer's, (L+1) x (B, L, D).
    hidden_states: tuple[jax.Array, ...] | None = None


def attention_mask(input_mask_BL, packed: bool) -> jax.Array:
    """Which keys each query attends to, as `jax.nn.dot_product_attention` takes it.

    Unpacked rows: `input_mask` is 1 on real tokens; every query sees every real key (B,1,1,L).
    Packed rows (sequence packing): `input_mask` holds the pair's number 1..K on its tokens and
    0 on padding; the mask is block-diagonal (B,1,L,L), so no pair sees another. Padding
    queries see all real keys (their outputs are never used; no row is fully masked).
    """
    if not packed:
        return (input_mask_BL > 0)[:, None, None, :]
    q_BL1, k_B1L = input_mask_BL[:, :, None], input_mask_BL[:, None, :]
    mask_BLL = ((q_BL1 == k_B1L) | (q_BL1 == 0)) & (k_B1L > 0)
    return mask_BLL[:, None]


class _ScannedLayer(nn.Module):
    """A transformer block in the (carry, xs) -> (carry, ys) form `nn.scan` wants."""

    config: BertConfig

    @nn.compact
    def __call__(self, x_BLD, mask_B1QL, deterministic: bool):
        x_BLD = _block_class(self.config)(self.config, name="layer")(
            x_BLD, mask_B1QL, deterministic
        )
        return x_BLD, x_BLD


def _block_class(config: BertConfig):
    policy = REMAT_POLICIES[config.remat]
    if not config.remat:
        return TransformerLayer
    # Argument 3 (`deterministic`, counting self) is a Python bool: static. Outside a scan
    # XLA would merge the recomputation with the forward pass (CSE) unless prevented.
    return nn.remat(
        TransformerLayer,
        policy=policy,
        static_argnums=(3,),
        prevent_cse=not config.scan_layers,
    )


class BertModel(nn.Module):
    """The encoder: embeddings, L transformer layers and the [CLS] pooler.

    Fine-tuning models hold this same module under the name `bert`, so the `bert` subtree of
    a pre-training checkpoint drops straight into them. With `model.scan_layers` the L blocks
    are one `nn.scan` (parameters under `layers/layer`, stacked on a leading axis) so compile
    time stays flat in depth; `stack_layers` / `unstack_layers` convert between the layouts.
    """

    config: BertConfig
    add_pooler: bool = True

    def setup(self):
        cfg = self.config
        self.embeddings = Embeddings(cfg)
        if cfg.scan_layers:
            self.layers = nn.scan(
                _ScannedLayer,
                variable_axes={"params": 0},
                split_rngs={"params": True, "dropout": True},
                in_axes=(nn.broadcast, nn.broadcast),
                length=cfg.num_layers,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )(cfg, name="layers")
        else:
            block = _block_class(cfg)
            self.layers = [block(cfg, name=f"layer_{i}") for i in range(cfg.num_layers)]
        if cfg.pre_layer_norm:  # pre-LN blocks leave the residual stream un-normalised
            self.final_layer_norm = _layer_norm(cfg, "final_layer_norm")
        if self.add_pooler:
            self.pooler = _dense(cfg, cfg.hidden_size, ("embed", "embed_out"), "pooler")

    def __call__(
        self,
        input_ids,
        input_mask,
        segment_ids,
        position_ids=None,
        deterministic: bool = True,
        all_layers: bool = False,
        cls_positions=None,
        pool: bool = True,
    ) -> EncoderOutput:
        """Encodes token ids `input_ids` (B, L), `input_mask` (B, L) and `segment_ids` (B, L).

        `position_ids` (B, L) default to 0..L-1. `cls_positions` (B, K) marks packed rows: the
        [CLS] of each pair, pooled one by one (its `input_mask` then numbers the pairs, see
        `attention_mask`). `pool=False` skips the pooler (`pooled_BD` is None), so that a
        checkpoint without one (a transformers BertForMaskedLM) runs what does not need it.

        Raises ValueError, while tracing (free at run time), when L exceeds
        `max_position_embeddings` and no `position_ids` are given; and, for concrete (not
        traced) inputs, when an id lies outside its table (word, position or segment ids),
        which would otherwise give NaN. Under `jax.jit` given `position_ids` cannot be read:
        keep them below `max_position_embeddings` (packing does).
        """
        check_inputs(self.config, input_ids, segment_ids, position_ids)
        if position_ids is None:
            position_ids = jnp.broadcast_to(jnp.arange(input_ids.shape[-1]), input_ids.shape)
        mask = attention_mask(input_mask, packed=cls_positions is not None)
        x_BLD = self.embeddings(input_ids, segment_ids, position_ids, deterministic)
        x_BLD = nn.with_logical_constraint(x_BLD, ("batch", "length", "embed"))
        hidden = [x_BLD]
        if self.config.scan_layers:
            x_BLD, stacked = self.layers(x_BLD, mask, deterministic)
            hidden += list(stacked) if all_layers else []
        else:
            for layer in self.layers:
                x_BLD = layer(x_BLD, mask, deterministic)
                hidden.append(x_BLD)
        if self.config.pre_layer_norm:
            x_BLD = self.final_layer_norm(x_BLD)
            if all_layers:  # the last entry is the encoder's output, as after post-LN blocks
                hidden[-1] = x_BLD
        pooled_BD = None
        if self.add_pooler and pool:
            if cls_positions is None:
                cls_BD = x_BLD[:, 0]
            else:
                cls_BD = jnp.take_along_axis(x_BLD, cls_positions[..., None], axis=1)
            pooled_BD = jnp.tanh(self.pooler(cls_BD))
        return EncoderOutput(
            sequence_BLD=x_BLD,
            pooled_BD=pooled_BD,
            hidden_states=tuple(hidden) if all_layers else None,
        )

    def attend(self, x_BPD):
        return self.embeddings.attend(x_BPD)


def check_inputs(config: BertConfig, input_ids_BL, segment_ids_BL=None, position_ids_BL=None):
    """Refuses inputs the embedding tables cannot hold, which would otherwise read past a
    table (`jnp.take` fills with NaN) and give NaN logits without a word.

    Always (shapes are static, so under `jax.jit` this costs nothing at run time): without
    `position_ids_BL` (positions 0..L-1) the length L of `input_ids_BL` (B, L) must not exceed
    `config.max_position_embeddings`, and `segment_ids_BL` / `position_ids_BL` must have the
    shape of `input_ids_BL`. For concrete
    arrays (eager calls; traced values cannot be read): every id must lie in its table,
    [0, vocab_size), [0, type_vocab_size), [0, max_position_embeddings). Raises ValueError
    naming the lengths or ids and what to do.
    """
    shape = tuple(jnp.shape(input_ids_BL))
    if len(shape) < 1:
        raise ValueError(f"input_ids must have a length axis (B, L); got shape {shape}")
    length, table = shape[-1], config.max_position_embeddings
    # Given position ids index the table instead (packed rows restart them for each pair, so
    # a row may be longer than the table): their values are checked below.
    if position_ids_BL is None and length > table:
        raise ValueError(
            f"input length {length} exceeds the model's max_position_embeddings={table} "
            f"(model.max_position_embeddings): positions from {table} on have no "
            f"embedding. Truncate the inputs to at most {table} tokens (e.g. "
            f"data.max_seq_length / --max-seq-length <= {table}), or use a model with a "
            "larger position table"
        )
    limits = (
        ("input_ids", input_ids_BL, config.vocab_size, "vocab_size"),
        ("segment_ids", segment_ids_BL, config.type_vocab_size, "type_vocab_size"),
        ("position_ids", position_ids_BL, table, "max_position_embeddings"),
    )
    for name, ids, size, key in limits:
        if ids is None:
            continue
        if name != "input_ids" and tuple(jnp.shape(ids)) != shape:
            raise ValueError(
                f"{name} has shape {tuple(jnp.shape(ids))} but input_ids has {shape}; "
                "give one id per token"
            )
        if isinstance(ids, jax.core.Tracer) or not getattr(ids, "is_fully_addressable", True):
            continue  # inside jit/scan (values unknown until run time), or not all on this host
        values = jax.device_get(ids)
        if values.size and (values.min() < 0 or values.max() >= size):
            raise ValueError(
                f"{name} holds ids from {int(values.min())} to {int(values.max())} but the "
                f"model's table has {size} rows (model.{key}={size}): every id must be in "
                f"[0, {size}). Check the tokenizer and the model config belong together"
            )


def stack_layers(params: Mapping[str, Any], num_layers: int) -> dict[str, Any]:
    """An encoder's parameters with `layer_0..layer_{L-1}` -> the scanned layout (`layers/layer`
    with a leading axis of L). Applies to the tree holding the layers (a `bert` subtree)."""
    params = dict(params)
    blocks = [params.pop(f"layer_{i}") for i in range(num_layers)]
    params["layers"] = {"layer": jax.tree.map(lambda *xs: jnp.stack(xs), *blocks)}
    return params


def unstack_layers(params: Mapping[str, Any]) -> dict[str, Any]:
    """The inverse of `stack_layers`."""
    params = dict(params)
    stacked = params.pop("layers")["layer"]
    num_layers = jax.tree.leaves(stacked)[0].shape[0]
    for i in range(num_layers):
        params[f"layer_{i}"] = jax.tree.map(lambda x, i=i: x[i], stacked)
    return params
