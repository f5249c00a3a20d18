"""`flaxbert prepare`: raw documents → tokenised documents, a TFDS dataset in array_record.

One pass over the corpus, on every core: the input files are cut into shards where a
document ends, and each worker process reads its shards with `flaxbert.data.text` (sentence
splitting is the slow part), tokenises them and hands back flat arrays that go to scratch
files in corpus order. Only then is each document given a split, by a hash of its text (a
document never straddles two splits, and the split does not depend on the tokenizer), and
the TFDS builder writes both splits from the scratch files.

On disk, under the output directory:

    flaxbert_pretraining_corpus/1.0.0/   TFDS dataset: dataset_info.json, features.json,
                                         *-{train,validation}.array_record-NNNNN-of-NNNNN
    sentence_counts.{split}.npy          int32 per document, so a loader needs no full read
    token_counts.{split}.npy             int64 per document
    corpus_index.{split}.npy             int64 per document: its place in the reader's order
    summary.json                         counts, dropped lines, tokenizer, inputs, fingerprint
    COMPLETE                             written last: its absence means "not finished"
    .prepare.lock                        held while preparing: concurrent callers wait, then
                                         reuse the result

A document is one record: `token_ids` (all its tokens, flat int32) and `sentence_lengths`
(int32, one per sentence), rebuilt by `PreparedDocuments[i]` as a list of int32 arrays.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import fcntl
import hashlib
import json
import logging
import mmap
import multiprocessing
import os
import re
import shutil
import sys
import threading
import time
from collections.abc import Sequence

import numpy as np
import tensorflow_datasets as tfds

from flaxbert.config import UserError, report_user_error
from flaxbert.data import text
from flaxbert.tokenizer import Tokenizer

log = logging.getLogger(__name__)

DATASET_NAME = "flaxbert_pretraining_corpus"
DATASET_VERSION = "1.0.0"
SPLITS = ("train", "validation")
# Bump when a change here alters what the same inputs prepare to: old outputs then stop
# matching and are refused instead of silently reused.
FORMAT_VERSION = 1
COMPLETE_MARKER = "COMPLETE"
SUMMARY_FILE = "summary.json"
_SCRATCH = ".prepare_scratch"
# Bytes of corpus a worker reads, splits and tokenises at a time (see _plan_shards).
_MIN_SHARD_BYTES = 1 << 20
_MAX_SHARD_BYTES = 16 << 20
_ENCODE_BATCH = 4096  # sentences per SentencePiece call: bounds the Python int lists
_PROGRESS_SECONDS = 10.0
DROPPED_EMPTY_SENTENCES = "sentences empty after tokenisation"
DROPPED_EMPTY_DOCUMENTS = "documents empty after tokenisation"
# Per-document side arrays, one .npy per split, so no record is decoded to get them.
_SIDE_ARRAYS = ("sentence_counts", "token_counts", "corpus_index")
_PART_NAMES = {  # what goes into the fingerprint, as an error message names it
    "format_version": "`flaxbert prepare` format version",
    "corpus": "corpus",
    "inputs": "corpus files",
    "tokenizer": "tokenizer model",
    "options": "options (validation split, --errors, --text-field)",
}


class PrepareError(UserError):
    """A prepared dataset is missing, incomplete or made from other inputs, or a corpus that
    cannot be prepared as asked."""


class PretrainingCorpusBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Documents of token ids. Not registered by name: each instance writes to (or reads
    from) its own `data_dir`, so any number can live in one process."""

    name = DATASET_NAME
    VERSION = tfds.core.Version(DATASET_VERSION)
    RELEASE_NOTES = {DATASET_VERSION: "Documents as flat token ids plus sentence lengths."}
    # Nothing is downloaded, so there is no checksums file to find next to the code; None
    # also skips TFDS's lookup of it, which needs the `importlib_resources` backport when
    # the builder lives in a package.
    code_path = None

    def __init__(self, *, data_dir: str, scratch: _Scratch | None = None, **kwargs):
        self._scratch = scratch
        super().__init__(data_dir=data_dir, file_format="array_record", **kwargs)

    # TFDS prints "Downloading and preparing dataset ..." and "... downloaded and prepared"
    # around download_and_prepare; nothing is downloaded here and `prepare` logs its own steps.
    def _log_download_bytes(self) -> None:
        pass

    def _log_download_done(self) -> None:
        pass

    def _info(self) -> tfds.core.DatasetInfo:
        ids = tfds.features.Tensor(
            shape=(None,), dtype=np.int32, encoding=tfds.features.Encoding.BYTES
        )
        return tfds.core.DatasetInfo(
            builder=self,
            description="Tokenised pre-training documents written by `flaxbert prepare`; "
            "sentence i of a document is token_ids[sum(sentence_lengths[:i]):][:"
            "sentence_lengths[i]]. Records keep the corpus order within each split.",
            features=tfds.features.FeaturesDict({"token_ids": ids, "sentence_lengths": ids}),
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager):
        if self._scratch is None:
            raise PrepareError("PretrainingCorpusBuilder was built for reading only")
        # TFDS refuses an empty split, so a split with no document is left out.
        return {
            split: self._generate_examples(split)
            for split in SPLITS
            if len(self._scratch.split_documents[split])
        }

    def _generate_examples(self, split: str):
        s = self._scratch
        for key, doc in enumerate(s.split_documents[split]):
            t0, t1 = s.token_starts[doc], s.token_starts[doc + 1]
            s0, s1 = s.sentence_starts[doc], s.sentence_starts[doc + 1]
            yield key, {"token_ids": s.tokens[t0:t1], "sentence_lengths": s.lengths[s0:s1]}


