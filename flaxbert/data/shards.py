"""Raw corpus → token ids, in parallel: the tokenising pass of `flaxbert prepare`.

The input files are cut into shards where a document ends, and each worker process reads
its shards with `flaxbert.data.text` (sentence splitting is the slow part), tokenises them
and hands back flat arrays; `tokenize_shards` writes those to scratch files in corpus order
and returns them as a `Scratch`, ready to be given splits and written out by
`flaxbert.data.prepared.PretrainingCorpusBuilder`.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import hashlib
import logging
import mmap
import multiprocessing
import os
import re
import time

import numpy as np

from flaxbert.config import UserError
from flaxbert.data import text
from flaxbert.data.prepared import PrepareError, Scratch
from flaxbert.data.text_io import CorpusError, ReadStats
from flaxbert.tokenizer import load_tokenizer

# The logger `flaxbert prepare` has always logged its steps to.
log = logging.getLogger("flaxbert.data.prepare")

# Bytes of corpus a worker reads, splits and tokenises at a time (see _plan_shards).
_MIN_SHARD_BYTES = 1 << 20
_MAX_SHARD_BYTES = 16 << 20
_ENCODE_BATCH = 4096  # sentences per SentencePiece call: bounds the Python int lists
_PROGRESS_SECONDS = 10.0


def tokenize_shards(corpus, tokenizer_path, scratch_dir, num_workers, options, stats) -> Scratch:
    """Reads and tokenises `corpus` on `num_workers` processes into flat arrays under
    `scratch_dir`, in corpus order; adds what was read and dropped to `stats`."""
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
    return Scratch(
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
    stats: object  # ReadStats of this shard


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
    stats = ReadStats()
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
    except CorpusError as e:
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
    _WORKER_TOKENIZER = load_tokenizer(path)


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
        tokenizer = load_tokenizer(tokenizer_path)
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


def _load_flat(path: str) -> np.ndarray:
    if os.path.getsize(path) == 0:
        return np.zeros(0, dtype=np.int32)
    return np.memmap(path, dtype=np.int32, mode="r")
