"""Config loading: `FILE[:ARG]` → `get_config(ARG)`, command-line overrides, validation.

Config files are Python modules with `get_config(arg)` returning a locked
`ml_collections.ConfigDict`. Overrides look like `--config.train.learning_rate=3e-4`; they
are parsed by `ml_collections.config_flags`, which keeps each field's type. Every problem is
found before any work starts and reported with the key it concerns.
"""

from __future__ import annotations

import difflib
import importlib.util
import os
import sys

import ml_collections
from absl import flags
from ml_collections import config_flags


class UserError(Exception):
    """A mistake in what the user gave (a config, a flag, an input file), not a bug.

    Its message alone says what is wrong, where (file and line, config key, flag) and what to
    do, so `flaxbert` prints it as one line and exits with status 2 instead of a traceback.
    Raise a subclass at the place the mistake is found; anything else that escapes is a bug
    and keeps its traceback.
    """


def report_user_error(command: str, error: BaseException) -> int:
    """Prints `error` as the one line `flaxbert COMMAND: error: ...` on stderr; returns the
    exit status for a user's mistake, 2."""
    message = " ".join(str(error).split("\n"))
    print(f"flaxbert {command}: error: {message}", file=sys.stderr)
    return 2


class ConfigError(UserError, ValueError):
    """A config file, override or value that cannot be used; the message says which and why."""


def flat_keys(config: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
    """Every leaf key of `config` as a dotted path, e.g. `data.reader.label`."""
    keys = []
    for key, value in config.items():
        path = f"{prefix}{key}"
        if isinstance(value, ml_collections.ConfigDict):
            keys += flat_keys(value, path + ".")
        else:
            keys.append(path)
    return keys


def load_module(path: str):
    if not os.path.isfile(path):
        raise ConfigError(
            f"config file {path!r} not found (give FILE[:ARG], e.g. configs/pretrain.py:tiny)"
        )
    name = "flaxbert_config_" + os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # lets dataclasses and pickling inside the file resolve names
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ConfigError(f"config file {path!r} defines no get_config(arg) function")
    return module


def load_config(spec: str, overrides: list[str] = ()) -> ml_collections.ConfigDict:
    """Loads `FILE[:ARG]` and applies overrides given as `--config.KEY=VALUE` strings."""
    path, _, arg = spec.partition(":")
    module = load_module(path)
    try:
        config = module.get_config(arg) if arg else module.get_config()
    except (ValueError, KeyError) as e:
        raise ConfigError(f"{spec}: {e}") from None
    if not isinstance(config, ml_collections.ConfigDict):
        raise ConfigError(f"{path}: get_config must return an ml_collections.ConfigDict")
    config.lock()
    return apply_overrides(config, overrides)


def apply_overrides(config: ml_collections.ConfigDict, overrides) -> ml_collections.ConfigDict:
    """Applies `--config.KEY=VALUE` (or `--config.KEY VALUE` split in two) strings in place."""
    args = _normalise_overrides(list(overrides))
    known = flat_keys(config)
    for arg in args:
        key = arg[len("--config.") :].split("=", 1)[0]
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
            hint = f"; did you mean {close[0]}?" if close else ""
            raise ConfigError(f"unknown config key {key!r} in override {arg!r}{hint}")
    fv = flags.FlagValues()
    argv = ["flaxbert"] + args
    config_flags.DEFINE_config_dict(
        "config", config, flag_values=fv, lock_config=True, sys_argv=argv
    )
    try:
        fv(argv, known_only=False)
    except flags.Error as e:
        raise ConfigError(f"bad config override: {e}") from None
    return fv.config


def override_keys(overrides) -> frozenset[str]:
    """The config keys (`model.vocab_size`, ...) that `--config.KEY=VALUE` overrides name: what
    the user set on purpose, which a run checks against a checkpoint or a tokenizer instead of
    letting them decide (`flaxbert.model_config.user_set_keys`)."""
    return frozenset(
        arg[len("--config.") :].split("=", 1)[0] for arg in _normalise_overrides(list(overrides))
    )


def _normalise_overrides(argv: list[str]) -> list[str]:
    out, i = [], 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--config."):
            raise ConfigError(f"not a config override: {arg!r} (expected --config.KEY=VALUE)")
        if "=" not in arg:
            if i + 1 >= len(argv):
                raise ConfigError(f"config override {arg!r} has no value")
            arg, i = f"{arg}={argv[i + 1]}", i + 1
        out.append(arg)
        i += 1
    return out


def require(condition: bool, key: str, value, why: str) -> None:
    """Raises a ConfigError naming `key` unless `condition` holds."""
    if not condition:
        raise ConfigError(f"config key {key}={value!r}: {why}")
