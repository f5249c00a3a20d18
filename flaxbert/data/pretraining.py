"""Pre-training batches made on the fly: NSP sentence pairs plus dynamic MLM masking.

This follows the recipe of the original `create_pretraining_data`, but draws every instance
at random access instead of writing them out: the example in row i of the global batch at
step s is a pure function of (seed, s, i). So a run resumed at step s needs only s, and each
host can build just its own rows, whose union over hosts is the single-host batch.
`PretrainingBatches` draws the random numbers of a step and builds its rows from them with
`flaxbert.data.instances` (sentence pairs), `flaxbert.data.masking` and, for packed rows,
`flaxbert.data.packing`; `prefetch` builds batches ahead on a background thread.

No JAX here: numpy only, so the loader runs on host threads beside the device work.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator

import numpy as np

from flaxbert.config import ConfigError
from flaxbert.data.instances import FlatCorpus, InstanceConfig, draw_pairs, lay_out_pairs
from flaxbert.data.masking import choose_positions, mask_tokens
from flaxbert.data.packing import MIN_PACKED_PAIR, PackedRows, packed_predictions

# flaxbert.finetune_tasks imports these from here, as it always did.
from flaxbert.data.text_io import CorpusError
from flaxbert.tokenizer import NUM_SPECIAL

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
        cfg = self.config
        seq = cfg.max_seq_length
        max_tokens = seq - 3 if budget is None else np.asarray(budget, np.int64) - 3
        target = np.minimum(np.where(d["short"], d["short_target"], seq - 3), max_tokens)
        pairs = draw_pairs(self.corpus, d, target, max_tokens)
        tokens, in_a, in_b, length = lay_out_pairs(self.corpus, pairs, seq)
        pos = np.arange(seq)[None, :]
        real = pos < length[:, None]
        positions, count = choose_positions(
            tokens,
            in_a | in_b,
            in_a,
            length,
            d["mask_scores"],
            cfg,
            self.word_start,
            self.whole_word_masking,
        )
        input_ids, labels, valid = mask_tokens(tokens, positions, count, d, cfg)
        out = {
            "input_ids": input_ids,
            "input_mask": real.astype(np.int32),
            "segment_ids": (in_b | (real & (pos == length[:, None] - 1))).astype(np.int32),
            "masked_lm_positions": np.where(valid, positions, 0).astype(np.int32),
            "masked_lm_ids": labels,
            "masked_lm_weights": valid.astype(np.float32),
            "next_sentence_labels": pairs.is_random.astype(np.int32),
        }
        if with_sources:  # provenance, for tests and debugging
            out["a_document"] = pairs.a_document
            out["b_document"] = pairs.b_document
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
        # The worker may be inside `make_batch` (which can copy to devices): let it finish,
        # so that no thread is still calling into JAX when the process exits.
        thread.join(timeout=60)
