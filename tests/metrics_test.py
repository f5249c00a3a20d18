"""Every metric against values worked out by hand (the arithmetic is in the comments)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from flaxbert.metrics import (
    TASK_METRICS,
    accuracy,
    better_direction,
    binary_f1,
    entity_scores,
    exact_match,
    get_entities,
    matthews_corrcoef,
    normalize_answer,
    pearson,
    spearman,
    squad_f1,
    squad_scores,
)

# ---------------------------------------------------------------------------------------------
# accuracy / binary_f1


def test_accuracy_by_hand():
    # preds [1,0,2,2] vs labels [1,1,2,0]: items 0 and 2 right -> 2/4
    value = accuracy([1, 0, 2, 2], [1, 1, 2, 0])
    assert value == 0.5
    assert type(value) is float


def test_accuracy_takes_arrays_and_checks_lengths():
    assert accuracy(np.array([[3], [4]]), np.array([3, 5])) == 0.5  # (2,1) vs (2,): flattened
    with pytest.raises(ValueError, match="different lengths: 2 vs 3"):
        accuracy([1, 2], [1, 2, 3])
    with pytest.raises(ValueError, match="empty"):
        accuracy([], [])


def test_binary_f1_by_hand():
    preds = [1, 1, 0, 1, 0]
    labels = [1, 0, 0, 1, 1]
    # positive=1: tp = items 0,3 = 2; fp = item 1 = 1; fn = item 4 = 1
    # -> P = 2/3, R = 2/3, F1 = 2/3
    assert binary_f1(preds, labels) == pytest.approx(2 / 3)
    # positive=0: tp = item 2 = 1; fp = item 4 (pred 0, label 1) = 1; fn = item 1 = 1
    # -> P = 1/2, R = 1/2, F1 = 2*1/(2*1+1+1) = 1/2
    assert binary_f1(preds, labels, positive=0) == pytest.approx(0.5)


def test_binary_f1_edges():
    # no positive predicted and none true: tp+fp+fn = 0 -> defined as 0.0
    assert binary_f1([0, 0, 0], [0, 0, 0]) == 0.0
    # positives predicted, none right: tp=0, fp=2, fn=1 -> F1 = 0
    assert binary_f1([1, 1, 0], [0, 0, 1]) == 0.0
    # all right: tp=2, fp=fn=0 -> F1 = 4/4 = 1
    assert binary_f1([1, 0, 1], [1, 0, 1]) == 1.0


# ---------------------------------------------------------------------------------------------
# matthews_corrcoef


def test_mcc_binary_by_hand():
    labels = [1, 1, 1, 0, 0, 0, 0, 1]
    preds = [1, 1, 0, 0, 0, 1, 0, 0]
    # tp = items 0,1 = 2; fn = items 2,7 = 2; fp = item 5 = 1; tn = items 3,4,6 = 3
    # MCC = (tp*tn - fp*fn) / sqrt((tp+fp)(tp+fn)(tn+fp)(tn+fn))
    #     = (2*3 - 1*2) / sqrt(3*4*4*5) = 4 / sqrt(240)
    value = matthews_corrcoef(preds, labels)
    assert value == pytest.approx(4 / math.sqrt(240))
    assert type(value) is float


def test_mcc_multiclass_by_hand():
    labels = [0, 0, 1, 1, 2, 2]
    preds = [0, 1, 1, 1, 2, 0]
    # s = 6 items, c = 4 correct (items 0,2,3,4)
    # true counts t = (2,2,2); predicted counts p = (2,3,1)
    # numerator = c*s - sum(p_k t_k) = 24 - (4+6+2) = 12
    # s^2 - sum(p_k^2) = 36 - (4+9+1) = 22; s^2 - sum(t_k^2) = 36 - 12 = 24
    # MCC = 12 / sqrt(22*24)
    assert matthews_corrcoef(preds, labels) == pytest.approx(12 / math.sqrt(22 * 24))


def test_mcc_extremes_and_zero_denominator():
    # all right: tp=2, tn=2, fp=fn=0 -> 4/sqrt(2*2*2*2) = 1
    assert matthews_corrcoef([1, 0, 1, 0], [1, 0, 1, 0]) == pytest.approx(1.0)
    # all wrong: tp=tn=0, fp=2, fn=2 -> -4/sqrt(2*2*2*2) = -1
    assert matthews_corrcoef([0, 1, 0, 1], [1, 0, 1, 0]) == pytest.approx(-1.0)
    # all predictions one class: (tp+fp)(tn+fn) has a 0 factor -> 0.0 by convention
    assert matthews_corrcoef([1, 1, 1], [0, 1, 1]) == 0.0
    # all labels one class: same
    assert matthews_corrcoef([0, 1, 1], [1, 1, 1]) == 0.0


# ---------------------------------------------------------------------------------------------
# pearson / spearman


def test_pearson_by_hand():
    # x = [1,2,3], y = [1,3,2]; means 2, 2; dx = (-1,0,1), dy = (-1,1,0)
    # r = sum(dx*dy) / sqrt(sum(dx^2) sum(dy^2)) = 1 / sqrt(2*2) = 0.5
    value = pearson([1, 2, 3], [1, 3, 2])
    assert value == pytest.approx(0.5)
    assert type(value) is float


def test_spearman_by_hand():
    # ranks of y = [10,30,20,40] are (1,3,2,4); d = (0,-1,1,0), sum(d^2) = 2
    # rho = 1 - 6*2 / (4*(16-1)) = 1 - 12/60 = 0.8
    value = spearman([1, 2, 3, 4], [10, 30, 20, 40])
    assert value == pytest.approx(0.8)
    assert type(value) is float


def test_spearman_averages_tied_ranks():
    # ranks of [1,2,2,3] with ties averaged: (1, 2.5, 2.5, 4); of [1,2,3,4]: (1,2,3,4)
    # centred: (-1.5, 0, 0, 1.5) and (-1.5, -0.5, 0.5, 1.5)
    # rho = (2.25 + 0 + 0 + 2.25) / sqrt(4.5 * 5) = 4.5 / sqrt(22.5) = sqrt(0.9)
    assert spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(math.sqrt(0.9))


def test_correlation_input_checks():
    for fn in (pearson, spearman):
        with pytest.raises(ValueError, match="at least 2 items"):
            fn([1.0], [2.0])
        with pytest.raises(ValueError, match="different lengths"):
            fn([1.0, 2.0], [1.0, 2.0, 3.0])
        # constant predictions: r is 0/0 -> 0.0 by convention (not NaN)
        assert fn([2.0, 2.0, 2.0], [1.0, 2.0, 3.0]) == 0.0
        # two items are enough: perfectly anti-correlated -> -1
        assert fn([1.0, 2.0], [5.0, 4.0]) == pytest.approx(-1.0)


# ---------------------------------------------------------------------------------------------
# get_entities


@pytest.mark.parametrize(
    "tags, expected",
    [
        # IOB2: PER spans 0-1, O ends it, LOC 3-3
        ("B-PER I-PER O B-LOC", [("PER", 0, 1), ("LOC", 3, 3)]),
        # IOB1: I- after O (or at the start) starts a chunk
        ("I-PER I-PER O I-LOC", [("PER", 0, 1), ("LOC", 3, 3)]),
        # a type change ends the chunk and I-LOC starts a new one
        ("B-PER I-LOC", [("PER", 0, 0), ("LOC", 1, 1)]),
        ("B-PER I-LOC I-LOC", [("PER", 0, 0), ("LOC", 1, 2)]),
        # a new B- ends the chunk even with the same type
        ("B-PER B-PER", [("PER", 0, 0), ("PER", 1, 1)]),
        # IOBES
        ("S-PER", [("PER", 0, 0)]),
        ("B-X E-X", [("X", 0, 1)]),
        ("B-PER I-PER E-PER S-LOC O E-ORG", [("PER", 0, 2), ("LOC", 3, 3), ("ORG", 5, 5)]),
        # after E- or S- the chunk is closed, so I-/E- of the same type start a new one
        ("E-X E-X", [("X", 0, 0), ("X", 1, 1)]),
        ("S-X I-X", [("X", 0, 0), ("X", 1, 1)]),
        ("B-X I-X E-X I-X", [("X", 0, 2), ("X", 3, 3)]),
        # a chunk open at the end is closed at the last token
        ("O B-MISC I-MISC", [("MISC", 1, 2)]),
        # tags without a type belong to the type "_"
        ("B I O B-PER", [("_", 0, 1), ("PER", 3, 3)]),
        # only the first "-" separates prefix and type
        ("B-MISC-X I-MISC-X", [("MISC-X", 0, 1)]),
        ("O O", []),
        ("", []),
    ],
)
def test_get_entities(tags, expected):
    assert get_entities(tags.split()) == expected


def test_get_entities_rejects_unknown_prefixes():
    with pytest.raises(ValueError, match="unknown tag 'X-PER'"):
        get_entities(["O", "X-PER"])
    with pytest.raises(ValueError, match="unknown tag 'PER'"):
        get_entities(["PER"])


# ---------------------------------------------------------------------------------------------
# entity_scores

TRUE = [["B-PER", "I-PER", "O", "B-LOC"], ["B-ORG", "O"]]
PRED = [["B-PER", "O", "O", "B-LOC"], ["B-ORG", "B-MISC"]]
# true chunks: s0 PER 0-1, LOC 3-3; s1 ORG 0-0                      -> 3
# pred chunks: s0 PER 0-0 (wrong end), LOC 3-3; s1 ORG 0-0, MISC 1-1 -> 4
# tp = LOC, ORG = 2; fp = PER 0-0, MISC = 2; fn = PER 0-1 = 1


def test_entity_scores_by_hand():
    scores = entity_scores(TRUE, PRED)
    # P = 2/4, R = 2/3, F1 = 2*tp/(2*tp+fp+fn) = 4/(4+2+1) = 4/7
    assert scores["precision"] == pytest.approx(0.5)
    assert scores["recall"] == pytest.approx(2 / 3)
    assert scores["f1"] == pytest.approx(4 / 7)
    per_type = scores["per_type"]
    assert sorted(per_type) == ["LOC", "MISC", "ORG", "PER"]
    # PER: the span with the wrong end is both an FP and an FN: tp=0, fp=1, fn=1 -> 0, 0, 0
    assert per_type["PER"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}
    # LOC, ORG: tp=1, fp=0, fn=0 -> 1, 1, 1
    assert per_type["LOC"] == {"precision": 1.0, "recall": 1.0, "f1": 1.0, "support": 1}
    assert per_type["ORG"] == {"precision": 1.0, "recall": 1.0, "f1": 1.0, "support": 1}
    # MISC: predicted only: tp=0, fp=1, no true chunk -> recall 0/0 = 0.0, support 0
    assert per_type["MISC"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}


def test_entity_scores_wrong_end_is_fp_and_fn():
    # true PER 0-1, predicted PER 0-0: tp=0, fp=1, fn=1 -> all 0
    scores = entity_scores([["B-PER", "I-PER"]], [["B-PER", "O"]])
    assert (scores["precision"], scores["recall"], scores["f1"]) == (0.0, 0.0, 0.0)


def test_entity_scores_do_not_match_across_sentences():
    # the same span PER 0-0, but in sentence 0 (true) and sentence 1 (pred): tp=0, fp=1, fn=1
    scores = entity_scores([["B-PER", "O"], ["O", "O"]], [["O", "O"], ["B-PER", "O"]])
    assert (scores["precision"], scores["recall"], scores["f1"]) == (0.0, 0.0, 0.0)


def test_entity_scores_perfect_and_empty():
    assert entity_scores(TRUE, TRUE)["f1"] == 1.0
    # no chunks anywhere: every ratio is 0/0 -> 0.0
    empty = entity_scores([["O", "O"]], [["O", "O"]])
    assert empty == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "per_type": {}}


def test_entity_scores_length_mismatch_names_sentence():
    with pytest.raises(ValueError, match="sentence 1: 2 true tags but 1 predicted"):
        entity_scores([["O"], ["O", "B-PER"]], [["O"], ["O"]])
    with pytest.raises(ValueError, match="2 true sequences but 1 predicted"):
        entity_scores([["O"], ["O"]], [["O"]])


# ---------------------------------------------------------------------------------------------
# SQuAD v1.1


@pytest.mark.parametrize(
    "text, expected",
    [
        ("The  Cat!", "cat"),  # lower, drop "!", drop "the", collapse spaces
        ("U.S.A.", "usa"),  # punctuation removed inside words
        ("theater an apple", "theater apple"),  # articles only as whole words
        ("A\tb\n  AN c", "b c"),
        ("the-end", "theend"),  # punctuation first, so "the" is no longer a word
        ("서울의 The 한강", "서울의 한강"),  # no language-specific rules...
        ("“한강”。", "“한강”。"),  # ...so non-ASCII punctuation stays
        ("", ""),
    ],
)
def test_normalize_answer(text, expected):
    assert normalize_answer(text) == expected


def test_exact_match():
    assert exact_match("The Cat.", ["dog", "cat"]) == 1.0  # "cat" == "cat"
    assert exact_match("black cat", ["cat"]) == 0.0
    # both normalise to "": equal strings -> 1.0 (v1.1 behaviour)
    assert exact_match("The", ["a"]) == 1.0
    with pytest.raises(ValueError, match="at least one answer"):
        exact_match("cat", [])


def test_squad_f1_partial_overlap_by_hand():
    # "the big red cat" -> [big, red, cat]; "a red cat sat" -> [red, cat, sat]
    # common = {red, cat} = 2 -> P = 2/3, R = 2/3, F1 = 2/3
    assert squad_f1("the big red cat", ["a red cat sat"]) == pytest.approx(2 / 3)
    # "red cat" -> 2 tokens; "The big red cat sat down" -> [big, red, cat, sat, down] = 5
    # common 2 -> P = 1, R = 2/5, F1 = 2*1*0.4/1.4 = 4/7
    assert squad_f1("red cat", ["The big red cat sat down"]) == pytest.approx(4 / 7)
    # repeated tokens count with multiplicity: common = min(3, 1) = 1
    # -> P = 1/3, R = 1, F1 = 2*(1/3)/(4/3) = 1/2
    assert squad_f1("cat cat cat", ["cat"]) == pytest.approx(0.5)


def test_squad_f1_max_over_ground_truths():
    # vs "dog": no common token -> 0
    # vs "big red cat": common 2 -> P = 2/2, R = 2/3, F1 = 2*(2/3)/(5/3) = 0.8
    # vs "red": common 1 -> P = 1/2, R = 1, F1 = 2/3
    # max = 0.8
    assert squad_f1("red cat", ["dog", "big red cat", "red"]) == pytest.approx(0.8)


def test_squad_f1_edges():
    assert squad_f1("dog", ["cat"]) == 0.0  # no common token
    assert squad_f1("The Cat!", ["cat"]) == 1.0
    # both empty after normalisation: no common token -> 0 in v1.1 (EM is 1 here)
    assert squad_f1("the", ["a"]) == 0.0
    with pytest.raises(ValueError, match="at least one answer"):
        squad_f1("cat", [])


def test_squad_scores_by_hand():
    answers = {"q1": ["Paris"], "q2": ["red cat", "the cat"], "q3": ["1990"]}
    predictions = {"q1": "paris.", "q2": "big cat", "unasked": "x"}
    # q1: "paris" == "paris" -> EM 1, F1 1
    # q2: EM 0; F1 vs "red cat": common {cat} -> P = 1/2, R = 1/2 -> 1/2
    #           F1 vs "cat":     common {cat} -> P = 1/2, R = 1   -> 2/3; max 2/3
    # q3: no prediction -> 0, 0; "unasked" is ignored
    # On the 0-1 scale of every metric: EM = (1 + 0 + 0) / 3 = 1/3; F1 = (1 + 2/3 + 0) / 3 = 5/9
    scores = squad_scores(predictions, answers)
    assert scores["exact_match"] == pytest.approx(1 / 3)
    assert scores["f1"] == pytest.approx(5 / 9)
    assert scores["missing"] == 1
    with pytest.raises(ValueError, match="answers is empty"):
        squad_scores({}, {})


# ---------------------------------------------------------------------------------------------
# TASK_METRICS


def test_task_metrics_names():
    assert set(TASK_METRICS) == {
        "accuracy",
        "accuracy_f1",
        "matthews",
        "pearson_spearman",
        "entity_f1",
    }


def test_task_metrics_classification_sets():
    preds = [1, 1, 0, 1, 0]
    labels = [1, 0, 0, 1, 1]
    # 3 of 5 right (items 0,2,3) -> accuracy 0.6; F1 of class 1 = 2/3 (see test_binary_f1_by_hand)
    assert TASK_METRICS["accuracy"](preds, labels) == {"accuracy": pytest.approx(0.6)}
    assert TASK_METRICS["accuracy_f1"](preds, labels) == {
        "accuracy": pytest.approx(0.6),
        "f1": pytest.approx(2 / 3),
        "accuracy_and_f1": pytest.approx((0.6 + 2 / 3) / 2),
    }
    # tp=2, tn=1, fp=1, fn=1 -> MCC = (2*1 - 1*1) / sqrt(3*3*2*2) = 1/6
    assert TASK_METRICS["matthews"](preds, labels) == {
        "matthews_corrcoef": pytest.approx(1 / 6),
        "accuracy": pytest.approx(0.6),
    }


def test_task_metrics_regression_set():
    # pearson 0.5 (test_pearson_by_hand); ranks equal the values, so spearman is 0.5 as well
    result = TASK_METRICS["pearson_spearman"]([1.0, 2.0, 3.0], [1.0, 3.0, 2.0])
    assert result == {
        "pearson": pytest.approx(0.5),
        "spearman": pytest.approx(0.5),
        "pearson_spearman": pytest.approx(0.5),
    }


def test_task_metrics_entity_set():
    # predictions first, labels second; entity scores as in test_entity_scores_by_hand
    # tokens: s0 B-PER ok, I-PER/O wrong, O ok, B-LOC ok; s1 B-ORG ok, O/B-MISC wrong -> 4/6
    result = TASK_METRICS["entity_f1"](PRED, TRUE)
    assert result == {
        "precision": pytest.approx(0.5),
        "recall": pytest.approx(2 / 3),
        "f1": pytest.approx(4 / 7),
        "accuracy": pytest.approx(4 / 6),
    }


def test_task_metrics_return_plain_floats():
    results = [
        TASK_METRICS["accuracy_f1"](np.array([1, 0]), np.array([1, 1])),
        TASK_METRICS["matthews"](np.array([1, 0]), np.array([1, 0])),
        TASK_METRICS["pearson_spearman"](np.array([1.0, 2.0, 4.0]), np.array([1.0, 3.0, 2.0])),
        TASK_METRICS["entity_f1"](PRED, TRUE),
    ]
    for result in results:
        assert all(type(v) is float for v in result.values()), result


def test_better_direction_of_metric_names():
    for name in ("eval/loss", "mlm_loss", "eval/mse", "rmse", "eval/error", "perplexity"):
        assert better_direction(name) == "min", name
    for name in ("eval/accuracy", "f1", "eval/pearson", "exact_match", "matthews_corrcoef"):
        assert better_direction(name) == "max", name
