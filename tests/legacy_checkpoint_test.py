"""Workdirs written by an earlier flaxbert (tests/data/legacy-69bd0e6, made at commit 69bd0e6
by tests/data/make_legacy_workdirs.sh, before the training loop was shared) still resume and
fine-tune: a refactor must keep the checkpoint layout and meta readable."""

import json
import shutil

import jax
import numpy as np
import pytest
from shared_data import DATA, require

from flaxbert import checkpoint as ckpt
from flaxbert.config import load_config
from flaxbert.finetune import finetune
from flaxbert.train import pretrain

pytestmark = pytest.mark.usefixtures("fast_compiles")

LEGACY = "legacy-69bd0e6"
MODEL = [
    "--config.model.hidden_size=16",
    "--config.model.num_layers=2",
    "--config.model.num_heads=2",
    "--config.model.intermediate_size=32",
    "--config.model.max_position_embeddings=32",
]


@pytest.fixture
def legacy(repo_root, tmp_path):
    """A copy of the legacy workdirs (tests never write into tests/data)."""
    src = repo_root / "tests" / "data" / LEGACY
    shutil.copytree(src, tmp_path / LEGACY)
    return tmp_path / LEGACY


def _corpus(tmp_path):
    """The text the legacy pre-training read: the first 3000 lines of the shared English
    corpus, a blank line before every 150th (as make_legacy_workdirs.sh writes it)."""
    require(DATA / "corpus" / "en_gutenberg.txt")
    lines = []
    with open(DATA / "corpus" / "en_gutenberg.txt", encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if n > 3000:
                break
            if n % 150 == 0:
                lines.append("\n")
            lines.append(line)
    path = tmp_path / "en.txt"
    path.write_text("".join(lines), encoding="utf-8")
    return path


def test_legacy_pretraining_checkpoint_resumes(repo_root, legacy, tmp_path):
    corpus = _corpus(tmp_path)
    config = load_config(
        str(repo_root / "configs/pretrain.py") + ":tiny",
        [
            *MODEL,
            f"--config.data.corpus={corpus}",
            f"--config.data.cache_dir={tmp_path / 'cache'}",
            "--config.data.vocab_size=500",
            "--config.model.vocab_size=500",
            "--config.data.max_seq_length=32",
            "--config.data.max_predictions_per_seq=5",
            "--config.train.batch_size=8",
            "--config.train.num_steps=6",  # the legacy run stopped at 4
            "--config.train.warmup_steps=1",
            "--config.eval.every_steps=6",
            "--config.eval.num_batches=1",
            "--config.eval.batch_size=8",
            "--config.checkpoint.every_steps=2",
            "--config.checkpoint.async_save=false",
        ],
    )
    result = pretrain(config, str(legacy / "pretrain"))
    assert (result.start_step, result.final_step) == (4, 6)
    assert np.isfinite(result.eval_metrics["eval/mlm_loss"])
    _, meta = ckpt.read_meta(str(legacy / "pretrain"))
    assert meta["step"] == 6


def test_legacy_pretraining_checkpoint_fine_tunes(repo_root, legacy):
    """A frozen encoder is never updated, so after fine-tuning it must still equal the legacy
    checkpoint's encoder exactly: the restore put every array where it belongs."""
    require(DATA / "tasks" / "sst2")
    config = load_config(
        str(repo_root / "configs/finetune.py") + ":sst2,tiny",
        [
            *MODEL,
            f"--config.init_from={legacy / 'pretrain'}",
            "--config.freeze_encoder=true",
            "--config.data.train_limit=32",
            "--config.data.eval_limit=16",
            "--config.data.max_seq_length=32",
            "--config.train.batch_size=8",
            "--config.train.num_steps=2",
            "--config.eval.batch_size=8",
            "--config.checkpoint.async_save=false",
        ],
    )
    result = finetune(config, str(legacy / "ft-new"))
    assert "bert/embeddings" in result.restored_groups
    saved = ckpt.host_params(ckpt.read_meta(str(legacy / "pretrain"))[0])["bert"]
    tuned = jax.device_get(result.state.params["bert"])
    assert jax.tree.structure(tuned) == jax.tree.structure(saved)
    for a, b in zip(jax.tree.leaves(tuned), jax.tree.leaves(saved), strict=True):
        np.testing.assert_array_equal(a, b)
    assert 0.0 <= result.eval_metrics["eval/accuracy"] <= 1.0


def test_legacy_finetuning_checkpoint_resumes(repo_root, legacy):
    require(DATA / "tasks" / "sst2")
    workdir = legacy / "finetune"
    legacy_best = json.loads((workdir / "final_metrics.json").read_text())["best"]
    config = load_config(
        str(repo_root / "configs/finetune.py") + ":sst2,tiny",
        [
            *MODEL,
            f"--config.init_from={legacy / 'pretrain'}",
            "--config.data.train_limit=32",
            "--config.data.eval_limit=16",
            "--config.data.max_seq_length=32",
            "--config.train.batch_size=8",
            "--config.train.num_steps=6",  # the legacy run stopped at 4
            "--config.eval.every_steps=2",
            "--config.eval.batch_size=8",
            "--config.checkpoint.async_save=false",
        ],
    )
    result = finetune(config, str(workdir))
    assert (result.start_step, result.final_step) == (4, 6)
    # The best evaluation so far came back from the legacy meta: the best is the legacy one
    # unless step 6 beat it.
    best = result.best_metrics
    if best["step"] != 6:
        assert best == legacy_best
    else:
        assert best["eval/accuracy"] > legacy_best["eval/accuracy"]
