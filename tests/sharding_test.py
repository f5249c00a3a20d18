"""The sharded train step gives the single-device numbers under pmap and every pjit mesh.

These run with XLA's optimisation passes mostly off (`jax_disable_most_optimizations`):
compiling dominates such tiny runs, and partitioning and collectives are the same.
"""

import dataclasses
import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tiny import tiny_overrides

from flaxbert import cli, distributed, mesh_rules, optim, pretrain_step, sharding, train
from flaxbert.config import ConfigError, load_config
from flaxbert.data.pretraining import InstanceConfig, PretrainingBatches
from flaxbert.data.synthetic import VOCAB_SIZE, SyntheticCorpus
from flaxbert.model_config import BertConfig
from flaxbert.pretraining_model import BertForPreTraining

SEQ, PRED, BATCH, STEPS = 32, 5, 16, 3
MESH = ("data", "fsdp", "tensor")

TINY = tiny_overrides(SEQ, PRED, BATCH)
pytestmark = pytest.mark.usefixtures("fast_compiles")


def _config(repo_root, strategy="pjit", data=-1, fsdp=1, tensor=1, dropout=0.0, **extra):
    overrides = [
        *TINY,
        f"--config.model.hidden_dropout_rate={dropout}",
        f"--config.model.attention_dropout_rate={dropout}",
        f"--config.parallel.strategy={strategy}",
        f"--config.parallel.data={data}",
        f"--config.parallel.fsdp={fsdp}",
        f"--config.parallel.tensor={tensor}",
        *[f"--config.{k}={v}" for k, v in extra.items()],
    ]
    return load_config(str(repo_root / "configs/pretrain.py") + ":tiny", overrides)


@pytest.fixture(scope="module")
def batches():
    corpus = SyntheticCorpus(50, seed=3)
    inst = InstanceConfig(max_seq_length=SEQ, max_predictions_per_seq=PRED, vocab_size=VOCAB_SIZE)
    loader = PretrainingBatches(corpus, inst, BATCH, seed=0)
    return [loader.batch(step) for step in range(STEPS)]


def _single_device_run(config, batches):
    """One device, no mesh: plain `jax.jit` of the pure step, as before sharding existed."""
    model = BertForPreTraining(BertConfig.from_dict(config.model))
    schedule, tx = optim.make_optimizer(config.train)
    state = jax.jit(pretrain_step.create_train_state, static_argnums=(0, 1, 3, 4))(
        model, tx, jax.random.key(0), SEQ, PRED
    )
    step = jax.jit(pretrain_step.make_train_step(model, tx, schedule))
    losses = []
    for batch in batches:
        state, metrics = step(state, jax.tree.map(jnp.asarray, batch), jax.random.key(1))
        losses.append(float(metrics["loss"]))
    eval_sums = jax.jit(pretrain_step.make_eval_step(model))(
        state.params, jax.tree.map(jnp.asarray, batches[0])
    )
    return losses, jax.device_get(state.params), jax.device_get(eval_sums)


@pytest.fixture(scope="module")
def reference(repo_root, batches):
    return {
        dropout: _single_device_run(_config(repo_root, dropout=dropout), batches)
        for dropout in (0.0, 0.1)
    }


def _sharded_run(config, batches, evaluate=True):
    setup = train.setup_training(config, BertConfig.from_dict(config.model))
    # Three steps of new data through one compiled step: a retrace would fail here. (The
    # counter is per function code, which every case shares.)
    chex.clear_trace_counter()
    setup = dataclasses.replace(
        setup, train_step_fn=chex.assert_max_traces(setup.train_step_fn, n=1)
    )
    parallel = setup.parallel
    state = setup.create_state(jax.random.key(0))
    step = setup.compile_train_step(state)
    rng = parallel.put_replicated(jax.random.key(1))
    losses = []
    for batch in batches:
        state, metrics = step(state, parallel.put_batch(batch), rng)
        losses.append(parallel.fetch(metrics)["loss"])
    eval_sums = setup.compile_eval_step(state)(state.params, batches[0]) if evaluate else None
    return setup, state, losses, eval_sums


