"""`flaxbert extract-features`: the feature-based use of a pre-trained encoder.

Each input line (a text, or `TEXT_A ||| TEXT_B` for a pair) is encoded as [CLS] A [SEP]
(B [SEP]) and run through the encoder of any flaxbert checkpoint (pre-training, fine-tuning,
or converted). The hidden states of the chosen layers (-1 = the last; 0 = the embedding
output) are concatenated per token and written as one float32 matrix `OUT.npy`, with
`OUT.jsonl` saying, per input line, its token ids and pieces and which rows hold it:

    per token (--pooling none): rows [start, end) of OUT.npy, one per token incl. [CLS]/[SEP]
    pooled (--pooling cls|mean): one row per line, the [CLS] vector or the mean over tokens
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

import numpy as np

log = logging.getLogger("flaxbert")

PAIR_SEPARATOR = " ||| "


def read_lines(path: str) -> list[tuple[str, str | None]]:
    texts = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            line = line.rstrip("\n")
            a, sep, b = line.partition(PAIR_SEPARATOR)
            if not a.strip() or (sep and not b.strip()):
                raise ValueError(
                    f"{path}:{number}: empty text; every line must hold a text (or "
                    f"'A{PAIR_SEPARATOR}B' for a pair). Remove the line or fill it in."
                )
            texts.append((a, b if sep else None))
    if not texts:
        raise ValueError(f"{path}: no lines to encode")
    return texts


def parse_layers(spec: str, num_layers: int) -> list[int]:
    """'-1,-2' -> indices into (embedding output, layer 1, ..., layer L)."""
    out = []
    for part in spec.split(","):
        try:
            i = int(part)
        except ValueError:
            raise ValueError(f"--layers {spec!r}: {part!r} is not an integer") from None
        j = i + num_layers + 1 if i < 0 else i
        if not 0 <= j <= num_layers:
            raise ValueError(
                f"--layers {spec!r}: {i} is out of range for a {num_layers}-layer encoder "
                f"(use -{num_layers + 1}..{num_layers}; -1 is the last layer, 0 the embeddings)"
            )
        out.append(j)
    return out


def extract_features(
    checkpoint: str,
    input_file: str,
    output: str,
    layers: str = "-1",
    pooling: str = "none",
    batch_size: int = 32,
    max_seq_length: int = 0,
) -> dict:
    """Writes OUTPUT.npy and OUTPUT.jsonl (see the module doc) for the lines of `input_file`
    run through the encoder of `checkpoint` (a workdir, its checkpoints/ or one step
    directory; any head combination, pooler or not). Returns a summary dict (lines, rows,
    dim, layers, truncated, seconds, npy, index). Raises ValueError (a bad flag or input
    line) or CheckpointNotFoundError (no checkpoint at `checkpoint`)."""
    from flaxbert import checkpoint as ckpt
    from flaxbert.tokenizer import load_tokenizer

    if pooling not in ("none", "cls", "mean"):
        raise ValueError(f"--pooling {pooling!r}: choose none, cls or mean")
    # Paths as a user types them: relative, with ~ or a trailing slash.
    checkpoint, input_file, output = (
        os.path.abspath(os.path.expanduser(p)) for p in (checkpoint, input_file, output)
    )
    step_dir, meta = ckpt.read_meta(checkpoint)
    config = ckpt.model_config_of(meta, dropout=False)
    which = parse_layers(layers, config.num_layers)
    max_seq_length = max_seq_length or min(128, config.max_position_embeddings)
    if max_seq_length > config.max_position_embeddings:
        raise ValueError(
            f"--max-seq-length {max_seq_length} exceeds the model's "
            f"max_position_embeddings={config.max_position_embeddings}"
        )
    tokenizer_path = ckpt.tokenizer_of(checkpoint)
    if not tokenizer_path:
        raise ValueError(f"{step_dir} has no tokenizer (pre-trained on the synthetic corpus)")
    tokenizer = load_tokenizer(tokenizer_path)
    texts = read_lines(input_file)

    model, params = _load_encoder(checkpoint, step_dir, config)
    run = _features_fn(model, which, pooling)
    start = time.perf_counter()
    matrix, index, truncated = _run_lines(
        run, params, tokenizer, texts, pooling, batch_size, max_seq_length
    )
    npy, jsonl = _write_features(output, matrix, index)
    summary = {
        "lines": len(texts),
        "rows": int(matrix.shape[0]),
        "dim": int(matrix.shape[1]),
        "layers": which,
        "truncated": truncated,
        "seconds": time.perf_counter() - start,
        "npy": npy,
        "index": jsonl,
    }
    log.info(
        "extract-features: %d lines -> %s (%d x %d, layers %s of %s), index %s%s",
        len(texts),
        npy,
        matrix.shape[0],
        matrix.shape[1],
        layers,
        step_dir,
        jsonl,
        f"; {truncated} lines truncated to {max_seq_length} tokens" if truncated else "",
    )
    return summary


def _load_encoder(checkpoint: str, step_dir: str, config):
    """(BertModel without the pooler, its parameters) of the checkpoint in `step_dir`: only
    the encoder (`bert`) is read, onto the first device, whatever heads the checkpoint has."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from flaxbert import checkpoint as ckpt
    from flaxbert.model import BertModel

    model = BertModel(config, add_pooler=False)
    z = jnp.zeros((1, 8), jnp.int32)
    abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), z, z, z))["params"]
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), nn.unbox(abstract)
    )
    params = ckpt.restore_params(checkpoint, {"bert": abstract}, step_dir=step_dir)["bert"]
    return model, params


