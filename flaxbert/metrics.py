"""Evaluation metrics for fine-tuning: GLUE-style classification and regression scores,
entity-level F1 for token tagging (NER), and the SQuAD v1.1 answer scores.

Every function is pure and returns plain Python floats (or dicts of them, plus integer
counts where a count is the natural answer), so results can go straight into JSON, the metric
writer and the checkpoint ranking without numpy scalars leaking out.

Semantics follow the reference implementations everyone reports numbers with, so that scores
are comparable to published ones; they are re-implemented here from their documented
behaviour:

- classification: accuracy, F1 of one positive class, Matthews correlation (sklearn's
  conventions, including 0.0 when the MCC denominator is 0);
- regression: Pearson and Spearman correlation (computed by `scipy.stats`);
- tagging: chunks as seqeval's default, conlleval-compatible mode extracts them, scored by
  exact (sentence, type, start, end) match;
- extractive QA: the official SQuAD v1.1 evaluation script's normalisation, exact match and
  token F1. These are applied unchanged to any language (KorQuAD's script does the same apart
  from its tokenisation); no language-specific rules are added.

Every score is on one scale, 0-1 (SQuAD exact match and F1 included, which the official
script prints in percent); correlations and the Matthews coefficient span -1 to 1.

`TASK_METRICS` maps the metric-set names used by task configs to functions
`(predictions, labels) -> dict[str, float]`.
"""

from __future__ import annotations

import collections
import math
import re
import string
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import scipy.stats

# ---------------------------------------------------------------------------------------------
# Classification


def _paired(predictions: Any, labels: Any, dtype: Any = None) -> tuple[np.ndarray, np.ndarray]:
    """Flattens both inputs and checks they pair up, so no metric silently broadcasts a
    (batch, 1) array against a (batch,) one or scores a truncated prediction list."""
    p = np.asarray(predictions, dtype=dtype).ravel()
    y = np.asarray(labels, dtype=dtype).ravel()
    if p.shape != y.shape:
        raise ValueError(f"predictions and labels have different lengths: {p.size} vs {y.size}")
    if p.size == 0:
        raise ValueError("predictions and labels are empty; the metric is undefined")
    return p, y


def accuracy(predictions: Any, labels: Any) -> float:
    """Fraction of items whose predicted class equals the label.

    Takes class ids (already arg-maxed), not logits. Raises ValueError on a length mismatch or
    empty inputs, since an accuracy over nothing would only hide a broken eval loop.
    """
    p, y = _paired(predictions, labels)
    return float(np.mean(p == y))


def binary_f1(predictions: Any, labels: Any, positive: int = 1) -> float:
    """F1 of the class `positive` against all others (MRPC/QQP report it for class 1).

    F1 = 2·tp / (2·tp + fp + fn). When tp + fp + fn == 0 (the positive class is neither
    predicted nor present) precision and recall are both 0/0; we return 0.0, as sklearn does
    with its default `zero_division`, rather than NaN, so a degenerate eval set cannot
    poison averages or checkpoint ranking.
    """
    p, y = _paired(predictions, labels)
    pred_pos, true_pos = p == positive, y == positive
    tp = int(np.sum(pred_pos & true_pos))
    fp = int(np.sum(pred_pos & ~true_pos))
    fn = int(np.sum(~pred_pos & true_pos))
    if tp + fp + fn == 0:
        return 0.0
    return 2 * tp / (2 * tp + fp + fn)


def matthews_corrcoef(predictions: Any, labels: Any) -> float:
    """Matthews correlation coefficient (CoLA's metric), for two or more classes.

    Uses the general R_K statistic of Gorodkin (2004), which for two classes equals the usual
    (tp·tn − fp·fn) / sqrt((tp+fp)(tp+fn)(tn+fp)(tn+fn)):

        (c·s − Σ_k p_k·t_k) / sqrt((s² − Σ_k p_k²)(s² − Σ_k t_k²))

    with s items, c of them correct, t_k items of true class k and p_k predicted as k. When
    either factor of the denominator is 0 (all predictions, or all labels, are one class) the
    coefficient is undefined; we return 0.0, as sklearn does, i.e. "no better than chance".
    Counts are Python ints, so the products cannot overflow on large eval sets.
    """
    p, y = _paired(predictions, labels)
    classes = np.union1d(p, y)
    p_counts = [int(np.sum(p == k)) for k in classes]
    t_counts = [int(np.sum(y == k)) for k in classes]
    s = int(p.size)
    c = int(np.sum(p == y))
    numerator = c * s - sum(pk * tk for pk, tk in zip(p_counts, t_counts, strict=True))
    spread_p = s * s - sum(pk * pk for pk in p_counts)
    spread_t = s * s - sum(tk * tk for tk in t_counts)
    if spread_p == 0 or spread_t == 0:
        return 0.0
    return numerator / math.sqrt(spread_p * spread_t)


