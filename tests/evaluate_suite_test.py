"""`flaxbert evaluate-suite`: the Korean suite from a tiny checkpoint and a random baseline,
end to end on tiny limits (8 fine-tuning subprocesses, 2 at a time, 1 step each), its
leaderboard and a re-run that runs nothing; the leaderboard of failed and missing runs and
the command's errors on made-up directories (no training)."""

import csv
import json
import os
import time

import pytest
from shared_data import TASKS, require
from tiny import ko_en_pretraining_workdir

from flaxbert import cli
from flaxbert.config import ConfigError
from flaxbert.data.tasks import TASK_PRESETS
from flaxbert.model_config import LAYOUT_KEYS, STRUCTURAL_KEYS
from flaxbert.sweeps.suite import (
    STRUCTURE_KEYS,
    SUITES,
    Column,
    build_suite,
    lower_is_better,
    read_leaderboard,
    write_leaderboard,
)

KO = list(SUITES["ko"])
# One step of batch 32 per task, seq 32, no dropout: each run is start-up and compiling.
TINY_RUNS = [
    "--config.data.train_limit=32",
    "--config.data.eval_limit=32",
    "--config.data.max_seq_length=32",
    "--config.train.num_epochs=1",
    "--config.train.batch_size=32",
    "--config.eval.batch_size=32",
    "--config.model.hidden_dropout_rate=0",
    "--config.model.attention_dropout_rate=0",
]


