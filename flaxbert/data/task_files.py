"""Fine-tuning task files → examples, driven by config values alone.

A task is described by its `data` config: the file `format`, which columns (or JSON keys)
hold the texts and the label, the label names, and a few format switches. `ReaderSpec`
checks that description once, before any file is opened, so a typo in a config fails at
start-up with the key named; `read_examples` then turns a file into a list of examples.
A new task therefore needs a config, not code: `flaxbert.data.tasks.TASK_PRESETS` holds the
configs of the tasks in ../shared/data/tasks and shows what one looks like.

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

import csv
import io
import json
import os
from typing import Any

from flaxbert.data.task_rows import (
    BadRow,
    Sink,
    check_limit,
    check_tag,
    row_guid,
    text_example,
)
from flaxbert.data.task_spec import (
    BOM,
    TFDS_PREFIX,
    QAExample,
    ReaderSpec,
    ReadResult,
    TaskDataError,
    TaskFileNotFoundError,
    TokenExample,
    as_int,
)
from flaxbert.data.task_tfds import read_tfds


def read_examples(
    spec: ReaderSpec, path: str | os.PathLike, limit: int | None = None
) -> ReadResult:
    """Reads a task file (or a `tfds:NAME[:SPLIT]` source) into examples of the type its
    format gives: TextExample, TokenExample or QAExample. `limit` keeps only the first
    `limit` examples and stops reading there, for quick runs."""
    path = os.fspath(path)
    check_limit(limit)
    if path.startswith(TFDS_PREFIX):
        return read_tfds(path, spec, limit=limit)
    text = _read_text(path, spec.encoding)
    sink = Sink(spec, path, limit, unit="question" if spec.format == "squad" else "line")
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


def _read_table(spec: ReaderSpec, text: str, sink: Sink, delimiter: str) -> None:
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
                    BadRow(
                        f"found {len(row)} {kind} columns, expected {expected} as in {where}",
                        hint=hint,
                    ),
                )
                continue
            try:
                example = text_example(
                    spec,
                    row_guid(sink.path, line),
                    *(None if columns[k] is None else row[columns[k]] for k in keys),
                )
            except BadRow as e:
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
        if header and header[0].startswith(BOM)
        else ""
    )
    headerless = (
        "; for a file without a header set data.reader.header=False"
        if as_int(name) is not None
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
    index = as_int(value)
    if not -len(row) <= index < len(row):
        raise TaskDataError(
            f"{path}, line {line}: data.reader.{key}={value!r} but the first row has only "
            f"{len(row)} columns (indices are 0-based)"
        )
    return index % len(row)


def _read_jsonl(spec: ReaderSpec, text: str, sink: Sink) -> None:
    keys = [k for k in (spec.text_a, spec.text_b, spec.label) if k]
    for line, content in _lines(text):
        if not content.strip():
            continue
        try:
            record = json.loads(content)
        except json.JSONDecodeError as e:
            sink.bad(line, BadRow(f"not valid JSON ({e.msg} at column {e.colno})"))
            continue
        if not isinstance(record, dict):
            sink.bad(line, BadRow(f"a JSON {type(record).__name__}, not an object"))
            continue
        missing = [k for k in keys if k not in record]
        if missing:
            sink.bad(
                line,
                BadRow(
                    f"the object has {len(keys) - len(missing)} of the {len(keys)} expected keys:"
                    f" no {', '.join(map(repr, missing))} (it has {', '.join(map(repr, record))})"
                ),
            )
            continue
        try:
            example = text_example(
                spec,
                row_guid(sink.path, line),
                record[spec.text_a],
                record[spec.text_b] if spec.text_b else None,
                record[spec.label] if spec.label else None,
            )
        except BadRow as e:
            sink.bad(line, e)
            continue
        if sink.add(example):
            return


def _read_conll(spec: ReaderSpec, text: str, sink: Sink) -> None:
    """Sentences of `TOKEN<tab>TAG` lines. A stray U+FEFF (a byte-order mark pasted into the
    middle of a file, as in wnut17's dev file) is dropped: it is invisible, and a line of
    only that is a sentence break, not a token."""
    words: list[str] = []
    tags: list[str] = []
    start = 0  # line of the sentence's first token
    error: tuple[int, BadRow] | None = None  # the sentence's first bad line
    n_fields = None  # fixed by the file's first token line

    def flush() -> bool:
        nonlocal words, tags, error
        done = False
        if error is not None:
            sink.bad(*error)
        elif words:
            done = sink.add(TokenExample(row_guid(sink.path, start), words, tags))
        words, tags, error = [], [], None
        return done

    for line, content in _lines(text):
        content = content.replace(BOM, "")
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
                raise BadRow(
                    f"found {len(fields)} fields, expected {n_fields} as on the file's first "
                    "token line",
                    hint="a token line is TOKEN<tab>TAG; a space or tab inside a token splits it",
                )
            word = fields[spec.token_column].strip()
            if spec.token_prefix and word.startswith(spec.token_prefix):
                word = word[len(spec.token_prefix) :]
            if not word:
                raise BadRow("the token is empty")
            tag = fields[spec.tag_column].strip()
            check_tag(spec, tag)
        except BadRow as e:
            error = (line, e)
            continue
        words.append(word)
        tags.append(tag)
    flush()


def _read_klue_ner(spec: ReaderSpec, text: str, sink: Sink) -> None:
    """KLUE-NER: each sentence starts with `## ID<tab>TAGGED TEXT` (the file starts with a few
    more `## ` lines of its own), then one `CHAR<tab>TAG` line per character. A character
    line is split on its one tab and never stripped: the character may be a space."""
    chars: list[str] = []
    tags: list[str] = []
    comment: tuple[int, str] | None = None  # (line, sentence id) of the last `## ` line
    start = 0
    error: tuple[int, BadRow] | None = None

    def flush() -> bool:
        nonlocal chars, tags, error, comment
        done = False
        if error is not None:
            sink.bad(*error)
        elif chars:
            guid = comment[1] if comment and comment[1] else row_guid(sink.path, start)
            done = sink.add(TokenExample(guid, chars, tags))
        elif comment is not None:
            sink.bad(
                comment[0],
                BadRow(
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
                raise BadRow(f"found {len(fields)} tab-separated fields, expected 2 (CHAR<tab>TAG)")
            char, tag = fields[0], fields[1].strip()
            if len(char) != 1:
                raise BadRow(
                    f"{char!r} is not one character (KLUE-NER is tagged per character; a "
                    "space is the character ' ')"
                )
            check_tag(spec, tag)
        except BadRow as e:
            error = (line, e)
            continue
        chars.append(char)
        tags.append(tag)
    if chars or error or comment:
        flush()


def _read_squad(text: str, sink: Sink) -> None:
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
                except BadRow as e:
                    qid = qa.get("id") if isinstance(qa, dict) else None
                    e.reason = f"(id {qid!r}, article {title!r}) {e.reason}"
                    sink.bad(number, e)
                    continue
                seen.add(example.qid)
                if sink.add(example):
                    return


def _qa_example(qa: Any, context: Any, seen: set[str]) -> QAExample:
    if not isinstance(qa, dict):
        raise BadRow(f"the question is a {type(qa).__name__}, not an object")
    qid, question, answers = qa.get("id"), qa.get("question"), qa.get("answers")
    if not isinstance(qid, str) or not qid:
        raise BadRow("the question has no 'id' string")
    if qid in seen:
        raise BadRow("another question has the same id", hint="ids must be unique")
    if not isinstance(question, str) or not question.strip():
        raise BadRow("the question text is empty")
    if not isinstance(context, str) or not context.strip():
        raise BadRow("the paragraph's context is empty")
    if not isinstance(answers, list) or not answers:
        raise BadRow(
            "the question has no answers (SQuAD v1.1 has at least one; unanswerable "
            "questions are SQuAD 2.0, which this reader does not read)"
        )
    pairs = []
    for k, answer in enumerate(answers, 1):
        answer_text = answer.get("text") if isinstance(answer, dict) else None
        start = answer.get("answer_start") if isinstance(answer, dict) else None
        if not isinstance(answer_text, str) or not answer_text.strip():
            raise BadRow(f"answer {k} has no text")
        if isinstance(start, bool) or not isinstance(start, int):
            raise BadRow(f"answer {k} ({answer_text!r}) has no integer 'answer_start'")
        if context[start : start + len(answer_text)] != answer_text:
            raise BadRow(_misplaced(k, answer_text, start, context))
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
