"""Checkpoints: retention, resharded and partial restore, bad checkpoints, non-finite steps.

The kill -9 / SIGTERM tests are in resume_test.py (they run the real CLI in a subprocess).
"""

import json
import logging
import os
import shutil
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
from tiny import tiny_overrides

from flaxbert import checkpoint as ckpt
from flaxbert import pretrain_step, train
from flaxbert.config import load_config
from flaxbert.data.pretraining import PretrainingBatches
from flaxbert.data.synthetic import VOCAB_SIZE, SyntheticCorpus

SEQ, PRED = 32, 5

TINY = [
    *tiny_overrides(SEQ, PRED),
    "--config.eval.num_batches=1",
    "--config.data.synthetic_documents=100",
    "--config.data.synthetic_eval_documents=20",
    "--config.train.log_every=1",
]
pytestmark = pytest.mark.usefixtures("fast_compiles")


def _config(repo_root, *extra, **parallel):
    overrides = [*TINY, *(f"--config.parallel.{k}={v}" for k, v in parallel.items()), *extra]
    return load_config(str(repo_root / "configs/pretrain.py") + ":tiny", overrides)


def _setup(config, devices=None):
    model_config = train.validate_pretrain_config(config)
    parallel = None
    if devices is not None:
        parallel = train.make_parallel(
            config.parallel, pretrain_step.logical_dims(model_config), 16, 16, devices=devices
        )
    return train.setup_training(config, model_config, parallel)


def _save(setup, directory, step=1, keep=3, **kw):
    state = setup.create_state(jax.random.key(7))
    view = setup.parallel.to_checkpoint(state)
    c = ckpt.Checkpoints(directory, keep=keep, **kw)
    c.save(step, view.params, view.opt_state, {"step": step, "rng": [0, 1]})
    c.close()
    return jax.device_get(setup.parallel.unreplicate(state))


def _restore(setup, directory):
    target = setup.parallel.checkpoint_abstract(setup.abstract_state())
    c = ckpt.Checkpoints(directory)
    try:
        return c.restore_latest(target.params, target.opt_state)
    finally:
        c.close()


def _assert_trees_equal(a, b):
    la, lb = jax.tree.leaves(jax.device_get(a)), jax.tree.leaves(jax.device_get(b))
    assert len(la) == len(lb)
    for x, y in zip(la, lb, strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# ------------------------------------------------------------------------- resharding


@pytest.mark.parametrize(
    "saved, restored",
    [
        (dict(data=8), dict(data=1, fsdp=4, tensor=2)),
        (dict(data=8), "one device"),
        (dict(data=1, fsdp=4, tensor=2), dict(strategy="pmap")),
        (dict(strategy="pmap"), dict(data=2, fsdp=2, tensor=2)),
    ],
    ids=["data8-to-fsdp4xtensor2", "data8-to-1device", "fsdp4xtensor2-to-pmap", "pmap-to-2x2x2"],
)
def test_restore_onto_another_mesh(repo_root, tmp_path, saved, restored):
    saved_state = _save(_setup(_config(repo_root, **saved)), tmp_path / "ck")
    if restored == "one device":
        setup = _setup(_config(repo_root, data=1), devices=jax.devices()[:1])
    else:
        setup = _setup(_config(repo_root, **restored))
    r = _restore(setup, tmp_path / "ck")
    assert r.step == 1
    state = train.state_from_checkpoint(setup, r)
    assert int(setup.parallel.unreplicate(state).step) == 1
    # The restored arrays are placed as the new strategy places them ...
    expected = setup.abstract_state()
    for leaf, want in zip(jax.tree.leaves(state), jax.tree.leaves(expected), strict=True):
        assert leaf.shape == want.shape
        assert leaf.sharding.is_equivalent_to(want.sharding, leaf.ndim)
    # ... with the saved values, bit for bit.
    one = setup.parallel.unreplicate(state)
    _assert_trees_equal(one.params, saved_state.params)
    _assert_trees_equal(one.opt_state, saved_state.opt_state)


# ------------------------------------------------------------------------- bad checkpoints


def _truncate_array_file(step_dir):
    data = [
        os.path.join(root, f)
        for root, _, files in os.walk(os.path.join(step_dir, "params"))
        for f in files
        if os.sep + "d" + os.sep in os.path.join(root, f) + os.sep or root.endswith(os.sep + "d")
    ]
    assert data, f"no array data files under {step_dir}/params"
    for path in data:
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)


