"""`flaxbert fill-mask`: top-k pieces per [MASK] from a tiny checkpoint converted from a
HuggingFace directory written here (flaxbert parameters -> `params_to_hf` -> safetensors ->
`flaxbert convert`'s `import_hf`), so nothing downloads and no transformers is needed."""

import dataclasses
import json
import logging
import os

import flax.linen as nn
import jax
import numpy as np
import pytest

from flaxbert.cli import main
from flaxbert.convert import hf_config_from_bert, import_hf, params_to_hf
from flaxbert.model_config import BertConfig
from flaxbert.pretraining_model import BertForPreTraining
from flaxbert.tokenizer import SPECIAL_TOKENS, Tokenizer, train_tokenizer

pytestmark = pytest.mark.usefixtures("fast_compiles")

# flaxbert's order: the special pieces at ids 0-4, so the HF directory needs no reordering.
VOCAB = (
    list(SPECIAL_TOKENS)
    + (
        "the a movie film plot was is it and not very good great bad boring fun story end . , "
        "seoul capital korea city of un ##able ##s ##ing"
    ).split()
)
CONFIG = BertConfig(
    vocab_size=len(VOCAB),
    hidden_size=32,
    num_layers=2,
    num_heads=2,
    intermediate_size=64,
    max_position_embeddings=16,
)


def _converted_workdir(tmp, name, favour=None, heads=("pooler", "mlm", "nsp"), sp_model=None):
    """A tiny random BERT with `heads` written as a HuggingFace directory and converted into
    a flaxbert workdir: with the WordPiece VOCAB, or the SentencePiece model `sp_model` (as
    `convert --to-hf` exports one). Piece id `favour` gets an MLM output bias of +30."""
    import shutil

    from safetensors.numpy import save_file

    vocab_size = Tokenizer.load(sp_model).vocab_size if sp_model else len(VOCAB)
    config = dataclasses.replace(CONFIG, vocab_size=vocab_size)
    z = np.zeros((1, 4), np.int32)
    params = BertForPreTraining(config).init(jax.random.key(0), z, z, z, z[:, :1])["params"]
    params = jax.tree.map(np.array, nn.unbox(params))
    if favour is not None:
        params["mlm_output_bias"][favour] = 30.0
    if "nsp" not in heads:
        params.pop("nsp")
    if "mlm" not in heads:
        for group in ("mlm_transform", "mlm_layer_norm", "mlm_output_bias"):
            params.pop(group)
    if "pooler" not in heads:
        params["bert"] = {k: v for k, v in params["bert"].items() if k != "pooler"}
    weights, architecture, _ = params_to_hf(params, config, np.arange(vocab_size))
    hf_dir = tmp / f"{name}-uncased"
    hf_dir.mkdir()
    save_file(weights, hf_dir / "model.safetensors", metadata={"format": "pt"})
    hf_config = hf_config_from_bert(config, architecture, pad_token_id=0, base=None)
    (hf_dir / "config.json").write_text(json.dumps(hf_config))
    if sp_model:
        shutil.copy(sp_model, hf_dir / "tokenizer.model")
    else:
        (hf_dir / "vocab.txt").write_text("".join(p + "\n" for p in VOCAB), encoding="utf-8")
    return import_hf(str(hf_dir), str(tmp / name)).workdir


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return _converted_workdir(tmp_path_factory.mktemp("fill_mask"), "random")


def _fill(capsys, *args):
    """(exit status, stdout, stderr) of `flaxbert fill-mask ARGS`, run in this process."""
    root = logging.getLogger()
    handlers = root.handlers[:]
    try:
        code = main(["fill-mask", *args])
    finally:  # main's basicConfig(force=True) handler writes to capsys's stream, soon closed
        root.handlers[:] = handlers
    out, err = capsys.readouterr()
    return code, out, err


def _rows(out):
    """{text line: [[(piece, probability), ...] per mask]} of the text form."""
    texts = {}
    for line in out.splitlines():
        if line.startswith("text "):
            current = texts.setdefault(line, [])
        else:
            head, _, row = line.partition(": ")
            assert head.strip().startswith("[MASK] "), line
            pairs = [item.rsplit(" ", 1) for item in row.split(" | ")]
            current.append([(piece, float(p)) for piece, p in pairs])
    return texts


def test_top_k_pieces_per_mask(workdir, capsys):
    code, out, _ = _fill(
        capsys,
        "--workdir",
        workdir,
        "the movie was [MASK] .",
        "the [MASK] was very [MASK] !",
        "--top-k",
        "4",
    )
    assert code == 0
    texts = _rows(out)
    assert list(texts) == ["text 1: the movie was [MASK] .", "text 2: the [MASK] was very [MASK] !"]
    assert [len(masks) for masks in texts.values()] == [1, 2]
    for masks in texts.values():
        for row in masks:
            probs = [p for _, p in row]
            assert len(row) == 4 and len({piece for piece, _ in row}) == 4
            assert all(0 < p <= 1 for p in probs) and probs == sorted(probs, reverse=True)
            assert sum(probs) <= 1 + 1e-3  # printed to 3 digits


