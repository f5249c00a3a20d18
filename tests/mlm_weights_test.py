"""The masked-LM loss counts only real predictions: `masked_lm_weights` 0 marks padding slots,
whose positions and labels must change nothing."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from flaxbert import pretrain_step
from flaxbert.data.pretraining import InstanceConfig, PretrainingBatches
from flaxbert.data.synthetic import VOCAB_SIZE, SyntheticCorpus
from flaxbert.model_config import BertConfig
from flaxbert.pretraining_model import BertForPreTraining

pytestmark = pytest.mark.usefixtures("fast_compiles")

SEQ, PRED = 32, 5


def test_mlm_loss_ignores_slots_of_weight_zero():
    model = BertForPreTraining(
        BertConfig(
            vocab_size=VOCAB_SIZE, hidden_size=32, num_layers=1, num_heads=2,
            intermediate_size=64, max_position_embeddings=SEQ,
        )
    )  # fmt: skip
    params = pretrain_step.init_params(model, jax.random.key(0), SEQ, PRED)
    inst = InstanceConfig(max_seq_length=SEQ, max_predictions_per_seq=PRED, vocab_size=VOCAB_SIZE)
    batch = PretrainingBatches(SyntheticCorpus(30, seed=2), inst, 8, seed=0).batch(0)
    weights = batch["masked_lm_weights"].copy()
    weights[:, -2:] = 0.0  # the last two slots of every row become padding
    batch = {**batch, "masked_lm_weights": weights}
    # Padding slots hold arbitrary labels: other labels there must not move anything.
    other = {**batch, "masked_lm_ids": batch["masked_lm_ids"].copy()}
    other["masked_lm_ids"][:, -2:] = (other["masked_lm_ids"][:, -2:] + 7) % VOCAB_SIZE
    sums = jax.jit(lambda b: pretrain_step.pretraining_sums(model, params, b, True))

    s, t = sums(batch), sums(other)
    out = pretrain_step.apply_model(model, params, batch, True)
    nll = optax.softmax_cross_entropy_with_integer_labels(
        out.mlm_logits_BPV.astype(jnp.float32), batch["masked_lm_ids"]
    )
    real = weights > 0
    assert float(s["mlm_count"]) == real.sum() < weights.size
    np.testing.assert_allclose(s["mlm_loss_sum"], np.asarray(nll)[real].sum(), rtol=1e-5)
    for key in ("mlm_loss_sum", "mlm_correct", "mlm_count"):
        assert float(s[key]) == float(t[key]), key
