"""Fine-tuning task files → examples, driven by config values alone.

A task is described by its `data` config: the file `format`, which columns (or JSON keys)
hold the texts and the label, the label names, and a few format switches. `ReaderSpec`
checks that description once, before any file is opened, so a typo in a config fails at
start-up with the key named; `read_examples` then turns a file into a list of examples.
A new task therefore needs a config, not code: `TASK_PRESETS` holds the configs of the
tasks in ../shared/data/tasks and shows what one looks like.

Formats:

    tsv, csv   one example per row; `header` says whether the first row names the columns
               (columns are then named, otherwise given as 0-based indices, "3")
    jsonl      one JSON object per line; columns are its keys
    conll      one `TOKEN<tab>TAG` per line (whitespace-separated when a line holds no tab),
               a blank or whitespace-only line between sentences
    klue_ner   KLUE's character-level NER: `## ` comment lines, one `CHAR<tab>TAG` per line
               (a space is a character of its own), a blank line between sentences
    squad      SQuAD v1.1 JSON: articles → paragraphs (context) → questions with answers
    tfds:NAME[:SPLIT]
               not a format but a source: a `path` of this form is read from a prepared
               TFDS dataset (array_record) with the columns of a tsv/csv/jsonl spec

Bad rows are never silently dropped: each one either stops the read with an error naming
the file, the 1-based line (for SQuAD: the question's 1-based position in the file) and
what to do, or, with `skip_bad_rows`, is left out and listed in `ReadResult.skipped`.
"""

from __future__ import annotations

import codecs
import csv
import dataclasses
import difflib
import io
import json
import logging
import math
import os
from collections.abc import Mapping
from typing import Any

from flaxbert.config import ConfigError, UserError

log = logging.getLogger(__name__)

FORMATS = ("tsv", "csv", "jsonl", "conll", "klue_ner", "squad")
TEXT_FORMATS = ("tsv", "csv", "jsonl")  # formats that give TextExamples
KINDS = ("classification", "regression", "token_classification", "qa")
# The metric names each metric set reports; a preset's `main_metric` is one of these.
METRIC_SETS: dict[str, tuple[str, ...]] = {
    "accuracy": ("accuracy",),
    "accuracy_f1": ("accuracy", "f1"),
    "matthews": ("matthews_corrcoef",),
    "pearson_spearman": ("pearson", "spearman"),
    "entity_f1": ("precision", "recall", "f1"),
    "squad": ("exact_match", "f1"),
}
# Keys of a task's data config that describe the task, not how to read its files: a preset
# (or a config built from one) can be handed to `ReaderSpec.from_config` as it is.
TASK_KEYS = ("kind", "metrics", "main_metric", "train_file", "eval_file")
_COMMON_KEYS = ("format", "skip_bad_rows", "encoding")
_TABLE_KEYS = ("text_a", "text_b", "label", "label_list", "header", "quoting")
_FORMAT_KEYS: dict[str, tuple[str, ...]] = {
    "tsv": _TABLE_KEYS,
    "csv": _TABLE_KEYS,
    "jsonl": ("text_a", "text_b", "label", "label_list"),
    "conll": ("token_column", "tag_column", "token_prefix", "label_list"),
    "klue_ner": ("label_list",),
    "squad": (),
}
_TFDS_PREFIX = "tfds:"
_SKIP_HINT = (
    "fix or delete that {unit}, or set data.reader.skip_bad_rows=True to leave such {unit}s "
    "out (they are then counted and logged)"
)
# Fine-tuning reads its label names from data.label_list and the reader checks rows against
# data.reader.label_list: a new label goes into both.
_LABEL_KEYS = "data.label_list and data.reader.label_list"
_BOM = "\ufeff"
_ENCODING = "utf-8-sig"  # UTF-8, a leading byte-order mark dropped (MRPC's files have one)


class TaskDataError(UserError, ValueError):
    """A task file that cannot be read as configured; the message names the file and row."""


class TaskFileNotFoundError(TaskDataError, FileNotFoundError):
    """A task file that does not exist."""


# ------------------------------------------------------------------------------ examples


@dataclasses.dataclass(frozen=True)
class TextExample:
    """One sentence or sentence pair. `label` is an index into the task's label list
    (classification), a float score (regression), or None where the file has no labels."""

    guid: str
    text_a: str
    text_b: str | None
    label: int | float | None


@dataclasses.dataclass(frozen=True)
class TokenExample:
    """One NER sentence: a tag per word. For KLUE-NER a word is one character and a space
    is the word " ", so `"".join(words)` gives back the sentence."""

    guid: str
    words: list[str]
    labels: list[str] | None


@dataclasses.dataclass(frozen=True)
class QAExample:
    """One SQuAD question; `answers` holds (text, character start in `context`) pairs, each
    checked to be exactly at that place in the context."""

    qid: str
    question: str
    context: str
    answers: list[tuple[str, int]]


@dataclasses.dataclass(frozen=True)
class ReadResult:
    """The examples of one file, and the rows left out under `skip_bad_rows`: (1-based line,
    or question number for SQuAD, or record number for TFDS; the reason)."""

    examples: list
    skipped: list[tuple[int, str]]
    path: str


