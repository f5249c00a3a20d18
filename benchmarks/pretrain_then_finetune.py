"""Does pre-training pay? Pre-train an encoder on raw text, then fine-tune a task from it in
three arms, fairly, at three label budgets, and print a table and write a plot.

    python benchmarks/pretrain_then_finetune.py                       # the full run (long)
    python benchmarks/pretrain_then_finetune.py --langs en --parallel 2
    python benchmarks/pretrain_then_finetune.py --runs runs/pays-smoke --labels 200 \\
        --seeds 0 --lrs 1e-3 --eval-examples 200 --epochs 1 \\
        --pretrain-override train.num_steps=50 \\
        --pretrain-override train.warmup_steps=5                  # a smoke run, ~15 min

(The smoke run, with `--pretrain-config 'configs/pretrain.py:tiny,corpus={lang}'` and
also eval.every_steps=50 and checkpoint.every_steps=50, took 14.6 min for both languages
on a 2-core CPU shared with other jobs: 4.3 min the two 8,000-piece tokenizers, 1.1 min
preparing, 4.1 min pre-training (mostly start-up), 5.9 min the six fine-tuning runs.)

Languages and tasks (both scored by dev accuracy):

    ko: ../shared/data/corpus/ko_nsmc_reviews.txt -> NSMC (10,000 dev examples)
    en: ../shared/data/corpus/en_gutenberg.txt    -> SST-2 (872 dev examples)

Stages, each a `flaxbert` command in its own process (its output in RUNS/logs/STAGE.log),
per language:

1. tokenizer: `flaxbert train-tokenizer` on the corpus, with the pre-training config's
   data.vocab_size / tokenizer_model_type / tokenizer_max_sentences (RUNS/data-LANG/).
2. prepare: `flaxbert prepare` tokenises the corpus into RUNS/data-LANG/prepared, holding out
   the config's data.validation_fraction of the documents.
3. pretrain: `flaxbert pretrain --config configs/pretrain.py:cpu30,corpus=LANG` (change it
   with --pretrain-config, and any key with --pretrain-override KEY=VALUE) on the prepared
   corpus, in RUNS/pretrain-LANG.
4. fine-tuning, for each arm and each --labels N (data.train_limit, the first N training
   examples), all of the same architecture (the checkpoint's, read from its config.json),
   sequence length, batch 32 and --epochs:
     random     every weight random, the pre-training's tokenizer (data.tokenizer);
     finetuned  init_from=RUNS/pretrain-LANG, every weight trained;
     frozen     the same, freeze_encoder=true: only the task head trains.
   a. an lr sweep: `flaxbert sweep` over --lrs with the first seed; the learning rate with
      the best dev metric (the last evaluation, after the final epoch) is that arm's;
   b. a seed sweep: the chosen learning rate with the other --seeds.
   Each sweep's config is written beside its points (RUNS/finetune/STAGE/sweep.py, STAGE
   e.g. nsmc-random-n1000-lrs-seed0 or nsmc-random-n1000-seeds-lr0.001); the sweep skips
   points that finished. Every arm gets the same grid and the same epochs.
   The points' checkpoints are deleted once their sweep is done (--keep-checkpoints keeps
   them): 100-odd mini checkpoints would fill a disk, and only the metrics are read.

Outputs in RUNS: results.json (every run: task, arm, labels, lr, seed, dev metric, wall time;
the chosen learning rates; the pre-training's final held-out metrics; the stages' times),
results.md (the table below, the pre-training metrics and the time per stage) and plot.png
(dev accuracy against the number of labels, log x axis, one line per arm, std error bars).
The table is printed at the end.

Resuming: a finished stage is never run again (RUNS/stages/STAGE.json records it and its
wall time), an interrupted one is resumed by running the same command (pre-training from its
checkpoint, a sweep from its unfinished points). Options that change what a run means
(--epochs, --eval-examples, --max-seq-length, --batch-size, the pre-training config and
its overrides) are kept in RUNS/settings.json and must not change between runs of one RUNS;
--langs, --labels, --seeds, --lrs and --arms may grow (only the new runs then run).

Time (an honest warning): the full default run is long on a 2-core CPU, about a day.
Measured 2026-12-01 on the 2-core CPU this was written on, with other jobs sharing it (load
average ~4): one `flaxbert finetune` of NSMC, `mini` from random initialisation, 3,200
examples, 1 epoch, seq 64, batch 32, 2,000 dev examples, took 131 s of wall time: 44
training examples/s (final_metrics.json's train_examples_per_sec), about 120 dev examples/s
of evaluation, and ~35 s of start-up and compilation. At that speed one run of E epochs on
N labels costs about E x N / 44 s of training, E x DEV / 120 s of evaluation (DEV examples
each epoch) and 40 s: per arm and language, 6 runs (4 learning rates + 2 more seeds) at
each of 1,000, 5,000 and 20,000 labels come to ~13 h for the three NSMC arms (10,000 dev
examples) and ~10 h for SST-2; with pre-training (~30 min per language for cpu30, plus the
tokenizer and the preparation of the corpus) ~24 h in all. Ways down: --lrs 3e-4,1e-3,3e-3
(-1/6), --eval-examples 2000 (NSMC: -3 h), --labels 1000,5000 (about -2/3), --parallel 2
(little gain on 2 cores). The frozen arm should be faster (no encoder gradients; its tiny
runs in the test take about 2/3 of the others' time); the estimate ignores that.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:  # run as a script from a checkout
    sys.path.insert(0, REPO)

from flaxbert.config import ConfigError, load_config  # noqa: E402
from flaxbert.sweeps.logs import read_json  # noqa: E402
from flaxbert.sweeps.points import point_names  # noqa: E402

LANGS = {"ko": "nsmc", "en": "sst2"}
ARMS = {
    "random": "random init",
    "finetuned": "pre-trained, fine-tuned",
    "frozen": "pre-trained, frozen",
}
FINETUNE_CONFIG = os.path.join(REPO, "configs", "finetune.py")
# Model keys that are run-time choices, not the architecture: not copied from the checkpoint.
RUNTIME_MODEL_KEYS = {
    "vocab_size",  # the fine-tuning config follows the tokenizer
    "hidden_dropout_rate",
    "attention_dropout_rate",
    "initializer_range",
    "dtype",
    "param_dtype",
    "attention_impl",
    "remat",
}
# Options whose change would make earlier runs in RUNS mean something else.
FIXED_SETTINGS = (
    "epochs",
    "eval_examples",
    "max_seq_length",
    "batch_size",
    "pretrain_config",
    "pretrain_override",
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The benchmark's command line (see the module docstring)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--langs", default="ko,en", help="ko (NSMC) and/or en (SST-2)")
    p.add_argument("--runs", default=os.path.join(REPO, "runs", "pretrain-pays"))
    p.add_argument("--arms", default=",".join(ARMS), help="of " + ", ".join(ARMS))
    p.add_argument("--labels", default="1000,5000,20000", help="training examples (train_limit)")
    p.add_argument("--seeds", default="0,1,2", help="train.seed; the first picks the lr")
    p.add_argument(
        "--lrs",
        default="1e-4,3e-4,1e-3,3e-3",
        help="the learning-rate grid, the same for every arm (3e-3 is there for the frozen "
        "arm, whose head alone trains; the other arms may pick it too)",
    )
    p.add_argument("--epochs", type=float, default=3.0)
    p.add_argument("--eval-examples", type=int, default=0, help="first N dev examples; 0 = all")
    p.add_argument("--max-seq-length", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--parallel", type=int, default=1, help="points run at a time by each sweep")
    p.add_argument(
        "--pretrain-config",
        default="configs/pretrain.py:cpu30,corpus={lang}",
        help="FILE:ARG of pre-training; {lang} is replaced by the language (default %(default)s)",
    )
    p.add_argument(
        "--pretrain-override",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a pre-training config override (repeatable), e.g. train.num_steps=200",
    )
    p.add_argument("--keep-checkpoints", action="store_true", help="keep fine-tuning checkpoints")
    args = p.parse_args(argv)
    args.runs = os.path.abspath(args.runs)
    args.langs = _names(args.langs, LANGS, "--langs")
    args.arms = _names(args.arms, ARMS, "--arms")
    args.labels = [int(x) for x in args.labels.split(",")]
    args.seeds = [int(x) for x in args.seeds.split(",")]
    args.lrs = sorted({float(x) for x in args.lrs.split(",")})
    for o in args.pretrain_override:
        if "=" not in o:
            p.error(f"--pretrain-override {o!r}: give KEY=VALUE")
    return args


def _names(text: str, known, flag: str) -> list[str]:
    names = [x for x in text.split(",") if x]
    unknown = [x for x in names if x not in known]
    if unknown or not names:
        sys.exit(f"{flag}: unknown {', '.join(unknown) or 'empty'}; choose from {', '.join(known)}")
    return names


# --- stages ------------------------------------------------------------------------------


class Stages:
    """Runs each stage once: a `flaxbert` command in a subprocess, its output in
    RUNS/logs/NAME.log, its completion and wall time in RUNS/stages/NAME.json. A stage whose
    record matches (same command) is skipped; its recorded time still counts."""

    def __init__(self, runs: str, total: int):
        self.runs = runs
        self.total = total
        self.count = 0
        self.start = time.perf_counter()
        self.times: dict[str, float] = {}
        self.ran: list[str] = []
        for sub in ("logs", "stages"):
            os.makedirs(os.path.join(runs, sub), exist_ok=True)

    def elapsed(self) -> str:
        return f"{(time.perf_counter() - self.start) / 60:.1f} min elapsed"

    def run(self, name: str, what: str, argv: list[str], key=None, echo: bool = False) -> float:
        """Runs `flaxbert ARGV` as stage `name` unless it finished before with the same `key`
        (default: the same ARGV); returns its seconds."""
        self.count += 1
        head = f"[stage {self.count}/{self.total}, {self.elapsed()}] {name}: {what}"
        record_path = os.path.join(self.runs, "stages", f"{name}.json")
        key = {"argv": argv} if key is None else key
        record = read_json(record_path)
        if record and record.get("key") == key:
            print(f"{head}: finished before ({record['seconds']:.0f} s), skipped", flush=True)
            self.times[name] = record["seconds"]
            return record["seconds"]
        log_path = os.path.join(self.runs, "logs", f"{name}.log")
        print(f"{head} (log: {log_path})", flush=True)
        start = time.perf_counter()
        with open(log_path, "a", encoding="utf-8") as log:
            log.write(f"$ flaxbert {' '.join(argv)}\n")
            log.flush()
            proc = subprocess.Popen(
                [sys.executable, "-m", "flaxbert.cli", *argv],
                cwd=REPO,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
            try:
                for line in proc.stdout:
                    log.write(line)
                    log.flush()
                    if echo and line.startswith("["):  # a sweep's per-point progress
                        print(f"    {line.rstrip()}", flush=True)
            except KeyboardInterrupt:  # Ctrl-C reached the child too: it saves and stops
                proc.wait()
                raise
            code = proc.wait()
        if code:
            sys.exit(
                f"stage {name} failed (exit {code}): flaxbert {' '.join(argv)}; see {log_path}"
            )
        seconds = time.perf_counter() - start
        _write_json(record_path, {"key": key, "seconds": seconds})
        self.times[name] = seconds
        self.ran.append(name)
        print(f"    done in {seconds / 60:.1f} min", flush=True)
        return seconds


def _write_json(path: str, data) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2)
    os.replace(tmp, path)


def check_settings(args: argparse.Namespace) -> None:
    """RUNS/settings.json: the options that fix what a run means; a change stops the run."""
    path = os.path.join(args.runs, "settings.json")
    now = {k: getattr(args, k) for k in FIXED_SETTINGS}
    before = read_json(path)
    if before and before != now:
        changed = ", ".join(k for k in now if before.get(k) != now[k])
        sys.exit(
            f"{path}: {changed} differ from this RUNS' earlier runs ({before}); give another "
            "--runs or the same options"
        )
    os.makedirs(args.runs, exist_ok=True)
    _write_json(path, now)


# --- pre-training ------------------------------------------------------------------------


def pretrain_language(args, stages: Stages, lang: str) -> dict:
    """Tokenizer, prepare and pre-train stages of one language; the pre-training's facts."""
    spec = args.pretrain_config.format(lang=lang)
    overrides = [f"--config.{o}" for o in args.pretrain_override]
    try:
        config = load_config(spec, overrides)
    except ConfigError as e:
        sys.exit(f"--pretrain-config {spec}: {e}")
    d = config.data
    data_dir = os.path.join(args.runs, f"data-{lang}")
    os.makedirs(data_dir, exist_ok=True)
    tokenizer = d.tokenizer or os.path.join(data_dir, "tokenizer.model")
    if not d.corpus or os.path.isdir(d.corpus):
        sys.exit(f"--pretrain-config {spec}: data.corpus must be raw text (got {d.corpus!r})")
    text_flags = ["--errors", d.errors, "--text-field", d.text_field]
    times = {}
    if d.tokenizer and os.path.exists(d.tokenizer):
        stages.total -= 1  # the config's own tokenizer: no tokenizer stage
    else:
        argv = ["train-tokenizer", "--input", d.corpus, "--vocab-size", str(d.vocab_size)]
        argv += ["--output", tokenizer[: -len(".model")], *text_flags]
        argv += ["--model-type", d.tokenizer_model_type]
        argv += ["--max-sentences", str(d.tokenizer_max_sentences)]
        times["tokenizer"] = stages.run(f"tokenizer-{lang}", f"{d.vocab_size} pieces", argv)
    prepared = os.path.join(data_dir, "prepared")
    argv = ["prepare", "--corpus", d.corpus, "--tokenizer", tokenizer, "--output", prepared]
    argv += ["--validation-fraction", str(d.validation_fraction), *text_flags, "--force"]
    times["prepare"] = stages.run(f"prepare-{lang}", d.corpus, argv)
    workdir = os.path.join(args.runs, f"pretrain-{lang}")
    argv = ["pretrain", "--config", spec, "--workdir", workdir]
    argv += [f"--config.data.corpus={prepared}", f"--config.model.vocab_size={d.vocab_size}"]
    what = f"{spec}, {config.train.num_steps} steps"
    times["pretrain"] = stages.run(f"pretrain-{lang}", what, [*argv, *overrides])
    final = read_json(os.path.join(workdir, "final_metrics.json")) or {}
    saved = read_json(os.path.join(workdir, "config.json")) or {}
    from flaxbert.checkpoint import tokenizer_of  # JAX and orbax: only here

    return {
        "config": spec,
        "overrides": args.pretrain_override,
        "workdir": workdir,
        "tokenizer": tokenizer_of(workdir),
        "variant": saved.get("variant", ""),
        "model": saved.get("model", {}),
        "final_metrics": final,
        "seconds": times,
    }


