"""Piece offsets (`Tokenizer.encode_with_offsets`) and token-classification features."""

from __future__ import annotations

import dataclasses
import unicodedata

import numpy as np
import pytest
from shared_data import DATA, corpus_head

from flaxbert.data.token_labels import (
    FEATURE_KEYS,
    IGNORE_INDEX,
    batch_token_examples,
    encode_token_example,
    word_predictions,
)
from flaxbert.tokenizer import CLS_ID, NUM_BYTE_PIECES, NUM_SPECIAL, PAD_ID, SEP_ID, Tokenizer
from flaxbert.tokenizer import train_tokenizer as _train

LABELS = ["O"] + [f"{p}-{t}" for t in ("PS", "LC", "OG", "DT", "TI", "QT") for p in "BI"]
LABEL_TO_ID = {t: i for i, t in enumerate(LABELS)}


@dataclasses.dataclass
class TokenExample:  # stand-in for flaxbert.data.tasks.TokenExample
    guid: str
    words: list[str]
    labels: list[str] | None


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> Tokenizer:
    """A 1500-piece unigram model on 3000 Korean reviews and 3000 English paragraphs."""
    tmp = tmp_path_factory.mktemp("tok")
    ko = corpus_head("ko_nsmc_reviews.txt", 3000, tmp / "ko.txt")
    en = corpus_head("en_gutenberg.txt", 3000, tmp / "en.txt")
    return Tokenizer.load(_train([str(ko), str(en)], 1500, str(tmp / "sp"), max_sentences=6000))


def _is_byte(tok: Tokenizer, i: int) -> bool:
    return NUM_SPECIAL <= i < NUM_SPECIAL + NUM_BYTE_PIECES


OFFSET_TEXTS = [
    "Emma Woodhouse, handsome, clever,  and rich.",
    "  leading and trailing spaces   ",
    "a parrot 🦜 and a rare Hanja 鬱 and ü in ﬁne print",
    "서울은 한국의 수도이다.   정말    재밌었다 ㅋㅋ 👍👍",
    "탭\t문자와\u3000전각 공백, 그리고 ＡＢＣ",
    "🦜",
    "",
]


@pytest.mark.parametrize("text", OFFSET_TEXTS)
def test_offsets_cover_each_piece_in_the_original_text(tok, text):
    ids, start, end = tok.encode_with_offsets(text)
    np.testing.assert_array_equal(ids, tok.encode(text))
    assert ids.dtype == start.dtype == end.dtype == np.int32
    assert len(ids) == len(start) == len(end)
    assert (0 <= start).all() and (start <= end).all() and (end <= len(text)).all()
    assert (np.diff(start) >= 0).all() and (np.diff(end) >= 0).all()
    covered = set()
    for i, s, e in zip(ids.tolist(), start.tolist(), end.tolist(), strict=True):
        piece = tok.id_to_piece(i)
        surface = text[s:e]
        covered.update(range(s, e))
        if piece == "▁":  # bare space piece: empty, at the start of the word it opens
            assert s == e and not text[s].isspace(), (piece, s, text)
        elif _is_byte(tok, i):  # a character spelled in bytes: the whole character
            normalised = unicodedata.normalize("NFKC", surface)
            assert len(normalised) == 1, (piece, surface)
            assert piece in [f"<0x{b:02X}>" for b in normalised.encode()], (piece, surface)
        else:
            assert not surface[:1].isspace(), (piece, surface)  # never swallows the space
            expected = piece.lstrip("▁")
            if unicodedata.normalize("NFKC", surface) == surface:
                assert surface == expected, (piece, surface)
            else:  # ﬁ -> "f" "i", Ａ -> A: the span is where the normalised piece came from
                assert expected in unicodedata.normalize("NFKC", text[s:e]), (piece, surface)
    # Every character is covered, except whitespace.
    assert covered == {i for i, c in enumerate(text) if not c.isspace()}


