"""Device mesh and logical-axis rules: how the model's logical axis names map onto devices.

The mesh has axes `data`, `fsdp` and `tensor` (`parallel.data/fsdp/tensor`, one of them -1
for the rest of the devices). A rules table (`parallel.rules`, `DEFAULT_RULES` when empty)
maps each logical axis name of `flaxbert.model` (`LOGICAL_AXES`) to mesh axes; `fit_rules`
drops a split a model size cannot take evenly, and `logical_shardings` / `mirror_shardings`
turn the parameters' logical specs into the shardings of the parameters and of an optimizer
state that mirrors them. `flaxbert.sharding`'s pjit strategy lays the train state out so.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh

from flaxbert.config import ConfigError

log = logging.getLogger("flaxbert")

MESH_AXES = ("data", "fsdp", "tensor")

# Logical axis -> mesh axes, in order of precedence (a mesh axis is used at most once per
# array, so for activations 'batch' takes fsdp before 'embed' can). Megatron-style tensor
# parallelism splits attention heads, the feed-forward hidden units and the vocabulary;
# fsdp splits every weight matrix along its model (embed) dimension and the batch with it.
DEFAULT_RULES = "batch=data+fsdp,heads=tensor,mlp=tensor,vocab=tensor,embed=fsdp"

# Every logical name the model uses; the others are replicated unless a rule names them.
LOGICAL_AXES = (
    "batch",
    "length",
    "vocab",
    "embed",
    "positions",
    "segments",
    "heads",
    "kv",
    "mlp",
    "embed_out",
    "classes",
    "layers",  # the stacked axis of model.scan_layers
)

Rules = tuple[tuple[str, tuple[str, ...] | None], ...]


def parse_rules(text: str) -> Rules:
    """`'batch=data+fsdp,heads=tensor,length='` -> (('batch', ('data', 'fsdp')), ...)."""
    text = text or DEFAULT_RULES
    rules, seen = [], set()
    for item in filter(None, (s.strip() for s in text.split(","))):
        name, eq, axes = (s.strip() for s in item.partition("="))
        axes_t = tuple(a.strip() for a in axes.split("+") if a.strip())
        bad = [a for a in axes_t if a not in MESH_AXES]
        if not eq or name not in LOGICAL_AXES or bad or name in seen:
            why = (
                f"duplicate rule for {name!r}"
                if name in seen
                else f"unknown mesh axis {bad[0]!r} (mesh axes: {', '.join(MESH_AXES)})"
                if bad
                else f"unknown logical axis {name!r} (known: {', '.join(LOGICAL_AXES)})"
                if eq
                else "each rule is LOGICAL=MESH_AXIS[+MESH_AXIS...]"
            )
            raise ConfigError(f"config key parallel.rules={text!r}: bad rule {item!r}: {why}")
        seen.add(name)
        rules.append((name, axes_t or None))
    return tuple(rules)


def format_rules(rules: Rules) -> str:
    return ",".join(f"{name}={'+'.join(axes or ())}" for name, axes in rules)


def mesh_shape(parallel, num_devices: int) -> dict[str, int]:
    """Sizes of the data, fsdp and tensor axes from `parallel.*`; one may be -1 (the rest)."""
    sizes = {axis: int(parallel[axis]) for axis in MESH_AXES}
    given = ", ".join(f"parallel.{a}={s}" for a, s in sizes.items())
    fix = (
        f"make their product {num_devices}, or set one of them to -1 to take the remaining devices"
    )
    if any(s == 0 or s < -1 for s in sizes.values()):
        raise ConfigError(f"config keys {given}: sizes must be positive or -1; {fix}")
    free = [a for a, s in sizes.items() if s == -1]
    if len(free) > 1:
        raise ConfigError(f"config keys {given}: at most one of them may be -1")
    fixed = math.prod(s for s in sizes.values() if s != -1)
    if free:
        if num_devices % fixed:
            raise ConfigError(
                f"config keys {given}: {num_devices} devices are not divisible by the "
                f"product {fixed} of the fixed sizes; {fix}"
            )
        sizes[free[0]] = num_devices // fixed
    elif fixed != num_devices:
        raise ConfigError(
            f"config keys {given}: the mesh would have {fixed} devices but there are "
            f"{num_devices}; {fix}"
        )
    return sizes


def make_mesh(parallel, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """The (data, fsdp, tensor) mesh over all devices (of every process), GSPMD style."""
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(parallel, len(devices))
    return jax.make_mesh(
        tuple(shape[a] for a in MESH_AXES),
        MESH_AXES,
        axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES),
        devices=devices,
    )


def fit_rules(rules: Rules, mesh: Mesh, dims: Mapping[str, int]) -> Rules:
    """Drops the mesh axes a dimension cannot be split over evenly (e.g. 12 heads over a
    tensor axis of 8), so that one rules table serves every model size; says what it dropped.
    `dims` gives the size of each logical axis (the batch is checked elsewhere)."""
    fitted = []
    for name, axes in rules:
        if axes and name in dims:
            kept, parts = [], 1
            for axis in axes:
                if dims[name] % (parts * mesh.shape[axis]) == 0:
                    kept.append(axis)
                    parts *= mesh.shape[axis]
                else:
                    log.warning(
                        "sharding: %s (size %d) is not divisible by mesh axis %s (size %d); "
                        "it is not split over that axis",
                        name,
                        dims[name],
                        axis,
                        mesh.shape[axis],
                    )
            axes = tuple(kept) or None
        fitted.append((name, axes))
    return tuple(fitted)


def mesh_axes_of(logical: str, rules: Rules) -> tuple[str, ...]:
    return next((axes or () for name, axes in rules if name == logical), ())


def logical_shardings(logical_specs, mesh: Mesh, rules: Rules):
    """A tree of logical PartitionSpecs (`nn.get_partition_spec`) -> NamedShardings."""
    return nn.logical_to_mesh_sharding(logical_specs, mesh, rules)


def _path_key(path) -> tuple[str, ...]:
    return tuple(str(k) for k in path)


def mirror_shardings(tree, params, param_shardings, default):
    """Shardings for a tree (an optimizer state) whose leaves mirror parameters: a leaf whose
    path ends with a parameter's path and has its shape gets its sharding (Adam's mu and nu,
    for instance); any other leaf (step counts, scalars) gets `default`."""
    by_path = {
        _path_key(path): (np.shape(leaf), sharding)
        for (path, leaf), sharding in zip(
            jax.tree_util.tree_leaves_with_path(params),
            jax.tree.leaves(param_shardings),
            strict=True,
        )
    }

    def pick(path, leaf):
        key = _path_key(path)
        for i in range(len(key)):
            hit = by_path.get(key[i:])
            if hit is not None and hit[0] == np.shape(leaf):
                return hit[1]
        return default

    return jax.tree_util.tree_map_with_path(pick, tree)
