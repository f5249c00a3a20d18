"""Special tokens at the fixed ids every flaxbert vocabulary uses, and the tokenizers: the
SentencePiece one (training with `flaxbert train-tokenizer`, loading with checks, encoding)
and a WordPiece one for BERT vocabularies imported from HuggingFace (`flaxbert convert`);
`load_tokenizer` picks the right one for a path.

SentencePiece models trained by `flaxbert train-tokenizer` put these pieces at these ids;
the embedded synthetic corpus uses the same ids, so data, model and heads agree.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import logging
import os
import sys
import time
import unicodedata
from collections.abc import Iterable, Iterator, Sequence

import numpy as np

PAD_ID = 0
UNK_ID = 1
CLS_ID = 2
SEP_ID = 3
MASK_ID = 4
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
NUM_SPECIAL = len(SPECIAL_TOKENS)

MODEL_TYPES = ("unigram", "bpe")
NUM_BYTE_PIECES = 256  # byte_fallback adds <0x00>..<0xFF> after the special tokens
WORD_BOUNDARY = "▁"  # U+2581, SentencePiece's marker of a preceding space

log = logging.getLogger("flaxbert")


class _ProgressSentences:
    """The sentences of the inputs, one at a time, for SentencePiece's `sentence_iterator`.

    Logs how far it got every `every_s` seconds. An error raised while reading would reach
    Python only as SentencePiece's RuntimeError text, so it is kept and re-raised as it was.
    """

    def __init__(self, inputs: Sequence[str], errors: str, text_field: str, every_s: float):
        from flaxbert.data.text import ReadStats

        self.inputs, self.errors, self.text_field, self.every_s = (
            inputs,
            errors,
            text_field,
            every_s,
        )
        self.stats = ReadStats()
        self.sentences = 0
        self.characters = 0
        self.error: BaseException | None = None
        self.read_s = 0.0  # how long reading took, once it is done
        self.on_done = lambda: None  # called when every sentence has been handed over

    def __iter__(self) -> Iterator[str]:
        from flaxbert.data.text import iter_corpus_documents

        start = last = time.monotonic()
        try:
            for spec in self.inputs:
                for doc in iter_corpus_documents(
                    spec, text_field=self.text_field, errors=self.errors, stats=self.stats
                ):
                    for sentence in doc:
                        self.sentences += 1
                        self.characters += len(sentence)
                        yield sentence
                    now = time.monotonic()
                    if now - last >= self.every_s:
                        last = now
                        log.info(
                            "train-tokenizer: read %s lines, %s sentences (%.0f s)",
                            f"{self.stats.lines:,}",
                            f"{self.sentences:,}",
                            now - start,
                        )
        except BaseException as e:
            self.error = e
            raise
        self.read_s = time.monotonic() - start
        log.info("train-tokenizer: read %s", self.stats.summary())
        self.on_done()


# SentencePiece's training time, measured (flaxbert train-tokenizer on the shared Korean
# corpus, 8000-piece unigram): about 17 s of CPU time per million characters of sampled
# text, only partly spread over its threads. A rough guide for the log, not a promise.
CPU_SECONDS_PER_MILLION_CHARACTERS = 17.0
DEFAULT_MAX_SENTENCES = 300_000  # sampled for training: minutes, not hours, on any corpus
HEARTBEAT_S = 30.0


def _minutes(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.1f} min"


class _Heartbeat:
    """Logs 'still training' every `every_s` seconds from a thread while SentencePiece
    trains (it releases the GIL), so a long training never looks hung."""

    def __init__(self, every_s: float, expected: str):
        import threading

        self.every_s, self.expected = every_s, expected
        self.start = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="tokenizer-heartbeat", daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.wait(self.every_s):
            log.info(
                "train-tokenizer: still training (%s so far, expected %s)",
                _minutes(time.monotonic() - self.start),
                self.expected,
            )

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return time.monotonic() - self.start


def train_tokenizer(
    inputs: list[str],
    vocab_size: int,
    output_prefix: str,
    model_type: str = "unigram",
    max_sentences: int = DEFAULT_MAX_SENTENCES,
    character_coverage: float = 0.9995,
    seed: int = 0,
    num_threads: int | None = None,
    *,
    errors: str = "strict",
    text_field: str = "text",
    verbose: bool = False,
) -> str:
    """Trains a SentencePiece model on corpus specs and returns the path of `PREFIX.model`.

    `inputs` are specs for `flaxbert.data.text.iter_corpus_documents` (text files, globs,
    JSONL, `tfds:NAME[:SPLIT]`), read sentence by sentence exactly as data preparation reads
    them. At most `max_sentences` sentences (default 300,000), sampled uniformly over the
    whole input, are kept for training: SentencePiece's time grows with the text it trains
    on (about 17 s of CPU per million characters), and a sample of this size already gives
    the pieces of the full corpus's frequent words. The log says what was read, how much
    text training takes and how long it should last, that it is still training every 30 s,
    and how long it took. The pieces [PAD] [UNK] [CLS] [SEP] [MASK] take ids 0-4, [CLS]/[SEP]/[MASK]
    as control symbols (raw text never produces them); byte fallback means no character is
    ever unknown; text is NFKC-normalised. Writes PREFIX.model and PREFIX.vocab.
    """
    import sentencepiece as spm

    if model_type not in MODEL_TYPES:
        raise ValueError(
            f"model_type={model_type!r} (--model-type): must be one of {', '.join(MODEL_TYPES)}"
        )
    if isinstance(inputs, str):
        inputs = [inputs]
    if not inputs:
        raise ValueError("no input given to train the tokenizer on (--input)")
    min_vocab = NUM_SPECIAL + NUM_BYTE_PIECES + 1
    if vocab_size < min_vocab:
        raise ValueError(
            f"vocab_size={vocab_size} (--vocab-size): must be at least {min_vocab}: "
            f"{NUM_SPECIAL} special tokens and {NUM_BYTE_PIECES} byte pieces come first"
        )
    if max_sentences < 1:
        raise ValueError(f"max_sentences={max_sentences} (--max-sentences): must be positive")
    if not 0.0 < character_coverage <= 1.0:
        raise ValueError(
            f"character_coverage={character_coverage} (--character-coverage): must be in (0, 1]"
        )
    out_dir = os.path.dirname(os.path.abspath(output_prefix))
    os.makedirs(out_dir, exist_ok=True)

    sentences = _ProgressSentences(inputs, errors, text_field, every_s=10.0)
    threads = num_threads or os.cpu_count() or 1
    heartbeat: list[_Heartbeat] = []

    def reading_done():
        kept = min(sentences.sentences, max_sentences)
        share = kept / max(sentences.sentences, 1)
        characters = sentences.characters * share
        cpu_s = CPU_SECONDS_PER_MILLION_CHARACTERS * characters / 1e6
        expected = (
            f"about {_minutes(cpu_s)}"
            if threads == 1
            else f"about {_minutes(cpu_s / threads)} to {_minutes(cpu_s)}"
        )
        log.info(
            "train-tokenizer: training on %s of %s sentences (%s, about %.1fM characters) on "
            "%d thread(s); expected %s",
            f"{kept:,}",
            f"{sentences.sentences:,}",
            "all" if kept == sentences.sentences else f"a {share:.0%} sample",
            characters / 1e6,
            threads,
            expected,
        )
        heartbeat.append(_Heartbeat(HEARTBEAT_S, expected))

    sentences.on_done = reading_done
    spm.set_random_generator_seed(seed)
    log.info(
        "train-tokenizer: %s model, %d pieces, from %s (sampling at most %s sentences)",
        model_type,
        vocab_size,
        ", ".join(inputs),
        f"{max_sentences:,}",
    )
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(sentences),
            model_prefix=output_prefix,
            model_type=model_type,
            vocab_size=vocab_size,
            character_coverage=character_coverage,
            normalization_rule_name="nmt_nfkc",
            byte_fallback=True,
            pad_id=PAD_ID,
            unk_id=UNK_ID,
            bos_id=-1,
            eos_id=-1,
            pad_piece=SPECIAL_TOKENS[PAD_ID],
            unk_piece=SPECIAL_TOKENS[UNK_ID],
            control_symbols=list(SPECIAL_TOKENS[CLS_ID:]),
            input_sentence_size=max_sentences,  # reservoir sample over every sentence read
            shuffle_input_sentence=True,
            # Sentences over max_sentence_length (4192 bytes) are skipped: after splitting,
            # none of the shared corpora has one (longest: 2771 bytes).
            num_threads=threads,
            minloglevel=0 if verbose else 1,
        )
    except RuntimeError as e:
        if sentences.error is not None:  # the reader failed: its own error says where
            raise sentences.error from None
        if sentences.sentences == 0:
            raise ValueError(
                f"no text to train the tokenizer on in {', '.join(map(repr, inputs))}"
            ) from None
        raise RuntimeError(
            f"SentencePiece could not train a {vocab_size}-piece {model_type} model on "
            f"{sentences.sentences:,} sentences of {', '.join(inputs)}: {e}"
        ) from None
    finally:
        trained_s = heartbeat[0].stop() if heartbeat else 0.0
    if sentences.error is not None:
        raise sentences.error
    path = output_prefix + ".model"
    log.info(
        "train-tokenizer: trained in %s (reading %s, training %s); wrote %s and %s.vocab",
        _minutes(sentences.read_s + trained_s),
        _minutes(sentences.read_s),
        _minutes(trained_s),
        path,
        output_prefix,
    )
    return path


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


# ------------------------------------------------------------------------------ WordPiece

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
