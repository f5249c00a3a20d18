"""`flaxbert <command>`: parses flags and the config, then calls one library function."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import shutil
import sys

from flaxbert.config import (
    ConfigError,
    UserError,
    load_config,
    override_keys,
    report_user_error,
)

log = logging.getLogger("flaxbert")


def split_config_overrides(argv: list[str]) -> tuple[list[str], list[str]]:
    """Separates `--config.KEY=VALUE` / `--config.KEY VALUE` from the command's own flags."""
    rest, overrides, i = [], [], 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("--config."):
            overrides.append(arg)
            if "=" not in arg and i + 1 < len(argv):
                overrides.append(argv[i + 1])
                i += 1
        else:
            rest.append(arg)
        i += 1
    return rest, overrides


# Flags whose value may start with "-" (`--layers -1,-2`): argparse would take it for a flag.
_DASH_VALUE_FLAGS = ("--layers",)


def join_dash_values(argv: list[str]) -> list[str]:
    """`--layers -1,-2` → `--layers=-1,-2`, so argparse reads the value as a value."""
    out, i = [], 0
    while i < len(argv):
        if argv[i] in _DASH_VALUE_FLAGS and i + 1 < len(argv) and argv[i + 1].startswith("-"):
            out.append(f"{argv[i]}={argv[i + 1]}")
            i += 2
        else:
            out.append(argv[i])
            i += 1
    return out


def user_errors() -> tuple[type[BaseException], ...]:
    """The exception classes that mean a user's mistake: one line and exit status 2."""
    from flaxbert.convert import ConversionError

    return (UserError, ConversionError)


@contextlib.contextmanager
def nothing_half_made(workdir: str, keep: tuple[str, ...] = ()):
    """On a user's mistake, removes what this run added to `workdir` (the workdir itself if
    the run made it) and puts back a config.json it overwrote, so the next run starts as if
    this one never happened. Entries named in `keep` stay when they hold anything: a cache
    of finished work (the tokenizer and prepared data in WORKDIR/data) that the next run
    reuses. Once a checkpoint has been written nothing is removed (a mistake found late, say
    in the final test evaluation, must not cost the training). Another exception (a bug, an
    interrupt) leaves everything as it is to look at."""
    existed = os.path.isdir(workdir)
    before = set(os.listdir(workdir)) if existed else set()
    config_json = os.path.join(workdir, "config.json")
    old_config = None
    if os.path.isfile(config_json):
        with open(config_json, "rb") as f:
            old_config = f.read()
    try:
        yield
    except user_errors():
        # A run that got as far as a checkpoint is not half-made: its training is kept.
        trained = os.path.isdir(ckpts := os.path.join(workdir, "checkpoints")) and any(
            n.isdigit() for n in os.listdir(ckpts)
        )
        if _is_chief() and os.path.isdir(workdir) and not trained:
            for name in sorted(set(os.listdir(workdir)) - before):
                path = os.path.join(workdir, name)
                if name in keep and os.path.isdir(path) and os.listdir(path):
                    continue
                if os.path.isdir(path) and not os.path.islink(path):
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    os.remove(path)
            if old_config is not None:
                with open(config_json, "wb") as f:
                    f.write(old_config)
            if not existed and not os.listdir(workdir):
                os.rmdir(workdir)
        raise


def _is_chief() -> bool:
    """Process 0 of a multi-process job (or the only process) does the workdir's files."""
    if "jax" not in sys.modules:
        return True
    import jax

    return jax.process_index() == 0


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config",
        required=True,
        metavar="FILE[:ARG]",
        help="config file and its argument, e.g. configs/pretrain.py:tiny; any "
        "value can then be overridden with --config.KEY=VALUE, e.g. "
        "--config.train.learning_rate=3e-4",
    )
    p.add_argument(
        "--workdir",
        required=True,
        help="directory for metrics.jsonl, TensorBoard events and the config",
    )


