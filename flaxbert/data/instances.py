"""Next-sentence-prediction instances: the corpus as flat arrays and sentence pairs from it.

`FlatCorpus` holds tokenised documents as three flat arrays, so that a segment is a slice
found by binary search. `draw_pairs` picks, for a whole batch of rows at once, segment A
(consecutive sentences of one document) and segment B (A's true continuation, or with
`next_sentence_labels` 1 a random span of another document), truncated to fit the row as
the original `create_pretraining_data` does; `lay_out_pairs` writes them as
[CLS] A [SEP] B [SEP] [PAD]... rows. The random draws come in from the caller, so every
function here is a pure function of its arguments (numpy only, no JAX).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from flaxbert.config import ConfigError
from flaxbert.tokenizer import CLS_ID, NUM_SPECIAL, PAD_ID, SEP_ID

Document = Sequence[np.ndarray]  # sentences, each an int32 array of token ids


@dataclasses.dataclass(frozen=True)
class InstanceConfig:
    max_seq_length: int = 128
    max_predictions_per_seq: int = 20
    masked_lm_prob: float = 0.15
    short_seq_prob: float = 0.1
    random_next_prob: float = 0.5
    mask_token_prob: float = 0.8  # of the chosen tokens: -> [MASK]
    random_token_prob: float = 0.1  # -> a random token; the rest stay unchanged
    vocab_size: int = 30522  # random replacements are drawn from [NUM_SPECIAL, vocab_size)

    def __post_init__(self):
        def bad(key, why):
            raise ConfigError(f"config key data.{key}={getattr(self, key)!r}: {why}")

        if self.max_seq_length < 8:
            bad("max_seq_length", "must be at least 8")
        if self.max_predictions_per_seq < 1:
            bad("max_predictions_per_seq", "must be at least 1")
        for key in (
            "masked_lm_prob",
            "short_seq_prob",
            "random_next_prob",
            "mask_token_prob",
            "random_token_prob",
        ):
            if not 0.0 <= getattr(self, key) <= 1.0:
                bad(key, "must be a probability in [0, 1]")
        if self.mask_token_prob + self.random_token_prob > 1.0:
            bad("random_token_prob", "data.mask_token_prob + data.random_token_prob must be <= 1")
        if self.vocab_size <= NUM_SPECIAL:
            bad("vocab_size", f"must exceed the {NUM_SPECIAL} special tokens")


class FlatCorpus:
    """Documents as three flat arrays, so pairs are contiguous slices found by binary search.

    `tokens[sentence_starts[k]:sentence_starts[k + 1]]` is sentence k and
    `sentence_starts[doc_starts[d]:doc_starts[d + 1] + 1]` bounds document d's sentences.
    The arrays may be numpy memory maps: nothing is read until a batch needs it.
    """

    def __init__(self, tokens: np.ndarray, sentence_starts: np.ndarray, doc_starts: np.ndarray):
        self.tokens = tokens
        self.sentence_starts = np.asarray(sentence_starts, np.int64)
        self.doc_starts = np.asarray(doc_starts, np.int64)
        self.sentence_doc = np.repeat(
            np.arange(len(self.doc_starts) - 1, dtype=np.int64), np.diff(self.doc_starts)
        )

    @classmethod
    def from_documents(cls, documents: Sequence[Document]) -> FlatCorpus:
        """Flattens documents, leaving out empty sentences and documents with no sentence."""
        sentences, doc_starts = [], [0]
        for d in range(len(documents)):
            kept = [np.asarray(x, np.int32) for x in documents[d] if len(x)]
            if kept:
                sentences += kept
                doc_starts.append(len(sentences))
        lengths = np.array([len(x) for x in sentences], np.int64)
        tokens = np.concatenate(sentences) if sentences else np.zeros(0, np.int32)
        return cls(tokens, np.concatenate([[0], np.cumsum(lengths)]), np.array(doc_starts))

    @property
    def num_documents(self) -> int:
        return len(self.doc_starts) - 1

    @property
    def num_sentences(self) -> int:
        return len(self.sentence_starts) - 1

    def __len__(self) -> int:
        return self.num_documents

    def __getitem__(self, d: int) -> list[np.ndarray]:
        ss = self.sentence_starts
        return [
            self.tokens[ss[k] : ss[k + 1]]
            for k in range(self.doc_starts[d], self.doc_starts[d + 1])
        ]


def _truncated_lengths(la: np.ndarray, lb: np.ndarray, max_tokens: int):
    """Lengths left by the original rule: drop one token from the longer segment (from B on
    a tie) until the pair fits. Closed form of that loop, for whole batches at once."""
    over = la + lb > max_tokens
    la_new = np.minimum(la, np.maximum((max_tokens + 1) // 2, max_tokens - lb))
    la_new = np.where(over, la_new, la)
    lb_new = np.where(over, max_tokens - la_new, lb)
    return la_new, lb_new


@dataclasses.dataclass(frozen=True)
class SentencePairs:
    """Each row's segments as ranges of `FlatCorpus.tokens`: A is
    tokens[a_start:a_start + a_len], B likewise; `is_random` marks a random next B, and
    `a_document` / `b_document` say where the segments come from."""

    a_start: np.ndarray
    a_len: np.ndarray
    b_start: np.ndarray
    b_len: np.ndarray
    is_random: np.ndarray
    a_document: np.ndarray
    b_document: np.ndarray


def draw_pairs(
    corpus: FlatCorpus, d: dict[str, np.ndarray], target: np.ndarray, max_tokens
) -> SentencePairs:
    """Segments A and B of each row from the draws `d` (see `PretrainingBatches`), aiming
    at `target` tokens and cut to at most `max_tokens` (per row or for all) together."""
    ss, sdoc, dstart = corpus.sentence_starts, corpus.sentence_doc, corpus.doc_starts
    # Segment A + true B: consecutive sentences from `start` until `target` tokens are
    # reached (the sentence that crosses it included) or the document ends.
    start = d["start"]
    doc = sdoc[start]
    doc_end = dstart[doc + 1]
    chunk_end = np.searchsorted(ss, ss[start] + target, side="left")
    chunk_end = np.clip(chunk_end, start + 1, doc_end)
    n_chunk = chunk_end - start
    a_end = start + 1 + np.floor(d["split"] * np.maximum(n_chunk - 1, 0)).astype(np.int64)
    a_end = np.minimum(a_end, np.maximum(chunk_end - 1, start + 1))
    is_random = (n_chunk == 1) | d["random_next"]

    # Random B: a sentence drawn uniformly from the sentences of every other document
    # (A's own document's sentences are cut out of the range, so B never comes from it,
    # whatever the corpus's shape). The original recipe draws a document, then a start in
    # it; weighting by sentences keeps one-sentence documents from dominating.
    doc_lo, doc_hi = dstart[doc], dstart[doc + 1]
    k = np.floor(d["other_u"] * (corpus.num_sentences - (doc_hi - doc_lo))).astype(np.int64)
    b_start_rand = k + np.where(k >= doc_lo, doc_hi - doc_lo, 0)
    la_full = ss[a_end] - ss[start]
    need = np.maximum(target - la_full, 1)
    b_end_rand = np.searchsorted(ss, ss[b_start_rand] + need, side="left")
    b_end_rand = np.clip(b_end_rand, b_start_rand + 1, dstart[sdoc[b_start_rand] + 1])

    a0 = ss[start]
    b0 = np.where(is_random, ss[b_start_rand], ss[a_end])
    b1 = np.where(is_random, ss[b_end_rand], ss[chunk_end])
    la, lb = _truncated_lengths(la_full, b1 - b0, max_tokens)
    # Each trimmed token came off the front or the back at random: Binomial(trim, 1/2).
    bits, z = d["trim_bits"], d["trim_normal"]
    a_front = _binomial_half(la_full - la, bits[:, 0], z[:, 0])
    b_front = _binomial_half((b1 - b0) - lb, bits[:, 1], z[:, 1])
    a0, b0 = a0 + a_front, b0 + b_front

    return SentencePairs(
        a_start=a0,
        a_len=la,
        b_start=b0,
        b_len=lb,
        is_random=is_random,
        a_document=doc,
        b_document=sdoc[np.where(is_random, b_start_rand, a_end)],
    )


def lay_out_pairs(corpus: FlatCorpus, pairs: SentencePairs, seq: int):
    """[CLS] A [SEP] B [SEP] [PAD]... rows of `seq` tokens, with one gather from the flat
    token array. Returns (tokens, in_a, in_b, length): the masks mark A's and B's positions
    and `length` counts each row's tokens, [CLS] and [SEP]s included."""
    a0, b0, la, lb = pairs.a_start, pairs.b_start, pairs.a_len, pairs.b_len
    rows = len(la)
    pos = np.arange(seq)[None, :]
    la_, lb_ = la[:, None], lb[:, None]
    in_a = (pos >= 1) & (pos <= la_)
    in_b = (pos >= la_ + 2) & (pos <= la_ + lb_ + 1)
    length = la + lb + 3
    src = np.where(in_a, a0[:, None] + pos - 1, np.where(in_b, b0[:, None] + pos - la_ - 2, 0))
    tokens = np.where(in_a | in_b, corpus.tokens[src], PAD_ID).astype(np.int32)
    tokens[:, 0] = CLS_ID
    tokens[np.arange(rows), la + 1] = SEP_ID
    tokens[np.arange(rows), length - 1] = SEP_ID
    return tokens, in_a, in_b, length


def _binomial_half(n: np.ndarray, bits: np.ndarray, z: np.ndarray) -> np.ndarray:
    """Binomial(n, 1/2) per row: exact from coin flips `bits` while n <= bits.shape[1],
    else the normal approximation from standard normals `z` (excellent at that size)."""
    n = np.asarray(n, np.int64)
    width = bits.shape[1]
    flips = np.concatenate([np.zeros((len(n), 1), np.int64), np.cumsum(bits, axis=1)], axis=1)
    exact = flips[np.arange(len(n)), np.minimum(n, width)]
    approx = np.clip(np.rint(n / 2 + z * np.sqrt(n) / 2), 0, n).astype(np.int64)
    return np.where(n <= width, exact, approx)
