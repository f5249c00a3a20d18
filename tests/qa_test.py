"""Extractive QA: sliding-window features, answer positions, decoding back to the text."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from shared_data import DATA, corpus_head

from flaxbert.data.qa import (
    QAFeatures,
    answer_token_span,
    decode_qa,
    decode_qa_nbest,
    locate_answer,
    qa_features,
)
from flaxbert.tokenizer import CLS_ID, PAD_ID, SEP_ID, Tokenizer, train_tokenizer


@dataclasses.dataclass
class QAExample:  # stand-in for flaxbert.data.tasks.QAExample
    qid: str
    question: str
    context: str
    answers: list[tuple[str, int]]


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> Tokenizer:
    """A 1500-piece unigram model on 3000 Korean reviews and 3000 English paragraphs."""
    tmp = tmp_path_factory.mktemp("tok")
    ko = corpus_head("ko_nsmc_reviews.txt", 3000, tmp / "ko.txt")
    en = corpus_head("en_gutenberg.txt", 3000, tmp / "en.txt")
    path = train_tokenizer(
        [str(ko), str(en)], 1500, str(tmp / "sp"), max_sentences=1_000_000, num_threads=1
    )
    return Tokenizer.load(path)


SEOUL = "서울은 대한민국의 수도이며, 인구는 약 천만 명이다. 한강이 도시 가운데를 흐른다."
FILM = "이 영화는 2003년에 개봉했고, 봉준호 감독이 연출했다. 주연은 송강호였다."
EMMA = (
    "Emma Woodhouse, handsome, clever, and rich, had lived nearly twenty-one years in "
    "Highbury. Mr. KNIGHTLEY, a sensible man of about seven or eight-and-thirty, was a very "
    "old and intimate friend."
)
PARROT = "The parrot 🦜 flew  away over the 鬱 forest in ﬁne weather."
HAND_MADE = [  # (context, question, answer): Korean particles, case, double space, bytes, NFKC
    (SEOUL, "대한민국의 수도는?", "서울"),
    (SEOUL, "서울의 인구는?", "약 천만 명"),
    (FILM, "감독은 누구인가?", "봉준호"),
    (FILM, "언제 개봉했나?", "2003년"),
    (EMMA, "Where did Emma live?", "Highbury"),
    (EMMA, "How long had she lived there?", "nearly twenty-one years"),
    (EMMA, "Who was a friend?", "Mr. KNIGHTLEY"),
    (PARROT, "What flew away?", "parrot 🦜 flew  away"),
    (PARROT, "What forest?", "鬱 forest"),
    (PARROT, "What weather?", "ﬁne weather"),
]


def _examples() -> list[QAExample]:
    return [QAExample(f"q{i}", q, c, [(a, c.index(a))]) for i, (c, q, a) in enumerate(HAND_MADE)]


def _one_hot(features: QAFeatures, starts=None, ends=None) -> tuple[np.ndarray, np.ndarray]:
    """Logits that put everything on the gold (or given) start and end of each window."""
    starts = features.start_positions if starts is None else starts
    ends = features.end_positions if ends is None else ends
    s = np.full(features.input_ids.shape, -10.0)
    e = np.full(features.input_ids.shape, -10.0)
    rows = np.arange(len(features))
    s[rows, starts] = 10.0
    e[rows, ends] = 10.0
    return s, e


def test_gold_positions_decode_to_the_exact_answer(tok):
    examples = _examples()
    f = qa_features(examples, tok, max_seq_length=128)
    assert len(f) == len(examples)  # every context fits in one window
    np.testing.assert_array_equal(f.example_index, np.arange(len(examples)))
    assert f.unmatched_answers == 0
    for k, ex in enumerate(examples):
        answer, at = ex.answers[0]
        q = tok.encode(ex.question)
        c = tok.encode(ex.context)
        n = len(q) + len(c) + 3
        expected = np.concatenate([[CLS_ID], q, [SEP_ID], c, [SEP_ID]])
        np.testing.assert_array_equal(f.input_ids[k, :n], expected)
        assert (f.input_ids[k, n:] == PAD_ID).all()
        assert f.input_mask[k].tolist() == [1] * n + [0] * (128 - n)
        assert f.segment_ids[k].tolist() == [0] * (len(q) + 2) + [1] * (len(c) + 1) + [0] * (
            128 - n
        )
        context = slice(len(q) + 2, len(q) + 2 + len(c))
        assert (f.char_start[k, context] >= 0).all() and f.is_max_context[k, context].all()
        outside = np.ones(128, dtype=bool)
        outside[context] = False
        assert (f.char_start[k, outside] == -1).all() and (f.char_end[k, outside] == -1).all()
        assert not f.is_max_context[k, outside].any()
        sp, ep = f.start_positions[k], f.end_positions[k]
        assert len(q) + 2 <= sp <= ep < len(q) + 2 + len(c)
        # The gold pieces' spans are exactly the answer's characters (it is piece-aligned).
        assert (f.char_start[k, sp], f.char_end[k, ep]) == (at, at + len(answer))
    predictions = decode_qa(*_one_hot(f), f, examples)
    assert predictions == {ex.qid: ex.answers[0][0] for ex in examples}


def test_answer_token_span_and_locate():
    # pieces: "▁"(0,0) "서"(0,1) "울"(1,2) "은"(2,3) "▁"(4,4) "한"(4,5) bytes(5,6)x3
    start = np.array([0, 0, 1, 2, 4, 4, 5, 5, 5])
    end = np.array([0, 1, 2, 3, 4, 5, 6, 6, 6])
    assert answer_token_span(start, end, 0, 2) == (1, 2)  # not the bare "▁"
    assert answer_token_span(start, end, 1, 3) == (2, 3)
    assert answer_token_span(start, end, 4, 6) == (5, 8)  # all pieces of the last character
    assert answer_token_span(start, end, 1, 2) == (2, 2)
    assert answer_token_span(start, end, 3, 4) is None  # only the space
    assert answer_token_span(start, end, 0, 5) == (1, 5)  # spans inside pieces widen to them
    text = "a b a b a"  # "a b" at 0 and 4
    assert locate_answer(text, "a b", 4) == 4
    assert locate_answer(text, "a b", 3) == 4  # shifted: the nearest occurrence
    assert locate_answer(text, "a b", 1) == 0
    assert locate_answer(text, "x", 0) is None and locate_answer(text, " ", 1) is None


def test_unanswered_unmatched_and_shifted_answers(tok):
    examples = [
        QAExample("none", "Who?", EMMA, []),
        QAExample("missing", "Who?", EMMA, [("Mr. Elton", 0)]),
        QAExample("shifted", "Where?", EMMA, [("Highbury", EMMA.index("Highbury") - 3)]),
    ]
    f = qa_features(examples, tok, max_seq_length=128)
    assert f.unmatched_answers == 1
    assert f.start_positions[:2].tolist() == [0, 0] and f.end_positions[:2].tolist() == [0, 0]
    at = EMMA.index("Highbury")
    assert f.char_start[2, f.start_positions[2]] == at
    assert f.char_end[2, f.end_positions[2]] == at + len("Highbury")
    # SQuAD v1.1 always answers: with all logits on [CLS], still a span of the context.
    cls = decode_qa(*_one_hot(f, np.zeros(3, int), np.zeros(3, int)), f, examples)
    assert all(text and text in EMMA for text in cls.values())
    # Only a context without pieces has no answer at all.
    blank = [QAExample("blank", "Who?", "   ", [])]
    fb = qa_features(blank, tok, max_seq_length=16)
    assert len(fb) == 1 and fb.input_mask[0].sum() == len(tok.encode("Who?")) + 3
    assert not fb.is_max_context.any() and (fb.char_start == -1).all()
    assert decode_qa(*_one_hot(fb), fb, blank) == {"blank": ""}
    assert decode_qa_nbest(*_one_hot(fb), fb, blank) == {"blank": []}
    with pytest.raises(ValueError, match="leaves no room"):
        qa_features(examples, tok, max_seq_length=4, max_query_length=5)  # 3 specials + >=1
    with pytest.raises(ValueError, match="do not match"):
        decode_qa(np.zeros((3, 4)), np.zeros((3, 4)), f, examples)


def _long_example() -> QAExample:
    colours = ["red", "green", "blue", "white", "black", "yellow", "brown", "grey"]
    sentences = [f"Room {k} holds the {colours[k % 8]} box." for k in range(14)]
    sentences[7] = "Room seven holds the golden key."
    context = " ".join(sentences)
    return QAExample("long", "What does room seven hold?", context, [("the golden key", 0)])


def _windows(f: QAFeatures, q_len: int):
    """(row, first context position, number of context pieces) of every window."""
    offset = q_len + 2
    return [(k, offset, int(f.segment_ids[k].sum()) - 1) for k in range(len(f))]


def test_long_context_slides_windows_with_stride(tok):
    ex = _long_example()
    ex.answers = [("the golden key", ex.context.index("the golden key"))]
    L, stride = 40, 6
    f = qa_features([ex], tok, max_seq_length=L, doc_stride=stride)
    q = tok.encode(ex.question)
    ids, c_start, c_end = tok.encode_with_offsets(ex.context)
    window = L - len(q) - 3
    expected = 1 + -(-(len(ids) - window) // stride)  # windows until one reaches the end
    assert len(f) == expected > 3
    assert (f.example_index == 0).all()
    a0, a1 = answer_token_span(c_start, c_end, ex.answers[0][1], ex.answers[0][1] + 14)
    inside = 0
    for k, offset, n in _windows(f, len(q)):
        begin = k * stride
        assert n == min(window, len(ids) - begin)
        np.testing.assert_array_equal(f.input_ids[k, offset : offset + n], ids[begin : begin + n])
        np.testing.assert_array_equal(f.char_start[k, offset : offset + n], c_start[begin:][:n])
        assert f.input_ids[k, offset + n] == SEP_ID and f.segment_ids[k, offset + n] == 1
        if begin <= a0 and a1 < begin + n:
            inside += 1
            sp, ep = f.start_positions[k], f.end_positions[k]
            assert (sp, ep) == (a0 - begin + offset, a1 - begin + offset)
            assert ex.context[f.char_start[k, sp] : f.char_end[k, ep]] == "the golden key"
        else:
            assert f.start_positions[k] == f.end_positions[k] == 0
    assert len(f) - 1 >= inside >= 2  # several windows hold the answer, not all
    assert begin + n == len(ids)  # the last window reaches the end of the context
    assert decode_qa(*_one_hot(f), f, [ex]) == {"long": "the golden key"}


def test_max_context_picks_the_most_central_window(tok):
    ex = _long_example()
    L, stride = 40, 6
    f = qa_features([ex], tok, max_seq_length=L, doc_stride=stride)
    q_len = len(tok.encode(ex.question))
    num_tokens = len(tok.encode(ex.context))
    holders: dict[int, list[tuple[float, int, int]]] = {t: [] for t in range(num_tokens)}
    for k, offset, n in _windows(f, q_len):
        for i in range(n):
            t = k * stride + i
            holders[t].append((min(i, n - 1 - i) + 0.01 * n, -k, offset + i))
    for t, held in holders.items():
        assert held
        marked = [(k, pos) for _, k, pos in held if f.is_max_context[-k, pos]]
        assert len(marked) == 1, t  # exactly one window owns each piece
        assert marked[0] == max(held)[1:], t  # the best score, earlier window on ties
    # A start is only taken in the window that owns it: the same span scores 20 in a window
    # where its piece is near the edge, 10 in the window that owns it; 10 wins.
    _, c_start, c_end = tok.encode_with_offsets(ex.context)
    t = next(t for t, held in holders.items() if len(held) >= 2 and c_end[t] > c_start[t])
    windows = {-k: pos for _, k, pos in holders[t]}
    owner = next(k for k, pos in windows.items() if f.is_max_context[k, pos])
    other = next(k for k in windows if k != owner)
    s = np.full(f.input_ids.shape, -10.0)
    e = np.full(f.input_ids.shape, -10.0)
    s[other, windows[other]] = e[other, windows[other]] = 10.0
    s[owner, windows[owner]] = e[owner, windows[owner]] = 5.0
    best = decode_qa_nbest(s, e, f, [ex])["long"][0]
    assert best.feature_index == owner and best.score == 10.0
    assert best.char_start == f.char_start[owner, windows[owner]]


def test_max_answer_length_and_order(tok):
    ex = _examples()[5]  # "nearly twenty-one years", several pieces long
    f = qa_features([ex], tok, max_seq_length=128)
    sp, ep = int(f.start_positions[0]), int(f.end_positions[0])
    length = ep - sp + 1
    assert length >= 4
    s, e = _one_hot(f)
    e[0, sp + 1] = 8.0  # a shorter span with a lower score
    e[0, sp - 1] = 9.0  # an end before the start: never valid
    answer = ex.answers[0][0]
    assert decode_qa(s, e, f, [ex], max_answer_length=length) == {ex.qid: answer}
    shorter = decode_qa(s, e, f, [ex], max_answer_length=length - 1)[ex.qid]
    assert shorter == ex.context[f.char_start[0, sp] : f.char_end[0, sp + 1]]
    assert answer.startswith(shorter) and shorter != answer


def test_nbest_is_ranked_distinct_and_valid(tok):
    examples = _examples()
    f = qa_features(examples, tok, max_seq_length=128)
    rng = np.random.default_rng(0)
    s = rng.normal(size=f.input_ids.shape)
    e = rng.normal(size=f.input_ids.shape)
    nbest = decode_qa_nbest(s, e, f, examples, n_best_size=7, max_answer_length=5)
    best = decode_qa(s, e, f, examples, n_best_size=7, max_answer_length=5)
    for ex in examples:
        preds = nbest[ex.qid]
        assert 1 <= len(preds) <= 7  # valid pairs among the 7 best starts x 7 best ends
        scores = [p.score for p in preds]
        assert scores == sorted(scores, reverse=True)
        probs = np.array([p.probability for p in preds])
        assert np.isclose(probs.sum(), 1.0) and (np.diff(probs) <= 1e-12).all()
        assert len({(p.char_start, p.char_end) for p in preds}) == len(preds)
        for p in preds:
            assert p.text == ex.context[p.char_start : p.char_end] and p.text.strip()
            assert np.isclose(p.score, p.start_logit + p.end_logit)
        assert best[ex.qid] == preds[0].text
    assert max(len(p) for p in nbest.values()) == 7
    # With n_best_size over the window length no pair is left out: the best one is the best
    # of a brute-force search over all (start, end) pieces with text, at most 5 apart.
    exhaustive = decode_qa_nbest(s, e, f, examples, n_best_size=128, max_answer_length=5)
    for k, ex in enumerate(examples):
        ctx = np.flatnonzero(f.char_end[k] > f.char_start[k])
        pairs = [(s[k, i] + e[k, j], i, j) for i in ctx for j in ctx if 0 <= j - i < 5]
        top, i, j = max(pairs)
        spans = {(f.char_start[k, i], f.char_end[k, j]) for _, i, j in pairs}
        assert len(exhaustive[ex.qid]) == min(128, len(spans))
        first = exhaustive[ex.qid][0]
        assert np.isclose(first.score, top) and first.score >= nbest[ex.qid][0].score
        assert first.text == ex.context[f.char_start[k, i] : f.char_end[k, j]]


def test_real_squad_questions_decode_from_gold_positions(tok):
    path = DATA / "tasks" / "squad_v1" / "dev.json"
    if not path.exists():
        pytest.skip(f"SQuAD v1.1 dev set absent at {path} (<repo>/../shared/data)")
    with open(path, encoding="utf-8") as fh:
        data = json.load(fh)["data"]
    examples = [
        QAExample(
            qa["id"],
            qa["question"],
            para["context"],
            [(a["text"], a["answer_start"]) for a in qa["answers"]],
        )
        for article in data[:3]
        for para in article["paragraphs"]
        for qa in para["qas"]
    ][:300]
    f = qa_features(examples, tok)  # 384 / 128 / 64
    assert f.unmatched_answers == 0
    assert len(f) > len(examples)  # this small vocabulary needs several windows for some
    predictions = decode_qa(*_one_hot(f), f, examples, max_answer_length=1000)
    exact = [predictions[ex.qid] == ex.answers[0][0] for ex in examples]
    # Misses are answers that end inside a piece ("turbine" of "turbines") or whose start
    # is owned by a window that does not hold the whole answer.
    print(f"SQuAD dev, 1500-piece model: oracle EM {np.mean(exact):.4f} on {len(exact)}")
    assert np.mean(exact) > 0.95
    for ex, ok in zip(examples, exact, strict=True):
        if not ok and predictions[ex.qid]:
            assert predictions[ex.qid] in ex.context
