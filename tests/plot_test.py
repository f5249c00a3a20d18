"""`flaxbert plot` curves, and TensorBoard events that hold what metrics.jsonl holds.

Pre-training and fine-tuning write every metrics.jsonl row through `monitor.MetricWriter`,
which writes the same scalars to TensorBoard; the events are read back here with
`logs.read_tensorboard_scalars` (tensorboardX's protobufs, no TensorBoard install). A real
training run is not used: a 4-step tiny one took 33 s on the 2-core machine.
"""

import json
import os
import time

import pytest

from flaxbert import cli
from flaxbert.monitor import MetricWriter
from flaxbert.sweeps import logs, plot

PRETRAIN_KEYS = ["loss", "mlm_accuracy", "nsp_accuracy", "learning_rate", "grad_norm"]
EVAL_KEYS = ["eval/loss", "eval/mlm_accuracy", "eval/nsp_accuracy"]


def _write_run(workdir, rows):
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)


def _pretrain_rows(scale, steps=(10, 20, 30, 40)):
    rows = []
    for s in steps:
        rows.append({"step": s, **{k: scale * s + i for i, k in enumerate(PRETRAIN_KEYS)}})
        if s % 20 == 0:
            rows.append({"step": s, **{k: scale * s - i for i, k in enumerate(EVAL_KEYS)}})
    return rows


def test_default_metrics_for_pretraining_and_finetuning():
    assert plot.default_metrics(["step", *PRETRAIN_KEYS, *EVAL_KEYS]) == [
        "loss",
        "eval/loss",
        "mlm_accuracy",
        "nsp_accuracy",
        "eval/mlm_accuracy",
        "eval/nsp_accuracy",
    ]
    finetune = ["step", "loss", "learning_rate", "examples_per_sec", "eval/loss"]
    assert plot.default_metrics(finetune + ["eval/accuracy", "eval/f1", "test/accuracy"]) == [
        "loss",
        "eval/loss",
        "eval/accuracy",
        "eval/f1",
    ]
    assert plot.default_metrics(finetune + ["eval/pearson", "eval/spearman"])[2:] == [
        "eval/pearson",
        "eval/spearman",
    ]
    assert plot.default_metrics(finetune + ["eval/matthews_corrcoef"])[-1] == (
        "eval/matthews_corrcoef"
    )


def test_run_labels_are_unique():
    assert plot.run_labels(["runs/a", "runs/b/"]) == ["a", "b"]
    assert plot.run_labels(["x/sw/seed=1", "y/sw/seed=1"]) == ["x/sw/seed=1", "y/sw/seed=1"]


def test_curves_of_several_runs_on_one_figure(tmp_path):
    a, b, ft = tmp_path / "tiny", tmp_path / "mini", tmp_path / "sst2"
    _write_run(a, _pretrain_rows(1.0))
    _write_run(b, _pretrain_rows(2.0, steps=(10, 20)))
    ft_rows = [
        {"step": 5, "loss": 0.7, "learning_rate": 1e-4},
        {"step": 10, "loss": 0.6, "learning_rate": 1e-4},
        {"step": 10, "eval/loss": 0.65, "eval/accuracy": 0.6, "eval/f1": 0.55},
        {"step": 10, "test/accuracy": 0.58},
    ]
    _write_run(ft, ft_rows)
    data = plot.curves([str(a), str(b), str(ft)])
    assert list(data) == [
        "loss",
        "eval/loss",
        "mlm_accuracy",
        "nsp_accuracy",
        "eval/accuracy",
        "eval/f1",
        "eval/mlm_accuracy",
        "eval/nsp_accuracy",
    ]
    assert [c.run for c in data["loss"]] == ["tiny", "mini", "sst2"]
    tiny_loss = data["loss"][0]
    assert tiny_loss.steps == [10, 20, 30, 40] and tiny_loss.values == [10.0, 20.0, 30.0, 40.0]
    assert data["eval/loss"][1].steps == [20] and data["eval/loss"][1].values == [40.0]
    assert [c.run for c in data["eval/f1"]] == ["sst2"]
    assert [c.run for c in data["mlm_accuracy"]] == ["tiny", "mini"]

    out = tmp_path / "curves.png"
    fig = plot.plot_runs([str(a), str(b), str(ft)], str(out))
    assert [ax.get_title() for ax in fig.axes] == list(data)
    for ax, (metric, lines) in zip(fig.axes, data.items(), strict=True):
        assert [line.get_label() for line in ax.get_lines()] == [c.run for c in lines], metric
        assert [list(line.get_xdata()) for line in ax.get_lines()] == [c.steps for c in lines]
        assert ax.get_xlabel() == "step"
    png = out.read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000

    chosen = plot.curves([str(a), str(ft)], ["loss", "test/accuracy"])
    assert list(chosen) == ["loss", "test/accuracy"] and len(chosen["loss"]) == 2
    with pytest.raises(ValueError, match="eval/bleu in no run; the runs have: eval/accuracy"):
        plot.curves([str(ft)], ["eval/bleu"])
    with pytest.raises(ValueError, match="no metrics.jsonl rows"):
        plot.curves([str(tmp_path / "nothing")])


def test_cli_plot(tmp_path, capsys):
    _write_run(tmp_path / "r1", _pretrain_rows(1.0))
    _write_run(tmp_path / "r2", _pretrain_rows(3.0))
    out = tmp_path / "figs" / "c.png"
    argv = ["plot", str(tmp_path / "r1"), str(tmp_path / "r2"), "--out", str(out)]
    assert cli.main([*argv, "--metrics", "loss,eval/nsp_accuracy"]) == 0
    assert f"wrote {out}: 2 run(s); loss, eval/nsp_accuracy" in capsys.readouterr().out
    assert out.read_bytes().startswith(b"\x89PNG")
    assert cli.main([*argv, "--metrics", "nope"]) == 2
    assert "nope in no run" in capsys.readouterr().err


def _events_match_jsonl(workdir):
    rows = logs.read_metrics(workdir)
    scalars = logs.read_tensorboard_scalars(os.path.join(workdir, "tensorboard"))
    expected: dict[str, list] = {}
    for r in rows:
        for k, v in r.items():
            if k != "step":
                expected.setdefault(k, []).append((r["step"], v))
    assert sorted(scalars) == sorted(expected)
    for key, points in expected.items():
        assert [s for s, _ in scalars[key]] == [s for s, _ in points], key
        got = [v for _, v in scalars[key]]
        assert got == pytest.approx([v for _, v in points], rel=1e-6), key
    return scalars


def test_tensorboard_events_hold_every_metrics_jsonl_scalar_after_a_resume(tmp_path):
    rows = _pretrain_rows(0.01, steps=(10, 20, 30, 40))
    w = MetricWriter(str(tmp_path))
    for r in rows:
        w.write(r["step"], {k: v for k, v in r.items() if k != "step"})
    w.close()
    # tensorboardX names event files by the second: a resumed writer must start in another.
    time.sleep(1.05)
    w = MetricWriter(str(tmp_path), resume_step=20)  # the checkpoint was at step 20
    for r in _pretrain_rows(0.02, steps=(30, 40)):
        w.write(r["step"], {k: v for k, v in r.items() if k != "step"})
    w.close()
    assert len(os.listdir(tmp_path / "tensorboard")) == 2
    scalars = _events_match_jsonl(str(tmp_path))
    # What TensorBoard shows: the first run up to step 20, then the resumed run.
    assert [s for s, _ in scalars["loss"]] == [10, 20, 30, 40]
    assert [v for _, v in scalars["loss"]] == pytest.approx([0.1, 0.2, 0.6, 0.8])