class PreparedDocuments(Sequence):
    """One split of a prepared corpus: `docs[i]` is a list of int32 arrays, one per sentence.

    Opens the array_record files on first use; pickling keeps only paths, so a copy can
    be sent to a thread or process and reopens there.
    """

    def __init__(self, output_dir: str, split: str, num_documents: int):
        self.output_dir = output_dir
        self.split = split
        self._num_documents = num_documents
        self._source = None
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return self._num_documents

    def __getitem__(self, index):
        if not isinstance(index, int | np.integer):
            raise TypeError(f"document index must be an int, not {type(index).__name__}")
        i = int(index)
        if i < 0:
            i += self._num_documents
        if not 0 <= i < self._num_documents:
            raise IndexError(f"document {index} out of range: {self.split} holds {len(self)}")
        record = self._data_source()[i]
        tokens = np.asarray(record["token_ids"], dtype=np.int32)
        return np.split(tokens, np.cumsum(record["sentence_lengths"])[:-1])

    def sentence_counts(self) -> np.ndarray:
        """Sentences per document (int32), from a side file: no record is decoded."""
        return self._side_array("sentence_counts")

    def token_counts(self) -> np.ndarray:
        """Tokens per document (int64), from a side file: no record is decoded."""
        return self._side_array("token_counts")

    def corpus_index(self) -> np.ndarray:
        """Each document's position among the documents the reader gave (int64)."""
        return self._side_array("corpus_index")

    def _side_array(self, kind: str) -> np.ndarray:
        return np.load(os.path.join(self.output_dir, f"{kind}.{self.split}.npy"))

    def _data_source(self):
        with self._lock:
            if self._source is None:
                builder = tfds.builder_from_directory(_dataset_dir(self.output_dir))
                self._source = builder.as_data_source(split=self.split)
            return self._source

    def __getstate__(self):
        return {"output_dir": self.output_dir, "split": self.split, "n": self._num_documents}

    def __setstate__(self, state):
        self.__init__(state["output_dir"], state["split"], state["n"])

    def __repr__(self) -> str:
        return f"PreparedDocuments({self.output_dir!r}, {self.split!r}, {len(self)} documents)"


@dataclasses.dataclass
class PreparedCorpus:
    output_dir: str
    train: PreparedDocuments
    validation: PreparedDocuments
    vocab_size: int
    tokenizer_path: str
    summary: dict
    reused: bool = False  # True when `prepare` found it already done and did no work


def load_prepared(output_dir: str) -> PreparedCorpus:
    """Opens a dataset written by `prepare`; raises PrepareError naming what is missing."""
    output_dir = os.path.abspath(output_dir)
    how = f"create it with `flaxbert prepare --corpus SPEC --tokenizer MODEL --output {output_dir}`"
    if not os.path.isdir(output_dir):
        raise PrepareError(f"{output_dir} does not exist: {how}")
    if not os.path.exists(os.path.join(output_dir, COMPLETE_MARKER)):
        raise PrepareError(
            f"{output_dir} is not a complete prepared dataset: {COMPLETE_MARKER} is missing "
            f"(an interrupted or never-run `flaxbert prepare`); {how}, which starts over"
        )
    summary = _read_json(os.path.join(output_dir, SUMMARY_FILE))
    needed = [SUMMARY_FILE, os.path.join(DATASET_NAME, DATASET_VERSION, "dataset_info.json")]
    needed += [f"{k}.{s}.npy" for s in SPLITS for k in _SIDE_ARRAYS]
    missing = [p for p in needed if not os.path.exists(os.path.join(output_dir, p))]
    if summary is None or missing:
        raise PrepareError(
            f"{output_dir} is damaged: missing or unreadable {', '.join(missing or needed[:1])}; "
            f"{how} --force"
        )
    splits = {
        s: PreparedDocuments(output_dir, s, summary["splits"][s]["documents"]) for s in SPLITS
    }
    return PreparedCorpus(
        output_dir=output_dir,
        train=splits["train"],
        validation=splits["validation"],
        vocab_size=summary["tokenizer"]["vocab_size"],
        tokenizer_path=summary["tokenizer"]["path"],
        summary=summary,
    )


