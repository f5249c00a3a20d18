"""SST-2 fine-tuning sweep: learning rate x seed (3 x 3 = 9 runs), from one pre-trained encoder.

Run (the encoder comes from a pre-training workdir; without init_from, give a tokenizer and
every run starts from random weights):
    flaxbert sweep --config configs/sweeps/sst2_lr_seed.py:sst2,mini --workdir runs/sst2-sweep \
        --config.init_from=runs/mini-en
    flaxbert sweep --config configs/sweeps/sst2_lr_seed.py --workdir runs/sst2-sweep \
        --config.data.tokenizer=runs/mini-en/tokenizer.model --parallel 2
    flaxbert sweep ... --dry-run            # print the 9 commands
    flaxbert sweep ... --emit slurm         # write runs/sst2-sweep/sweep.sbatch
    flaxbert sweep-summary runs/sst2-sweep  # the tables and plot, finished or not

The argument is configs/finetune.py's `TASK[,VARIANT]` (default sst2,mini), so the same
sweep runs on any task preset. Each point runs in runs/sst2-sweep/lr=3e-05,seed=0 etc.

Expect: runs/sst2-sweep/summary.md with one row per point (eval/accuracy, the best epoch's
accuracy, wall time) and the mean ± standard deviation of each learning rate over the three
seeds; summary.png plots eval/accuracy against the learning rate. A full run (67k training
examples, 3 epochs) takes hours on a 2-core CPU; for a quick look add
--config.data.train_limit=5000 --config.train.num_epochs=2 --config.data.max_seq_length=64
(about 4 minutes a run there, from the README's "Does pre-training pay?" measurements).
"""

import os

from flaxbert.config import load_module
from flaxbert.sweeps.points import grid

_FINETUNE = load_module(
    os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "finetune.py")
)


def get_config(arg: str = "sst2,mini"):
    return _FINETUNE.get_config(arg)


def get_sweep(arg: str = "sst2,mini"):
    return grid(**{"train.learning_rate": [3e-5, 1e-4, 3e-4], "train.seed": [0, 1, 2]})
