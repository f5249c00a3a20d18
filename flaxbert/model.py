"""BERT in Flax linen: embeddings, post-LayerNorm encoder, pooler, MLM and NSP heads.

Every parameter carries logical axis names (`nn.with_logical_partitioning`) and the main
activations carry logical constraints, so one rules table (see `flaxbert.sharding`) decides
how the model is laid out on a device mesh. Without a mesh the names cost nothing.

Shape suffixes: B batch, L sequence length, D hidden size, N heads, H head size, F the
feed-forward (intermediate) size, P masked-LM predictions per sequence, V vocabulary.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

_DTYPES = ("float32", "bfloat16", "float16")
_ATTENTION_IMPLS = ("", "xla", "cudnn")


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
    dtype: str = "float32"  # compute dtype
    param_dtype: str = "float32"
    attention_impl: str = ""  # '' picks the best for the platform; 'xla' or 'cudnn' force one

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
        for key in ("dtype", "param_dtype"):
            if getattr(self, key) not in _DTYPES:
                bad(key, f"must be one of {', '.join(_DTYPES)}")
        if self.attention_impl not in _ATTENTION_IMPLS:
            bad("attention_impl", "must be '', 'xla' or 'cudnn'")

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


class _LogicallyPartitioned(nn.LogicallyPartitioned):
    """Flax's DenseGeneral unboxes its kernel and bias while still flat (a (D, N*H) kernel
    named ('embed', 'heads', 'kv')) to reshape them, also in the shape check of every
    `apply`; under a mesh the constraint would reject that rank. That unbox goes unconstrained
    (the reshaped parameter is then constrained as usual)."""

    def unbox(self, apply_constraint=True):
        if jnp.ndim(self.value) != len(self.names):
            return self.value
        return super().unbox(apply_constraint)


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


def _dense(config: BertConfig, features: int, names: tuple[str, str], name: str) -> nn.Dense:
    return nn.Dense(
        features,
        dtype=config.dtype,
        param_dtype=config.param_dtype,
        kernel_init=_dense_init(config, names),
        bias_init=_zeros(names[1:]),
        name=name,
    )


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
        self.dropout = nn.Dropout(cfg.hidden_dropout_rate)

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


class SelfAttention(nn.Module):
    config: BertConfig

    @nn.compact
    def __call__(self, x_BLD, mask_BL, deterministic: bool):
        cfg = self.config
        n, h = cfg.num_heads, cfg.head_dim

        def project(name):
            return nn.DenseGeneral(
                (n, h),
                dtype=cfg.dtype,
                param_dtype=cfg.param_dtype,
                name=name,
                kernel_init=_dense_init(cfg, ("embed", "heads", "kv")),
                bias_init=_zeros(("heads", "kv")),
            )

        qkv_axes = ("batch", "length", "heads", "kv")
        q_BLNH = nn.with_logical_constraint(project("query")(x_BLD), qkv_axes)
        k_BLNH = nn.with_logical_constraint(project("key")(x_BLD), qkv_axes)
        v_BLNH = nn.with_logical_constraint(project("value")(x_BLD), qkv_axes)
        mask_B11L = mask_BL[:, None, None, :].astype(bool)

        if deterministic or cfg.attention_dropout_rate == 0.0:
            impl = cfg.attention_impl or None
            out_BLNH = jax.nn.dot_product_attention(
                q_BLNH, k_BLNH, v_BLNH, mask=mask_B11L, implementation=impl
            )
        else:
            # Dropout on the attention probabilities needs them materialised, which the fused
            # kernel never does; set model.attention_dropout_rate=0 to train on the fused path.
            scores_BNLL = jnp.einsum("blnh,bmnh->bnlm", q_BLNH, k_BLNH).astype(jnp.float32)
            scores_BNLL = jnp.where(mask_B11L, scores_BNLL * h**-0.5, jnp.finfo(jnp.float32).min)
            probs_BNLL = jax.nn.softmax(scores_BNLL, axis=-1).astype(cfg.dtype)
            probs_BNLL = nn.Dropout(cfg.attention_dropout_rate)(probs_BNLL, deterministic=False)
            out_BLNH = jnp.einsum("bnlm,bmnh->blnh", probs_BNLL, v_BLNH)

        out_BLNH = nn.with_logical_constraint(out_BLNH, qkv_axes)
        return nn.DenseGeneral(
            cfg.hidden_size,
            axis=(-2, -1),
            dtype=cfg.dtype,
            param_dtype=cfg.param_dtype,
            kernel_init=_dense_init(cfg, ("heads", "kv", "embed")),
            bias_init=_zeros(("embed",)),
            name="output",
        )(out_BLNH)


class TransformerLayer(nn.Module):
    """One post-LayerNorm block as in the BERT paper: x = LN(x + Attn(x)); x = LN(x + FFN(x))."""

    config: BertConfig

    @nn.compact
    def __call__(self, x_BLD, mask_BL, deterministic: bool):
        cfg = self.config
        act_axes = ("batch", "length", "embed")
        attn_BLD = SelfAttention(cfg, name="attention")(x_BLD, mask_BL, deterministic)
        attn_BLD = nn.Dropout(cfg.hidden_dropout_rate)(attn_BLD, deterministic=deterministic)
        x_BLD = _layer_norm(cfg, "attention_layer_norm")(x_BLD + attn_BLD)
        x_BLD = nn.with_logical_constraint(x_BLD, act_axes)

        h_BLF = _dense(cfg, cfg.intermediate_size, ("embed", "mlp"), "intermediate")(x_BLD)
        h_BLF = nn.with_logical_constraint(h_BLF, ("batch", "length", "mlp"))
        h_BLF = nn.gelu(h_BLF, approximate=False)
        h_BLD = _dense(cfg, cfg.hidden_size, ("mlp", "embed"), "output")(h_BLF)
        h_BLD = nn.Dropout(cfg.hidden_dropout_rate)(h_BLD, deterministic=deterministic)
        x_BLD = _layer_norm(cfg, "output_layer_norm")(x_BLD + h_BLD)
        return nn.with_logical_constraint(x_BLD, act_axes)


@flax.struct.dataclass
class EncoderOutput:
    sequence_BLD: jax.Array
    pooled_BD: jax.Array | None
    # With `all_layers=True`: the embedding output then each layer's, (L+1) x (B, L, D).
    hidden_states: tuple[jax.Array, ...] | None = None


class BertModel(nn.Module):
    """The encoder: embeddings, L transformer layers and the [CLS] pooler.

    Fine-tuning models hold this same module under the name `bert`, so the `bert` subtree of
    a pre-training checkpoint drops straight into them.
    """

    config: BertConfig
    add_pooler: bool = True

    def setup(self):
        cfg = self.config
        self.embeddings = Embeddings(cfg)
        self.layers = [TransformerLayer(cfg, name=f"layer_{i}") for i in range(cfg.num_layers)]
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
    ) -> EncoderOutput:
        if position_ids is None:
            position_ids = jnp.broadcast_to(jnp.arange(input_ids.shape[-1]), input_ids.shape)
        x_BLD = self.embeddings(input_ids, segment_ids, position_ids, deterministic)
        x_BLD = nn.with_logical_constraint(x_BLD, ("batch", "length", "embed"))
        hidden = [x_BLD]
        for layer in self.layers:
            x_BLD = layer(x_BLD, input_mask, deterministic)
            hidden.append(x_BLD)
        pooled_BD = jnp.tanh(self.pooler(x_BLD[:, 0])) if self.add_pooler else None
        return EncoderOutput(
            sequence_BLD=x_BLD,
            pooled_BD=pooled_BD,
            hidden_states=tuple(hidden) if all_layers else None,
        )

    def attend(self, x_BPD):
        return self.embeddings.attend(x_BPD)


@flax.struct.dataclass
class PretrainingOutput:
    mlm_logits_BPV: jax.Array
    nsp_logits_B2: jax.Array


class BertForPreTraining(nn.Module):
    """Encoder + masked-LM head (on gathered positions only) + next-sentence head."""

    config: BertConfig

    def setup(self):
        cfg = self.config
        self.bert = BertModel(cfg)
        self.mlm_transform = _dense(cfg, cfg.hidden_size, ("embed", "embed_out"), "mlm_transform")
        self.mlm_layer_norm = _layer_norm(cfg, "mlm_layer_norm")
        self.mlm_output_bias = self.param(
            "mlm_output_bias", _zeros(("vocab",)), (cfg.vocab_size,), cfg.param_dtype
        )
        self.nsp = _dense(cfg, 2, ("embed_out", "classes"), "nsp")

    def mlm_head(self, x_BPD):
        h_BPD = self.mlm_layer_norm(nn.gelu(self.mlm_transform(x_BPD), approximate=False))
        logits_BPV = self.bert.attend(h_BPD) + self.mlm_output_bias.astype(self.config.dtype)
        return nn.with_logical_constraint(logits_BPV, ("batch", "length", "vocab"))

    def __call__(
        self,
        input_ids,
        input_mask,
        segment_ids,
        masked_lm_positions,
        position_ids=None,
        deterministic: bool = True,
    ) -> PretrainingOutput:
        out = self.bert(input_ids, input_mask, segment_ids, position_ids, deterministic)
        # Vocabulary logits only where a prediction is asked for: P is ~15% of L.
        x_BPD = jnp.take_along_axis(out.sequence_BLD, masked_lm_positions[..., None], axis=1)
        return PretrainingOutput(
            mlm_logits_BPV=self.mlm_head(x_BPD),
            nsp_logits_B2=self.nsp(out.pooled_BD),
        )

    def all_position_mlm_logits(self, input_ids, input_mask, segment_ids):
        """Vocabulary logits at every position (B, L, V): for inspection and tests only."""
        out = self.bert(input_ids, input_mask, segment_ids, None, True)
        return self.mlm_head(out.sequence_BLD)


# ------------------------------------------------------------------------------ task heads
#
# Each holds the encoder as `bert`, so a pre-training checkpoint's `bert` subtree restores into
# it, and a freshly initialised head under its own name.


class BertForSequenceClassification(nn.Module):
    """Pooled [CLS] -> dropout -> dense: `num_labels` logits, or one score (regression)."""

    config: BertConfig
    num_labels: int

    def setup(self):
        self.bert = BertModel(self.config)
        self.dropout = nn.Dropout(self.config.hidden_dropout_rate)
        self.classifier = _dense(
            self.config, self.num_labels, ("embed_out", "classes"), "classifier"
        )

    def __call__(self, input_ids, input_mask, segment_ids, deterministic: bool = True):
        out = self.bert(input_ids, input_mask, segment_ids, None, deterministic)
        logits_BC = self.classifier(self.dropout(out.pooled_BD, deterministic=deterministic))
        return logits_BC.astype(jnp.float32)


class BertForTokenClassification(nn.Module):
    """Every position's final hidden state -> dropout -> dense: (B, L, num_labels)."""

    config: BertConfig
    num_labels: int

    def setup(self):
        self.bert = BertModel(self.config, add_pooler=False)
        self.dropout = nn.Dropout(self.config.hidden_dropout_rate)
        self.classifier = _dense(self.config, self.num_labels, ("embed", "classes"), "classifier")

    def __call__(self, input_ids, input_mask, segment_ids, deterministic: bool = True):
        out = self.bert(input_ids, input_mask, segment_ids, None, deterministic)
        x_BLD = self.dropout(out.sequence_BLD, deterministic=deterministic)
        return self.classifier(x_BLD).astype(jnp.float32)


class BertForQuestionAnswering(nn.Module):
    """Every position's final hidden state -> dense 2: start and end logits, (B, L) each."""

    config: BertConfig

    def setup(self):
        self.bert = BertModel(self.config, add_pooler=False)
        self.qa_outputs = _dense(self.config, 2, ("embed", "classes"), "qa_outputs")

    def __call__(self, input_ids, input_mask, segment_ids, deterministic: bool = True):
        out = self.bert(input_ids, input_mask, segment_ids, None, deterministic)
        logits_BL2 = self.qa_outputs(out.sequence_BLD).astype(jnp.float32)
        # Padding can never be an answer boundary.
        logits_BL2 = jnp.where(input_mask[..., None] > 0, logits_BL2, -1e9)
        return logits_BL2[..., 0], logits_BL2[..., 1]
