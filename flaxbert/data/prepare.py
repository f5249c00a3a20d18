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

This module is the command: its flags, the lock, the fingerprint that decides reuse, and the
summary. The tokenising pass is `flaxbert.data.shards`; the dataset's layout, builder and
reader are `flaxbert.data.prepared`.
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
import multiprocessing
import os
import shutil
import sys
import time

import numpy as np
import tensorflow_datasets as tfds

from flaxbert.config import UserError, report_user_error
from flaxbert.data import text
from flaxbert.data.prepared import (
    COMPLETE_MARKER,
    DATASET_NAME,
    SIDE_ARRAYS,
    SPLITS,
    SUMMARY_FILE,
    PreparedCorpus,
    PrepareError,
    PretrainingCorpusBuilder,
    load_prepared,
    read_json,
)
from flaxbert.data.shards import tokenize_shards
from flaxbert.data.text_io import CorpusError, ReadStats
from flaxbert.tokenizer import load_tokenizer

log = logging.getLogger(__name__)

# Bump when a change here alters what the same inputs prepare to: old outputs then stop
# matching and are refused instead of silently reused.
FORMAT_VERSION = 1
_SCRATCH = ".prepare_scratch"
DROPPED_EMPTY_SENTENCES = "sentences empty after tokenisation"
DROPPED_EMPTY_DOCUMENTS = "documents empty after tokenisation"
_PART_NAMES = {  # what goes into the fingerprint, as an error message names it
    "format_version": "`flaxbert prepare` format version",
    "corpus": "corpus",
    "inputs": "corpus files",
    "tokenizer": "tokenizer model",
    "options": "options (validation split, --errors, --text-field)",
}


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
    previous = (read_json(os.path.join(output_dir, SUMMARY_FILE)) if done else None) or {}
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
    vocab_size = load_tokenizer(tokenizer_path).vocab_size
    stats = ReadStats()
    scratch = tokenize_shards(corpus, tokenizer_path, scratch_dir, num_workers, options, stats)
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
            SIDE_ARRAYS,
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


# --- files ------------------------------------------------------------------------------


def _remove_own_files(output_dir: str) -> None:
    """Removes what `prepare` writes, the marker first, and `flat/` (the loader's arrays
    derived from the dataset, see flaxbert.data.sources); leaves anything else alone."""
    own = [COMPLETE_MARKER, SUMMARY_FILE, _SCRATCH, DATASET_NAME, "flat"]
    own += [f"{k}.{s}.npy" for s in SPLITS for k in SIDE_ARRAYS]
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
    except CorpusError as e:
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