def test_json_form(workdir, capsys):
    code, out, _ = _fill(capsys, "--workdir", workdir, "[MASK] un[MASK]", "--json", "--top-k", "3")
    assert code == 0
    (result,) = [json.loads(line) for line in out.splitlines()]
    assert result["text"] == "[MASK] un[MASK]"
    assert result["tokens"] == ["[CLS]", "[MASK]", "un", "[MASK]", "[SEP]"]
    assert [m["position"] for m in result["masks"]] == [1, 3]
    for m in result["masks"]:
        probs = [x["probability"] for x in m["predictions"]]
        assert len(probs) == 3 and probs == sorted(probs, reverse=True) and sum(probs) <= 1
        assert all(VOCAB[x["id"]] == x["piece"] for x in m["predictions"])


@pytest.mark.parametrize(
    "args, message",
    [
        (["the movie was good ."], "text 1 ('the movie was good .') has no [MASK]"),
        (["[MASK]", "the film [mask]"], "text 2 ('the film [mask]') has no [MASK]"),
        (["the " * 20 + "[MASK]"], "23 tokens with [CLS] and [SEP], more than the model's"),
        (["[MASK]", "--top-k", "0"], f"--top-k 0: give 1..{len(VOCAB)}"),
        (["[MASK]", "--top-k", str(len(VOCAB) + 1)], f"--top-k {len(VOCAB) + 1}: give 1.."),
    ],
)
def test_user_errors_are_one_line(workdir, capsys, args, message):
    code, out, err = _fill(capsys, "--workdir", workdir, *args)
    assert code == 2 and not out
    assert err.count("\n") == 1 and err.startswith("flaxbert fill-mask: error: "), err
    assert message in err


def test_workdir_without_checkpoint(tmp_path, capsys):
    code, _, err = _fill(capsys, "--workdir", str(tmp_path), "[MASK]")
    assert code == 2 and err.count("\n") == 1 and "no flaxbert checkpoint at" in err


def test_the_prediction_comes_from_the_checkpoint(tmp_path, capsys):
    """The MLM output bias of the checkpoint favours one piece: it is every mask's top-1.
    The checkpoint is a BertForMaskedLM (no pooler, no NSP head): `for_params` runs it."""
    workdir = _converted_workdir(tmp_path, "biased", VOCAB.index("seoul"), heads=("mlm",))
    code, out, _ = _fill(
        capsys, "--workdir", workdir, "[MASK] is the capital of korea", "[MASK] [MASK]", "--json"
    )
    assert code == 0
    results = [json.loads(line) for line in out.splitlines()]
    tops = [m["predictions"][0] for r in results for m in r["masks"]]
    assert len(tops) == 3
    assert all(t["piece"] == "seoul" and t["probability"] > 0.99 for t in tops), tops


def test_sentencepiece_workdir(tmp_path, capsys):
    """A SentencePiece checkpoint: the text around [MASK] is encoded with the model's pieces
    (word-start marks included) and the favoured piece comes back by its SentencePiece name."""
    corpus = tmp_path / "corpus.txt"
    lines = (" ".join(f"w{(i * 7 + j * 13) % 499}q" for j in range(9)) for i in range(600))
    corpus.write_text("\n".join(lines))
    sp = train_tokenizer([str(corpus)], 300, str(tmp_path / "sp"), num_threads=1)
    tokenizer = Tokenizer.load(sp)
    favour = 290  # past the byte pieces: a piece of the corpus
    workdir = _converted_workdir(tmp_path, "sp", favour, sp_model=sp)
    code, out, _ = _fill(capsys, "--workdir", workdir, "w7q [MASK] w13q", "--json")
    assert code == 0
    (result,) = [json.loads(line) for line in out.splitlines()]
    ids = tokenizer.encode("w7q")
    assert result["tokens"][: len(ids) + 1] == ["[CLS]"] + [
        tokenizer.id_to_piece(int(i)) for i in ids
    ]
    assert result["tokens"][len(ids) + 1] == "[MASK]" and result["tokens"][-1] == "[SEP]"
    top = result["masks"][0]["predictions"][0]
    assert top["id"] == favour and top["piece"] == tokenizer.id_to_piece(favour)


def test_workdir_without_tokenizer(tmp_path, capsys):
    workdir = _converted_workdir(tmp_path, "gone")
    os.remove(os.path.join(workdir, "vocab.txt"))
    code, _, err = _fill(capsys, "--workdir", workdir, "[MASK]")
    assert code == 2 and err.count("\n") == 1 and "tokenizer" in err and "is gone" in err


def test_workdir_without_mlm_head(tmp_path, capsys):
    workdir = _converted_workdir(tmp_path, "encoder", heads=())  # a transformers BertModel
    code, _, err = _fill(capsys, "--workdir", workdir, "[MASK]")
    assert code == 2 and err.count("\n") == 1 and "has no masked-LM head" in err
