import numpy as np
import pytest

from flaxbert.data.instances import (
    FlatCorpus,
    InstanceConfig,
    _binomial_half,
    _truncated_lengths,
)
from flaxbert.data.pretraining import BATCH_KEYS, PretrainingBatches, prefetch
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


def test_masking_statistics(corpus):
    cfg = InstanceConfig(max_seq_length=128, max_predictions_per_seq=128, vocab_size=VOCAB_SIZE)
    chosen = maskable = 0
    kinds = np.zeros(3)
    for step in range(20):
        b = PretrainingBatches(corpus, cfg, 64, seed=0).batch(step)
        w = b["masked_lm_weights"].astype(bool)
        ids = np.take_along_axis(b["input_ids"], b["masked_lm_positions"], axis=1)[w]
        labels = b["masked_lm_ids"][w]
        kinds += [
            (ids == MASK_ID).sum(),
            ((ids != MASK_ID) & (ids != labels)).sum(),
            (ids == labels).sum(),
        ]
        chosen += w.sum()
        maskable += b["input_mask"].sum() - 3 * len(w)
        specials = (
            np.isin(
                np.take_along_axis(b["input_ids"], b["masked_lm_positions"], 1),
                [CLS_ID, SEP_ID, PAD_ID],
            )
            & w
        )
        assert not specials.any()
    assert abs(chosen / maskable - 0.15 * 128 / 125) < 0.01  # 15% of all tokens, specials too
    # A random replacement may draw the original token (1 in 132): counted as "kept".
    np.testing.assert_allclose(kinds / chosen, [0.8, 0.1, 0.1], atol=0.015)


def test_whole_word_masking_takes_whole_words(corpus):
    # Words: a noun with the function words that follow it ("t0_noun3 , very").
    word_start = np.array(["_noun" in w or w in ("[CLS]", "[SEP]") for w in VOCAB])
    cfg = InstanceConfig(max_seq_length=128, max_predictions_per_seq=20, vocab_size=VOCAB_SIZE)
    batches = PretrainingBatches(
        corpus, cfg, 32, seed=0, word_start=word_start, whole_word_masking=True
    )
    for step in range(5):
        b = batches.batch(step)
        for i in range(32):
            n = b["input_mask"][i].sum()
            seps = np.flatnonzero(b["input_ids"][i, :n] == SEP_ID)
            k = int(b["masked_lm_weights"][i].sum())
            chosen = set(b["masked_lm_positions"][i, :k].tolist())
            assert 0 < k <= min(20, round(n * 0.15))
            # Rebuild the original tokens, cut them into words, check each is all-or-nothing.
            original = b["input_ids"][i, :n].copy()
            original[b["masked_lm_positions"][i, :k]] = b["masked_lm_ids"][i, :k]
            word, words = [], []
            for p in range(1, n):
                if p in (seps[0], n - 1):
                    continue
                if word_start[original[p]] or p in (1, seps[0] + 1):
                    words.append(word)
                    word = []
                word.append(p)
            words.append(word)
            for w in words:
                inside = {p in chosen for p in w}
                assert len(inside) <= 1, (w, chosen)


def test_truncation_matches_the_original_loop():
    rng = np.random.default_rng(0)
    la, lb = rng.integers(1, 300, 2000), rng.integers(1, 300, 2000)
    for t in (13, 125, 509):
        got_a, got_b = _truncated_lengths(la, lb, t)
        for x, y, ga, gb in zip(la, lb, got_a, got_b, strict=True):
            while x + y > t:
                if x > y:
                    x -= 1
                else:
                    y -= 1
            assert (x, y) == (ga, gb)


def test_front_trim_counts_are_binomial():
    rng = np.random.default_rng(0)
    for n in (5, 30, 400):
        k = _binomial_half(
            np.full(20000, n), rng.random((20000, 32)) < 0.5, rng.standard_normal(20000)
        )
        assert k.min() >= 0 and k.max() <= n
        assert abs(k.mean() - n / 2) < 0.05 * np.sqrt(n) + 0.02
        assert abs(k.var() - n / 4) < 0.1 * n / 4