def finetune_model(pretrained: dict) -> tuple[str, list[str]]:
    """(configs/finetune.py variant, --config.model.* overrides) giving the architecture of
    the pre-training run whose config.json is `pretrained`: its own variant when the
    fine-tuning config has one of that name (`cpu30`), else the first of the same layers,
    hidden size and heads (mini when none), and every other architectural key where the
    variant's default differs."""
    from flaxbert.model_config import VARIANTS as variants  # the sizes both configs share

    pretrained_model = pretrained.get("model", {})
    shape = tuple(pretrained_model.get(k) for k in ("num_layers", "hidden_size", "num_heads"))
    variant = pretrained.get("variant")
    if variant not in variants:
        variant = next((v for v, dims in variants.items() if tuple(dims) == shape), "mini")
    defaults = load_config(f"{FINETUNE_CONFIG}:sst2,{variant}").model
    overrides = []
    for key, value in pretrained_model.items():
        if key in RUNTIME_MODEL_KEYS:
            continue
        if key not in defaults:
            if value not in (None, False, 0, ""):  # on: a model the fine-tuning cannot build
                sys.exit(f"configs/finetune.py has no model.{key}; the checkpoint has {value!r}")
        elif defaults[key] != value:
            overrides.append(f"--config.model.{key}={value}")
    return variant, overrides


