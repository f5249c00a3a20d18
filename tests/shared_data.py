"""The real corpora and tasks in ../shared/data, and a marker for tests that need them."""

import pathlib

import pytest

DATA = pathlib.Path(__file__).resolve().parent.parent.parent / "shared" / "data"
KO_CORPUS = DATA / "corpus" / "ko_nsmc_reviews.txt"
EN_CORPUS = DATA / "corpus" / "en_gutenberg.txt"
needs_data = pytest.mark.skipif(
    not KO_CORPUS.exists() or not EN_CORPUS.exists(),
    reason=f"the real corpora are not at {DATA / 'corpus'} (<repo>/../shared/data)",
)


def corpus_head(name: str, lines: int, out) -> pathlib.Path:
    """Copies the first `lines` lines of a shared corpus to `out` (a path under tmp_path);
    skips the test, saying why, where ../shared/data is absent (a user's machine). CI and
    the developers' machines have it, so these tests run there."""
    src = DATA / "corpus" / name
    if not src.exists():
        pytest.skip(f"shared corpus {src} is absent (<repo>/../shared/data)")
    out = pathlib.Path(out)
    with open(src, encoding="utf-8") as f, open(out, "w", encoding="utf-8") as g:
        for _, line in zip(range(lines), f, strict=False):
            g.write(line)
    return out
