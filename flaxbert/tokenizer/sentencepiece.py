"""The SentencePiece tokenizer: a trained `.model` loaded with a check that its special
pieces sit at flaxbert's fixed ids (as control symbols, so raw text cannot produce them), and
encoding, with spans of the original text per piece and word starts for whole-word masking.
"""

from __future__ import annotations

import os
import unicodedata
from collections.abc import Sequence

import numpy as np

from flaxbert.tokenizer.special import CLS_ID, SPECIAL_TOKENS

WORD_BOUNDARY = "▁"  # U+2581, SentencePiece's marker of a preceding space


class Tokenizer:
    """A SentencePiece model whose special pieces sit at flaxbert's fixed ids."""

    def __init__(self, processor, path: str | None = None):
        self.processor = processor
        self.path = path
        self._word_start: np.ndarray | None = None

    @classmethod
    def load(cls, path: str | os.PathLike) -> Tokenizer:
        import sentencepiece as spm

        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no SentencePiece model at {path!r}")
        processor = spm.SentencePieceProcessor()
        try:
            processor.Load(path)
        except (OSError, RuntimeError) as e:
            raise ValueError(f"{path}: not a SentencePiece model ({e})") from None
        problems = []
        size = processor.get_piece_size()
        for expected, piece in enumerate(SPECIAL_TOKENS):
            actual = processor.piece_to_id(piece)
            if processor.id_to_piece(actual) != piece:  # piece_to_id gives unk_id when missing
                problems.append(f"{piece} should have id {expected} but is missing")
            elif actual != expected:
                problems.append(f"{piece} should have id {expected} but has id {actual}")
            elif expected >= CLS_ID and not processor.is_control(actual):
                problems.append(
                    f"{piece} (id {actual}) should be a control symbol, so that raw text "
                    "cannot produce it"
                )
        if problems:
            found = ", ".join(f"{i}={processor.id_to_piece(i)}" for i in range(min(size, 8)))
            raise ValueError(
                f"{path}: the special tokens are not at flaxbert's fixed ids: "
                + "; ".join(problems)
                + f" (the model starts {found}). Retrain it with `flaxbert train-tokenizer`."
            )
        return cls(processor, path)

    @property
    def vocab_size(self) -> int:
        return self.processor.get_piece_size()

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self.processor.encode(text, out_type=int), dtype=np.int32)

    def encode_batch(
        self, texts: Sequence[str], num_threads: int | None = None
    ) -> list[np.ndarray]:
        """Encodes many texts at once, on SentencePiece's own threads (default: all cores)."""
        ids = self.processor.encode(
            list(texts), out_type=int, num_threads=num_threads or os.cpu_count() or 1
        )
        return [np.asarray(x, dtype=np.int32) for x in ids]

    def encode_with_offsets(self, text: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(ids, char_start, char_end), int32 each: the ids of `encode(text)` and, per piece,
        the span [char_start, char_end) of the ORIGINAL `text` (str indices) it covers.

        Token classification and extractive QA need it to map pieces back to words and to
        cut answers out of the original text exactly (case, spaces, particles as written),
        whatever NFKC did to the text before segmentation. SentencePiece reports UTF-8 byte
        offsets of the input; they are turned into character indices here, and:

        - A piece that starts with "▁" starts at its word's first character, not at the
          space before it: the whitespace SentencePiece folded into it is left out, so the
          span never swallows the space (or anything before it). A bare "▁" piece (the
          dummy prefix, or the space before a byte-fallback character) covers no character:
          its span is the empty [w, w) at the start w of the word it opens.
        - Byte-fallback pieces of one character (🦜 = 4 byte pieces) all get that
          character's span, and so do the several pieces one character expands to under
          NFKC ("ﬁ" -> "f" "i", "½" -> "1" "⁄" "2"): such a piece is not a substring of
          `text`, but its span is still where it came from.
        - Spans never decrease from one piece to the next.
        """
        try:
            proto = self.processor.encode(text, out_type="proto")
        except (ValueError, TypeError, RuntimeError):  # sentencepiece without out_type="proto"
            proto = self.processor.encode(text, out_type="immutable_proto")
        pieces = list(proto.pieces)
        n = len(pieces)
        ids = np.fromiter((p.id for p in pieces), dtype=np.int32, count=n)
        begin = np.fromiter((p.begin for p in pieces), dtype=np.int64, count=n)
        end = np.fromiter((p.end for p in pieces), dtype=np.int64, count=n)
        # Character index of each byte offset: UTF-8 continuation bytes are 10xxxxxx.
        raw = np.frombuffer(text.encode("utf-8"), dtype=np.uint8)
        char_of_byte = np.append(np.cumsum((raw & 0xC0) != 0x80) - 1, len(text))
        start = char_of_byte[begin]  # the character the first byte belongs to
        stop = np.where(end > 0, char_of_byte[np.maximum(end - 1, 0)] + 1, 0)
        stop = np.maximum(stop, start)
        for i, p in enumerate(pieces):
            if p.piece.startswith(WORD_BOUNDARY):
                # Whitespace as the normaliser sees it: spaces, and the invisible format and
                # control characters (zero-width space) it turns into or drops with them.
                s, e = int(start[i]), int(stop[i])
                while s < e and (
                    text[s].isspace() or unicodedata.category(text[s]) in ("Cc", "Cf")
                ):
                    s += 1
                start[i] = s
        # Pieces that got no byte of their own (all but the last byte piece of a character,
        # all but the last piece of an NFKC expansion) share the span of the piece that did.
        for i in range(n - 2, -1, -1):
            if (
                start[i] == stop[i]
                and start[i + 1] == start[i]
                and pieces[i].piece.strip(WORD_BOUNDARY)
            ):
                stop[i] = stop[i + 1]
        return ids, start.astype(np.int32), stop.astype(np.int32)

    def decode(self, ids) -> str:
        return self.processor.decode([int(i) for i in np.asarray(ids).reshape(-1)])

    def id_to_piece(self, i: int) -> str:
        return self.processor.id_to_piece(int(i))

    @property
    def word_start(self) -> np.ndarray:
        """bool[vocab_size]: True where a piece starts a word, for whole-word masking.

        A word is a piece starting with "▁" (a space precedes it; SentencePiece also puts one
        before the first piece of a text) followed by its continuation pieces. Special
        tokens start a word. Byte pieces (<0xE3>) never do: byte fallback spells a character
        missing from the vocabulary as 1-4 byte pieces, which must stay together with each
        other and with the "▁" or word piece before them. A sentence whose first piece is a
        byte piece is possible only without the dummy prefix; `word_starts(ids)` covers it by
        always starting a word at position 0.
        """
        if self._word_start is None:
            p = self.processor
            starts = np.zeros(self.vocab_size, dtype=bool)
            for i in range(self.vocab_size):
                if p.is_byte(i):
                    continue
                starts[i] = (
                    p.is_control(i)
                    or p.is_unknown(i)
                    or p.is_unused(i)
                    or p.id_to_piece(i).startswith(WORD_BOUNDARY)
                )
            self._word_start = starts
        return self._word_start

    def word_starts(self, ids) -> np.ndarray:
        """bool per position of one sentence's ids: True where a word begins."""
        ids = np.asarray(ids, dtype=np.int64)
        starts = self.word_start[ids]
        if len(starts):
            starts[0] = True
        return starts
