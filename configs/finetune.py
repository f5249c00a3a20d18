"""Fine-tuning on a task, from a pre-trained flaxbert encoder or from random initialisation.

Run:
    flaxbert finetune --config configs/finetune.py:nsmc --workdir runs/nsmc \
        --config.init_from=runs/mini-ko
    flaxbert finetune --config configs/finetune.py:sst2,mini --workdir runs/sst2-random \
        --config.data.tokenizer=runs/mini-en/tokenizer.model

The argument is `TASK[,VARIANT]`: a task preset (nsmc, korsts, kornli, klue_ner, sst2, cola,
mrpc, rte, stsb, wikiann_en, wnut17, squad_v1 — files in ../shared/data/tasks, see
flaxbert.data.tasks.TASK_PRESETS) and a model size (default mini) that matters only for random
initialisation: from a checkpoint (init_from) the model's structure (sizes, layers, heads,
positions, layer layout, LayerNorm placement) is the checkpoint's, so `configs/finetune.py:TASK`
works from a tiny, mini or base checkpoint alike; a structural key named on the command line
that disagrees with the checkpoint stops the run, naming it.
A new task needs only a config: set `kind`, `metrics`, `main_metric`, `data.reader.*`,
`data.label_list` and the files (a path or `tfds:NAME[:SPLIT]`).

Expect: see the README's "Does pre-training pay?" table for measured NSMC and SST-2 numbers.
"""

import os

import ml_collections

from flaxbert.data.tasks import TASK_PRESETS
from flaxbert.model_config import variant_structure

TASKS_DIR = os.path.join(
    os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data", "tasks"
)
# Preset keys that are not the reader's.
_TASK_KEYS = ("kind", "metrics", "main_metric", "train_file", "eval_file", "label_list")


def get_config(arg: str = "nsmc") -> ml_collections.ConfigDict:
    task, *rest = arg.split(",")
    variant = rest[0] if rest else "mini"
    if task not in TASK_PRESETS:
        raise ValueError(f"unknown task {task!r}; choose one of {', '.join(TASK_PRESETS)}")
    try:
        structure = variant_structure(variant)
    except KeyError as e:
        raise ValueError(e.args[0]) from None
    preset = dict(TASK_PRESETS[task])
    qa = preset["kind"] == "qa"

    c = ml_collections.ConfigDict()
    c.task = task
    # The model size for random initialisation; from a checkpoint (init_from) the structure is
    # the checkpoint's whatever this says, and only model.* keys named on the command line (or
    # changed from this size's) are checked against it.
    c.variant = variant
    c.kind = preset["kind"]  # classification | regression | token_classification | qa
    c.metrics = preset["metrics"]  # a flaxbert.metrics.TASK_METRICS set, or squad
    c.main_metric = preset["main_metric"]  # picks the best checkpoint (checkpoint.best_mode)
    # A pre-training workdir, its checkpoints/ dir or one checkpoints/STEP dir; '' = random init.
    c.init_from = ""
    c.init_pooler = True  # also restore the pre-trained pooler (used by [CLS] heads)
    # Feature-based use (BERT paper 5.3): train the task head alone on the encoder's outputs;
    # the encoder (`bert`: embeddings, layers, pooler) gets no gradient, no optimizer state and
    # no dropout. Without init_from the features are random (a baseline; the run warns).
    c.freeze_encoder = False

    c.model = ml_collections.ConfigDict()
    c.model.vocab_size = 0  # 0 = the tokenizer's size
    for key in ("hidden_size", "num_layers", "num_heads", "intermediate_size"):
        c.model[key] = structure[key]
    c.model.max_position_embeddings = structure["max_position_embeddings"]
    c.model.type_vocab_size = structure["type_vocab_size"]
    c.model.hidden_dropout_rate = 0.1
    c.model.attention_dropout_rate = 0.1
    c.model.initializer_range = 0.02
    c.model.layer_norm_eps = 1e-12
    c.model.dtype = "float32"
    c.model.param_dtype = "float32"
    c.model.attention_impl = ""
    c.model.remat = ""  # '' | full | dots (activation checkpointing)
    c.model.scan_layers = False  # from init_from: the checkpoint's layout
    c.model.pre_layer_norm = structure["pre_layer_norm"]  # from init_from: the checkpoint's

    c.data = ml_collections.ConfigDict()
    folder = os.path.join(TASKS_DIR, task)
    c.data.train_file = os.path.join(folder, preset["train_file"])
    c.data.eval_file = os.path.join(folder, preset["eval_file"])
    c.data.test_file = ""  # optional final evaluation (of the best checkpoint): test/<metric>
    c.data.train_limit = 0  # 0 = every example; N = the first N (quick runs, benchmarks)
    c.data.eval_limit = 0
    c.data.tokenizer = ""  # without init_from: a SentencePiece model; with it, the checkpoint's
    c.data.label_list = preset.get("label_list", "")  # comma-separated; '' for regression / QA
    c.data.max_seq_length = 384 if qa else 128
    c.data.doc_stride = 128  # QA: stride of the sliding windows over a long context
    c.data.max_query_length = 64  # QA
    c.data.max_answer_length = 30  # QA, in tokens
    c.data.n_best_size = 20  # QA
    # Sequence packing of training batches ([CLS] tasks): several examples per row, each
    # attending only to itself; train.batch_size then counts rows. Evaluation is unpacked.
    c.data.packing = False
    c.data.max_pairs_per_row = 4
    c.data.reader = ml_collections.ConfigDict(
        {k: v for k, v in preset.items() if k not in _TASK_KEYS and k != "label_list"}
    )
    c.data.reader.label_list = c.data.label_list
    c.data.reader.skip_bad_rows = False  # True: bad rows are counted and reported, not fatal

    c.train = ml_collections.ConfigDict()
    c.train.num_epochs = 3.0
    c.train.num_steps = 0  # 0 = num_epochs over the training set
    c.train.batch_size = 32
    c.train.grad_accum_steps = 1  # micro-batches per update; batch_size must divide by it
    c.train.learning_rate = 1e-4 if variant in ("tiny", "mini", "cpu30") else 3e-5
    c.train.warmup_fraction = 0.1
    c.train.lr_decay = "linear"
    c.train.lr_decay_power = 1.0
    c.train.end_learning_rate = 0.0
    c.train.optimizer = "adamw"
    c.train.weight_decay = 0.01
    c.train.adam_b1 = 0.9
    c.train.adam_b2 = 0.999
    c.train.adam_eps = 1e-6
    c.train.max_grad_norm = 1.0
    c.train.seed = 0
    c.train.log_every = 50
    c.train.nonfinite = "stop"  # stop | skip
    c.train.max_consecutive_nonfinite = 10

    c.eval = ml_collections.ConfigDict()
    c.eval.every_steps = 0  # 0 = every epoch
    c.eval.batch_size = 64

    c.parallel = ml_collections.ConfigDict()
    c.parallel.strategy = "pjit"
    c.parallel.data = -1
    c.parallel.fsdp = 1
    c.parallel.tensor = 1
    c.parallel.rules = ""

    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.keep = 1  # the latest, plus the best by main_metric
    # max | min: which end of main_metric is best; '' = min for a loss or error, else max.
    c.checkpoint.best_mode = ""
    c.checkpoint.async_save = True
    c.checkpoint.dir = ""
    c.lock()
    return c
