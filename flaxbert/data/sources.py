"""Where pre-training documents come from, chosen by `config.data.corpus`.

* `''`: the embedded synthetic corpus (`flaxbert.data.synthetic`).
* a directory written by `flaxbert prepare`: used as it is.
* raw text: a text file or glob, a `.jsonl` file, or `tfds:NAME[:SPLIT]`. The SentencePiece
  model `data.tokenizer` is trained on first use when it does not exist (with
  `data.vocab_size` pieces), and the corpus is prepared on first use into `data.cache_dir`;
  later runs with the same inputs reuse both. The cache names say what made them (corpus,
  tokenizer, split and reading options), so a run with other options prepares its own copy
  instead of tripping over the last one; a corpus file edited since is prepared again.

Every source ends as two `FlatCorpus` splits (train, held-out) for the batch builder. For
prepared datasets the flat arrays are derived once from the array_record files and kept
beside them as `.npy` files that are memory-mapped, so start-up stays fast after the first.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os

import ml_collections
import numpy as np

from flaxbert.config import ConfigError, require
from flaxbert.data.instances import FlatCorpus
from flaxbert.data.synthetic import SyntheticCorpus

log = logging.getLogger("flaxbert")

CACHE_SUBDIR = "data"  # data.cache_dir='' caches in WORKDIR/data
# Next-sentence pairs take a "random next" segment from another document than their first:
# each split needs two documents at least.
MIN_SPLIT_DOCUMENTS = 2


@dataclasses.dataclass
class PretrainingCorpus:
    train: FlatCorpus
    eval: FlatCorpus
    vocab_size: int  # ids in the data lie in [0, vocab_size)
    description: str
    exact_vocab: bool  # a real tokenizer: the model's vocab_size must equal it
    word_start: np.ndarray | None = None  # per vocabulary id: does the piece begin a word
    tokenizer_path: str = ""


def load_corpus(data: ml_collections.ConfigDict, workdir: str) -> PretrainingCorpus:
    if not data.corpus:
        return _synthetic(data)
    if _is_prepared_dir(data.corpus):
        return load_prepared_corpus(data.corpus)
    return _from_raw(data, workdir)


def expected_vocab_size(data: ml_collections.ConfigDict, workdir: str) -> int | None:
    """The vocabulary `load_corpus(data, workdir)` will have, known before it reads anything:
    a prepared directory's tokenizer, `data.tokenizer` (or the cached one) when it exists, else
    `data.vocab_size` (the pieces of the tokenizer it will train). None for the embedded corpus,
    whose word list any `model.vocab_size` at least as large covers."""
    if not data.corpus:
        return None
    if _is_prepared_dir(data.corpus):
        from flaxbert.data.prepared import load_prepared

        return int(load_prepared(data.corpus).summary["tokenizer"]["vocab_size"])
    cache = data.cache_dir or os.path.join(workdir, CACHE_SUBDIR)
    path = data.tokenizer or cached_tokenizer_path(data, cache)
    if os.path.exists(path):
        return _load_tokenizer(path).vocab_size
    return data.vocab_size


def _synthetic(data) -> PretrainingCorpus:
    for key in ("synthetic_documents", "synthetic_eval_documents", "synthetic_topics"):
        if data[key] < 2:
            raise ConfigError(f"config key data.{key}={data[key]!r}: must be at least 2")
    # The corpus is fixed, whatever the training seed; the held-out split comes from its own
    # seed stream, so no document is shared between the splits.
    train = SyntheticCorpus(data.synthetic_documents, seed=0, num_topics=data.synthetic_topics)
    held_out = SyntheticCorpus(
        data.synthetic_eval_documents, seed=1, num_topics=data.synthetic_topics
    )
    vocab_size = len(train.vocab)
    # A "word" of the synthetic language: a noun and the function words after it.
    word_start = np.array(["_noun" in w or w.startswith("[") for w in train.vocab])
    return PretrainingCorpus(
        train=FlatCorpus.from_documents(train),
        eval=FlatCorpus.from_documents(held_out),
        vocab_size=vocab_size,
        exact_vocab=False,
        word_start=word_start,
        description=(
            f"embedded synthetic corpus: {len(train)} train / {len(held_out)} "
            f"held-out documents, {data.synthetic_topics} topics, "
            f"{vocab_size} word types"
        ),
    )


def _is_prepared_dir(path: str) -> bool:
    from flaxbert.data.prepared import COMPLETE_MARKER

    return os.path.isdir(path) and os.path.exists(os.path.join(path, COMPLETE_MARKER))


def load_prepared_corpus(path: str, tokenizer_path: str = "") -> PretrainingCorpus:
    """A directory written by `flaxbert prepare` as the two splits pre-training reads.
    `tokenizer_path`: where its tokenizer is now, when the caller knows a file with the same
    contents (the summary records the path it was prepared with, which may have moved)."""
    from flaxbert.data.prepared import load_prepared

    prepared = load_prepared(path)
    if tokenizer_path:
        prepared = dataclasses.replace(prepared, tokenizer_path=tokenizer_path)
    tokenizer = _load_tokenizer(prepared.tokenizer_path)
    s = prepared.summary["splits"]
    fixes = {  # checked before the flat arrays are derived: that can take a while
        "train": "hold out fewer documents (`flaxbert prepare` with a smaller "
        "--validation-fraction or --validation-documents) or give a larger corpus",
        "validation": "hold out more (`flaxbert prepare` with --validation-documents "
        f"{MIN_SPLIT_DOCUMENTS} or a larger --validation-fraction)",
    }
    for name, fix in fixes.items():
        if s[name]["documents"] < MIN_SPLIT_DOCUMENTS:
            raise ConfigError(
                f"config key data.corpus={path!r}: its {name} split holds "
                f"{s[name]['documents']} document(s) and next-sentence pairs need at least "
                f"{MIN_SPLIT_DOCUMENTS} in each split: {fix}"
            )
    train = prepared_flat_corpus(path, "train")
    held_out = prepared_flat_corpus(path, "validation")
    return PretrainingCorpus(
        train=train,
        eval=held_out,
        vocab_size=tokenizer.vocab_size,
        exact_vocab=True,
        word_start=tokenizer.word_start,
        tokenizer_path=prepared.tokenizer_path,
        description=(
            f"prepared dataset {path}: train {s['train']['documents']} documents / "
            f"{s['train']['tokens']} tokens, held-out {s['validation']['documents']} "
            f"documents; tokenizer {prepared.tokenizer_path} "
            f"({tokenizer.vocab_size} pieces)"
        ),
    )


def _load_tokenizer(path: str):
    from flaxbert.tokenizer import load_tokenizer

    if not os.path.exists(path):
        raise ConfigError(f"tokenizer model {path} not found (config key data.tokenizer)")
    try:
        return load_tokenizer(path)
    except ValueError as e:
        raise ConfigError(f"tokenizer {path}: {e}") from None


def _check_raw_inputs(data) -> None:
    """What can be checked of a raw corpus and its options before any work starts."""
    from flaxbert.data import text
    from flaxbert.data.text_io import ERRORS_MODES, CorpusError

    require(
        0.0 < data.validation_fraction < 1.0,
        "data.validation_fraction",
        data.validation_fraction,
        "pre-training evaluates on held-out documents: give a fraction in (0, 1), e.g. 0.01 "
        f"(at least {MIN_SPLIT_DOCUMENTS} documents are held out whatever the fraction)",
    )
    require(
        data.errors in ERRORS_MODES,
        "data.errors",
        data.errors,
        f"choose one of {', '.join(ERRORS_MODES)}",
    )
    require(bool(data.text_field), "data.text_field", data.text_field, "name a JSON key")
    if not data.tokenizer or not os.path.exists(data.tokenizer):  # one will be trained
        from flaxbert.tokenizer import MODEL_TYPES, NUM_BYTE_PIECES, NUM_SPECIAL

        require(
            data.tokenizer_model_type in MODEL_TYPES,
            "data.tokenizer_model_type",
            data.tokenizer_model_type,
            f"choose one of {', '.join(MODEL_TYPES)}",
        )
        require(
            data.tokenizer_max_sentences >= 1,
            "data.tokenizer_max_sentences",
            data.tokenizer_max_sentences,
            "give a positive number of sentences to sample",
        )
        least = NUM_SPECIAL + NUM_BYTE_PIECES + 1
        require(
            data.vocab_size >= least,
            "data.vocab_size",
            data.vocab_size,
            f"a trained tokenizer has {NUM_SPECIAL} special and {NUM_BYTE_PIECES} byte pieces "
            f"first: give at least {least}",
        )
    if data.corpus.startswith("tfds:"):
        return
    what = (
        "give a text file or glob (one sentence or paragraph per line, a blank line between "
        "documents), a .jsonl file, tfds:NAME[:SPLIT], or a directory written by "
        "`flaxbert prepare`"
    )
    if os.path.isdir(data.corpus):  # a finished `flaxbert prepare` output never gets here
        if os.path.exists(os.path.join(data.corpus, ".prepare.lock")):
            why = "an unfinished `flaxbert prepare` output (no COMPLETE): run it again"
        else:
            why = f"a directory: {what}, e.g. '{data.corpus}/*.txt'"
        raise ConfigError(f"config key data.corpus={data.corpus!r} is {why}")
    try:
        text.corpus_files(data.corpus)
    except CorpusError as e:
        raise ConfigError(f"config key data.corpus={data.corpus!r}: {e.problem}; {what}") from None


def _from_raw(data, workdir: str) -> PretrainingCorpus:
    from flaxbert.data.text_io import CorpusError

    _check_raw_inputs(data)
    try:
        return _train_and_prepare(data, workdir)
    except CorpusError as e:  # say how to set the reader option in the config
        raise e.spelled("config") from None


def cached_tokenizer_path(data, cache: str) -> str:
    """Where `pretrain` keeps the tokenizer it trains on first use: the name holds every
    `data.*` key that changes the pieces (corpus, text field, sample size, model type, size),
    so a run that changes one trains its own instead of reusing another's."""
    from flaxbert.tokenizer import DEFAULT_MAX_SENTENCES

    stem = _slug(data.corpus)
    if data.text_field != "text":  # another field of a JSONL or TFDS corpus: other text
        stem += "-" + _slug(data.text_field)
    if data.tokenizer_max_sentences != DEFAULT_MAX_SENTENCES:  # another sample: other pieces
        stem += f"-s{data.tokenizer_max_sentences}"
    return os.path.join(cache, f"{stem}-{data.tokenizer_model_type}{data.vocab_size}.model")


