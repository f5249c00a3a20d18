"""Where pre-training documents come from, chosen by `config.data.corpus`.

Every source gives a train and a held-out split as random-access document lists (a document
is a list of sentences, each an int32 array of token ids) plus the vocabulary size they use.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import ml_collections

from flaxbert.config import ConfigError
from flaxbert.data.pretraining import Document
from flaxbert.data.synthetic import SyntheticCorpus


@dataclasses.dataclass
class PretrainingCorpus:
    train: Sequence[Document]
    eval: Sequence[Document]
    vocab_size: int  # ids in the data lie in [0, vocab_size)
    description: str


def load_corpus(data: ml_collections.ConfigDict) -> PretrainingCorpus:
    if data.corpus:
        raise ConfigError(
            f"config key data.corpus={data.corpus!r}: only the embedded synthetic corpus "
            "(data.corpus='') is available in this version"
        )
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
    return PretrainingCorpus(
        train=train,
        eval=held_out,
        vocab_size=vocab_size,
        description=(
            f"embedded synthetic corpus: {len(train)} train / {len(held_out)} "
            f"held-out documents, {data.synthetic_topics} topics, "
            f"{vocab_size} word types"
        ),
    )
