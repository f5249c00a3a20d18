"""Does pre-training pay? Pre-train `mini` on raw text, then fine-tune a task from it and from
random initialisation with identical settings, and print the difference.

    python benchmarks/pretrain_then_finetune.py                  # Korean and English
    python benchmarks/pretrain_then_finetune.py --langs ko --pretrain-steps 400

Budget (the defaults, for a 2-core CPU): per language, the tokenizer (8000 pieces) and the
prepared corpus (cached in runs/cache, trained on first use), `--pretrain-steps 800` of `mini`
(L4 H256, batch 32, seq 128: about 20 minutes at ~1.5 s a step), then two fine-tuning runs
of `--finetune-epochs 2` over the first `--train-examples 5000` training examples (seq 64,
batch 32), evaluated on the first `--eval-examples 1000` of the dev file:

    ko: ../shared/data/corpus/ko_nsmc_reviews.txt -> NSMC (sentiment, accuracy)
    en: ../shared/data/corpus/en_gutenberg.txt    -> SST-2 (sentiment, accuracy)

Every stage is a `flaxbert` command in its own process, in `--runs DIR` (default
runs/pretrain-pays); a stage that already finished is not run again, so an interrupted
benchmark resumes (pre-training resumes from its checkpoint). The table reports the best
evaluation accuracy of each fine-tuning run (checked every epoch).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LANGS = {"ko": ("nsmc", "accuracy"), "en": ("sst2", "accuracy")}


def run(args: list[str], log_path: str) -> float:
    start = time.perf_counter()
    with open(log_path, "a", encoding="utf-8") as log:
        log.write(f"$ flaxbert {' '.join(args)}\n")
        log.flush()
        proc = subprocess.run(
            [sys.executable, "-m", "flaxbert.cli", *args],
            cwd=REPO,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    if proc.returncode:
        sys.exit(f"failed (exit {proc.returncode}): flaxbert {' '.join(args)}; see {log_path}")
    return time.perf_counter() - start


def done(workdir: str) -> dict | None:
    path = os.path.join(workdir, "final_metrics.json")
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    return None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--langs", default="ko,en")
    p.add_argument("--runs", default=os.path.join(REPO, "runs", "pretrain-pays"))
    p.add_argument("--pretrain-steps", type=int, default=800)
    p.add_argument("--finetune-epochs", type=float, default=2.0)
    p.add_argument("--train-examples", type=int, default=5000)
    p.add_argument("--eval-examples", type=int, default=1000)
    args = p.parse_args()
    os.makedirs(args.runs, exist_ok=True)
    log_path = os.path.join(args.runs, "log.txt")
    print(f"logs: {log_path}", flush=True)
    rows = []
    for lang in args.langs.split(","):
        task, metric = LANGS[lang]
        pre = os.path.join(args.runs, f"pretrain-{lang}")
        s = args.pretrain_steps
        if not done(pre):
            secs = run(
                [
                    "pretrain",
                    "--config",
                    f"configs/pretrain.py:mini,corpus={lang}",
                    "--workdir",
                    pre,
                    f"--config.train.num_steps={s}",
                    f"--config.train.warmup_steps={max(s // 10, 1)}",
                    f"--config.eval.every_steps={s}",
                    f"--config.checkpoint.every_steps={max(s // 4, 1)}",
                    "--config.train.log_every=50",
                ],
                log_path,
            )
            print(f"{lang}: pre-trained {s} steps in {secs / 60:.1f} min", flush=True)
        pre_metrics = done(pre)
        common = [
            "--config",
            f"configs/finetune.py:{task},mini",
            f"--config.data.train_limit={args.train_examples}",
            f"--config.data.eval_limit={args.eval_examples}",
            "--config.data.max_seq_length=64",
            f"--config.train.num_epochs={args.finetune_epochs}",
            "--config.train.log_every=50",
        ]
        results = {}
        for init in ("random", "pretrained"):
            wd = os.path.join(args.runs, f"{task}-{init}")
            extra = (
                [f"--config.init_from={pre}"]
                if init == "pretrained"
                else [f"--config.data.tokenizer={os.path.join(pre, 'tokenizer.model')}"]
            )
            if not done(wd):
                secs = run(["finetune", *common, "--workdir", wd, *extra], log_path)
                print(f"{lang}: fine-tuned {task} from {init} in {secs / 60:.1f} min", flush=True)
            final = done(wd)
            results[init] = final["best"][f"eval/{metric}"]
            results[f"{init}_speed"] = final["train_examples_per_sec"]
        rows.append((lang, task, metric, results, pre_metrics))

    print()
    print(
        f"pre-training: mini, {args.pretrain_steps} steps x 32 x 128; fine-tuning: "
        f"{args.train_examples} examples, {args.finetune_epochs:g} epochs, seq 64, batch 32; "
        f"evaluation: first {args.eval_examples} dev examples"
    )
    print(
        "| task | metric | random init | pre-trained | difference | pre-training eval MLM / NSP |"
    )
    print("|---|---|---:|---:|---:|---|")
    for lang, task, metric, r, pre in rows:
        print(
            f"| {task} ({lang}) | {metric} | {r['random']:.4f} | {r['pretrained']:.4f} | "
            f"{r['pretrained'] - r['random']:+.4f} | "
            f"{pre['eval/mlm_accuracy']:.3f} / {pre['eval/nsp_accuracy']:.3f} |"
        )
    speeds = [r[k] for _, _, _, r, _ in rows for k in ("random_speed", "pretrained_speed")]
    print(
        f"fine-tuning throughput (mini, seq 64, batch 32): {min(speeds):.0f}-{max(speeds):.0f} "
        "examples/s"
    )


if __name__ == "__main__":
    main()
