"""Raw corpora as documents: a document is a `list[str]` of sentences.

Three sources, one shape: plain text in the BERT format (one sentence or paragraph per line,
a blank line between documents), JSON Lines (one document per record) and any TFDS dataset
with a text feature, read through `array_record` random access without TensorFlow.
`iter_corpus_documents` picks the reader from a spec string. Every line goes through
`split_sentences`, so the tokenizer trainer and data preparation see the same sentences.

Files are streamed: memory stays bounded by `max_line_chars`, whatever the file size.
"""

from __future__ import annotations

import codecs
import collections
import contextlib
import dataclasses
import glob
import json
import os
import re
import unicodedata
from collections.abc import Iterable, Iterator

import numpy as np

from flaxbert.config import UserError

Document = list[str]

ERRORS_MODES = ("strict", "replace")
BAD_RECORD_MODES = ("error", "skip")

# --------------------------------------------------------------------------------------------
# Errors

# How each kind of caller sets a reader option that an error suggests: a Python argument,
# a flag of `flaxbert prepare` / `train-tokenizer`, or a key of the pre-training config.
_FIX_SPELLINGS = {
    "python": {
        "errors": "pass errors='{}'",
        "text_field": "pass text_field='{}'",
        "on_bad_record": "pass on_bad_record='{}'",
    },
    "flags": {"errors": "pass --errors {}", "text_field": "pass --text-field {}"},
    "config": {
        "errors": "set --config.data.errors={}",
        "text_field": "set --config.data.text_field={}",
    },
}
SPELLINGS = tuple(_FIX_SPELLINGS)
_default_spelling = "python"


@contextlib.contextmanager
def default_spelling(spelling: str):
    """Within it, CorpusErrors without a spelling of their own write their fixes this way
    (python outside): `flaxbert train-tokenizer` uses "flags"."""
    global _default_spelling
    _check_mode("spelling", spelling, SPELLINGS)
    before, _default_spelling = _default_spelling, spelling
    try:
        yield
    finally:
        _default_spelling = before


class CorpusError(UserError, ValueError):
    """A corpus that cannot be read as asked. `problem` says what and where (file, line, byte);
    each of `fixes` is (reader option, value, what setting it does), written out the way the
    caller sets that option (`spelling`: python, flags or config, see `spelled`; None: the
    process default, `default_spelling`). A fix the caller cannot set is left out.
    """

    def __init__(self, problem: str, fixes=(), spelling: str | None = None):
        if spelling is not None:
            _check_mode("spelling", spelling, SPELLINGS)
        super().__init__(problem, tuple(fixes), spelling)  # args rebuild it when unpickled
        self.problem, self.fixes, self.spelling = problem, tuple(fixes), spelling

    def __str__(self) -> str:
        names = _FIX_SPELLINGS[self.spelling or _default_spelling]
        todo = [f"{names[o].format(v)} {why}" for o, v, why in self.fixes if o in names]
        return self.problem + ("; " + ", or ".join(todo) if todo else "")

    def spelled(self, spelling: str) -> CorpusError:
        """The same error, its fixes written for another kind of caller."""
        return type(self)(self.problem, self.fixes, spelling)

    def relocated(self, problem: str) -> CorpusError:
        """The same error and fixes about another place (a shard copy → the corpus file)."""
        return type(self)(problem, self.fixes, self.spelling)


class CorpusNotFoundError(CorpusError, FileNotFoundError):
    """A corpus path or glob that names no file."""


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


# --------------------------------------------------------------------------------------------
# Reading statistics


