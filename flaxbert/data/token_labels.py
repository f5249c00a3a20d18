"""Token classification (NER) features: word-level BIO tags on SentencePiece pieces and back.

The model predicts one label per piece; the task is labelled per word (CoNLL, WikiANN,
WNUT) or per character (KLUE-NER, where every character, a space included, is a "word").
A word's label sits on its FIRST piece only; every other position is ignored by the loss,
and `word_predictions` turns per-position predictions back into one tag per word.

Pieces come from encoding the whole sentence once (`Tokenizer.encode_with_offsets`), not
word by word: that keeps SentencePiece's real segmentation (the one pre-training saw), and
each piece belongs to the word its character span starts in. The price: a piece may run
into the next word's characters (KLUE: "이다" covers the words "이" and "다"), and a word
made only of whitespace gets no piece. Such words have no label position; see
`word_predictions` for the tags they get back.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Protocol

import numpy as np

from flaxbert.tokenizer import CLS_ID, PAD_ID, SEP_ID, Tokenizer

IGNORE_INDEX = -100
"""label_ids at positions the loss skips: [CLS], [SEP], padding, non-first pieces, and
unlabelled words. Same value as PyTorch's default cross-entropy ignore_index, so arrays can
be shared with other frameworks unchanged."""

FEATURE_KEYS = ("input_ids", "input_mask", "segment_ids", "label_ids", "word_index", "last_word")


class TokenExampleLike(Protocol):
    """What `batch_token_examples` reads from an example
    (`flaxbert.data.task_spec.TokenExample`)."""

    words: list[str]
    labels: list[str] | None


def _separator(words: Sequence[str], separator: str | None) -> str:
    """Character-level input (every word one character, spaces are words) is joined with
    nothing; word-level input with one space, which is how SentencePiece saw such text."""
    if separator is not None:
        return separator
    return "" if words and all(len(w) == 1 for w in words) else " "


def encode_token_example(
    tokenizer: Tokenizer,
    words: Sequence[str],
    labels: Sequence[str] | None,
    label_to_id: Mapping[str, int],
    max_seq_length: int,
    *,
    separator: str | None = None,
) -> tuple[dict[str, np.ndarray], int]:
    """Features of one sentence, and the number of words dropped by truncation.

    The sentence is `separator.join(words)` (default: "" when every word is one character,
    as in KLUE-NER, else " "). Returned arrays, each [max_seq_length]:

    - input_ids int32: [CLS] pieces [SEP], then [PAD].
    - input_mask int32: 1 on [CLS], pieces and [SEP]; segment_ids int32: zeros.
    - label_ids int32: `label_to_id[labels[w]]` on the first piece of word w, IGNORE_INDEX
      everywhere else (all IGNORE_INDEX when `labels` is None, for prediction).
    - word_index int32: w on the first piece of word w, -1 elsewhere.
    - last_word int32: on every piece, the last word its characters reach (-1 on special
      tokens and padding); `word_predictions` uses it to tell a word merged into the
      previous word's piece from a whitespace word or a truncated one.

    A word gets a label position only if some piece starts inside it: a whitespace word,
    or a character that SentencePiece put into a piece starting in the previous word, gets
    none (its label is not trained on). Pieces past max_seq_length - 2 are cut (a word cut
    after its first piece keeps its label); the count returned is the number of words, from
    the end, that no kept piece reaches, so that callers can report how much truncation
    cost. It is 0 when nothing was cut.
    """
    if max_seq_length < 3:
        raise ValueError(f"max_seq_length={max_seq_length}: must be at least 3 ([CLS] x [SEP])")
    if labels is not None and len(labels) != len(words):
        raise ValueError(f"{len(words)} words but {len(labels)} labels")
    sep = _separator(words, separator)
    text = sep.join(words)
    ids, char_start, char_end = tokenizer.encode_with_offsets(text)
    n = len(ids)
    piece_word, piece_last = _piece_words(words, sep, text, char_start, char_end)
    first = np.ones(n, dtype=bool)
    first[1:] = piece_word[1:] != piece_word[:-1]

    keep = min(n, max_seq_length - 2)
    dropped = 0
    if keep < n:
        reached = int(piece_last[:keep].max()) if keep else -1
        dropped = len(words) - (reached + 1)

    length = keep + 2
    input_ids = np.full(max_seq_length, PAD_ID, dtype=np.int32)
    input_ids[0] = CLS_ID
    input_ids[1 : keep + 1] = ids[:keep]
    input_ids[keep + 1] = SEP_ID
    input_mask = np.zeros(max_seq_length, dtype=np.int32)
    input_mask[:length] = 1
    word_index = np.full(max_seq_length, -1, dtype=np.int32)
    word_index[1 : keep + 1] = np.where(first[:keep], piece_word[:keep], -1)
    last_word = np.full(max_seq_length, -1, dtype=np.int32)
    last_word[1 : keep + 1] = piece_last[:keep]
    features = {
        "input_ids": input_ids,
        "input_mask": input_mask,
        "segment_ids": np.zeros(max_seq_length, dtype=np.int32),
        "label_ids": _label_ids(words, labels, label_to_id, word_index),
        "word_index": word_index,
        "last_word": last_word,
    }
    return features, dropped


def _piece_words(
    words: Sequence[str], sep: str, text: str, char_start: np.ndarray, char_end: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """For each piece of `text` (`sep.join(words)`, pieces by their character spans): the
    word its span starts in, and the last word its characters reach."""
    # Word of every character: -1 on separators and past the end.
    char_word = np.full(len(text) + 1, -1, dtype=np.int64)
    pos = 0
    for w, word in enumerate(words):
        char_word[pos : pos + len(word)] = w
        pos += len(word) + len(sep)
    # For the last character of a piece: the word it is in, or the one before a separator.
    char_word_before = np.maximum.accumulate(char_word[:-1]) if len(text) else char_word[:0]

    n = len(char_start)
    piece_word = np.empty(n, dtype=np.int64)  # the word each piece's span starts in
    piece_last = np.empty(n, dtype=np.int64)
    prev = -1
    for i in range(n):
        w = int(char_word[char_start[i]])
        if w < prev:  # spans never decrease; a start between words continues the last one
            w = prev
        if w < 0:  # a piece starting on a separator before any word: keep it with word 0
            w = 0 if words else -1
        piece_word[i] = w
        last = int(char_word_before[char_end[i] - 1]) if char_end[i] > char_start[i] else w
        piece_last[i] = max(last, w)
        prev = w
    return piece_word, piece_last


def _label_ids(
    words: Sequence[str],
    labels: Sequence[str] | None,
    label_to_id: Mapping[str, int],
    word_index: np.ndarray,
) -> np.ndarray:
    """`label_to_id[labels[w]]` where `word_index` is w (a word's first piece), IGNORE_INDEX
    everywhere else, and everywhere when `labels` is None."""
    label_ids = np.full(len(word_index), IGNORE_INDEX, dtype=np.int32)
    if labels is not None:
        for p in np.flatnonzero(word_index >= 0):
            tag = labels[word_index[p]]
            if tag not in label_to_id:
                raise ValueError(
                    f"label {tag!r} of word {word_index[p]} ({words[word_index[p]]!r}) is "
                    f"not among the task's labels {sorted(label_to_id)}"
                )
            label_ids[p] = label_to_id[tag]
    return label_ids


def batch_token_examples(
    tokenizer: Tokenizer,
    examples: Iterable[TokenExampleLike],
    label_to_id: Mapping[str, int],
    max_seq_length: int,
    *,
    separator: str | None = None,
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """`encode_token_example` over many examples, stacked: each array of FEATURE_KEYS is
    [num_examples, max_seq_length]; also int32[num_examples], the words each example lost
    to truncation (sum it, or count the non-zero ones, to report truncation)."""
    rows: list[dict[str, np.ndarray]] = []
    dropped: list[int] = []
    for ex in examples:
        features, lost = encode_token_example(
            tokenizer, ex.words, ex.labels, label_to_id, max_seq_length, separator=separator
        )
        rows.append(features)
        dropped.append(lost)
    stacked = {
        k: (
            np.stack([r[k] for r in rows])
            if rows
            else np.zeros((0, max_seq_length), dtype=np.int32)
        )
        for k in FEATURE_KEYS
    }
    return stacked, np.asarray(dropped, dtype=np.int32)


def _entity_type(tag: str | None) -> str | None:
    """X for B-X / I-X (IOB2), None for O and anything else."""
    if tag is not None and len(tag) > 2 and tag[:2] in ("B-", "I-"):
        return tag[2:]
    return None


def word_predictions(
    pred_label_ids_per_position: np.ndarray,
    word_index: np.ndarray,
    num_words: int,
    id_to_label: Mapping[int, str] | Sequence[str],
    fill: str = "O",
    *,
    last_word: np.ndarray | None = None,
) -> list[str]:
    """One tag per word of a sentence from the predicted label id at every position.

    A word with a label position takes the prediction there. A word without one gets a
    tag that keeps the IOB2 sequence valid, filled left to right:

    - merged (its characters sit in a piece that started in an earlier word; needs
      `last_word` from the features): the piece is one unit, so the word continues the
      previous word's entity as I-X if that word is in entity X, else `fill`;
    - otherwise (a whitespace word, or a word no piece covers): I-X when both the previous
      word is in entity X and the next word with a position is predicted I-X (the gap is
      inside one entity, as KLUE tags a space inside "지난달 30일"), else `fill`;
    - truncated words (after the last covered word) have no next prediction: `fill`.

    Without `last_word`, every word without a position is treated by the second rule.
    """
    pred = np.asarray(pred_label_ids_per_position).reshape(-1)
    index = np.asarray(word_index).reshape(-1)
    own: list[str | None] = [None] * num_words
    for p in np.flatnonzero((index >= 0) & (index < num_words)):
        own[int(index[p])] = id_to_label[int(pred[p])]

    merged = np.zeros(num_words, dtype=bool)
    if last_word is not None:
        last = np.asarray(last_word).reshape(-1)
        current = -1  # the word of the piece at p: the last first-piece word seen so far
        for p in range(len(index)):
            if index[p] >= 0:
                current = int(index[p])
            if last[p] > current >= 0:
                merged[current + 1 : min(int(last[p]), num_words - 1) + 1] = True

    # Next word with its own prediction, for every word (num_words when none follows).
    next_own = np.full(num_words + 1, num_words, dtype=np.int64)
    for w in range(num_words - 1, -1, -1):
        next_own[w] = w if own[w] is not None else next_own[w + 1]

    tags: list[str] = []
    for w in range(num_words):
        tag = own[w]
        if tag is None:
            kind = _entity_type(tags[-1]) if tags else None
            if kind is None:
                tag = fill
            elif merged[w]:
                tag = f"I-{kind}"
            else:
                nxt = int(next_own[w])
                follows = own[nxt] if nxt < num_words else None
                tag = f"I-{kind}" if follows == f"I-{kind}" else fill
        tags.append(tag)
    return tags
