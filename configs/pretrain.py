"""BERT pre-training (masked LM + next-sentence prediction).

Run:
    flaxbert pretrain --config configs/pretrain.py:tiny --workdir runs/tiny
    flaxbert pretrain --config configs/pretrain.py:base --workdir runs/base \
        --config.data.corpus=... --config.train.batch_size=256

The argument picks a model size, named after Google's compact BERTs (Turc et al., 2019)
and the BERT paper: tiny (L2 H128 A2), mini (L4 H256 A4), small (L4 H512 A8),
medium (L8 H512 A8), base (L12 H768 A12), large (L24 H1024 A16); intermediate size 4H.

Expect: `tiny` on the embedded synthetic corpus (the default, `data.corpus=''`; seq 64 and
no dropout there, see get_config) takes about 100 s of training on a 2-core CPU (96 s,
measured 2026-12-01) and ends with held-out MLM accuracy ~0.58-0.59 and NSP accuracy ~0.89.
`tiny,corpus=ko|en` and `mini,corpus=ko|en` run about half an hour on that CPU (6,000 and
1,500 steps, `CORPUS_STEPS`); `mini` for 750 steps reached MLM 0.11 / 0.14 and NSP 0.47 / 0.54
(Korean / English): real text needs far longer runs than the embedded corpus.
`cpu30,corpus=ko|en` is the CPU half-hour recipe (see `_cpu30`): 28 minutes on that CPU,
held-out MLM 0.158 / 0.285 and NSP 0.51 / 0.63 (Korean / English).
"""

import os

import ml_collections

from flaxbert.model_config import VARIANTS  # name: (layers, hidden, heads)

# corpus=NAME in the argument: the shared corpora beside the repository (../shared/data).
_SHARED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data")
CORPORA = {
    "ko": os.path.join(_SHARED, "corpus", "ko_nsmc_reviews.txt"),
    "en": os.path.join(_SHARED, "corpus", "en_gutenberg.txt"),
}


# Steps of the corpus=ko|en variants of the CPU sizes: about half an hour of pre-training on a
# 2-core CPU, not the 100,000 steps an accelerator run takes (--config.train.num_steps=N for
# longer runs). Measured 2026-12-01 on the Korean corpus, batch 32, seq 128: tiny 129
# sequences/s (0.25 s a step: 6,000 steps ~25 min), mini 30 sequences/s with its compile
# (~1.05 s a step: 1,500 steps ~26 min). cpu30 sets its own (see _cpu30).
CORPUS_STEPS = {"tiny": 6000, "mini": 1500, "cpu30": 5200}