# --- fine-tuning -------------------------------------------------------------------------


SWEEP_FILE = '''"""Written by benchmarks/pretrain_then_finetune.py: {what}.

    cd {repo} && flaxbert sweep --config {path}:{arg} --workdir {workdir} ...
(the benchmark's log of it, RUNS/logs/{name}.log, has the whole command)."""

from flaxbert.config import load_module

_FINETUNE = load_module({finetune!r})


def get_config(arg: str = {arg!r}):
    return _FINETUNE.get_config(arg)


def get_sweep(arg: str = {arg!r}):
    return {points!r}
'''


def run_sweep(args, stages: Stages, name: str, what: str, arg: str, points, base) -> dict:
    """Writes RUNS/finetune/NAME/sweep.py, runs `flaxbert sweep` on it (one stage), and
    returns {point name: that point's workdir}."""
    workdir = os.path.join(args.runs, "finetune", name)
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, "sweep.py")
    text = SWEEP_FILE.format(
        what=what,
        repo=REPO,
        path=path,
        arg=arg,
        workdir=workdir,
        name=name,
        finetune=FINETUNE_CONFIG,
        points=points,
    )
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    argv = ["sweep", "--config", f"{path}:{arg}", "--workdir", workdir, *base]
    key = {"argv": argv, "points": points}  # --parallel changes no result
    stages.run(name, what, [*argv, "--parallel", str(args.parallel)], key=key, echo=True)
    dirs = {n: os.path.join(workdir, n) for n in point_names(points)}
    if not args.keep_checkpoints:
        for d in dirs.values():
            shutil.rmtree(os.path.join(d, "checkpoints"), ignore_errors=True)
    return dirs


