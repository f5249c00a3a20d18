"""Pre-training loader throughput: sequences/s built on one CPU core.

    python benchmarks/data_throughput.py                          # embedded synthetic corpus
    python benchmarks/data_throughput.py --prepared runs/ko/data  # a `flaxbert prepare` output

Builds batches of NSP pairs with dynamic masking exactly as training does (numpy, one
thread) at seq 128 and 512 and prints a table. Target: >= 20,000 sequences/s per core at seq
128 (a BERT-base step on one H100 consumes roughly 7,000/s).
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

from flaxbert.data.instances import FlatCorpus, InstanceConfig
from flaxbert.data.pretraining import PretrainingBatches


def load(prepared: str | None):
    if prepared:
        from flaxbert.data.sources import load_prepared_corpus

        c = load_prepared_corpus(prepared)
        return c.train, c.vocab_size, c.word_start, f"prepared dataset {prepared}"
    from flaxbert.data.synthetic import SyntheticCorpus

    synthetic = SyntheticCorpus(5000, seed=0, num_topics=4)
    word_start = np.array(["_noun" in w or w.startswith("[") for w in synthetic.vocab])
    return (
        FlatCorpus.from_documents(synthetic),
        len(synthetic.vocab),
        word_start,
        "embedded synthetic corpus (5000 documents)",
    )


def measure(batches: PretrainingBatches, steps: int) -> float:
    batches.batch(0)
    start = time.perf_counter()
    for step in range(1, steps + 1):
        batches.batch(step)
    return steps * batches.local_batch_size / (time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prepared", help="directory written by `flaxbert prepare`")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    corpus, vocab_size, word_start, what = load(args.prepared)
    print(
        f"data: {what}: {corpus.num_documents} documents, {corpus.num_sentences} sentences, "
        f"{len(corpus.tokens)} tokens"
    )
    rows = []
    for seq, preds in ((128, 20), (512, 76)):
        cfg = InstanceConfig(
            max_seq_length=seq, max_predictions_per_seq=preds, vocab_size=vocab_size
        )
        for wwm in (False, True):
            b = PretrainingBatches(
                corpus, cfg, args.batch_size, seed=0, word_start=word_start, whole_word_masking=wwm
            )
            rows.append((seq, "whole-word" if wwm else "token", measure(b, args.steps)))
    print("\n| seq | masking | sequences/s (one core) | target |")
    print("|---|---|---|---|")
    for seq, kind, rate in rows:
        target = ">= 20,000" if seq == 128 else "-"
        print(f"| {seq} | {kind} | {rate:,.0f} | {target} |")


if __name__ == "__main__":
    main()
