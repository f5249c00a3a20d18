"""`flaxbert prepare`: raw text → TFDS array_record dataset → the same token ids back."""

import argparse
import logging
import os
import pickle
import random

import numpy as np
import pytest
import sentencepiece as spm
from shared_data import corpus_head

from flaxbert.data import prepare as prepare_lib
from flaxbert.data import prepared as prepared_lib
from flaxbert.data import shards as shards_lib
from flaxbert.data import text
from flaxbert.data.prepare import prepare
from flaxbert.data.prepared import PrepareError, load_prepared
from flaxbert.tokenizer import Tokenizer

WORDS = (
    "the a river stone light quiet north garden letter window morning silver horse "
    "winter old young bright small road city house friend never always slowly went saw "
    "found kept told walked spoke heard under over near after before"
).split()


def _sentence(rng: random.Random) -> str:
    words = [rng.choice(WORDS) for _ in range(rng.randint(3, 12))]
    return " ".join(words).capitalize() + rng.choice(".!?")


def _write_corpus(path, num_documents: int, seed: int = 0) -> str:
    """BERT format: lines of 1-3 sentences, a blank line between documents."""
    rng = random.Random(seed)
    docs = []
    for d in range(num_documents):
        num_lines = 1 if d % 7 == 3 else rng.randint(1, 6)
        lines = [
            " ".join(_sentence(rng) for _ in range(rng.randint(1, 3))) for _ in range(num_lines)
        ]
        if d % 7 == 3:
            lines = [_sentence(rng)]  # a single-sentence document
        docs.append("\n".join(lines))
    path.write_text("\n\n".join(docs) + "\n", encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("prepare")


@pytest.fixture(scope="module")
def sp_model(workdir) -> str:
    """A tiny SentencePiece model with the flaxbert special tokens at their fixed ids."""
    train_text = workdir / "sp_train.txt"
    _write_corpus(train_text, 200, seed=123)
    prefix = str(workdir / "tiny")
    spm.SentencePieceTrainer.train(
        input=str(train_text),
        model_prefix=prefix,
        vocab_size=320,
        model_type="unigram",
        pad_id=0,
        pad_piece="[PAD]",
        unk_id=1,
        unk_piece="[UNK]",
        bos_id=-1,
        eos_id=-1,
        control_symbols=["[CLS]", "[SEP]", "[MASK]"],
        byte_fallback=True,
        hard_vocab_limit=False,
        minloglevel=2,
    )
    return prefix + ".model"


def _expected_documents(corpus: str, model: str) -> list[list[np.ndarray]]:
    """What prepare should store, from the reader and the tokenizer directly; an empty
    sentence is left out (an empty document becomes [])."""
    tokenizer = Tokenizer.load(model)
    docs = []
    for sentences in text.iter_corpus_documents(corpus):
        ids = [np.asarray(tokenizer.encode(s), np.int32) for s in sentences]
        docs.append([x for x in ids if len(x)])
    return docs


def _all_documents(prepared) -> dict[int, list[np.ndarray]]:
    """corpus index → document, over both splits."""
    out = {}
    for split in (prepared.train, prepared.validation):
        for j, index in enumerate(split.corpus_index()):
            out[int(index)] = split[j]
    return out


def _assert_same_documents(got: list[np.ndarray], want: list[np.ndarray]):
    assert len(got) == len(want)
    for a, b in zip(got, want, strict=True):
        assert a.dtype == np.int32
        np.testing.assert_array_equal(a, b)


def _file_mtimes(root) -> dict[str, int]:
    return {
        os.path.join(d, f): os.stat(os.path.join(d, f)).st_mtime_ns
        for d, _, files in os.walk(root)
        for f in files
    }


@pytest.fixture(scope="module")
def corpus_file(workdir) -> str:
    return _write_corpus(workdir / "corpus.txt", 60)


@pytest.fixture(scope="module")
def prepared(workdir, corpus_file, sp_model):
    return prepare(
        corpus_file, sp_model, str(workdir / "out"), validation_fraction=0.1, num_workers=1
    )


# --- tests ---------------------------------------------------------------------------------


def test_round_trip_keeps_documents_and_sentences(prepared, corpus_file, sp_model):
    want = _expected_documents(corpus_file, sp_model)
    got = _all_documents(prepared)
    assert sorted(got) == [i for i, d in enumerate(want) if d]
    for index, doc in got.items():
        _assert_same_documents(doc, want[index])
    for split in (prepared.train, prepared.validation):
        # Corpus order is kept within a split; the side arrays match the records.
        assert np.all(np.diff(split.corpus_index()) > 0)
        np.testing.assert_array_equal(split.sentence_counts(), [len(d) for d in split])
        np.testing.assert_array_equal(split.token_counts(), [sum(len(s) for s in d) for d in split])
    assert prepared.vocab_size == Tokenizer.load(sp_model).vocab_size
    assert prepared.tokenizer_path == os.path.abspath(sp_model)
    assert prepared.train[-1][0].dtype == np.int32
    with pytest.raises(IndexError):
        prepared.train[len(prepared.train)]


def test_split_is_by_document_and_deterministic(prepared, workdir, corpus_file, sp_model):
    train, validation = set(prepared.train.corpus_index()), set(prepared.validation.corpus_index())
    assert train and validation and not train & validation
    assert 1 <= len(validation) <= 15  # 10% of 60, by hash
    again = prepare(
        corpus_file, sp_model, str(workdir / "out_again"), validation_fraction=0.1, num_workers=1
    )
    np.testing.assert_array_equal(again.validation.corpus_index(), sorted(validation))
    exact = prepare(
        corpus_file, sp_model, str(workdir / "out_exact"), validation_documents=5, num_workers=1
    )
    assert len(exact.validation) == 5 and len(exact.train) == len(train) + len(validation) - 5


def test_at_least_one_validation_document(tmp_path, sp_model):
    corpus = _write_corpus(tmp_path / "two.txt", 2)
    prepared = prepare(corpus, sp_model, str(tmp_path / "out"), validation_fraction=1e-9)
    assert (len(prepared.train), len(prepared.validation)) == (1, 1)
    one = prepare(
        _write_corpus(tmp_path / "one.txt", 1), sp_model, str(tmp_path / "one"), num_workers=1
    )
    assert (len(one.train), len(one.validation)) == (1, 0)
    assert one.summary["splits"]["validation"]["documents"] == 0
    assert one.validation.sentence_counts().shape == (0,)


def test_summary_counts_single_sentence_and_empty_documents(tmp_path, sp_model, monkeypatch):
    docs = [
        ["Alpha river stone.", "Quiet north garden."],
        ["Only one sentence here."],
        [""],  # nothing after tokenisation: dropped
        ["Silver horse.", "", "Winter road."],
        ["", "Lonely house."],
    ]

    def reader(path, *, errors="strict", stats=None, **kwargs):
        stats.dropped["over-long line split"] += 2
        for doc in docs:
            stats.documents += 1
            stats.lines += len(doc)
            stats.sentences += len(doc)
            yield doc

    monkeypatch.setattr(text, "read_text_documents", reader)
    corpus = tmp_path / "any.txt"
    corpus.write_text("stand-in\n")
    prepared = prepare(
        str(corpus), sp_model, str(tmp_path / "out"), validation_fraction=0.0, num_workers=1
    )
    s = prepared.summary
    assert s["splits"]["train"]["documents"] == 4
    assert s["splits"]["train"]["sentences"] == 6
    assert s["splits"]["train"]["single_sentence_documents"] == 2
    assert s["splits"]["train"]["tokens"] == sum(len(x) for d in prepared.train for x in d)
    assert s["splits"]["validation"] == {
        "documents": 0,
        "sentences": 0,
        "tokens": 0,
        "single_sentence_documents": 0,
    }
    assert s["dropped"] == {
        "documents empty after tokenisation": 1,
        "over-long line split": 2,
        "sentences empty after tokenisation": 3,
    }
    assert s["read"]["documents"] == 5
    assert s["tokenizer"]["vocab_size"] == prepared.vocab_size
    assert len(s["tokenizer"]["sha256"]) == 64
    np.testing.assert_array_equal(prepared.train.corpus_index(), [0, 1, 3, 4])


def test_rerun_reuses_without_writing(tmp_path, corpus_file, sp_model, caplog):
    out = str(tmp_path / "out")
    first = prepare(corpus_file, sp_model, out, num_workers=1)
    before = _file_mtimes(out)
    with caplog.at_level(logging.INFO, logger=prepare_lib.__name__):
        second = prepare(corpus_file, sp_model, out, num_workers=1)
    assert second.reused and not first.reused
    assert "reusing" in caplog.text
    assert _file_mtimes(out) == before
    assert second.summary == first.summary
    # The input's hash is taken from the summary, not by reading the file again.
    monkeypatch_hash = pytest.MonkeyPatch()
    monkeypatch_hash.setattr(prepare_lib, "_sha256_file", _forbidden_for(corpus_file))
    try:
        assert prepare(corpus_file, sp_model, out, num_workers=1).reused
    finally:
        monkeypatch_hash.undo()


def _forbidden_for(path):
    real = prepare_lib._sha256_file

    def sha256_file(p):
        assert os.path.abspath(p) != os.path.abspath(path), "re-read an unchanged input"
        return real(p)

    return sha256_file


def test_changed_inputs_refused_unless_forced(tmp_path, sp_model):
    corpus = _write_corpus(tmp_path / "c.txt", 12)
    out = str(tmp_path / "out")
    prepare(corpus, sp_model, out, num_workers=1)
    with pytest.raises(PrepareError, match=r"options.*--force"):
        prepare(corpus, sp_model, out, validation_fraction=0.5, num_workers=1)
    _write_corpus(tmp_path / "c.txt", 13)
    with pytest.raises(PrepareError, match="corpus files"):
        prepare(corpus, sp_model, out, num_workers=1)
    os.utime(tmp_path / "c.txt", ns=(1, 1))  # a new mtime alone: content hash decides
    redone = prepare(corpus, sp_model, out, num_workers=1, force=True)
    assert not redone.reused and redone.summary["read"]["documents"] == 13
    assert prepare(corpus, sp_model, out, num_workers=1).reused
    # The worker count does not change the result, so it is not part of the fingerprint.
    assert prepare(corpus, sp_model, out, num_workers=3).reused


def test_incomplete_directory_detected(tmp_path, corpus_file, sp_model, monkeypatch):
    out = tmp_path / "out"
    with pytest.raises(PrepareError, match="does not exist.*flaxbert prepare"):
        load_prepared(str(out))

    def crash(self, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(prepared_lib.PretrainingCorpusBuilder, "download_and_prepare", crash)
    with pytest.raises(KeyboardInterrupt):
        prepare(corpus_file, sp_model, str(out), num_workers=1)
    monkeypatch.undo()
    with pytest.raises(PrepareError, match="COMPLETE is missing.*flaxbert prepare"):
        load_prepared(str(out))
    (out / "mine.txt").write_text("not ours")
    prepared = prepare(corpus_file, sp_model, str(out), num_workers=1)  # starts over
    assert not prepared.reused and len(prepared.train) > 0
    assert (out / "mine.txt").read_text() == "not ours"
    assert not (out / prepare_lib._SCRATCH).exists()
    os.remove(out / "sentence_counts.train.npy")
    with pytest.raises(PrepareError, match=r"sentence_counts\.train\.npy"):
        load_prepared(str(out))


def test_worker_processes_give_the_same_result(prepared, workdir, corpus_file, sp_model):
    mp = pytest.MonkeyPatch()
    _small_shards(mp)  # many shards, each cut where a document ends
    try:
        parallel = prepare(
            corpus_file,
            sp_model,
            str(workdir / "out_parallel"),
            validation_fraction=0.1,
            num_workers=2,
        )
    finally:
        mp.undo()
    assert parallel.summary["splits"] == prepared.summary["splits"]
    assert parallel.summary["fingerprint"] == prepared.summary["fingerprint"]
    for a, b in ((parallel.train, prepared.train), (parallel.validation, prepared.validation)):
        np.testing.assert_array_equal(a.corpus_index(), b.corpus_index())
        for i in range(len(a)):
            _assert_same_documents(a[i], b[i])


def _small_shards(monkeypatch, size=300):
    monkeypatch.setattr(shards_lib, "_MIN_SHARD_BYTES", size)
    monkeypatch.setattr(shards_lib, "_MAX_SHARD_BYTES", size)


def test_shards_cut_at_document_ends(tmp_path, corpus_file, monkeypatch):
    _small_shards(monkeypatch)
    shards = shards_lib._plan_shards(corpus_file, num_workers=2)
    data = open(corpus_file, "rb").read()
    assert len(shards) > 5 and shards[0].start == 0 and shards[-1].stop == len(data)
    for before, after in zip(shards, shards[1:], strict=False):
        assert before.stop == after.start and data[: after.start].endswith(b"\n\n")
        assert after.first_line == data[: after.start].count(b"\n") + 1
    jsonl = tmp_path / "c.jsonl"
    jsonl.write_text("".join(f'{{"text": "Line {i} here."}}\n' for i in range(100)))
    for shard in shards_lib._plan_shards(str(jsonl), num_workers=2):
        assert shard.start == 0 or jsonl.read_bytes()[: shard.start].endswith(b"}\n")


def test_reader_error_names_the_corpus_line(tmp_path, sp_model, monkeypatch):
    corpus = tmp_path / "bad.txt"
    good = _write_corpus(tmp_path / "good.txt", 30)
    lines = open(good, "rb").read().split(b"\n")
    bad_line = len(lines) - 5
    lines[bad_line - 1] = b"Broken \xff byte."
    corpus.write_bytes(b"\n".join(lines))
    _small_shards(monkeypatch)
    with pytest.raises(ValueError, match=rf"{corpus}:{bad_line}: not valid UTF-8") as e:
        prepare(str(corpus), sp_model, str(tmp_path / "out"), num_workers=1)
    offset = b"\n".join(lines).index(b"\xff")
    assert f"byte offset {offset} " in str(e.value) and prepare_lib._SCRATCH not in str(e.value)
    replaced = prepare(str(corpus), sp_model, str(tmp_path / "out"), errors="replace")
    assert replaced.summary["dropped"]["undecodable bytes replaced"] == 1


def test_documents_pickle_and_reopen(prepared):
    copy = pickle.loads(pickle.dumps(prepared.train))
    assert len(copy) == len(prepared.train)
    _assert_same_documents(copy[3], prepared.train[3])
    empty = pickle.loads(pickle.dumps(prepared.validation))
    assert len(empty) == len(prepared.validation)


def test_command_line(tmp_path, corpus_file, sp_model, capsys):
    parser = argparse.ArgumentParser(prog="flaxbert")
    prepare_lib.add_prepare_parser(parser.add_subparsers(dest="command"))
    out = str(tmp_path / "out")
    argv = ["prepare", "--corpus", corpus_file, "--tokenizer", sp_model, "--output", out]
    args = parser.parse_args(argv + ["--num-workers", "1"])
    assert prepare_lib.run_prepare(args) == 0
    printed = capsys.readouterr().out
    assert "train" in printed and "validation" in printed and "vocab" in printed
    args = parser.parse_args(argv + ["--validation-fraction", "0.5"])
    assert prepare_lib.run_prepare(args) == 2
    assert "--force" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["ko_nsmc_reviews.txt", "en_gutenberg.txt"])
def test_real_corpus_slice(name, tmp_path, sp_model):
    corpus = corpus_head(name, 3000, tmp_path / name)
    prepared = prepare(str(corpus), sp_model, str(tmp_path / "out"), num_workers=1)
    s = prepared.summary
    assert s["splits"]["train"]["documents"] >= 1 and s["splits"]["train"]["tokens"] > 0
    assert s["read"]["lines"] > 2500
    want = _expected_documents(str(corpus), sp_model)
    got = _all_documents(prepared)
    assert len(got) == sum(1 for d in want if d)
    first = min(got)
    _assert_same_documents(got[first], want[first])


def test_split_sized_for_next_sentence_pairs(tmp_path, sp_model, capfd):
    corpus = _write_corpus(tmp_path / "thirty.txt", 30)
    prepared = prepare(
        corpus,
        sp_model,
        str(tmp_path / "out"),
        validation_fraction=1e-9,
        num_workers=1,
        min_split_documents=2,
    )
    assert (len(prepared.train), len(prepared.validation)) == (28, 2)
    printed = "".join(capfd.readouterr())
    assert "Downloading and preparing" not in printed and "downloaded and prepared" not in printed
    with pytest.raises(PrepareError, match=r"holds 3 document.*at least 4 in all"):
        prepare(
            _write_corpus(tmp_path / "three.txt", 3),
            sp_model,
            str(tmp_path / "three"),
            num_workers=1,
            min_split_documents=2,
        )
    assert not (tmp_path / "three").exists()  # nothing half-made left behind