@dataclasses.dataclass
class ReadStats:
    """What a reader saw. `lines` counts non-blank source lines (an over-long line once, a JSONL
    or TFDS text counts its non-blank lines); `characters` counts the characters of the
    sentences produced. `dropped` counts, by reason, what was dropped or changed on the way."""

    documents: int = 0
    lines: int = 0
    sentences: int = 0
    characters: int = 0
    dropped: collections.Counter = dataclasses.field(default_factory=collections.Counter)

    def add_document(self, doc: Document) -> None:
        self.documents += 1
        self.sentences += len(doc)
        self.characters += sum(len(s) for s in doc)

    def summary(self) -> str:
        text = (
            f"{self.documents:,} documents, {self.lines:,} lines, {self.sentences:,} sentences, "
            f"{self.characters:,} characters"
        )
        if self.dropped:
            text += "; " + ", ".join(f"{n:,} × {why}" for why, n in sorted(self.dropped.items()))
        return text


# --------------------------------------------------------------------------------------------
# Decoding and over-long lines

_BOM = codecs.BOM_UTF8
_CHUNK_BYTES = 1 << 16


def _check_mode(name: str, value: str, modes: tuple[str, ...]) -> None:
    if value not in modes:
        raise ValueError(f"{name}={value!r}: must be one of {', '.join(map(repr, modes))}")


class _Decoder:
    """Decodes UTF-8 byte strings, raising an error that names file, line and byte offset
    (errors='strict') or replacing bad bytes with U+FFFD and counting them ('replace')."""

    def __init__(self, path: str, errors: str, stats: ReadStats):
        _check_mode("errors", errors, ERRORS_MODES)
        self.path, self.errors, self.stats = path, errors, stats

    def __call__(self, data: bytes, offset: int, lineno: int) -> str:
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError as e:
            if self.errors == "strict":
                raise CorpusError(
                    f"{self.path}:{lineno}: not valid UTF-8 ({e.reason} at byte offset "
                    f"{offset + e.start} of the file)",
                    [
                        (
                            "errors",
                            "replace",
                            "to replace undecodable bytes with U+FFFD (or re-save the file "
                            "as UTF-8)",
                        )
                    ],
                ) from None
        parts, bad, pos = [], 0, 0
        while pos < len(data):
            try:
                parts.append(data[pos:].decode("utf-8"))
                break
            except UnicodeDecodeError as e:
                parts.append(data[pos : pos + e.start].decode("utf-8"))
                parts.append("\ufffd")
                bad += 1
                pos += e.end
        self.stats.dropped["undecodable bytes replaced"] += bad
        return "".join(parts)


def _split_incomplete_utf8(data: bytes) -> tuple[bytes, bytes]:
    """Splits off a multi-byte sequence cut short at the end of `data` (to finish later)."""
    n = len(data)
    for k in range(1, min(4, n) + 1):
        c = data[n - k]
        if c & 0xC0 == 0x80:  # a continuation byte: look further back for the lead byte
            continue
        need = 4 if c >= 0xF0 else 3 if c >= 0xE0 else 2 if c >= 0xC0 else 1
        return (data[: n - k], data[n - k :]) if need > k else (data, b"")
    return data, b""


def _cut_point(text: str, limit: int) -> int:
    """Where to cut an over-long line: after the last whitespace within `limit` characters,
    else (no whitespace at all) at `limit`."""
    for i in range(limit, 0, -1):
        if text[i].isspace():
            return i
    return limit


def _chunk_line(text: str, max_line_chars: int, stats: ReadStats) -> Iterator[str]:
    if len(text) <= max_line_chars:
        yield text
        return
    stats.dropped["over-long line split"] += 1
    while len(text) > max_line_chars:
        cut = _cut_point(text, max_line_chars)
        yield text[:cut]
        text = text[cut:]
    if text.strip():
        yield text