def read_run(workdir: str, metric: str) -> dict:
    """The dev metric (the last evaluation's), the best evaluation's and the wall time."""
    final = read_json(os.path.join(workdir, "final_metrics.json"))
    if not final or f"eval/{metric}" not in final:
        sys.exit(f"{workdir}: no final_metrics.json with eval/{metric}; see its log.txt")
    return {
        "dev": final[f"eval/{metric}"],
        "best_dev": final.get("best", {}).get(f"eval/{metric}"),
        "wall_time_s": final.get("wall_time_s"),
        "train_examples_per_sec": final.get("train_examples_per_sec"),
        "workdir": workdir,
    }


def finetune_arm(args, stages, lang, pre, arm, labels, variant, model_overrides) -> tuple:
    """lr sweep (first seed) then seed sweep (chosen lr) of one task/arm/label count:
    (rows of results.json, {lr: dev metric of the first seed}, chosen lr)."""
    task = LANGS[lang]
    metric = load_config(f"{FINETUNE_CONFIG}:{task},{variant}").main_metric
    base = [
        f"--config.data.train_limit={labels}",
        f"--config.data.eval_limit={args.eval_examples}",
        f"--config.data.max_seq_length={args.max_seq_length}",
        f"--config.train.batch_size={args.batch_size}",
        f"--config.train.num_epochs={args.epochs}",
        *model_overrides,
    ]
    if arm == "random":
        base.append(f"--config.data.tokenizer={pre['tokenizer']}")
    else:
        base.append(f"--config.init_from={pre['workdir']}")
    if arm == "frozen":
        base.append("--config.freeze_encoder=true")
    arg = f"{task},{variant}"
    first, rest = args.seeds[0], args.seeds[1:]
    # The seed and the lr are in the sweeps' names: their points are named by what varies.
    name = f"{task}-{arm}-n{labels}"
    grid = [{"train.learning_rate": lr, "train.seed": first} for lr in args.lrs]
    what = f"{ARMS[arm]}, {labels} labels: lr sweep over {len(grid)} run(s), seed {first}"
    dirs = run_sweep(args, stages, f"{name}-lrs-seed{first}", what, arg, grid, base)
    rows, by_lr = [], {}
    for point, d in zip(grid, dirs.values(), strict=True):
        row = {"lr": point["train.learning_rate"], "seed": first, "picks_lr": True}
        row.update(read_run(d, metric))
        rows.append(row)
        by_lr[row["lr"]] = row["dev"]
    chosen = max(args.lrs, key=lambda lr: (by_lr[lr], -lr))  # a tie goes to the smaller lr
    if rest:
        seeds = [{"train.learning_rate": chosen, "train.seed": s} for s in rest]
        what = f"{ARMS[arm]}, {labels} labels: lr {chosen:g}, seed(s) {rest}"
        dirs = run_sweep(args, stages, f"{name}-seeds-lr{chosen:g}", what, arg, seeds, base)
        for point, d in zip(seeds, dirs.values(), strict=True):
            row = {"lr": chosen, "seed": point["train.seed"], "picks_lr": False}
            row.update(read_run(d, metric))
            rows.append(row)
    common = {"task": task, "lang": lang, "arm": arm, "labels": labels, "metric": metric}
    return [{**common, **r} for r in rows], by_lr, chosen