@pytest.mark.parametrize("damage", ["truncated array file", "missing item", "torn meta"])
def test_corrupted_latest_falls_back_to_previous(repo_root, tmp_path, caplog, damage):
    setup = _setup(_config(repo_root))
    directory = tmp_path / "ck"
    state = setup.create_state(jax.random.key(7))
    view = setup.parallel.to_checkpoint(state)
    c = ckpt.Checkpoints(directory, keep=3)
    for step in (1, 2):
        c.save(step, view.params, view.opt_state, {"step": step, "rng": [0, 1]})
    c.close()
    bad = directory / "2"
    if damage == "truncated array file":
        _truncate_array_file(str(bad))
    elif damage == "missing item":
        shutil.rmtree(bad / "opt_state")
    else:
        meta = bad / "meta" / "metadata"
        meta.write_text(meta.read_text()[:5])
    with caplog.at_level(logging.WARNING, logger="flaxbert"):
        r = _restore(setup, directory)
    assert r is not None and r.step == 1
    _assert_trees_equal(r.params, view.params)
    assert any(str(bad) in m and "corrupted" in m for m in caplog.messages), caplog.messages
    # Set aside, not deleted, and out of the way of the next save of step 2.
    assert not bad.exists()
    assert [p.name.split("-")[0] for p in (tmp_path / "ck.corrupt").iterdir()] == ["2"]


def test_shape_mismatch_names_parameters_and_shapes(repo_root, tmp_path):
    _save(_setup(_config(repo_root)), tmp_path / "ck")
    other = _setup(
        _config(repo_root, "--config.model.hidden_size=64", "--config.model.num_layers=3")
    )
    with pytest.raises(ckpt.CheckpointMismatchError) as e:
        _restore(other, tmp_path / "ck")
    msg = str(e.value)
    lines = msg.splitlines()
    # Missing layers first, then the shapes that differ, each with both shapes.
    assert lines[1].startswith("  bert/layer_2/") and "missing from the checkpoint" in lines[1]
    v = VOCAB_SIZE
    assert f"  bert/embeddings/word_embeddings: checkpoint ({v}, 32), config ({v}, 64)" in lines
    assert str(tmp_path / "ck" / "1") in msg
    # Nothing was set aside: the checkpoint is fine, the config is not.
    assert (tmp_path / "ck" / "1").exists()


def test_vocab_mismatch_is_named(repo_root, tmp_path):
    _save(_setup(_config(repo_root)), tmp_path / "ck")
    other = _setup(_config(repo_root, "--config.model.vocab_size=600"))
    with pytest.raises(ckpt.CheckpointMismatchError, match=r"\(600, 32\)"):
        _restore(other, tmp_path / "ck")


# ------------------------------------------------------------------------- retention


def _fill(directory, accuracies, **kw):
    c = ckpt.Checkpoints(directory, **kw)
    params = {"w": np.zeros(3, np.float32)}
    for step, acc in enumerate(accuracies, start=1):
        metrics = {"eval/mlm_accuracy": acc, "eval/loss": -acc}
        c.save(step, params, {"count": np.int32(step)}, {"step": step}, metrics)
    c.wait()
    steps, best = c.steps(), c.best_step()
    c.close()
    return steps, best


def test_keep_last_k(tmp_path):
    steps, best = _fill(tmp_path / "ck", [0.1, 0.9, 0.3, 0.2, 0.4], keep=2)
    assert steps == [4, 5] and best is None


@pytest.mark.parametrize("metric, mode", [("eval/mlm_accuracy", "max"), ("eval/loss", "min")])
def test_keep_last_k_and_best(tmp_path, metric, mode):
    steps, best = _fill(
        tmp_path / "ck", [0.1, 0.9, 0.3, 0.2, 0.4], keep=2, best_metric=metric, best_mode=mode
    )
    assert steps == [2, 4, 5] and best == 2


