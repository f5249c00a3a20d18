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