def _shard_shape(x):
    return x.addressable_shards[0].data.shape


# (strategy, data, fsdp, tensor, grad_accum_steps, dropout); per-device shapes of the layer-0
# query kernel (D=32, N=2, H=16) and feed-forward kernel (D=32, F=64), None for pmap.
CASES = {
    "pmap x8, 2 micro-batches": ("pmap", -1, 1, 1, 2, 0.0, None),
    "data=8": ("pjit", 8, 1, 1, 1, 0.0, ((32, 2, 16), (32, 64))),
    "fsdp=8": ("pjit", 1, 8, 1, 1, 0.0, ((4, 2, 16), (4, 64))),
    "data=2 fsdp=2 tensor=2, 2 micro-batches": ("pjit", 2, 2, 2, 2, 0.0, ((16, 1, 16), (16, 32))),
    "data=4 tensor=2, dropout": ("pjit", 4, 1, 2, 1, 0.1, ((32, 1, 16), (32, 32))),
}
EVALUATED = ("pmap x8, 2 micro-batches", "data=2 fsdp=2 tensor=2, 2 micro-batches")


@pytest.mark.parametrize("case", list(CASES))
def test_sharded_step_matches_single_device(repo_root, batches, reference, case):
    strategy, data, fsdp, tensor, accum, dropout, shapes = CASES[case]
    config = _config(
        repo_root, strategy, data, fsdp, tensor, dropout, **{"train.grad_accum_steps": accum}
    )
    setup, state, losses, eval_sums = _sharded_run(config, batches, case in EVALUATED)
    # Micro-batches give the whole batch's gradient, so accumulation changes nothing either;
    # under pjit the dropout masks do not depend on the sharding (partitionable threefry).
    ref_losses, ref_params, ref_eval = reference[dropout]
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    params = jax.device_get(setup.parallel.unreplicate(state).params)
    for (path, a), b in zip(
        jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(ref_params), strict=True
    ):
        # atol: float32 summation order differs with the split; after 3 Adam steps that moves a
        # parameter by up to ~2e-7 (measured), where Adam's m/sqrt(v) amplifies small-gradient
        # noise. A wrong split (e.g. gradients not summed) moves them by ~1e-3.
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=jax.tree_util.keystr(path))
    for key in ref_eval if eval_sums is not None else ():
        np.testing.assert_allclose(eval_sums[key], ref_eval[key], rtol=1e-5, err_msg=key)
    assert int(setup.parallel.unreplicate(state).step) == STEPS

    layer = state.params["bert"]["layer_0"]
    query, ffn = layer["attention"]["query"]["kernel"], layer["intermediate"]["kernel"]
    if shapes is None:  # pmap: one whole replica per device
        assert _shard_shape(query) == (1, 32, 2, 16) and _shard_shape(ffn) == (1, 32, 64)
        return
    assert (_shard_shape(query), _shard_shape(ffn)) == shapes
    # The optimizer state is laid out like the parameters it mirrors; scalars replicated.
    nodes = jax.tree.leaves(state.opt_state, is_leaf=lambda s: hasattr(s, "mu"))
    mu = next(s.mu for s in nodes if hasattr(s, "mu"))
    mu_query = mu["bert"]["layer_0"]["attention"]["query"]["kernel"]
    assert mu_query.sharding.is_equivalent_to(query.sharding, 3)
    assert state.step.sharding.is_fully_replicated


