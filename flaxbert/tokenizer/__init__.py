"""Special tokens at the fixed ids every flaxbert vocabulary uses (`special`), and the
tokenizers: the SentencePiece one (`sentencepiece`: loading with checks, encoding; trained by
`training` behind `flaxbert train-tokenizer`, whose flags live in `cli`) and a WordPiece one
for BERT vocabularies imported from HuggingFace (`wordpiece`, `flaxbert convert`);
`load_tokenizer` (`load`) picks the right one for a path.
"""

from flaxbert.tokenizer.cli import add_train_tokenizer_parser, run_train_tokenizer
from flaxbert.tokenizer.load import load_tokenizer, tokens_per_character
from flaxbert.tokenizer.sentencepiece import Tokenizer
from flaxbert.tokenizer.special import (
    CLS_ID,
    MASK_ID,
    NUM_SPECIAL,
    PAD_ID,
    SEP_ID,
    SPECIAL_TOKENS,
    UNK_ID,
)
from flaxbert.tokenizer.training import (
    DEFAULT_MAX_SENTENCES,
    MODEL_TYPES,
    NUM_BYTE_PIECES,
    train_tokenizer,
)
from flaxbert.tokenizer.wordpiece import (
    WORDPIECE_CONFIG,
    WORDPIECE_VOCAB,
    WordPieceCasing,
    WordPieceTokenizer,
    is_wordpiece_vocab,
    read_vocab,
    wordpiece_casing,
    write_wordpiece_config,
)

__all__ = [
    "CLS_ID",
    "DEFAULT_MAX_SENTENCES",
    "MASK_ID",
    "MODEL_TYPES",
    "NUM_BYTE_PIECES",
    "NUM_SPECIAL",
    "PAD_ID",
    "SEP_ID",
    "SPECIAL_TOKENS",
    "UNK_ID",
    "WORDPIECE_CONFIG",
    "WORDPIECE_VOCAB",
    "Tokenizer",
    "WordPieceCasing",
    "WordPieceTokenizer",
    "add_train_tokenizer_parser",
    "is_wordpiece_vocab",
    "load_tokenizer",
    "read_vocab",
    "run_train_tokenizer",
    "tokens_per_character",
    "train_tokenizer",
    "wordpiece_casing",
    "write_wordpiece_config",
]
