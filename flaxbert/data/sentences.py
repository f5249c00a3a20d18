"""Sentence splitting for English and Korean text: `split_sentences`.

Every line a corpus reader (`flaxbert.data.text`) gives goes through `split_sentences`, so
the tokenizer trainer and data preparation see the same sentences. The splitter only ever
splits at whitespace, between two words, using punctuation, abbreviations, Korean predicate
endings and decorations (emoticons, ㅋㅋ) as cues; no character is lost and no word broken.
"""

from __future__ import annotations

import re
import unicodedata

# --------------------------------------------------------------------------------------------
# Sentence splitting
#
# The splitter only ever splits at whitespace, between two words, so no character is lost and
# no word is broken: " ".join(split_sentences(line)) == " ".join(line.split()).

_TERMINATORS = ".!?…‼⁇⁈⁉。！？~～"
_TILDES = "~～"
_CLOSERS = "\"'”’»)]}」』〉》】›"
_OPENERS = "\"'“‘«([{「『〈《【‹"
# Runs of these jamo close a sentence: ㅋㅋ/ㅎㅎ laughter, ㅠㅠ/ㅜㅜ tears, ㅡㅡ a frown.
_LAUGH_JAMO = "ㅋㅎㅠㅜㅡ"
_ALNUM_ENDINGS = frozenset("다요죠네까")  # the letters a sentence-ending word may end with

# Words whose final period does not end a sentence (compared lower-case, without the period).
_ABBREVIATIONS = frozenset(
    """mr mrs ms messrs mme mlle dr prof st mt ft sr jr rev hon capt col gen lt sgt maj cmdr
    gov pres sen rep esq vs etc cf viz al ca approx fig figs vol vols ch chap no nos pp sec
    dept inc ltd co corp bros ave blvd rd jan feb mar apr aug sep sept oct nov dec""".split()
)
# Dotted abbreviations: e.g. i.e. U.S. a.m. Ph.D.
_DOTTED = re.compile(r"(?:[A-Za-z]{1,2}\.)+[A-Za-z]{1,2}")

# Korean words that end in a sentence-ending syllable but are not predicates.
_DA_NOT_FINAL = ("보다", "마다", "에다", "바다")  # "than", "every", a particle, "sea"
_YO_NOT_FINAL = ("필요", "중요", "주요", "수요", "개요", "강요", "소요", "풍요", "동요", "요요")
# A next word that continues the clause after a "-다" word: 하다 보니, 좋다 싶어, 좋다 하는.
_DA_CONTINUED_BY = (
    "보니",
    "보면",
    "보며",
    "싶",
    "하는",
    "하고",
    "하면",
    "해도",
    "했",
    "한다",
    "라",
)
# 할까 봐, 볼까 싶다, 할까 말까, 했을까 라는 생각
_KKA_CONTINUED_BY = ("봐", "싶", "말", "하는", "하고", "했", "라")
# Syllables before "네" that make it the exclamatory ending (있네, 좋네, 하네) rather than a
# plural/household suffix (우리네, 엄마네 집).
_NE_AFTER = frozenset("하되이나오가지좋같많없싫않괜")
_FINAL_RIEUL, _FINAL_BIEUP, _FINAL_SSANGSIOT = 8, 17, 20  # batchim indices (of 28)


def _is_syllable(c: str) -> bool:
    return "가" <= c <= "힣"


def _is_jamo(c: str) -> bool:
    return "\u3131" <= c <= "\u318e"


_HANGUL = re.compile("[\u3131-\u318e\uac00-\ud7a3]")
_OWN_LETTER_OR_DIGIT = re.compile("[^\\W_\u3131-\u318e]")  # \w less "_" and jamo


def _has_hangul(word: str) -> bool:
    return _HANGUL.search(word) is not None


def _batchim(c: str) -> int:
    return (ord(c) - 0xAC00) % 28


def _is_latin(c: str) -> bool:
    o = ord(c)
    return o < 0x250 or 0x1E00 <= o <= 0x1EFF or 0xFF21 <= o <= 0xFF5A


def _is_decoration(word: str) -> bool:
    """Emoticons, punctuation, ㅋㅋ runs: words without a letter or digit of their own."""
    return _OWN_LETTER_OR_DIGIT.search(word) is None


def _strip_trailing_symbols(word: str) -> str:
    """Drops closing quotes/brackets and symbols (♥ ^^) from the end; keeps tildes."""
    end = len(word)
    while end:
        c = word[end - 1]
        if c in _CLOSERS or (c not in _TILDES and unicodedata.category(c)[0] == "S"):
            end -= 1
        else:
            break
    return word[:end]


def _terminator_run(core: str) -> str:
    end = len(core)
    start = end
    while start and core[start - 1] in _TERMINATORS:
        start -= 1
    return core[start:end]


def _ends_in_laugh(core: str) -> bool:
    return len(core) >= 2 and core[-1] in _LAUGH_JAMO and core[-2] in _LAUGH_JAMO


