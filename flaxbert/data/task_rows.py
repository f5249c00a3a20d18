"""One row of a task file at a time: the checks every task reader shares.

A row that breaks the format raises `BadRow`; the reader hands it to its `Sink`, which
either stops the read with a `TaskDataError` naming the file, the row and what to do, or,
with `skip_bad_rows`, leaves the row out and lists it in `ReadResult.skipped`. Bad rows are
never silently dropped. The value checks (texts, labels, tags) are here too, so that files
and TFDS sources judge a row the same way.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from typing import Any

from flaxbert.data.task_spec import (
    LABEL_KEYS,
    ReaderSpec,
    ReadResult,
    TaskDataError,
    TextExample,
)

# The logger these warnings always went to, before the readers left flaxbert.data.tasks.
log = logging.getLogger("flaxbert.data.tasks")

_SKIP_HINT = (
    "fix or delete that {unit}, or set data.reader.skip_bad_rows=True to leave such {unit}s "
    "out (they are then counted and logged)"
)


class BadRow(Exception):
    """A row that breaks the format: `reason` goes into the error or ReadResult.skipped."""

    def __init__(self, reason: str, hint: str = ""):
        super().__init__(reason)
        self.reason = reason
        self.hint = hint


@dataclasses.dataclass
class Sink:
    """Collects examples and either raises on a bad row or records it as skipped."""

    spec: ReaderSpec
    path: str
    limit: int | None
    unit: str = "line"
    examples: list = dataclasses.field(default_factory=list)
    skipped: list = dataclasses.field(default_factory=list)

    def bad(self, row: int, err: BadRow) -> None:
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


def check_limit(limit: int | None) -> None:
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
        raise ValueError(f"limit={limit!r}: must be None (everything) or an integer >= 0")


def row_guid(path: str, row: int) -> str:
    return f"{os.path.basename(path)}:{row}"


def text_example(spec: ReaderSpec, guid: str, text_a, text_b, label) -> TextExample:
    """Checks one row's values (already picked out of the row) and builds its example."""
    check_texts(spec, text_a, text_b)
    return TextExample(
        guid=guid,
        text_a=text_a,
        text_b=text_b if spec.text_b else None,
        label=parse_label(spec, label) if spec.label else None,
    )


def check_texts(spec: ReaderSpec, text_a, text_b) -> None:
    texts = [(spec.text_a, text_a)] + ([(spec.text_b, text_b)] if spec.text_b else [])
    for column, value in texts:
        if not isinstance(value, str):
            raise BadRow(f"the text in {column!r} is a {type(value).__name__}, not a string")
        if not value.strip():
            raise BadRow(f"the text in {column!r} is empty")


def parse_label(spec: ReaderSpec, raw: Any) -> int | float:
    if spec.label_list:
        name = str(raw).strip() if not isinstance(raw, bytes) else raw.decode("utf-8").strip()
        if name not in spec.label_list:
            shown = "an empty label" if not name else f"label {name!r}"
            raise BadRow(
                f"{shown} in {spec.label!r} is not one of the allowed labels "
                f"{', '.join(spec.label_list)}",
                hint=f"if it is a real class, add it to {LABEL_KEYS}",
            )
        return spec.label_list.index(name)
    try:
        if isinstance(raw, bool):
            raise ValueError
        score = float(raw) if isinstance(raw, int | float) else float(str(raw).strip())
    except ValueError:
        raise BadRow(
            f"the score {raw!r} in {spec.label!r} is not a number (data.reader.label_list is "
            "empty, so the task is read as regression)",
            hint=f"for a classification task set {LABEL_KEYS}",
        ) from None
    if not math.isfinite(score):
        raise BadRow(f"the score {raw!r} in {spec.label!r} is not a finite number")
    return score


def check_tag(spec: ReaderSpec, tag: str) -> None:
    if not tag:
        raise BadRow("the tag is empty")
    if spec.label_list and tag not in spec.label_list:
        raise BadRow(
            f"tag {tag!r} is not one of the allowed labels {', '.join(spec.label_list)}",
            hint=f"if it is a real tag, add it to {LABEL_KEYS}",
        )
