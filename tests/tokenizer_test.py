import argparse
import itertools
import pathlib
import re
import unicodedata

import numpy as np
import pytest
import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2
from shared_data import DATA, EN_CORPUS, KO_CORPUS, needs_data  # noqa: F401

from flaxbert.data.text import iter_corpus_documents
from flaxbert.tokenizer import (
    CLS_ID,
    MASK_ID,
    NUM_SPECIAL,
    PAD_ID,
    SEP_ID,
    SPECIAL_TOKENS,
    UNK_ID,
    Tokenizer,
    add_train_tokenizer_parser,
    run_train_tokenizer,
    tokens_per_character,
    train_tokenizer,
)


def _synthetic_corpus(path: pathlib.Path, lines: int = 600, seed: int = 0) -> str:
    """Sentences of random words over a small alphabet, a blank line every 20 lines."""
    rng = np.random.default_rng(seed)
    syllables = ["ka", "lo", "mi", "ne", "ru", "sa", "to", "vi", "ba", "de", "fo", "gu"]
    words = ["".join(rng.choice(syllables, size=rng.integers(1, 4))) for _ in range(300)]
    out = []
    for i in range(lines):
        n = int(rng.integers(4, 12))
        out.append(" ".join(rng.choice(words, size=n)).capitalize() + ".")
        if i % 20 == 19:
            out.append("")
    path.write_text("\n".join(out) + "\n", encoding="utf-8")
    return str(path)


def _slice_lines(src: pathlib.Path, dst: pathlib.Path, start: int, stop: int) -> str:
    with open(src, encoding="utf-8") as f, open(dst, "w", encoding="utf-8") as g:
        g.writelines(itertools.islice(f, start, stop))
    return str(dst)


def _sentences(spec: str) -> list[str]:
    return [s for doc in iter_corpus_documents(spec) for s in doc]


