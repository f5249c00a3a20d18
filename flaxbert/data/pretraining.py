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

from flaxbert.config import ConfigError
from flaxbert.data.text_io import CorpusError
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
    [h*B/n, (h+1)*B/n). Feature names are the original BERT ones. All rows of a batch are
    built together with array operations (no per-example Python), which keeps one CPU core
    far ahead of an accelerator.

    `word_start[id]` (optional) marks the vocabulary pieces that begin a word; with
    `whole_word_masking` the chosen positions are then whole words.

    A "random next" segment B (`next_sentence_labels` 1) always comes from a document other
    than A's, whatever the corpus's shape; `split` names the corpus in errors.

    Raises:
      ValueError: a batch the processes cannot split evenly.
      CorpusError: a corpus (or split) with fewer than 2 non-empty documents (B could not
        come from another document).
      ConfigError: a bad masking/packing option, naming its `data.*` config key.
    """

    def __init__(
        self,
        documents,
        config: InstanceConfig,
        global_batch_size: int,
        seed: int,
        process_index: int = 0,
        process_count: int = 1,
        word_start: np.ndarray | None = None,
        whole_word_masking: bool = False,
        masking: str = "dynamic",
        dupe_factor: int = 10,
        packing: bool = False,
        max_pairs_per_row: int = 4,
        split: str = "corpus",
    ):
        if global_batch_size % process_count:
            raise ValueError(
                f"global batch size {global_batch_size} is not divisible by the "
                f"{process_count} processes"
            )
        corpus = (
            documents if isinstance(documents, FlatCorpus) else FlatCorpus.from_documents(documents)
        )
        if corpus.num_sentences == 0:
            raise CorpusError(f"the {split} holds no sentences: nothing to pre-train on")
        nonempty = int(np.count_nonzero(np.diff(corpus.doc_starts)))
        if nonempty < 2:
            raise CorpusError(
                f"the {split} holds {nonempty} non-empty document(s): next-sentence pairs "
                'need at least 2, because a "random next" segment B must come from a '
                "document other than A's. Give a corpus with more documents (a blank line "
                "separates documents in a text corpus)"
            )
        if whole_word_masking and word_start is None:
            raise ValueError("whole-word masking needs the tokenizer's word_start table")
        if masking not in ("dynamic", "static"):
            raise ConfigError(f"config key data.masking={masking!r}: choose dynamic or static")
        if dupe_factor < 1:
            raise ConfigError(f"config key data.dupe_factor={dupe_factor!r}: must be >= 1")
        if packing and masking != "dynamic":
            raise ConfigError(
                "config key data.packing=True needs data.masking=dynamic (static masking fixes "
                "each instance's length, so rows cannot be filled to the brim)"
            )
        if packing and max_pairs_per_row < 1:
            raise ConfigError(
                f"config key data.max_pairs_per_row={max_pairs_per_row!r}: must be >= 1"
            )
        self.corpus = corpus
        self.config = config
        self.seed = seed
        self.global_batch_size = global_batch_size
        self.local_batch_size = global_batch_size // process_count
        self.first_row = process_index * self.local_batch_size
        self.word_start = None if word_start is None else np.asarray(word_start, bool)
        self.whole_word_masking = whole_word_masking
        self.masking = masking
        self.packing = packing
        self.max_pairs_per_row = max_pairs_per_row
        # Static masking, as the original recipe: a fixed set of dupe_factor x (one pass over
        # the corpus) instances, each with its mask drawn once, visited in a fixed shuffled
        # order (an affine permutation of the example index, so no table is stored).
        per_pass = -(-len(corpus.tokens) // (config.max_seq_length - 3))
        self.num_static = max(1, dupe_factor * per_pass)
        mult = int(np.random.default_rng([seed, 7]).integers(1, 2**31)) | 1
        while np.gcd(mult, self.num_static) != 1:
            mult += 2
        self._static_mult = mult

    # The random draws of a step are made for the whole global batch from one generator
    # seeded by (seed, step): every host draws the same numbers and keeps its own rows.
    def _draws(self, rng: np.random.Generator, rows: int) -> dict[str, np.ndarray]:
        cfg, seq = self.config, self.config.max_seq_length
        return {
            "short": rng.random(rows) < cfg.short_seq_prob,
            "short_target": rng.integers(2, seq - 3 + 1, size=rows),
            "start": rng.integers(self.corpus.num_sentences, size=rows),
            "split": rng.random(rows),
            "random_next": rng.random(rows) < cfg.random_next_prob,
            "other_u": rng.random(rows),
            "trim_bits": rng.random((rows, 2, 32)) < 0.5,
            "trim_normal": rng.standard_normal((rows, 2)),
            "mask_scores": rng.random((rows, seq)),
            "mask_kind": rng.random((rows, cfg.max_predictions_per_seq)),
            "random_ids": rng.integers(
                NUM_SPECIAL, cfg.vocab_size, size=(rows, cfg.max_predictions_per_seq)
            ),
        }

    def batch(self, step: int, with_sources: bool = False) -> dict[str, np.ndarray]:
        if self.packing:
            return self._packed_batch(step)
        if self.masking == "static":
            example = (
                step * self.global_batch_size + self.first_row + np.arange(self.local_batch_size)
            )
            instance = (example * self._static_mult) % self.num_static
            per_row = [
                self._draws(np.random.default_rng([self.seed, 1, int(k)]), 1) for k in instance
            ]
            draws = {k: np.concatenate([d[k] for d in per_row]) for k in per_row[0]}
            return self._build(draws, with_sources)
        rng = np.random.default_rng([self.seed, step])
        draws = self._draws(rng, self.global_batch_size)
        rows = slice(self.first_row, self.first_row + self.local_batch_size)
        return self._build({k: v[rows] for k, v in draws.items()}, with_sources)

    def _packed_batch(self, step: int) -> dict[str, np.ndarray]:
        """Packed rows: each row is filled with pairs until fewer than MIN_PACKED_PAIR
        positions or no pair slot is left. Row r's candidates come from its own generator,
        seeded by (seed, step, r), so a row is a pure function of those, whatever host builds
        it. The first pair of a row is drawn as in an unpacked batch; each later one aims at
        the room left (its target length is capped by it), so rows come out nearly full."""
        k = self.max_pairs_per_row
        rows = self.first_row + np.arange(self.local_batch_size)
        per_row = [
            self._draws(np.random.default_rng([self.seed, step, int(r), 3]), k) for r in rows
        ]
        draws = {key: np.stack([d[key] for d in per_row]) for key in per_row[0]}  # (n, K, ...)
        packed = PackedRows(
            len(rows),
            self.config.max_seq_length,
            k,
            packed_predictions(self.config, k),
            pair_keys=("next_sentence_labels",),
            pair_weight_key="next_sentence_weights",
        )
        open_rows = np.arange(len(rows))
        for j in range(k):
            open_rows = open_rows[packed.room(open_rows) >= MIN_PACKED_PAIR]
            if not len(open_rows):
                break
            inst = self._build(
                {key: v[open_rows, j] for key, v in draws.items()},
                with_sources=False,
                budget=packed.room(open_rows),
            )
            packed.add(open_rows, inst)
        return packed.arrays

    def _build(
        self, d: dict[str, np.ndarray], with_sources: bool, budget: np.ndarray | None = None
    ) -> dict[str, np.ndarray]:
        """Unpacked instances (rows of max_seq_length); `budget` (per row) caps a row's
        length, [CLS] and [SEP]s included."""
        cfg, corpus = self.config, self.corpus
        ss, sdoc, dstart = corpus.sentence_starts, corpus.sentence_doc, corpus.doc_starts
        seq, num_pred = cfg.max_seq_length, cfg.max_predictions_per_seq
        max_tokens = seq - 3 if budget is None else np.asarray(budget, np.int64) - 3
        rows = len(d["start"])
        target = np.minimum(np.where(d["short"], d["short_target"], seq - 3), max_tokens)

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

        # Lay out [CLS] A [SEP] B [SEP] [PAD]... with one gather from the flat token array.
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
        real = pos < length[:, None]

        positions, count = self._choose_positions(
            tokens, in_a | in_b, in_a, in_b, length, d["mask_scores"]
        )
        valid = np.arange(num_pred)[None, :] < count[:, None]
        row_idx = np.arange(rows)[:, None]
        labels = np.where(valid, tokens[row_idx, positions], 0).astype(np.int32)
        kind = d["mask_kind"]
        to_mask = valid & (kind < cfg.mask_token_prob)
        to_random = (
            valid
            & (kind >= cfg.mask_token_prob)
            & (kind < cfg.mask_token_prob + cfg.random_token_prob)
        )
        input_ids = tokens.copy()
        replaced = np.where(to_mask, MASK_ID, np.where(to_random, d["random_ids"], labels))
        input_ids[row_idx, positions] = np.where(valid, replaced, input_ids[row_idx, positions])

        out = {
            "input_ids": input_ids,
            "input_mask": real.astype(np.int32),
            "segment_ids": (in_b | (real & (pos == length[:, None] - 1))).astype(np.int32),
            "masked_lm_positions": np.where(valid, positions, 0).astype(np.int32),
            "masked_lm_ids": labels,
            "masked_lm_weights": valid.astype(np.float32),
            "next_sentence_labels": is_random.astype(np.int32),
        }
        if with_sources:  # provenance, for tests and debugging
            out["a_document"] = doc
            out["b_document"] = sdoc[np.where(is_random, b_start_rand, a_end)]
        return out

    def _choose_positions(self, tokens, maskable, in_a, in_b, length, scores):
        """Picks ~masked_lm_prob of the maskable positions (at most max_predictions_per_seq),
        whole words at a time when asked. Returns (positions sorted ascending, count)."""
        cfg = self.config
        seq, num_pred = tokens.shape[1], cfg.max_predictions_per_seq
        rows = tokens.shape[0]
        pos = np.arange(seq)[None, :]
        num = np.minimum(
            np.maximum(1, np.rint(length * cfg.masked_lm_prob)).astype(np.int64), num_pred
        )
        num = np.minimum(num, maskable.sum(1))
        if self.whole_word_masking:
            # A word starts at a piece marked in word_start, or where a segment starts.
            la = in_a.sum(1)[:, None]
            starts = maskable & (self.word_start[tokens] | (pos == 1) | (pos == la + 2))
        else:
            starts = maskable
        start_pos = np.maximum.accumulate(np.where(starts, pos, 0), axis=1)
        start_pos = np.where(maskable, start_pos, seq)  # specials and padding: no word
        row_idx = np.arange(rows)[:, None]
        word_len = np.zeros((rows, seq + 1), np.int64)
        np.add.at(word_len, (row_idx, start_pos), 1)
        word_len[:, seq] = 0
        # Words in random order (non-starts last); each word is taken whole if it still fits
        # within `num` predictions, else skipped, as in the original recipe.
        order = np.argsort(np.where(starts, scores, 2.0), axis=1)
        lens = np.take_along_axis(word_len, order, axis=1)
        if self.whole_word_masking:
            take = np.zeros(lens.shape, bool)
            total = np.zeros(rows, np.int64)
            for j in range(seq):
                lj = lens[:, j]
                if not lj.any():
                    break
                take[:, j] = (lj > 0) & (total + lj <= num)
                total += take[:, j] * lj
        else:  # every word is one token: the first `num` in random order
            take = (np.cumsum(lens, axis=1) <= num[:, None]) & (lens > 0)
        taken_start = np.zeros((rows, seq + 1), bool)
        np.put_along_axis(taken_start[:, :seq], order, take, axis=1)
        chosen = taken_start[row_idx, start_pos] & maskable
        count = chosen.sum(1)
        positions = np.argsort(~chosen, axis=1, kind="stable")[:, :num_pred]
        return positions, count


# ------------------------------------------------------------------------------ packing

# A packed row takes another pair only while at least this many positions are free: a pair
# is [CLS] A [SEP] B [SEP], and a few-token pair teaches next-sentence prediction nothing.
MIN_PACKED_PAIR = 16


def packed_predictions(config: InstanceConfig, max_pairs: int) -> int:
    """Masked-LM slots of a packed row. Each pair of length l predicts
    min(max(1, rint(l * p)), P) <= l * p + 1 positions, so a row of at most S tokens in at
    most K pairs needs no more than floor(S * p) + K (nor K * P)."""
    bound = int(np.floor(config.max_seq_length * config.masked_lm_prob)) + max_pairs
    return min(max_pairs * config.max_predictions_per_seq, bound)


class PackedRows:
    """Rows being filled with instances (sequence packing).

    In a packed row `input_mask` numbers the pairs 1..K (0 is padding), `position_ids` start
    again at 0 for each pair, `cls_positions[:, j]` is pair j's [CLS], and every per-pair
    value (`pair_keys`, e.g. the NSP label or a classification label) moves to slot j of a
    (rows, K) array; `pair_weight_key`, if given, is 1 in the slots that hold a pair.
    Masked-LM predictions (when the instances have them) are appended to the row's slots
    with their positions shifted to where the pair landed. The model gives each pair exactly
    what it would see alone in a row (see `flaxbert.model.attention_mask`).
    """

    def __init__(
        self,
        num_rows: int,
        seq_len: int,
        max_pairs: int,
        num_predictions: int = 0,
        pair_keys: tuple[str, ...] = (),
        pair_weight_key: str | None = None,
        pair_dtypes: dict[str, np.dtype] | None = None,
    ):
        self.seq_len, self.max_pairs, self.num_predictions = seq_len, max_pairs, num_predictions
        self.pair_keys, self.pair_weight_key = pair_keys, pair_weight_key
        n, i32 = num_rows, np.int32
        self.arrays = {
            "input_ids": np.full((n, seq_len), PAD_ID, i32),
            "input_mask": np.zeros((n, seq_len), i32),
            "segment_ids": np.zeros((n, seq_len), i32),
            "position_ids": np.zeros((n, seq_len), i32),
            "cls_positions": np.zeros((n, max_pairs), i32),
        }
        if num_predictions:
            self.arrays["masked_lm_positions"] = np.zeros((n, num_predictions), i32)
            self.arrays["masked_lm_ids"] = np.zeros((n, num_predictions), i32)
            self.arrays["masked_lm_weights"] = np.zeros((n, num_predictions), np.float32)
        for key in pair_keys:
            dtype = (pair_dtypes or {}).get(key, i32)
            self.arrays[key] = np.zeros((n, max_pairs), dtype)
        if pair_weight_key:
            self.arrays[pair_weight_key] = np.zeros((n, max_pairs), np.float32)
        self.used = np.zeros(n, np.int64)  # positions taken
        self.pairs = np.zeros(n, np.int64)  # pairs placed
        self.predictions = np.zeros(n, np.int64)  # masked-LM slots taken

    def room(self, rows: np.ndarray) -> np.ndarray:
        """Free positions of `rows` (0 once every pair slot is taken)."""
        free = self.seq_len - self.used[rows]
        return np.where(self.pairs[rows] < self.max_pairs, free, 0)

    def fits(self, rows: np.ndarray, instances: dict[str, np.ndarray]) -> np.ndarray:
        """Whether each instance fits in its row (positions, a pair slot, prediction slots)."""
        ok = instances["input_mask"].sum(1) <= self.room(rows)
        if self.num_predictions:
            count = (instances["masked_lm_weights"] > 0).sum(1)
            ok &= self.predictions[rows] + count <= self.num_predictions
        return ok

    def add(self, rows: np.ndarray, instances: dict[str, np.ndarray]) -> None:
        """Appends instance i (an unpacked row: real tokens first, then padding) to row
        `rows[i]`; the rows must be distinct and each instance must fit (`fits`)."""
        rows = np.asarray(rows, np.int64)
        if not np.all(self.fits(rows, instances)):
            raise ValueError("an instance does not fit in its packed row")
        a = self.arrays
        length = instances["input_mask"].sum(1).astype(np.int64)
        offset, slot = self.used[rows], self.pairs[rows]
        pos = np.arange(instances["input_ids"].shape[1])[None, :]
        real = pos < length[:, None]
        dest_row = np.broadcast_to(rows[:, None], real.shape)[real]
        dest_col = (offset[:, None] + pos)[real]
        a["input_ids"][dest_row, dest_col] = instances["input_ids"][real]
        a["segment_ids"][dest_row, dest_col] = instances["segment_ids"][real]
        a["position_ids"][dest_row, dest_col] = np.broadcast_to(pos, real.shape)[real]
        a["input_mask"][dest_row, dest_col] = np.broadcast_to((slot + 1)[:, None], real.shape)[real]
        a["cls_positions"][rows, slot] = offset
        for key in self.pair_keys:
            a[key][rows, slot] = instances[key]
        if self.pair_weight_key:
            a[self.pair_weight_key][rows, slot] = 1.0
        if self.num_predictions:
            # Real predictions come first in an instance's slots (weights 1 then 0).
            valid = instances["masked_lm_weights"] > 0
            count = valid.sum(1)
            p_row = np.broadcast_to(rows[:, None], valid.shape)[valid]
            p_col = (self.predictions[rows][:, None] + np.arange(valid.shape[1])[None, :])[valid]
            a["masked_lm_positions"][p_row, p_col] = (
                instances["masked_lm_positions"] + offset[:, None]
            )[valid]
            a["masked_lm_ids"][p_row, p_col] = instances["masked_lm_ids"][valid]
            a["masked_lm_weights"][p_row, p_col] = 1.0
            self.predictions[rows] += count
        self.used[rows] += length
        self.pairs[rows] += 1


def plan_packing(
    lengths: np.ndarray, num_rows: int, seq_len: int, max_pairs: int
) -> list[np.ndarray]:
    """Instances of these lengths, in this order, into batches of `num_rows` packed rows:
    each goes to the first row of the current batch with room (first fit); when none has,
    the batch is closed and the next begins. Returns per batch an (m, 2) array of
    (instance index, row), in placement order. Only lengths are looked at: cheap enough to
    plan a whole epoch of fine-tuning examples."""
    lengths = np.asarray(lengths, np.int64)
    if len(lengths) and lengths.max() > seq_len:
        raise ValueError(f"an instance of {lengths.max()} tokens exceeds the row ({seq_len})")
    batches, current = [], []
    used = np.zeros(num_rows, np.int64)
    pairs = np.zeros(num_rows, np.int64)
    for i, length in enumerate(lengths):
        ok = (seq_len - used >= length) & (pairs < max_pairs)
        if not ok.any():
            batches.append(np.array(current, np.int64).reshape(-1, 2))
            current = []
            used[:] = 0
            pairs[:] = 0
            ok[:] = True
        row = int(np.argmax(ok))
        used[row] += length
        pairs[row] += 1
        current.append((i, row))
    if current:
        batches.append(np.array(current, np.int64).reshape(-1, 2))
    return batches


def fill_packed(instances: dict[str, np.ndarray], placement: np.ndarray, packed: PackedRows):
    """Adds instances to `packed` as `plan_packing` placed them ((index, row) pairs, in
    order), one pair slot at a time so that every row receives its pairs in plan order."""
    index, rows = placement[:, 0], placement[:, 1]
    rank = np.zeros(len(rows), np.int64)  # the pair slot each instance takes in its row
    seen: dict[int, int] = {}
    for n, r in enumerate(rows.tolist()):
        rank[n] = seen.get(r, 0)
        seen[r] = rank[n] + 1
    for j in range(int(rank.max(initial=-1)) + 1):
        take = rank == j
        packed.add(rows[take], {k: v[index[take]] for k, v in instances.items()})
    return packed


def _binomial_half(n: np.ndarray, bits: np.ndarray, z: np.ndarray) -> np.ndarray:
    """Binomial(n, 1/2) per row: exact from coin flips `bits` while n <= bits.shape[1],
    else the normal approximation from standard normals `z` (excellent at that size)."""
    n = np.asarray(n, np.int64)
    width = bits.shape[1]
    flips = np.concatenate([np.zeros((len(n), 1), np.int64), np.cumsum(bits, axis=1)], axis=1)
    exact = flips[np.arange(len(n)), np.minimum(n, width)]
    approx = np.clip(np.rint(n / 2 + z * np.sqrt(n) / 2), 0, n).astype(np.int64)
    return np.where(n <= width, exact, approx)


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
        # The worker may be inside `make_batch` (which can copy to devices): let it finish,
        # so that no thread is still calling into JAX when the process exits.
        thread.join(timeout=60)