# --- the report --------------------------------------------------------------------------


def summarise(results: dict) -> list[dict]:
    """Per (task, labels, arm): mean and sample std over seeds at the chosen lr."""
    out = []
    for c in results["chosen"]:
        values = [
            r["dev"]
            for r in results["runs"]
            if (r["task"], r["arm"], r["labels"]) == (c["task"], c["arm"], c["labels"])
            and r["lr"] == c["lr"]
        ]
        std = statistics.stdev(values) if len(values) > 1 else 0.0
        out.append({**c, "mean": statistics.fmean(values), "std": std, "n": len(values)})
    return out


def markdown(results: dict, args) -> str:
    """results.md: the table, the pre-training's metrics and the time per stage."""
    summary = {(s["task"], s["labels"], s["arm"]): s for s in summarise(results)}
    arms = [a for a in ARMS if a in args.arms]
    lines = [
        "# Does pre-training pay?",
        "",
        f"Dev accuracy after {args.epochs:g} epoch(s), mean ± std over seeds "
        f"{','.join(map(str, args.seeds))} at each arm's own learning rate (picked on dev "
        f"with seed {args.seeds[0]} from {', '.join(f'{lr:g}' for lr in args.lrs)}); "
        f"seq {args.max_seq_length}, batch {args.batch_size}, "
        f"{'all' if not args.eval_examples else f'the first {args.eval_examples}'} dev "
        "examples. An lr marked * is at the edge of the grid.",
        "",
    ]
    head = ["task", "labels"]
    for a in arms:
        head += [ARMS[a], "lr"]
    diff = "random" in arms and "finetuned" in arms
    if diff:
        head.append("finetuned − random")
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * 2 + "---:|" * (len(head) - 2)]
    for lang in args.langs:
        task = LANGS[lang]
        for labels in args.labels:
            cells = [f"{task} ({lang})", f"{labels:,}"]
            for a in arms:
                s = summary[(task, labels, a)]
                edge = "*" if len(args.lrs) > 1 and s["lr"] in (args.lrs[0], args.lrs[-1]) else ""
                cells += [f"{s['mean']:.4f} ± {s['std']:.4f}", f"{s['lr']:g}{edge}"]
            if diff:
                d = summary[(task, labels, "finetuned")]["mean"]
                d -= summary[(task, labels, "random")]["mean"]
                cells.append(f"{100 * d:+.1f} pts")
            lines.append("| " + " | ".join(cells) + " |")
    if diff and 5000 in args.labels:
        lines.append("")
        for lang in args.langs:
            task = LANGS[lang]
            d = summary[(task, 5000, "finetuned")]["mean"] - summary[(task, 5000, "random")]["mean"]
            verdict = "met" if d >= 0.05 else "NOT met"
            lines.append(
                f"- {task}, 5,000 labels: fine-tuned beats random by {100 * d:+.1f} points "
                f"(the target, at least +5.0: {verdict})"
            )
    lines += ["", "## Pre-training (final held-out metrics)", ""]
    lines += [
        "| lang | config | steps | MLM accuracy | NSP accuracy | MLM distinct predictions "
        "| workdir |",
        "|---|---|---:|---:|---:|---:|---|",
    ]
    for lang, pre in results["pretraining"].items():
        f = pre["final_metrics"]
        mlm, nsp = f.get("eval/mlm_accuracy", math.nan), f.get("eval/nsp_accuracy", math.nan)
        # Near 0 on the unigram plateau (the same few pieces predicted whatever the context).
        distinct = f.get("eval/mlm_distinct_predictions", math.nan)
        cfg = " ".join([pre["config"], *pre["overrides"]])
        step = f.get("step", "?")
        lines.append(
            f"| {lang} | `{cfg}` | {step} | {mlm:.4f} | {nsp:.4f} | {distinct:.3f} "
            f"| {pre['workdir']} |"
        )
    lines += ["", "## Wall time per stage", "", "| stage | minutes |", "|---|---:|"]
    for name, seconds in results["stages"].items():
        lines.append(f"| {name} | {seconds / 60:.1f} |")
    total = sum(results["stages"].values())
    lines += [f"| total | {total / 60:.1f} |", ""]
    return "\n".join(lines)