def test_kill_during_save_keeps_previous_checkpoint(tmp_path):
    """keep=1: step 2's save is under way (arrays copied off the device, files being written)
    when the process is killed; step 1 must still be there and restorable."""
    script = textwrap.dedent(
        f"""
        import os, signal
        import numpy as np
        from flaxbert.checkpoint import Checkpoints
        c = Checkpoints({str(tmp_path / "ck")!r}, keep=1)
        c.save(1, {{"w": np.ones((1000,), np.float32)}}, {{"n": 0}}, {{"step": 1}})
        c.wait()
        big = {{"w": np.full((64, 1024, 1024), 2.0, np.float32)}}  # 256 MiB
        c.save(2, big, {{"n": 0}}, {{"step": 2}})
        os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr[-2000:]
    c = ckpt.Checkpoints(tmp_path / "ck", keep=1)
    assert c.steps() == [1]
    restored = c.manager.restore(1)
    c.close()
    np.testing.assert_array_equal(restored["params"]["w"], np.ones(1000, np.float32))
    # The interrupted write left only a temporary directory, removed on the next start.
    assert sorted(os.listdir(tmp_path / "ck")) == ["1"]


# ------------------------------------------------------------------------- partial restore


def test_partial_restore_reads_only_the_encoder(repo_root, tmp_path):
    saved = _save(_setup(_config(repo_root, data=8)), tmp_path / "ck")
    # Proof that the optimizer state is never read: it is not there any more.
    shutil.rmtree(tmp_path / "ck" / "1" / "opt_state")
    setup = _setup(_config(repo_root, data=2, fsdp=2, tensor=2))
    abstract = setup.abstract_state().params
    encoder = ckpt.restore_params(str(tmp_path / "ck"), {"bert": abstract["bert"]})
    assert set(encoder) == {"bert"}
    _assert_trees_equal(encoder["bert"], saved.params["bert"])
    for leaf, want in zip(
        jax.tree.leaves(encoder["bert"]), jax.tree.leaves(abstract["bert"]), strict=True
    ):
        assert leaf.sharding.is_equivalent_to(want.sharding, leaf.ndim)

    wide = _setup(_config(repo_root, "--config.model.hidden_size=64")).abstract_state().params
    with pytest.raises(
        ckpt.CheckpointMismatchError, match="bert/embeddings/word_embeddings: checkpoint"
    ):
        ckpt.restore_params(str(tmp_path / "ck"), {"bert": wide["bert"]})
    with pytest.raises(ckpt.CheckpointMismatchError, match="no parameter group"):
        ckpt.restore_params(str(tmp_path / "ck"), {"classifier": {}})


def test_reading_params_items_logs_no_missing_metadata_warning(tmp_path, caplog):
    """The params item of a manager's step is read with its own handler: orbax's step metadata
    lives in the step directory, and a Checkpointer on the item warned about it every read."""
    c = ckpt.Checkpoints(tmp_path / "ck")
    params = {"bert": {"w": np.arange(3, dtype=np.float32)}, "head": {"b": np.ones(2, np.int32)}}
    c.save(4, params, {"n": np.int32(0)}, {"step": 4, "rng": [0, 1]})
    c.close()
    step_dir = str(tmp_path / "ck" / "4")
    with caplog.at_level(logging.DEBUG):
        assert ckpt.saved_param_groups(step_dir) == {"bert": ["w"], "head": ["b"]}
        every = ckpt.host_params(step_dir)
        wanted = {"bert": {"w": jax.ShapeDtypeStruct((3,), np.float32)}}
        encoder = ckpt.restore_params(str(tmp_path / "ck"), wanted)
    _assert_trees_equal(every, params)
    assert isinstance(every["head"]["b"], np.ndarray)
    np.testing.assert_array_equal(encoder["bert"]["w"], [0.0, 1.0, 2.0])
    assert set(encoder) == {"bert"}
    noise = [r.getMessage() for r in caplog.records if "_CHECKPOINT_METADATA" in r.getMessage()]
    assert not noise


def test_resolve_accepts_workdir_checkpoints_dir_and_step_dir(tmp_path):
    c = ckpt.Checkpoints(tmp_path / "run" / "checkpoints")
    for step in (5, 10):
        c.save(step, {"w": np.zeros(2, np.float32)}, {"n": np.int32(0)}, {"step": step})
    c.close()
    run = tmp_path / "run"
    assert ckpt.resolve(str(run)) == (str(run / "checkpoints"), None)
    assert ckpt.resolve(str(run / "checkpoints")) == (str(run / "checkpoints"), None)
    assert ckpt.resolve(str(run / "checkpoints" / "5")) == (str(run / "checkpoints"), 5)
    assert ckpt.read_meta(str(run))[1]["step"] == 10
    with pytest.raises(ckpt.CheckpointNotFoundError, match="no flaxbert checkpoint"):
        ckpt.resolve(str(tmp_path))


def test_tokenizer_travels_with_the_workdir(tmp_path):
    source = tmp_path / "cache" / "sp.model"
    source.parent.mkdir()
    source.write_bytes(b"not really a model")
    run = tmp_path / "run"
    run.mkdir()
    ref = ckpt.keep_tokenizer(str(run), str(source))
    c = ckpt.Checkpoints(run / "checkpoints")
    c.save(3, {"w": np.zeros(2, np.float32)}, {"n": np.int32(0)}, {"step": 3, "tokenizer": ref})
    c.close()
    source.unlink()  # the cache is gone: the workdir's copy is enough
    found = ckpt.tokenizer_of(str(run))
    assert found == str(run / "tokenizer.model")
    assert open(found, "rb").read() == b"not really a model"


# ------------------------------------------------------------------------- non-finite


def _poison(monkeypatch, at_step: int):
    """Makes the loader's batch for `at_step` (1-based) give a NaN loss."""
    original = PretrainingBatches.batch

    def batch(self, step, with_sources=False):
        out = original(self, step, with_sources)
        if self.global_batch_size == 16 and step == at_step - 1 and self.seed == 0:
            out["masked_lm_weights"] = np.full_like(out["masked_lm_weights"], np.nan)
        return out

    monkeypatch.setattr(PretrainingBatches, "batch", batch)


def _nonfinite_config(repo_root, mode):
    return _config(
        repo_root,
        "--config.train.num_steps=10",
        "--config.checkpoint.every_steps=5",
        "--config.eval.every_steps=5",
        f"--config.train.nonfinite={mode}",
    )


def test_nonfinite_stop_names_step_and_saves_nothing_bad(repo_root, tmp_path, monkeypatch):
    _poison(monkeypatch, at_step=7)
    config = _nonfinite_config(repo_root, "stop")
    with pytest.raises(FloatingPointError, match="non-finite loss and grad_norm at step 7"):
        train.pretrain(config, str(tmp_path))
    c = ckpt.Checkpoints(tmp_path / "checkpoints")
    assert c.steps() == [5]
    c.close()


def test_nonfinite_skip_drops_update_and_counts(repo_root, tmp_path, monkeypatch):
    _poison(monkeypatch, at_step=7)
    config = _nonfinite_config(repo_root, "skip")
    result = train.pretrain(config, str(tmp_path))
    assert result.skipped_updates == 1 and result.final_step == 10
    for leaf in jax.tree.leaves(result.state.params):
        assert np.all(np.isfinite(np.asarray(leaf)))
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    train_rows = {r["step"]: r for r in rows if "loss" in r}
    assert 7 not in train_rows  # the skipped step is not averaged into the logs
    assert train_rows[10]["skipped_updates"] == 1 and train_rows[6]["skipped_updates"] == 0
    assert json.load(open(tmp_path / "final_metrics.json"))["skipped_updates"] == 1


def test_finished_pretrain_rerun_does_nothing(repo_root, tmp_path, monkeypatch, caplog):
    config = _config(repo_root, "--config.train.num_steps=2", "--config.eval.every_steps=2")
    first = train.pretrain(config, str(tmp_path))
    written = {
        name: ((tmp_path / name).read_bytes(), (tmp_path / name).stat().st_mtime_ns)
        for name in ("final_metrics.json", "metrics.jsonl", "config.json")
    }

    def no_work(*args, **kwargs):
        raise AssertionError("a finished run re-run must not read data, train or evaluate")

    monkeypatch.setattr(train, "load_corpus", no_work)
    monkeypatch.setattr(train, "evaluate", no_work)
    with caplog.at_level(logging.INFO, logger="flaxbert"):
        again = train.pretrain(config, str(tmp_path))
    assert "the run is already finished" in caplog.text and "nothing to do" in caplog.text
    assert again.already_finished and again.final_step == again.start_step == 2
    assert again.eval_metrics == first.eval_metrics and again.state is None
    for name, (content, mtime) in written.items():
        assert (tmp_path / name).read_bytes() == content, name
        assert (tmp_path / name).stat().st_mtime_ns == mtime, name


def test_skipped_update_leaves_state_unchanged(repo_root):
    config = _config(repo_root)
    setup = _setup(config, devices=jax.devices()[:1])
    state = setup.create_state(jax.random.key(0))
    corpus_batch = PretrainingBatches(
        SyntheticCorpus(30, seed=1),
        train.instance_config(config.data, VOCAB_SIZE),
        16,
        seed=0,
    ).batch(0)
    corpus_batch["masked_lm_weights"] = np.full_like(corpus_batch["masked_lm_weights"], np.inf)
    step = jax.jit(setup.train_step_fn)
    new, metrics = step(state, corpus_batch, jax.random.key(1))
    assert int(new.step) == 1 and int(metrics["skipped_updates"]) == 1
    _assert_trees_equal(new.params, state.params)
    _assert_trees_equal(new.opt_state.inner_state, state.opt_state.inner_state)


def test_resolve_expands_the_home_directory(tmp_path, monkeypatch):
    # `--config.init_from=~/run` reaches flaxbert unexpanded (no shell expansion after `=`).
    (tmp_path / "run" / "checkpoints" / "5" / "params").mkdir(parents=True)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert ckpt.resolve("~/run") == (str(tmp_path / "run" / "checkpoints"), None)
    assert ckpt.resolve("~/run/checkpoints/5/") == (str(tmp_path / "run" / "checkpoints"), 5)
