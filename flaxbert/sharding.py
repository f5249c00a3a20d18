"""The two ways to run the one train step on many devices (the mesh and the logical-axis
rules they lay the state out by are `flaxbert.mesh_rules`).

`make_parallel(config.parallel, ...)` returns a strategy object that the training loop
(`flaxbert.loop`, for `flaxbert.train` and `flaxbert.finetune`) uses without knowing which
one it holds:

- `PjitParallel` (`parallel.strategy='pjit'`, the default): a `Mesh` with axes
  `data`, `fsdp`, `tensor`; parameters, optimizer state and activations are laid out by
  the logical axis names of `flaxbert.model` and the rules table of `flaxbert.mesh_rules`;
  the step is `jax.jit` with explicit in/out shardings. The state is created sharded: the
  init runs under `jax.jit(..., out_shardings=...)`, so no device ever holds the whole model.
- `PmapParallel` (`parallel.strategy='pmap'`): classic data parallelism, one replica of the
  state per device, the step under `jax.pmap` summing gradients and loss terms over an
  axis name.

Both feed each process its own rows of the global batch (`local_rows`), so a multi-host
job reads only what its devices use.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from flaxbert.config import ConfigError
from flaxbert.mesh_rules import (
    MESH_AXES,
    Rules,
    fit_rules,
    format_rules,
    logical_shardings,
    make_mesh,
    mesh_axes_of,
    mirror_shardings,
    parse_rules,
)


@dataclasses.dataclass(frozen=True)
class RowBlock:
    """The rows of a global batch one process feeds: [start, stop)."""

    start: int
    stop: int
    global_size: int

    @property
    def size(self) -> int:
        return self.stop - self.start

    @property
    def loader_shard(self) -> tuple[int, int]:
        """(process_index, process_count) for `PretrainingBatches`, which owns the block
        [i * B / n, (i + 1) * B / n); replicas (e.g. a tensor axis across hosts) share one."""
        return self.start // self.size, self.global_size // self.size


def process_rows(sharding: jax.sharding.Sharding, global_size: int) -> RowBlock:
    """The contiguous block of batch rows that this process's devices hold under `sharding`."""
    index_map = sharding.addressable_devices_indices_map((global_size,))
    starts = sorted({idx[0].indices(global_size)[:2] for idx in index_map.values()})
    start, stop = starts[0][0], starts[-1][1]
    covered = sum(b - a for a, b in starts)
    if covered != stop - start:
        raise NotImplementedError(
            f"this process's devices hold rows {starts} of the batch, not one contiguous "
            "block; order the mesh devices by process"
        )
    return RowBlock(start, stop, global_size)


# ---------------------------------------------------------------------------- strategies


@dataclasses.dataclass
class Step:
    """A compiled step, called within the context (mesh and rules) it was traced under."""

    fn: Any  # the jitted / pmapped function
    context: Callable[[], contextlib.AbstractContextManager]

    def __call__(self, *args):
        with self.context():
            return self.fn(*args)

    def lower(self, *args):
        with self.context():
            return self.fn.lower(*args)


