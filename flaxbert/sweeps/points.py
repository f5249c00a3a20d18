"""Sweeps: run one config at many points, each in its own workdir, then summarise them.

A config file may define `get_sweep(arg)` (or `get_sweep()`) beside `get_config(arg)`. It
returns a list of *points*; a point is a dict of dotted config keys to values (the
`--config.KEY=VALUE` overrides of that run), plus optionally the special key `config_arg`:
the argument given to `get_config` for that run, which sweeps over config variants (model
sizes, tasks). Without it the point uses the ARG of `--config FILE[:ARG]`. Build points
with the helpers below:

    from flaxbert.sweeps.points import grid, product, variants, zip_

    def get_sweep(arg):  # 2 x 2 x 2 = 8 points, from tiny,lr=0.001,warmup=100,seed=0 on
        return product(
            variants("tiny", "mini"),
            zip_(**{"train.learning_rate": [1e-3, 3e-4], "train.warmup_steps": [100, 50]}),
            grid(**{"train.seed": [0, 1]}),
        )

`flaxbert sweep` runs each point as `python -m flaxbert.cli pretrain|finetune --config
FILE:ARG --workdir DIR/NAME --config.KEY=VALUE ...`, where NAME is made from the values that
vary (`lr=0.0001,seed=1`), skips finished points, resumes interrupted ones, and writes
DIR/sweep.json and the summary (DIR/summary.csv, summary.md, summary.png; see
flaxbert/sweeps/summary.py). This module holds the points: the helpers above, their names,
and `load_sweep`, which checks every point's config and gives each its command line.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import itertools
import json
import os
import re
import shlex
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from flaxbert.config import ConfigError, load_config, load_module

CONFIG_ARG = "config_arg"  # a point's key for the argument given to get_config
COMMANDS = ("pretrain", "finetune")
# Short names of common keys in point names; any other key uses its last component.
SHORT_NAMES = {
    "learning_rate": "lr",
    "batch_size": "bs",
    "weight_decay": "wd",
    "num_steps": "steps",
    "warmup_steps": "warmup",
    "num_epochs": "epochs",
}
_MAX_NAME = 100


# --- building points -------------------------------------------------------------------


def _axes(axes: Mapping[str, Sequence] | None, kw: Mapping[str, Sequence]) -> dict:
    merged = {**(axes or {}), **kw}
    for key, values in merged.items():
        if isinstance(values, str) or not isinstance(values, Sequence):
            raise ValueError(f"sweep key {key!r}: give a list of values, not {values!r}")
    return merged


def grid(axes: Mapping[str, Sequence] | None = None, /, **kw: Sequence) -> list[dict]:
    """The cartesian product: `grid(**{"train.learning_rate": [1e-4, 3e-4], "train.seed":
    [0, 1]})` gives 4 points, the last key varying fastest."""
    a = _axes(axes, kw)
    return [dict(zip(a, values, strict=True)) for values in itertools.product(*a.values())]


def zip_(axes: Mapping[str, Sequence] | None = None, /, **kw: Sequence) -> list[dict]:
    """Values taken together: `zip_(**{"train.learning_rate": [1e-4, 3e-4], "train.
    warmup_steps": [100, 50]})` gives 2 points. The lists must have the same length."""
    a = _axes(axes, kw)
    lengths = {k: len(v) for k, v in a.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"zip_ needs lists of one length; got {lengths}")
    return [dict(zip(a, values, strict=True)) for values in zip(*a.values(), strict=True)]


def product(*sweeps: Sequence[Mapping]) -> list[dict]:
    """Every combination of one point from each list, merged (a key in two lists is an error)."""
    out = []
    for combo in itertools.product(*sweeps):
        point: dict = {}
        for part in combo:
            clash = set(point) & set(part)
            if clash:
                raise ValueError(f"product: key(s) {sorted(clash)} set by two factors")
            point.update(part)
        out.append(point)
    return out


def concat(*sweeps: Sequence[Mapping]) -> list[dict]:
    """The points of each list, one list after the other."""
    return [dict(p) for sweep in sweeps for p in sweep]


def variants(*config_args: str) -> list[dict]:
    """One point per config argument: `product(variants("tiny", "mini"), grid(...))`."""
    return [{CONFIG_ARG: a} for a in config_args]


# --- naming ----------------------------------------------------------------------------


def swept_keys(points: Sequence[Mapping]) -> list[str]:
    """Keys whose value is not the same in every point (a key some points lack counts),
    in first-seen order, `config_arg` first."""
    keys = list(dict.fromkeys(k for p in points for k in p))
    swept = [k for k in keys if len({value_text(p.get(k, "")) for p in points}) > 1]
    return sorted(swept, key=lambda k: k != CONFIG_ARG)


def is_seed_key(key: str) -> bool:
    return key.rsplit(".", 1)[-1] == "seed"


def value_text(value: Any) -> str:
    return repr(value) if isinstance(value, float) else str(value)


def _sanitise(text: str) -> str:
    text = re.sub(r"[^A-Za-z0-9._,=+-]", "_", text)
    return "_" + text[1:] if text.startswith(".") else text


def point_names(points: Sequence[Mapping]) -> list[str]:
    """A readable, file-system-safe and unique name per point, from the values that vary
    across the points (`tiny,lr=0.0001,seed=1`). Depends only on the points: stable."""
    keys = swept_keys(points) or list(dict.fromkeys(k for p in points for k in p))
    short = {k: SHORT_NAMES.get(k.rsplit(".", 1)[-1], k.rsplit(".", 1)[-1]) for k in keys}
    counts = {s: list(short.values()).count(s) for s in short.values()}
    short = {k: (s if counts[s] == 1 else k) for k, s in short.items()}
    names = []
    for p in points:
        parts = []
        for k in keys:
            if k not in p:
                continue
            if k == CONFIG_ARG:
                parts.append(str(p[k]).replace(",", "-"))
            else:
                parts.append(f"{short[k]}={value_text(p[k])}")
        name = _sanitise(",".join(parts)) or "default"
        if len(name) > _MAX_NAME:
            digest = hashlib.sha1(name.encode()).hexdigest()[:8]
            name = f"{name[: _MAX_NAME - 9]}-{digest}"
        names.append(name)
    seen: dict[str, int] = {}
    for i, name in enumerate(names):
        if name in seen:
            raise ValueError(
                f"sweep points {seen[name]} and {i} are the same ({dict(points[i])}): "
                "each point needs its own values"
            )
        seen[name] = i
    return names


# --- loading a sweep -------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Point:
    """One run of a sweep."""

    name: str
    config_arg: str  # the argument given to get_config ('' = its default)
    overrides: dict[str, Any]  # dotted key -> value (the point's own, not the sweep's)
    command: str  # pretrain | finetune
    workdir: str
    argv: tuple[str, ...]  # the command line that runs it
    num_steps: int  # train.num_steps; 0 = not known in advance (fine-tuning by epochs)
    main_metric: str  # the summary's headline metric, e.g. eval/accuracy

    def to_json(self) -> dict:
        return {**dataclasses.asdict(self), "argv": list(self.argv), "shell": shell(self.argv)}


@dataclasses.dataclass(frozen=True)
class Sweep:
    config: str  # FILE[:ARG] as given
    workdir: str
    base_overrides: tuple[str, ...]  # --config.KEY=VALUE given to `flaxbert sweep`
    points: list[Point]
    swept: list[str]  # the keys that vary, `config_arg` included


def shell(argv: Sequence[str]) -> str:
    return shlex.join(argv)


def override_args(overrides: Mapping[str, Any]) -> list[str]:
    return [f"--config.{k}={value_text(v)}" for k, v in overrides.items()]


def get_points(path: str, arg: str) -> list[dict]:
    """Calls the config file's get_sweep(arg) (or get_sweep() when it takes no argument)."""
    module = load_module(path)
    if not hasattr(module, "get_sweep"):
        raise ConfigError(
            f"config file {path!r} defines no get_sweep(arg) function; see "
            "flaxbert/sweeps/points.py and configs/sweeps/ for the format"
        )
    params = list(inspect.signature(module.get_sweep).parameters.values())
    try:
        if not params or (not arg and params[0].default is not inspect.Parameter.empty):
            points = module.get_sweep()  # no argument, or its default
        else:
            points = module.get_sweep(arg)
    except (ValueError, KeyError) as e:
        raise ConfigError(f"{path}: get_sweep({arg!r}): {e}") from None
    if not points or not all(isinstance(p, Mapping) for p in points):
        raise ConfigError(f"{path}: get_sweep must return a non-empty list of dicts")
    return [dict(p) for p in points]


