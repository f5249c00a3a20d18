"""The real corpora and tasks in ../shared/data, and the one place that decides what a test
does when they are absent: on a user's machine it is skipped, saying why; under CI (`CI` set
to anything but empty, 0, false or no, as CI services do) it fails, since CI has the data and
a silent skip there would hide every test that reads it.

`FLAXBERT_SHARED_DATA` points elsewhere than <repo>/../shared/data."""

import functools
import os
import pathlib

import pytest

DATA = pathlib.Path(
    os.environ.get("FLAXBERT_SHARED_DATA")
    or pathlib.Path(__file__).resolve().parent.parent.parent / "shared" / "data"
)
KO_CORPUS = DATA / "corpus" / "ko_nsmc_reviews.txt"
EN_CORPUS = DATA / "corpus" / "en_gutenberg.txt"
TASKS = DATA / "tasks"
# Everything the tests read: under CI, one missing path fails the import of this module, so
# every test file that uses the data fails at collection (whatever its own skip says).
TASK_NAMES = "nsmc korsts kornli klue_ner sst2 cola mrpc rte stsb wikiann_en wnut17 squad_v1"
USED = (KO_CORPUS, EN_CORPUS, *(TASKS / name for name in TASK_NAMES.split()))


def in_ci(environ=os.environ) -> bool:
    return environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def missing(what, environ=os.environ):
    """Skips the calling test (fails it under CI), naming what is absent."""
    message = f"{what} is absent (<repo>/../shared/data, or FLAXBERT_SHARED_DATA)"
    if in_ci(environ):
        pytest.fail(f"{message}; under CI the shared data must be there", pytrace=False)
    pytest.skip(message)


def require(*paths: pathlib.Path, environ=os.environ) -> None:
    """Skips the calling test (fails it under CI) unless every path exists."""
    absent = [str(p) for p in paths if not p.exists()]
    if absent:
        missing(", ".join(absent), environ)


def needs_data(test):
    """Decorator: the test reads both shared corpora."""

    @functools.wraps(test)
    def run(*args, **kwargs):
        require(KO_CORPUS, EN_CORPUS)
        return test(*args, **kwargs)

    return run


def corpus_head(name: str, lines: int, out) -> pathlib.Path:
    """Copies the first `lines` lines of a shared corpus to `out` (a path under tmp_path)."""
    src = DATA / "corpus" / name
    require(src)
    out = pathlib.Path(out)
    with open(src, encoding="utf-8") as f, open(out, "w", encoding="utf-8") as g:
        for _, line in zip(range(lines), f, strict=False):
            g.write(line)
    return out


if in_ci() and not all(p.exists() for p in USED):
    raise RuntimeError(
        "CI is set but the shared data the tests read is absent: "
        + ", ".join(str(p) for p in USED if not p.exists())
        + " (put ../shared/data beside the repository, or set FLAXBERT_SHARED_DATA)"
    )
