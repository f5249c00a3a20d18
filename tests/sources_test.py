"""Pre-training on real text end to end: tokenizer on first use -> prepare -> pretrain."""

import json
import logging
import math
import os

import pytest
from shared_data import corpus_head

from flaxbert.config import ConfigError, load_config, override_keys
from flaxbert.data.sources import cached_tokenizer_path, load_corpus
from flaxbert.train import pretrain

pytestmark = pytest.mark.usefixtures("fast_compiles")

SEQ = 64


def _slice(repo_root, tmp_path, name, lines):
    return corpus_head(name, lines, tmp_path / name)


def _config(repo_root, corpus, cache, vocab, *extra):
    """tiny on `corpus`; model.vocab_size is left to follow the tokenizer."""
    return load_config(
        f"{repo_root / 'configs/pretrain.py'}:tiny",
        [
            f"--config.data.corpus={corpus}",
            f"--config.data.cache_dir={cache}",
            f"--config.data.vocab_size={vocab}",
            f"--config.data.max_seq_length={SEQ}",
            "--config.data.max_predictions_per_seq=10",
            "--config.data.validation_fraction=0.1",
            "--config.train.num_steps=6",
            "--config.train.batch_size=8",
            "--config.train.log_every=3",
            "--config.eval.every_steps=0",
            "--config.eval.num_batches=1",
            "--config.eval.batch_size=8",
            *extra,
        ],
    )


@pytest.mark.parametrize(
    "name,lines,vocab", [("ko_nsmc_reviews.txt", 4000, 2000), ("en_gutenberg.txt", 1500, 1000)]
)
def test_pretrain_on_a_shared_corpus_slice(repo_root, tmp_path, caplog, name, lines, vocab):
    corpus = _slice(repo_root, tmp_path, name, lines)
    cache = tmp_path / "cache"
    if name.startswith("en"):  # a slice holds one or two books: make documents smaller
        text = corpus.read_text(encoding="utf-8").splitlines()
        corpus.write_text(
            "\n".join(line + ("\n" if i % 40 == 39 else "") for i, line in enumerate(text)) + "\n",
            encoding="utf-8",
        )
    caplog.set_level(logging.INFO)
    config = _config(
        repo_root,
        corpus,
        cache,
        vocab,
        "--config.data.whole_word_masking=True",
        "--config.train.warmup_steps=1",
    )
    assert config.model.vocab_size == 512  # tiny's, for the embedded corpus
    result = pretrain(config, str(tmp_path / "run"))
    assert list(cache.glob("*.model")) and list(cache.glob("*-prepared-*/COMPLETE"))
    # model.vocab_size was not named: it follows the tokenizer trained on first use.
    assert json.loads((tmp_path / "run/config.json").read_text())["model"]["vocab_size"] == vocab
    assert f"model.vocab_size={vocab}: the tokenizer's size" in caplog.text
    rows = [json.loads(x) for x in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == [3, 6]
    # It learns from the real text: the masked-LM loss starts near ln(vocab) (a uniform guess)
    # and six updates bring it, and the held-out loss, below that (by 0.2-0.3 nats measured).
    uniform = math.log(vocab)
    assert abs(train_rows[0]["mlm_loss"] - uniform) < 0.5, train_rows[0]
    assert train_rows[1]["mlm_loss"] < train_rows[0]["mlm_loss"] - 0.1, train_rows
    assert result.eval_metrics["eval/mlm_loss"] < uniform - 0.1, result.eval_metrics
    assert 0.0 < result.eval_metrics["eval/mlm_accuracy"] < 1.0

    # Another run reuses the tokenizer and the prepared data (loading is enough to show it).
    caplog.clear()
    load_corpus(config.data, str(tmp_path / "run2"))
    assert "training a" not in caplog.text and "reus" in caplog.text.lower()


def test_vocab_mismatch_stops_before_training(repo_root, tmp_path):
    """A model.vocab_size named on the command line is the user's: it must fit the tokenizer."""
    corpus = _slice(repo_root, tmp_path, "ko_nsmc_reviews.txt", 2000)
    named = "--config.model.vocab_size=2100"
    config = _config(repo_root, corpus, tmp_path / "cache", 2000, named)
    with pytest.raises(ConfigError, match=r"model\.vocab_size=2100.*2000 pieces"):
        pretrain(config, str(tmp_path / "run"), explicit=override_keys([named]))
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_tokenizer_with_other_special_ids_is_refused(repo_root, tmp_path):
    import sentencepiece as spm

    corpus = _slice(repo_root, tmp_path, "en_gutenberg.txt", 300)
    prefix = tmp_path / "wrong"
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(prefix), vocab_size=300, model_type="unigram"
    )  # default ids: <unk>=0 <s>=1 </s>=2
    config = _config(
        repo_root, corpus, tmp_path / "cache", 300, f"--config.data.tokenizer={prefix}.model"
    )
    with pytest.raises(Exception, match=r"\[PAD\]"):
        pretrain(config, str(tmp_path / "run"))


def test_cached_tokenizer_name_follows_what_changes_the_pieces(repo_root, tmp_path):
    def path(*overrides):
        config = load_config(
            f"{repo_root / 'configs/pretrain.py'}:tiny",
            ["--config.data.corpus=/data/wiki.txt", *overrides],
        )
        return os.path.basename(cached_tokenizer_path(config.data, str(tmp_path)))

    default = path()
    assert default == path("--config.data.tokenizer_max_sentences=300000")
    variants = [
        path("--config.data.tokenizer_max_sentences=1000"),
        path("--config.data.vocab_size=4000"),
        path("--config.data.tokenizer_model_type=bpe"),
        path("--config.data.text_field=body"),
        path("--config.data.corpus=/data/other.txt"),
    ]
    assert len({default, *variants}) == 6, (default, variants)
