"""The WordPiece tokenizer for BERT vocabularies imported from HuggingFace (`flaxbert
convert`): a vocab.txt with flaxbert's special ids, its casing (from tokenizer_config.json,
config.json or the directory's name), tokenisation by the `tokenizers` library, and spans
of the original text through its normalisation; plus writing the casing beside a copy.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import unicodedata
from collections.abc import Sequence

import numpy as np

from flaxbert.tokenizer.special import CLS_ID, MASK_ID, PAD_ID, SEP_ID, SPECIAL_TOKENS, UNK_ID

WORDPIECE_VOCAB = "vocab.txt"
WORDPIECE_CONFIG = "tokenizer_config.json"  # HF's name; flaxbert writes its casing there
CONTINUATION = "##"  # WordPiece's marker of a piece that continues a word
_CONTROL_IDS = frozenset((PAD_ID, CLS_ID, SEP_ID, MASK_ID))


@dataclasses.dataclass(frozen=True)
class WordPieceCasing:
    """How BERT's normaliser treats a WordPiece vocabulary's text, and why.

    `strip_accents` None follows `lowercase` (HF's convention)."""

    lowercase: bool
    strip_accents: bool | None = None
    tokenize_chinese_chars: bool = True
    source: str = ""

    def to_json(self) -> dict:
        return {
            "do_lower_case": self.lowercase,
            "strip_accents": self.strip_accents,
            "tokenize_chinese_chars": self.tokenize_chinese_chars,
        }


def _model_name(directory: str) -> str:
    """The directory's name; for a HuggingFace cache snapshot (.../models--ORG--NAME/
    snapshots/HASH) the model's name, since the hash says nothing."""
    directory = os.path.abspath(directory)
    parent = os.path.dirname(directory)
    if os.path.basename(parent) == "snapshots":
        return os.path.basename(os.path.dirname(parent))
    return os.path.basename(directory)


def wordpiece_casing(directory: str, hf_config: dict | None = None) -> WordPieceCasing:
    """The casing of the WordPiece vocabulary in `directory`, decided by, in this order:
    `tokenizer_config.json` there (`do_lower_case`, `strip_accents`,
    `tokenize_chinese_chars`); `do_lower_case` in the model's `config.json` (`hf_config`);
    else lowercase exactly when the directory's name contains "uncased" (as in
    bert-base-uncased). HF's own BertTokenizer lowercases when nothing says otherwise, which
    is wrong for a cased model whose directory lacks a tokenizer_config.json."""
    path = os.path.join(directory, WORDPIECE_CONFIG)
    if os.path.isfile(path):
        try:
            with open(path, encoding="utf-8") as f:
                values = json.load(f)
        except (OSError, ValueError) as e:
            raise ValueError(f"{path}: not a readable JSON file ({e})") from None
        if "do_lower_case" in values:
            return WordPieceCasing(
                bool(values["do_lower_case"]),
                values.get("strip_accents"),
                bool(values.get("tokenize_chinese_chars", True)),
                f"do_lower_case={values['do_lower_case']} in {path}",
            )
    if hf_config and "do_lower_case" in hf_config:
        return WordPieceCasing(
            bool(hf_config["do_lower_case"]),
            source=f"do_lower_case={hf_config['do_lower_case']} in its config.json",
        )
    name = _model_name(directory)
    lower = "uncased" in name.lower()
    return WordPieceCasing(
        lower,
        source=f"no do_lower_case given; the name {name!r} "
        + ("contains" if lower else "does not contain")
        + " 'uncased'",
    )


def read_vocab(path: str) -> list[str]:
    """The pieces of a vocab.txt, one per line, the id being the line number."""
    try:
        with open(path, encoding="utf-8") as f:
            return [line.rstrip("\n") for line in f]
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e})") from None