@pytest.fixture(scope="module")
def synthetic_model(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("synthetic")
    corpus = _synthetic_corpus(tmp / "corpus.txt")
    return Tokenizer.load(train_tokenizer([corpus], 400, str(tmp / "sp"), max_sentences=1000))


@pytest.fixture(scope="module")
def korean(tmp_path_factory):
    """A 2000-piece unigram model on the first 20k NSMC lines; held-out lines after them."""
    if not KO_CORPUS.exists():
        pytest.skip(f"shared corpus {KO_CORPUS} is absent (<repo>/../shared/data)")
    tmp = tmp_path_factory.mktemp("korean")
    train = _slice_lines(KO_CORPUS, tmp / "train.txt", 0, 20_000)
    held_out = _sentences(_slice_lines(KO_CORPUS, tmp / "held.txt", 20_000, 21_000))
    path = train_tokenizer([train], 2000, str(tmp / "ko"), max_sentences=5000)
    return Tokenizer.load(path), held_out


def test_special_tokens_at_fixed_ids(synthetic_model):
    tok = synthetic_model
    assert tok.vocab_size == 400
    for i, piece in enumerate(SPECIAL_TOKENS):
        assert tok.id_to_piece(i) == piece
    assert (PAD_ID, UNK_ID, CLS_ID, SEP_ID, MASK_ID) == (0, 1, 2, 3, 4)
    # Control symbols: raw text that spells them is never encoded to their ids.
    ids = tok.encode("[CLS] ka [SEP] lo [MASK] [PAD] [UNK]")
    assert ids.dtype == np.int32 and not np.isin(ids, np.arange(NUM_SPECIAL)).any()
    assert tok.decode(ids) == "[CLS] ka [SEP] lo [MASK] [PAD] [UNK]"
    assert tok.id_to_piece(NUM_SPECIAL) == "<0x00>"  # then the 256 byte pieces


def test_model_with_other_special_ids_is_rejected(tmp_path):
    corpus = _synthetic_corpus(tmp_path / "corpus.txt", lines=200)
    spm.SentencePieceTrainer.train(  # SentencePiece defaults: <unk>=0 <s>=1 </s>=2
        input=corpus,
        model_prefix=str(tmp_path / "foreign"),
        vocab_size=100,
        user_defined_symbols=["[CLS]", "[SEP]", "[MASK]"],
        minloglevel=2,
    )
    with pytest.raises(ValueError) as e:
        Tokenizer.load(tmp_path / "foreign.model")
    message = str(e.value)
    assert "foreign.model" in message
    assert "[PAD] should have id 0 but is missing" in message
    assert "[UNK] should have id 1 but is missing" in message
    assert "[CLS] should have id 2 but has id 3" in message
    assert "[SEP] should have id 3 but has id 4" in message
    assert "[MASK] should have id 4 but has id 5" in message
    assert "flaxbert train-tokenizer" in message

    with pytest.raises(FileNotFoundError, match="nothing.model"):
        Tokenizer.load(tmp_path / "nothing.model")


def test_byte_fallback_keeps_rare_characters(synthetic_model):
    tok = synthetic_model
    text = "Ka 🦜 lo 鬱 mi ü"
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    pieces = [tok.id_to_piece(i) for i in ids]
    assert "<0xF0>" in pieces and "<0xE9>" in pieces  # 🦜 = F0 9F A6 9C, 鬱 = E9 AC B1
    assert UNK_ID not in ids


def test_word_start_groups_pieces_into_words(synthetic_model):
    tok = synthetic_model
    ws = tok.word_start
    assert ws.shape == (tok.vocab_size,) and ws.dtype == bool
    assert ws[:NUM_SPECIAL].all()
    assert not ws[NUM_SPECIAL : NUM_SPECIAL + 256].any()  # byte pieces continue a word
    for i in range(NUM_SPECIAL + 256, tok.vocab_size):
        assert ws[i] == tok.id_to_piece(i).startswith("▁")
    for text in ["Ka lomi 🦜 mi鬱ne", "🦜 first", "Sakalo tovi bade."]:
        ids = tok.encode(text)
        starts = np.flatnonzero(tok.word_starts(ids))
        assert starts[0] == 0
        words = [tok.decode(g).strip() for g in np.split(ids, starts[1:])]
        assert words == text.split(), [tok.id_to_piece(i) for i in ids]


def test_encode_batch_matches_encode(synthetic_model):
    texts = ["Ka lo mi.", "", "Ne ru 🦜 sa to.", "vi"]
    batch = synthetic_model.encode_batch(texts)
    assert len(batch) == 4
    for text, ids in zip(texts, batch, strict=True):
        np.testing.assert_array_equal(ids, synthetic_model.encode(text))
        assert ids.dtype == np.int32


@needs_data
def test_korean_is_not_falling_apart_into_bytes(korean):
    tok, held_out = korean
    ratio = tokens_per_character(tok, held_out)
    ids = np.concatenate(tok.encode_batch(held_out))
    byte_share = np.mean((ids >= NUM_SPECIAL) & (ids < NUM_SPECIAL + 256))
    print(f"Korean, 2000-piece unigram: {ratio:.3f} tokens/char, {byte_share:.1%} byte pieces")
    assert ratio < 0.8
    assert byte_share < 0.03
    # NFKC turns compatibility jamo (ㅋ U+314B) into conjoining jamo (ᄏ U+110F).
    sample = [unicodedata.normalize("NFKC", s) for s in held_out[:200]]
    assert [tok.decode(tok.encode(s)) for s in sample] == sample


@needs_data
def test_english_and_bpe(tmp_path):
    train = _slice_lines(EN_CORPUS, tmp_path / "train.txt", 0, 2000)
    held_out = _sentences(_slice_lines(EN_CORPUS, tmp_path / "held.txt", 9000, 9300))
    for model_type in ["unigram", "bpe"]:
        prefix = str(tmp_path / model_type)
        tok = Tokenizer.load(
            train_tokenizer([train], 2000, prefix, model_type=model_type, max_sentences=4000)
        )
        ratio = tokens_per_character(tok, held_out)
        print(f"English, 2000-piece {model_type}: {ratio:.3f} tokens/char")
        assert ratio < 0.35
        assert tok.decode(tok.encode(held_out[0])) == held_out[0]
        proto = sentencepiece_model_pb2.ModelProto()
        proto.ParseFromString(tok.processor.serialized_model_proto())
        assert (
            sentencepiece_model_pb2.TrainerSpec.ModelType.Name(proto.trainer_spec.model_type)
            == model_type.upper()
        )
        assert proto.trainer_spec.byte_fallback and proto.normalizer_spec.name == "nmt_nfkc"
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "bpe.model",
        "bpe.vocab",
        "held.txt",
        "train.txt",
        "unigram.model",
        "unigram.vocab",
    ]


def test_sampling_honours_max_sentences(tmp_path, capfd, caplog):
    corpus = _synthetic_corpus(tmp_path / "corpus.txt", lines=1500)
    caplog.set_level("INFO", logger="flaxbert")
    train_tokenizer([corpus], 300, str(tmp_path / "sp"), max_sentences=200, verbose=True)
    log = capfd.readouterr().err  # SentencePiece logs to the stderr file descriptor
    assert re.search(r"Sampled 200 sentences from 1500 sentences", log), log[-2000:]
    assert "1,500 sentences" in caplog.text  # every sentence was read, then sampled