def prepare(
    corpus: str,
    tokenizer_path: str,
    output_dir: str,
    *,
    validation_fraction: float = 0.01,
    validation_documents: int | None = None,
    num_workers: int | None = None,
    errors: str = "strict",
    text_field: str = "text",
    force: bool = False,
    min_split_documents: int = 1,
) -> PreparedCorpus:
    """Tokenises `corpus` with the SentencePiece model at `tokenizer_path` into `output_dir`.

    Validation documents are those whose text hashes below `validation_fraction` (at least
    `min_split_documents` when there are enough documents), or the `validation_documents`
    lowest hashes. With `min_split_documents` above 1 (pre-training's next-sentence pairs
    need 2), each split holds at least that many documents, or a PrepareError says the
    corpus is too small. Reuses `output_dir` when it already holds this corpus prepared with
    the same tokenizer and options; refuses to overwrite one made from anything else unless
    `force`. A run stopped by a bad input removes what it wrote (and `output_dir`, if it
    made it).
    """
    if not 0.0 <= validation_fraction < 1.0:
        raise ValueError(f"validation_fraction={validation_fraction!r}: must be in [0, 1)")
    if validation_documents is not None and validation_documents < 0:
        raise ValueError(f"validation_documents={validation_documents!r}: must be >= 0")
    if errors not in ("strict", "replace"):
        raise ValueError(f"errors={errors!r}: must be 'strict' or 'replace'")
    if min_split_documents < 1:
        raise ValueError(f"min_split_documents={min_split_documents!r}: must be >= 1")
    if not os.path.isfile(tokenizer_path):
        raise FileNotFoundError(
            f"tokenizer model {tokenizer_path} not found: train one with `flaxbert train-tokenizer`"
        )
    if not corpus.startswith("tfds:"):
        text.corpus_files(corpus)  # a missing corpus fails before anything is written
    output_dir = os.path.abspath(output_dir)
    tokenizer_path = os.path.abspath(tokenizer_path)
    if not num_workers:
        num_workers = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1
    options = {
        "validation_fraction": validation_fraction,
        "validation_documents": validation_documents,
        "errors": errors,
        "text_field": text_field,
    }
    if min_split_documents > 1:  # only then does it change the split (and the fingerprint)
        options["min_split_documents"] = min_split_documents
    if getattr(multiprocessing.current_process(), "_inheriting", False):
        # A worker re-running an unguarded script would wait on our lock forever.
        raise RuntimeError(
            "prepare() was called while a worker process was starting: call it under "
            "`if __name__ == '__main__':` in the script that runs it"
        )
    created = not os.path.isdir(output_dir)
    os.makedirs(output_dir, exist_ok=True)
    # Several processes (the hosts of one job) may prepare into one directory: the first
    # does the work while the others wait, then find it done and reuse it.
    with open(os.path.join(output_dir, ".prepare.lock"), "a") as lock:
        _wait_for_lock(lock, output_dir)
        try:
            return _prepare_locked(
                corpus, tokenizer_path, output_dir, options, num_workers=num_workers, force=force
            )
        except UserError:  # an interrupt or a bug leaves what it left, to look at
            if created and os.listdir(output_dir) == [".prepare.lock"]:
                shutil.rmtree(output_dir, ignore_errors=True)
            raise


def _wait_for_lock(lock, output_dir: str) -> None:
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        log.info("prepare: waiting for another process preparing into %s to finish", output_dir)
        fcntl.flock(lock, fcntl.LOCK_EX)