def _read_lines(
    path: str, decode: _Decoder, max_line_chars: int, stats: ReadStats
) -> Iterator[tuple[int, str]]:
    """Yields (line number, text) with line ends stripped; an over-long line comes as several
    pieces of at most `max_line_chars` characters (cut at whitespace), read in bounded chunks."""
    if max_line_chars < 1:
        raise ValueError(f"max_line_chars={max_line_chars}: must be at least 1")
    with open(path, "rb") as f:
        lineno, offset, carry, text, in_line, was_split = 0, 0, b"", "", False, False
        while True:
            raw = f.readline(_CHUNK_BYTES)
            if not in_line:
                if not raw:
                    return
                lineno, in_line, was_split = lineno + 1, True, False
            ends = not raw or raw.endswith(b"\n")
            data, data_offset = carry + raw, offset - len(carry)
            offset += len(raw)
            if data_offset == 0 and data.startswith(_BOM):
                data, data_offset = data[len(_BOM) :], len(_BOM)
            data, carry = (data, b"") if ends else _split_incomplete_utf8(data)
            text += decode(data, data_offset, lineno)
            if ends:
                text = text.rstrip("\r\n")
            if len(text) > max_line_chars:
                if not was_split:
                    stats.dropped["over-long line split"] += 1
                    was_split = True
                while len(text) > max_line_chars:
                    cut = _cut_point(text, max_line_chars)
                    yield lineno, text[:cut]
                    text = text[cut:]
            if ends:
                if not (was_split and not text.strip()):  # a blank tail is no document break
                    yield lineno, text
                text, in_line = "", False
                if not raw:
                    return


# --------------------------------------------------------------------------------------------
# Readers


def read_text_documents(
    path: str | os.PathLike,
    *,
    errors: str = "strict",
    max_line_chars: int = 100_000,
    stats: ReadStats | None = None,
) -> Iterator[Document]:
    """Documents of a text file in the BERT format: one sentence or paragraph per line, a blank
    line between documents; each line is split with `split_sentences`.

    The file is streamed. A UTF-8 BOM and `\\r\\n` line ends are accepted. Bytes that are not
    UTF-8 raise a CorpusError naming file, line and byte offset, or with errors='replace'
    become U+FFFD and are counted in `stats.dropped`. A line over `max_line_chars` characters
    is cut at whitespace into several lines of the same document (counted).
    """
    path = os.fspath(path)
    stats = ReadStats() if stats is None else stats
    decode = _Decoder(path, errors, stats)
    doc: Document = []
    last_lineno = 0
    for lineno, text in _read_lines(path, decode, max_line_chars, stats):
        sentences = split_sentences(text)
        if not sentences:
            if doc:
                stats.add_document(doc)
                yield doc
                doc = []
            continue
        if lineno != last_lineno:
            stats.lines += 1
            last_lineno = lineno
        doc.extend(sentences)
    if doc:
        stats.add_document(doc)
        yield doc


def _text_to_document(text: str, max_line_chars: int, stats: ReadStats) -> Document:
    doc: Document = []
    for line in text.splitlines():
        if not line.strip():
            continue
        stats.lines += 1
        for piece in _chunk_line(line, max_line_chars, stats):
            doc.extend(split_sentences(piece))
    return doc


def read_jsonl_documents(
    path: str | os.PathLike,
    *,
    text_field: str = "text",
    errors: str = "strict",
    on_bad_record: str = "error",
    max_line_chars: int = 100_000,
    stats: ReadStats | None = None,
) -> Iterator[Document]:
    """One document per JSON Lines record: the `text_field` string (or list of strings) is split
    into lines (blank lines are paragraph breaks, not document breaks), then sentences.

    A record that is not a JSON object holding `text_field` as text raises a CorpusError naming
    file, line and field (on_bad_record='error'), or is skipped and counted ('skip'). Blank
    lines of the file are ignored; a record with empty text is counted as an empty document.
    """
    path = os.fspath(path)
    _check_mode("on_bad_record", on_bad_record, BAD_RECORD_MODES)
    stats = ReadStats() if stats is None else stats
    decode = _Decoder(path, errors, stats)

    def bad(lineno: int, problem: str, reason: str) -> None:
        if on_bad_record == "skip":
            stats.dropped[reason] += 1
            return
        raise CorpusError(
            f"{path}:{lineno}: {problem}; expected one JSON object per line with the text "
            f"under {text_field!r}",
            [
                ("text_field", "NAME", "if the text is under another key"),
                ("on_bad_record", "skip", "to skip such records"),
            ],
        )

    with open(path, "rb") as f:
        offset = 0
        for lineno, raw in enumerate(f, 1):
            data, data_offset = raw, offset
            offset += len(raw)
            if lineno == 1 and data.startswith(_BOM):
                data, data_offset = data[len(_BOM) :], len(_BOM)
            line = decode(data, data_offset, lineno)
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                bad(lineno, f"bad JSON ({e.msg} at column {e.colno})", "bad JSON record skipped")
                continue
            if not isinstance(record, dict) or text_field not in record:
                fields = sorted(record) if isinstance(record, dict) else type(record).__name__
                bad(
                    lineno,
                    f"record has no field {text_field!r} (it has {fields})",
                    f"record without field {text_field!r} skipped",
                )
                continue
            value = record[text_field]
            if isinstance(value, list) and all(isinstance(v, str) for v in value):
                value = "\n".join(value)
            if not isinstance(value, str):
                bad(
                    lineno,
                    f"field {text_field!r} holds {type(value).__name__}, not text",
                    f"record with non-text field {text_field!r} skipped",
                )
                continue
            doc = _text_to_document(value, max_line_chars, stats)
            if not doc:
                stats.dropped["empty document"] += 1
                continue
            stats.add_document(doc)
            yield doc