def _features_fn(model, which: list[int], pooling: str):
    """The jitted `(params, input_ids, input_mask, segment_ids) -> features`: the hidden
    states of layers `which` concatenated per token, (B, L, X); or pooled, (B, X), by the
    [CLS] vector (`pooling` 'cls') or the mean over the real tokens ('mean')."""
    import jax
    import jax.numpy as jnp

    @jax.jit
    def run(params, input_ids, input_mask, segment_ids):
        out = model.apply(
            {"params": params}, input_ids, input_mask, segment_ids, None, True, all_layers=True
        )
        h_BLX = jnp.concatenate([out.hidden_states[j] for j in which], axis=-1)
        if pooling == "cls":
            return h_BLX[:, 0]
        if pooling == "mean":
            m = input_mask[..., None].astype(h_BLX.dtype)
            return jnp.sum(h_BLX * m, 1) / jnp.maximum(jnp.sum(m, 1), 1.0)
        return h_BLX

    return run


def _run_lines(run, params, tokenizer, texts, pooling: str, batch_size: int, max_seq_length: int):
    """(the features of every line stacked, one row per token or per line (`pooling`); the
    index, one dict per line: its line number, token ids and pieces and its rows [start,
    end); how many lines were truncated) of `texts` run through `run` (`_features_fn`)
    `batch_size` lines at a time."""
    rows, index, n_rows, truncated = [], [], 0, 0
    for b in range(0, len(texts), batch_size):
        chunk = texts[b : b + batch_size]
        batch, encoded, cut = _encode_batch(tokenizer, chunk, batch_size, max_seq_length)
        truncated += cut
        out = np.asarray(run(params, *batch), np.float32)
        for i, ids in enumerate(encoded):
            vectors = out[i, : len(ids)] if pooling == "none" else out[i : i + 1]
            rows.append(vectors)
            index.append(
                {
                    "line": b + i + 1,
                    "token_ids": [int(t) for t in ids],
                    "tokens": [tokenizer.id_to_piece(t) for t in ids],
                    "rows": [n_rows, n_rows + len(vectors)],
                }
            )
            n_rows += len(vectors)
    return np.concatenate(rows), index, truncated


def _encode_batch(tokenizer, chunk, batch_size: int, max_seq_length: int):
    """((input_ids, input_mask, segment_ids), each (batch_size, max_seq_length) int32, rows
    past the chunk's all padding; each line's ids; how many lines were truncated) of
    `chunk`, (text, pair text or None) per line, encoded as [CLS] A [SEP] (B [SEP])."""
    from flaxbert.finetune_tasks import encode_pair

    ids_B = np.zeros((batch_size, max_seq_length), np.int32)
    seg_B = np.zeros_like(ids_B)
    encoded, truncated = [], 0
    for i, (a, pair) in enumerate(chunk):
        ids, segs, cut = encode_pair(tokenizer, a, pair, max_seq_length)
        truncated += cut
        ids_B[i, : len(ids)], seg_B[i, : len(segs)] = ids, segs
        encoded.append(ids)
    lengths = np.zeros((batch_size, 1), np.int32)
    lengths[: len(encoded), 0] = [len(e) for e in encoded]
    mask_B = (np.arange(max_seq_length)[None] < lengths).astype(np.int32)
    return (ids_B, mask_B, seg_B), encoded, truncated


def _write_features(output: str, matrix: np.ndarray, index: list[dict]) -> tuple[str, str]:
    """Writes `matrix` as OUT.npy and `index` as OUT.jsonl (OUT: `output` less a trailing
    .npy), creating the directory; returns the two paths."""
    base = output[:-4] if output.endswith(".npy") else output
    os.makedirs(os.path.dirname(os.path.abspath(base)), exist_ok=True)
    np.save(base + ".npy", matrix)
    with open(base + ".jsonl", "w", encoding="utf-8") as f:
        for row in index:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return base + ".npy", base + ".jsonl"


def add_extract_features_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "extract-features",
        help="write per-token or pooled encoder vectors of a text file (.npy + .jsonl index)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--workdir", required=True, help="a flaxbert workdir, checkpoints/ or step dir")
    p.add_argument("--input", required=True, help="UTF-8 text, one input per line")
    p.add_argument("--output", required=True, help="OUT: writes OUT.npy and OUT.jsonl")
    p.add_argument("--layers", default="-1", help="comma-separated, -1 = last (default -1)")
    p.add_argument(
        "--pooling",
        default="none",
        choices=("none", "cls", "mean"),
        help="none: one row per token (default); cls: the [CLS] vector; mean: the mean over "
        "the tokens, one row per line",
    )
    p.add_argument("--batch-size", type=int, default=32, help="lines per forward pass (32)")
    p.add_argument(
        "--max-seq-length", type=int, default=0, help="default: 128, or less if the model's is"
    )
    return p


def run_extract_features(args) -> int:
    from flaxbert.checkpoint import CheckpointNotFoundError

    try:
        extract_features(
            args.workdir,
            args.input,
            args.output,
            args.layers,
            args.pooling,
            args.batch_size,
            args.max_seq_length,
        )
    except (ValueError, FileNotFoundError, CheckpointNotFoundError) as e:
        print(f"flaxbert extract-features: error: {e}", file=sys.stderr)
        return 2
    return 0