# ---------------------------------------------------------------------------------------------
# Regression


def _correlation_inputs(predictions: Any, labels: Any) -> tuple[np.ndarray, np.ndarray] | None:
    """Validated float inputs, or None when one side is constant (correlation undefined)."""
    p, y = _paired(predictions, labels, dtype=np.float64)
    if p.size < 2:
        raise ValueError(f"a correlation needs at least 2 items, got {p.size}")
    if np.ptp(p) == 0 or np.ptp(y) == 0:
        return None
    return p, y


def pearson(predictions: Any, labels: Any) -> float:
    """Pearson's linear correlation r (STS-B), computed by `scipy.stats.pearsonr`.

    Raises ValueError for fewer than 2 items or different lengths. If either side is constant
    r is 0/0; we return 0.0 (no detectable correlation, the same convention as the MCC) instead
    of scipy's NaN, because an early checkpoint that predicts one value for everything is
    common and a NaN would break "best checkpoint" comparisons. NaN inputs give NaN.
    """
    pair = _correlation_inputs(predictions, labels)
    if pair is None:
        return 0.0
    return float(scipy.stats.pearsonr(*pair).statistic)


def spearman(predictions: Any, labels: Any) -> float:
    """Spearman's rank correlation ρ (STS-B), computed by `scipy.stats.spearmanr`.

    Tied values get the average of the ranks they span, as scipy does. Same input checks and
    constant-input convention (0.0) as `pearson`.
    """
    pair = _correlation_inputs(predictions, labels)
    if pair is None:
        return 0.0
    return float(scipy.stats.spearmanr(*pair).statistic)


# ---------------------------------------------------------------------------------------------
# Token tagging (NER)

_UNTYPED = "_"  # the type of a tag with no "-TYPE" part, as seqeval names it
_PREFIXES = frozenset("BIES")


def _split_tag(tag: str) -> tuple[str, str]:
    """`"B-PER"` → `("B", "PER")`, `"O"` → `("O", "")`, `"B"` → `("B", "_")`.

    Only the first "-" separates, so types may contain "-" (`"I-MISC-X"` is type "MISC-X").
    A prefix other than B/I/E/S/O is rejected: it means the label map is wrong, and guessing
    would produce plausible-looking but meaningless scores.
    """
    if tag == "O":
        return "O", ""
    prefix, _, type_ = tag.partition("-")
    if prefix not in _PREFIXES:
        raise ValueError(f"unknown tag {tag!r}: expected 'O' or B-/I-/E-/S- followed by a type")
    return prefix, type_ or _UNTYPED


def get_entities(tags: Sequence[str]) -> list[tuple[str, int, int]]:
    """The chunks `(type, start, end)` (end inclusive) of one tag sequence, in order.

    Same semantics as seqeval's default (non-strict, conlleval-compatible) mode, which
    accepts IOB1, IOB2 and IOBES alike:

    - `B-X` and `S-X` always start a chunk (closing any open one); `S-X`, like `E-X`, also ends
      the chunk it is in, so the next tag cannot continue it.
    - `I-X` and `E-X` continue the open chunk only if it was opened or continued by a `B-`/`I-`
      of the same type; otherwise (after `O`, after `E-`/`S-`, after another type, at the start)
      they start a new chunk. Hence IOB1 `I-PER I-PER O I-LOC` has chunks PER 0-1 and LOC 3-3,
      and `B-PER I-LOC` has PER 0-0 and LOC 1-1.
    - `O` ends the open chunk.

    A tag without a type (`"B"`, `"I"`, `"B-"`) belongs to the type `"_"`, as in seqeval,
    so a scheme that only marks spans still gets spans. Any other tag raises ValueError.
    """
    chunks: list[tuple[str, int, int]] = []
    open_chunk: tuple[str, int] | None = None  # (type, start) of a chunk a B-/I- left open
    for i, tag in enumerate(tags):
        prefix, type_ = _split_tag(tag)
        continues = open_chunk is not None and prefix in ("I", "E") and open_chunk[0] == type_
        if open_chunk is not None and not continues:
            chunks.append((open_chunk[0], open_chunk[1], i - 1))
            open_chunk = None
        if prefix == "O":
            continue
        if not continues:
            open_chunk = (type_, i)
        if prefix in ("E", "S"):
            chunks.append((type_, open_chunk[1], i))
            open_chunk = None
    if open_chunk is not None:
        chunks.append((open_chunk[0], open_chunk[1], len(tags) - 1))
    return chunks