def load_sweep(
    spec: str,
    workdir: str,
    overrides: Sequence[str] = (),
    command: str | None = None,
    launcher: Sequence[str] | None = None,
) -> Sweep:
    """Expands `FILE[:ARG]`'s get_sweep into points and checks every point's config (unknown
    keys, wrong types) before anything runs. `launcher` replaces `python -m flaxbert.cli`."""
    path, _, arg = spec.partition(":")
    raw = get_points(path, arg)
    names = point_names(raw)
    launcher = list(launcher or [sys.executable, "-m", "flaxbert.cli"])
    points, point_configs = [], []
    for name, p in zip(names, raw, strict=True):
        config_arg = str(p.get(CONFIG_ARG, arg))
        own = {k: v for k, v in p.items() if k != CONFIG_ARG}
        point_spec = f"{path}:{config_arg}" if config_arg else path
        try:
            config = load_config(point_spec, [*overrides, *override_args(own)])
        except ConfigError as e:
            raise ConfigError(f"sweep point {name!r}: {e}") from None
        point_configs.append(config)
        cmd = command or ("finetune" if "task" in config else "pretrain")
        finetuning = "main_metric" in config
        sub = os.path.join(workdir, name)
        argv = [*launcher, cmd, "--config", point_spec, "--workdir", sub]
        points.append(
            Point(
                name=name,
                config_arg=config_arg,
                overrides=own,
                command=cmd,
                workdir=sub,
                argv=tuple(argv + list(overrides) + override_args(own)),
                num_steps=int(config.train.get("num_steps", 0)),
                main_metric=f"eval/{config.main_metric}" if finetuning else "eval/loss",
            )
        )
    check_init_from(points, point_configs)
    return Sweep(spec, workdir, tuple(overrides), points, swept_keys(raw))


def check_init_from(points: Sequence[Point], configs: Sequence) -> None:
    """Every point's `init_from` names a readable checkpoint, before any point runs (else
    each one would fail on its own, after its start-up)."""
    checked: set[str] = set()
    for point, config in zip(points, configs, strict=True):
        init_from = config.get("init_from", "") or ""
        if not init_from or init_from in checked:
            continue
        from flaxbert.checkpoint import read_meta  # JAX and orbax: only when needed

        try:
            read_meta(init_from)
        except (ConfigError, OSError) as e:
            raise ConfigError(
                f"sweep point {point.name!r}: config key init_from={init_from!r} is no "
                f"checkpoint ({e}); give a pre-training workdir, its checkpoints/ directory or "
                "one checkpoints/STEP directory"
            ) from None
        checked.add(init_from)


def write_sweep_json(sweep: Sweep) -> str:
    os.makedirs(sweep.workdir, exist_ok=True)
    path = os.path.join(sweep.workdir, "sweep.json")
    data = {
        "config": sweep.config,
        "overrides": list(sweep.base_overrides),
        "swept": sweep.swept,
        "points": [p.to_json() for p in sweep.points],
    }
    with open(path, "w") as f:
        json.dump(data, f, indent=2, default=str)
    return path
