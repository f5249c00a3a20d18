"""HuggingFace import and export (`flaxbert convert`): the converted model gives
transformers' logits, export undoes import bit for bit (scanned checkpoints too), fine-tuning
takes a converted directory, the WordPiece tokenizer encodes as BERT's does, and what cannot
be converted is named."""

import functools
import json
import logging
import shutil

import jax
import numpy as np
import pytest
from shared_data import corpus_head

pytest.importorskip(
    "transformers",
    reason="transformers (in the test extra: pip install -e '.[test]') builds the reference "
    "HuggingFace BERT these tests convert and compare with",
)

from flaxbert import checkpoint as ckpt  # noqa: E402
from flaxbert.config import ConfigError, load_config, override_keys  # noqa: E402
from flaxbert.convert import (  # noqa: E402
    ConversionError,
    export_hf,
    import_hf,
    read_params,
    vocabulary_order,
)
from flaxbert.model import stack_layers  # noqa: E402
from flaxbert.model_config import BertConfig
from flaxbert.pretraining_model import BertForPreTraining  # noqa: E402
from flaxbert.tokenizer import (  # noqa: E402
    SPECIAL_TOKENS,
    Tokenizer,
    WordPieceTokenizer,
    load_tokenizer,
    train_tokenizer,
)

pytestmark = pytest.mark.usefixtures("fast_compiles")

VOCAB_SIZE = 120
HF_SPECIAL_IDS = (0, 100, 101, 102, 103)  # [PAD] [UNK] [CLS] [SEP] [MASK], as bert-base-uncased
WORDS = (
    "the a this movie film plot acting was is it and not very good great bad boring fun "
    "love hate story end world hello cafe un ##aff ##able ##s ##ing ##ed ##ly . , ! ? ' "
    "日 本 한 ##국 어"
).split()
LETTERS = [c for c in "abcdefghijklmnopqrstuvwxyz"] + [
    f"##{c}" for c in "abcdefghijklmnopqrstuvwxyz"
]


# The fixture's model as finetune config overrides.
TINY_MODEL_FLAGS = (
    "--config.model.hidden_size=32",
    "--config.model.num_layers=2",
    "--config.model.num_heads=2",
    "--config.model.intermediate_size=64",
    "--config.model.max_position_embeddings=64",
)


def _hf_vocab() -> list[str]:
    """120 pieces with the special tokens where HuggingFace's English BERT has them."""
    rest = iter(WORDS + LETTERS + [f"[unused{i}]" for i in range(VOCAB_SIZE)])
    specials = dict(zip(HF_SPECIAL_IDS, SPECIAL_TOKENS, strict=True))
    return [specials[i] if i in specials else next(rest) for i in range(VOCAB_SIZE)]


def _torch_style(params) -> dict[str, np.ndarray]:
    """transformers' Flax parameters under PyTorch's names and (out, in) kernels."""
    out = {}
    for path, x in jax.tree_util.tree_leaves_with_path(params):
        names = [str(k.key) for k in path]
        x = np.asarray(x)
        if names[-1] == "kernel":
            names[-1], x = "weight", x.T
        elif names[-1] in ("embedding", "scale"):
            names[-1] = "weight"
        out[".".join(names)] = np.ascontiguousarray(x)
    return out


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    """A transformers FlaxBertForPreTraining with random parameters (biases and LayerNorms
    too, so that they matter), saved by `save_pretrained` (flax_model.msgpack) and as a
    PyTorch-style model.safetensors (written here, with the tied decoder copy and the
    embeddings' LayerNorm named gamma/beta as in old TF-converted checkpoints)."""
    from safetensors.numpy import save_file
    from transformers import BertConfig as HFBertConfig
    from transformers import FlaxBertForPreTraining

    tmp = tmp_path_factory.mktemp("hf")
    config = HFBertConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    model = FlaxBertForPreTraining(config, _do_init=False)  # shapes only: no compile
    shapes = jax.eval_shape(
        functools.partial(model.init_weights, input_shape=(1, 1)), jax.random.key(0)
    )
    rng = np.random.default_rng(0)

    def draw(path, x):
        noise = rng.normal(0, 0.05, x.shape).astype(np.float32)
        return noise + 1.0 if path[-1].key == "scale" else noise

    params = jax.tree_util.tree_map_with_path(draw, shapes)
    vocab = "".join(p + "\n" for p in _hf_vocab())

    msgpack_dir = tmp / "tiny-bert-uncased"
    model.save_pretrained(msgpack_dir, params=params)
    (msgpack_dir / "vocab.txt").write_text(vocab, encoding="utf-8")

    st_dir = tmp / "tiny-bert-st-uncased"
    config.save_pretrained(st_dir)
    weights = _torch_style(params)
    weights["cls.predictions.decoder.weight"] = weights["bert.embeddings.word_embeddings.weight"]
    for new, old in (("gamma", "weight"), ("beta", "bias")):
        weights[f"bert.embeddings.LayerNorm.{new}"] = weights.pop(
            f"bert.embeddings.LayerNorm.{old}"
        )
    save_file(weights, st_dir / "model.safetensors", metadata={"format": "pt"})
    (st_dir / "vocab.txt").write_text(vocab, encoding="utf-8")
    return model, params, msgpack_dir, st_dir


