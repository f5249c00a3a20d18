"""The WordPiece tokenizer against transformers' BertTokenizer (the pure-Python reference,
built from vocabularies these tests write) on composed and decomposed Unicode: Latin
accents and Korean text from the shared NSMC task, cased and uncased. The ids must be
BertTokenizer's, and every span `encode_with_offsets` gives must slice the ORIGINAL text
(decomposed or not) to the characters the piece came from."""

import collections
import csv
import unicodedata

import numpy as np
import pytest
from shared_data import TASKS, require
from transformers import BertTokenizer

from flaxbert.tokenizer import SPECIAL_TOKENS, WordPieceCasing, WordPieceTokenizer

NSMC = TASKS / "nsmc" / "train.tsv"
LATIN = (
    "café",
    "Café au lait, résumé and naïve señor!",
    "Ångström's façade: élan, déjà vu.",
    "CAFÉ Über",
)


def _reviews(n: int) -> list[str]:
    require(NSMC)  # the house rule: skipped on a machine without it, a failure under CI
    with open(NSMC, encoding="utf-8") as f:
        rows = csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        return [r["document"] for r, _ in zip(rows, range(n), strict=False) if r["document"]]


def _vocab(texts: list[str], lowercase: bool) -> list[str]:
    """Special tokens, the 300 most frequent words, then every character (composed and, for
    the accent-stripping uncased normaliser, decomposed) alone and as a "##" continuation:
    enough that most words split into pieces and some stay whole, with a few [UNK]s left
    by leaving out the rarest characters."""
    words, chars = collections.Counter(), collections.Counter()
    for t in texts:
        t = unicodedata.normalize("NFC", t)
        if lowercase:
            t = unicodedata.normalize("NFD", t.lower())
            t = "".join(c for c in t if unicodedata.category(c) != "Mn")
        words.update(t.split())
        chars.update(c for c in t if not c.isspace())
    pieces = list(SPECIAL_TOKENS) + [w for w, _ in words.most_common(300)]
    for c, _ in chars.most_common()[:-5]:  # the 5 rarest characters stay unknown
        pieces += [c, "##" + c]
    return list(dict.fromkeys(pieces))


def _piece_text(piece: str) -> str:
    return piece[2:] if piece.startswith("##") else piece


def _normalised(span: str, lowercase: bool) -> str:
    """A span of the original text as BertTokenizer sees it (NFC, then lowercasing and
    accent stripping when uncased)."""
    span = unicodedata.normalize("NFC", span)
    if lowercase:
        span = unicodedata.normalize("NFD", span.lower())
        span = "".join(c for c in span if unicodedata.category(c) != "Mn")
    return span


@pytest.mark.parametrize("lowercase", [False, True], ids=["cased", "uncased"])
def test_decomposed_unicode_tokenises_like_bert_tokenizer(tmp_path, lowercase):
    reviews = _reviews(300)
    texts = list(LATIN) + reviews
    pieces = _vocab(texts, lowercase)
    path = tmp_path / "vocab.txt"
    path.write_text("".join(p + "\n" for p in pieces), encoding="utf-8")
    reference = BertTokenizer(str(path), do_lower_case=lowercase)
    ours = WordPieceTokenizer(pieces, WordPieceCasing(lowercase))

    decomposed_differs = unk = known = 0
    for text in texts:
        for form in ("NFC", "NFD"):
            sample = unicodedata.normalize(form, text)
            decomposed_differs += sample != text
            expected = reference.encode(sample, add_special_tokens=False)
            ids, start, end = ours.encode_with_offsets(sample)
            assert ids.tolist() == expected, (form, sample)
            assert ours.encode(sample).tolist() == expected
            # The same pieces whichever form the text is written in.
            assert ids.tolist() == ours.encode(unicodedata.normalize("NFC", text)).tolist()
            assert (np.diff(start) >= 0).all() and (end >= start).all()
            # Pieces that split one character (uncased: the jamo of a Hangul syllable) share
            # it: spans that overlap are checked together.
            groups = []
            for i, a, b in zip(ids.tolist(), start.tolist(), end.tolist(), strict=True):
                if groups and a < groups[-1][1]:
                    groups[-1][1] = max(groups[-1][1], b)
                    groups[-1][2].append(i)
                else:
                    groups.append([a, b, [i]])
            for a, b, group in groups:
                span = sample[a:b]
                assert span and not span[0].isspace() and not span[-1].isspace(), (sample, a, b)
                if SPECIAL_TOKENS.index("[UNK]") in group:
                    unk += 1
                    continue
                known += len(group)
                # The span is exactly the characters the pieces spell, as written.
                spelled = "".join(_piece_text(pieces[i]) for i in group)
                assert _normalised(span, lowercase) == spelled, (sample, span, spelled)
    assert decomposed_differs > 100  # the NFD forms really are different strings
    assert known > 5000 and 0 < unk < known // 10

    # The cases of the issue, spelled out.
    cafe = "cafe\u0301"  # "café" with a combining acute accent
    ids, start, end = ours.encode_with_offsets(cafe)
    assert [pieces[i] for i in ids] == ["cafe" if lowercase else "café"]
    assert (start.tolist(), end.tolist()) == ([0], [5])
    review = unicodedata.normalize("NFD", reviews[0])
    assert len(review) > len(reviews[0])  # Hangul syllables became jamo
    ids, start, end = ours.encode_with_offsets(review)
    assert ids.tolist() == reference.encode(review, add_special_tokens=False)
    if not lowercase:
        assert ids.tolist() == ours.encode(reviews[0]).tolist()
        rebuilt = "".join(
            unicodedata.normalize("NFC", review[a:b]) for a, b in zip(start, end, strict=True)
        )
        assert rebuilt == reviews[0].replace(" ", "")
