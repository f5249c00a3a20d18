"""The sweep that chose `configs/pretrain.py:cpu30` (pre-training that pays within half an
hour on a 2-core CPU), in stages of short proxy runs on the Korean corpus.

Run:
    flaxbert sweep --config configs/sweeps/cpu30.py:stage1,corpus=ko --workdir runs/cpu30-s1
    flaxbert sweep-summary runs/cpu30-s1

Stage 1 (`tiny` size, sequence 64, batch 64, dropout 0, 1,200 steps): does the block layout
(post- vs pre-LayerNorm), the learning rate, the masking rate or dropping NSP get the model
off the unigram plateau (held-out `eval/mlm_distinct_predictions` near 0, MLM accuracy stuck
at the share of the most frequent pieces) within a few minutes?
"""

import os

from flaxbert.config import load_module
from flaxbert.sweeps.points import concat, grid

_PRETRAIN = load_module(
    os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "pretrain.py")
)

# Common to every proxy run of stage 1.
_PROXY = {
    "data.max_seq_length": 64,
    "data.max_predictions_per_seq": 10,
    "train.batch_size": 64,
    "train.num_steps": 1200,
    "train.warmup_steps": 100,
    "model.hidden_dropout_rate": 0.0,
    "model.attention_dropout_rate": 0.0,
    "eval.every_steps": 400,
    "checkpoint.every_steps": 0,
    "train.log_every": 100,
}


def get_config(arg: str = "stage1,corpus=ko"):
    stage, *rest = arg.split(",")
    return _PRETRAIN.get_config(",".join(["tiny", *rest]))


def get_sweep(arg: str = "stage1,corpus=ko"):
    stage = arg.split(",")[0]
    if stage != "stage1":
        raise ValueError(f"unknown stage {stage!r}; stage1")
    fixed = [{**_PROXY}]
    # In the order they ran (issue 16's session, 2026-12-01, on a 2-core CPU shared with
    # other jobs: ~15 min a point). The time allowed two whole points and 400 steps of a third
    # (pre-LN at 1e-3, which followed the first point's curve step for step: training loss
    # 8.1733 vs 8.1734 at step 300, held-out MLM accuracy 0.0695 vs 0.0688 at step 400); the
    # post-LN point at the recipe's rate and masking did not run.
    points = concat(
        grid(**{"model.pre_layer_norm": [False], "train.learning_rate": [1e-3]}),
        grid(
            **{
                "model.pre_layer_norm": [True, False],
                "train.learning_rate": [3e-3],
                "data.masked_lm_prob": [0.4],
                "data.max_predictions_per_seq": [26],
            }
        ),
        grid(**{"model.pre_layer_norm": [True], "train.learning_rate": [1e-3]}),
    )
    return [{**fixed[0], **p} for p in points]
