"""A prepared pre-training corpus on disk: its layout, its TFDS builder and its reader.

`flaxbert prepare` (flaxbert.data.prepare) leaves, under the output directory, the TFDS
dataset `flaxbert_pretraining_corpus/1.0.0/` in array_record, per-document side arrays
(`sentence_counts`, `token_counts`, `corpus_index`, one .npy per split), `summary.json` and
the `COMPLETE` marker. `PretrainingCorpusBuilder` writes the dataset from the tokenised
corpus (`Scratch`, flat arrays in corpus order with each document's split), and
`load_prepared` opens it again as `PreparedDocuments`: `docs[i]` is a document as a list of
int32 arrays, one per sentence, read by random access.
"""

from __future__ import annotations

import dataclasses
import json
import os
import threading
from collections.abc import Sequence

import numpy as np
import tensorflow_datasets as tfds

from flaxbert.config import UserError

DATASET_NAME = "flaxbert_pretraining_corpus"
DATASET_VERSION = "1.0.0"
SPLITS = ("train", "validation")
COMPLETE_MARKER = "COMPLETE"
SUMMARY_FILE = "summary.json"
# Per-document side arrays, one .npy per split, so no record is decoded to get them.
SIDE_ARRAYS = ("sentence_counts", "token_counts", "corpus_index")


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

    def __init__(self, *, data_dir: str, scratch: Scratch | None = None, **kwargs):
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


@dataclasses.dataclass
class Scratch:
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
                builder = tfds.builder_from_directory(dataset_dir(self.output_dir))
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
    summary = read_json(os.path.join(output_dir, SUMMARY_FILE))
    needed = [SUMMARY_FILE, os.path.join(DATASET_NAME, DATASET_VERSION, "dataset_info.json")]
    needed += [f"{k}.{s}.npy" for s in SPLITS for k in SIDE_ARRAYS]
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


def dataset_dir(output_dir: str) -> str:
    return os.path.join(output_dir, DATASET_NAME, DATASET_VERSION)


def read_json(path: str) -> dict | None:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None