class Parallel:
    """What the loop, pre-training and fine-tuning need from a strategy; see the two
    implementations below."""

    name: str
    axis_name: str | None  # for the collectives inside the step (pmap only)
    num_devices: int
    batch_shards: int  # the batch axis is split this many ways
    description: str

    def local_rows(self, global_size: int) -> RowBlock:
        raise NotImplementedError

    def create_state(self, init_fn, logical_specs, rng):
        """`init_fn(rng) -> TrainState`, placed as the strategy wants."""
        raise NotImplementedError

    def abstract_state(self, init_fn, logical_specs, rng):
        """ShapeDtypeStructs (with shardings) of `create_state`, computing nothing."""
        raise NotImplementedError

    def put_batch(self, host_batch: Mapping[str, np.ndarray]):
        """This process's rows (numpy) -> the batch as the step takes it."""
        raise NotImplementedError

    def put_replicated(self, x):
        """A host value (the same on every process), e.g. an RNG key, placed on all devices."""
        return x

    def abstract_batch(self, shapes: Mapping[str, jax.ShapeDtypeStruct]):
        raise NotImplementedError

    def train_step(self, fn, state_example) -> Step:
        raise NotImplementedError

    def eval_step(self, fn, state_example) -> Callable:
        """`fn(params, batch) -> sums` -> `(params, host_batch) -> global sums`."""
        raise NotImplementedError

    def predict_step(self, fn, state_example) -> Callable:
        """`fn(params, batch) -> per-row outputs` -> `(params, host_batch) -> numpy outputs
        for every row of the global batch` (the same on every process)."""
        raise NotImplementedError

    def fetch(self, metrics) -> dict[str, float]:
        """Device metrics -> host floats (the same on every process)."""
        return {k: float(v) for k, v in jax.device_get(metrics).items()}

    def unreplicate(self, state):
        """The state as one copy (pmap keeps one per device)."""
        return state

    # Checkpoints hold one global copy of the state, whatever the strategy, so a checkpoint
    # written under one strategy or mesh restores under any other.

    def to_checkpoint(self, tree):
        """Placed state (or part of it) -> global arrays as a checkpoint stores them."""
        return tree

    def checkpoint_abstract(self, abstract_tree):
        """`abstract_state()` (or part of it) -> the restore target of `to_checkpoint`'s form."""
        return abstract_tree

    def from_checkpoint(self, tree):
        """Restored global arrays -> the state as this strategy places it."""
        return tree


def _check_batch(name, size, shards, micro: int = 1, key="train.batch_size"):
    if size % (shards * micro):
        extra = f" x train.grad_accum_steps={micro}" if micro > 1 else ""
        raise ConfigError(
            f"config key {key}={size}: must be divisible by the {shards} ways the batch is "
            f"split under parallel.strategy={name}{extra}"
        )


class PjitParallel(Parallel):
    name = "pjit"
    axis_name = None

    def __init__(self, mesh: Mesh, rules: Rules):
        self.mesh = mesh
        self.rules = rules
        self.num_devices = mesh.size
        self.batch_axes = mesh_axes_of("batch", rules)
        self.batch_shards = math.prod(mesh.shape[a] for a in self.batch_axes)
        self.replicated = NamedSharding(mesh, PartitionSpec())
        self.batch_sharding = NamedSharding(mesh, PartitionSpec(self.batch_axes or None))
        shape = " x ".join(f"{a}={mesh.shape[a]}" for a in MESH_AXES)
        self.description = f"pjit over a {shape} mesh, rules {format_rules(rules)}"

    @contextlib.contextmanager
    def context(self):
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
            yield

    def local_rows(self, global_size: int) -> RowBlock:
        return process_rows(self.batch_sharding, global_size)

    def state_shardings(self, abstract_state, logical_specs):
        param_shardings = logical_shardings(logical_specs, self.mesh, self.rules)
        return abstract_state.replace(
            step=self.replicated,
            params=param_shardings,
            opt_state=mirror_shardings(
                abstract_state.opt_state,
                abstract_state.params,
                param_shardings,
                self.replicated,
            ),
        )

    def create_state(self, init_fn, logical_specs, rng):
        shardings = self.state_shardings(jax.eval_shape(init_fn, rng), logical_specs)
        # Initialised in place, each device computing only its own shards.
        return jax.jit(init_fn, out_shardings=shardings)(rng)

    def abstract_state(self, init_fn, logical_specs, rng):
        abstract = jax.eval_shape(init_fn, rng)
        shardings = self.state_shardings(abstract, logical_specs)
        return jax.tree.map(
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, shardings
        )

    def put_batch(self, host_batch):
        # The global shape is inferred: this process's rows are its devices' block.
        return {
            k: jax.make_array_from_process_local_data(self.batch_sharding, np.asarray(v))
            for k, v in host_batch.items()
        }

    def put_replicated(self, x):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            data = self.put_replicated(jax.random.key_data(x))
            return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
        x = np.asarray(x)
        return jax.make_array_from_process_local_data(self.replicated, x, x.shape)

    def abstract_batch(self, shapes):
        return {
            k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=self.batch_sharding)
            for k, v in shapes.items()
        }

    def _shardings_of(self, state_example):
        return jax.tree.map(lambda x: x.sharding, state_example)

    def train_step(self, fn, state_example) -> Step:
        state_shardings = self._shardings_of(state_example)
        jitted = jax.jit(
            fn,
            in_shardings=(state_shardings, self.batch_sharding, self.replicated),
            out_shardings=(state_shardings, self.replicated),
            donate_argnums=(0,),
        )
        return Step(jitted, self.context)

    def eval_step(self, fn, state_example):
        params_shardings = self._shardings_of(state_example.params)
        step = Step(
            jax.jit(
                fn,
                in_shardings=(params_shardings, self.batch_sharding),
                out_shardings=self.replicated,
            ),
            self.context,
        )
        return lambda params, host_batch: step(params, self.put_batch(host_batch))

    def predict_step(self, fn, state_example):
        # Outputs gathered onto every device, so each process reads the whole batch locally.
        run = self.eval_step(fn, state_example)
        return lambda params, host_batch: jax.tree.map(
            lambda x: np.asarray(x.addressable_data(0)), run(params, host_batch)
        )


