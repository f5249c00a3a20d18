"""Raw corpora as documents: a document is a `list[str]` of sentences.

Three sources, one shape: plain text in the BERT format (one sentence or paragraph per line,
a blank line between documents), JSON Lines (one document per record) and any TFDS dataset
with a text feature, read through `array_record` random access without TensorFlow.
`iter_corpus_documents` picks the reader from a spec string. Every line goes through
`flaxbert.data.sentences.split_sentences`, so the tokenizer trainer and data preparation
see the same sentences; decoding, over-long lines, `CorpusError` and `ReadStats` are
`flaxbert.data.text_io`.

Files are streamed: memory stays bounded by `max_line_chars`, whatever the file size.
"""

from __future__ import annotations

import glob
import json
import os
import re
from collections.abc import Iterable, Iterator

import numpy as np

from flaxbert.data.sentences import split_sentences
from flaxbert.data.text_io import (
    BAD_RECORD_MODES,
    ERRORS_MODES,
    UTF8_BOM,
    CorpusError,
    CorpusNotFoundError,
    Decoder,
    Document,
    ReadStats,
    check_mode,
    chunk_line,
    read_lines,
)


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
    decode = Decoder(path, errors, stats)
    doc: Document = []
    last_lineno = 0
    for lineno, text in read_lines(path, decode, max_line_chars, stats):
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
        for piece in chunk_line(line, max_line_chars, stats):
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
    check_mode("on_bad_record", on_bad_record, BAD_RECORD_MODES)
    stats = ReadStats() if stats is None else stats
    decode = Decoder(path, errors, stats)

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
            if lineno == 1 and data.startswith(UTF8_BOM):
                data, data_offset = data[len(UTF8_BOM) :], len(UTF8_BOM)
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
    check_mode("errors", errors, ERRORS_MODES)
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