def _train_and_prepare(data, workdir: str) -> PretrainingCorpus:
    from flaxbert.data.prepare import prepare
    from flaxbert.tokenizer import train_tokenizer

    cache = data.cache_dir or os.path.join(workdir, CACHE_SUBDIR)
    os.makedirs(cache, exist_ok=True)
    tokenizer = data.tokenizer or cached_tokenizer_path(data, cache)
    if not os.path.exists(tokenizer):
        if data.tokenizer and not data.tokenizer.endswith(".model"):
            raise ConfigError(
                f"config key data.tokenizer={data.tokenizer!r}: give a "
                "SentencePiece .model path (trained there if it does not exist)"
            )
        log.info(
            "training a %d-piece %s tokenizer on %s (first use) -> %s",
            data.vocab_size,
            data.tokenizer_model_type,
            data.corpus,
            tokenizer,
        )
        try:
            train_tokenizer(
                [data.corpus],
                data.vocab_size,
                tokenizer[: -len(".model")],
                model_type=data.tokenizer_model_type,
                max_sentences=data.tokenizer_max_sentences,
                errors=data.errors,
                text_field=data.text_field,
            )
        except RuntimeError as e:  # SentencePiece refused, e.g. too many pieces for the text
            raise ConfigError(
                f"{e}; set a smaller data.vocab_size (model.vocab_size follows it) or give a "
                "larger corpus"
            ) from None
    tokenizer_tag = hashlib.sha256(open(tokenizer, "rb").read()).hexdigest()[:10]
    options = {
        "validation_fraction": data.validation_fraction,
        "errors": data.errors,
        "text_field": data.text_field,
        "min_split_documents": MIN_SPLIT_DOCUMENTS,
    }
    options_tag = hashlib.sha256(json.dumps(options, sort_keys=True).encode()).hexdigest()[:6]
    output = os.path.join(cache, f"{_slug(data.corpus)}-prepared-{tokenizer_tag}-{options_tag}")
    prepare(
        data.corpus,
        tokenizer,
        output,
        validation_fraction=data.validation_fraction,
        errors=data.errors,
        text_field=data.text_field,
        min_split_documents=MIN_SPLIT_DOCUMENTS,
        # This directory is named by everything but the corpus files' contents: when they
        # have changed since, the cache is stale and is prepared again.
        force=True,
    )
    # The directory's name holds the tokenizer's hash: `tokenizer` is the same file.
    return load_prepared_corpus(output, tokenizer)