def test_random_next_comes_from_another_document(corpus):
    batches = PretrainingBatches(corpus, INST, 256, seed=0)
    b = batches.batch(0, with_sources=True)
    nsp = b["next_sentence_labels"].astype(bool)
    assert np.all(b["a_document"][nsp] != b["b_document"][nsp])
    assert np.all(b["a_document"][~nsp] == b["b_document"][~nsp])
    # A true continuation really is the text after A (trimming may cut A's tail and B's head).
    flat = batches.corpus
    find = lambda doc, x: [
        s for s in range(len(doc) - len(x) + 1) if np.array_equal(doc[s : s + len(x)], x)
    ]
    for i in np.flatnonzero(~nsp)[:20]:
        n = b["input_mask"][i].sum()
        seps = np.flatnonzero(b["input_ids"][i, :n] == SEP_ID)
        restored = b["input_ids"][i, :n].copy()
        k = int(b["masked_lm_weights"][i].sum())
        restored[b["masked_lm_positions"][i, :k]] = b["masked_lm_ids"][i, :k]
        a, bb = restored[1 : seps[0]], restored[seps[0] + 1 : n - 1]
        doc = np.concatenate(flat[b["a_document"][i]])
        assert any(sb >= sa + len(a) for sa in find(doc, a) for sb in find(doc, bb)), i


def _documents_with_own_tokens(sentences_per_doc, sentence_len, seed=0):
    """Documents whose token ids are disjoint (document d uses only its own ids), so the
    document a token came from can be read off the batch. Returns (documents, doc_of_id)."""
    rng = np.random.default_rng(seed)
    docs, doc_of_id, next_id = [], {}, NUM_SPECIAL
    for d, n in enumerate(sentences_per_doc):
        ids = np.arange(next_id, next_id + 8)
        next_id += 8
        doc_of_id.update({int(i): d for i in ids})
        docs.append([rng.choice(ids, size=sentence_len).astype(np.int32) for _ in range(n)])
    return docs, doc_of_id, next_id


def _pairs_with_documents(batch, doc_of_id):
    """(label, documents of A, documents of B) for every pair of every row, read from the
    original tokens (masked positions restored), packed rows (pairs numbered in input_mask)
    included."""
    ids = batch["input_ids"].copy()
    rows = np.arange(len(ids))[:, None]
    w = batch["masked_lm_weights"] > 0
    ids[np.broadcast_to(rows, w.shape)[w], batch["masked_lm_positions"][w]] = batch[
        "masked_lm_ids"
    ][w]
    labels = batch["next_sentence_labels"]
    out = []
    for i in range(len(ids)):
        for k in range(1, batch["input_mask"][i].max() + 1):
            pair = batch["input_mask"][i] == k
            label = labels[i, k - 1] if labels.ndim == 2 else labels[i]
            docs_of = lambda seg, i=i, pair=pair: {
                doc_of_id[int(t)]
                for t in ids[i][pair & (batch["segment_ids"][i] == seg)]
                if int(t) in doc_of_id
            }
            out.append((int(label), docs_of(0), docs_of(1)))
    return out


@pytest.mark.parametrize(
    "shape",
    [
        [20, 1],  # a dominant document beside a one-sentence one (the reported corpus)
        [1, 20],
        [200, 1, 1],
        [1, 1],
        [3, 50, 2, 7, 1, 1, 30],
    ],
)
@pytest.mark.parametrize("mode", ["dynamic", "static", "packed"])
def test_random_next_never_comes_from_a_documents_own_document(shape, mode):
    docs, doc_of_id, vocab = _documents_with_own_tokens(shape, sentence_len=6)
    inst = InstanceConfig(max_seq_length=32, max_predictions_per_seq=5, vocab_size=vocab)
    kw = {"static": dict(masking="static"), "packed": dict(packing=True)}.get(mode, {})
    batches = PretrainingBatches(docs, inst, 64, seed=0, **kw)
    counts = {0: 0, 1: 0}
    for step in range(10):
        for label, a_docs, b_docs in _pairs_with_documents(batches.batch(step), doc_of_id):
            assert len(a_docs) == 1 and len(b_docs) == 1, (step, a_docs, b_docs)
            if label == 1:
                assert a_docs.isdisjoint(b_docs), (step, a_docs, b_docs)
            else:
                assert a_docs == b_docs, (step, a_docs, b_docs)
            counts[label] += 1
    assert counts[1] > 0
    if max(shape) > 1:  # a true continuation needs a document of 2 or more sentences
        assert counts[0] > 0


