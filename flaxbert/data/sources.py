"""Where pre-training documents come from, chosen by `config.data.corpus`.

* `''`: the embedded synthetic corpus (`flaxbert.data.synthetic`).
* a directory written by `flaxbert prepare`: used as it is.
* raw text: a text file or glob, a `.jsonl` file, or `tfds:NAME[:SPLIT]`. The SentencePiece
  model `data.tokenizer` is trained on first use when it does not exist (with
  `data.vocab_size` pieces), and the corpus is prepared on first use into `data.cache_dir`;
  later runs with the same inputs reuse both.

Every source ends as two `FlatCorpus` splits (train, held-out) for the batch builder. For
prepared datasets the flat arrays are derived once from the array_record files and kept
beside them as `.npy` files that are memory-mapped, so start-up stays fast after the first.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os

import ml_collections
import numpy as np

from flaxbert.config import ConfigError
from flaxbert.data.pretraining import FlatCorpus
from flaxbert.data.synthetic import SyntheticCorpus

log = logging.getLogger("flaxbert")


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
    from flaxbert.data.prepare import COMPLETE_MARKER

    return os.path.isdir(path) and os.path.exists(os.path.join(path, COMPLETE_MARKER))


def load_prepared_corpus(path: str) -> PretrainingCorpus:
    from flaxbert.data.prepare import load_prepared

    prepared = load_prepared(path)
    tokenizer = _load_tokenizer(prepared.tokenizer_path)
    train = prepared_flat_corpus(path, "train")
    held_out = prepared_flat_corpus(path, "validation")
    for name, split in (("train", train), ("validation", held_out)):
        if split.num_documents < 2:
            raise ConfigError(
                f"prepared dataset {path}: the {name} split holds {split.num_documents} "
                "document(s); next-sentence pairs need at least 2 (prepare again with a larger "
                "--validation-fraction, or more documents)"
            )
    s = prepared.summary["splits"]
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
    from flaxbert.tokenizer import Tokenizer

    if not os.path.exists(path):
        raise ConfigError(f"tokenizer model {path} not found (config key data.tokenizer)")
    try:
        return Tokenizer.load(path)
    except ValueError as e:
        raise ConfigError(f"tokenizer {path}: {e}") from None


def _from_raw(data, workdir: str) -> PretrainingCorpus:
    from flaxbert.data.prepare import prepare
    from flaxbert.tokenizer import train_tokenizer

    cache = data.cache_dir or os.path.join(workdir, "data")
    os.makedirs(cache, exist_ok=True)
    stem = _slug(data.corpus)
    tokenizer = data.tokenizer or os.path.join(
        cache, f"{stem}-{data.tokenizer_model_type}{data.vocab_size}.model"
    )
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
        train_tokenizer(
            [data.corpus],
            data.vocab_size,
            tokenizer[: -len(".model")],
            model_type=data.tokenizer_model_type,
            errors=data.errors,
            text_field=data.text_field,
        )
    tokenizer_tag = hashlib.sha256(open(tokenizer, "rb").read()).hexdigest()[:10]
    output = os.path.join(cache, f"{stem}-prepared-{tokenizer_tag}")
    prepare(
        data.corpus,
        tokenizer,
        output,
        validation_fraction=data.validation_fraction,
        errors=data.errors,
        text_field=data.text_field,
    )
    return load_prepared_corpus(output)


def _slug(spec: str) -> str:
    base = os.path.basename(spec.rstrip("/")) or spec
    base = base.split(":")[-1] if spec.startswith("tfds:") else os.path.splitext(base)[0]
    keep = "".join(c if c.isalnum() or c in "-_." else "_" for c in base)
    return f"{keep}-{hashlib.sha256(spec.encode()).hexdigest()[:6]}"


def prepared_flat_corpus(path: str, split: str) -> FlatCorpus:
    """A prepared split as flat arrays, derived once from the array_record files and then
    memory-mapped from `<path>/flat/`."""
    from flaxbert.data.prepare import load_prepared

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