def _distributed_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group(
        "multi-process",
        "Run the same command in every process. Without these flags the values come from "
        "FLAXBERT_COORDINATOR / FLAXBERT_NUM_PROCESSES / FLAXBERT_PROCESS_ID (set by "
        "launch/local.sh), or from a SLURM, Open MPI or Cloud TPU job JAX detects.",
    )
    g.add_argument("--coordinator", metavar="HOST:PORT", help="address of process 0")
    g.add_argument("--num-processes", type=int, metavar="N", help="processes in the job")
    g.add_argument("--process-id", type=int, metavar="I", help="this process, 0..N-1")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flaxbert", description="Pre-train BERT and fine-tune it, in JAX/Flax."
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    p = commands.add_parser(
        "pretrain",
        help="pre-train BERT (masked LM + next-sentence prediction)",
        description="Pre-train BERT from scratch. With data.corpus empty it uses the "
        "embedded synthetic corpus.",
    )
    _config_args(p)
    _distributed_args(p)
    p = commands.add_parser(
        "compile",
        help="compile the train step for the configured mesh and print per-device memory",
        description="Memory preflight: lower and compile the pre-training step for the "
        "configured mesh (parallel.*) on abstract inputs, without data or training, and "
        "print XLA's per-device memory (arguments, outputs, temporaries, code) and FLOPs. "
        "Writes WORKDIR/compile.json.",
    )
    _config_args(p)
    _distributed_args(p)
    p = commands.add_parser(
        "finetune",
        help="fine-tune a pre-trained encoder (or a random one) on a task",
        description="Fine-tune: restore the encoder of --config.init_from=PRETRAINING_WORKDIR "
        "(embeddings and layers; the pooler with init_pooler), add a fresh task head, train, "
        "evaluate every epoch, keep the best checkpoint and write predictions. Without "
        "init_from every parameter starts random (the baseline). --config.freeze_encoder=true "
        "trains the task head alone on the frozen encoder's features. Tasks: "
        "configs/finetune.py.",
    )
    _config_args(p)
    _distributed_args(p)
    # Commands whose modules define their own flags and handlers.
    from flaxbert.features import add_extract_features_parser, run_extract_features

    add_extract_features_parser(commands).set_defaults(func=run_extract_features)
    from flaxbert.fill_mask import add_fill_mask_parser, run_fill_mask

    add_fill_mask_parser(commands).set_defaults(func=run_fill_mask)
    from flaxbert.convert import add_convert_parser, run_convert

    add_convert_parser(commands).set_defaults(func=run_convert)
    from flaxbert.data.prepare import add_prepare_parser, run_prepare
    from flaxbert.tokenizer import add_train_tokenizer_parser, run_train_tokenizer

    add_train_tokenizer_parser(commands).set_defaults(func=run_train_tokenizer)
    add_prepare_parser(commands).set_defaults(func=run_prepare)
    from flaxbert.sweeps.commands import add_sweep_parsers
    from flaxbert.sweeps.plot import add_plot_parser, run_plot

    add_sweep_parsers(commands)
    add_plot_parser(commands).set_defaults(func=run_plot)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Runs `flaxbert COMMAND ...`; returns the exit status. A user's mistake (any of
    `user_errors()`, from any command) is printed as one line on stderr with status 2."""
    argv = sys.argv[1:] if argv is None else argv
    rest, overrides = split_config_overrides(join_dash_values(argv))
    args = build_parser().parse_args(rest)
    logging.basicConfig(
        level=logging.INFO, format="[%(asctime)s] %(message)s", datefmt="%H:%M:%S", force=True
    )
    # orbax logs every step of every save through absl at INFO; its warnings still show.
    logging.getLogger("absl").setLevel(logging.WARNING)
    try:
        return _run(args, overrides)
    except user_errors() as e:
        return report_user_error(args.command, e)


def _run(args: argparse.Namespace, overrides: list[str]) -> int:
    if getattr(args, "func", None) is not None:  # data commands: their own handlers
        from flaxbert.data import text_io

        args.config_overrides = overrides  # `flaxbert sweep` passes them to every point
        with text_io.default_spelling("flags"):  # a corpus error names --errors, --text-field
            return args.func(args)
    config = load_config(args.config, overrides)
    if args.command in ("pretrain", "compile", "finetune"):
        from flaxbert import distributed  # JAX loads only once the flags are fine

        try:
            spec = distributed.resolve(args.coordinator, args.num_processes, args.process_id)
        except distributed.DistributedError as e:
            raise ConfigError(str(e)) from None
        distributed.initialize(spec)
    if args.command == "pretrain":
        from flaxbert.data.sources import CACHE_SUBDIR
        from flaxbert.train import pretrain

        with nothing_half_made(args.workdir, keep=(CACHE_SUBDIR,)):
            pretrain(config, args.workdir, explicit=override_keys(overrides))
    elif args.command == "finetune":
        from flaxbert.finetune import finetune

        with nothing_half_made(args.workdir):
            finetune(config, args.workdir, explicit=override_keys(overrides))
    elif args.command == "compile":
        from flaxbert.preflight import preflight

        preflight(config, args.workdir, explicit=override_keys(overrides))
    return 0


if __name__ == "__main__":
    sys.exit(main())