def _starts_sentence(word: str) -> bool:
    """English: the word after a terminator starts a sentence if it opens with an upper-case
    letter, a digit, a quote or bracket, or a letter of a non-Latin script."""
    c = word[0]
    return c.isupper() or c.isdigit() or c in _OPENERS or (c.isalpha() and not _is_latin(c))


def _period_is_abbreviation(body: str, first_word: bool) -> bool:
    body = body.lstrip(_OPENERS)
    if not body:
        return False
    if body.lower() in _ABBREVIATIONS or _DOTTED.fullmatch(body):
        return True
    if len(body) == 1 and body.isalpha() and body != "I":  # initials: J. R. R. Tolkien
        return True
    return first_word and body.isdigit() and len(body) <= 2  # a list item: "1. First, ..."


def _korean_ending(core: str, nxt: str) -> bool:
    """A predicate ending without punctuation (재밌다, 좋아요, 그렇죠, 있네, 할까) followed by
    the start of a new clause. Single-syllable words (다 "all", 네 "yes") never end one."""
    if len(core) < 2 or not _is_syllable(core[-2]) or not (nxt[0].isalnum()):
        return False
    last, prev = core[-1], core[-2]
    if _is_jamo(nxt[0]):
        return False
    if last == "다":
        return not core.endswith(_DA_NOT_FINAL) and not nxt.startswith(_DA_CONTINUED_BY)
    if last == "요":
        return not core.endswith(_YO_NOT_FINAL)
    if last == "죠":
        return True
    if last == "네":
        return _batchim(prev) == _FINAL_SSANGSIOT or prev in _NE_AFTER
    if last == "까":
        question = _batchim(prev) == _FINAL_RIEUL or (  # 할까, 일까
            prev == "니" and len(core) >= 3 and _batchim(core[-3]) == _FINAL_BIEUP  # 합니까
        )
        return question and not core.endswith("말까") and not nxt.startswith(_KKA_CONTINUED_BY)
    return False


def _word_ends_sentence(word: str, nxt: str, first_word: bool) -> bool:
    core = _strip_trailing_symbols(word)
    if not core:
        return False
    if _ends_in_laugh(core):
        return True
    run = _terminator_run(core)
    if run:
        body = core[: -len(run)]
        if _has_hangul(body):  # Korean: any run of . ! ? ~ before whitespace ends a sentence
            return True
        if all(c in _TILDES for c in run) or not _starts_sentence(nxt):
            return False
        return not (run == "." and _period_is_abbreviation(body, first_word))
    return _is_syllable(core[-1]) and _korean_ending(core, nxt)


def _decoration_ends_sentence(word: str, nxt: str, korean: bool) -> bool:
    core = _strip_trailing_symbols(word)
    if _ends_in_laugh(core):
        return True
    run = _terminator_run(core)
    if not run:
        return False
    return korean or (not all(c in _TILDES for c in run) and _starts_sentence(nxt))


def _decorations_end_sentence(sentence: list[str], tail: int, nxt: str) -> bool:
    korean = any(_has_hangul(w) for w in sentence)
    return any(_decoration_ends_sentence(w, nxt, korean) for w in sentence[tail + 1 :])


def split_sentences(line: str) -> list[str]:
    """Splits one line of English or Korean text into sentences, at whitespace only.

    English: after `.`, `!`, `?`, `…` (closing quotes/brackets may follow) when the next word
    starts with an upper-case letter, a digit, a quote/bracket or a non-Latin letter; not
    after abbreviations (Mr. Dr. St. e.g. etc. vs.), single initials (J. R. R.) or a list
    number opening the sentence. Korean: after any run of `.`/`!`/`?`/`~`, after ㅋㅋ/ㅎㅎ/ㅠㅠ
    runs, and after a predicate ending (다 요 죠 네 까) when the next word starts a new clause.
    Emoticons and ㅋㅋ standing as separate words stay with the sentence before them, and a
    sentence never consists of such decorations alone.

    The output joined with single spaces equals the whitespace-normalised input.
    """
    words = line.split()
    if len(words) <= 1:
        return [" ".join(words)] if words else []
    sentences: list[str] = []
    start = 0
    tail = -1  # the last word of the current sentence that is not a decoration
    for i in range(len(words) - 1):
        word = words[i]
        last = word[-1]
        if last.isalnum() and last not in _ALNUM_ENDINGS and not _is_jamo(last):
            tail = i  # fast path: a plain word neither ends a sentence nor decorates one
            continue
        if not _is_decoration(word):
            tail = i
        nxt = words[i + 1]
        if tail < 0 or _is_decoration(nxt):
            continue  # decorations attach to the sentence they follow
        if _word_ends_sentence(words[tail], nxt, tail == start) or (
            tail < i and _decorations_end_sentence(words[start : i + 1], tail - start, nxt)
        ):
            sentences.append(" ".join(words[start : i + 1]))
            start, tail = i + 1, -1
    sentences.append(" ".join(words[start:]))
    return sentences