def _prepare_locked(corpus, tokenizer_path, output_dir, options, *, num_workers, force):
    done = os.path.exists(os.path.join(output_dir, COMPLETE_MARKER))
    previous = (_read_json(os.path.join(output_dir, SUMMARY_FILE)) if done else None) or {}
    inputs = _describe_inputs(corpus, previous.get("inputs", []))
    parts = {
        "format_version": FORMAT_VERSION,
        "corpus": corpus if corpus.startswith("tfds:") else None,
        "inputs": [i["sha256"] for i in inputs],
        "tokenizer": _sha256_file(tokenizer_path),
        "options": options,
    }
    fingerprint = _sha256_bytes(json.dumps(parts, sort_keys=True).encode())
    if done and previous.get("fingerprint") == fingerprint:
        log.info(
            "prepare: reusing %s: it already holds %s prepared with the same tokenizer and "
            "options (fingerprint %s)",
            output_dir,
            corpus,
            fingerprint[:12],
        )
        return dataclasses.replace(load_prepared(output_dir), reused=True)
    if done and not force:
        before = previous.get("parts", {})
        changed = [_PART_NAMES[k] for k, v in parts.items() if before.get(k) != v]
        raise PrepareError(
            f"{output_dir} already holds a dataset prepared from different "
            f"{', '.join(changed)} (see its {SUMMARY_FILE}); pass --force (force=True) to "
            "replace it, or choose another --output"
        )
    start = time.perf_counter()
    _remove_own_files(output_dir)  # the marker goes first: never "complete" while in flux
    try:
        summary = _build(
            corpus, tokenizer_path, parts["tokenizer"], output_dir, options, num_workers
        )
    except UserError:  # a bad input: no scratch files or half-written splits left behind
        _remove_own_files(output_dir)
        raise
    summary.update(
        format_version=FORMAT_VERSION,
        fingerprint=fingerprint,
        parts=parts,
        corpus=corpus,
        inputs=inputs,
        options=options,
        seconds=round(time.perf_counter() - start, 2),
        num_workers=num_workers,
    )
    _write_json_atomic(os.path.join(output_dir, SUMMARY_FILE), summary)
    _write_json_atomic(
        os.path.join(output_dir, COMPLETE_MARKER),
        {"fingerprint": fingerprint, "completed": time.strftime("%Y-%m-%dT%H:%M:%S")},
    )
    splits = summary["splits"]
    small = [f"{k} {v['documents']}" for k, v in splits.items() if v["documents"] < 2]
    if small:
        log.warning(
            "prepare: too few documents for pre-training in %s (%s): next-sentence pairs need "
            "at least 2 documents in each split; prepare again with `flaxbert prepare "
            "--validation-documents 2` (or a larger corpus)",
            output_dir,
            ", ".join(small),
        )
    log.info(
        "prepare: done in %.1f s: %s train / %s validation documents in %s",
        summary["seconds"],
        f"{splits['train']['documents']:,}",
        f"{splits['validation']['documents']:,}",
        output_dir,
    )
    return load_prepared(output_dir)


def _build(corpus, tokenizer_path, tokenizer_sha256, output_dir, options, num_workers) -> dict:
    """Tokenises, splits and writes the dataset and side arrays; returns the counts."""
    scratch_dir = os.path.join(output_dir, _SCRATCH)
    os.makedirs(scratch_dir)
    vocab_size = Tokenizer.load(tokenizer_path).vocab_size
    stats = text.ReadStats()
    scratch = _tokenize(corpus, tokenizer_path, scratch_dir, num_workers, options, stats)
    scratch.assign_splits(
        options["validation_fraction"],
        options["validation_documents"],
        options.get("min_split_documents", 1),
        corpus,
    )
    log.info("prepare: writing the TFDS dataset (array_record) under %s", output_dir)
    builder = PretrainingCorpusBuilder(data_dir=output_dir, scratch=scratch)
    with _quiet_tfds():
        builder.download_and_prepare(download_dir=os.path.join(scratch_dir, "downloads"))
    splits = {}
    for split in SPLITS:
        docs = scratch.split_documents[split]
        for kind, per_document in zip(
            _SIDE_ARRAYS,
            (scratch.sentences, scratch.num_tokens, scratch.corpus_index),
            strict=True,
        ):
            np.save(os.path.join(output_dir, f"{kind}.{split}.npy"), per_document[docs])
        splits[split] = {
            "documents": len(docs),
            "sentences": int(scratch.sentences[docs].sum()),
            "tokens": int(scratch.num_tokens[docs].sum()),
            "single_sentence_documents": int(np.count_nonzero(scratch.sentences[docs] == 1)),
        }
    dropped = collections.Counter(stats.dropped)
    dropped[DROPPED_EMPTY_SENTENCES] += scratch.empty_sentences
    dropped[DROPPED_EMPTY_DOCUMENTS] += scratch.empty_documents
    del builder, scratch  # let go of the scratch memmaps before their files go
    shutil.rmtree(scratch_dir)
    return {
        "tokenizer": {
            "path": tokenizer_path,
            "vocab_size": int(vocab_size),
            "sha256": tokenizer_sha256,
        },
        "splits": splits,
        "read": {
            "documents": stats.documents,
            "lines": stats.lines,
            "sentences": stats.sentences,
            "characters": stats.characters,
        },
        "dropped": {k: v for k, v in sorted(dropped.items()) if v},
    }


# --- tokenising -------------------------------------------------------------------------


