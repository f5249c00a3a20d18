"""Test set-up: 8 fake CPU devices, set before JAX is imported anywhere."""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import logging  # noqa: E402
import pathlib  # noqa: E402

import pytest  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parent.parent


# Test files, longest first: those holding one long subprocess run (a 600-step pre-training, a
# benchmark end to end, a kill and resume), then those with the most time in all (a
# `--durations` run of the suite on the 2-core machine, 2026-12-01). With `--dist loadfile
# --no-loadscope-reorder` (pyproject's addopts) xdist hands whole files to the two workers in
# this order, so the short files come last and the workers finish together; ordered by their
# number of tests (xdist's default), the long single-test files ran last, one worker waiting.
LONGEST_FIRST = (
    "resume_test.py",
    "cli_test.py",
    "pretrain_then_finetune_test.py",
    "evaluate_suite_test.py",
    "gpu_suite_test.py",
    "finetune_test.py",
    "checkpoint_test.py",
    "cli_errors_test.py",
    "sharding_test.py",
    "convert_test.py",
    "finetune_resume_test.py",
    "speed_features_test.py",
    "slurm_test.py",
    "multihost_test.py",
    "legacy_checkpoint_test.py",
    "model_test.py",
    "train_test.py",
    "freeze_encoder_test.py",
    "sources_test.py",
    "nonfinite_lr_test.py",
)


def pytest_collection_modifyitems(items):
    """Longest test files first (`LONGEST_FIRST`), the rest after them in their own order."""
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


@pytest.fixture(autouse=True)
def _root_log_handlers_restored():
    """Each test leaves the root logger's handlers as it found them. `flaxbert.cli.main` run in
    a test process calls `logging.basicConfig(force=True)`, whose handler writes to that
    test's captured stderr; once the capture is closed, any later log record (in another test
    of the same worker) would print a 'Logging error' traceback into that test's stderr."""
    root = logging.getLogger()
    handlers = root.handlers[:]
    yield
    root.handlers[:] = handlers


@pytest.fixture(scope="session")
def repo_root() -> pathlib.Path:
    return REPO


@pytest.fixture(scope="module")
def fast_compiles():
    """XLA's optimisation passes mostly off: compiling dominates tiny runs, and partitioning,
    collectives and numerics of the ops are the same."""
    import jax

    old = jax.config.values["jax_disable_most_optimizations"]
    jax.config.update("jax_disable_most_optimizations", True)
    yield
    jax.config.update("jax_disable_most_optimizations", old)