def get_config(arg: str = "tiny") -> ml_collections.ConfigDict:
    """`VARIANT[,corpus=ko|en|PATH]`, e.g. `tiny` or `mini,corpus=ko`."""
    arg, *options = arg.split(",")
    extra = dict(o.split("=", 1) for o in options if "=" in o)
    if arg not in VARIANTS:
        raise ValueError(f"unknown variant {arg!r}; choose one of {', '.join(VARIANTS)}")
    unknown = set(extra) - {"corpus"} or {o for o in options if "=" not in o}
    if unknown:
        raise ValueError(f"unknown option(s) {', '.join(sorted(unknown))}; only corpus=NAME")
    layers, hidden, heads = VARIANTS[arg]
    small = arg in ("tiny", "mini", "cpu30")  # sized for a CPU demo on the embedded corpus
    c = ml_collections.ConfigDict()
    c.variant = arg
    # Continued pre-training: a pre-training or converted workdir (or its checkpoints/STEP)
    # whose encoder and MLM/NSP heads, structure and tokenizer the run starts from, with a
    # fresh optimizer at step 0 (flaxbert.continued). '' = a model from scratch.
    c.init_from = ""

    c.model = ml_collections.ConfigDict()
    # Follows the data's tokenizer unless named on the command line; 512 covers the embedded
    # corpus's word list (up to 16 topics).
    c.model.vocab_size = 512
    c.model.hidden_size = hidden
    c.model.num_layers = layers
    c.model.num_heads = heads
    c.model.intermediate_size = 4 * hidden
    c.model.max_position_embeddings = 512
    c.model.type_vocab_size = 2
    c.model.hidden_dropout_rate = 0.1
    c.model.attention_dropout_rate = 0.1
    c.model.initializer_range = 0.02
    c.model.layer_norm_eps = 1e-12
    c.model.dtype = "float32"  # compute dtype: float32 | bfloat16 | auto (bf16 on GPU/TPU)
    c.model.param_dtype = "float32"
    c.model.attention_impl = ""  # '' = best available; 'xla' | 'cudnn' to force one
    c.model.remat = ""  # '' | full | dots: recompute each block's activations in the backward
    c.model.scan_layers = False  # one nn.scan over the layers: flat compile time in depth
    # Pre-LayerNorm blocks (and a final LayerNorm); False = the paper's post-LayerNorm.
    c.model.pre_layer_norm = False

    c.data = ml_collections.ConfigDict()
    # '' = the embedded synthetic corpus; else a text file or glob (BERT format: a sentence or
    # paragraph per line, blank line between documents), a .jsonl file, tfds:NAME[:SPLIT],
    # or a directory written by `flaxbert prepare`.
    c.data.corpus = ""
    c.data.tokenizer = ""  # SentencePiece .model; trained on first use if it does not exist
    c.data.vocab_size = 8000  # pieces of a tokenizer trained on first use
    c.data.tokenizer_model_type = "unigram"  # unigram | bpe
    # Sentences sampled from the corpus to train that tokenizer; its time grows with them.
    c.data.tokenizer_max_sentences = 300_000
    c.data.cache_dir = ""  # tokenizer + prepared data of raw corpora; '' = WORKDIR/data
    c.data.validation_fraction = 0.01  # documents held out for evaluation
    c.data.text_field = "text"  # JSONL / TFDS text feature
    c.data.errors = "strict"  # strict | replace: undecodable bytes stop the run or become U+FFFD
    c.data.synthetic_documents = 5000  # size of the embedded corpus (train split)
    c.data.synthetic_eval_documents = 500  # its held-out split, generated from other seeds
    c.data.synthetic_topics = 4  # each topic has its own 30 words
    c.data.max_seq_length = 128
    c.data.max_predictions_per_seq = 20
    c.data.masked_lm_prob = 0.15
    c.data.short_seq_prob = 0.1
    c.data.random_next_prob = 0.5
    c.data.mask_token_prob = 0.8
    c.data.random_token_prob = 0.1
    c.data.whole_word_masking = False  # mask all pieces of a word together
    c.data.masking = "dynamic"  # dynamic (fresh masks every step) | static (original recipe)
    c.data.dupe_factor = 10  # static masking: masked copies of each instance
    c.data.prefetch = 4  # batches built ahead on a host thread
    # Sequence packing: several pairs per row (block-diagonal attention, positions and [CLS]
    # per pair), so short pairs do not pay for padding. Each row is filled until fewer than 16
    # positions or no pair slot is left; evaluation batches stay unpacked.
    c.data.packing = False
    c.data.max_pairs_per_row = 4

    c.train = ml_collections.ConfigDict()
    c.train.num_steps = 1000 if small else 100_000
    c.train.batch_size = 32 if small else 256  # global batch, over all devices and hosts
    c.train.learning_rate = {"tiny": 2e-3, "mini": 1e-3}.get(arg, 1e-4)
    c.train.warmup_steps = 100 if small else 10_000
    c.train.lr_decay = "linear"  # linear | polynomial | constant (after warm-up)
    c.train.lr_decay_power = 1.0  # exponent for polynomial decay
    c.train.end_learning_rate = 0.0
    c.train.optimizer = "adamw"  # adamw | lamb
    c.train.weight_decay = 0.01  # not applied to LayerNorm parameters nor biases
    c.train.adam_b1 = 0.9
    c.train.adam_b2 = 0.999
    c.train.adam_eps = 1e-6
    c.train.max_grad_norm = 1.0  # global-norm clipping; 0 turns it off
    c.train.grad_accum_steps = 1  # micro-batches per update; batch_size must divide by it
    c.train.seed = 0
    c.train.nsp_weight = 1.0  # loss = MLM + nsp_weight x NSP; 0 = MLM only (NSP still logged)
    # A non-finite loss or gradient: 'stop' names the step and stops; 'skip' drops the update,
    # counts it (metric skipped_updates) and goes on, stopping after too many in a row. Either
    # way the bad update is never applied, so no checkpoint holds a non-finite state.
    c.train.nonfinite = "stop"
    c.train.max_consecutive_nonfinite = 10
    c.train.log_every = 50

    c.eval = ml_collections.ConfigDict()
    c.eval.every_steps = 500 if small else 10_000
    c.eval.num_batches = 8
    c.eval.batch_size = 64

    c.parallel = ml_collections.ConfigDict()
    c.parallel.strategy = "pjit"  # pjit (jit over a data/fsdp/tensor mesh) | pmap
    c.parallel.data = -1  # mesh axis sizes; -1 takes the remaining devices
    c.parallel.fsdp = 1  # shards parameters + optimizer state (and the batch)
    c.parallel.tensor = 1  # Megatron-style: splits heads, feed-forward units, vocabulary
    # Logical axis -> mesh axes, by precedence, e.g. 'batch=data+fsdp,heads=tensor,mlp=tensor,
    # vocab=tensor,embed=fsdp' (the default, flaxbert.mesh_rules.DEFAULT_RULES, when empty).
    c.parallel.rules = ""

    # Saved (asynchronously) every `every_steps`, at the end and on SIGTERM, into
    # WORKDIR/checkpoints; the same command on the same workdir resumes from the latest.
    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.every_steps = 1000 if small else 10_000  # 0 = only at the end and on SIGTERM
    c.checkpoint.keep = 3  # the latest ones kept
    c.checkpoint.best_metric = ""  # also keep the best by this eval metric, e.g. eval/mlm_loss
    c.checkpoint.best_mode = "max"  # max | min: which end of best_metric is best
    c.checkpoint.async_save = True  # write in the background while training goes on
    c.checkpoint.dir = ""  # '' = WORKDIR/checkpoints

    if "corpus" in extra:
        # Real text: the tokenizer is trained and the corpus prepared on first use, cached in
        # data.cache_dir ('' = WORKDIR/data, never relative to the current directory); set
        # --config.data.cache_dir=DIR to share them between runs on the same corpus.
        name = extra["corpus"]
        if name not in CORPORA and not os.path.exists(name) and not set("/.*:") & set(name):
            raise ValueError(
                f"corpus={name!r} is neither a shared corpus name ({', '.join(CORPORA)}) nor an "
                "existing path; give corpus=ko, corpus=en or corpus=PATH (a text file, a glob, "
                "a .jsonl file, tfds:NAME or a prepared directory)"
            )
        c.data.corpus = CORPORA.get(name, name)
        c.model.vocab_size = c.data.vocab_size
        if extra["corpus"] == "en":  # 39 books: hold out 4 of them
            c.data.validation_fraction = 0.1
        if small:  # sized for a workstation CPU: about half an hour (see CORPUS_STEPS)
            c.train.num_steps = CORPUS_STEPS[arg]
            c.eval.every_steps = c.checkpoint.every_steps = c.train.num_steps // 4
        else:  # accelerators: the paper's scale
            c.train.num_steps = 100_000
            c.eval.every_steps = c.checkpoint.every_steps = 1000

    if arg == "tiny" and "corpus" not in extra:
        # The quick start (README command 1), under two minutes on a 2-core CPU: the embedded
        # corpus's sentences are short, so 64 positions hold a pair (10 predictions = 15%),
        # and 1000 steps on 5000 documents do not overfit, so dropout is off (as in short
        # pre-training runs, Geiping & Goldstein 2022). Measured 2026-12-01: 96 s of training,
        # held-out MLM 0.591, NSP 0.889; at seq 128 with dropout it took 196 s (MLM 0.535).
        c.data.max_seq_length = 64
        c.data.max_predictions_per_seq = 10
        c.model.hidden_dropout_rate = 0.0
        c.model.attention_dropout_rate = 0.0
    if arg == "cpu30":
        _cpu30(c)
    c.lock()
    return c


