"""benchmarks/pretrain_then_finetune.py end to end on a tiny scale: tokenizer, prepare, a few
steps of `tiny` pre-training on a slice of the Korean corpus, then two arms on NSMC
(random and frozen; one label count, two learning rates, two seeds, one epoch), the report,
and a re-run that runs nothing. Short subprocesses, most of their time start-up and
compiling."""

import json
import os
import subprocess
import sys
import time

from shared_data import corpus_head

SCRIPT = os.path.join("benchmarks", "pretrain_then_finetune.py")
LRS = (1e-3, 3e-3)
SEEDS = (0, 1)
# The fine-tuned arm runs the frozen arm's code path without freeze_encoder; leaving it out
# saves a third of the fine-tuning subprocesses.
ARMS = ("random", "frozen")
LABELS = 64


def _bench(repo_root, runs, corpus):
    overrides = {
        "data.vocab_size": 2000,  # Korean needs ~1,400 pieces for its characters alone
        "data.tokenizer_max_sentences": 3000,
        "data.validation_fraction": 0.1,  # NSP needs 2 held-out documents of the ~60
        "data.max_seq_length": 64,
        "train.batch_size": 16,
        "train.num_steps": 10,
        "train.warmup_steps": 2,
        "eval.every_steps": 10,
        "eval.num_batches": 1,
        "checkpoint.every_steps": 10,
    }
    argv = [
        *("--runs", str(runs), "--langs", "ko", "--labels", str(LABELS)),
        *("--seeds", ",".join(map(str, SEEDS)), "--lrs", ",".join(map(str, LRS))),
        *("--arms", ",".join(ARMS), "--eval-examples", "64", "--epochs", "1", "--parallel", "2"),
        *("--pretrain-config", f"configs/pretrain.py:tiny,corpus={corpus}"),
    ]
    for key, value in overrides.items():
        argv += ["--pretrain-override", f"{key}={value}"]
    # One CPU device (not conftest's 8 fake ones) and XLA's optimisations off: the many
    # short subprocesses are dominated by start-up and compiling.
    flags = os.environ.get("XLA_FLAGS", "").replace("--xla_force_host_platform_device_count=8", "")
    env = {**os.environ, "XLA_FLAGS": flags.strip(), "JAX_DISABLE_MOST_OPTIMIZATIONS": "1"}
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, SCRIPT, *argv],
        cwd=repo_root,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout, time.perf_counter() - start


def test_benchmark_end_to_end_then_resumes_without_rerunning(repo_root, tmp_path):
    corpus = corpus_head("ko_nsmc_reviews.txt", 4000, tmp_path / "ko.txt")  # ~60 movies
    runs = tmp_path / "runs"
    out, _ = _bench(repo_root, runs, corpus)
    assert "7 stage(s) ran this time, 0 skipped" in out, out

    results = json.loads((runs / "results.json").read_text())
    rows = results["runs"]
    got = {(r["arm"], r["lr"], r["seed"]) for r in rows}
    chosen = {c["arm"]: c["lr"] for c in results["chosen"]}
    expected = {(a, lr, SEEDS[0]) for a in ARMS for lr in LRS}
    expected |= {(a, chosen[a], s) for a in ARMS for s in SEEDS[1:]}
    assert got == expected and len(rows) == len(expected)
    for r in rows:
        assert r["task"] == "nsmc" and r["labels"] == LABELS and r["metric"] == "accuracy"
        assert 0.0 <= r["dev"] <= 1.0 and r["wall_time_s"] > 0
    for arm in ARMS:  # each arm's lr is the dev-best of the grid at the first seed
        dev = {r["lr"]: r["dev"] for r in rows if r["arm"] == arm and r["picks_lr"]}
        assert set(dev) == set(LRS) and dev[chosen[arm]] == max(dev.values())
    pre = results["pretraining"]["ko"]
    assert pre["final_metrics"]["step"] == 10
    assert 0.0 <= pre["final_metrics"]["eval/mlm_accuracy"] <= 1.0
    assert pre["tokenizer"].endswith("tokenizer.model")
    assert set(results["stages"]) >= {"tokenizer-ko", "prepare-ko", "pretrain-ko"}

    md = (runs / "results.md").read_text()
    assert "| nsmc (ko) | 64 |" in md and "frozen" in md and "random" in md
    assert "MLM accuracy" in md and "Wall time per stage" in md
    png = (runs / "plot.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 1000
    # The sweeps' checkpoints are gone; their metrics stay.
    assert not list((runs / "finetune").glob("*/*/checkpoints"))

    logs = {p.name: p.stat().st_size for p in (runs / "logs").iterdir()}
    again, seconds = _bench(repo_root, runs, corpus)
    assert "0 stage(s) ran this time, 7 skipped" in again, again
    assert again.count("finished before") == 7
    assert {p.name: p.stat().st_size for p in (runs / "logs").iterdir()} == logs
    assert json.loads((runs / "results.json").read_text())["runs"] == rows
    assert seconds < 60  # start-up and reading only


def test_report_of_three_arms_has_the_difference_and_the_verdict(repo_root):
    """The report's arithmetic on made-up results: means and sample stds over seeds at each
    arm's chosen lr only, the fine-tuned − random column and the +5-point verdict."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("ptf", os.path.join(repo_root, SCRIPT))
    ptf = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ptf)
    args = ptf.parse_args(
        ["--langs", "ko", "--labels", "5000", "--seeds", "0,1", "--lrs", "1e-3,3e-3"]
    )
    dev = {  # (arm, lr, seed) -> dev accuracy; the chosen lr is 1e-3 for every arm
        ("random", 1e-3, 0): 0.70, ("random", 1e-3, 1): 0.72, ("random", 3e-3, 0): 0.60,
        ("finetuned", 1e-3, 0): 0.78, ("finetuned", 1e-3, 1): 0.80, ("finetuned", 3e-3, 0): 0.5,
        ("frozen", 1e-3, 0): 0.65, ("frozen", 1e-3, 1): 0.63, ("frozen", 3e-3, 0): 0.64,
    }  # fmt: skip
    common = {"task": "nsmc", "lang": "ko", "labels": 5000, "metric": "accuracy"}
    results = {
        "runs": [
            {**common, "arm": a, "lr": lr, "seed": s, "dev": v} for (a, lr, s), v in dev.items()
        ],
        "chosen": [{**common, "arm": a, "lr": 1e-3} for a in ("random", "finetuned", "frozen")],
        "pretraining": {},
        "stages": {},
    }
    md = ptf.markdown(results, args)
    row = next(line for line in md.splitlines() if line.startswith("| nsmc (ko) | 5,000 |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[2:4] == ["0.7100 ± 0.0141", "0.001*"]
    assert cells[4] == "0.7900 ± 0.0141" and cells[6] == "0.6400 ± 0.0141"
    assert cells[-1] == "+8.0 pts"
    assert "+8.0 points" in md and "met)" in md and "NOT met" not in md