def _read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _fast_subprocesses(monkeypatch, cache_dir):
    """The runs as subprocesses of a tiny model, whose time is mostly start-up and
    compiling: one CPU device (not conftest's 8 fake ones), XLA's optimisations off, and a
    compilation cache, where the baseline's runs (after the checkpoint's) find every program
    (it saves a third of their CPU time)."""
    flags = os.environ.get("XLA_FLAGS", "").replace("--xla_force_host_platform_device_count=8", "")
    monkeypatch.setenv("XLA_FLAGS", flags.strip())
    monkeypatch.setenv("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(cache_dir))
    monkeypatch.setenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    monkeypatch.setenv("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")


def test_korean_suite_with_random_baseline_then_rerun_skips(
    repo_root, tmp_path, capsys, monkeypatch
):
    require(*(TASKS / task for task in KO))
    start = time.perf_counter()
    checkpoint, _ = ko_en_pretraining_workdir(repo_root, tmp_path)  # "run", step 7
    made = time.perf_counter()
    _fast_subprocesses(monkeypatch, tmp_path / "jax_cache")
    suite = tmp_path / "suite"
    argv = ["evaluate-suite", "--init_from", str(checkpoint), "--suite", "ko"]
    argv += ["--workdir", str(suite), "--baseline", "random", "--parallel", "2", *TINY_RUNS]
    assert cli.main(argv) == 0, capsys.readouterr()
    out = capsys.readouterr().out
    with capsys.disabled():  # with -s: the measured times
        print(f"checkpoint {made - start:.1f}s, suite {time.perf_counter() - made:.1f}s")

    rows = _read_csv(suite / "leaderboard.csv")
    assert list(rows[0]) == ["task", "metric", "run", "random"]
    assert [r["task"] for r in rows] == [*KO, "average"]
    for row in rows[:-1]:
        main = TASK_PRESETS[row["task"]]["main_metric"]
        assert row["metric"] == main
        for column in ("run", "random"):
            final = json.loads((suite / column / row["task"] / "final_metrics.json").read_text())
            assert float(row[column]) == final[f"eval/{main}"]
    for column in ("run", "random"):
        values = [float(r[column]) for r in rows[:-1]]
        assert float(rows[-1][column]) == pytest.approx(sum(values) / len(values))

    # The checkpoint's column restores it; the baseline has its structure and tokenizer only.
    tokenizer = str(checkpoint / "tokenizer.model")
    for task in KO:
        own = json.loads((suite / "run" / task / "config.json").read_text())
        assert own["init_from"] == str(checkpoint / "checkpoints" / "7")
        assert "restored from" in (suite / "run" / task / "log.txt").read_text()
        random = json.loads((suite / "random" / task / "config.json").read_text())
        assert random["init_from"] == "" and random["data"]["tokenizer"] == tokenizer
        assert random["model"]["hidden_size"] == own["model"]["hidden_size"] == 32
        assert random["model"]["vocab_size"] == 1500 and random["model"]["num_layers"] == 2
        assert random["model"]["max_position_embeddings"] == 64
        assert "restored from" not in (suite / "random" / task / "log.txt").read_text()

    md = (suite / "leaderboard.md").read_text()
    assert "| task | metric | run | random |" in md
    nsmc = rows[0]
    assert f"| nsmc | accuracy | {float(nsmc['run']):.4f} | {float(nsmc['random']):.4f} |" in md
    assert "| average | mean of 4 main metrics (0-1) |" in md and "unweighted mean" in md
    assert md.strip() in out  # the table is printed
    png = (suite / "leaderboard.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 5000

    logs = {p: p.stat().st_size for p in suite.glob("*/*/log.txt")}
    board = (suite / "leaderboard.csv").read_text()
    again = time.perf_counter()
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert out.count("finished, skipped") == 8 and "running" not in out
    assert {p: p.stat().st_size for p in suite.glob("*/*/log.txt")} == logs
    assert (suite / "leaderboard.csv").read_text() == board
    assert time.perf_counter() - again < 30  # reading only


def _fake_run(workdir, step: int, metrics: dict | None, returncode: int | None = None):
    """A finetune workdir by epochs: final_metrics.json at `step`, evaluated there."""
    os.makedirs(workdir, exist_ok=True)
    if metrics is not None:
        with open(os.path.join(workdir, "final_metrics.json"), "w") as f:
            json.dump({"step": step, **metrics}, f)
        with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
    if returncode is not None:
        with open(os.path.join(workdir, "sweep_status.json"), "w") as f:
            json.dump({"returncode": returncode, "finished": False}, f)


def test_leaderboard_marks_failed_and_missing_runs_and_averages_complete_columns(tmp_path):
    columns = [Column("a", "checkpoint a", {}), Column("b", "checkpoint b", {})]
    sweep = build_suite(["nsmc", "korsts"], columns, str(tmp_path))
    assert [p.name for p in sweep.points] == ["a/nsmc", "a/korsts", "b/nsmc", "b/korsts"]
    assert sweep.points[3].workdir == str(tmp_path / "b" / "korsts")
    assert sweep.points[3].main_metric == "eval/spearman"
    _fake_run(tmp_path / "a" / "nsmc", 3, {"eval/accuracy": 0.75, "eval/loss": 0.5})
    _fake_run(tmp_path / "a" / "korsts", 3, {"eval/spearman": -0.25, "eval/pearson": 0.5})
    _fake_run(tmp_path / "b" / "nsmc", 3, None, returncode=1)  # b/korsts: never started

    board = read_leaderboard(sweep, columns)
    assert board.cells == {
        ("nsmc", "a"): 0.75,
        ("nsmc", "b"): "failed",
        ("korsts", "a"): -0.25,
        ("korsts", "b"): "missing",
    }
    assert board.average == {"a": 0.25, "b": "incomplete (0/2)"}

    paths = write_leaderboard(sweep, columns)
    rows = _read_csv(paths[0])
    assert [(r["task"], r["a"], r["b"]) for r in rows] == [
        ("nsmc", "0.75", "failed"),
        ("korsts", "-0.25", "missing"),
        ("average", "0.25", "incomplete (0/2)"),
    ]
    md = open(paths[1]).read()
    assert "| korsts | spearman | -0.2500 | missing |" in md
    assert "| average | mean of 2 main metrics (0-1) | 0.2500 | incomplete (0/2) |" in md
    assert "- **b**: checkpoint b" in md
    assert open(paths[2], "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    assert lower_is_better("eval/loss") and lower_is_better("error_rate")
    assert not lower_is_better("eval/f1") and not lower_is_better("matthews_corrcoef")


def test_errors_name_the_flag_and_leave_nothing(tmp_path, capsys):
    suite = tmp_path / "suite"
    not_a_checkpoint = tmp_path / "empty"
    not_a_checkpoint.mkdir()
    argv = ["evaluate-suite", "--init_from", str(not_a_checkpoint), "--suite", "ko"]
    assert cli.main([*argv, "--workdir", str(suite)]) == 2
    err = capsys.readouterr().err
    assert "--init_from" in err and "no flaxbert checkpoint" in err
    assert not suite.exists()

    with pytest.raises(SystemExit) as exit_:
        cli.main(["evaluate-suite", "--init_from", "x", "--suite", "fr", "--workdir", "d"])
    assert exit_.value.code == 2 and "--suite" in capsys.readouterr().err

    # The structure a random baseline copies is every key that fixes the parameters.
    assert set(STRUCTURE_KEYS) == set(STRUCTURAL_KEYS) | set(LAYOUT_KEYS)
    column = [Column("a", "a", {})]
    with pytest.raises(ConfigError, match="model.hidden_size=64"):
        build_suite(["nsmc"], column, str(suite), ["--config.model.hidden_size=64"])
    with pytest.raises(ConfigError, match="task nsmc, column a: .*no_such_key"):
        build_suite(["nsmc"], column, str(suite), ["--config.train.no_such_key=1"])
