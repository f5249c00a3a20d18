"""How a fine-tuning task's files are described: the reader spec and what a read gives.

A task's `data` config names the file `format`, which columns (or JSON keys) hold the texts
and the label, the label names, and a few format switches. `ReaderSpec` checks that
description once, before any file is opened, so a typo in a config fails at start-up with
the key named; the example types (`TextExample`, `TokenExample`, `QAExample`), `ReadResult`
and the errors defined here are what the readers in `flaxbert.data.task_files` and
`flaxbert.data.task_tfds` return or raise.
"""

from __future__ import annotations

import codecs
import dataclasses
import difflib
from collections.abc import Mapping
from typing import Any

from flaxbert.config import ConfigError, UserError

FORMATS = ("tsv", "csv", "jsonl", "conll", "klue_ner", "squad")
TEXT_FORMATS = ("tsv", "csv", "jsonl")  # formats that give TextExamples
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
TFDS_PREFIX = "tfds:"
# Fine-tuning reads its label names from data.label_list and the reader checks rows against
# data.reader.label_list: a new label goes into both.
LABEL_KEYS = "data.label_list and data.reader.label_list"
BOM = "\ufeff"
DEFAULT_ENCODING = "utf-8-sig"  # UTF-8, a leading byte-order mark dropped (MRPC's files have one)


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
    encoding: str = DEFAULT_ENCODING

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
                if value and as_int(value) is None:
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
        number = as_int(value)
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


def as_int(value: Any) -> int | None:
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