def _as_text(value, stats: ReadStats) -> str:
    if isinstance(value, np.ndarray) and value.ndim == 0:
        value = value.item()
    if isinstance(value, str):
        return value
    if isinstance(value, bytes | np.bytes_):
        try:
            return bytes(value).decode("utf-8")
        except UnicodeDecodeError:
            stats.dropped["undecodable bytes replaced"] += 1
            return bytes(value).decode("utf-8", errors="replace")
    raise CorpusError(
        f"expected a text feature, got {type(value).__name__}",
        [("text_field", "NAME", "to read another feature")],
    )


def read_tfds_documents(
    name: str,
    *,
    split: str = "train",
    text_feature: str = "text",
    data_dir: str | os.PathLike | None = None,
    max_line_chars: int = 100_000,
    stats: ReadStats | None = None,
    batch_size: int = 256,
) -> Iterator[Document]:
    """Documents of a TFDS dataset with a text feature, e.g. 'wikipedia/20230601.en'.

    Prepares the dataset in `data_dir` (array_record format) unless it is already there, then
    reads `split` by random access through `builder.as_data_source`: no TensorFlow needed.
    Each record's text (bytes or str) is one document: split into lines, then sentences.
    """
    import tensorflow_datasets as tfds  # heavy import: only when a TFDS corpus is asked for

    stats = ReadStats() if stats is None else stats
    data_dir = None if data_dir is None else os.fspath(data_dir)
    builder = tfds.builder(name, data_dir=data_dir)
    if not builder.is_prepared():
        builder.download_and_prepare(file_format="array_record")
    features = builder.info.features
    if text_feature not in features:
        raise CorpusError(
            f"TFDS dataset {name!r} has no feature {text_feature!r}; its features are "
            f"{sorted(features.keys())}",
            [("text_field", "NAME", "naming the text feature")],
        )
    split_name = split.split("[", 1)[0]
    if split_name not in builder.info.splits:
        raise CorpusError(
            f"TFDS dataset {name!r} has no split {split_name!r}; its splits are "
            f"{sorted(builder.info.splits.keys())}"
        )
    try:
        source = builder.as_data_source(split=split)
    except NotImplementedError as e:  # e.g. prepared earlier as tfrecord
        raise CorpusError(
            f"TFDS dataset {name!r} in {builder.data_dir} cannot be read by random access "
            f"({e}); prepare it again in array_record format "
            "(download_and_prepare(file_format='array_record')) in an empty data_dir"
        ) from e
    for begin in range(0, len(source), batch_size):
        indices = list(range(begin, min(begin + batch_size, len(source))))
        if hasattr(source, "__getitems__"):
            records = source.__getitems__(indices)
        else:
            records = [source[i] for i in indices]
        for record in records:
            doc = _text_to_document(_as_text(record[text_feature], stats), max_line_chars, stats)
            if not doc:
                stats.dropped["empty document"] += 1
                continue
            stats.add_document(doc)
            yield doc


