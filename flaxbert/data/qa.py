"""Extractive question answering (SQuAD v1.1 style): sliding-window features and decoding.

A context longer than the model's input is cut into overlapping windows of pieces; each
window is one feature `[CLS] question [SEP] window [SEP]`, trained to point at the answer's
first and last piece (or at [CLS], position 0, when the answer is not wholly inside it).
Answers are read back as substrings of the ORIGINAL context through each piece's character
span (`Tokenizer.encode_with_offsets`), never by decoding ids: SentencePiece's NFKC
normalisation and "▁" spaces would otherwise change the text, and for Korean the answer
must keep its exact particles and spacing to score EM.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Protocol

import numpy as np

from flaxbert.tokenizer import CLS_ID, PAD_ID, SEP_ID, Tokenizer


class QAExampleLike(Protocol):
    """What `qa_features` reads from an example (`flaxbert.data.task_spec.QAExample`):
    answers are (text, character start in context); the first is the training target."""

    qid: str
    question: str
    context: str
    answers: list[tuple[str, int]]


@dataclasses.dataclass
class QAFeatures:
    """Windows of all examples, F of them, each padded to L = max_seq_length.

    input_ids, input_mask, segment_ids: int32[F, L] model inputs; segment 1 on the context
    window and its closing [SEP]. start_positions, end_positions: int32[F], the first and
    last piece of the first answer in this window, 0 ([CLS]) when it is not wholly inside.
    example_index: int32[F], the example each window belongs to. char_start, char_end:
    int32[F, L], the span [char_start, char_end) of the context each position covers, -1
    outside the context. is_max_context: bool[F, L], True where this window gives the
    position's piece the most context among all windows holding it (False outside the
    context); decoding only starts answers there, so each piece is judged once.
    unmatched_answers: answers (first answer per example) that could not be found in the
    context at all; their windows point at [CLS].
    """

    input_ids: np.ndarray
    input_mask: np.ndarray
    segment_ids: np.ndarray
    start_positions: np.ndarray
    end_positions: np.ndarray
    example_index: np.ndarray
    char_start: np.ndarray
    char_end: np.ndarray
    is_max_context: np.ndarray
    unmatched_answers: int = 0

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    def model_inputs(self) -> dict[str, np.ndarray]:
        """The arrays a QA model and its loss take, by name."""
        return {
            "input_ids": self.input_ids,
            "input_mask": self.input_mask,
            "segment_ids": self.segment_ids,
            "start_positions": self.start_positions,
            "end_positions": self.end_positions,
        }


@dataclasses.dataclass(frozen=True)
class QAPrediction:
    """One candidate answer: the context substring, its score (start + end logit), the
    softmax of the scores over the n-best list, and where it came from."""

    text: str
    score: float
    probability: float
    start_logit: float
    end_logit: float
    char_start: int
    char_end: int
    feature_index: int


def locate_answer(context: str, text: str, start: int) -> int | None:
    """Character start of `text` in `context`: `start` when it is right, else the nearest
    occurrence (datasets with shifted offsets), None when the text is not in the context."""
    if not text or not text.strip():
        return None
    if 0 <= start and context.startswith(text, start):
        return start
    hits = []
    at = context.find(text)
    while at >= 0:
        hits.append(at)
        at = context.find(text, at + 1)
    return min(hits, key=lambda h: abs(h - start)) if hits else None


def answer_token_span(
    char_start: np.ndarray, char_end: np.ndarray, answer_start: int, answer_end: int
) -> tuple[int, int] | None:
    """(first, last) piece indices covering the answer characters [answer_start,
    answer_end): the first piece whose span overlaps the answer through the last one that
    does. Pieces with empty spans (a bare "▁") never overlap, so the span starts on text.
    None when no piece overlaps (an answer of whitespace only)."""
    char_start = np.asarray(char_start)
    char_end = np.asarray(char_end)
    overlap = (char_end > answer_start) & (char_start < answer_end)
    hits = np.flatnonzero(overlap)
    if len(hits) == 0:
        return None
    return int(hits[0]), int(hits[-1])


def _windows(num_tokens: int, window: int, stride: int) -> list[tuple[int, int]]:
    """(start, length) of the windows over `num_tokens` context pieces: starts 0, stride,
    2 * stride, ... until one reaches the end; one empty window for an empty context."""
    spans = []
    start = 0
    while True:
        length = min(window, num_tokens - start)
        spans.append((start, length))
        if start + length >= num_tokens:
            return spans
        start += min(stride, window)


def _max_context(spans: list[tuple[int, int]], num_tokens: int) -> np.ndarray:
    """For every context piece, the window (index into spans) where it has the most
    context: the larger min(pieces to its left, pieces to its right) inside the window,
    ties going to the longer window (+0.01 per piece), then to the earlier one. A piece
    near a window's edge is predicted with half its context missing; the window where it
    sits most centrally sees the most of what surrounds it."""
    best = np.full(num_tokens, -1, dtype=np.int64)
    best_score = np.full(num_tokens, -np.inf)
    for k, (start, length) in enumerate(spans):
        if length == 0:
            continue
        offsets = np.arange(length)
        score = np.minimum(offsets, length - 1 - offsets) + 0.01 * length
        part = slice(start, start + length)
        better = score > best_score[part]
        best[part] = np.where(better, k, best[part])
        best_score[part] = np.where(better, score, best_score[part])
    return best


def qa_features(
    examples: Sequence[QAExampleLike],
    tokenizer: Tokenizer,
    max_seq_length: int = 384,
    doc_stride: int = 128,
    max_query_length: int = 64,
) -> QAFeatures:
    """Sliding-window features of `examples`: the question's first `max_query_length`
    pieces, then windows of the context pieces that fit, each starting `doc_stride` pieces
    after the previous one, until one reaches the end of the context. The target is the
    first answer; an example without answers (prediction) points at [CLS] everywhere."""
    if doc_stride < 1:
        raise ValueError(f"doc_stride={doc_stride}: must be positive")
    if max_query_length < 1:
        raise ValueError(f"max_query_length={max_query_length}: must be positive")
    L = max_seq_length
    keys = ("ids", "mask", "seg", "sp", "ep", "ex", "cs", "ce", "mc")
    cols: dict[str, list] = {k: [] for k in keys}
    unmatched = 0
    context_cache: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
    for e, ex in enumerate(examples):
        question = tokenizer.encode(ex.question)[:max_query_length]
        if ex.context not in context_cache:  # SQuAD asks several questions per paragraph
            context_cache[ex.context] = tokenizer.encode_with_offsets(ex.context)
        ids, c_start, c_end = context_cache[ex.context]
        window = L - len(question) - 3
        if window < 1:
            raise ValueError(
                f"max_seq_length={L} leaves no room for the context after a "
                f"{len(question)}-piece question (max_query_length={max_query_length})"
            )
        answer = _answer_pieces(ex, c_start, c_end)
        if ex.answers and answer is None:
            unmatched += 1

        spans = _windows(len(ids), window, doc_stride)
        best = _max_context(spans, len(ids))
        for k, (start, length) in enumerate(spans):
            row, mask, seg, sp, ep, cs, ce, mc = _window_feature(
                question, (ids, c_start, c_end), start, length, best == k, answer, L
            )
            for key, value in zip(keys, (row, mask, seg, sp, ep, e, cs, ce, mc), strict=True):
                cols[key].append(value)

    def stack(key: str, dtype, shape: tuple[int, ...]) -> np.ndarray:
        return np.asarray(cols[key], dtype=dtype) if cols[key] else np.zeros(shape, dtype)

    return QAFeatures(
        input_ids=stack("ids", np.int32, (0, L)),
        input_mask=stack("mask", np.int32, (0, L)),
        segment_ids=stack("seg", np.int32, (0, L)),
        start_positions=stack("sp", np.int32, (0,)),
        end_positions=stack("ep", np.int32, (0,)),
        example_index=stack("ex", np.int32, (0,)),
        char_start=stack("cs", np.int32, (0, L)),
        char_end=stack("ce", np.int32, (0, L)),
        is_max_context=stack("mc", bool, (0, L)),
        unmatched_answers=unmatched,
    )


def _answer_pieces(ex: QAExampleLike, c_start: np.ndarray, c_end: np.ndarray):
    """The (first, last) context piece of the example's first answer; None for an example
    without answers, or one whose answer no piece span matches."""
    if not ex.answers:
        return None
    text, start = ex.answers[0]
    at = locate_answer(ex.context, text, start)
    if at is None:
        return None
    return answer_token_span(c_start, c_end, at, at + len(text))


def _window_feature(question, context, start: int, length: int, is_best, answer, L: int):
    """One feature row: [CLS] question [SEP] context pieces [start, start + length) [SEP],
    padded to L. `context` is (ids, char_start, char_end) of the whole context, `is_best`
    per context piece whether this window gives it most context. Returns (input ids, mask,
    segment ids, start position, end position, char_start, char_end, is_max_context); the
    positions are 0 ([CLS]) when the answer is not wholly inside the window."""
    ids, c_start, c_end = context
    offset = len(question) + 2  # context pieces start after [CLS] question [SEP]
    row = np.full(L, PAD_ID, dtype=np.int32)
    row[0] = CLS_ID
    row[1 : offset - 1] = question
    row[offset - 1] = SEP_ID
    row[offset : offset + length] = ids[start : start + length]
    row[offset + length] = SEP_ID
    used = offset + length + 1
    mask = np.zeros(L, dtype=np.int32)
    mask[:used] = 1
    seg = np.zeros(L, dtype=np.int32)
    seg[offset:used] = 1
    cs = np.full(L, -1, dtype=np.int32)
    ce = np.full(L, -1, dtype=np.int32)
    cs[offset : offset + length] = c_start[start : start + length]
    ce[offset : offset + length] = c_end[start : start + length]
    mc = np.zeros(L, dtype=bool)
    mc[offset : offset + length] = is_best[start : start + length]
    sp = ep = 0
    if answer is not None and start <= answer[0] and answer[1] < start + length:
        sp, ep = answer[0] - start + offset, answer[1] - start + offset
    return row, mask, seg, sp, ep, cs, ce, mc


def _top(logits: np.ndarray, allowed: np.ndarray, n: int) -> np.ndarray:
    """Indices of the n largest logits among the allowed positions, best first."""
    candidates = np.flatnonzero(allowed)
    if len(candidates) > n:
        part = np.argpartition(-logits[candidates], n - 1)[:n]
        candidates = candidates[part]
    return candidates[np.argsort(-logits[candidates], kind="stable")]


def decode_qa_nbest(
    start_logits: np.ndarray,
    end_logits: np.ndarray,
    features: QAFeatures,
    examples: Sequence[QAExampleLike],
    n_best_size: int = 20,
    max_answer_length: int = 30,
) -> dict[str, list[QAPrediction]]:
    """Per question id, up to `n_best_size` distinct answers, best first.

    In each window the `n_best_size` best start and end positions by logit, among context
    pieces with text only (not a bare "▁", whose empty span would start or end the answer
    on a space; training never targets one), are paired; a pair is kept when end >= start,
    it is at most `max_answer_length` pieces long and its start is in the window where that
    piece has most context (`is_max_context`). Candidates of all windows of an example are
    ranked by start + end logit; the same character span reached from two windows counts
    once (its best score). The text is `context[char_start[start]:char_end[end]]`, exactly
    as written.
    An example none of whose windows has a valid pair gets an empty list.
    """
    if n_best_size < 1 or max_answer_length < 1:
        raise ValueError(
            f"n_best_size={n_best_size}, max_answer_length={max_answer_length}: "
            "both must be positive"
        )
    start_logits = np.asarray(start_logits, dtype=np.float64)
    end_logits = np.asarray(end_logits, dtype=np.float64)
    if start_logits.shape != features.input_ids.shape or end_logits.shape != start_logits.shape:
        raise ValueError(
            f"logits of shapes {start_logits.shape} and {end_logits.shape} do not match the "
            f"features' {features.input_ids.shape}"
        )
    found: list[dict[tuple[int, int], QAPrediction]] = [{} for _ in examples]
    for f in range(len(features)):
        e = int(features.example_index[f])
        _add_window_candidates(
            found[e],
            f,
            start_logits,
            end_logits,
            features,
            examples[e].context,
            n_best_size,
            max_answer_length,
        )
    return {ex.qid: _ranked(found[e], n_best_size) for e, ex in enumerate(examples)}


def _add_window_candidates(
    found: dict[tuple[int, int], QAPrediction],
    f: int,
    start_logits: np.ndarray,
    end_logits: np.ndarray,
    features: QAFeatures,
    context: str,
    n_best_size: int,
    max_answer_length: int,
) -> None:
    """Adds feature f's (one window's) best valid spans to `found` (by character span,
    keeping the better score of a span seen before), at most `n_best_size` of them."""
    cs, ce = features.char_start[f], features.char_end[f]
    # Pieces with text: a bare "▁" (empty span) would end an answer on a space.
    in_context = (cs >= 0) & (ce > cs)
    starts = _top(start_logits[f], in_context & features.is_max_context[f], n_best_size)
    ends = _top(end_logits[f], in_context, n_best_size)
    if len(starts) == 0 or len(ends) == 0:
        return
    s, t = np.meshgrid(starts, ends, indexing="ij")
    ok = (t >= s) & (t - s + 1 <= max_answer_length)
    s, t = s[ok], t[ok]
    scores = start_logits[f, s] + end_logits[f, t]
    kept = 0
    for k in np.argsort(-scores, kind="stable"):  # a window adds at most n_best spans
        i, j = int(s[k]), int(t[k])
        span = (int(cs[i]), int(ce[j]))
        old = found.get(span)
        if old is not None and old.score >= scores[k]:
            continue
        found[span] = QAPrediction(
            text=context[span[0] : span[1]],
            score=float(scores[k]),
            probability=0.0,
            start_logit=float(start_logits[f, i]),
            end_logit=float(end_logits[f, j]),
            char_start=span[0],
            char_end=span[1],
            feature_index=f,
        )
        kept += 1
        if kept == n_best_size:
            break


def _ranked(found: dict[tuple[int, int], QAPrediction], n_best_size: int) -> list[QAPrediction]:
    """An example's candidates, best first, at most `n_best_size`, each with its softmax
    probability among them."""
    ranked = sorted(found.values(), key=lambda p: (-p.score, p.char_start, p.char_end))
    ranked = ranked[:n_best_size]
    if ranked:
        scores = np.array([p.score for p in ranked])
        probs = np.exp(scores - scores.max())
        probs /= probs.sum()
        ranked = [
            dataclasses.replace(p, probability=float(q)) for p, q in zip(ranked, probs, strict=True)
        ]
    return ranked


def decode_qa(
    start_logits: np.ndarray,
    end_logits: np.ndarray,
    features: QAFeatures,
    examples: Sequence[QAExampleLike],
    n_best_size: int = 20,
    max_answer_length: int = 30,
) -> dict[str, str]:
    """Per question id, the best answer of `decode_qa_nbest` ("" when there is none),
    ready for SQuAD's EM / F1."""
    nbest = decode_qa_nbest(
        start_logits, end_logits, features, examples, n_best_size, max_answer_length
    )
    return {qid: (preds[0].text if preds else "") for qid, preds in nbest.items()}