def plot(results: dict, args, path: str) -> None:
    """plot.png: one subplot per task, dev metric vs labels (log x), a line per arm."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = summarise(results)
    fig, axes = plt.subplots(1, len(args.langs), figsize=(5.5 * len(args.langs), 4), squeeze=False)
    for ax, lang in zip(axes[0], args.langs, strict=True):
        task = LANGS[lang]
        arms = [a for a in ARMS if a in args.arms]
        for i, arm in enumerate(arms):
            rows = [s for s in summary if s["task"] == task and s["arm"] == arm]
            rows.sort(key=lambda s: s["labels"])
            dodge = 1.0 + 0.03 * (i - (len(arms) - 1) / 2)  # error bars side by side
            ax.errorbar(
                [s["labels"] * dodge for s in rows],
                [s["mean"] for s in rows],
                yerr=[s["std"] for s in rows],
                marker="o",
                capsize=3,
                label=ARMS[arm],
            )
        ax.set_xscale("log")
        ax.set_xlim(min(args.labels) / 1.6, max(args.labels) * 1.6)
        ax.set_xticks(args.labels, [f"{n:,}" for n in args.labels])
        ax.minorticks_off()
        ax.set_xlabel("labelled training examples")
        ax.set_ylabel(f"dev {summary[0]['metric'] if summary else 'metric'}")
        ax.set_title(f"{task} ({lang})")
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    """Runs every stage not finished before, then writes and prints the report."""
    args = parse_args(argv)
    check_settings(args)
    if "frozen" in args.arms and "freeze_encoder" not in load_config(FINETUNE_CONFIG):
        sys.exit(
            "configs/finetune.py has no freeze_encoder key yet: run with --arms random,finetuned"
        )
    os.chdir(REPO)  # config paths (--pretrain-config) are the repository's
    per_arm = len(args.labels) * (1 + (len(args.seeds) > 1))
    total = len(args.langs) * (3 + len(args.arms) * per_arm)
    stages = Stages(args.runs, total)
    print(f"{total} stages in {args.runs}", flush=True)
    results = {"settings": {**vars(args)}, "pretraining": {}, "chosen": [], "runs": []}
    for lang in args.langs:
        pre = pretrain_language(args, stages, lang)
        if not pre["tokenizer"]:
            sys.exit(f"{pre['workdir']}: its checkpoint names no tokenizer")
        results["pretraining"][lang] = pre
        variant, model_overrides = finetune_model(pre)
        for labels in args.labels:
            for arm in args.arms:
                rows, by_lr, chosen = finetune_arm(
                    args, stages, lang, pre, arm, labels, variant, model_overrides
                )
                results["runs"] += rows
                key = {"task": LANGS[lang], "arm": arm, "labels": labels}
                results["chosen"].append(
                    {**key, "lr": chosen, "grid": by_lr, "metric": rows[0]["metric"]}
                )
    results["stages"] = stages.times
    _write_json(os.path.join(args.runs, "results.json"), results)
    text = markdown(results, args)
    with open(os.path.join(args.runs, "results.md"), "w", encoding="utf-8") as f:
        f.write(text)
    plot(results, args, os.path.join(args.runs, "plot.png"))
    print()
    print(text)
    print(
        f"{len(stages.ran)} stage(s) ran this time, {stages.count - len(stages.ran)} skipped; "
        f"{stages.elapsed()}; wrote results.json, results.md, plot.png in {args.runs}"
    )
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit("interrupted: run the same command again to resume")