def test_random_next_on_the_reported_corpus():
    # The input: 20 sentences of 6 tokens beside 1 sentence of 3 tokens; 400 of 709
    # label-1 pairs took B from A's document before the fix.
    docs = [[np.arange(5, 11, dtype=np.int32)] * 20, [np.arange(11, 14, dtype=np.int32)]]
    inst = InstanceConfig(max_seq_length=32, max_predictions_per_seq=5, vocab_size=16)
    batches = PretrainingBatches(docs, inst, 64, seed=0)
    random_next = 0
    for step in range(20):
        b = batches.batch(step, with_sources=True)
        nsp = b["next_sentence_labels"] == 1
        assert np.all(b["a_document"][nsp] != b["b_document"][nsp]), step
        random_next += int(nsp.sum())
    assert random_next > 500


def test_random_next_is_spread_over_the_other_documents():
    # B of a label-1 pair is a sentence drawn uniformly from every other document's
    # sentences: with A in document 0, B's document follows the other documents' sizes.
    docs, doc_of_id, vocab = _documents_with_own_tokens([40, 10, 30], sentence_len=6)
    inst = InstanceConfig(max_seq_length=32, max_predictions_per_seq=5, vocab_size=vocab)
    batches = PretrainingBatches(docs, inst, 256, seed=0)
    seen = []
    for step in range(20):
        for label, a_docs, b_docs in _pairs_with_documents(batches.batch(step), doc_of_id):
            if label == 1 and a_docs == {0}:
                seen.append(b_docs.pop())
    share_of_2 = np.mean(np.array(seen) == 2)
    assert len(seen) > 500 and abs(share_of_2 - 30 / 40) < 0.05, (len(seen), share_of_2)


@pytest.mark.parametrize("docs", [[[np.arange(5, 11)] * 4], [[np.arange(5, 11)] * 4, [], []]])
def test_a_split_with_one_document_is_refused(docs):
    inst = InstanceConfig(max_seq_length=32, max_predictions_per_seq=5, vocab_size=16)
    with pytest.raises(ValueError, match=r"held-out split holds 1 non-empty document.*at least 2"):
        PretrainingBatches(docs, inst, 8, seed=0, split="held-out split")


def test_flat_corpus_round_trip_skips_empty(corpus):
    docs = [corpus[0], [], [np.zeros(0, np.int32)], corpus[1]]
    flat = FlatCorpus.from_documents(docs)
    assert flat.num_documents == 2
    for got, want in zip(flat[1], corpus[1], strict=True):
        np.testing.assert_array_equal(got, want)


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


def test_static_masking_repeats_instances(corpus):
    cfg = InstanceConfig(max_seq_length=64, max_predictions_per_seq=10, vocab_size=VOCAB_SIZE)
    batches = PretrainingBatches(corpus, cfg, 8, seed=0, masking="static", dupe_factor=2)
    n = batches.num_static
    assert n == 2 * -(-len(batches.corpus.tokens) // 61)
    seen = {}
    steps = (n // 8) + 3  # a little over one pass over the fixed instances
    for step in range(steps):
        b = batches.batch(step)
        for i in range(8):
            key = b["input_ids"][i].tobytes()
            seen[key] = seen.get(key, 0) + 1
    # Past one pass, rows repeat exactly (same pair, same mask); before it, they do not.
    assert sum(seen.values()) == steps * 8
    assert len(seen) <= n and max(seen.values()) >= 2
    # Hosts still split the global batch exactly.
    parts = [
        PretrainingBatches(
            corpus,
            cfg,
            8,
            seed=0,
            masking="static",
            dupe_factor=2,
            process_index=h,
            process_count=2,
        ).batch(5)
        for h in range(2)
    ]
    whole = batches.batch(5)
    for key in BATCH_KEYS:
        np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), whole[key])


def test_resuming_at_a_step_gives_the_uninterrupted_batches(corpus):
    batches = PretrainingBatches(corpus, INST, 8, seed=0)
    straight = dict(prefetch(batches.batch, range(0, 12)))
    # A fresh loader (as after a restart) started at step 7 needs nothing but 7.
    resumed = dict(prefetch(PretrainingBatches(corpus, INST, 8, seed=0).batch, range(7, 12)))
    for step in range(7, 12):
        for key in BATCH_KEYS:
            np.testing.assert_array_equal(resumed[step][key], straight[step][key])