# ------------------------------------------------------------------------------ reader spec


@dataclasses.dataclass
class ReaderSpec:
    """How to read one task's files. Build it with `from_config` from the `data` config;
    constructing it directly runs the same checks (in `__post_init__`).

    `quoting=None` means the format's usual convention: on for csv, off for tsv, since the
    GLUE and KorNLU TSVs hold unbalanced double quotes that quoting would join into one
    field across rows.
    """

    format: str
    text_a: str = ""
    text_b: str = ""  # "" = single sentences
    label: str = ""  # "" = the file has no labels (examples get label None)
    header: bool = True
    quoting: bool | None = None
    label_list: tuple[str, ...] = ()  # () with a label column = regression (float scores)
    token_column: int = 0
    tag_column: int = -1
    token_prefix: str = ""
    skip_bad_rows: bool = False
    encoding: str = _ENCODING

    def __post_init__(self):
        if self.format not in FORMATS:
            raise ConfigError(
                f"config key data.reader.format={self.format!r}: must be one of "
                f"{', '.join(FORMATS)}" + _did_you_mean(str(self.format), FORMATS)
            )
        if self.quoting is None:
            self.quoting = self.format == "csv"
        self.label_list = _convert_key("label_list", self.label_list)
        if self.format in TEXT_FORMATS:
            self._check_text_columns()
        elif self.format == "conll" and self.token_column == self.tag_column:
            raise ConfigError(
                f"config key data.reader.tag_column={self.tag_column!r}: the same column as "
                "data.reader.token_column; tokens and tags must come from different columns"
            )
        if len(set(self.label_list)) != len(self.label_list) or "" in self.label_list:
            raise ConfigError(
                f"config key data.reader.label_list={','.join(self.label_list)!r}: label names "
                "must be non-empty and distinct (a comma-separated list, e.g. 'negative,positive')"
            )
        try:
            codecs.lookup(self.encoding)
        except LookupError:
            raise ConfigError(
                f"config key data.reader.encoding={self.encoding!r}: not a codec Python knows "
                "(use e.g. 'utf-8-sig', 'utf-8' or 'cp949')"
            ) from None

    def _check_text_columns(self) -> None:
        if not self.text_a:
            raise ConfigError(
                f"config key data.reader.text_a is missing: format {self.format!r} needs the "
                + ("key" if self.format == "jsonl" else "column")
                + " that holds the (first) text"
            )
        if self.label_list and not self.label:
            raise ConfigError(
                f"config key data.reader.label_list={','.join(self.label_list)!r} is set but "
                "data.reader.label is empty: name the column that holds the labels"
            )
        if self.format != "jsonl" and not self.header:
            for key in ("text_a", "text_b", "label"):
                value = getattr(self, key)
                if value and _as_int(value) is None:
                    raise ConfigError(
                        f"config key data.reader.{key}={value!r}: a file without a header "
                        "(data.reader.header=False) names columns by 0-based index, e.g. '3'"
                    )

    @property
    def is_regression(self) -> bool:
        """True for a labelled text task without label names: labels are float scores."""
        return self.format in TEXT_FORMATS and bool(self.label) and not self.label_list

    @classmethod
    def from_config(cls, data: Mapping[str, Any] | Any) -> ReaderSpec:
        """Builds a spec from a task's `data` config (a ConfigDict or a dict).

        Every key must be a reader key or one of `TASK_KEYS`, so a typo fails here. A
        reader key that the chosen format does not read (`quoting` for conll) is an error
        too, unless it is None or "": that is how a config with one set of keys for all
        formats leaves it unset.
        """
        values = data.to_dict() if hasattr(data, "to_dict") else dict(data)
        fmt = values.get("format")
        if fmt is None or fmt == "":
            raise ConfigError(
                f"config key data.reader.format is missing: choose one of {', '.join(FORMATS)}"
            )
        if fmt not in FORMATS:
            raise ConfigError(
                f"config key data.reader.format={fmt!r}: must be one of {', '.join(FORMATS)}"
                + _did_you_mean(str(fmt), FORMATS)
            )
        reader_keys = [f.name for f in dataclasses.fields(cls)]
        readable = _COMMON_KEYS + _FORMAT_KEYS[fmt]
        kwargs: dict[str, Any] = {}
        for key, value in values.items():
            if key in TASK_KEYS:
                continue
            if key not in reader_keys:
                raise ConfigError(
                    f"unknown config key data.reader.{key} for a task reader (reader keys: "
                    f"{', '.join(reader_keys)}; task keys: {', '.join(TASK_KEYS)})"
                    + _did_you_mean(key, reader_keys + list(TASK_KEYS))
                )
            if key not in readable:
                if value is None or value == "":
                    continue
                users = [f for f, keys in _FORMAT_KEYS.items() if key in keys]
                raise ConfigError(
                    f"config key data.reader.{key}={value!r} does not apply to format {fmt!r} "
                    f"(only {', '.join(users)} read it): remove it"
                )
            if value is not None:
                kwargs[key] = _convert_key(key, value)
        return cls(**kwargs)