_TFDS_SPEC = re.compile(r"([^:]+?)(:\d[\d.*]*)?(?::(.+))?")
_GLOB_CHARS = re.compile(r"[*?\[]")


def corpus_files(spec: str) -> list[str]:
    """The files a path or glob names, sorted. Raises CorpusNotFoundError (a
    FileNotFoundError) naming the pattern, or CorpusError for a directory."""
    if _GLOB_CHARS.search(spec):
        files = sorted(p for p in glob.glob(spec, recursive=True) if not os.path.isdir(p))
        if not files:
            raise CorpusNotFoundError(f"no file matches the pattern {spec!r}")
        return files
    if os.path.isdir(spec):
        raise CorpusError(f"{spec!r} is a directory: give a file or a glob, e.g. '{spec}/*.txt'")
    if not os.path.exists(spec):
        raise CorpusNotFoundError(f"no such corpus file: {spec!r}")
    return [spec]


def _is_jsonl(path: str) -> bool:
    return path.lower().endswith((".jsonl", ".json"))


def iter_corpus_documents(
    spec: str,
    *,
    text_field: str = "text",
    errors: str = "strict",
    stats: ReadStats | None = None,
    max_line_chars: int = 100_000,
    data_dir: str | os.PathLike | None = None,
) -> Iterator[Document]:
    """Documents from a corpus spec:

    - `tfds:NAME[:VERSION][:SPLIT]`, e.g. `tfds:wikipedia/20230601.en:train` (split defaults
      to train; `text_field` is the text feature; `data_dir` the TFDS data directory);
    - a file ending `.jsonl`/`.json`: JSON Lines, one document per record;
    - any other file: plain text in the BERT format;
    - a glob (`*`, `?`, `[`): its files in sorted order, each read by its extension, one
      after the other (a document never spans two files).

    Raises CorpusError naming the spec if it yields no document at all.
    """
    _check_mode("errors", errors, ERRORS_MODES)
    stats = ReadStats() if stats is None else stats
    if spec.startswith("tfds:"):
        m = _TFDS_SPEC.fullmatch(spec[len("tfds:") :])
        if not m:
            raise CorpusError(f"bad TFDS corpus spec {spec!r}: expected tfds:NAME[:SPLIT]")
        name = m.group(1) + (m.group(2) or "")
        sources: Iterable[Iterator[Document]] = [
            read_tfds_documents(
                name,
                split=m.group(3) or "train",
                text_feature=text_field,
                data_dir=data_dir,
                max_line_chars=max_line_chars,
                stats=stats,
            )
        ]
    else:
        files = corpus_files(spec)
        sources = (
            read_jsonl_documents(
                f, text_field=text_field, errors=errors, max_line_chars=max_line_chars, stats=stats
            )
            if _is_jsonl(f)
            else read_text_documents(f, errors=errors, max_line_chars=max_line_chars, stats=stats)
            for f in files
        )
    empty = True
    for source in sources:
        for doc in source:
            empty = False
            yield doc
    if empty:
        raise CorpusError(
            f"the corpus {spec!r} holds no documents: its input is empty or blank; give a "
            "corpus with text (one sentence or paragraph per line, a blank line between "
            "documents)"
        )


def add_text_input_flags(p) -> None:
    """The `--errors` and `--text-field` flags of every command that reads raw text."""
    p.add_argument(
        "--errors",
        choices=("strict", "replace"),
        default="strict",
        help="bytes that are not UTF-8: 'strict' stops with the file and line, 'replace' "
        "turns them into U+FFFD and counts them (default: %(default)s)",
    )
    p.add_argument(
        "--text-field",
        default="text",
        metavar="NAME",
        help="JSON field or TFDS feature holding the text (default: %(default)s)",
    )
