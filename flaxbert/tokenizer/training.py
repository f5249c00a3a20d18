"""Training a SentencePiece model (`train_tokenizer`, behind `flaxbert train-tokenizer`) on
corpus specs read as data preparation reads them, on a uniform sample of sentences, with
flaxbert's special pieces at their fixed ids and byte fallback; the log says what was read,
what training will take and, every 30 s, that it is still training.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator, Sequence

from flaxbert.tokenizer.special import CLS_ID, NUM_SPECIAL, PAD_ID, SPECIAL_TOKENS, UNK_ID

MODEL_TYPES = ("unigram", "bpe")
NUM_BYTE_PIECES = 256  # byte_fallback adds <0x00>..<0xFF> after the special tokens

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

    inputs = _checked_inputs(inputs, vocab_size, model_type, max_sentences, character_coverage)
    out_dir = os.path.dirname(os.path.abspath(output_prefix))
    os.makedirs(out_dir, exist_ok=True)

    sentences = _ProgressSentences(inputs, errors, text_field, every_s=10.0)
    threads = num_threads or os.cpu_count() or 1
    heartbeat: list[_Heartbeat] = []

    def reading_done():  # the plan in the log, then 'still training' until it is done
        expected = _log_training_plan(sentences, max_sentences, threads)
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
    options = _trainer_options(
        output_prefix, model_type, vocab_size, character_coverage, max_sentences, threads, verbose
    )
    try:
        spm.SentencePieceTrainer.train(sentence_iterator=iter(sentences), **options)
    except RuntimeError as e:
        raise _training_error(e, sentences, inputs, vocab_size, model_type) from None
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


def _checked_inputs(
    inputs: list[str] | str,
    vocab_size: int,
    model_type: str,
    max_sentences: int,
    character_coverage: float,
) -> list[str]:
    """The input specs as a list, once the training arguments are known to be usable;
    raises ValueError naming the flag of the first that is not."""
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
    return inputs


def _log_training_plan(sentences: _ProgressSentences, max_sentences: int, threads: int) -> str:
    """Logs, once every sentence is read, how much of the text training takes and how long
    it should last; returns that expected time ('about 2 s to 4 s')."""
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
    return expected


def _trainer_options(
    output_prefix: str,
    model_type: str,
    vocab_size: int,
    character_coverage: float,
    max_sentences: int,
    threads: int,
    verbose: bool,
) -> dict:
    """SentencePieceTrainer's options: flaxbert's special pieces at their fixed ids, byte
    fallback, NFKC, a uniform sample of at most `max_sentences` sentences, and its own log
    only when `verbose`."""
    return dict(
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


def _training_error(
    error: RuntimeError,
    sentences: _ProgressSentences,
    inputs: Sequence[str],
    vocab_size: int,
    model_type: str,
) -> BaseException:
    """The error to raise for SentencePiece's RuntimeError `error`: the reader's own error
    when reading failed (it says where), a ValueError when there was no text at all, else a
    RuntimeError saying what could not be trained on what."""
    if sentences.error is not None:
        return sentences.error
    if sentences.sentences == 0:
        return ValueError(f"no text to train the tokenizer on in {', '.join(map(repr, inputs))}")
    return RuntimeError(
        f"SentencePiece could not train a {vocab_size}-piece {model_type} model on "
        f"{sentences.sentences:,} sentences of {', '.join(inputs)}: {error}"
    )