class WordPieceTokenizer:
    """A BERT WordPiece vocabulary (vocab.txt) with flaxbert's special ids, tokenised by the
    `tokenizers` library: BertNormalizer (clean-up, CJK characters split, lowercasing and
    accent stripping as `casing` says), BertPreTokenizer (whitespace and punctuation), then
    greedy longest-match WordPiece with "##" continuations and [UNK] for a word it cannot
    spell. The interface is `Tokenizer`'s.

    Raw text never produces [PAD] [CLS] [SEP] [MASK]: "[CLS]" in text is tokenised as
    ordinary characters, as SentencePiece's control symbols are.
    """

    def __init__(self, pieces: Sequence[str], casing: WordPieceCasing, path: str | None = None):
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import decoders, models, normalizers, pre_tokenizers

        self.pieces = list(pieces)
        self.casing = casing
        self.path = path
        vocab = {p: i for i, p in enumerate(self.pieces) if p}  # a repeated piece: its last id
        vocab.update({p: i for i, p in enumerate(SPECIAL_TOKENS)})
        tok = HFTokenizer(
            models.WordPiece(
                vocab, unk_token=SPECIAL_TOKENS[UNK_ID], continuing_subword_prefix=CONTINUATION
            )
        )
        # In BertTokenizer's order: clean-up and CJK spacing, then NFC (so that "e" + U+0301
        # and decomposed Hangul jamo meet the composed pieces of the vocabulary), then
        # lowercasing and accent stripping. Each step keeps its alignment to the input, so
        # offsets still point into the original text.
        tok.normalizer = normalizers.Sequence(
            [
                normalizers.BertNormalizer(
                    clean_text=True,
                    handle_chinese_chars=casing.tokenize_chinese_chars,
                    strip_accents=False,
                    lowercase=False,
                ),
                normalizers.NFC(),
                normalizers.BertNormalizer(
                    clean_text=False,
                    handle_chinese_chars=False,
                    strip_accents=casing.strip_accents,
                    lowercase=casing.lowercase,
                ),
            ]
        )
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        self._tokenizer = tok
        self._decoder = decoders.WordPiece(prefix=CONTINUATION)
        self._word_start: np.ndarray | None = None

    @classmethod
    def load(cls, path: str | os.PathLike, casing: WordPieceCasing | None = None):
        """Reads a vocab.txt whose first five lines are [PAD] [UNK] [CLS] [SEP] [MASK] (as
        `flaxbert convert --from-hf` writes it); the casing comes from `wordpiece_casing`
        of its directory unless given."""
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no WordPiece vocabulary (vocab.txt) at {path!r}")
        pieces = read_vocab(path)
        problems = []
        for expected, piece in enumerate(SPECIAL_TOKENS):
            where = [i for i, p in enumerate(pieces) if p == piece]
            if where != [expected]:
                at = f"at line(s) {', '.join(str(i) for i in where)}" if where else "missing"
                problems.append(f"{piece} should have id {expected} but is {at}")
        if problems:
            raise ValueError(
                f"{path}: the special tokens are not at flaxbert's fixed ids: "
                + "; ".join(problems)
                + ". A HuggingFace vocabulary ([UNK]=100, [CLS]=101, ...) is reordered by "
                "`flaxbert convert --from-hf DIR --workdir OUT`; use OUT/vocab.txt."
            )
        casing = casing or wordpiece_casing(os.path.dirname(os.path.abspath(path)))
        return cls(pieces, casing, path)

    @property
    def files(self) -> list[str]:
        """The files that make up this tokenizer: vocab.txt and, when present, the
        tokenizer_config.json beside it (the casing)."""
        config = os.path.join(os.path.dirname(os.path.abspath(self.path)), WORDPIECE_CONFIG)
        return [self.path] + ([config] if os.path.isfile(config) else [])

    @property
    def vocab_size(self) -> int:
        return len(self.pieces)

    def encode(self, text: str) -> np.ndarray:
        ids = self._tokenizer.encode(text, add_special_tokens=False).ids
        return np.asarray(ids, dtype=np.int32)

    def encode_batch(
        self, texts: Sequence[str], num_threads: int | None = None
    ) -> list[np.ndarray]:
        """Encodes many texts at once (on the `tokenizers` library's own thread pool, sized
        by RAYON_NUM_THREADS; `num_threads` is accepted for `Tokenizer`'s interface)."""
        del num_threads
        out = self._tokenizer.encode_batch(list(texts), add_special_tokens=False)
        return [np.asarray(e.ids, dtype=np.int32) for e in out]

    def encode_with_offsets(self, text: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(ids, char_start, char_end), int32 each: per piece the span [char_start, char_end)
        of the ORIGINAL `text` (str indices) it came from, through lowercasing, accent
        stripping, clean-up and NFC ("Café" -> "cafe" keeps the span of "Café"; "e" + U+0301
        composed into "é" spans both characters, decomposed Hangul jamo the whole syllable).
        Pieces of one character (uncased: the jamo pieces of a Hangul syllable) share its
        span. A word spelled as [UNK] spans the whole word. Spans never include whitespace
        and never decrease."""
        # NFC here, with each composed character's span of `text`, rather than in the
        # normaliser: the `tokenizers` library aligns a composed character with the first
        # character it came from only, and loses track when NFD follows (accent stripping).
        composed, char_start, char_end = _nfc_alignment(text)
        e = self._tokenizer.encode(composed, add_special_tokens=False)
        ids = np.asarray(e.ids, dtype=np.int32)
        spans = np.asarray(e.offsets, dtype=np.int64).reshape(-1, 2)
        first = char_start[np.minimum(spans[:, 0], len(composed))]
        last = char_end[np.maximum(spans[:, 1] - 1, 0)] if len(composed) else first
        start = np.maximum.accumulate(first) if len(ids) else first
        stop = np.maximum(np.where(spans[:, 1] > spans[:, 0], last, first), start)
        if len(ids) and not text.isascii():
            _cover_composed(text, start, stop)
        return ids, start.astype(np.int32), stop.astype(np.int32)

    def decode(self, ids) -> str:
        """Text of the ids, "##" pieces joined to the piece before; [PAD] [CLS] [SEP] [MASK]
        are left out (as SentencePiece leaves out control symbols)."""
        flat = [int(i) for i in np.asarray(ids).reshape(-1)]
        return self._decoder.decode([self.pieces[i] for i in flat if i not in _CONTROL_IDS])

    def id_to_piece(self, i: int) -> str:
        return self.pieces[int(i)]

    @property
    def word_start(self) -> np.ndarray:
        """bool[vocab_size]: True where a piece starts a word (it does not start with
        "##"), for whole-word masking. Special tokens start a word."""
        if self._word_start is None:
            self._word_start = np.fromiter(
                (not p.startswith(CONTINUATION) for p in self.pieces),
                dtype=bool,
                count=len(self.pieces),
            )
        return self._word_start

    def word_starts(self, ids) -> np.ndarray:
        """bool per position of one sentence's ids: True where a word begins."""
        starts = self.word_start[np.asarray(ids, dtype=np.int64)]
        if len(starts):
            starts[0] = True
        return starts


def _nfc_alignment(text: str) -> tuple[str, np.ndarray, np.ndarray]:
    """(NFC of `text`, per character of it the [start, end) in `text` it came from), the
    last two int64 with one extra entry (len(text)) after the end.

    The text is cut before every character that cannot join the one before it (anything
    but a combining mark or a Hangul vowel/final jamo); each piece is normalised alone. A
    piece NFC leaves as it is maps character to character; the characters of a piece it
    changes all map to the whole piece."""
    n = len(text)
    if unicodedata.is_normalized("NFC", text):
        index = np.arange(n + 1, dtype=np.int64)
        return text, index, np.append(index[1:], n)
    cuts = [i for i in range(n) if i == 0 or not _composes_backward(text[i])] + [n]
    out, starts, ends = [], [], []
    for a, b in itertools.pairwise(cuts):
        piece = text[a:b]
        normal = unicodedata.normalize("NFC", piece)
        out.append(normal)
        if normal == piece:
            starts += range(a, b)
            ends += range(a + 1, b + 1)
        else:
            starts += [a] * len(normal)
            ends += [b] * len(normal)
    composed = "".join(out)
    if composed != unicodedata.normalize("NFC", text):  # a composition across a cut
        composed = unicodedata.normalize("NFC", text)
        starts, ends = [0] * len(composed), [n] * len(composed)
    return (
        composed,
        np.asarray(starts + [n], dtype=np.int64),
        np.asarray(ends + [n], dtype=np.int64),
    )


def _composes_backward(c: str) -> bool:
    """Whether NFC can fold `c` into the character before it: a combining mark, or a Hangul
    medial vowel or final consonant jamo (U+1160-U+11FF, U+D7B0-U+D7FF)."""
    return (
        unicodedata.category(c).startswith("M")
        or "\u1160" <= c <= "\u11ff"
        or "\ud7b0" <= c <= "\ud7ff"
    )


def _cover_composed(text: str, start: np.ndarray, stop: np.ndarray) -> None:
    """Widens, in place, each span [start, stop) over the characters NFC folded into its
    last character: the `tokenizers` library aligns a composed character ("é" from "e" +
    U+0301, a Hangul syllable from 2-3 jamo) with the first character it came from only."""
    for i in range(len(start)):
        limit = int(start[i + 1]) if i + 1 < len(start) else len(text)
        end = int(stop[i])
        if end <= start[i]:
            continue  # an empty span (a piece that got no character of its own) stays empty
        while end < limit:
            j = end  # format/control characters that clean-up removes may sit in between
            while j < limit and _removed_by_cleanup(text[j]):
                j += 1
            if j == limit or not _composes_backward(text[j]):
                break
            end = j + 1
        stop[i] = end


def _removed_by_cleanup(c: str) -> bool:
    return not c.isspace() and unicodedata.category(c) in ("Cc", "Cf")


def is_wordpiece_vocab(path: str | os.PathLike) -> bool:
    """Whether a tokenizer path names a WordPiece vocabulary (vocab.txt) rather than a
    SentencePiece model."""
    return os.fspath(path).endswith(".txt")


def write_wordpiece_config(vocab_path: str, directory: str) -> str:
    """Writes DIRECTORY/tokenizer_config.json for a copy of `vocab_path` there: the source's
    own tokenizer_config.json (if any) with the casing stated explicitly, so the copy is
    read the same way whatever its directory is called. Returns the path written."""
    source_dir = os.path.dirname(os.path.abspath(vocab_path))
    casing = wordpiece_casing(source_dir)
    source = os.path.join(source_dir, WORDPIECE_CONFIG)
    values = {}
    if os.path.isfile(source):
        with open(source, encoding="utf-8") as f:
            values = json.load(f)
    values.update(casing.to_json())
    values.setdefault("casing_source", casing.source)
    target = os.path.join(directory, WORDPIECE_CONFIG)
    with open(target + ".tmp", "w", encoding="utf-8") as f:
        json.dump(values, f, indent=2, ensure_ascii=False)
        f.write("\n")
    os.replace(target + ".tmp", target)
    return target
