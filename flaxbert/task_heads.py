"""Fine-tuning task heads on the BERT encoder: sequence classification (or regression),
token classification and extractive question answering.

Each holds the encoder (`flaxbert.model.BertModel`) as `bert`, so a pre-training checkpoint's
`bert` subtree restores into it, and a freshly initialised head under its own name
(`classifier`, `qa_outputs`). Shape suffixes as in `flaxbert.model`: B batch, L sequence
length, D hidden size, K pairs of a packed row, C classes.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from flaxbert.dropout import Dropout
from flaxbert.model import BertModel, _dense
from flaxbert.model_config import BertConfig


class BertForSequenceClassification(nn.Module):
    """Pooled [CLS] -> dropout -> dense: `num_labels` logits, or one score (regression)."""

    config: BertConfig
    num_labels: int

    def setup(self):
        self.bert = BertModel(self.config)
        self.dropout = Dropout(self.config.hidden_dropout_rate)
        self.classifier = _dense(
            self.config, self.num_labels, ("embed_out", "classes"), "classifier"
        )

    def __call__(
        self,
        input_ids,
        input_mask,
        segment_ids,
        deterministic: bool = True,
        position_ids=None,
        cls_positions=None,
    ):
        """(B, C) logits, or (B, K, C) for packed rows (`cls_positions` (B, K) given)."""
        out = self.bert(
            input_ids,
            input_mask,
            segment_ids,
            position_ids,
            deterministic,
            cls_positions=cls_positions,
        )
        logits_BC = self.classifier(self.dropout(out.pooled_BD, deterministic=deterministic))
        return logits_BC.astype(jnp.float32)


class BertForTokenClassification(nn.Module):
    """Every position's final hidden state -> dropout -> dense: (B, L, num_labels)."""

    config: BertConfig
    num_labels: int

    def setup(self):
        self.bert = BertModel(self.config, add_pooler=False)
        self.dropout = Dropout(self.config.hidden_dropout_rate)
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
