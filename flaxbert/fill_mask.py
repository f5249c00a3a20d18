"""`flaxbert fill-mask`: what a checkpoint's masked-LM head predicts, a probe of what it learned.

Each text is encoded as [CLS] text [SEP] (one segment) with the checkpoint's own tokenizer
(the SentencePiece model of a pre-training workdir, or the WordPiece vocab.txt that
`flaxbert convert` writes). Every literal `[MASK]` (these six characters exactly, upper
case, anywhere in the text) becomes the mask id: the text is split at each `[MASK]` and the
pieces between them are tokenized one by one, so a `[MASK]` also ends the word before it and
starts a new one after it (`un[MASK]` is `un` then a mask, never a `##` continuation). The
masked-LM head then gives, for every mask, a softmax over the whole vocabulary; the top-k
pieces are printed with their probabilities:

    text 1: the movie was [MASK] .
      [MASK] 1: good 0.412 | great 0.103 | bad 0.051

With --json, one JSON object per text instead: {"text", "tokens" (the input's pieces, [CLS]
and [SEP] included), "masks": [{"position" (index into tokens), "predictions": [{"piece",
"id", "probability"}, ...]}]}.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

import numpy as np

from flaxbert.config import UserError

MASK_TEXT = "[MASK]"


class FillMaskError(UserError, ValueError):
    """An input or flag `fill-mask` cannot use; the message says which and what to do."""


@dataclasses.dataclass
class Prediction:
    piece: str
    id: int
    probability: float


@dataclasses.dataclass
class MaskResult:
    position: int  # index into FilledText.tokens
    predictions: list[Prediction]  # top-k, most probable first


@dataclasses.dataclass
class FilledText:
    text: str
    tokens: list[str]  # the model's input pieces, [CLS] and [SEP] included
    masks: list[MaskResult]

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def encode_masked(tokenizer, text: str, number: int, max_length: int) -> np.ndarray:
    """[CLS] text [SEP] as int32 ids (L,), each literal `[MASK]` replaced by the mask id and
    the text between masks tokenized normally. `number` (1-based) names the text in errors."""
    from flaxbert.tokenizer import CLS_ID, MASK_ID, SEP_ID

    parts = text.split(MASK_TEXT)
    if len(parts) == 1:
        raise FillMaskError(
            f"text {number} ({_short(text)!r}) has no {MASK_TEXT}: write {MASK_TEXT} (upper "
            "case, with the brackets) where the model should fill in a piece"
        )
    ids = [CLS_ID]
    for i, part in enumerate(parts):
        if i:
            ids.append(MASK_ID)
        if part.strip():
            ids += [int(t) for t in tokenizer.encode(part)]
    ids.append(SEP_ID)
    if len(ids) > max_length:
        raise FillMaskError(
            f"text {number} ({_short(text)!r}) is {len(ids)} tokens with [CLS] and [SEP], "
            f"more than the model's max_position_embeddings={max_length}; shorten it"
        )
    return np.asarray(ids, np.int32)


def _short(text: str, n: int = 40) -> str:
    return text if len(text) <= n else text[: n - 3] + "..."


def fill_mask(checkpoint: str, texts: list[str], top_k: int = 5) -> list[FilledText]:
    """The top-`top_k` pieces and their probabilities at every `[MASK]` of each text (see the
    module doc), predicted by the masked-LM head of `checkpoint` (a workdir, its
    checkpoints/ or one step directory; pre-training or converted, pooler and NSP head or
    not). Raises FillMaskError (a text or flag it cannot use, no tokenizer, no MLM head) or
    CheckpointNotFoundError (no checkpoint at `checkpoint`); both are UserErrors."""
    import jax

    from flaxbert import checkpoint as ckpt
    from flaxbert.tokenizer import MASK_ID

    if not texts:
        raise FillMaskError("no text given: pass one or more texts holding [MASK]")
    checkpoint = os.path.abspath(os.path.expanduser(checkpoint))
    step_dir, meta = ckpt.read_meta(checkpoint)
    config = ckpt.model_config_of(meta, dropout=False)
    if not 1 <= top_k <= config.vocab_size:
        raise FillMaskError(
            f"--top-k {top_k}: give 1..{config.vocab_size} (the model's vocabulary size)"
        )
    tokenizer = _load_tokenizer(checkpoint, step_dir)
    ids = [
        encode_masked(tokenizer, text, n, config.max_position_embeddings)
        for n, text in enumerate(texts, start=1)
    ]
    model, params = _load_mlm_model(step_dir, config)
    input_ids_BL, input_mask_BL = _pad(ids, config.max_position_embeddings)
    top_pieces = _top_pieces_fn(model, top_k)
    probs_BLK, ids_BLK = jax.device_get(top_pieces(params, input_ids_BL, input_mask_BL))

    def piece(i: int) -> str:
        return tokenizer.id_to_piece(i) if i < tokenizer.vocab_size else f"<id {i}>"

    results = []
    for b, (text, x) in enumerate(zip(texts, ids, strict=True)):
        masks = [
            MaskResult(
                position=int(p),
                predictions=[
                    Prediction(piece(int(i)), int(i), float(q))
                    for i, q in zip(ids_BLK[b, p], probs_BLK[b, p], strict=True)
                ],
            )
            for p in np.flatnonzero(x == MASK_ID)
        ]
        results.append(FilledText(text, [piece(int(i)) for i in x], masks))
    return results


def _load_tokenizer(checkpoint: str, step_dir: str):
    """The tokenizer `checkpoint` was trained with; FillMaskError when it has none or it
    cannot be read."""
    from flaxbert import checkpoint as ckpt
    from flaxbert.tokenizer import load_tokenizer

    tokenizer_path = ckpt.tokenizer_of(checkpoint)
    if not tokenizer_path:
        raise FillMaskError(
            f"{step_dir} has no tokenizer (pre-trained on the embedded synthetic corpus, "
            "whose ids no text can spell); use a workdir pre-trained on text or converted"
        )
    try:
        return load_tokenizer(tokenizer_path)
    except (ValueError, FileNotFoundError) as e:
        raise FillMaskError(f"the tokenizer of {step_dir}: {e}") from None


def _load_mlm_model(step_dir: str, config):
    """(the BertForPreTraining that fits the checkpoint in `step_dir`, its parameters on the
    host); FillMaskError when it has no masked-LM head."""
    from flaxbert import checkpoint as ckpt
    from flaxbert.pretraining_model import BertForPreTraining, heads_of

    params = ckpt.host_params(step_dir)
    if "mlm" not in heads_of(params):
        raise FillMaskError(
            f"{step_dir} has no masked-LM head (it holds "
            f"{', '.join(heads_of(params)) or 'the encoder only'}, as a converted BertModel "
            "does): fill-mask needs the head that predicts pieces"
        )
    return BertForPreTraining.for_params(config, params), params


def _pad(ids: list[np.ndarray], max_length: int) -> tuple[np.ndarray, np.ndarray]:
    """(input_ids_BL, input_mask_BL) int32 of the texts' ids, padded to a multiple of 8
    tokens (at most `max_length`): texts of similar length share one compiled program."""
    length = -(-max(len(x) for x in ids) // 8) * 8
    length = min(length, max_length)
    input_ids_BL = np.zeros((len(ids), length), np.int32)
    for b, x in enumerate(ids):
        input_ids_BL[b, : len(x)] = x
    lengths_B1 = np.asarray([[len(x)] for x in ids])
    input_mask_BL = (np.arange(length)[None] < lengths_B1).astype(np.int32)
    return input_ids_BL, input_mask_BL


def _top_pieces_fn(model, top_k: int):
    """The jitted `(params, input_ids_BL, input_mask_BL) -> (probabilities, ids)`, each
    (B, L, K): the `top_k` most probable pieces at every position, one segment."""
    import jax
    import jax.numpy as jnp

    from flaxbert.pretraining_model import BertForPreTraining

    @jax.jit
    def top_pieces(params, input_ids_BL, input_mask_BL):
        logits_BLV = model.apply(
            {"params": params},
            input_ids_BL,
            input_mask_BL,
            jnp.zeros_like(input_ids_BL),
            method=BertForPreTraining.all_position_mlm_logits,
        )
        probs_BLV = jax.nn.softmax(logits_BLV.astype(jnp.float32), axis=-1)
        return jax.lax.top_k(probs_BLV, top_k)  # (B, L, K) probabilities and ids

    return top_pieces


def format_probability(p: float) -> str:
    """0.412; small ones in scientific notation, so that none prints as 0.000."""
    return f"{p:.3f}" if p >= 0.0005 else f"{p:.1e}"


def format_text(number: int, result: FilledText) -> str:
    lines = [f"text {number}: {result.text}"]
    for m, mask in enumerate(result.masks, start=1):
        row = " | ".join(f"{x.piece} {format_probability(x.probability)}" for x in mask.predictions)
        lines.append(f"  {MASK_TEXT} {m}: {row}")
    return "\n".join(lines)


def add_fill_mask_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "fill-mask",
        help="print the pieces a checkpoint's masked-LM head predicts for each [MASK] of a text",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--workdir",
        required=True,
        help="a flaxbert workdir (pre-training or `flaxbert convert`), checkpoints/ or step dir",
    )
    p.add_argument("texts", nargs="+", metavar="TEXT", help="a text holding [MASK] at least once")
    p.add_argument("--top-k", type=int, default=5, help="pieces shown per mask (default 5)")
    p.add_argument("--json", action="store_true", help="one JSON object per text")
    return p


def run_fill_mask(args: argparse.Namespace) -> int:
    """Errors propagate as UserErrors: `flaxbert.cli.main` prints them as one line, exit 2."""
    results = fill_mask(args.workdir, args.texts, args.top_k)
    for n, result in enumerate(results, start=1):
        if args.json:
            print(json.dumps(result.to_json(), ensure_ascii=False))
        else:
            print(format_text(n, result))
    sys.stdout.flush()
    return 0
