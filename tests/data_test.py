import numpy as np
import pytest

from flaxbert.data.pretraining import (
    BATCH_KEYS,
    InstanceConfig,
    PretrainingBatches,
    mask_tokens,
    prefetch,
)
from flaxbert.data.synthetic import VOCAB, VOCAB_SIZE, SyntheticCorpus
from flaxbert.tokenizer import CLS_ID, MASK_ID, NUM_SPECIAL, PAD_ID, SEP_ID

INST = InstanceConfig(max_seq_length=64, max_predictions_per_seq=10, vocab_size=VOCAB_SIZE)


@pytest.fixture(scope="module")
def corpus():
    return SyntheticCorpus(200, seed=0)


def test_synthetic_corpus_is_deterministic_and_structured(corpus):
    again = SyntheticCorpus(200, seed=0)
    other = SyntheticCorpus(200, seed=1)
    assert all(np.array_equal(a, b) for a, b in zip(corpus[5], again[5], strict=True))
    assert not all(
        len(a) == len(b) and np.array_equal(a, b) for a, b in zip(corpus[5], other[5], strict=False)
    )
    ids = np.concatenate([s for doc in corpus.documents for s in doc])
    assert ids.min() >= NUM_SPECIAL and ids.max() < VOCAB_SIZE
    # Sentences chain: the last noun of a sentence is the first noun of the next one.
    nouns = lambda s: [VOCAB[i] for i in s if "_noun" in VOCAB[i]]
    for doc in corpus.documents[:20]:
        for prev, nxt in zip(doc, doc[1:], strict=False):
            assert nouns(prev)[-1] == nouns(nxt)[0]


def test_batch_layout_and_special_tokens(corpus):
    batch = PretrainingBatches(corpus, INST, 16, seed=0).batch(3)
    assert set(batch) == set(BATCH_KEYS)
    ids, mask, seg = batch["input_ids"], batch["input_mask"], batch["segment_ids"]
    assert ids.shape == (16, 64) and batch["masked_lm_positions"].shape == (16, 10)
    for i in range(16):
        n = mask[i].sum()
        assert np.all(mask[i, :n] == 1) and np.all(ids[i, n:] == PAD_ID)
        assert ids[i, 0] == CLS_ID and ids[i, n - 1] == SEP_ID
        seps = np.flatnonzero(ids[i, :n] == SEP_ID)
        assert len(seps) == 2
        assert np.all(seg[i, : seps[0] + 1] == 0) and np.all(seg[i, seps[0] + 1 : n] == 1)
        k = int(batch["masked_lm_weights"][i].sum())
        assert k == min(10, max(1, round(n * 0.15)))
        positions = batch["masked_lm_positions"][i, :k]
        assert np.all(np.diff(positions) > 0) and np.all(positions < n)
        assert not np.isin(positions, [0, seps[0], seps[1]]).any()  # never CLS or SEP
        assert np.all(batch["masked_lm_ids"][i, :k] >= NUM_SPECIAL)


def test_masking_statistics():
    cfg = InstanceConfig(max_seq_length=512, max_predictions_per_seq=512, vocab_size=1000)
    rng = np.random.default_rng(0)
    tokens = rng.integers(NUM_SPECIAL, 1000, size=400).astype(np.int32)
    maskable = np.ones(400, bool)
    maskable[:5] = False
    chosen, kinds = 0, np.zeros(3)
    for _ in range(300):
        out, positions, labels = mask_tokens(tokens, maskable, rng, cfg)
        assert len(positions) == 60 and not np.isin(positions, np.arange(5)).any()
        np.testing.assert_array_equal(labels, tokens[positions])
        chosen += len(positions)
        kinds += [
            (out[positions] == MASK_ID).sum(),
            ((out[positions] != MASK_ID) & (out[positions] != labels)).sum(),
            (out[positions] == labels).sum(),
        ]
        untouched = np.setdiff1d(np.arange(400), positions)
        np.testing.assert_array_equal(out[untouched], tokens[untouched])
    frac = kinds / chosen
    # A random replacement can draw the original token (1 in 995): counted as "kept".
    np.testing.assert_allclose(frac, [0.8, 0.1, 0.1], atol=0.015)


def test_nsp_labels_are_balanced(corpus):
    labels = np.concatenate(
        [
            PretrainingBatches(corpus, INST, 64, seed=0).batch(s)["next_sentence_labels"]
            for s in range(10)
        ]
    )
    assert abs(labels.mean() - 0.5) < 0.06


def test_batches_are_a_pure_function_of_seed_and_step(corpus):
    a = PretrainingBatches(corpus, INST, 8, seed=0)
    b = PretrainingBatches(corpus, INST, 8, seed=0)
    for step in (0, 17, 5):
        for key in BATCH_KEYS:
            np.testing.assert_array_equal(a.batch(step)[key], b.batch(step)[key])
    c = PretrainingBatches(corpus, INST, 8, seed=1)
    assert not np.array_equal(a.batch(0)["input_ids"], c.batch(0)["input_ids"])
    assert not np.array_equal(a.batch(0)["input_ids"], a.batch(1)["input_ids"])


def test_hosts_split_the_global_batch(corpus):
    whole = PretrainingBatches(corpus, INST, 8, seed=0).batch(4)
    parts = [
        PretrainingBatches(corpus, INST, 8, seed=0, process_index=h, process_count=2).batch(4)
        for h in range(2)
    ]
    for key in BATCH_KEYS:
        np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), whole[key])
    with pytest.raises(ValueError, match="not divisible"):
        PretrainingBatches(corpus, INST, 9, seed=0, process_count=2)


def test_prefetch_keeps_order_and_raises_errors():
    assert [s for s, _ in prefetch(lambda s: s * 2, range(5, 12), 2)] == list(range(5, 12))

    def broken(step):
        if step == 3:
            raise RuntimeError("bad step 3")
        return step

    with pytest.raises(RuntimeError, match="bad step 3"):
        list(prefetch(broken, range(10)))


def test_instance_config_errors_name_the_key():
    with pytest.raises(ValueError, match="data.masked_lm_prob"):
        InstanceConfig(masked_lm_prob=1.5)
    with pytest.raises(ValueError, match="data.random_token_prob"):
        InstanceConfig(mask_token_prob=0.8, random_token_prob=0.3)
