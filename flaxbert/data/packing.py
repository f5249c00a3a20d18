"""Sequence packing: several instances in one row, for pre-training and fine-tuning alike.

In a packed row `input_mask` numbers the pairs 1..K, `position_ids` restart at each pair and
every per-pair value moves to a (rows, K) slot (`PackedRows`); the model then gives each pair
what it would see alone in a row. `plan_packing` places instances of known lengths into rows
first-fit, `fill_packed` carries such a plan out, and `packed_predictions` bounds the
masked-LM slots a packed pre-training row needs.
"""

from __future__ import annotations

import numpy as np

from flaxbert.data.instances import InstanceConfig
from flaxbert.tokenizer import PAD_ID

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
