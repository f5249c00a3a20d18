"""Pre-training instances made on the fly: NSP sentence pairs plus dynamic MLM masking.

This follows the recipe of the original `create_pretraining_data`, but draws every instance
at random access instead of writing them out: the example in row i of the global batch at
step s is a pure function of (seed, s, i). So a run resumed at step s needs only s, and each
host can build just its own rows, whose union over hosts is the single-host batch.

No JAX here: numpy only, so the loader runs on host threads beside the device work.
"""

from __future__ import annotations

import dataclasses
import queue
import threading
from collections.abc import Iterator, Sequence

import numpy as np

from flaxbert.tokenizer import CLS_ID, MASK_ID, NUM_SPECIAL, PAD_ID, SEP_ID

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
            raise ValueError(f"config key data.{key}={getattr(self, key)!r}: {why}")

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


class InstanceMaker:
    """Makes one masked sentence-pair instance per call from a random-access document list."""

    def __init__(self, documents: Sequence[Document], config: InstanceConfig):
        self.documents = documents
        self.config = config
        lengths = np.array([len(documents[d]) for d in range(len(documents))], dtype=np.int64)
        if lengths.sum() == 0:
            raise ValueError("the corpus holds no sentences: nothing to pre-train on")
        if np.count_nonzero(lengths) < 2:
            raise ValueError("the corpus needs at least 2 non-empty documents for NSP pairs")
        # A chunk starts at a sentence drawn uniformly over the corpus: long documents
        # contribute in proportion to their text, as in the original sequential recipe.
        self._doc_starts = np.concatenate([[0], np.cumsum(lengths)])
        self._num_sentences = int(self._doc_starts[-1])

    def _random_sentence(self, rng: np.random.Generator) -> tuple[int, int]:
        s = int(rng.integers(self._num_sentences))
        doc = int(np.searchsorted(self._doc_starts, s, side="right") - 1)
        return doc, s - int(self._doc_starts[doc])

    def pair(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, int]:
        """Returns (tokens_a, tokens_b, is_random_next) fitting max_seq_length - 3 together."""
        cfg = self.config
        max_tokens = cfg.max_seq_length - 3
        target = max_tokens
        if rng.random() < cfg.short_seq_prob:
            target = int(rng.integers(2, max_tokens + 1))

        doc_id, start = self._random_sentence(rng)
        doc = self.documents[doc_id]
        chunk, length = [], 0
        for sentence in doc[start:]:
            chunk.append(sentence)
            length += len(sentence)
            if length >= target:
                break
        a_end = int(rng.integers(1, len(chunk))) if len(chunk) >= 2 else 1
        tokens_a = np.concatenate(chunk[:a_end])

        if len(chunk) == 1 or rng.random() < cfg.random_next_prob:
            is_random = 1
            for _ in range(10):  # as the original: a few tries to land in another document
                other_id, other_start = self._random_sentence(rng)
                if other_id != doc_id:
                    break
            other, pieces, need = self.documents[other_id], [], max(1, target - len(tokens_a))
            for sentence in other[other_start:]:
                pieces.append(sentence)
                need -= len(sentence)
                if need <= 0:
                    break
            tokens_b = np.concatenate(pieces)
        else:
            is_random = 0
            tokens_b = np.concatenate(chunk[a_end:])
        tokens_a, tokens_b = _truncate_pair(tokens_a, tokens_b, max_tokens, rng)
        return tokens_a, tokens_b, is_random


def _truncate_pair(a: np.ndarray, b: np.ndarray, max_tokens: int, rng: np.random.Generator):
    """Trims the longer segment one token at a time, from its front or back at random."""
    a_lo, a_hi, b_lo, b_hi = 0, len(a), 0, len(b)
    while (a_hi - a_lo) + (b_hi - b_lo) > max_tokens:
        front = rng.random() < 0.5
        if (a_hi - a_lo) > (b_hi - b_lo):
            a_lo, a_hi = (a_lo + 1, a_hi) if front else (a_lo, a_hi - 1)
        else:
            b_lo, b_hi = (b_lo + 1, b_hi) if front else (b_lo, b_hi - 1)
    return a[a_lo:a_hi], b[b_lo:b_hi]


