"""`flaxbert <command>`: parses flags and the config, then calls one library function."""

from __future__ import annotations

import argparse
import logging
import sys

from flaxbert.config import ConfigError, load_config

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
        "init_from every parameter starts random (the baseline). Tasks: configs/finetune.py.",
    )
    _config_args(p)
    _distributed_args(p)
    # Commands whose modules define their own flags and handlers.
    from flaxbert.features import add_extract_features_parser, run_extract_features

    add_extract_features_parser(commands).set_defaults(func=run_extract_features)
    from flaxbert.convert import add_convert_parser, run_convert

    add_convert_parser(commands).set_defaults(func=run_convert)
    from flaxbert.data.prepare import add_prepare_parser, run_prepare
    from flaxbert.tokenizer import add_train_tokenizer_parser, run_train_tokenizer

    add_train_tokenizer_parser(commands).set_defaults(func=run_train_tokenizer)
    add_prepare_parser(commands).set_defaults(func=run_prepare)
    from flaxbert.plot import add_plot_parser, run_plot
    from flaxbert.sweep import add_sweep_parsers

    add_sweep_parsers(commands)
    add_plot_parser(commands).set_defaults(func=run_plot)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    rest, overrides = split_config_overrides(argv)
    args = build_parser().parse_args(rest)
    logging.basicConfig(
        level=logging.INFO, format="[%(asctime)s] %(message)s", datefmt="%H:%M:%S", force=True
    )
    # orbax logs every step of every save through absl at INFO; its warnings still show.
    logging.getLogger("absl").setLevel(logging.WARNING)
    if getattr(args, "func", None) is not None:  # data commands: their own handlers
        args.config_overrides = overrides  # `flaxbert sweep` passes them to every point
        return args.func(args)
    try:
        config = load_config(args.config, overrides)
        if args.command in ("pretrain", "compile", "finetune"):
            from flaxbert import distributed  # JAX loads only once the flags are fine

            try:
                spec = distributed.resolve(args.coordinator, args.num_processes, args.process_id)
            except distributed.DistributedError as e:
                raise ConfigError(str(e)) from None
            distributed.initialize(spec)
        if args.command == "pretrain":
            from flaxbert.train import pretrain

            pretrain(config, args.workdir)
        elif args.command == "finetune":
            from flaxbert.finetune import finetune

            finetune(config, args.workdir)
        elif args.command == "compile":
            from flaxbert.preflight import preflight

            preflight(config, args.workdir)
    except ConfigError as e:
        print(f"flaxbert {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