@pytest.mark.parametrize("strategy, tensor", [("pmap", 1), ("pjit", 2)])
def test_mixed_precision_with_micro_batches(repo_root, batches, reference, strategy, tensor):
    """bfloat16 compute (float32 parameters) gives the float32 numbers to bfloat16 precision."""
    config = _config(
        repo_root,
        strategy,
        tensor=tensor,
        **{"model.dtype": "bfloat16", "train.grad_accum_steps": 2},
    )
    setup, state, losses, eval_sums = _sharded_run(config, batches)
    ref_losses, ref_params, ref_eval = reference[0.0]
    params = jax.device_get(setup.parallel.unreplicate(state).params)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
    # Measured (CPU, 3 steps): bf16 moves the losses by 2e-5 relative and the parameters by a
    # median 5e-5 (largest 2.5e-3); pmap gradients left unsummed over the devices move them by
    # 5e-3 and 7e-3. The bounds sit 10-50x above the first and 5-15x below the second.
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-3)
    np.testing.assert_allclose(eval_sums["mlm_loss_sum"], ref_eval["mlm_loss_sum"], rtol=1e-3)
    diffs = [
        float(np.max(np.abs(a - b)))
        for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref_params), strict=True)
    ]
    assert np.median(diffs) < 5e-4 and max(diffs) < 5e-3, (np.median(diffs), max(diffs))


def test_pretrain_loop_under_pmap(repo_root, tmp_path):
    """The loop itself (batches, one-step-late metrics, evaluation, result) under pmap; the
    pjit loop runs in the CLI and multi-process tests."""
    config = _config(
        repo_root,
        "pmap",
        **{
            "train.grad_accum_steps": 2,
            "train.num_steps": 2,
            "train.log_every": 1,
            "eval.num_batches": 1,
            "data.synthetic_documents": 100,
            "data.synthetic_eval_documents": 20,
        },
    )
    result = train.pretrain(config, str(tmp_path))
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 2] and "eval/loss" in rows[-1]
    # The same run under pjit (one data axis) logs the same numbers: the second step's loss
    # shows that the first update used the whole batch's gradient.
    config.unlock()
    config.parallel.strategy = "pjit"
    train.pretrain(config, str(tmp_path / "pjit"))
    text = (tmp_path / "pjit" / "metrics.jsonl").read_text()
    pjit_rows = [json.loads(line) for line in text.splitlines()]
    for key in ("loss", "grad_norm", "param_norm"):
        np.testing.assert_allclose(
            [r[key] for r in rows[:2]], [r[key] for r in pjit_rows[:2]], rtol=1e-4, err_msg=key
        )
    np.testing.assert_allclose(rows[-1]["eval/loss"], pjit_rows[-1]["eval/loss"], rtol=1e-4)
    assert 0 < result.eval_metrics["eval/mlm_accuracy"] <= 1
    # One copy of the state comes back, not one per device.
    assert int(result.state.step) == 2
    assert result.state.params["bert"]["layer_0"]["intermediate"]["kernel"].shape == (32, 64)


# ------------------------------------------------------------------------ mesh and config


@pytest.mark.parametrize(
    "sizes, message",
    [
        ((3, 1, 1), "the mesh would have 3 devices but there are 8"),
        ((-1, 3, 1), "8 devices are not divisible by the product 3"),
        ((-1, -1, 1), "at most one of them may be -1"),
        ((0, 1, 8), "must be positive or -1"),
    ],
)
def test_bad_mesh_sizes_are_config_errors(repo_root, sizes, message):
    config = _config(repo_root, "pjit", *sizes)
    with pytest.raises(ConfigError, match=message) as e:
        mesh_rules.make_mesh(config.parallel)
    assert all(f"parallel.{k}" in str(e.value) for k in ("data", "fsdp", "tensor"))


def test_mesh_sizes_and_rules(repo_root):
    config = _config(repo_root, "pjit", 2, -1, 2)
    mesh = mesh_rules.make_mesh(config.parallel)
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    rules = mesh_rules.parse_rules("")
    assert dict(rules)["batch"] == ("data", "fsdp") and dict(rules)["heads"] == ("tensor",)
    assert mesh_rules.parse_rules("batch=data,length=") == (("batch", ("data",)), ("length", None))
    # 2 heads cannot be split 4 ways: that rule is dropped, the others stay.
    mesh4 = mesh_rules.make_mesh(_config(repo_root, "pjit", 2, 1, 4).parallel)
    fitted = dict(mesh_rules.fit_rules(rules, mesh4, {"heads": 2, "mlp": 64}))
    assert fitted["heads"] is None and fitted["mlp"] == ("tensor",)
    with pytest.raises(ConfigError, match="parallel.rules.*unknown mesh axis 'model'"):
        mesh_rules.parse_rules("heads=model")
    with pytest.raises(ConfigError, match="parallel.rules.*unknown logical axis 'head'"):
        mesh_rules.parse_rules("head=tensor")