class PmapParallel(Parallel):
    name = "pmap"
    axis_name = "batch"

    def __init__(self):
        self.local_devices = jax.local_devices()
        self.num_devices = jax.device_count()
        self.batch_shards = self.num_devices
        # One replica per local device, stacked on a leading axis, as pmap takes it. The mesh
        # axis is named as pmap names its outputs' one, so that a step's outputs, fed back
        # in, have the inputs' sharding and the step is not traced again.
        self.stacked = NamedSharding(
            Mesh(np.array(self.local_devices), (self.axis_name,)), PartitionSpec(self.axis_name)
        )
        self.description = f"pmap data parallelism over {self.num_devices} devices"

    def local_rows(self, global_size: int) -> RowBlock:
        size = global_size // jax.process_count()
        start = jax.process_index() * size
        return RowBlock(start, start + size, global_size)

    def _replicate(self, init_fn):
        n = len(self.local_devices)
        return lambda rng: jax.tree.map(lambda x: jnp.broadcast_to(x, (n, *x.shape)), init_fn(rng))

    def create_state(self, init_fn, logical_specs, rng):
        return jax.jit(self._replicate(init_fn), out_shardings=self.stacked)(rng)

    def abstract_state(self, init_fn, logical_specs, rng):
        abstract = jax.eval_shape(self._replicate(init_fn), rng)
        return jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=self.stacked), abstract
        )

    def _split(self, x):
        n = len(self.local_devices)
        return np.asarray(x).reshape(n, np.shape(x)[0] // n, *np.shape(x)[1:])

    def put_batch(self, host_batch):
        return {k: jax.device_put(self._split(v), self.stacked) for k, v in host_batch.items()}

    def abstract_batch(self, shapes):
        n = len(self.local_devices)
        per_process = jax.process_count()
        return {
            k: jax.ShapeDtypeStruct(
                (n, v.shape[0] // per_process // n, *v.shape[1:]), v.dtype, sharding=self.stacked
            )
            for k, v in shapes.items()
        }

    def train_step(self, fn, state_example) -> Step:
        pmapped = jax.pmap(fn, axis_name=self.axis_name, in_axes=(0, 0, None), donate_argnums=(0,))
        return Step(pmapped, contextlib.nullcontext)

    def eval_step(self, fn, state_example):
        def global_sums(params, batch):
            return jax.lax.psum(fn(params, batch), self.axis_name)

        pmapped = jax.pmap(global_sums, axis_name=self.axis_name)

        def run(params, host_batch):
            sums = pmapped(params, self.put_batch(host_batch))
            return jax.tree.map(lambda x: x[0], sums)

        return run

    def predict_step(self, fn, state_example):
        pmapped = jax.pmap(fn, axis_name=self.axis_name)

        def run(params, host_batch):
            out = jax.device_get(pmapped(params, self.put_batch(host_batch)))
            out = jax.tree.map(lambda x: x.reshape(-1, *x.shape[2:]), out)  # this process's rows
            if jax.process_count() > 1:
                from jax.experimental import multihost_utils

                out = multihost_utils.process_allgather(out, tiled=True)
            return jax.tree.map(np.asarray, out)

        return run

    def fetch(self, metrics) -> dict[str, float]:
        return {k: float(np.asarray(v)[0]) for k, v in jax.device_get(metrics).items()}

    def unreplicate(self, state):
        return jax.tree.map(lambda x: x[0], state)

    @functools.cached_property
    def _global_replicated(self):
        # All devices of all processes, one full copy each: a checkpointable global array.
        return NamedSharding(Mesh(np.array(jax.devices()), (self.axis_name,)), PartitionSpec())

    def to_checkpoint(self, tree):
        def one(x):
            # Each local device's replica, reshaped in place, becomes that device's copy.
            shards = [s.data.reshape(x.shape[1:]) for s in x.addressable_shards]
            return jax.make_array_from_single_device_arrays(
                x.shape[1:], self._global_replicated, shards
            )

        return jax.tree.map(one, tree)

    def checkpoint_abstract(self, abstract_tree):
        return jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype, sharding=self._global_replicated),
            abstract_tree,
        )

    def from_checkpoint(self, tree):
        n = len(self.local_devices)

        def one(x):
            by_device = {s.device: s.data for s in x.addressable_shards}
            shards = [by_device[d].reshape(1, *x.shape) for d in self.local_devices]
            return jax.make_array_from_single_device_arrays((n, *x.shape), self.stacked, shards)

        return jax.tree.map(one, tree)


