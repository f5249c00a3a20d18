"""Sweeps: points, names, running (skip, resume, failures, parallel), SLURM script, summary.

No training runs here: the runner is a function that writes a fake workdir, or a fake
command line standing in for `python -m flaxbert.cli`.
"""

import csv
import io
import json
import math
import os
import statistics
import subprocess
import sys
import textwrap
import threading

import pytest

from flaxbert import cli
from flaxbert.config import ConfigError
from flaxbert.sweeps import summary as sweep_summary
from flaxbert.sweeps.points import (
    concat,
    grid,
    load_sweep,
    point_names,
    product,
    shell,
    variants,
    write_sweep_json,
    zip_,
)
from flaxbert.sweeps.runner import dry_run, run_sweep
from flaxbert.sweeps.slurm import emit_slurm
from flaxbert.sweeps.status import is_finished, point_status

CONFIG = """
import ml_collections
from flaxbert.sweeps.points import grid

def get_config(arg="base"):
    c = ml_collections.ConfigDict()
    c.size = arg
    {task}
    c.train = ml_collections.ConfigDict({{"num_steps": 4, "learning_rate": 1e-3, "seed": 0}})
    c.eval = ml_collections.ConfigDict({{"batch_size": 8}})
    return c

def get_sweep({sweep_arg}):
    return {points}
"""
LR_SEED = 'grid(**{"train.learning_rate": [0.001, 0.0003], "train.seed": [0, 1, 2]})'
FINETUNE = 'c.task = "sst2"; c.main_metric = "accuracy"'


def _config(tmp_path, points=LR_SEED, task="", sweep_arg="arg=''", name="exp.py"):
    path = tmp_path / name
    path.write_text(CONFIG.format(points=points, task=task, sweep_arg=sweep_arg))
    return str(path)


