"""BERT pre-training: the encoder with its masked-LM and next-sentence heads, and which of
those heads a parameter tree holds.

`BertForPreTraining` is the model `flaxbert pretrain` fits and a pre-training checkpoint holds
(its `params` collection: `bert` the encoder of `flaxbert.model`, `mlm_*` and `nsp` the heads).
Its heads are optional so that every layout a transformers import gives (BertForPreTraining,
BertForMaskedLM, BertModel) runs; `heads_of` reads which a tree has. Shape suffixes as in
`flaxbert.model`: B batch, L sequence length, D hidden size, K pairs of a packed row, P
masked-LM predictions per sequence, V vocabulary.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from flaxbert.model import BertModel, _dense, _layer_norm, _zeros
from flaxbert.model_config import BertConfig


@flax.struct.dataclass
class PretrainingOutput:
    mlm_logits_BPV: jax.Array | None  # None for a model without the MLM head
    nsp_logits_B2: jax.Array | None  # (B, K, 2) for packed rows; None without the NSP head


HEADS = ("pooler", "mlm", "nsp")  # the optional parts of a pre-training parameter tree
_MLM_PARAMS = ("mlm_transform", "mlm_layer_norm", "mlm_output_bias")


def heads_of(params: Mapping[str, Any]) -> tuple[str, ...]:
    """Which of 'pooler', 'mlm', 'nsp' a pre-training parameter tree (the `params`
    collection, layers stacked or not) holds, in that order. A checkpoint converted from a
    transformers BertForMaskedLM has ('mlm',), a BertModel ('pooler',) or ()."""
    present = {
        "pooler": "pooler" in params.get("bert", {}),
        "mlm": all(k in params for k in _MLM_PARAMS),
        "nsp": "nsp" in params,
    }
    return tuple(h for h in HEADS if present[h])


class BertForPreTraining(nn.Module):
    """Encoder + masked-LM head (on gathered positions only) + next-sentence head.

    The heads are optional so that every layout a HuggingFace import gives runs: `add_pooler`
    False is a BertForMaskedLM checkpoint (no pooler, hence no NSP head), `add_mlm` and
    `add_nsp` False a bare BertModel. `BertForPreTraining.for_params(config, params)` builds
    the model that fits a parameter tree. A head the parameters lack but the model expects
    is refused with a ValueError that says so (not Flax's ScopeParamNotFoundError).
    """

    config: BertConfig
    add_pooler: bool = True
    add_mlm: bool = True
    add_nsp: bool = True

    @classmethod
    def for_params(cls, config: BertConfig, params: Mapping[str, Any]) -> BertForPreTraining:
        """The model whose heads are those of `params` (see `heads_of`)."""
        heads = heads_of(params)
        return cls(
            config,
            add_pooler="pooler" in heads,
            add_mlm="mlm" in heads,
            add_nsp="nsp" in heads,
        )

    def setup(self):
        cfg = self.config
        if self.add_nsp and not self.add_pooler:
            raise ValueError(
                "BertForPreTraining(add_nsp=True, add_pooler=False): the NSP head reads the "
                "pooled [CLS] vector; give add_nsp=False or add_pooler=True"
            )
        self.bert = BertModel(cfg, add_pooler=self.add_pooler)
        if self.add_mlm:
            self.mlm_transform = _dense(
                cfg, cfg.hidden_size, ("embed", "embed_out"), "mlm_transform"
            )
            self.mlm_layer_norm = _layer_norm(cfg, "mlm_layer_norm")
            # A parameter (unlike a submodule) is looked up here, in setup: parameters without
            # it reach `_require`, which says what is missing, instead of failing here.
            if self.is_initializing() or self.has_variable("params", "mlm_output_bias"):
                self.mlm_output_bias = self.param(
                    "mlm_output_bias", _zeros(("vocab",)), (cfg.vocab_size,), cfg.param_dtype
                )
        if self.add_nsp:
            self.nsp = _dense(cfg, 2, ("embed_out", "classes"), "nsp")

    def _require(self, wanted: tuple[str, ...]) -> None:
        """A clear error for a head the model expects but the parameters do not hold."""
        if self.is_initializing() or not self.scope.has_variable("params", "bert"):
            return
        params = self.scope.variables()["params"]
        missing = [h for h in wanted if h not in heads_of(params)]
        if missing:
            raise ValueError(
                f"the parameters have no {' / '.join(missing)} head (they hold "
                f"{', '.join(heads_of(params)) or 'the encoder only'}, as a checkpoint "
                "converted from a transformers BertForMaskedLM or BertModel does). Build the "
                "model that fits them: BertForPreTraining.for_params(config, params)"
            )

    def mlm_head(self, x_BPD):
        """Vocabulary logits (B, P, V) of final hidden states `x_BPD` (B, P, D)."""
        if not self.add_mlm:
            raise ValueError(
                "this BertForPreTraining has no MLM head (add_mlm=False: the checkpoint holds "
                "an encoder only, e.g. a transformers BertModel); MLM logits need one"
            )
        self._require(("mlm",))
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
        cls_positions=None,
    ) -> PretrainingOutput:
        """MLM logits (B, P, V) at `masked_lm_positions` (B, P) and NSP logits (B, 2) of
        `input_ids`, `input_mask`, `segment_ids` (B, L); a head the model lacks gives None.
        Packed rows (`cls_positions` (B, K) given) give NSP logits (B, K, 2)."""
        self._require(tuple(h for h, on in zip(HEADS, self._heads(), strict=True) if on))
        out = self.bert(
            input_ids,
            input_mask,
            segment_ids,
            position_ids,
            deterministic,
            cls_positions=cls_positions,
            pool=self.add_pooler,
        )
        mlm_logits_BPV = None
        if self.add_mlm:
            # Vocabulary logits only where a prediction is asked for: P is ~15% of L.
            x_BPD = jnp.take_along_axis(out.sequence_BLD, masked_lm_positions[..., None], axis=1)
            mlm_logits_BPV = self.mlm_head(x_BPD)
        return PretrainingOutput(
            mlm_logits_BPV=mlm_logits_BPV,
            nsp_logits_B2=self.nsp(out.pooled_BD) if self.add_nsp else None,
        )

    def _heads(self) -> tuple[bool, bool, bool]:
        return (self.add_pooler, self.add_mlm, self.add_nsp)

    def all_position_mlm_logits(self, input_ids, input_mask, segment_ids):
        """Vocabulary logits at every position (B, L, V) of `input_ids`, `input_mask`,
        `segment_ids` (B, L): for inspection and tests. Needs the MLM head only (no pooler,
        no NSP head), so it runs on a converted BertForMaskedLM as it is."""
        out = self.bert(input_ids, input_mask, segment_ids, None, True, pool=False)
        return self.mlm_head(out.sequence_BLD)