@dataclasses.dataclass
class _Scratch:
    """The tokenised corpus in corpus order, before the split: flat arrays on disk."""

    tokens: np.ndarray  # int32, all tokens
    lengths: np.ndarray  # int32, tokens per sentence
    sentences: np.ndarray  # int32, sentences per document
    num_tokens: np.ndarray  # int64, tokens per document
    text_hash: np.ndarray  # uint64, a hash of each document's text
    corpus_index: np.ndarray  # int64, position in the reader's documents (dropped ones too)
    empty_sentences: int
    empty_documents: int
    split_documents: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        self.token_starts = np.concatenate([[0], np.cumsum(self.num_tokens)])
        self.sentence_starts = np.concatenate([[0], np.cumsum(self.sentences, dtype=np.int64)])

    def assign_splits(
        self, fraction: float, count: int | None, min_split: int = 1, corpus: str = ""
    ) -> None:
        n = len(self.sentences)
        order = np.argsort(self.text_hash, kind="stable")
        if count is not None:
            num_validation = min(count, max(n - 1, 0))
        else:
            below = np.count_nonzero(self.text_hash / 2.0**64 < fraction)
            num_validation = min(max(below, min_split if fraction > 0 else 0), max(n - 1, 0))
        if min_split > 1 and min(num_validation, n - num_validation) < min_split:
            raise PrepareError(
                f"the corpus {corpus!r} holds {n} document(s) with text, split {n - num_validation}"
                f" train / {num_validation} validation; each split needs at least {min_split} "
                f"documents (next-sentence pairs take the random next segment from another "
                f"document), so at least {2 * min_split} in all: give a larger corpus (a blank "
                "line ends a document)"
            )
        is_validation = np.zeros(n, dtype=bool)
        is_validation[order[:num_validation]] = True
        self.split_documents = {
            "train": np.flatnonzero(~is_validation),
            "validation": np.flatnonzero(is_validation),
        }


def _tokenize(corpus, tokenizer_path, scratch_dir, num_workers, options, stats) -> _Scratch:
    shards = _plan_shards(corpus, num_workers)
    log.info(
        "prepare: tokenising %s (%d shard(s)) with %s on %d worker process(es)",
        corpus,
        len(shards),
        tokenizer_path,
        num_workers,
    )
    tokens_path = os.path.join(scratch_dir, "tokens.int32")
    lengths_path = os.path.join(scratch_dir, "lengths.int32")
    per_document = collections.defaultdict(list)
    empty_sentences = empty_documents = documents_read = 0
    progress = _Progress()
    with (
        open(tokens_path, "wb") as tokens_file,
        open(lengths_path, "wb") as lengths_file,
        _shard_reader(tokenizer_path, num_workers, options, scratch_dir) as read,
    ):
        for result in read(shards):
            result.tokens.tofile(tokens_file)
            result.lengths.tofile(lengths_file)
            kept = result.sentences > 0
            per_document["sentences"].append(result.sentences[kept])
            per_document["num_tokens"].append(result.num_tokens[kept])
            per_document["text_hash"].append(result.text_hash[kept])
            per_document["corpus_index"].append(np.flatnonzero(kept) + documents_read)
            documents_read += len(kept)
            empty_documents += int(np.count_nonzero(~kept))
            empty_sentences += result.empty_sentences
            _add_stats(stats, result.stats)
            progress.update(int(kept.sum()), len(result.lengths), len(result.tokens))
    progress.finish()
    if documents_read == 0:
        raise PrepareError(f"the corpus {corpus!r} holds no documents: its input is blank")
    if documents_read == empty_documents:
        raise PrepareError(f"no document of {corpus!r} has any token after tokenisation")
    return _Scratch(
        tokens=_load_flat(tokens_path),
        lengths=_load_flat(lengths_path),
        sentences=np.concatenate(per_document["sentences"]).astype(np.int32),
        num_tokens=np.concatenate(per_document["num_tokens"]).astype(np.int64),
        text_hash=np.concatenate(per_document["text_hash"]).astype(np.uint64),
        corpus_index=np.concatenate(per_document["corpus_index"]).astype(np.int64),
        empty_sentences=empty_sentences,
        empty_documents=empty_documents,
    )


def _add_stats(total, part) -> None:
    for field in ("documents", "lines", "sentences", "characters"):
        setattr(total, field, getattr(total, field) + getattr(part, field))
    total.dropped.update(part.dropped)


# --- shards: the unit of work of a worker process -----------------------------------------


@dataclasses.dataclass(frozen=True)
class _Shard:
    """Bytes [start, stop) of a corpus file, cut where a document ends, or a whole tfds:
    spec. Reading shards one after the other gives the same documents as reading the files
    whole: so the slow part, sentence splitting, runs in every worker, not in one reader."""

    index: int
    path: str
    start: int = 0
    stop: int = 0
    first_line: int = 1


@dataclasses.dataclass
class _ShardResult:
    tokens: np.ndarray  # int32, the tokens of the kept sentences, flat
    lengths: np.ndarray  # int32 per kept sentence
    sentences: np.ndarray  # int32 per document read: kept sentences (0: dropped document)
    num_tokens: np.ndarray  # int64 per document read
    text_hash: np.ndarray  # uint64 per document read
    empty_sentences: int
    stats: object  # text.ReadStats of this shard


