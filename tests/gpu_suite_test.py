"""benchmarks/gpu_suite.py --smoke: every section of the GPU suite's code on a CPU, tiny shapes.

The suite runs in a child process on one CPU device (the 8 fake devices of conftest's
XLA_FLAGS are stripped: the suite measures one device, and one compiles faster), with
tensorflow_datasets and tensorboardX made unimportable, as on the GPU image that lacks them.
"""

import importlib.util
import json
import math
import os
import subprocess
import sys

# Unimportable in the child (a None entry in sys.modules fails the import and makes
# importlib.util.find_spec say absent), then the script runs as __main__.
_CHILD = (
    "import runpy, sys\n"
    "for name in {blocked!r}:\n"
    "    sys.modules[name] = None\n"
    "runpy.run_path({script!r}, run_name='__main__')\n"
)
SECTIONS = ("environment", "attention", "precision", "throughput", "max_batch_loader", "torch")
THROUGHPUT_HEADER = "| shape | batch | system | step ms | seq/s | tokens/s | model TFLOP/s | MFU |"


def _run_suite(repo_root, args, blocked, timeout):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    # XLA optimisation passes off: the smoke run is a few steps of many shapes, mostly compiling.
    env.update(PYTHONUNBUFFERED="1", JAX_PLATFORMS="cpu", JAX_DISABLE_MOST_OPTIMIZATIONS="1")
    code = _CHILD.format(blocked=blocked, script=str(repo_root / "benchmarks" / "gpu_suite.py"))
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        cwd=repo_root,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _positive(x) -> bool:
    return isinstance(x, int | float) and math.isfinite(x) and x > 0


def _non_negative(x) -> bool:
    return isinstance(x, int | float) and math.isfinite(x) and x >= 0


def test_smoke_writes_every_section(repo_root, tmp_path):
    out = tmp_path / "suite"
    result = _run_suite(
        repo_root,
        ["--smoke", str(out)],
        blocked=("tensorflow_datasets", "tensorboardX"),
        timeout=480,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    data = json.loads((out / "gpu_suite.json").read_text())
    assert data["suite"]["finished"] and data["suite"]["mode"] == "smoke"
    sections = data["sections"]
    assert set(sections) == set(SECTIONS)
    # The default budget (480 s) is far above what the smoke run takes: nothing was cut.
    assert not any("time budget" in s["status"] for s in sections.values()), sections

    env = sections["environment"]
    assert env["status"] == "done" and env["backend"] == "cpu" and env["jax"]
    assert env["not_needed_here"] == {"tensorflow_datasets": "absent", "tensorboardX": "absent"}

    attention = sections["attention"]
    assert attention["status"].startswith("n/a: cuDNN needs an NVIDIA GPU")
    for check, keys in (("function", ("forward", "grad")), ("model", ("loss", "grad"))):
        assert attention[check]["cudnn_vs_xla"] == "n/a: cuDNN needs an NVIDIA GPU"
        measured = attention[check]["xla_bf16_vs_f32"]
        assert all(_non_negative(measured[k]) for k in keys), measured
        assert measured["grad"] > 0  # bf16 rounding shows: the two really differ

    precision = sections["precision"]
    assert precision["status"] == "done"
    assert len(precision["bf16"]) == len(precision["float32"]) == precision["steps"] > 1
    assert all(_positive(x) for x in precision["bf16"] + precision["float32"])
    assert _non_negative(precision["max_abs_diff"]) and _non_negative(precision["final_abs_diff"])
    assert precision["max_abs_diff"] < 0.1  # bf16 tracks float32 over a few steps

    rows = sections["throughput"]["rows"]
    assert sections["throughput"]["status"] == "done" and len(rows) == 2
    for row in rows:
        assert row["status"] == "done" and row["system"] == "flaxbert"
        for key in ("step_ms", "seq_per_s", "tokens_per_s", "model_tflops", "first_loss"):
            assert _positive(row[key]), (key, row)
        assert row["mfu"] is None  # no peak is known for a CPU

    search = sections["max_batch_loader"]
    assert search["status"] == "done"
    assert search["max_batch"] >= 8 and _positive(search["bytes"])
    assert search["bytes"] <= search["limit_bytes"]
    loader = search["loader"]
    assert _positive(loader["loader_ms_per_step"]) and _positive(loader["preloaded_ms_per_step"])
    assert math.isfinite(loader["overhead_pct"])

    torch = sections["torch"]
    if importlib.util.find_spec("torch") and importlib.util.find_spec("transformers"):
        assert torch["status"] == "done"
        for row in torch["rows"]:
            assert row["system"] == "transformers (PyTorch)"
            for key in ("step_ms", "seq_per_s", "first_loss", "flaxbert_over_torch_throughput"):
                assert _positive(row[key]), (key, row)
    else:
        assert torch["status"].startswith("skipped: torch not installed")

    markdown = (out / "gpu_suite.md").read_text()
    assert THROUGHPUT_HEADER in markdown
    assert markdown.strip() in result.stdout  # also printed
    assert "## 6. transformers' PyTorch BertForPreTraining" in markdown


def test_missing_package_says_how_to_carry_it(repo_root, tmp_path):
    result = _run_suite(repo_root, [str(tmp_path)], blocked=("ml_collections",), timeout=60)
    assert result.returncode == 2
    assert "missing Python package(s): ml_collections" in result.stderr
    assert "launch/wheelhouse.sh .wheels" in result.stderr
    assert "--find-links .wheels ml_collections" in result.stderr
    assert not list(tmp_path.iterdir())  # it stopped before writing anything
