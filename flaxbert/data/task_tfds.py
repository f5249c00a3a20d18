"""Task examples from a prepared TFDS dataset: the `tfds:NAME[:SPLIT]` source.

A task's `path` of that form is read from a TFDS dataset prepared in array_record, through
`as_data_source` (random access, no TensorFlow), with the columns of a tsv/csv/jsonl
`ReaderSpec` naming its features. Each record is checked like a row of a task file
(`flaxbert.data.task_rows`), so a bad record is an error or, with `skip_bad_rows`, a
skipped record numbered from 1.
"""

from __future__ import annotations

from collections.abc import Mapping

from flaxbert.config import ConfigError
from flaxbert.data.task_rows import BadRow, Sink, check_limit, check_texts, parse_label
from flaxbert.data.task_spec import (
    LABEL_KEYS,
    TEXT_FORMATS,
    TFDS_PREFIX,
    ReaderSpec,
    ReadResult,
    TaskDataError,
    TextExample,
)


def parse_tfds_source(name_and_split: str) -> tuple[str, str]:
    """`tfds:glue/sst2:validation` → ("glue/sst2", "validation"); the split defaults to
    "train" and may carry TFDS slicing ("train[:1000]")."""
    source = name_and_split
    if source.startswith(TFDS_PREFIX):
        source = source[len(TFDS_PREFIX) :]
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
    check_limit(limit)
    if spec.format not in TEXT_FORMATS:
        raise ConfigError(
            f"config key data.reader.format={spec.format!r}: a TFDS source is read as sentence "
            f"(pair) examples, so the format must be one of {', '.join(TEXT_FORMATS)} (its text_a, "
            "text_b and label then name features)"
        )
    name, split = parse_tfds_source(name_and_split)
    where = f"{TFDS_PREFIX}{name}:{split}"
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
    sink = Sink(spec, where, limit, unit="record")
    for first in range(0, len(source), 1024):  # a batch read is much faster than one by one
        indices = list(range(first, min(first + 1024, len(source))))
        for index, record in zip(indices, source.__getitems__(indices), strict=True):
            try:
                example = _tfds_example(spec, index + 1, record, where)
            except BadRow as e:
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
                raise BadRow(f"feature {key!r} is not valid UTF-8 ({e.reason})") from None
        return value  # not text: check_texts says so

    label = None
    if spec.label:
        raw = record[spec.label]
        if isinstance(raw, bytes):
            raw = text(spec.label)
        elif hasattr(raw, "item"):
            raw = raw.item()  # a NumPy scalar
        if spec.label_list and isinstance(raw, int) and not isinstance(raw, bool):
            if not -1 <= raw < len(spec.label_list):
                raise BadRow(
                    f"label index {raw} is outside the {len(spec.label_list)} labels "
                    f"{', '.join(spec.label_list)}",
                    hint=f"set {LABEL_KEYS} to the dataset's class names, in order",
                )
            label = None if raw == -1 else raw
        else:
            label = parse_label(spec, raw)
    text_a = text(spec.text_a)
    text_b = text(spec.text_b) if spec.text_b else None
    check_texts(spec, text_a, text_b)
    return TextExample(guid=f"{where}:{number}", text_a=text_a, text_b=text_b, label=label)