def _cpu30(c: ml_collections.ConfigDict) -> None:
    """The CPU half-hour recipe, `cpu30,corpus=ko` / `cpu30,corpus=en` (issue 16): at most 30
    minutes of pre-training on a 2-core CPU. Chosen with configs/sweeps/cpu30.py (short proxy
    runs on the Korean corpus; the README's "Does pre-training pay?" has the table):

    - pre-LayerNorm blocks and learning rate 3e-3: of the proxy points it moved furthest off
      the unigram plateau in 1,200 steps (held-out distinct predictions 0.45 vs 0.20 for the
      paper's post-LN block at 1e-3); pre-LN is also what makes a rate this high safe;
    - dropout off: a half-hour run is far from over-fitting a 10M-token corpus;
    - sequences of 64 tokens, batch 64: NSMC reviews and SST-2 sentences are short, and a
      64-token step costs half a 128-token one;
    - 40% of positions masked (26 predictions per sequence; Wettig et al., 2023, "Should You
      Mask 15% in Masked Language Modeling?"): 2.7 times the MLM signal per sequence;
    - 5,200 steps: 0.32 s a step on the 2-core CPU (200 sequences/s), 27.9 minutes measured;
      warm-up 5% of the steps, then linear decay to 0.

    Reaches (measured 2026-12-01): Korean held-out MLM accuracy 0.158 (loss 6.12), NSP 0.51;
    English MLM 0.285 (loss 4.35), NSP 0.63.
    It leaves the unigram plateau only after ~3,000 steps, and NSP stays at chance: the
    encoder it gives does not yet beat random initialisation on NSMC (see the README).
    """
    c.model.pre_layer_norm = True
    c.model.hidden_dropout_rate = 0.0
    c.model.attention_dropout_rate = 0.0
    c.data.max_seq_length = 64
    c.data.masked_lm_prob = 0.4
    c.data.max_predictions_per_seq = 26
    c.train.batch_size = 64
    c.train.learning_rate = 3e-3
    c.train.num_steps = 5200  # ~0.32 s a step on the 2-core CPU: 28 minutes
    c.train.warmup_steps = 260
    c.eval.every_steps = 1000
    c.checkpoint.every_steps = 1000
