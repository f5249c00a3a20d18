"""What both tokenizers share beyond their special ids: `load_tokenizer`, which picks the
SentencePiece or WordPiece one for a path, and `tokens_per_character`, the measure of a
vocabulary on text that either tokenizer's common interface (`encode_batch`) gives.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

from flaxbert.tokenizer.sentencepiece import Tokenizer
from flaxbert.tokenizer.wordpiece import WORDPIECE_VOCAB, WordPieceTokenizer, is_wordpiece_vocab


def load_tokenizer(path: str | os.PathLike) -> Tokenizer | WordPieceTokenizer:
    """The tokenizer at `path`: a SentencePiece `.model` file, a WordPiece `vocab.txt` (or
    any `.txt` vocabulary), or a directory holding `tokenizer.model` or `vocab.txt`."""
    path = os.fspath(path)
    if os.path.isdir(path):
        for name, kind in (("tokenizer.model", Tokenizer), (WORDPIECE_VOCAB, WordPieceTokenizer)):
            if os.path.isfile(os.path.join(path, name)):
                return kind.load(os.path.join(path, name))
        raise FileNotFoundError(
            f"{path} holds no tokenizer: expected tokenizer.model (SentencePiece) or "
            f"{WORDPIECE_VOCAB} (WordPiece)"
        )
    if is_wordpiece_vocab(path):
        return WordPieceTokenizer.load(path)
    if path.endswith(".model"):
        return Tokenizer.load(path)
    raise ValueError(
        f"{path}: not a tokenizer flaxbert knows; give a SentencePiece .model file or a "
        "WordPiece vocab.txt"
    )


def tokens_per_character(tokenizer: Tokenizer | WordPieceTokenizer, texts: Iterable[str]) -> float:
    """Pieces per character of text (spaces count as characters), over all `texts` together:
    about 0.2-0.3 for English and 0.4-0.7 for Korean with a good vocabulary; near 1 or above
    means text is falling apart into characters or bytes."""
    texts = list(texts)
    characters = sum(len(t) for t in texts)
    if characters == 0:
        raise ValueError("tokens_per_character needs some text: all texts are empty")
    return sum(len(x) for x in tokenizer.encode_batch(texts)) / characters