def _slug(spec: str) -> str:
    base = os.path.basename(spec.rstrip("/")) or spec
    base = base.split(":")[-1] if spec.startswith("tfds:") else os.path.splitext(base)[0]
    keep = "".join(c if c.isalnum() or c in "-_." else "_" for c in base)
    return f"{keep}-{hashlib.sha256(spec.encode()).hexdigest()[:6]}"


def prepared_flat_corpus(path: str, split: str) -> FlatCorpus:
    """A prepared split as flat arrays, derived once from the array_record files and then
    memory-mapped from `<path>/flat/`."""
    from flaxbert.data.prepared import load_prepared

    folder = os.path.join(path, "flat")
    names = ("tokens", "sentence_starts", "doc_starts")
    files = {n: os.path.join(folder, f"{split}.{n}.npy") for n in names}
    if not all(os.path.exists(f) for f in files.values()):
        docs = getattr(load_prepared(path), split)
        log.info("indexing %s split of %s (%d documents, once)", split, path, len(docs))
        flat = FlatCorpus.from_documents(docs)
        os.makedirs(folder, exist_ok=True)
        for n in names:  # write then rename: a crash never leaves a half-written array
            tmp = files[n] + f".tmp{os.getpid()}.npy"
            np.save(tmp, getattr(flat, n))
            os.replace(tmp, files[n])
    return FlatCorpus(*(np.load(files[n], mmap_mode="r") for n in names))
