"""Dynamic masked-LM masking of laid-out instances, as in the original BERT recipe.

`choose_positions` picks about `masked_lm_prob` of each row's maskable positions (at most
`max_predictions_per_seq`), whole words at a time with whole-word masking; `mask_tokens`
then replaces the chosen tokens: 80% by [MASK], 10% by a random vocabulary piece, 10% left
as they are (`mask_token_prob`, `random_token_prob`). Both work on whole batches with array
operations and take their random numbers from the caller's draws.
"""

from __future__ import annotations

import numpy as np

from flaxbert.data.instances import InstanceConfig
from flaxbert.tokenizer import MASK_ID


def choose_positions(
    tokens: np.ndarray,
    maskable: np.ndarray,
    in_a: np.ndarray,
    length: np.ndarray,
    scores: np.ndarray,
    config: InstanceConfig,
    word_start: np.ndarray | None = None,
    whole_word_masking: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Picks ~masked_lm_prob of the maskable positions (at most max_predictions_per_seq),
    whole words at a time when asked (`word_start[id]` marks the pieces that begin a word).
    `scores` (uniform per position) orders the words at random. Returns (positions sorted
    ascending, count)."""
    cfg = config
    seq, num_pred = tokens.shape[1], cfg.max_predictions_per_seq
    rows = tokens.shape[0]
    pos = np.arange(seq)[None, :]
    num = np.minimum(np.maximum(1, np.rint(length * cfg.masked_lm_prob)).astype(np.int64), num_pred)
    num = np.minimum(num, maskable.sum(1))
    if whole_word_masking:
        # A word starts at a piece marked in word_start, or where a segment starts.
        la = in_a.sum(1)[:, None]
        starts = maskable & (word_start[tokens] | (pos == 1) | (pos == la + 2))
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
    if whole_word_masking:
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


def mask_tokens(
    tokens: np.ndarray,
    positions: np.ndarray,
    count: np.ndarray,
    d: dict[str, np.ndarray],
    config: InstanceConfig,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Replaces the first `count` of `positions` in each row, by the draws `d["mask_kind"]`
    and `d["random_ids"]`. Returns (input_ids, labels: the original tokens there, valid:
    which prediction slots hold a position)."""
    cfg, rows, num_pred = config, len(tokens), config.max_predictions_per_seq
    valid = np.arange(num_pred)[None, :] < count[:, None]
    row_idx = np.arange(rows)[:, None]
    labels = np.where(valid, tokens[row_idx, positions], 0).astype(np.int32)
    kind = d["mask_kind"]
    to_mask = valid & (kind < cfg.mask_token_prob)
    to_random = (
        valid & (kind >= cfg.mask_token_prob) & (kind < cfg.mask_token_prob + cfg.random_token_prob)
    )
    input_ids = tokens.copy()
    replaced = np.where(to_mask, MASK_ID, np.where(to_random, d["random_ids"], labels))
    input_ids[row_idx, positions] = np.where(valid, replaced, input_ids[row_idx, positions])
    return input_ids, labels, valid
