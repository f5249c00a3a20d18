"""Checkpoint save cost: how long training waits (the blocking part) against the whole save,
and the size on disk, for a config's full train state (parameters + AdamW moments).

    python benchmarks/checkpoint_save.py                 # base (vocab 30522), 3 saves, temp dir
    python benchmarks/checkpoint_save.py --variant large --saves 2 --dir /scratch/ck

It builds the state exactly as training does (`flaxbert.train.setup_training`, one device
unless more are visible), then saves it `--saves` times through `flaxbert.checkpoint.
Checkpoints` (orbax CheckpointManager, asynchronous) and prints one row per save:
`blocking` is the time `save()` holds the caller (the device-to-host copy and setup);
`total` runs until the files are committed (`wait_until_finished`). The first save also
pays for creating the directory and warming orbax up; later rows are the steady state.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def du(path: str) -> int:
    return sum(
        os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(path) for f in files
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--variant", default="base")
    p.add_argument("--saves", type=int, default=3)
    p.add_argument(
        "--vocab-size", type=int, default=30522, help="default: BERT's English WordPiece vocabulary"
    )
    p.add_argument("--dir", default="", help="where to write (default: a temporary directory)")
    args = p.parse_args()

    sys.path.insert(0, REPO)
    import jax

    from flaxbert import checkpoint as ckpt
    from flaxbert import train
    from flaxbert.config import load_config

    config = load_config(
        os.path.join(REPO, "configs/pretrain.py") + f":{args.variant}",
        [f"--config.model.vocab_size={args.vocab_size}"],
    )
    model_config = train.validate_pretrain_config(config)
    setup = train.setup_training(config, model_config)
    state = setup.create_state(jax.random.key(0))
    # Moments as after real training: fresh AdamW moments are zeros, which compress to nothing
    # and would understate both the size and the time.
    keys = iter(jax.random.split(jax.random.key(1), len(jax.tree.leaves(state.opt_state))))
    state = state.replace(
        opt_state=jax.tree.map(
            lambda x: (
                jax.random.normal(next(keys), x.shape, x.dtype) * 1e-3
                if jax.numpy.issubdtype(x.dtype, jax.numpy.floating) and x.ndim
                else x
            ),
            state.opt_state,
        )
    )
    jax.block_until_ready(state)
    view = setup.parallel.to_checkpoint(state)
    n_params = sum(x.size for x in jax.tree.leaves(state.params))
    n_state = sum(x.size for x in jax.tree.leaves(state.params) + jax.tree.leaves(state.opt_state))

    root = args.dir or tempfile.mkdtemp(prefix="flaxbert-ckpt-bench-")
    directory = os.path.join(root, "checkpoints")
    shutil.rmtree(directory, ignore_errors=True)
    checkpoints = ckpt.Checkpoints(directory, keep=args.saves)
    print(
        f"{args.variant}: {n_params / 1e6:.1f}M parameters, {n_state / 1e6:.1f}M values in the "
        f"train state; {jax.device_count()} {jax.devices()[0].platform} device(s); "
        f"writing to {directory}"
    )
    print("| save | blocking (s) | total (s) | blocking / total | size (MiB) |")
    print("|---:|---:|---:|---:|---:|")
    for i in range(1, args.saves + 1):
        start = time.perf_counter()
        blocking = checkpoints.save(i, view.params, view.opt_state, {"step": i})
        checkpoints.wait()
        total = time.perf_counter() - start
        size = du(os.path.join(directory, str(i))) / 2**20
        print(f"| {i} | {blocking:.2f} | {total:.2f} | {blocking / total:.0%} | {size:.0f} |")
    checkpoints.close()
    if not args.dir:
        shutil.rmtree(root)


if __name__ == "__main__":
    main()