def _hf_batch():
    """HuggingFace ids: [CLS] words [SEP] words [SEP] with a [MASK] and [UNK], padded."""
    rng = np.random.default_rng(1)
    lengths = (16, 11, 6)
    ids = np.zeros((3, 16), np.int32)
    segments = np.zeros_like(ids)
    for b, n in enumerate(lengths):
        ids[b, :n] = rng.integers(104, VOCAB_SIZE, n)
        ids[b, 0], ids[b, n // 2], ids[b, n - 1] = 101, 102, 102
        ids[b, 1], ids[b, 2] = 103, 100
        segments[b, n // 2 + 1 : n] = 1
    mask = (np.arange(16)[None] < np.asarray(lengths)[:, None]).astype(np.int32)
    return ids, mask, segments


@pytest.mark.parametrize("source", ["msgpack", "safetensors"])
def test_converted_model_gives_transformers_logits(hf, tmp_path, source):
    model, params, msgpack_dir, st_dir = hf
    result = import_hf(str(msgpack_dir if source == "msgpack" else st_dir), str(tmp_path / "out"))
    assert result.heads == ["pooler", "mlm", "nsp"]
    assert result.original_ids == dict(zip(SPECIAL_TOKENS, HF_SPECIAL_IDS, strict=True))
    assert result.casing.lowercase  # the directory's name contains "uncased"

    hf_ids, mask, segments = _hf_batch()
    expected = model(hf_ids, mask, segments, params=params, train=False)
    order = vocabulary_order(HF_SPECIAL_IDS, VOCAB_SIZE)
    ids = np.argsort(order)[hf_ids]  # the same tokens under flaxbert's ids
    assert (ids[:, 0] == 2).all() and (ids[:, 1] == 4).all() and (ids[:, 2] == 1).all()
    assert (ids[mask == 0] == 0).all()

    converted = read_params(result.step_dir)
    flax_model = BertForPreTraining(BertConfig.from_dict(result.model))
    variables = {"params": converted}
    logits = flax_model.apply(
        variables, ids, mask, segments, method=BertForPreTraining.all_position_mlm_logits
    )
    np.testing.assert_allclose(
        np.asarray(logits), np.asarray(expected.prediction_logits)[..., order], atol=1e-4
    )
    nsp = flax_model.apply(variables, ids, mask, segments, np.zeros((3, 1), np.int32))
    np.testing.assert_allclose(
        np.asarray(nsp.nsp_logits_B2), np.asarray(expected.seq_relationship_logits), atol=1e-4
    )

    # The tokenizer written beside the checkpoint reads flaxbert ids from the reordered file.
    tok = load_tokenizer(ckpt.tokenizer_of(str(result.workdir)))
    assert isinstance(tok, WordPieceTokenizer) and tok.vocab_size == VOCAB_SIZE
    assert [tok.id_to_piece(i) for i in range(5)] == list(SPECIAL_TOKENS)
    assert [tok.id_to_piece(i) for i in ids[0]] == [_hf_vocab()[i] for i in hf_ids[0]]


def _same_tree(a, b):
    leaves_a = jax.tree_util.tree_leaves_with_path(a)
    leaves_b = jax.tree_util.tree_leaves_with_path(b)
    assert [p for p, _ in leaves_a] == [p for p, _ in leaves_b]
    for (path, x), (_, y) in zip(leaves_a, leaves_b, strict=True):
        assert x.dtype == y.dtype and x.shape == y.shape, path
        assert np.array_equal(x, y), path


def test_export_undoes_import_bit_for_bit(hf, tmp_path):
    from safetensors.numpy import load_file

    *_, st_dir = hf
    first = import_hf(str(st_dir), str(tmp_path / "a"))
    exported = export_hf(str(tmp_path / "a"), str(tmp_path / "hf"))
    assert exported.architecture == "BertForPreTraining" and exported.tokenizer == "wordpiece"

    # The very tensors and vocabulary the import read, in HuggingFace's order again.
    source = load_file(st_dir / "model.safetensors")
    source.pop("cls.predictions.decoder.weight")  # tied: HuggingFace rebuilds it
    for new, old in (("gamma", "weight"), ("beta", "bias")):
        source[f"bert.embeddings.LayerNorm.{old}"] = source.pop(f"bert.embeddings.LayerNorm.{new}")
    written = load_file(tmp_path / "hf" / "model.safetensors")
    assert sorted(written) == sorted(source)
    for name in source:
        assert written[name].dtype == source[name].dtype, name
        assert np.array_equal(written[name], source[name]), name
    assert (tmp_path / "hf/vocab.txt").read_bytes() == (st_dir / "vocab.txt").read_bytes()
    config = json.loads((tmp_path / "hf/config.json").read_text())
    original = json.loads((st_dir / "config.json").read_text())
    for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads"):
        assert config[key] == original[key]
    assert config["model_type"] == "bert" and config["hidden_act"] == "gelu"
    assert config["pad_token_id"] == 0 and config["architectures"] == ["BertForPreTraining"]
    assert json.loads((tmp_path / "hf/tokenizer_config.json").read_text())["do_lower_case"]

    # And back: every parameter array equal.
    second = import_hf(str(tmp_path / "hf"), str(tmp_path / "b"))
    _same_tree(read_params(first.step_dir), read_params(second.step_dir))
    assert (tmp_path / "a/vocab.txt").read_bytes() == (tmp_path / "b/vocab.txt").read_bytes()


def test_scanned_and_bare_encoder_checkpoints_export(hf, tmp_path):
    """A checkpoint with scan_layers (stacked layers) exports the same tensors as the plain
    one; its tokenizer copy (`keep_tokenizer`) still knows the original ids. A bare BertModel
    (no heads, no `bert.` prefix) imports to the same encoder and exports as BertModel."""
    from safetensors.numpy import load_file, save_file

    *_, st_dir = hf
    plain = import_hf(str(st_dir), str(tmp_path / "plain"))
    export_hf(plain.workdir, str(tmp_path / "plain_hf"))

    params = read_params(plain.step_dir)
    params["bert"] = stack_layers(params["bert"], 2)
    meta = ckpt.read_meta(plain.workdir)[1]
    meta["model"]["scan_layers"] = True
    scanned = tmp_path / "scanned"
    scanned.mkdir()
    meta["tokenizer"] = ckpt.keep_tokenizer(str(scanned), str(tmp_path / "plain/vocab.txt"))
    c = ckpt.Checkpoints(str(scanned / "checkpoints"), async_save=False)
    c.save(0, params, {"x": np.zeros(())}, meta)
    c.close()
    export_hf(str(scanned), str(tmp_path / "scanned_hf"))
    a = load_file(tmp_path / "plain_hf/model.safetensors")
    b = load_file(tmp_path / "scanned_hf/model.safetensors")
    assert sorted(a) == sorted(b) and all(np.array_equal(a[k], b[k]) for k in a)
    assert (tmp_path / "scanned_hf/vocab.txt").read_bytes() == (st_dir / "vocab.txt").read_bytes()

    bare = tmp_path / "bare-uncased"
    bare.mkdir()
    weights = {k[len("bert.") :]: v for k, v in a.items() if k.startswith("bert.")}
    save_file(weights, bare / "model.safetensors")
    for name in ("config.json", "vocab.txt"):
        shutil.copy(st_dir / name, bare / name)
    result = import_hf(str(bare), str(tmp_path / "bare_out"))
    assert result.heads == ["pooler"]
    restored = read_params(result.step_dir)
    assert sorted(restored) == ["bert"]
    _same_tree(restored["bert"], read_params(plain.step_dir)["bert"])
    exported = export_hf(str(tmp_path / "bare_out"), str(tmp_path / "bare_hf"))
    assert exported.architecture == "BertModel"
    assert sorted(load_file(tmp_path / "bare_hf/model.safetensors")) == sorted(weights)


def test_finetune_takes_a_converted_directory(hf, repo_root, tmp_path):
    from flaxbert.finetune import finetune
    from flaxbert.finetune_setup import model_config_for, resolve_tokenizer

    _, _, msgpack_dir, _ = hf
    converted = import_hf(str(msgpack_dir), str(tmp_path / "converted"))
    rng = np.random.default_rng(0)
    for split, n in (("train", 32), ("eval", 16)):
        rows = ["sentence\tlabel"]
        for _ in range(n):
            label = int(rng.integers(2))
            words = rng.choice(["the", "movie", "plot", "was", "very"], 4).tolist()
            rows.append(" ".join([*words, ("Great" if label else "Boring") + "!"]) + f"\t{label}")
        (tmp_path / f"{split}.tsv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    config = load_config(
        str(repo_root / "configs/finetune.py") + ":sst2,tiny",
        [
            *TINY_MODEL_FLAGS,
            "--config.model.hidden_dropout_rate=0.0",
            f"--config.init_from={converted.workdir}",
            f"--config.data.train_file={tmp_path / 'train.tsv'}",
            f"--config.data.eval_file={tmp_path / 'eval.tsv'}",
            "--config.data.max_seq_length=16",
            "--config.train.batch_size=16",
            "--config.eval.batch_size=16",
            "--config.train.num_steps=2",
            "--config.train.learning_rate=0.0",  # what was restored stays as it was
            "--config.train.log_every=1",
            "--config.checkpoint.async_save=False",
        ],
    )
    result = finetune(config, str(tmp_path / "ft"))
    assert result.final_step == 2 and "eval/accuracy" in result.eval_metrics
    assert "bert/embeddings" in result.restored_groups and "bert/pooler" in result.restored_groups
    _same_tree(jax.device_get(result.state.params["bert"]), read_params(converted.step_dir)["bert"])
    # The fine-tuning workdir keeps the vocabulary and its casing.
    assert (tmp_path / "ft/vocab.txt").read_bytes() == (
        tmp_path / "converted/vocab.txt"
    ).read_bytes()
    kept = json.loads((tmp_path / "ft/tokenizer_config.json").read_text())
    assert kept["do_lower_case"] is True and kept["flaxbert_original_ids"]["[CLS]"] == 101

    # A fine-tuned checkpoint exports its encoder, in HuggingFace's vocabulary order.
    exported = export_hf(str(tmp_path / "ft"), str(tmp_path / "ft_hf"))
    assert exported.architecture == "BertModel" and exported.not_exported == ["classifier"]
    assert (tmp_path / "ft_hf/vocab.txt").read_bytes() == (msgpack_dir / "vocab.txt").read_bytes()

    # The random-initialisation baseline with the converted vocabulary.
    config.unlock()
    config.init_from, config.data.tokenizer = "", str(tmp_path / "converted/vocab.txt")
    assert resolve_tokenizer(config) == config.data.tokenizer
    assert model_config_for(config, VOCAB_SIZE).vocab_size == VOCAB_SIZE


def _flaxbert_vocab(directory, config=None):
    directory.mkdir()
    order = vocabulary_order(HF_SPECIAL_IDS, VOCAB_SIZE)
    pieces = [_hf_vocab()[i] for i in order]
    (directory / "vocab.txt").write_text("".join(p + "\n" for p in pieces), encoding="utf-8")
    if config is not None:
        (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return directory / "vocab.txt"


def test_wordpiece_tokenizer_encodes_like_bert_with_offsets(tmp_path):
    from transformers import BertTokenizer  # the pure-Python reference implementation

    path = _flaxbert_vocab(tmp_path / "model", {"do_lower_case": True})
    tok = load_tokenizer(path)
    assert isinstance(tok, WordPieceTokenizer) and tok.casing.lowercase
    text = "  Hello, Café  worlds! unaffable 日本 zq"
    ids, start, end = tok.encode_with_offsets(text)
    pieces = [tok.id_to_piece(i) for i in ids]
    assert pieces == "hello , cafe world ##s ! un ##aff ##able 日 本 z ##q".split()
    spans = [text[a:b] for a, b in zip(start, end, strict=True)]
    assert spans == [
        "Hello",
        ",",
        "Café",
        "world",
        "s",
        "!",
        "un",
        "aff",
        "able",
        "日",
        "本",
        "z",
        "q",
    ]
    assert ids.dtype == start.dtype == end.dtype == np.int32
    reference = BertTokenizer(str(path), do_lower_case=True)
    for sample in (text, "The movie was GREAT!!", "한국어 bad-plot, x\u200by ǅ", ""):
        expected = reference.encode(sample, add_special_tokens=False)
        assert tok.encode(sample).tolist() == expected, sample
    # Raw text never produces a special id (transformers' BertTokenizer would give [CLS]).
    assert tok.encode("[CLS] the").tolist() == tok.encode("[ cls ] the").tolist()
    batch = tok.encode_batch([text, "the end"])
    assert batch[0].tolist() == ids.tolist() and tok.decode(batch[1]) == "the end"
    assert tok.decode([2, *ids.tolist(), 3, 0]) == "hello, cafe worlds! unaffable 日 本 zq"
    assert tok.word_starts(ids).tolist() == [not p.startswith("##") for p in pieces]
    assert tok.vocab_size == VOCAB_SIZE and tok.word_start[:5].all()

    # Casing: tokenizer_config.json first, else the directory's name.
    cased = load_tokenizer(_flaxbert_vocab(tmp_path / "bert-uncased", {"do_lower_case": False}))
    assert not cased.casing.lowercase and cased.encode("Hello").tolist() == [1]  # [UNK]
    assert load_tokenizer(_flaxbert_vocab(tmp_path / "tiny-uncased")).casing.lowercase
    assert not load_tokenizer(_flaxbert_vocab(tmp_path / "tiny-cased")).casing.lowercase

    hf_order = tmp_path / "hf"
    hf_order.mkdir()
    (hf_order / "vocab.txt").write_text("".join(p + "\n" for p in _hf_vocab()), encoding="utf-8")
    with pytest.raises(ValueError, match=r"\[UNK\] should have id 1 but is at line\(s\) 100"):
        load_tokenizer(hf_order / "vocab.txt")
    with pytest.raises(ValueError, match="flaxbert convert --from-hf"):
        load_tokenizer(hf_order)


def _sentencepiece_workdir(st_dir, tmp_path):
    """A workdir whose checkpoint has a 300-piece SentencePiece tokenizer: the converted
    tiny model with its vocabulary rows (and MLM bias) redrawn for it. Returns
    (workdir, tokenizer model path, params)."""
    corpus = tmp_path / "corpus.txt"
    lines = (" ".join(f"w{(i * 7 + j * 13) % 499}q" for j in range(9)) for i in range(600))
    corpus.write_text("\n".join(lines))
    sp = train_tokenizer([str(corpus)], 300, str(tmp_path / "sp"), num_threads=1)
    converted = import_hf(str(st_dir), str(tmp_path / "conv"))
    params = read_params(converted.step_dir)
    rng = np.random.default_rng(0)
    params["bert"]["embeddings"]["word_embeddings"] = rng.normal(size=(300, 32)).astype(np.float32)
    params["mlm_output_bias"] = rng.normal(size=300).astype(np.float32)
    meta = ckpt.read_meta(converted.workdir)[1]
    meta["model"]["vocab_size"] = 300
    workdir = tmp_path / "sp_run"
    workdir.mkdir()
    meta["tokenizer"] = ckpt.keep_tokenizer(str(workdir), sp)
    c = ckpt.Checkpoints(str(workdir / "checkpoints"), async_save=False)
    c.save(0, params, {"x": np.zeros(())}, meta)
    c.close()
    return workdir, sp, params


def test_pre_layer_norm_checkpoint_is_not_exported(hf, tmp_path):
    """transformers' BertModel has post-LayerNorm blocks only: a pre-LN checkpoint
    (model.pre_layer_norm) would export into a model that computes something else."""
    *_, st_dir = hf
    plain = import_hf(str(st_dir), str(tmp_path / "plain"))
    params = read_params(plain.step_dir)
    meta = ckpt.read_meta(plain.workdir)[1]
    meta["model"]["pre_layer_norm"] = True
    pre = tmp_path / "pre"
    c = ckpt.Checkpoints(str(pre / "checkpoints"), async_save=False)
    c.save(0, params, {"x": np.zeros(())}, meta)
    c.close()
    with pytest.raises(ConversionError, match="pre_layer_norm=True"):
        export_hf(str(pre), str(tmp_path / "pre_hf"))
    assert not (tmp_path / "pre_hf").exists()


def test_sentencepiece_checkpoint_exports_with_its_model(hf, tmp_path, caplog):
    *_, st_dir = hf
    workdir, sp, _ = _sentencepiece_workdir(st_dir, tmp_path)
    assert isinstance(load_tokenizer(sp), Tokenizer)
    with caplog.at_level(logging.WARNING, logger="flaxbert"):
        result = export_hf(str(workdir), str(tmp_path / "out"))
    assert result.tokenizer == "sentencepiece"
    assert (tmp_path / "out/tokenizer.model").read_bytes() == (tmp_path / "sp.model").read_bytes()
    assert not (tmp_path / "out/vocab.txt").exists()
    assert "needs a matching tokenizer" in caplog.text


def test_what_cannot_be_converted_is_named(hf, tmp_path, capsys):
    from safetensors.numpy import load_file, save_file

    from flaxbert import cli

    *_, st_dir = hf
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConversionError, match="no config.json.*model.safetensors.*vocab.txt"):
        import_hf(str(empty), str(tmp_path / "x"))

    def variant(name, config=None, weights=None, vocab=None):
        d = tmp_path / name
        d.mkdir()
        c = json.loads((st_dir / "config.json").read_text())
        (d / "config.json").write_text(json.dumps({**c, **(config or {})}))
        if weights is not None:
            save_file(weights, d / "model.safetensors")
        (d / "vocab.txt").write_text(vocab or (st_dir / "vocab.txt").read_text())
        return str(d)

    (empty / "pytorch_model.bin").write_bytes(b"")
    shutil.copy(st_dir / "config.json", empty)
    shutil.copy(st_dir / "vocab.txt", empty)
    with pytest.raises(ConversionError, match="no weights: expected model.safetensors.*PyTorch"):
        import_hf(str(empty), str(tmp_path / "x"))

    weights = load_file(st_dir / "model.safetensors")
    odd = dict(weights)
    del odd["cls.seq_relationship.bias"], odd["bert.encoder.layer.1.output.dense.weight"]
    odd["bert.encoder.layer.0.attention.self.rotary.weight"] = np.zeros(2, np.float32)
    with pytest.raises(ConversionError) as e:
        import_hf(variant("odd", weights=odd), str(tmp_path / "x"))
    message = str(e.value)
    assert "2 weight(s) missing" in message and "cls.seq_relationship.bias" in message
    assert "bert.encoder.layer.1.output.dense.weight" in message
    assert "1 weight(s) flaxbert has no place for" in message and "rotary.weight" in message

    untied = dict(weights)
    untied["cls.predictions.decoder.weight"] = untied["cls.predictions.decoder.weight"] + 1
    with pytest.raises(ConversionError, match="untied"):
        import_hf(variant("untied", weights=untied), str(tmp_path / "x"))
    with pytest.raises(ConversionError, match="hidden_act='relu'.*position_embedding_type"):
        import_hf(
            variant("act", {"hidden_act": "relu", "position_embedding_type": "relative_key"}),
            str(tmp_path / "x"),
        )
    with pytest.raises(ConversionError, match="(?s)wrong shape.*word_embeddings"):
        longer = "".join(p + "\n" for p in [*_hf_vocab(), "extra"])
        import_hf(variant("size", {"vocab_size": 121}, weights, longer), str(tmp_path / "x"))
    with pytest.raises(ConversionError, match=r"has 119 lines but config.json says vocab_size=120"):
        short = "".join(p + "\n" for p in _hf_vocab()[:-1])
        import_hf(variant("short", weights=weights, vocab=short), str(tmp_path / "x"))

    # The command: flags checked, errors printed with status 2, and a working conversion.
    assert cli.main(["convert", "--from-hf", str(st_dir)]) == 2
    assert "needs --workdir OUT" in capsys.readouterr().err
    out = tmp_path / "cli_out"
    assert cli.main(["convert", "--from-hf", str(st_dir), "--workdir", str(out)]) == 0
    assert cli.main(["convert", "--from-hf", str(st_dir), "--workdir", str(out)]) == 2
    assert "already holds checkpoints" in capsys.readouterr().err
    assert cli.main(["convert", "--to-hf", str(out), "--out", str(empty)]) == 2
    assert "is not empty" in capsys.readouterr().err
    assert cli.main(["convert", "--to-hf", str(out), "--out", str(tmp_path / "cli_hf")]) == 0
    assert (tmp_path / "cli_hf/model.safetensors").exists()


# ------------------------------------------------------------------ head combinations

_HEAD_PREFIXES = {
    "pooler": ("bert.pooler.",),
    "mlm": ("cls.predictions.",),
    "nsp": ("cls.seq_relationship.",),
}
COMBINATIONS = {  # name: (heads kept, the architecture the export names)
    "pretraining": (("pooler", "mlm", "nsp"), "BertForPreTraining"),
    "masked-lm": (("mlm",), "BertForMaskedLM"),  # transformers' BertForMaskedLM layout
    "masked-lm+pooler": (("pooler", "mlm"), "BertForMaskedLM"),
    "encoder+pooler": (("pooler",), "BertModel"),
    "encoder": ((), "BertModel"),
}


def _hf_variant(st_dir, directory, heads):
    """The fixture's safetensors directory with only `heads` kept (a bare encoder loses the
    `bert.` prefix, as transformers' BertModel saves it)."""
    from safetensors.numpy import load_file, save_file

    weights = load_file(st_dir / "model.safetensors")
    dropped = [p for h, ps in _HEAD_PREFIXES.items() if h not in heads for p in ps]
    weights = {k: v for k, v in weights.items() if not k.startswith(tuple(dropped))}
    if not {"mlm", "nsp"} & set(heads):
        weights = {k[len("bert.") :]: v for k, v in weights.items()}
    directory.mkdir()
    save_file(weights, directory / "model.safetensors")
    for name in ("config.json", "vocab.txt"):
        shutil.copy(st_dir / name, directory / name)
    return directory


@pytest.mark.parametrize("combination", list(COMBINATIONS))
def test_every_head_combination_converts_and_runs(hf, tmp_path, combination):
    """Each layout the import accepts runs every documented entry point: the model's
    methods (MLM logits equal transformers' where there is an MLM head), extract-features
    (the encoder's vectors, equal for every layout), and export (the architecture that has
    those heads, importing back to the same parameters)."""
    from flaxbert.features import extract_features
    from flaxbert.pretraining_model import heads_of

    model, params, *_, st_dir = hf
    heads, architecture = COMBINATIONS[combination]
    source = _hf_variant(st_dir, tmp_path / f"{combination}-uncased", heads)
    result = import_hf(str(source), str(tmp_path / "out"))
    assert result.heads == list(heads)
    converted = read_params(result.workdir)
    assert heads_of(converted) == heads

    hf_ids, mask, segments = _hf_batch()
    expected = model(hf_ids, mask, segments, params=params, train=False)
    order = vocabulary_order(HF_SPECIAL_IDS, VOCAB_SIZE)
    ids = np.argsort(order)[hf_ids]
    config = BertConfig.from_dict(result.model)
    variables = {"params": converted}
    fitted = BertForPreTraining.for_params(config, converted)
    out = fitted.apply(variables, ids, mask, segments, np.zeros((3, 2), np.int32))
    if "mlm" in heads:
        # The call of the issue: the default model, MLM logits on a checkpoint w/o pooler.
        logits = BertForPreTraining(config).apply(
            variables, ids, mask, segments, method=BertForPreTraining.all_position_mlm_logits
        )
        np.testing.assert_allclose(
            np.asarray(logits), np.asarray(expected.prediction_logits)[..., order], atol=1e-4
        )
        np.testing.assert_allclose(
            np.asarray(out.mlm_logits_BPV[:, 0]), np.asarray(logits[:, 0]), atol=1e-5
        )
    else:
        assert out.mlm_logits_BPV is None
    assert (out.nsp_logits_B2 is None) == ("nsp" not in heads)

    # extract-features: last-layer vectors, the same whatever heads the checkpoint has.
    lines = tmp_path / "lines.txt"
    lines.write_text("the movie was good\nhello world ||| the end\n", encoding="utf-8")
    summary = extract_features(result.workdir, str(lines), str(tmp_path / "feat"))
    vectors = np.load(summary["npy"])
    reference = extract_features(
        import_hf(str(st_dir), str(tmp_path / "full")).workdir, str(lines), str(tmp_path / "ref")
    )
    np.testing.assert_array_equal(vectors, np.load(reference["npy"]))
    assert vectors.shape == (summary["rows"], 32) and summary["rows"] == 6 + 7

    # Export names the architecture that has these heads and imports back unchanged.
    exported = export_hf(result.workdir, str(tmp_path / "hf"))
    assert exported.architecture == architecture and exported.heads == list(heads)
    again = import_hf(str(tmp_path / "hf"), str(tmp_path / "again"))
    _same_tree(read_params(again.step_dir), converted)


def test_finetune_starts_from_a_masked_lm_checkpoint(hf, repo_root, tmp_path):
    """A checkpoint without a pooler (transformers' BertForMaskedLM): fine-tuning restores
    the embeddings and layers, and the pooler starts fresh."""
    from flaxbert.finetune import finetune

    *_, st_dir = hf
    source = _hf_variant(st_dir, tmp_path / "mlm-uncased", ("mlm",))
    converted = import_hf(str(source), str(tmp_path / "converted"))
    rows = ["sentence\tlabel"] + [f"the movie was {w}\t{i % 2}" for i, w in enumerate(WORDS[:16])]
    (tmp_path / "train.tsv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    config = load_config(
        str(repo_root / "configs/finetune.py") + ":sst2,tiny",
        [
            *TINY_MODEL_FLAGS,
            f"--config.init_from={converted.workdir}",
            f"--config.data.train_file={tmp_path / 'train.tsv'}",
            f"--config.data.eval_file={tmp_path / 'train.tsv'}",
            "--config.data.max_seq_length=16",
            "--config.train.batch_size=8",
            "--config.eval.batch_size=8",
            "--config.train.num_steps=1",
            "--config.train.learning_rate=0.0",
            "--config.checkpoint.async_save=False",
        ],
    )
    result = finetune(config, str(tmp_path / "ft"))
    assert "bert/embeddings" in result.restored_groups
    assert "bert/pooler" not in result.restored_groups
    saved = read_params(converted.step_dir)["bert"]
    restored = jax.device_get(result.state.params["bert"])
    assert "pooler" in restored  # freshly initialised for the classifier
    _same_tree({k: v for k, v in restored.items() if k != "pooler"}, saved)


@pytest.mark.parametrize("task", ["sequence", "token"])
def test_task_heads_are_named_and_can_be_dropped(hf, tmp_path, caplog, capsys, task):
    """A fine-tuned transformers model (BertForSequenceClassification: encoder, pooler and
    classifier.*; BertForTokenClassification: no pooler) is refused naming its head's
    weights and the flag that drops them; with it, the encoder imports unchanged."""
    from safetensors.numpy import load_file, save_file

    from flaxbert import cli

    *_, st_dir = hf
    heads = ("pooler",) if task == "sequence" else ()
    weights = load_file(st_dir / "model.safetensors")
    keep = ("bert.embeddings.", "bert.encoder.") + (("bert.pooler.",) if heads else ())
    weights = {k: v for k, v in weights.items() if k.startswith(keep)}
    weights["classifier.weight"] = np.ones((3, 32), np.float32)
    weights["classifier.bias"] = np.zeros(3, np.float32)
    directory = tmp_path / f"{task}-uncased"
    directory.mkdir()
    save_file(weights, directory / "model.safetensors")
    for name in ("config.json", "vocab.txt"):
        shutil.copy(st_dir / name, directory / name)

    with pytest.raises(ConversionError) as e:
        import_hf(str(directory), str(tmp_path / "x"))
    message = str(e.value)
    assert "classifier.bias" in message and "classifier.weight" in message
    assert "--drop-unknown" in message and "not a BERT with" not in message
    assert not (tmp_path / "x").exists()

    with caplog.at_level(logging.WARNING, logger="flaxbert"):
        result = import_hf(str(directory), str(tmp_path / "out"), drop_unknown=True)
    assert result.dropped == ["classifier.bias", "classifier.weight"]
    assert result.heads == list(heads)
    assert "left out 2 weight(s)" in caplog.text and "classifier.weight" in caplog.text
    full = read_params(import_hf(str(st_dir), str(tmp_path / "full")).workdir)
    expected = {k: v for k, v in full["bert"].items() if k != "pooler" or heads}
    _same_tree(read_params(result.workdir), {"bert": expected})
    meta = ckpt.read_meta(result.workdir)[1]
    assert meta["converted_from"]["dropped"] == ["classifier.bias", "classifier.weight"]

    # The command line: refused with status 2 naming the flag, then taken with it.
    assert cli.main(["convert", "--from-hf", str(directory), "--workdir", str(tmp_path / "c")]) == 2
    assert "--drop-unknown" in capsys.readouterr().err
    argv = ["convert", "--from-hf", str(directory), "--workdir", str(tmp_path / "c")]
    assert cli.main([*argv, "--drop-unknown"]) == 0
    _same_tree(read_params(tmp_path / "c"), {"bert": expected})

    # A weight unknown inside the encoder is never dropped: that model is not BERT.
    weights["bert.encoder.layer.0.attention.self.rotary.weight"] = np.zeros(2, np.float32)
    save_file(weights, directory / "model.safetensors")
    with pytest.raises(ConversionError, match="(?s)not a BERT with 2 layers.*rotary"):
        import_hf(str(directory), str(tmp_path / "y"), drop_unknown=True)


def test_paths_are_taken_as_users_type_them(hf, tmp_path, monkeypatch):
    """Relative paths, `~`, trailing slashes, and a workdir, its checkpoints/ or one step
    directory: read_params, import, export and extract-features take each."""
    from flaxbert.features import extract_features

    *_, st_dir = hf
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    shutil.copytree(st_dir, home / "bert-uncased")
    monkeypatch.chdir(home)

    first = import_hf("~/bert-uncased/", "~/run")  # ~ and a trailing slash
    assert first.workdir == str(home / "run")
    second = import_hf("bert-uncased", "run2/")  # relative
    assert second.workdir == str(home / "run2")
    expected = read_params(str(home / "run/checkpoints/0"))
    for given in (
        "run",
        "run/",
        "./run",
        "~/run",
        "run/checkpoints",
        "run/checkpoints/",
        "run/checkpoints/0",
        "~/run/checkpoints/0/",
        home / "run",
    ):
        _same_tree(read_params(given), expected)
    with pytest.raises(ckpt.CheckpointNotFoundError, match="no flaxbert checkpoint"):
        read_params("nowhere")

    lines = home / "lines.txt"
    lines.write_text("hello world\n", encoding="utf-8")
    for i, given in enumerate(("run/checkpoints/", "~/run/checkpoints/0", "./run/")):
        out = export_hf(given, f"~/hf{i}/")
        assert out.out_dir == str(home / f"hf{i}") and (home / f"hf{i}/model.safetensors").exists()
        summary = extract_features(given, "~/lines.txt", f"~/feat{i}")
        assert summary["npy"] == str(home / f"feat{i}.npy") and summary["rows"] == 4
    assert (home / "hf0/model.safetensors").read_bytes() == (
        home / "hf2/model.safetensors"
    ).read_bytes()


def test_sentencepiece_export_imports_back(hf, tmp_path):
    """A SentencePiece checkpoint -> convert --to-hf -> convert --from-hf: the same
    parameters and the same tokenizer (the same ids for the same text)."""
    *_, st_dir = hf
    workdir, _, params = _sentencepiece_workdir(st_dir, tmp_path)
    assert export_hf(str(workdir), str(tmp_path / "hf")).tokenizer == "sentencepiece"
    result = import_hf(str(tmp_path / "hf"), str(tmp_path / "back"))
    assert result.tokenizer == "sentencepiece" and result.casing is None
    assert result.heads == ["pooler", "mlm", "nsp"]
    _same_tree(read_params(result.workdir), params)
    original = load_tokenizer(ckpt.tokenizer_of(str(workdir)))
    back = load_tokenizer(ckpt.tokenizer_of(result.workdir))
    assert isinstance(back, Tokenizer)
    text = "w7q w20q w33q unseen words w499q"
    assert back.encode(text).tolist() == original.encode(text).tolist()
    assert len(back.encode(text)) > 5
    # And out again: the same files.
    export_hf(result.workdir, str(tmp_path / "hf2"))
    for name in ("model.safetensors", "tokenizer.model"):
        assert (tmp_path / "hf2" / name).read_bytes() == (tmp_path / "hf" / name).read_bytes()


def _en_documents(path, lines):
    """The first `lines` lines of the shared English corpus, a document every 20 lines."""
    text = corpus_head("en_gutenberg.txt", lines, path).read_text(encoding="utf-8").splitlines()
    doc = "".join(line + ("\n\n" if i % 20 == 19 else "\n") for i, line in enumerate(text))
    path.write_text(doc, encoding="utf-8")
    return path


def test_continued_pretraining_starts_from_the_converted_model(hf, repo_root, tmp_path, caplog):
    """`flaxbert pretrain --config.init_from=CONVERTED` on a slice of a shared corpus: the
    structure, tokenizer, encoder and MLM/NSP heads are the converted model's (the first
    training loss is its loss on the first batch, not a random model's), the optimizer and
    the step start fresh, and nothing is written into the converted directory."""
    from flaxbert.continued import continued_config
    from flaxbert.data.sources import load_corpus
    from flaxbert.pretrain_step import init_params, pretraining_sums, summarise
    from flaxbert.train import make_train_batches, parallel_from_config, pretrain

    _, _, msgpack_dir, _ = hf
    converted = import_hf(str(msgpack_dir), str(tmp_path / "converted"))
    before = {str(p): p.stat().st_mtime_ns for p in (tmp_path / "converted").rglob("*")}
    corpus = _en_documents(tmp_path / "en.txt", 600)
    overrides = [
        f"--config.init_from={converted.workdir}",
        f"--config.data.corpus={corpus}",
        "--config.data.max_seq_length=32",
        "--config.data.max_predictions_per_seq=5",
        "--config.data.validation_fraction=0.2",
        "--config.train.num_steps=2",
        "--config.train.batch_size=8",
        "--config.train.warmup_steps=1",
        "--config.train.log_every=1",
        "--config.eval.every_steps=0",
        "--config.eval.num_batches=1",
        "--config.eval.batch_size=8",
        "--config.checkpoint.async_save=False",
    ]
    # tiny is hidden 128; the checkpoint's 32 (and its vocabulary) win, as nothing named them.
    config = load_config(str(repo_root / "configs/pretrain.py") + ":tiny", overrides)
    caplog.set_level(logging.INFO)
    workdir = tmp_path / "continued"
    result = pretrain(config, str(workdir), explicit=override_keys(overrides))
    assert (result.start_step, result.final_step) == (0, 2)
    built = json.loads((workdir / "config.json").read_text())["model"]
    assert (built["hidden_size"], built["num_layers"], built["vocab_size"]) == (32, 2, VOCAB_SIZE)
    assert (workdir / "vocab.txt").read_bytes() == (tmp_path / "converted/vocab.txt").read_bytes()
    assert "freshly initialised: nothing" in caplog.text
    after = {str(p): p.stat().st_mtime_ns for p in (tmp_path / "converted").rglob("*")}
    assert after == before  # the checkpoint directory is only read

    # The first logged loss is the converted model's loss on batch 0 (dropout is off in tiny).
    resolved = continued_config(config)
    model_config = ckpt.model_config_of(ckpt.read_meta(converted.workdir)[1], dropout=False)
    model = BertForPreTraining(model_config)
    data = load_corpus(resolved.data, str(workdir))
    batches = make_train_batches(resolved, data, parallel_from_config(resolved, model_config))
    batch = {k: jax.numpy.asarray(v) for k, v in batches.batch(0).items()}

    def loss(params):
        return float(summarise(pretraining_sums(model, params, batch, deterministic=True))["loss"])

    first = json.loads((workdir / "metrics.jsonl").read_text().splitlines()[0])
    assert first["step"] == 1
    converted_loss = loss(read_params(converted.step_dir))
    random_loss = loss(init_params(model, jax.random.key(0), 32, 5))
    assert abs(first["loss"] - converted_loss) < 1e-4, (first["loss"], converted_loss)
    assert abs(random_loss - converted_loss) > 0.02, (random_loss, converted_loss)

    # Re-run with more steps: it resumes from its own checkpoint, without the source.
    shutil.move(tmp_path / "converted", tmp_path / "moved")
    more = [o for o in overrides if "num_steps" not in o] + ["--config.train.num_steps=3"]
    config = load_config(str(repo_root / "configs/pretrain.py") + ":tiny", more)
    resumed = pretrain(config, str(workdir), explicit=override_keys(more))
    assert (resumed.start_step, resumed.final_step) == (2, 3)
    shutil.move(tmp_path / "moved", tmp_path / "converted")

    # A structural key named on the command line must agree with the checkpoint.
    named = [*overrides, "--config.model.hidden_size=128"]
    with pytest.raises(ConfigError, match="model.hidden_size=128 but the checkpoint has 32"):
        pretrain(
            load_config(str(repo_root / "configs/pretrain.py") + ":tiny", named),
            str(tmp_path / "other"),
            explicit=override_keys(named),
        )