def test_offsets_of_byte_pieces_and_spaces(tok):
    text = "x 🦜  鬱"
    ids, start, end = tok.encode_with_offsets(text)
    spans = [
        (tok.id_to_piece(i), text[s:e], (s, e)) for i, s, e in zip(ids, start, end, strict=True)
    ]
    parrot = [sp for sp in spans if sp[1] == "🦜"]
    hanja = [sp for sp in spans if sp[1] == "鬱"]
    assert [p for p, _, _ in parrot] == ["<0xF0>", "<0x9F>", "<0xA6>", "<0x9C>"]
    assert {span for _, _, span in parrot} == {(2, 3)}
    assert [p for p, _, _ in hanja] == ["<0xE9>", "<0xAC>", "<0xB1>"]
    assert {span for _, _, span in hanja} == {(5, 6)}
    # The bare "▁" before each sits at the character, not on the spaces before it.
    bare = [span for p, _, span in spans if p == "▁"]
    assert (2, 2) in bare and (5, 5) in bare


def _features(tok, words, labels, max_len=64, **kw):
    return encode_token_example(tok, words, labels, LABEL_TO_ID, max_len, **kw)


def _gold_predictions(features):
    """Per-position predictions equal to the gold labels where there are labels."""
    return np.where(features["label_ids"] >= 0, features["label_ids"], 0)


def _check_layout(tok, feats, text, max_len):
    ids = tok.encode(text)
    n = min(len(ids), max_len - 2)
    assert feats["input_ids"][0] == CLS_ID and feats["input_ids"][n + 1] == SEP_ID
    np.testing.assert_array_equal(feats["input_ids"][1 : n + 1], ids[:n])
    assert (feats["input_ids"][n + 2 :] == PAD_ID).all()
    assert feats["input_mask"].sum() == n + 2 and feats["input_mask"][: n + 2].all()
    assert not feats["segment_ids"].any()
    for k in FEATURE_KEYS:
        assert feats[k].shape == (max_len,) and feats[k].dtype == np.int32
    labelled = feats["label_ids"] != IGNORE_INDEX
    assert not labelled[0] and not labelled[n + 1 :].any()
    np.testing.assert_array_equal(labelled, feats["word_index"] >= 0)


def test_english_words_label_their_first_piece(tok):
    words = ["Emma", "Woodhouse", ",", "handsome", "and", "rich", ",", "visited", "Highbury"]
    labels = ["B-PS", "I-PS", "O", "O", "O", "O", "O", "O", "B-LC"]
    feats, dropped = _features(tok, words, labels)
    text = " ".join(words)
    assert dropped == 0
    _check_layout(tok, feats, text, 64)
    _, start, _ = tok.encode_with_offsets(text)
    word_starts = np.cumsum([0] + [len(w) + 1 for w in words[:-1]])
    positions = np.flatnonzero(feats["word_index"] >= 0)
    # Every word has exactly one labelled position: its first piece, in order.
    np.testing.assert_array_equal(feats["word_index"][positions], np.arange(len(words)))
    np.testing.assert_array_equal(start[positions - 1], word_starts)
    np.testing.assert_array_equal(feats["label_ids"][positions], [LABEL_TO_ID[t] for t in labels])
    # More pieces than words: continuation pieces carry no label.
    assert feats["input_mask"].sum() - 2 > len(words)
    tags = word_predictions(
        _gold_predictions(feats), feats["word_index"], len(words), LABELS, **_lw(feats)
    )
    assert tags == labels


def _lw(feats):
    return {"last_word": feats["last_word"]}


def test_korean_words_round_trip(tok):
    words = ["지난달", "서울에서", "조지", "부시를", "만났는데", "👍👍", "정말", "鬱했다", "."]
    labels = ["B-DT", "B-LC", "B-PS", "I-PS", "O", "O", "O", "O", "O"]
    feats, dropped = _features(tok, words, labels)
    assert dropped == 0
    _check_layout(tok, feats, " ".join(words), 64)
    assert sorted(feats["word_index"][feats["word_index"] >= 0]) == list(range(len(words)))
    pred = _gold_predictions(feats)
    for last in (feats["last_word"], None):  # nothing merged: both give the gold tags
        assert word_predictions(pred, feats["word_index"], len(words), LABELS, last_word=last) == (
            labels
        )
    # Prediction-time features: no labels, same inputs.
    unlabelled, _ = _features(tok, words, None)
    assert (unlabelled["label_ids"] == IGNORE_INDEX).all()
    np.testing.assert_array_equal(unlabelled["input_ids"], feats["input_ids"])
    np.testing.assert_array_equal(unlabelled["word_index"], feats["word_index"])