def _convert_key(key: str, value: Any) -> Any:
    """Config value → field value; a wrong type is reported with the key."""
    if key in ("header", "quoting", "skip_bad_rows"):
        if not isinstance(value, bool):
            raise ConfigError(f"config key data.reader.{key}={value!r}: must be True or False")
        return value
    if key in ("token_column", "tag_column"):
        number = _as_int(value)
        if number is None:
            raise ConfigError(f"config key data.reader.{key}={value!r}: must be an integer column")
        return number
    if key == "label_list":
        if isinstance(value, str):
            return tuple(name.strip() for name in value.split(",")) if value.strip() else ()
        if isinstance(value, list | tuple):
            return tuple(str(name).strip() for name in value)
        raise ConfigError(
            f"config key data.reader.label_list={value!r}: must be a comma-separated string of "
            "label names ('' for a regression task)"
        )
    if (
        key in ("text_a", "text_b", "label")
        and isinstance(value, int)
        and not isinstance(value, bool)
    ):
        return str(value)  # a column index given as a number
    if not isinstance(value, str):
        raise ConfigError(f"config key data.reader.{key}={value!r}: must be a string")
    return value


def _as_int(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    try:
        return int(str(value).strip())
    except ValueError:
        return None


def _did_you_mean(word: str, choices) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


# ------------------------------------------------------------------------------ reading


class _BadRow(Exception):
    """A row that breaks the format: `reason` goes into the error or ReadResult.skipped."""

    def __init__(self, reason: str, hint: str = ""):
        super().__init__(reason)
        self.reason = reason
        self.hint = hint


@dataclasses.dataclass
class _Sink:
    """Collects examples and either raises on a bad row or records it as skipped."""

    spec: ReaderSpec
    path: str
    limit: int | None
    unit: str = "line"
    examples: list = dataclasses.field(default_factory=list)
    skipped: list = dataclasses.field(default_factory=list)

    def bad(self, row: int, err: _BadRow) -> None:
        if self.spec.skip_bad_rows:
            self.skipped.append((row, err.reason))
            return
        hint = f"{err.hint}; " if err.hint else ""
        raise TaskDataError(
            f"{self.path}, {self.unit} {row}: {err.reason}; {hint}"
            + _SKIP_HINT.format(unit=self.unit)
        ) from None

    def add(self, example) -> bool:
        """Keeps `example`; True once `limit` examples are kept (the caller stops)."""
        self.examples.append(example)
        return self.full()

    def full(self) -> bool:
        return self.limit is not None and len(self.examples) >= self.limit

    def result(self) -> ReadResult:
        if self.skipped:
            first = "; ".join(f"{self.unit} {n}: {why}" for n, why in self.skipped[:3])
            log.warning(
                "%s: skipped %d bad %ss (skip_bad_rows=True), e.g. %s",
                self.path,
                len(self.skipped),
                self.unit,
                first,
            )
        return ReadResult(examples=self.examples, skipped=self.skipped, path=self.path)


def read_examples(
    spec: ReaderSpec, path: str | os.PathLike, limit: int | None = None
) -> ReadResult:
    """Reads a task file (or a `tfds:NAME[:SPLIT]` source) into examples of the type its
    format gives: TextExample, TokenExample or QAExample. `limit` keeps only the first
    `limit` examples and stops reading there, for quick runs."""
    path = os.fspath(path)
    _check_limit(limit)
    if path.startswith(_TFDS_PREFIX):
        return read_tfds(path, spec, limit=limit)
    text = _read_text(path, spec.encoding)
    sink = _Sink(spec, path, limit, unit="question" if spec.format == "squad" else "line")
    if limit == 0:
        return sink.result()
    if spec.format in ("tsv", "csv"):
        _read_table(spec, text, sink, delimiter="\t" if spec.format == "tsv" else ",")
    elif spec.format == "jsonl":
        _read_jsonl(spec, text, sink)
    elif spec.format == "conll":
        _read_conll(spec, text, sink)
    elif spec.format == "klue_ner":
        _read_klue_ner(spec, text, sink)
    else:
        _read_squad(text, sink)
    return sink.result()


def _check_limit(limit: int | None) -> None:
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
        raise ValueError(f"limit={limit!r}: must be None (everything) or an integer >= 0")


def _read_text(path: str, encoding: str) -> str:
    """The whole file, decoded; a decoding error names the line, which a stream decoder
    could not tell."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise TaskFileNotFoundError(
            f"task file {path} not found: check data.train_file, data.eval_file and "
            "data.test_file and the directory they are relative to"
        ) from None
    try:
        return raw.decode(encoding)
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise TaskDataError(
            f"{path}, line {line}: not valid {encoding} ({e.reason} at byte {e.start}); "
            "re-save the file as UTF-8, or set data.reader.encoding to the codec it was written "
            "in (e.g. cp949)"
        ) from None


def _lines(text: str):
    """(1-based line number, line without its end) for '\\n' and '\\r\\n' ends only: a
    character-level file may hold any other character as data."""
    for number, line in enumerate(text.split("\n"), 1):
        yield number, line[:-1] if line.endswith("\r") else line


def _guid(path: str, row: int) -> str:
    return f"{os.path.basename(path)}:{row}"


def _text_example(spec: ReaderSpec, guid: str, text_a, text_b, label) -> TextExample:
    """Checks one row's values (already picked out of the row) and builds its example."""
    _check_texts(spec, text_a, text_b)
    return TextExample(
        guid=guid,
        text_a=text_a,
        text_b=text_b if spec.text_b else None,
        label=_label(spec, label) if spec.label else None,
    )


def _check_texts(spec: ReaderSpec, text_a, text_b) -> None:
    texts = [(spec.text_a, text_a)] + ([(spec.text_b, text_b)] if spec.text_b else [])
    for column, value in texts:
        if not isinstance(value, str):
            raise _BadRow(f"the text in {column!r} is a {type(value).__name__}, not a string")
        if not value.strip():
            raise _BadRow(f"the text in {column!r} is empty")


def _label(spec: ReaderSpec, raw: Any) -> int | float:
    if spec.label_list:
        name = str(raw).strip() if not isinstance(raw, bytes) else raw.decode("utf-8").strip()
        if name not in spec.label_list:
            shown = "an empty label" if not name else f"label {name!r}"
            raise _BadRow(
                f"{shown} in {spec.label!r} is not one of the allowed labels "
                f"{', '.join(spec.label_list)}",
                hint=f"if it is a real class, add it to {_LABEL_KEYS}",
            )
        return spec.label_list.index(name)
    try:
        if isinstance(raw, bool):
            raise ValueError
        score = float(raw) if isinstance(raw, int | float) else float(str(raw).strip())
    except ValueError:
        raise _BadRow(
            f"the score {raw!r} in {spec.label!r} is not a number (data.reader.label_list is "
            "empty, so the task is read as regression)",
            hint=f"for a classification task set {_LABEL_KEYS}",
        ) from None
    if not math.isfinite(score):
        raise _BadRow(f"the score {raw!r} in {spec.label!r} is not a finite number")
    return score


def _read_table(spec: ReaderSpec, text: str, sink: _Sink, delimiter: str) -> None:
    kind = "tab-separated" if delimiter == "\t" else "comma-separated"
    if spec.quoting:
        hint = (
            "with quoting on, a stray double quote joins or splits fields: try "
            "data.reader.quoting=False"
        )
    else:
        hint = (
            "a missing field, or a tab inside a text, changes the count"
            if delimiter == "\t"
            else "a comma inside an unquoted text splits it; if texts are quoted, set "
            "data.reader.quoting=True"
        )
    reader = csv.reader(
        io.StringIO(text, newline=""),
        delimiter=delimiter,
        quoting=csv.QUOTE_MINIMAL if spec.quoting else csv.QUOTE_NONE,
        strict=True,
    )
    keys = ("text_a", "text_b", "label")
    columns: dict[str, int | None] | None = None
    expected = 0
    end = 0  # the last line of the previous row (a quoted field may span lines)
    try:
        for row in reader:
            line, end = end + 1, reader.line_num
            if not row:  # a blank line is no row
                continue
            if columns is None:
                expected = len(row)
                if spec.header:
                    columns = {k: _header_column(spec, k, row, sink.path, line) for k in keys}
                    continue
                columns = {k: _index_column(spec, k, row, sink.path, line) for k in keys}
            if len(row) != expected:
                where = "the header" if spec.header else "the first row"
                sink.bad(
                    line,
                    _BadRow(
                        f"found {len(row)} {kind} columns, expected {expected} as in {where}",
                        hint=hint,
                    ),
                )
                continue
            try:
                example = _text_example(
                    spec,
                    _guid(sink.path, line),
                    *(None if columns[k] is None else row[columns[k]] for k in keys),
                )
            except _BadRow as e:
                sink.bad(line, e)
                continue
            if sink.add(example):
                return
    except csv.Error as e:
        raise TaskDataError(f"{sink.path}, line {reader.line_num}: {e}; {hint}") from None
    if columns is None:
        raise TaskDataError(
            f"{sink.path}: the file is empty; expected a {spec.format} file"
            + (" starting with a header row" if spec.header else "")
            + ": check that data.train_file, data.eval_file or data.test_file names the right file"
        )


def _header_column(spec: ReaderSpec, key: str, header: list[str], path: str, line: int):
    name = getattr(spec, key)
    if not name:
        return None
    if header.count(name) == 1:
        return header.index(name)
    if name in header:
        raise TaskDataError(
            f"{path}, line {line}: the header names column {name!r} (data.reader.{key}) more than "
            "once; rename one of them"
        )
    bom = (
        " (the first name starts with a byte-order mark: use data.reader.encoding='utf-8-sig')"
        if header and header[0].startswith(_BOM)
        else ""
    )
    headerless = (
        "; for a file without a header set data.reader.header=False"
        if _as_int(name) is not None
        else ""
    )
    raise TaskDataError(
        f"{path}, line {line}: the header has no column {name!r} (data.reader.{key}); its "
        f"columns are {', '.join(repr(h) for h in header)}: set data.reader.{key} to the one "
        f"meant{bom}{headerless}"
    )


def _index_column(spec: ReaderSpec, key: str, row: list[str], path: str, line: int):
    value = getattr(spec, key)
    if not value:
        return None
    index = _as_int(value)
    if not -len(row) <= index < len(row):
        raise TaskDataError(
            f"{path}, line {line}: data.reader.{key}={value!r} but the first row has only "
            f"{len(row)} columns (indices are 0-based)"
        )
    return index % len(row)


def _read_jsonl(spec: ReaderSpec, text: str, sink: _Sink) -> None:
    keys = [k for k in (spec.text_a, spec.text_b, spec.label) if k]
    for line, content in _lines(text):
        if not content.strip():
            continue
        try:
            record = json.loads(content)
        except json.JSONDecodeError as e:
            sink.bad(line, _BadRow(f"not valid JSON ({e.msg} at column {e.colno})"))
            continue
        if not isinstance(record, dict):
            sink.bad(line, _BadRow(f"a JSON {type(record).__name__}, not an object"))
            continue
        missing = [k for k in keys if k not in record]
        if missing:
            sink.bad(
                line,
                _BadRow(
                    f"the object has {len(keys) - len(missing)} of the {len(keys)} expected keys:"
                    f" no {', '.join(map(repr, missing))} (it has {', '.join(map(repr, record))})"
                ),
            )
            continue
        try:
            example = _text_example(
                spec,
                _guid(sink.path, line),
                record[spec.text_a],
                record[spec.text_b] if spec.text_b else None,
                record[spec.label] if spec.label else None,
            )
        except _BadRow as e:
            sink.bad(line, e)
            continue
        if sink.add(example):
            return


def _check_tag(spec: ReaderSpec, tag: str) -> None:
    if not tag:
        raise _BadRow("the tag is empty")
    if spec.label_list and tag not in spec.label_list:
        raise _BadRow(
            f"tag {tag!r} is not one of the allowed labels {', '.join(spec.label_list)}",
            hint=f"if it is a real tag, add it to {_LABEL_KEYS}",
        )


def _read_conll(spec: ReaderSpec, text: str, sink: _Sink) -> None:
    """Sentences of `TOKEN<tab>TAG` lines. A stray U+FEFF (a byte-order mark pasted into the
    middle of a file, as in wnut17's dev file) is dropped: it is invisible, and a line of
    only that is a sentence break, not a token."""
    words: list[str] = []
    tags: list[str] = []
    start = 0  # line of the sentence's first token
    error: tuple[int, _BadRow] | None = None  # the sentence's first bad line
    n_fields = None  # fixed by the file's first token line

    def flush() -> bool:
        nonlocal words, tags, error
        done = False
        if error is not None:
            sink.bad(*error)
        elif words:
            done = sink.add(TokenExample(_guid(sink.path, start), words, tags))
        words, tags, error = [], [], None
        return done

    for line, content in _lines(text):
        content = content.replace(_BOM, "")
        if not content.strip():
            if flush():
                return
            continue
        fields = content.split("\t") if "\t" in content else content.split()
        if not words and error is None:
            start = line
        if n_fields is None:
            n_fields = len(fields)
            for key in ("token_column", "tag_column"):
                index = getattr(spec, key)
                if not -n_fields <= index < n_fields:
                    raise TaskDataError(
                        f"{sink.path}, line {line}: data.reader.{key}={index} but the line has "
                        f"only {n_fields} fields (indices are 0-based)"
                    )
        if fields[spec.token_column % len(fields)] == "-DOCSTART-":
            if flush():  # a CoNLL-2003 document marker: no token
                return
            continue
        if error is not None:
            continue
        try:
            if len(fields) != n_fields:
                raise _BadRow(
                    f"found {len(fields)} fields, expected {n_fields} as on the file's first "
                    "token line",
                    hint="a token line is TOKEN<tab>TAG; a space or tab inside a token splits it",
                )
            word = fields[spec.token_column].strip()
            if spec.token_prefix and word.startswith(spec.token_prefix):
                word = word[len(spec.token_prefix) :]
            if not word:
                raise _BadRow("the token is empty")
            tag = fields[spec.tag_column].strip()
            _check_tag(spec, tag)
        except _BadRow as e:
            error = (line, e)
            continue
        words.append(word)
        tags.append(tag)
    flush()


def _read_klue_ner(spec: ReaderSpec, text: str, sink: _Sink) -> None:
    """KLUE-NER: each sentence starts with `## ID<tab>TAGGED TEXT` (the file starts with a few
    more `## ` lines of its own), then one `CHAR<tab>TAG` line per character. A character
    line is split on its one tab and never stripped: the character may be a space."""
    chars: list[str] = []
    tags: list[str] = []
    comment: tuple[int, str] | None = None  # (line, sentence id) of the last `## ` line
    start = 0
    error: tuple[int, _BadRow] | None = None

    def flush() -> bool:
        nonlocal chars, tags, error, comment
        done = False
        if error is not None:
            sink.bad(*error)
        elif chars:
            guid = comment[1] if comment and comment[1] else _guid(sink.path, start)
            done = sink.add(TokenExample(guid, chars, tags))
        elif comment is not None:
            sink.bad(
                comment[0],
                _BadRow(
                    "the sentence has no characters: an empty tag sequence (a `## ` line "
                    "followed by a blank line)",
                    hint="give it its CHAR<tab>TAG lines or delete its `## ` line",
                ),
            )
        chars, tags, error, comment = [], [], None, None
        return done

    for line, content in _lines(text):
        if content.startswith("## "):
            if (chars or error) and flush():  # a sentence without its blank line after it
                return
            comment = (line, content[3:].split("\t", 1)[0].strip())
            continue
        if not content.strip():
            if flush():
                return
            continue
        if not chars and error is None:
            start = line
        if error is not None:
            continue
        fields = content.split("\t")
        try:
            if len(fields) != 2:
                raise _BadRow(
                    f"found {len(fields)} tab-separated fields, expected 2 (CHAR<tab>TAG)"
                )
            char, tag = fields[0], fields[1].strip()
            if len(char) != 1:
                raise _BadRow(
                    f"{char!r} is not one character (KLUE-NER is tagged per character; a "
                    "space is the character ' ')"
                )
            _check_tag(spec, tag)
        except _BadRow as e:
            error = (line, e)
            continue
        chars.append(char)
        tags.append(tag)
    if chars or error or comment:
        flush()


def _read_squad(text: str, sink: _Sink) -> None:
    """SQuAD v1.1. The file is one JSON document, usually one line, so a question's
    position in the file (1-based) stands for the row, with its id in the message."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise TaskDataError(
            f"{sink.path}, line {e.lineno} column {e.colno}: not valid JSON ({e.msg}); a SQuAD "
            "file is one JSON object"
        ) from None
    articles = data.get("data") if isinstance(data, dict) else None
    if not isinstance(articles, list):
        raise TaskDataError(
            f"{sink.path}: not a SQuAD v1.1 file: expected an object with a 'data' list of "
            "articles, each with 'paragraphs' of 'context' and 'qas'"
        )
    number = 0
    seen: set[str] = set()
    for a, article in enumerate(articles, 1):
        title = article.get("title", "") if isinstance(article, dict) else ""
        paragraphs = article.get("paragraphs") if isinstance(article, dict) else None
        if not isinstance(paragraphs, list):
            raise TaskDataError(
                f"{sink.path}: article {a} ({title!r}) has no 'paragraphs' list; fix the file"
            )
        for p, paragraph in enumerate(paragraphs, 1):
            ok = isinstance(paragraph, dict) and isinstance(paragraph.get("qas"), list)
            if not ok:
                raise TaskDataError(
                    f"{sink.path}: article {a} ({title!r}) paragraph {p} has no 'qas' list; "
                    "fix the file"
                )
            for qa in paragraph["qas"]:
                number += 1
                try:
                    example = _qa_example(qa, paragraph.get("context"), seen)
                except _BadRow as e:
                    qid = qa.get("id") if isinstance(qa, dict) else None
                    e.reason = f"(id {qid!r}, article {title!r}) {e.reason}"
                    sink.bad(number, e)
                    continue
                seen.add(example.qid)
                if sink.add(example):
                    return


def _qa_example(qa: Any, context: Any, seen: set[str]) -> QAExample:
    if not isinstance(qa, dict):
        raise _BadRow(f"the question is a {type(qa).__name__}, not an object")
    qid, question, answers = qa.get("id"), qa.get("question"), qa.get("answers")
    if not isinstance(qid, str) or not qid:
        raise _BadRow("the question has no 'id' string")
    if qid in seen:
        raise _BadRow("another question has the same id", hint="ids must be unique")
    if not isinstance(question, str) or not question.strip():
        raise _BadRow("the question text is empty")
    if not isinstance(context, str) or not context.strip():
        raise _BadRow("the paragraph's context is empty")
    if not isinstance(answers, list) or not answers:
        raise _BadRow(
            "the question has no answers (SQuAD v1.1 has at least one; unanswerable "
            "questions are SQuAD 2.0, which this reader does not read)"
        )
    pairs = []
    for k, answer in enumerate(answers, 1):
        answer_text = answer.get("text") if isinstance(answer, dict) else None
        start = answer.get("answer_start") if isinstance(answer, dict) else None
        if not isinstance(answer_text, str) or not answer_text.strip():
            raise _BadRow(f"answer {k} has no text")
        if isinstance(start, bool) or not isinstance(start, int):
            raise _BadRow(f"answer {k} ({answer_text!r}) has no integer 'answer_start'")
        if context[start : start + len(answer_text)] != answer_text:
            raise _BadRow(_misplaced(k, answer_text, start, context))
        pairs.append((answer_text, start))
    return QAExample(qid=qid, question=question, context=context, answers=pairs)


def _misplaced(k: int, answer: str, start: int, context: str) -> str:
    there = context[max(start, 0) : max(start, 0) + len(answer)]
    found = []
    at = context.find(answer)
    while at >= 0 and len(found) < 6:
        found.append(at)
        at = context.find(answer, at + 1)
    if found:
        places = ", ".join(map(str, found[:5])) + (" and later" if len(found) > 5 else "")
        where = f"it occurs at {places}: set answer_start to the occurrence meant"
    else:
        where = "it does not occur anywhere in the context: fix the answer text or the context"
    return (
        f"answer {k} {answer!r} is not at its answer_start {start} in the context (which "
        f"reads {there!r} there); {where}"
    )


# ------------------------------------------------------------------------------ TFDS


def parse_tfds_source(name_and_split: str) -> tuple[str, str]:
    """`tfds:glue/sst2:validation` → ("glue/sst2", "validation"); the split defaults to
    "train" and may carry TFDS slicing ("train[:1000]")."""
    source = name_and_split
    if source.startswith(_TFDS_PREFIX):
        source = source[len(_TFDS_PREFIX) :]
    name, _, split = source.partition(":")
    if not name:
        raise ConfigError(
            f"TFDS source {name_and_split!r} names no dataset: write tfds:NAME[:SPLIT], e.g. "
            "tfds:glue/sst2:validation"
        )
    return name, split or "train"


def read_tfds(
    name_and_split: str,
    spec: ReaderSpec,
    data_dir: str | None = None,
    limit: int | None = None,
) -> ReadResult:
    """Reads a prepared TFDS dataset (array_record) through `as_data_source`, which needs no
    TensorFlow. The spec's text_a/text_b/label name features; text arrives as bytes and is
    decoded as UTF-8. An integer label (a ClassLabel) is the index into label_list; -1, the
    mark of an unlabelled example (GLUE's test splits), gives label None. Nothing is
    downloaded: prepare the dataset first (`tfds build NAME --file_format=array_record`)."""
    _check_limit(limit)
    if spec.format not in TEXT_FORMATS:
        raise ConfigError(
            f"config key data.reader.format={spec.format!r}: a TFDS source is read as sentence "
            f"(pair) examples, so the format must be one of {', '.join(TEXT_FORMATS)} (its text_a, "
            "text_b and label then name features)"
        )
    name, split = parse_tfds_source(name_and_split)
    where = f"{_TFDS_PREFIX}{name}:{split}"
    import tensorflow_datasets as tfds  # slow to import, and only this source needs it

    location = f"data_dir {data_dir}" if data_dir else "the default TFDS data_dir"
    build = f"prepare it with `tfds build {name} --file_format=array_record" + (
        f" --data_dir={data_dir}`" if data_dir else "`"
    )
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError:
        raise TaskDataError(
            f"{where}: no TFDS dataset {name!r} is registered or prepared in {location}; "
            f"check the name, or {build}"
        ) from None
    if not builder.is_prepared():
        raise TaskDataError(f"{where}: not prepared in {builder.data_dir}; {build}")
    try:
        source = builder.as_data_source(split=split)
    except (ValueError, KeyError, NotImplementedError) as e:
        raise TaskDataError(
            f"{where}: cannot open it as a random-access data source ({e}); the splits are "
            f"{', '.join(builder.info.splits)}, and the dataset must be prepared in "
            "array_record (file_format=array_record)"
        ) from None
    features = builder.info.features
    needed = {k: getattr(spec, k) for k in ("text_a", "text_b", "label") if getattr(spec, k)}
    for key, feature in needed.items():
        if feature not in features:
            raise ConfigError(
                f"config key data.reader.{key}={feature!r}: {where} has no such feature; its "
                f"features are {', '.join(features)}"
            )
    if spec.label:
        _check_tfds_label(spec, features[spec.label], where, tfds)
    sink = _Sink(spec, where, limit, unit="record")
    for first in range(0, len(source), 1024):  # a batch read is much faster than one by one
        indices = list(range(first, min(first + 1024, len(source))))
        for index, record in zip(indices, source.__getitems__(indices), strict=True):
            try:
                example = _tfds_example(spec, index + 1, record, where)
            except _BadRow as e:
                sink.bad(index + 1, e)
                continue
            if sink.add(example):
                return sink.result()
    return sink.result()


def _check_tfds_label(spec: ReaderSpec, feature, where: str, tfds) -> None:
    if not isinstance(feature, tfds.features.ClassLabel):
        return
    if not spec.label_list:
        raise ConfigError(
            f"config key data.reader.label_list is empty but {where} feature {spec.label!r} is a "
            f"class label ({', '.join(feature.names)}): set data.reader.label_list to its "
            f"{feature.num_classes} names in that order"
        )
    if feature.num_classes != len(spec.label_list):
        raise ConfigError(
            f"config key data.reader.label_list={','.join(spec.label_list)!r}: {where} feature "
            f"{spec.label!r} has {feature.num_classes} classes ({', '.join(feature.names)})"
        )


def _tfds_example(spec: ReaderSpec, number: int, record: Mapping, where: str) -> TextExample:
    def text(key: str):
        value = record[key]
        if isinstance(value, bytes):
            try:
                return value.decode("utf-8")
            except UnicodeDecodeError as e:
                raise _BadRow(f"feature {key!r} is not valid UTF-8 ({e.reason})") from None
        return value  # not text: _check_texts says so

    label = None
    if spec.label:
        raw = record[spec.label]
        if isinstance(raw, bytes):
            raw = text(spec.label)
        elif hasattr(raw, "item"):
            raw = raw.item()  # a NumPy scalar
        if spec.label_list and isinstance(raw, int) and not isinstance(raw, bool):
            if not -1 <= raw < len(spec.label_list):
                raise _BadRow(
                    f"label index {raw} is outside the {len(spec.label_list)} labels "
                    f"{', '.join(spec.label_list)}",
                    hint=f"set {_LABEL_KEYS} to the dataset's class names, in order",
                )
            label = None if raw == -1 else raw
        else:
            label = _label(spec, raw)
    text_a = text(spec.text_a)
    text_b = text(spec.text_b) if spec.text_b else None
    _check_texts(spec, text_a, text_b)
    return TextExample(guid=f"{where}:{number}", text_a=text_a, text_b=text_b, label=label)


# ------------------------------------------------------------------------------ presets

_KLUE_NER_TAGS = (
    "B-DT,B-LC,B-OG,B-PS,B-QT,B-TI,I-DT,I-LC,I-OG,I-PS,I-QT,I-TI,O"  # sorted, from train.tsv
)
_WIKIANN_TAGS = "B-LOC,B-ORG,B-PER,I-LOC,I-ORG,I-PER,O"
_WNUT17_TAGS = (
    "B-corporation,B-creative-work,B-group,B-location,B-person,B-product,"
    "I-corporation,I-creative-work,I-group,I-location,I-person,I-product,O"
)


def _tsv_task(
    text_a: str,
    text_b: str,
    label: str,
    label_list: str,
    metrics: str,
    main_metric: str,
    header: bool = True,
) -> dict:
    return {
        "format": "tsv",
        "text_a": text_a,
        "text_b": text_b,
        "label": label,
        "header": header,
        "quoting": False,  # every one of these TSVs holds unbalanced double quotes
        "encoding": _ENCODING,
        "label_list": label_list,
        "kind": "classification" if label_list else "regression",
        "metrics": metrics,
        "main_metric": main_metric,
        "train_file": "train.tsv",
        "eval_file": "dev.tsv",
    }


def _ner_task(fmt: str, label_list: str, train: str, dev: str, **reader) -> dict:
    columns = {"token_column": 0, "tag_column": -1, "token_prefix": ""} if fmt == "conll" else {}
    return {
        "format": fmt,
        "encoding": _ENCODING,
        **columns,
        **reader,
        "label_list": label_list,
        "kind": "token_classification",
        "metrics": "entity_f1",
        "main_metric": "f1",
        "train_file": train,
        "eval_file": dev,
    }


# Every key a preset's format reads is in the preset, with its default where the task needs
# nothing else, so the fine-tuning config has it (data.reader.KEY) for an override.
# The data configs of the tasks in ../shared/data/tasks/<task>/ (file names relative to
# that folder). `ReaderSpec.from_config(TASK_PRESETS[task])` reads them; a config for a new
# task is a dict like these.
TASK_PRESETS: dict[str, dict] = {
    "nsmc": _tsv_task("document", "", "label", "0,1", "accuracy", "accuracy"),
    # KorNLU reports Spearman correlation for KorSTS.
    "korsts": _tsv_task("sentence1", "sentence2", "score", "", "pearson_spearman", "spearman"),
    "kornli": _tsv_task(
        "sentence1",
        "sentence2",
        "gold_label",
        "entailment,neutral,contradiction",
        "accuracy",
        "accuracy",
    ),
    "klue_ner": _ner_task("klue_ner", _KLUE_NER_TAGS, "train.tsv", "dev.tsv"),
    "sst2": _tsv_task("sentence", "", "label", "0,1", "accuracy", "accuracy"),
    # headerless: source, label, original label, sentence
    "cola": _tsv_task("3", "", "1", "0,1", "matthews", "matthews_corrcoef", header=False),
    "mrpc": _tsv_task("#1 String", "#2 String", "Quality", "0,1", "accuracy_f1", "f1"),
    "rte": _tsv_task(
        "sentence1", "sentence2", "label", "entailment,not_entailment", "accuracy", "accuracy"
    ),
    "stsb": _tsv_task("sentence1", "sentence2", "score", "", "pearson_spearman", "pearson"),
    "wikiann_en": _ner_task("conll", _WIKIANN_TAGS, "train", "dev", token_prefix="en:"),
    "wnut17": _ner_task("conll", _WNUT17_TAGS, "train.conll", "dev.conll"),
    "squad_v1": {
        "format": "squad",
        "encoding": _ENCODING,
        "kind": "qa",
        "metrics": "squad",
        "main_metric": "f1",
        "train_file": "train.json",
        "eval_file": "dev.json",
    },
}