_BLANK_LINE = re.compile(rb"\n[ \t\r\f\v]*\n")


def _is_jsonl(path: str) -> bool:
    return path.lower().endswith((".jsonl", ".json"))  # as text.iter_corpus_documents decides


def _plan_shards(corpus: str, num_workers: int) -> list[_Shard]:
    if corpus.startswith("tfds:"):
        return [_Shard(0, corpus)]
    files = text.corpus_files(corpus)
    total = sum(os.path.getsize(f) for f in files)
    # A few shards per worker balance the load; the cap bounds a worker's memory.
    target = int(np.clip(total // (4 * num_workers), _MIN_SHARD_BYTES, _MAX_SHARD_BYTES))
    shards = []
    for path in files:
        size = os.path.getsize(path)
        if size <= target:
            shards.append(_Shard(len(shards), path, 0, size))
            continue
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            start, line = 0, 1
            while start < size:
                stop = size
                if start + target < size:
                    # Cut after a blank line (text: a document ends there) or any line end
                    # (JSON Lines: one document per line).
                    if _is_jsonl(path):
                        end = data.find(b"\n", start + target)
                        stop = size if end < 0 else end + 1
                    else:
                        blank = _BLANK_LINE.search(data, start + target)
                        stop = size if blank is None else blank.end()
                shards.append(_Shard(len(shards), path, start, stop, line))
                line += data[start:stop].count(b"\n")
                start = stop
    return shards


def _read_shard(shard: _Shard, options: dict, scratch_dir: str, tokenizer) -> _ShardResult:
    stats = text.ReadStats()
    whole = shard.path.startswith("tfds:") or (
        shard.start == 0 and shard.stop == os.path.getsize(shard.path)
    )
    path = shard.path
    if not whole:  # the reader takes paths: give it a copy of the byte range
        path = os.path.join(scratch_dir, f"shard-{shard.index:06d}{os.path.splitext(path)[1]}")
        with open(shard.path, "rb") as src, open(path, "wb") as dst:
            src.seek(shard.start)
            dst.write(src.read(shard.stop - shard.start))
    try:
        if shard.path.startswith("tfds:"):
            docs = text.iter_corpus_documents(
                path, text_field=options["text_field"], errors=options["errors"], stats=stats
            )
        elif _is_jsonl(path):
            docs = text.read_jsonl_documents(
                path, text_field=options["text_field"], errors=options["errors"], stats=stats
            )
        else:
            docs = text.read_text_documents(path, errors=options["errors"], stats=stats)
        sentences, per_document, hashes = [], [], []
        for doc in docs:
            sentences.extend(doc)
            per_document.append(len(doc))
            hashes.append(_text_hash(doc))
    except text.CorpusError as e:
        if whole:
            raise
        raise e.relocated(_relocate(e.problem, path, shard)) from None
    finally:
        if not whole:
            os.remove(path)
    flat, lengths = _encode_sentences(sentences, tokenizer)
    document = np.repeat(np.arange(len(per_document)), per_document)
    kept = lengths > 0
    return _ShardResult(
        tokens=flat,
        lengths=lengths[kept],
        sentences=np.bincount(document[kept], minlength=len(per_document)).astype(np.int32),
        num_tokens=np.bincount(document, weights=lengths, minlength=len(per_document)).astype(
            np.int64
        ),
        text_hash=np.asarray(hashes, dtype=np.uint64),
        empty_sentences=int(np.count_nonzero(~kept)),
        stats=stats,
    )


def _relocate(message: str, copy: str, shard: _Shard) -> str:
    """Rewrites a reader error about a shard's copy to name the corpus file, line and byte."""
    line = re.compile(re.escape(copy) + r":(\d+)")
    if not line.search(message):
        return f"{shard.path} (in the part from line {shard.first_line}): {message}"
    message = line.sub(lambda m: f"{shard.path}:{int(m[1]) + shard.first_line - 1}", message)
    return re.sub(r"byte offset (\d+)", lambda m: f"byte offset {int(m[1]) + shard.start}", message)


def _text_hash(document: list[str]) -> int:
    digest = hashlib.blake2b(digest_size=8)
    for sentence in document:
        digest.update(sentence.encode("utf-8", "surrogatepass") + b"\n")
    return int.from_bytes(digest.digest(), "little")


_WORKER_TOKENIZER = None


def _load_worker_tokenizer(path: str) -> None:
    global _WORKER_TOKENIZER
    _WORKER_TOKENIZER = Tokenizer.load(path)


def _read_shard_in_worker(shard, options, scratch_dir) -> _ShardResult:
    return _read_shard(shard, options, scratch_dir, _WORKER_TOKENIZER)


def _encode_sentences(sentences: list[str], tokenizer) -> tuple[np.ndarray, np.ndarray]:
    """→ (all token ids flat, int32 count per sentence), a batch at a time."""
    flat, lengths = [], []
    for begin in range(0, len(sentences), _ENCODE_BATCH):
        # One thread each: the parallelism comes from the worker processes.
        ids = tokenizer.encode_batch(sentences[begin : begin + _ENCODE_BATCH], num_threads=1)
        lengths.append(np.fromiter(map(len, ids), dtype=np.int32, count=len(ids)))
        flat.extend(ids)
    if not flat:
        return np.zeros(0, np.int32), np.zeros(0, np.int32)
    return np.concatenate(flat).astype(np.int32, copy=False), np.concatenate(lengths)


@contextlib.contextmanager
def _shard_reader(tokenizer_path: str, num_workers: int, options: dict, scratch_dir: str):
    """Yields read(shards) -> iterator of _ShardResult, in shard order."""
    if num_workers <= 1:
        tokenizer = Tokenizer.load(tokenizer_path)
        yield lambda shards: (_read_shard(s, options, scratch_dir, tokenizer) for s in shards)
        return
    # spawn, not fork: the caller may hold JAX or other threads that fork would copy badly.
    context = multiprocessing.get_context("spawn")
    with context.Pool(num_workers, _load_worker_tokenizer, (tokenizer_path,)) as pool:

        def read(shards):
            # A bounded number of shards in flight keeps memory flat on any corpus size.
            in_flight = collections.deque()
            for shard in shards:
                args = (shard, options, scratch_dir)
                in_flight.append(pool.apply_async(_read_shard_in_worker, args))
                if len(in_flight) >= 2 * num_workers:
                    yield _worker_result(in_flight.popleft())
            while in_flight:
                yield _worker_result(in_flight.popleft())

        yield read


def _worker_result(pending):
    """A worker's result; a user's mistake it found (a bad byte, a bad record) is raised here
    as itself, without the worker's RemoteTraceback chained to it."""
    try:
        return pending.get()
    except UserError as e:
        raise e.with_traceback(None) from None


class _Progress:
    def __init__(self):
        self.start = self.last = time.perf_counter()
        self.documents = self.sentences = self.tokens = 0

    def update(self, documents: int, sentences: int, tokens: int) -> None:
        self.documents += documents
        self.sentences += sentences
        self.tokens += tokens
        now = time.perf_counter()
        if now - self.last >= _PROGRESS_SECONDS:
            self.last = now
            self._log("so far")

    def finish(self) -> None:
        self._log("tokenised")

    def _log(self, what: str) -> None:
        seconds = max(time.perf_counter() - self.start, 1e-9)
        log.info(
            "prepare: %s %s documents, %s sentences, %s tokens in %.0f s "
            "(%s sentences/s, %s tokens/s)",
            what,
            f"{self.documents:,}",
            f"{self.sentences:,}",
            f"{self.tokens:,}",
            seconds,
            f"{self.sentences / seconds:,.0f}",
            f"{self.tokens / seconds:,.0f}",
        )


# --- files ------------------------------------------------------------------------------


def _dataset_dir(output_dir: str) -> str:
    return os.path.join(output_dir, DATASET_NAME, DATASET_VERSION)


def _load_flat(path: str) -> np.ndarray:
    if os.path.getsize(path) == 0:
        return np.zeros(0, dtype=np.int32)
    return np.memmap(path, dtype=np.int32, mode="r")


def _remove_own_files(output_dir: str) -> None:
    """Removes what `prepare` writes, the marker first, and `flat/` (the loader's arrays
    derived from the dataset, see flaxbert.data.sources); leaves anything else alone."""
    own = [COMPLETE_MARKER, SUMMARY_FILE, _SCRATCH, DATASET_NAME, "flat"]
    own += [f"{k}.{s}.npy" for s in SPLITS for k in _SIDE_ARRAYS]
    for name in own:
        path = os.path.join(output_dir, name)
        if os.path.isdir(path):
            shutil.rmtree(path)
        elif os.path.exists(path):
            os.remove(path)


def _describe_inputs(corpus: str, previous: list[dict]) -> list[dict]:
    """Path, size, mtime and content hash of each input file; a file whose path, size and
    mtime match the previous run keeps its recorded hash instead of being read again."""
    if corpus.startswith("tfds:"):
        return []  # the spec itself goes into the fingerprint
    paths = [os.path.abspath(p) for p in text.corpus_files(corpus)]  # as the reader sees them
    known = {(i["path"], i["size"], i["mtime_ns"]): i["sha256"] for i in previous}
    inputs = []
    for path in paths:
        st = os.stat(path)
        key = (path, st.st_size, st.st_mtime_ns)
        sha = known.get(key) or _sha256_file(path)
        inputs.append({"path": path, "size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": sha})
    return inputs


def _sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()


def _sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _read_json(path: str) -> dict | None:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _write_json_atomic(path: str, value: dict) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(value, f, indent=2, ensure_ascii=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


@contextlib.contextmanager
def _quiet_tfds():
    """TFDS's own progress bars and banner would interleave with ours; stdout stays free
    for the summary that `flaxbert prepare` prints."""
    from tensorflow_datasets.core.utils import tqdm_utils

    was_active = getattr(tqdm_utils, "_active", True)
    absl_log = logging.getLogger("absl")
    was_level = absl_log.level
    tfds.display_progress_bar(False)
    absl_log.setLevel(max(was_level, logging.WARNING))
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        tfds.display_progress_bar(was_active)
        absl_log.setLevel(was_level)


# --- command line -----------------------------------------------------------------------


def add_prepare_parser(subparsers) -> argparse.ArgumentParser:
    """Adds `prepare` to a `flaxbert` sub-command parser; its handler is `run_prepare`."""
    p = subparsers.add_parser(
        "prepare",
        help="tokenise a raw corpus into a TFDS dataset (array_record) for pre-training",
        description="Tokenise raw documents with a SentencePiece model into a TFDS dataset "
        "in array_record format, split into train and validation by document, on every CPU "
        "core. Re-running with the same inputs reuses the result.",
    )
    p.add_argument(
        "--corpus",
        required=True,
        metavar="SPEC",
        help="a text file or glob such as 'data/*.txt' (one sentence or paragraph per line, "
        "a blank line between documents), a .jsonl file (one document per record), or "
        "tfds:NAME[:SPLIT] for a TFDS dataset",
    )
    p.add_argument(
        "--tokenizer",
        required=True,
        metavar="MODEL",
        help="SentencePiece .model file from `flaxbert train-tokenizer`",
    )
    p.add_argument(
        "--output",
        required=True,
        metavar="DIR",
        help="directory for the prepared dataset (the pre-training config's data.corpus)",
    )
    p.add_argument(
        "--validation-fraction",
        type=float,
        default=0.01,
        metavar="X",
        help="share of documents held out for validation, chosen by a hash of their text; "
        "at least one when there are two or more documents (default: %(default)s)",
    )
    p.add_argument(
        "--validation-documents",
        type=int,
        default=None,
        metavar="N",
        help="hold out exactly N documents instead of --validation-fraction",
    )
    p.add_argument(
        "--num-workers",
        type=int,
        default=None,
        metavar="N",
        help="processes that read, split and tokenise the corpus (default: every CPU core "
        "this process may use)",
    )
    text.add_text_input_flags(p)
    p.add_argument(
        "--force",
        action="store_true",
        help="replace a dataset in --output that was prepared from another corpus, "
        "tokenizer or options (without it, that is an error)",
    )
    return p


def run_prepare(args: argparse.Namespace) -> int:
    try:
        prepared = prepare(
            args.corpus,
            args.tokenizer,
            args.output,
            validation_fraction=args.validation_fraction,
            validation_documents=args.validation_documents,
            num_workers=args.num_workers,
            errors=args.errors,
            text_field=args.text_field,
            force=args.force,
        )
    except text.CorpusError as e:
        return report_user_error("prepare", e.spelled("flags"))
    except (UserError, OSError, ValueError) as e:  # ValueError: a flag's value out of range
        return report_user_error("prepare", e)
    print(format_summary(prepared))
    return 0


def format_summary(prepared: PreparedCorpus) -> str:
    """The few lines `flaxbert prepare` prints: where, how long, counts per split, drops."""
    s = prepared.summary
    how = "reused" if prepared.reused else f"prepared in {s['seconds']:.1f} s"
    tok = s["tokenizer"]
    lines = [
        f"{prepared.output_dir}: {how}",
        f"  corpus     {s['corpus']}",
        f"  tokenizer  {tok['path']} (vocab {tok['vocab_size']:,}, sha256 {tok['sha256'][:12]})",
        f"  read       {s['read']['lines']:,} lines, {s['read']['sentences']:,} sentences, "
        f"{s['read']['characters']:,} characters",
        f"  {'split':<12}{'documents':>12}{'sentences':>14}{'tokens':>16}{'1-sentence docs':>17}",
    ]
    for split, c in s["splits"].items():
        lines.append(
            f"  {split:<12}{c['documents']:>12,}{c['sentences']:>14,}{c['tokens']:>16,}"
            f"{c['single_sentence_documents']:>17,}"
        )
    for reason, count in s["dropped"].items():
        lines.append(f"  dropped    {count:,} {reason}")
    return "\n".join(lines)