def test_bad_options_and_empty_input(tmp_path):
    corpus = _synthetic_corpus(tmp_path / "corpus.txt", lines=50)
    with pytest.raises(ValueError, match="model_type='wordpiece'.*--model-type.*unigram, bpe"):
        train_tokenizer([corpus], 300, str(tmp_path / "sp"), model_type="wordpiece")
    with pytest.raises(ValueError, match="vocab_size=100.*at least 262"):
        train_tokenizer([corpus], 100, str(tmp_path / "sp"))
    blank = tmp_path / "blank.txt"
    blank.write_text("\n \n")
    with pytest.raises(ValueError, match="blank.txt"):
        train_tokenizer([str(blank)], 300, str(tmp_path / "sp"))
    with pytest.raises(FileNotFoundError, match=r"nothing\*"):
        train_tokenizer([str(tmp_path / "nothing*")], 300, str(tmp_path / "sp"))
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"fine.\n\xff\n")
    with pytest.raises(ValueError, match=r"bad.txt:2: not valid UTF-8"):  # the reader's error
        train_tokenizer([str(bad)], 300, str(tmp_path / "sp"))
    assert not (tmp_path / "sp.model").exists()


def test_cli_handler(tmp_path, capsys):
    corpus = _synthetic_corpus(tmp_path / "corpus.txt", lines=400)
    parser = argparse.ArgumentParser(prog="flaxbert")
    subparser = add_train_tokenizer_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(
        [
            "train-tokenizer",
            "--input",
            corpus,
            "--vocab-size",
            "350",
            "--output",
            str(tmp_path / "out" / "sp"),
            "--model-type",
            "bpe",
            "--max-sentences",
            "300",
        ]
    )
    assert args.func is run_train_tokenizer
    assert run_train_tokenizer(args) == 0
    out = capsys.readouterr().out
    assert "vocab size: 350" in out and str(tmp_path / "out" / "sp.model") in out
    ratio = float(re.search(r"tokens per character: ([\d.]+)", out).group(1))
    assert 0 < ratio < 1
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["sp.model", "sp.vocab"]

    args = parser.parse_args(
        [
            "train-tokenizer",
            "--input",
            str(tmp_path / "none.txt"),
            "--vocab-size",
            "350",
            "--output",
            str(tmp_path / "sp"),
        ]
    )
    assert run_train_tokenizer(args) == 2
    assert "none.txt" in capsys.readouterr().err
    help_text = subparser.format_help()
    for flag in [
        "--input",
        "--vocab-size",
        "--output",
        "--model-type",
        "--max-sentences",
        "--character-coverage",
        "--errors",
    ]:
        assert flag in help_text


def test_training_says_what_it_does_and_how_long(tmp_path, caplog):
    """Before training: how many sentences and characters of how many, on how many threads,
    and the expected time (from the measured rate); after: the time taken. A long training
    logs 'still training' from a heartbeat thread meanwhile."""
    from flaxbert.tokenizer import training as tk

    corpus = _synthetic_corpus(tmp_path / "corpus.txt", lines=1500)
    characters = sum(len(line) for line in pathlib.Path(corpus).read_text().splitlines())
    caplog.set_level("INFO", logger="flaxbert")
    train_tokenizer([corpus], 300, str(tmp_path / "sp"), max_sentences=300, num_threads=2)
    before = re.search(
        r"training on 300 of 1,500 sentences \(a 20% sample, about ([\d.]+)M characters\) on "
        r"2 thread\(s\); expected about (\S+ \S+) to (\S+ \S+)",
        caplog.text,
    )
    assert before, caplog.text
    assert float(before.group(1)) == pytest.approx(characters * 0.2 / 1e6, abs=0.05)
    cpu_s = tk.CPU_SECONDS_PER_MILLION_CHARACTERS * characters * 0.2 / 1e6
    assert before.group(2) == f"{cpu_s / 2:.0f} s" and before.group(3) == f"{cpu_s:.0f} s"
    after = re.search(
        r"trained in ([\d.]+) s \(reading ([\d.]+) s, training ([\d.]+) s\)", caplog.text
    )
    assert after, caplog.text
    assert caplog.text.index(before.group(0)) < caplog.text.index(after.group(0))
    assert tk.DEFAULT_MAX_SENTENCES == 300_000  # the default sample, as the docs say

    # The heartbeat: one line per period until stopped (its wait made deterministic).
    caplog.clear()
    beat = tk._Heartbeat(3600.0, "about 5 min")
    beat.stop()
    waits = iter([False, False, True])
    beat._stop.wait = lambda _timeout: next(waits)
    beat._run()
    assert caplog.text.count("still training") == 2 and "expected about 5 min" in caplog.text
    assert tk._minutes(75) == "75 s" and tk._minutes(600) == "10.0 min"