def make_parallel(
    parallel,
    dims: Mapping[str, int],
    batch_size: int,
    eval_batch_size: int | None = None,
    grad_accum_steps: int = 1,
    devices: Sequence[jax.Device] | None = None,
) -> Parallel:
    """The strategy `parallel.strategy` names, checked against the model and batch sizes.

    `dims` maps logical axis names to the model's sizes (`heads`, `mlp`, `vocab`, `embed`),
    so the rules never ask for an uneven split.
    """
    if parallel.strategy == "pmap":
        total = jax.device_count()
        if parallel.fsdp not in (1, -1) or parallel.tensor not in (1, -1):
            raise ConfigError(
                f"config keys parallel.fsdp={parallel.fsdp}, parallel.tensor="
                f"{parallel.tensor}: pmap is data parallelism only; set them to 1 or use "
                "parallel.strategy=pjit"
            )
        if parallel.data not in (-1, total):
            raise ConfigError(
                f"config key parallel.data={parallel.data}: pmap uses all {total} devices; "
                "set it to -1"
            )
        strategy: Parallel = PmapParallel()
    elif parallel.strategy == "pjit":
        mesh = make_mesh(parallel, devices)
        rules = fit_rules(parse_rules(parallel.get("rules", "")), mesh, dims)
        strategy = PjitParallel(mesh, rules)
    else:
        raise ConfigError(
            f"config key parallel.strategy={parallel.strategy!r}: choose pjit or pmap"
        )
    _check_batch(strategy.name, batch_size, strategy.batch_shards, grad_accum_steps)
    if eval_batch_size is not None:
        _check_batch(strategy.name, eval_batch_size, strategy.batch_shards, key="eval.batch_size")
    return strategy