def _prf(tp: int, n_pred: int, n_true: int) -> tuple[float, float, float]:
    """Precision, recall, F1 from counts, each 0.0 where its denominator is 0 (sklearn's and
    seqeval's default), so an unseen type scores 0 instead of NaN."""
    precision = tp / n_pred if n_pred else 0.0
    recall = tp / n_true if n_true else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return precision, recall, f1


def _check_sequences(
    true_sequences: Sequence[Sequence[str]], pred_sequences: Sequence[Sequence[str]]
) -> None:
    """Raises ValueError on any mismatch, naming the sentence: a misaligned prediction (e.g.
    word pieces not mapped back to words) would otherwise be scored as if it were aligned."""
    if len(true_sequences) != len(pred_sequences):
        raise ValueError(
            f"{len(true_sequences)} true sequences but {len(pred_sequences)} predicted ones"
        )
    for i, (t, p) in enumerate(zip(true_sequences, pred_sequences, strict=True)):
        if len(t) != len(p):
            raise ValueError(f"sentence {i}: {len(t)} true tags but {len(p)} predicted tags")


def _sentence_chunks(sequences: Iterable[Sequence[str]]) -> set[tuple[int, str, int, int]]:
    """All chunks keyed by sentence index, so equal spans in different sentences differ."""
    return {
        (i, type_, start, end)
        for i, tags in enumerate(sequences)
        for type_, start, end in get_entities(tags)
    }


def entity_scores(
    true_sequences: Sequence[Sequence[str]], pred_sequences: Sequence[Sequence[str]]
) -> dict[str, Any]:
    """Entity-level precision, recall and F1 (CoNLL NER's metric), micro-averaged.

    A predicted chunk counts as correct only if a true chunk in the same sentence has the same
    type, start and end; a span with a wrong boundary or type is therefore both a false
    positive and a false negative. Returns `precision`, `recall`, `f1` and `per_type`:
    type → {precision, recall, f1, support (number of true chunks, an int)} for every type
    seen in either the truth or the predictions. Ratios with a zero denominator are 0.0.
    """
    _check_sequences(true_sequences, pred_sequences)
    true_chunks = _sentence_chunks(true_sequences)
    pred_chunks = _sentence_chunks(pred_sequences)
    correct = true_chunks & pred_chunks

    def count(chunks: set[tuple[int, str, int, int]]) -> collections.Counter[str]:
        return collections.Counter(chunk[1] for chunk in chunks)

    n_true, n_pred, n_correct = count(true_chunks), count(pred_chunks), count(correct)
    per_type = {}
    for type_ in sorted(set(n_true) | set(n_pred)):
        p, r, f = _prf(n_correct[type_], n_pred[type_], n_true[type_])
        per_type[type_] = {"precision": p, "recall": r, "f1": f, "support": n_true[type_]}
    precision, recall, f1 = _prf(len(correct), len(pred_chunks), len(true_chunks))
    return {"precision": precision, "recall": recall, "f1": f1, "per_type": per_type}


# ---------------------------------------------------------------------------------------------
# Extractive QA (SQuAD v1.1)

_PUNCTUATION = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(s: str) -> str:
    """SQuAD v1.1's answer normalisation, in its order: lower-case, drop ASCII punctuation
    (`string.punctuation`), drop the articles a/an/the as whole words, collapse whitespace.

    Punctuation goes before articles, so "the-end" becomes "theend" and keeps its "the". Only
    this English normalisation is applied to every language, as the official scripts do; e.g.
    non-ASCII punctuation such as "“" or "。" is kept.
    """
    s = s.lower()
    s = "".join(ch for ch in s if ch not in _PUNCTUATION)
    s = _ARTICLES.sub(" ", s)
    return " ".join(s.split())


def _require_ground_truths(ground_truths: Sequence[str]) -> None:
    """A question without reference answers cannot be scored (the official script assumes
    at least one); a clear error beats a silent max() over nothing."""
    if not ground_truths:
        raise ValueError("ground_truths is empty: a question needs at least one answer")


def exact_match(prediction: str, ground_truths: Sequence[str]) -> float:
    """1.0 if the normalised prediction equals any normalised reference answer, else 0.0.

    As in v1.1, two answers that both normalise to "" (e.g. "The" and "a") match exactly.
    """
    _require_ground_truths(ground_truths)
    pred = normalize_answer(prediction)
    return float(any(pred == normalize_answer(gt) for gt in ground_truths))


