"""Corpus files read line by line: decoding, over-long lines, and what reading reports.

What every corpus reader of `flaxbert.data.text` shares: `CorpusError` (a problem and the
reader options that would fix it, spelled for the caller: a Python argument, a command-line
flag or a config key), `ReadStats` (what was read, dropped or changed), and `read_lines`,
which streams a file's lines with bounded memory, decoding UTF-8 strictly (naming file,
line and byte) or with replacement, and cutting over-long lines at whitespace.
"""

from __future__ import annotations

import codecs
import collections
import contextlib
import dataclasses
from collections.abc import Iterator

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
    check_mode("spelling", spelling, SPELLINGS)
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
            check_mode("spelling", spelling, SPELLINGS)
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

UTF8_BOM = codecs.BOM_UTF8
_CHUNK_BYTES = 1 << 16


def check_mode(name: str, value: str, modes: tuple[str, ...]) -> None:
    if value not in modes:
        raise ValueError(f"{name}={value!r}: must be one of {', '.join(map(repr, modes))}")


class Decoder:
    """Decodes UTF-8 byte strings, raising an error that names file, line and byte offset
    (errors='strict') or replacing bad bytes with U+FFFD and counting them ('replace')."""

    def __init__(self, path: str, errors: str, stats: ReadStats):
        check_mode("errors", errors, ERRORS_MODES)
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


def chunk_line(text: str, max_line_chars: int, stats: ReadStats) -> Iterator[str]:
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


def read_lines(
    path: str, decode: Decoder, max_line_chars: int, stats: ReadStats
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
            if data_offset == 0 and data.startswith(UTF8_BOM):
                data, data_offset = data[len(UTF8_BOM) :], len(UTF8_BOM)
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