def _fake_finished(workdir, step=4, acc=0.5, loss=1.0, finetune=True, wall=10.0):
    """What a finished run leaves: metrics.jsonl with two evaluations, final_metrics.json."""
    os.makedirs(workdir, exist_ok=True)
    rows = [
        {"step": step // 2, "loss": loss + 1},
        {"step": step // 2, "eval/loss": loss + 0.5, "eval/accuracy": acc + 0.1},
        {"step": step, "loss": loss},
        {"step": step, "eval/loss": loss, "eval/accuracy": acc},
    ]
    with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    final = {"step": step, "eval/loss": loss, "eval/accuracy": acc, "wall_time_s": wall}
    if finetune:
        final["best"] = {"eval/loss": loss + 0.5, "eval/accuracy": acc + 0.1, "step": step // 2}
    with open(os.path.join(workdir, "final_metrics.json"), "w") as f:
        json.dump(final, f)


def _accuracy(lr, seed):
    return round(0.5 + 100 * lr + 0.01 * seed, 6)


class FakeRunner:
    """Stands in for the subprocess: records the points and writes a finished workdir."""

    def __init__(self, fail=()):
        self.calls, self.fail = [], set(fail)
        self.lock = threading.Lock()

    def __call__(self, point, log):
        with self.lock:
            self.calls.append(point.name)
        log.write(f"training {point.name}\n")
        if point.name in self.fail:
            log.write("Traceback (most recent call last):\nRuntimeError: out of memory\n")
            return 3
        o = point.overrides
        _fake_finished(point.workdir, acc=_accuracy(o["train.learning_rate"], o["train.seed"]))
        return 0


# --- points and names ------------------------------------------------------------------


def test_grid_zip_product_concat_and_variants():
    g = grid(**{"train.learning_rate": [1e-3, 3e-4], "train.seed": [0, 1]})
    assert g == [
        {"train.learning_rate": 1e-3, "train.seed": 0},
        {"train.learning_rate": 1e-3, "train.seed": 1},
        {"train.learning_rate": 3e-4, "train.seed": 0},
        {"train.learning_rate": 3e-4, "train.seed": 1},
    ]
    assert grid({"a.b": [1, 2]}, c=[3]) == [{"a.b": 1, "c": 3}, {"a.b": 2, "c": 3}]
    z = zip_(**{"train.learning_rate": [1e-3, 3e-4], "train.warmup_steps": [100, 50]})
    assert z == [
        {"train.learning_rate": 1e-3, "train.warmup_steps": 100},
        {"train.learning_rate": 3e-4, "train.warmup_steps": 50},
    ]
    with pytest.raises(ValueError, match="one length"):
        zip_(**{"a.x": [1, 2], "a.y": [1]})
    with pytest.raises(ValueError, match="list of values"):
        grid(**{"a.x": "abc"})
    p = product(variants("tiny", "mini"), z)
    assert len(p) == 4 and p[1] == {"config_arg": "tiny", **z[1]}
    with pytest.raises(ValueError, match="set by two factors"):
        product(z, grid(**{"train.warmup_steps": [1]}))
    assert concat(g[:1], z) == [g[0], *z]


def test_point_names_are_readable_unique_stable_and_safe():
    points = product(variants("sst2,mini", "cola,mini"), grid(**{"train.seed": [0, 1]}))
    points = [{**p, "train.num_epochs": 2.0} for p in points]  # the same everywhere: not named
    names = point_names(points)
    assert names == ["sst2-mini,seed=0", "sst2-mini,seed=1", "cola-mini,seed=0", "cola-mini,seed=1"]
    assert point_names(points) == names  # stable
    lr = point_names(grid(**{"train.learning_rate": [3e-5, 1e-4], "train.seed": [1]}))
    assert lr == ["lr=3e-05", "lr=0.0001"]
    # Two keys with the same last component keep their full names; odd characters go.
    both = point_names(
        zip_(
            **{
                "train.batch_size": [8, 16],
                "eval.batch_size": [8, 32],
                "data.corpus": ["a/b c", "d"],
            }
        )
    )
    assert both == [
        "train.batch_size=8,eval.batch_size=8,corpus=a_b_c",
        "train.batch_size=16,eval.batch_size=32,corpus=d",
    ]
    long = point_names([{"data.corpus": "x" * 300}, {"data.corpus": "y" * 300}])
    assert all(len(n) <= 100 for n in long) and long[0] != long[1]
    assert point_names([{"train.seed": 0}]) == ["seed=0"]  # one point: named by its keys
    assert point_names([{}]) == ["default"]
    with pytest.raises(ValueError, match="points 0 and 2 are the same"):
        point_names([{"train.seed": 0}, {"train.seed": 1}, {"train.seed": 0}])


def test_load_sweep_builds_checked_commands(tmp_path):
    path = _config(tmp_path)
    s = load_sweep(path, str(tmp_path / "sw"), ["--config.train.num_steps=6"])
    assert s.swept == ["train.learning_rate", "train.seed"]
    assert len(s.points) == 6 and len({p.workdir for p in s.points}) == 6
    p = s.points[1]
    assert (p.name, p.command, p.num_steps, p.main_metric) == (
        "lr=0.001,seed=1",
        "pretrain",
        6,
        "eval/loss",
    )
    assert list(p.argv) == [
        sys.executable,
        "-m",
        "flaxbert.cli",
        "pretrain",
        "--config",
        path,
        "--workdir",
        str(tmp_path / "sw" / "lr=0.001,seed=1"),
        "--config.train.num_steps=6",
        "--config.train.learning_rate=0.001",
        "--config.train.seed=1",
    ]
    # A config with a task key fine-tunes; its main metric heads the summary.
    ft = load_sweep(_config(tmp_path, task=FINETUNE, name="ft.py"), str(tmp_path / "f"))
    assert ft.points[0].command == "finetune" and ft.points[0].main_metric == "eval/accuracy"
    forced = load_sweep(path, str(tmp_path / "sw"), command="finetune")
    assert forced.points[0].argv[3] == "finetune"
    # Variants: the point's config_arg replaces ARG; get_sweep gets ARG.
    v = _config(
        tmp_path,
        points='[{"config_arg": a, "train.seed": 1} for a in arg.split("+")]',
        sweep_arg="arg",
        name="v.py",
    )
    vs = load_sweep(v + ":small+large", str(tmp_path / "v"))
    assert [p.name for p in vs.points] == ["small", "large"]
    assert vs.points[1].argv[4:6] == ("--config", v + ":large")
    assert vs.swept == ["config_arg"]
    # get_sweep(arg) without a default gets '' when no ARG is given.
    required = _config(tmp_path, points='[{"train.seed": len(arg)}]', sweep_arg="arg", name="r.py")
    assert load_sweep(required, str(tmp_path / "r")).points[0].overrides == {"train.seed": 0}
    # get_sweep() without an argument.
    noarg = _config(tmp_path, points='[{"train.seed": 1}]', sweep_arg="", name="n.py")
    assert load_sweep(noarg + ":x", str(tmp_path / "n")).points[0].config_arg == "x"


def test_bad_points_stop_before_anything_runs(tmp_path):
    bad = _config(tmp_path, points='grid(**{"train.lerning_rate": [1.0, 2.0]})', name="bad.py")
    with pytest.raises(ConfigError, match=r"point 'lerning_rate=1.0'.*train.learning_rate"):
        load_sweep(bad, str(tmp_path / "b"))
    wrong = _config(tmp_path, points='grid(**{"train.num_steps": ["many", 3]})', name="w.py")
    with pytest.raises(ConfigError, match="steps=many"):
        load_sweep(wrong, str(tmp_path / "w"))
    nosweep = tmp_path / "plain.py"
    nosweep.write_text("def get_config(arg=''):\n    return None\n")
    with pytest.raises(ConfigError, match="no get_sweep"):
        load_sweep(str(nosweep), str(tmp_path / "p"))
    assert not (tmp_path / "b").exists() and not (tmp_path / "w").exists()


# --- running ---------------------------------------------------------------------------


def test_finished_points_are_skipped_and_interrupted_ones_run_again(tmp_path):
    root = tmp_path / "sw"
    s = load_sweep(_config(tmp_path, task=FINETUNE), str(root))
    names = [p.name for p in s.points]
    _fake_finished(root / names[0], step=4)  # finished
    _fake_finished(root / names[1], step=2)  # preempted at step 2 of 4: final step too low
    (root / names[2]).mkdir()  # interrupted before its first evaluation
    (root / names[2] / "log.txt").write_text("the first attempt\n")
    runner, out = FakeRunner(), io.StringIO()
    assert run_sweep(s, runner=runner, out=out) == 0
    assert runner.calls == names[1:]
    text = out.getvalue()
    assert f"[1/6] {names[0]}: finished, skipped" in text
    assert f"[2/6] {names[1]}: resuming" in text and f"[4/6] {names[3]}: running" in text
    assert "all 6 points done" in text
    log = (root / names[2] / "log.txt").read_text().splitlines()
    assert log[0] == "the first attempt" and log[1].startswith("=== flaxbert sweep, ")
    assert log[1].endswith(shell(s.points[2].argv)) and log[2] == f"training {names[2]}"
    listed = json.loads((root / "sweep.json").read_text())
    assert [p["name"] for p in listed["points"]] == names
    assert listed["points"][3]["shell"] == shell(s.points[3].argv)
    assert listed["swept"] == ["train.learning_rate", "train.seed"]
    # A second run finds everything finished.
    again = FakeRunner()
    assert run_sweep(s, runner=again, out=io.StringIO()) == 0 and again.calls == []


def test_finished_by_epochs_means_the_last_step_was_evaluated(tmp_path):
    _fake_finished(tmp_path / "a", step=4)
    assert is_finished(str(tmp_path / "a"), 0) and is_finished(str(tmp_path / "a"), 4)
    assert not is_finished(str(tmp_path / "a"), 5)
    final = json.loads((tmp_path / "a" / "final_metrics.json").read_text())
    final["step"] = 3  # preempted after the step-2 evaluation
    (tmp_path / "a" / "final_metrics.json").write_text(json.dumps(final))
    with open(tmp_path / "a" / "metrics.jsonl", "w") as f:
        f.write(json.dumps({"step": 2, "eval/accuracy": 0.5}) + "\n")
    assert not is_finished(str(tmp_path / "a"), 0)
    assert not is_finished(str(tmp_path / "missing"), 0)


def test_parallel_runs_points_at_the_same_time(tmp_path):
    s = load_sweep(_config(tmp_path, points=LR_SEED.replace(", 2]", "]")), str(tmp_path / "s"))
    barrier = threading.Barrier(2, timeout=20)  # breaks unless two points run together

    def runner(point, log):
        barrier.wait()
        return FakeRunner()(point, log)

    assert run_sweep(s, parallel=2, runner=runner, out=io.StringIO()) == 0


FAKE_FLAXBERT = """
import json, os, sys
args = sys.argv[1:]
workdir = args[args.index("--workdir") + 1]
values = dict(a[len("--config."):].split("=", 1) for a in args if a.startswith("--config."))
print("fake", args[0], "in", workdir)
if values["train.learning_rate"] == "0.0003" and values["train.seed"] == "1":
    print("loading data...")
    print("ValueError: something went wrong", file=sys.stderr)
    sys.exit(3)
acc = 0.5 + 100 * float(values["train.learning_rate"]) + 0.01 * int(values["train.seed"])
with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
    f.write(json.dumps({"step": 4, "eval/loss": 1.0, "eval/accuracy": acc}) + "\\n")
with open(os.path.join(workdir, "final_metrics.json"), "w") as f:
    json.dump({"step": 4, "eval/loss": 1.0, "eval/accuracy": acc, "wall_time_s": 1.5}, f)
"""


def test_failed_point_is_reported_and_the_sweep_goes_on(tmp_path):
    fake = tmp_path / "fake_flaxbert.py"
    fake.write_text(FAKE_FLAXBERT)
    root = tmp_path / "sw"
    s = load_sweep(
        _config(tmp_path, task=FINETUNE), str(root), launcher=[sys.executable, str(fake)]
    )
    out = io.StringIO()
    assert run_sweep(s, out=out) == 1
    text = out.getvalue()
    assert "[5/6] lr=0.0003,seed=1: FAILED, exit code 3 after" in text
    assert "ValueError: something went wrong" in text and "loading data..." in text
    assert "1 of 6 points failed: lr=0.0003,seed=1" in text
    assert "[6/6] lr=0.0003,seed=2: done" in text  # the one after the failure still ran
    log = (root / "lr=0.0003,seed=1" / "log.txt").read_text()
    assert "fake finetune in" in log and "ValueError: something went wrong" in log
    status = json.loads((root / "lr=0.0003,seed=1" / "sweep_status.json").read_text())
    assert status["returncode"] == 3 and not status["finished"]
    rows = list(csv.DictReader(open(root / "summary.csv")))
    assert [r["status"] for r in rows] == ["done"] * 4 + ["failed", "done"]
    assert float(rows[1]["eval/accuracy"]) == pytest.approx(_accuracy(0.001, 1))


def test_a_command_that_cannot_start_is_a_failed_point(tmp_path):
    s = load_sweep(
        _config(tmp_path, points='[{"train.seed": 1}]'),
        str(tmp_path / "s"),
        launcher=[str(tmp_path / "no-such-python")],
    )
    out = io.StringIO()
    assert run_sweep(s, out=out) == 1
    assert "seed=1: FAILED, could not run it (FileNotFoundError" in out.getvalue()
    assert point_status(s.points[0].workdir, 4) == "failed"


SLEEPER = """
import signal, sys, time
def stop(*_):
    print("SIGTERM: checkpoint saved", flush=True)
    sys.exit(0)
signal.signal(signal.SIGTERM, stop)
print("training", flush=True)
time.sleep(60)
"""


def test_a_run_that_exits_0_without_finishing_is_a_failure(tmp_path):
    s = load_sweep(_config(tmp_path, points='[{"train.seed": 1}]'), str(tmp_path / "s"))
    out = io.StringIO()
    assert run_sweep(s, runner=lambda p, log: 0, out=out) == 1
    assert "exit code 0 but not finished (step 4 not reached)" in out.getvalue()
    assert point_status(s.points[0].workdir, 4) == "incomplete"


def test_dry_run_prints_the_commands_and_runs_nothing(tmp_path):
    root = tmp_path / "sw"
    s = load_sweep(_config(tmp_path), str(root))
    _fake_finished(root / "lr=0.001,seed=0")
    out = io.StringIO()
    dry_run(s, out)
    lines = out.getvalue().splitlines()
    assert len(lines) == 12
    assert lines[0] == "# lr=0.001,seed=0 (finished: would be skipped)"
    assert lines[2] == "# lr=0.001,seed=1"
    assert lines[3] == shell(s.points[1].argv)
    assert f"--workdir {root}/lr=0.001,seed=1 --config.train.learning_rate" in lines[3]
    assert sorted(os.listdir(root)) == ["lr=0.001,seed=0"]


def test_emit_slurm_writes_an_array_script_that_runs_one_point(tmp_path, repo_root):
    fake = tmp_path / "fake_flaxbert.py"
    fake.write_text(FAKE_FLAXBERT)
    root = tmp_path / "sw"
    s = load_sweep(_config(tmp_path), str(root), launcher=[sys.executable, str(fake)])
    path = emit_slurm(s, parallel=2)
    text = open(path).read()
    assert path == str(root / "sweep.sbatch") and os.access(path, os.X_OK)
    assert "#SBATCH --array=0-5%2" in text and f"#SBATCH --output={root}/slurm-%A_%a.out" in text
    assert "names=(lr=0.001,seed=0 lr=0.001,seed=1" in text and "steps=(4 4 4 4 4 4)" in text
    for i, p in enumerate(s.points):
        assert f'  {i}) cmd=("$PYTHON" {shell(p.argv[1:])}) ;;' in text
    assert f"sbatch {path}" in text and f"flaxbert sweep-summary {root}" in text
    # The script runs as is, outside SLURM: task 1 runs its point, then skips it.
    env = {**os.environ, "SLURM_ARRAY_TASK_ID": "1", "PYTHONPATH": str(repo_root)}
    for expected in ("", "lr=0.001,seed=1: finished, skipped"):
        done = subprocess.run(["bash", path], env=env, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == expected
    assert is_finished(str(root / "lr=0.001,seed=1"), 4)
    assert "fake pretrain" in (root / "lr=0.001,seed=1" / "log.txt").read_text()
    failed = {**env, "SLURM_ARRAY_TASK_ID": "4"}  # lr=0.0003,seed=1 exits 3
    done = subprocess.run(["bash", path], env=failed, capture_output=True, text=True, timeout=60)
    assert done.returncode == 3


# --- summary ---------------------------------------------------------------------------


def _finished_sweep(tmp_path, task=FINETUNE):
    root = tmp_path / "sw"
    s = load_sweep(_config(tmp_path, task=task), str(root))
    run_sweep(s, runner=FakeRunner(fail={"lr=0.0003,seed=2"}), out=io.StringIO())
    return s, root


def test_summary_rows_means_and_standard_deviations_over_seeds(tmp_path):
    s, root = _finished_sweep(tmp_path)
    (root / "lr=0.001,seed=0" / "test_metrics.json").write_text(
        json.dumps({"best_step": 2, "test/accuracy": 0.7})
    )
    paths = sweep_summary.write_summary(str(root))
    assert [os.path.basename(p) for p in paths] == [
        "summary.csv",
        "summary.md",
        "summary_by_seed.csv",
        "summary.png",
    ]
    rows = list(csv.DictReader(open(root / "summary.csv")))
    assert list(rows[0])[:5] == ["name", "status", "train.learning_rate", "train.seed", "step"]
    assert [r["name"] for r in rows] == [p.name for p in s.points]
    assert [r["status"] for r in rows] == ["done"] * 5 + ["failed"]
    r = rows[4]  # lr=0.0003,seed=1
    assert (r["train.learning_rate"], r["train.seed"], r["step"]) == ("0.0003", "1", "4")
    assert float(r["eval/accuracy"]) == pytest.approx(_accuracy(3e-4, 1))
    assert float(r["best/eval/accuracy"]) == pytest.approx(_accuracy(3e-4, 1) + 0.1)
    assert r["best/step"] == "2" and r["wall_time_s"] == "10.0"
    assert rows[0]["test/accuracy"] == "0.7" and rows[1]["test/accuracy"] == ""
    assert rows[5]["eval/accuracy"] == ""

    grouped = list(csv.DictReader(open(root / "summary_by_seed.csv")))
    assert [(g["train.learning_rate"], g["n"]) for g in grouped] == [
        ("0.001", "3"),
        ("0.0003", "2"),
    ]
    accs = [_accuracy(1e-3, k) for k in range(3)]
    assert float(grouped[0]["eval/accuracy mean"]) == pytest.approx(statistics.mean(accs))
    assert float(grouped[0]["eval/accuracy std"]) == pytest.approx(statistics.stdev(accs))
    accs = [_accuracy(3e-4, k) for k in range(2)]  # the failed seed is left out
    assert float(grouped[1]["eval/accuracy std"]) == pytest.approx(statistics.stdev(accs))

    md = (root / "summary.md").read_text()
    assert "6 points: 5 done, 1 failed, 0 incomplete, 0 missing." in md
    assert "| name | status | train.learning_rate | train.seed | step |" in md
    assert f"| lr=0.0003,seed=1 | done | 0.0003 | 1 | 4 | {_accuracy(3e-4, 1):.4f} | 1.0000 |" in md
    assert "## Mean and standard deviation over train.seed (finished points)" in md
    m, sd = statistics.mean(accs), statistics.stdev(accs)
    assert f"| 0.0003 | 2 | {m:.4f} ± {sd:.4f} |" in md
    png = (root / "summary.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 5000


def test_summary_of_pretraining_takes_the_best_evaluation_of_the_curve(tmp_path):
    root = tmp_path / "sw"
    s = load_sweep(_config(tmp_path, points='[{"train.seed": 0}, {"train.seed": 1}]'), str(root))
    write_sweep_json(s)
    _fake_finished(root / "seed=0", acc=0.6, loss=2.0, finetune=False)
    (root / "seed=1").mkdir(parents=True)  # started, not finished
    summary = sweep_summary.summarise(str(root))
    done, started = summary.rows
    assert done["best/eval/loss"] == 2.0 and done["best/eval/accuracy"] == pytest.approx(0.7)
    assert done["eval/accuracy"] == 0.6 and started["status"] == "incomplete"
    assert summary.metric == "eval/loss"
    # Only seeds swept: one group over both seeds, of which one finished.
    (group,) = summary.grouped
    assert group["n"] == 1 and group["eval/accuracy mean"] == 0.6
    assert math.isnan(group["eval/accuracy std"])
    with pytest.raises(ConfigError, match="no readable sweep.json"):
        sweep_summary.summarise(str(root / "nothing"))


def test_summary_figure_has_a_subplot_per_swept_key(tmp_path):
    rows = [
        {"status": "done", "config_arg": v, "train.learning_rate": lr, "train.seed": s, "m": acc}
        for v, base in (("tiny", 0.5), ("mini", 0.6))
        for lr in (1e-4, 1e-3, 1e-2)
        for s, acc in ((0, base), (1, base + 0.02))
    ]
    rows.append(
        {"status": "failed", "config_arg": "tiny", "train.learning_rate": 1e-1, "train.seed": 0}
    )
    from flaxbert.sweeps.plot import summary_figure

    fig = summary_figure(rows, ["config_arg", "train.learning_rate", "train.seed"], "m")
    axes = fig.axes
    assert [ax.get_xlabel() for ax in axes] == ["config_arg", "train.learning_rate"]
    # By variant: one colour (scatter + mean line) per learning rate; by lr: one per variant.
    assert len(axes[0].collections) == 3 and len(axes[0].lines) == 3
    assert len(axes[1].collections) == 2 and len(axes[1].lines) == 2
    assert axes[1].get_xscale() == "log"
    ticks = [t.get_text() for t in axes[1].get_xticklabels()]
    assert ticks == ["0.0001", "0.001", "0.01"]
    assert [t.get_text() for t in axes[0].get_xticklabels()] == ["tiny", "mini"]
    labels = [t.get_text() for t in axes[1].get_legend().get_texts()]
    assert labels == ["config_arg=tiny", "config_arg=mini"]
    tiny = axes[1].lines[0]
    assert list(tiny.get_xdata()) == [1e-4, 1e-3, 1e-2]
    assert list(tiny.get_ydata()) == pytest.approx([0.51] * 3)
    assert len(axes[1].collections[0].get_offsets()) == 6  # every finished point of tiny


# --- command line ----------------------------------------------------------------------


def test_help_lists_every_command_and_explains_the_flags():
    parser = cli.build_parser()
    text = parser.format_help()
    commands = next(a for a in parser._actions if a.dest == "command")
    for name, sub in commands.choices.items():
        assert name in text
        helps = {c.dest: c.help for c in commands._choices_actions}
        assert helps.get(name), f"{name} has no one-line help"
        for action in sub._actions:
            assert action.help, f"flaxbert {name} {action.option_strings}: no help"
    for name in ("sweep", "sweep-summary", "plot"):
        assert name in text
    flags = {
        "sweep": (
            "--config",
            "--workdir",
            "--parallel",
            "--dry-run",
            "--emit",
            "--command",
            "--metric",
        ),
        "sweep-summary": ("WORKDIR", "--metric"),
        "plot": ("WORKDIR", "--out", "--metrics"),
    }
    for name, expected in flags.items():
        help_text = commands.choices[name].format_help()
        assert all(f in help_text for f in expected), (name, help_text)


def test_cli_sweep_dry_run_and_summary(tmp_path, capsys, monkeypatch):
    path = _config(tmp_path)
    root = tmp_path / "sw"
    argv = ["sweep", "--config", path, "--workdir", str(root), "--config.train.num_steps=7"]
    assert cli.main([*argv, "--dry-run"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 12 and all("--config.train.num_steps=7" in line for line in out[1::2])
    assert not root.exists()
    assert cli.main([*argv, "--emit", "slurm", "--parallel", "3"]) == 0
    out = capsys.readouterr().out
    assert f"sbatch {root / 'sweep.sbatch'}" in out and (root / "sweep.json").exists()
    assert "#SBATCH --array=0-5%3" in (root / "sweep.sbatch").read_text()
    assert cli.main(["sweep-summary", str(root)]) == 0
    assert "6 points: 0 done, 0 failed, 0 incomplete, 6 missing." in capsys.readouterr().out
    assert cli.main(["sweep", "--config", path, "--workdir", str(root), "--config.x=1"]) == 2
    assert "unknown config key 'x'" in capsys.readouterr().err
    assert cli.main(["sweep-summary", str(tmp_path / "none")]) == 2


def test_example_sweep_configs_expand(repo_root, tmp_path, monkeypatch):
    monkeypatch.chdir(repo_root)
    sst2 = load_sweep("configs/sweeps/sst2_lr_seed.py", str(tmp_path / "a"))
    assert len(sst2.points) == 9 and sst2.points[4].name == "lr=0.0001,seed=1"
    assert {p.command for p in sst2.points} == {"finetune"}
    assert sst2.points[0].main_metric == "eval/accuracy"
    pre = load_sweep("configs/sweeps/pretrain_tiny.py", str(tmp_path / "b"))
    assert [p.name for p in pre.points][:2] == ["tiny,lr=0.0003", "tiny,lr=0.001"]
    assert {p.command for p in pre.points} == {"pretrain"} and pre.points[-1].config_arg == "mini"
    assert pre.points[0].num_steps == 1000 and pre.points[0].main_metric == "eval/loss"
    doc = textwrap.dedent(open("configs/sweeps/sst2_lr_seed.py").read())
    assert "flaxbert sweep --config configs/sweeps/sst2_lr_seed.py" in doc