def mask_tokens(
    tokens: np.ndarray, maskable: np.ndarray, rng: np.random.Generator, config: InstanceConfig
):
    """Dynamic BERT masking: choose ~masked_lm_prob of the maskable positions (at most
    max_predictions_per_seq), replace 80% with [MASK], 10% with a random token, keep 10%.

    Returns (input_ids, positions, labels): positions sorted ascending.
    """
    candidates = np.flatnonzero(maskable)
    num = min(
        config.max_predictions_per_seq,
        max(1, int(round(len(tokens) * config.masked_lm_prob))),
        len(candidates),
    )
    positions = np.sort(rng.permutation(candidates)[:num])
    labels = tokens[positions]
    out = tokens.copy()
    r = rng.random(num)
    to_mask = r < config.mask_token_prob
    to_random = (r >= config.mask_token_prob) & (
        r < config.mask_token_prob + config.random_token_prob
    )
    out[positions[to_mask]] = MASK_ID
    out[positions[to_random]] = rng.integers(
        NUM_SPECIAL, config.vocab_size, size=int(to_random.sum())
    )
    return out, positions, labels


BATCH_KEYS = (
    "input_ids",
    "input_mask",
    "segment_ids",
    "masked_lm_positions",
    "masked_lm_ids",
    "masked_lm_weights",
    "next_sentence_labels",
)


class PretrainingBatches:
    """The pre-training batch at any step, as a pure function of (seed, step).

    `batch(step)` gives this host's rows of the global batch: host h of n owns rows
    [h*B/n, (h+1)*B/n). Feature names are the original BERT ones.
    """

    def __init__(
        self,
        documents: Sequence[Document],
        config: InstanceConfig,
        global_batch_size: int,
        seed: int,
        process_index: int = 0,
        process_count: int = 1,
    ):
        if global_batch_size % process_count:
            raise ValueError(
                f"global batch size {global_batch_size} is not divisible by the "
                f"{process_count} processes"
            )
        self.maker = InstanceMaker(documents, config)
        self.config = config
        self.seed = seed
        self.local_batch_size = global_batch_size // process_count
        self.first_row = process_index * self.local_batch_size

    def example(self, step: int, row: int) -> dict[str, np.ndarray]:
        cfg = self.config
        rng = np.random.default_rng([self.seed, step, row])
        tokens_a, tokens_b, is_random = self.maker.pair(rng)
        la, lb = len(tokens_a), len(tokens_b)
        n = la + lb + 3
        tokens = np.empty(n, np.int32)
        tokens[0], tokens[la + 1], tokens[n - 1] = CLS_ID, SEP_ID, SEP_ID
        tokens[1 : la + 1], tokens[la + 2 : n - 1] = tokens_a, tokens_b
        maskable = np.ones(n, bool)
        maskable[[0, la + 1, n - 1]] = False
        input_ids, positions, labels = mask_tokens(tokens, maskable, rng, cfg)
        return dict(
            input_ids=input_ids,
            length=n,
            len_a=la,
            positions=positions,
            labels=labels,
            is_random=is_random,
        )

    def batch(self, step: int) -> dict[str, np.ndarray]:
        cfg = self.config
        b, seq, p = self.local_batch_size, cfg.max_seq_length, cfg.max_predictions_per_seq
        out = {
            "input_ids": np.full((b, seq), PAD_ID, np.int32),
            "input_mask": np.zeros((b, seq), np.int32),
            "segment_ids": np.zeros((b, seq), np.int32),
            "masked_lm_positions": np.zeros((b, p), np.int32),
            "masked_lm_ids": np.zeros((b, p), np.int32),
            "masked_lm_weights": np.zeros((b, p), np.float32),
            "next_sentence_labels": np.zeros((b,), np.int32),
        }
        for i in range(b):
            ex = self.example(step, self.first_row + i)
            n, k = ex["length"], len(ex["positions"])
            out["input_ids"][i, :n] = ex["input_ids"]
            out["input_mask"][i, :n] = 1
            out["segment_ids"][i, ex["len_a"] + 2 : n] = 1
            out["masked_lm_positions"][i, :k] = ex["positions"]
            out["masked_lm_ids"][i, :k] = ex["labels"]
            out["masked_lm_weights"][i, :k] = 1.0
            out["next_sentence_labels"][i] = ex["is_random"]
        return out


def prefetch(make_batch, steps: range, buffer_size: int = 4) -> Iterator[tuple[int, dict]]:
    """Yields (step, make_batch(step)) for each step, built ahead on a background thread."""
    q: queue.Queue = queue.Queue(maxsize=max(1, buffer_size))
    stop = threading.Event()
    done = object()

    def put(item) -> bool:
        while not stop.is_set():  # the consumer may leave early: never block forever
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work():
        try:
            for step in steps:
                if not put((step, make_batch(step))):
                    return
            put(done)
        except BaseException as e:  # hand the error to the consumer, which re-raises it
            put(e)

    thread = threading.Thread(target=work, daemon=True, name="flaxbert-prefetch")
    thread.start()
    try:
        while True:
            item = q.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