def _token_f1(prediction: str, ground_truth: str) -> float:
    """Bag-of-tokens F1 between two answers; shared tokens count with multiplicity."""
    pred_tokens = normalize_answer(prediction).split()
    true_tokens = normalize_answer(ground_truth).split()
    common = collections.Counter(pred_tokens) & collections.Counter(true_tokens)
    n_same = sum(common.values())
    if n_same == 0:  # v1.1: also when both are empty (v2.0 would give 1.0 there)
        return 0.0
    precision = n_same / len(pred_tokens)
    recall = n_same / len(true_tokens)
    return 2 * precision * recall / (precision + recall)


def squad_f1(prediction: str, ground_truths: Sequence[str]) -> float:
    """Token-level F1 over normalised whitespace tokens, the best over the reference answers
    (annotators disagree on span boundaries, so the closest one is the fair reference).
    0.0 when no token is shared."""
    _require_ground_truths(ground_truths)
    return max(_token_f1(prediction, gt) for gt in ground_truths)


def squad_scores(predictions: Mapping[str, str], answers: Mapping[str, Sequence[str]]) -> dict:
    """Exact match and F1 as fractions (0-1, like every other metric here; the official
    script prints percent: multiply by 100 to compare), averaged over the questions in
    `answers`.

    A question without a prediction scores 0 on both, and how many there were is returned as
    `missing` (an int), as the official script warns about them; predictions for questions
    not in `answers` are ignored. Raises ValueError if `answers` is empty.
    """
    if not answers:
        raise ValueError("answers is empty: there is no question to score")
    em_total = f1_total = 0.0
    missing = 0
    for qid, ground_truths in answers.items():
        if qid not in predictions:
            missing += 1
            continue
        em_total += exact_match(predictions[qid], ground_truths)
        f1_total += squad_f1(predictions[qid], ground_truths)
    n = len(answers)
    return {"exact_match": em_total / n, "f1": f1_total / n, "missing": missing}


# ---------------------------------------------------------------------------------------------
# Metric sets named by task configs


def _accuracy_set(predictions: Any, labels: Any) -> dict[str, float]:
    """Single-label classification (SST-2, MNLI, QNLI, RTE, WNLI): accuracy."""
    return {"accuracy": accuracy(predictions, labels)}


def _accuracy_f1_set(predictions: Any, labels: Any) -> dict[str, float]:
    """Paraphrase tasks (MRPC, QQP): accuracy, F1 of class 1, and their mean, the single number
    the GLUE leaderboard ranks them by."""
    acc = accuracy(predictions, labels)
    f1 = binary_f1(predictions, labels)
    return {"accuracy": acc, "f1": f1, "accuracy_and_f1": (acc + f1) / 2}


def _matthews_set(predictions: Any, labels: Any) -> dict[str, float]:
    """Unbalanced classification (CoLA): the Matthews correlation, plus accuracy for
    reference."""
    return {
        "matthews_corrcoef": matthews_corrcoef(predictions, labels),
        "accuracy": accuracy(predictions, labels),
    }


def _pearson_spearman_set(predictions: Any, labels: Any) -> dict[str, float]:
    """Regression (STS-B): Pearson, Spearman and their mean (GLUE's single number)."""
    r = pearson(predictions, labels)
    rho = spearman(predictions, labels)
    return {"pearson": r, "spearman": rho, "pearson_spearman": (r + rho) / 2}


def _entity_f1_set(
    predictions: Sequence[Sequence[str]], labels: Sequence[Sequence[str]]
) -> dict[str, float]:
    """Tagging (NER): entity-level micro precision/recall/F1 and token accuracy over all tags
    (including "O"). Takes lists of tag sequences, predictions first like every metric set."""
    scores = entity_scores(labels, predictions)
    flat_pred = [tag for tags in predictions for tag in tags]
    flat_true = [tag for tags in labels for tag in tags]
    return {
        "precision": scores["precision"],
        "recall": scores["recall"],
        "f1": scores["f1"],
        "accuracy": accuracy(flat_pred, flat_true),
    }


_LOWER_IS_BETTER = ("loss", "error", "mse", "mae", "rmse", "perplexity")


def better_direction(name: str) -> str:
    """'min' for a metric where lower is better (a name ending in loss, error, mse, mae, rmse
    or perplexity, with or without an `eval/` prefix), else 'max' (accuracy, F1, correlations,
    exact match: every metric of `TASK_METRICS` and `squad_scores`)."""
    base = name.rsplit("/", 1)[-1].lower()
    return "min" if base.endswith(_LOWER_IS_BETTER) else "max"


TASK_METRICS: dict[str, Callable[[Any, Any], dict[str, float]]] = {
    "accuracy": _accuracy_set,
    "accuracy_f1": _accuracy_f1_set,
    "matthews": _matthews_set,
    "pearson_spearman": _pearson_spearman_set,
    "entity_f1": _entity_f1_set,
}
"""Metric-set name → `(predictions, labels) -> dict[str, float]`; see each function above."""