def _klue(sentence: str, entities: dict[str, str]) -> tuple[list[str], list[str]]:
    """Characters and KLUE-style character tags (a space inside an entity is I-X)."""
    chars = list(sentence)
    tags = ["O"] * len(chars)
    for surface, kind in entities.items():
        at = sentence.index(surface)
        tags[at] = f"B-{kind}"
        for k in range(at + 1, at + len(surface)):
            tags[k] = f"I-{kind}"
    return chars, tags


def _merged(feats, num_words):
    """Words without a position of their own but inside a piece of an earlier word."""
    merged = set()
    current = -1
    for w, last in zip(feats["word_index"], feats["last_word"], strict=True):
        current = w if w >= 0 else current
        if last > current >= 0:
            merged.update(range(current + 1, last + 1))
    return merged


def test_klue_characters(tok):
    sentence = "지난달 30일 서울에서 조지 부시를 만났다."
    chars, tags = _klue(sentence, {"지난달 30일": "DT", "서울": "LC", "조지 부시": "PS"})
    feats, dropped = _features(tok, chars, tags)  # every word one character: joined by ""
    assert dropped == 0
    _check_layout(tok, feats, sentence, 64)
    index = feats["word_index"]
    spaces = [i for i, c in enumerate(chars) if c == " "]
    assert not np.isin(spaces, index).any()  # a space has no piece of its own
    merged = _merged(feats, len(chars))
    positioned = set(index[index >= 0].tolist())
    assert positioned | merged | set(spaces) == set(range(len(chars)))
    assert not positioned & merged
    # This model merges "에서" into one piece: "서" is merged into "에"'s piece.
    assert chars.index("에") + 1 in merged
    got = word_predictions(_gold_predictions(feats), index, len(chars), LABELS, **_lw(feats))
    # Spaces inside "지난달 30일" and "조지 부시" come back I-X, the others O; merged
    # characters continue their piece's tag. Entity boundaries here fall between pieces.
    assert got == tags


def test_fill_rules_without_a_tokenizer():
    #          words: 0=B-PS 1(merged) 2=" " 3=B-LC 4=" " 5=I-LC 6=" " 7=O 8(merged) 9, 10: cut
    # positions:      CLS  w0   w3   w5   w7   SEP
    word_index = np.array([-1, 0, 3, 5, 7, -1, -1])
    last_word = np.array([-1, 1, 3, 5, 8, -1, -1])
    pred_tags = ["B-PS", "B-LC", "I-LC", "O"]
    pred = np.zeros(7, dtype=np.int32)
    pred[[1, 2, 3, 4]] = [LABEL_TO_ID[t] for t in pred_tags]
    got = word_predictions(pred, word_index, 11, LABELS, last_word=last_word)
    assert got == ["B-PS", "I-PS", "O", "B-LC", "I-LC", "I-LC", "O", "O", "O", "O", "O"]
    # Without last_word, word 1 is a gap: the next prediction (B-LC) does not continue PS.
    got = word_predictions(pred, word_index, 11, LABELS)
    assert got[:3] == ["B-PS", "O", "O"]
    # The fill tag and a dict id_to_label work too.
    got = word_predictions(pred, word_index, 11, dict(enumerate(LABELS)), fill="X")
    assert got[-2:] == ["X", "X"] and got[6] == "X"


