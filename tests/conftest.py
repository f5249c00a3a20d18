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
