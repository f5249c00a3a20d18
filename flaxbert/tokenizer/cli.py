"""`flaxbert train-tokenizer`: its flags, and the command that trains a SentencePiece model
as they say and prints its vocabulary size, path and tokens per character on the input.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from collections.abc import Sequence

from flaxbert.tokenizer.load import tokens_per_character
from flaxbert.tokenizer.sentencepiece import Tokenizer
from flaxbert.tokenizer.training import DEFAULT_MAX_SENTENCES, MODEL_TYPES, train_tokenizer


def _first_sentences(inputs: Sequence[str], n: int, errors: str, text_field: str) -> list[str]:
    from flaxbert.data.text import iter_corpus_documents

    def sentences():
        for spec in inputs:
            for doc in iter_corpus_documents(spec, text_field=text_field, errors=errors):
                yield from doc

    return list(itertools.islice(sentences(), n))


def add_train_tokenizer_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Adds `train-tokenizer` to a `flaxbert` sub-command parser; its handler is `func`."""
    p = subparsers.add_parser(
        "train-tokenizer",
        help="train a SentencePiece vocabulary with the BERT special tokens",
        description="Train a SentencePiece model on raw text. [PAD] [UNK] [CLS] [SEP] [MASK] "
        "get ids 0-4, byte fallback keeps every character, text is NFKC-normalised. Writes "
        "PREFIX.model and PREFIX.vocab, then reports tokens per character on the input.",
    )
    p.add_argument(
        "--input",
        nargs="+",
        required=True,
        metavar="SPEC",
        help="corpus: text files in the BERT format (one sentence or paragraph per line, "
        "a blank line between documents), globs such as 'data/*.txt', .jsonl files, or "
        "tfds:NAME[:SPLIT] for a TFDS dataset",
    )
    p.add_argument(
        "--vocab-size", type=int, required=True, metavar="N", help="number of pieces, e.g. 32000"
    )
    p.add_argument(
        "--output",
        required=True,
        metavar="PREFIX",
        help="output path prefix: writes PREFIX.model and PREFIX.vocab",
    )
    p.add_argument(
        "--model-type",
        choices=MODEL_TYPES,
        default="unigram",
        help="SentencePiece algorithm (default: %(default)s)",
    )
    p.add_argument(
        "--max-sentences",
        type=int,
        default=DEFAULT_MAX_SENTENCES,
        metavar="N",
        help="train on at most N sentences sampled uniformly from the whole input; the "
        "training time grows with them (default: %(default)s)",
    )
    p.add_argument(
        "--character-coverage",
        type=float,
        default=0.9995,
        metavar="X",
        help="share of characters covered by pieces of their own; the rarest become byte "
        "pieces (default: %(default)s; 1.0 for small alphabets)",
    )
    from flaxbert.data import text

    text.add_text_input_flags(p)
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default: %(default)s)")
    p.add_argument("--verbose", action="store_true", help="show SentencePiece's own log")
    p.set_defaults(func=run_train_tokenizer)
    return p


def run_train_tokenizer(args: argparse.Namespace) -> int:
    """Trains as the flags say, then prints vocabulary size, model path and tokens/character."""
    errors = getattr(args, "errors", "strict")
    text_field = getattr(args, "text_field", "text")
    try:
        path = train_tokenizer(
            args.input,
            args.vocab_size,
            args.output,
            model_type=getattr(args, "model_type", "unigram"),
            max_sentences=getattr(args, "max_sentences", DEFAULT_MAX_SENTENCES),
            character_coverage=getattr(args, "character_coverage", 0.9995),
            seed=getattr(args, "seed", 0),
            errors=errors,
            text_field=text_field,
            verbose=getattr(args, "verbose", False),
        )
        tokenizer = Tokenizer.load(path)
        sample = _first_sentences(args.input, 2000, errors, text_field)
        ratio = tokens_per_character(tokenizer, sample)
    except (ValueError, OSError, RuntimeError) as e:
        print(f"flaxbert train-tokenizer: error: {e}", file=sys.stderr)
        return 2
    print(f"vocab size: {tokenizer.vocab_size}")
    print(f"model: {path}")
    print(f"tokens per character: {ratio:.3f} (first {len(sample):,} sentences of the input)")
    return 0
