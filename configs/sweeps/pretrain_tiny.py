"""Pre-training sweep: learning rate x model size (tiny, mini) on the embedded corpus.

Run:
    flaxbert sweep --config configs/sweeps/pretrain_tiny.py --workdir runs/pretrain-sweep
    flaxbert sweep --config configs/sweeps/pretrain_tiny.py --workdir runs/pretrain-sweep \
        --config.train.num_steps=300 --parallel 2    # shorter runs, two at a time
    flaxbert sweep --config configs/sweeps/pretrain_tiny.py --workdir runs/pretrain-sweep \
        --emit slurm                                   # a SLURM array job instead
    flaxbert sweep-summary runs/pretrain-sweep

Each point carries its model size as `config_arg` (the argument given to configs/pretrain.py's
get_config), so the sweep varies the config itself, not only overrides: the points run in
runs/pretrain-sweep/tiny,lr=0.001 ... mini,lr=0.003. An argument after the file
(`pretrain_tiny.py:mini,corpus=en`) is ignored by get_sweep; `corpus=...` options belong in
the variants below.

Expect: summary.md with eval/loss, eval/mlm_accuracy and eval/nsp_accuracy per point (final
and best over the run's evaluations) and summary.png with eval/loss against the learning rate
and against the variant. 6 runs of 1000 steps on a 2-core CPU: from the README's timings,
about 3.5 minutes a tiny run (2026-12-01) and, from the mini step's speed-up since the
35 minutes measured before, roughly 25 minutes a mini run (not re-measured).
"""

import os

from flaxbert.config import load_module
from flaxbert.sweeps.points import grid

_PRETRAIN = load_module(
    os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "pretrain.py")
)


def get_config(arg: str = "tiny"):
    return _PRETRAIN.get_config(arg)


def get_sweep():
    return grid(**{"config_arg": ["tiny", "mini"], "train.learning_rate": [3e-4, 1e-3, 3e-3]})