def test_strategy_config_errors_stop_before_work(repo_root, tmp_path):
    cases = [
        ({"parallel.strategy": "pmap", "parallel.tensor": 2}, "pmap is data parallelism only"),
        ({"parallel.strategy": "gspmd"}, "parallel.strategy='gspmd'"),
        ({"train.batch_size": 12}, "train.batch_size=12: must be divisible by the 8 ways"),
        ({"train.grad_accum_steps": 4}, "divisible by the 8 ways .*grad_accum_steps=4"),
        ({"eval.batch_size": 20, "parallel.data": 4, "parallel.fsdp": 2}, "eval.batch_size=20"),
    ]
    for overrides, message in cases:
        config = _config(repo_root, **{k: v for k, v in overrides.items()})
        with pytest.raises(ConfigError, match=message):
            train.pretrain(config, str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_process_rows_follow_the_mesh(repo_root):
    parallel = train.setup_training(
        _config(repo_root, "pjit", 2, 2, 2), BertConfig.from_dict(_config(repo_root).model)
    ).parallel
    rows = parallel.local_rows(BATCH)  # one process holds every row
    assert (rows.start, rows.stop, rows.loader_shard) == (0, BATCH, (0, 1))
    assert sharding.RowBlock(8, 16, 32).loader_shard == (1, 4)


# --------------------------------------------------------------------- preflight, launch


def test_compile_reports_per_device_memory(repo_root, tmp_path, capsys):
    args = ["compile", "--config", str(repo_root / "configs/pretrain.py:tiny")]
    args += ["--workdir", str(tmp_path), *TINY, "--config.parallel.data=1"]
    args += ["--config.parallel.fsdp=8"]
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    assert "per-device memory" in out and "temporaries" in out and "FLOPs" in out
    report = json.loads((tmp_path / "compile.json").read_text())
    assert report["total"] > report["temps"] > 0 and report["num_devices"] == 8
    # fsdp=8 holds about an eighth of the state (parameters and two Adam moments) per device.
    config = _config(repo_root, data=1, fsdp=8)
    setup = train.setup_training(config, BertConfig.from_dict(config.model))
    state_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(setup.abstract_state()))
    assert state_bytes / 10 < report["arguments"] < state_bytes / 4, (state_bytes, report)


def test_distributed_settings_from_flags_env_and_cluster():
    assert distributed.resolve(env={}) is None
    spec = distributed.resolve("127.0.0.1:1234", 2, 1, env={})
    assert (spec.coordinator, spec.num_processes, spec.process_id) == ("127.0.0.1:1234", 2, 1)
    env = {"FLAXBERT_COORDINATOR": "h:1", "FLAXBERT_NUM_PROCESSES": "4", "FLAXBERT_PROCESS_ID": "3"}
    assert distributed.resolve(env=env).process_id == 3
    assert distributed.resolve(process_id=0, env=env).process_id == 0  # flags win
    with pytest.raises(distributed.DistributedError, match="--process-id"):
        distributed.resolve("h:1", 2, env={})
    with pytest.raises(distributed.DistributedError, match=r"must be in \[0"):
        distributed.resolve("h:1", 2, 2, env={})
    slurm = dict(
        SLURM_JOB_ID="7", SLURM_STEP_NODELIST="n[1-2]", SLURM_NTASKS="16", SLURM_PROCID="3"
    )
    assert distributed.resolve(env=slurm).detected == "slurm"
    assert distributed.resolve(env={**slurm, "SLURM_NTASKS": "1"}) is None
    assert distributed.resolve(env={"TPU_WORKER_HOSTNAMES": "a,b"}).detected == "cloud tpu"