def test_truncation_drops_and_counts_words(tok):
    words = ("Emma visited Highbury and Hartfield with her father on a cold winter day").split()
    labels = ["B-PS", "O", "B-LC", "O", "B-LC"] + ["O"] * (len(words) - 5)
    full, dropped = _features(tok, words, labels, max_len=64)
    assert dropped == 0
    n_pieces = int(full["input_mask"].sum()) - 2
    for max_len in (8, 12, n_pieces + 1):  # the last one cuts one piece
        feats, dropped = _features(tok, words, labels, max_len=max_len)
        _check_layout(tok, feats, " ".join(words), max_len)
        kept = feats["word_index"][feats["word_index"] >= 0]
        assert dropped == len(words) - (kept.max() + 1) > 0
        tags = word_predictions(
            _gold_predictions(feats), feats["word_index"], len(words), LABELS, **_lw(feats)
        )
        assert tags[: len(words) - dropped] == labels[: len(words) - dropped]
        assert tags[len(words) - dropped :] == ["O"] * dropped
    feats, dropped = _features(tok, words, labels, max_len=n_pieces + 2)  # just fits
    assert dropped == 0
    # Character input: dropped characters are counted the same way.
    chars, tags = _klue("서울에서 조지 부시를 만났다", {"서울": "LC", "조지 부시": "PS"})
    feats, dropped = _features(tok, chars, tags, max_len=6)
    reached = feats["last_word"].max()
    assert dropped == len(chars) - reached - 1 > 0
    with pytest.raises(ValueError, match="max_seq_length"):
        _features(tok, words, labels, max_len=2)


def test_batch_and_errors(tok):
    examples = [
        TokenExample("a", ["Emma", "visited", "Highbury"], ["B-PS", "O", "B-LC"]),
        TokenExample("b", list("서울 구경"), ["B-LC", "I-LC", "O", "O", "O"]),
        TokenExample("c", ["a"] * 40, ["O"] * 40),
        TokenExample("d", [], []),
    ]
    feats, dropped = batch_token_examples(tok, examples, LABEL_TO_ID, 16)
    assert set(feats) == set(FEATURE_KEYS)
    for k in FEATURE_KEYS:
        assert feats[k].shape == (4, 16) and feats[k].dtype == np.int32
    assert dropped.tolist()[:2] == [0, 0] and dropped[2] > 0 and dropped[3] == 0
    one, _ = encode_token_example(tok, examples[1].words, examples[1].labels, LABEL_TO_ID, 16)
    for k in FEATURE_KEYS:
        np.testing.assert_array_equal(feats[k][1], one[k])
    assert feats["input_mask"][3].sum() == 2  # [CLS] [SEP]
    empty, dropped = batch_token_examples(tok, [], LABEL_TO_ID, 16)
    assert empty["input_ids"].shape == (0, 16) and dropped.shape == (0,)
    with pytest.raises(ValueError, match="'B-XX'.*not among"):
        encode_token_example(tok, ["Emma"], ["B-XX"], LABEL_TO_ID, 16)
    with pytest.raises(ValueError, match="2 words but 1 labels"):
        encode_token_example(tok, ["Emma", "x"], ["O"], LABEL_TO_ID, 16)


def _read_klue(path, limit):
    sentences, chars, tags = [], [], []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.rstrip("\n")
            if line.startswith("## "):
                continue
            if not line:
                if chars:
                    sentences.append((chars, tags))
                    chars, tags = [], []
                    if len(sentences) == limit:
                        break
                continue
            char, tag = line.split("\t")
            chars.append(char)
            tags.append(tag)
    return sentences


def test_real_klue_sentences_round_trip(tok):
    path = DATA / "tasks" / "klue_ner" / "dev.tsv"
    if not path.exists():
        pytest.skip(f"KLUE-NER dev set absent at {path} (<repo>/../shared/data)")
    sentences = _read_klue(path, 300)
    total = exact_words = exact_sentences = merged_words = 0
    for chars, tags in sentences:
        feats, dropped = _features(tok, chars, tags, max_len=512)
        assert dropped == 0
        got = word_predictions(
            _gold_predictions(feats), feats["word_index"], len(chars), LABELS, **_lw(feats)
        )
        merged = _merged(feats, len(chars))
        merged_words += len(merged)
        for w, (g, t) in enumerate(zip(got, tags, strict=True)):
            if w not in merged and chars[w] != " ":
                assert g == t, (w, "".join(chars))  # a positioned word: its own prediction
        total += len(chars)
        exact_words += sum(g == t for g, t in zip(got, tags, strict=True))
        exact_sentences += got == tags
    print(
        f"KLUE dev, 1500-piece model: {exact_words / total:.4f} of characters and "
        f"{exact_sentences}/{len(sentences)} sentences recovered from gold piece labels; "
        f"{merged_words / total:.3f} of characters merged into a previous piece"
    )
    assert exact_words / total > 0.99
