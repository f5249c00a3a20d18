"""`flaxbert convert`: its flags (`--from-hf DIR --workdir OUT` to import, `--to-hf WORKDIR
--out DIR` to export) and the command, which prints any conversion error in one line and
exits 2.
"""

from __future__ import annotations

import argparse
import sys

from flaxbert.convert.common import HF_CONFIG, MSGPACK, SAFETENSORS, ConversionError
from flaxbert.convert.hf_export import export_hf
from flaxbert.convert.hf_import import import_hf
from flaxbert.tokenizer.wordpiece import WORDPIECE_CONFIG, WORDPIECE_VOCAB


def add_convert_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "convert",
        help="import a HuggingFace BERT directory as a flaxbert checkpoint, or export one",
        description="--from-hf DIR --workdir OUT: import a local HuggingFace BERT directory "
        f"({HF_CONFIG}, {SAFETENSORS} or {MSGPACK}, {WORDPIECE_VOCAB}) into a flaxbert "
        "workdir that `flaxbert finetune --config.init_from=OUT` takes; the vocabulary is "
        "reordered so that [PAD] [UNK] [CLS] [SEP] [MASK] get ids 0-4. --to-hf WORKDIR --out "
        "DIR: export a flaxbert checkpoint's encoder and MLM/NSP heads in HuggingFace's "
        "format, in the original vocabulary order.",
    )
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--from-hf", metavar="DIR", help="HuggingFace BERT directory to import")
    g.add_argument(
        "--to-hf", metavar="WORKDIR", help="flaxbert workdir, checkpoints/ or step dir to export"
    )
    p.add_argument("--workdir", metavar="OUT", help="with --from-hf: the workdir to write")
    p.add_argument("--out", metavar="DIR", help="with --to-hf: the directory to write")
    p.add_argument(
        "--lowercase",
        choices=("auto", "true", "false"),
        default="auto",
        help="with --from-hf: lowercase text before WordPiece (auto: do_lower_case in "
        f"{WORDPIECE_CONFIG} or {HF_CONFIG}, else whether the directory's name contains "
        "'uncased'; default: %(default)s)",
    )
    p.add_argument(
        "--drop-unknown",
        action="store_true",
        help="with --from-hf: leave out the weights of heads flaxbert does not import (e.g. "
        "the classifier.* of a BertForSequenceClassification or BertForTokenClassification), "
        "naming them in the log, instead of refusing the directory",
    )
    return p


def run_convert(args: argparse.Namespace) -> int:
    try:
        if args.from_hf:
            if not args.workdir or args.out:
                raise ConversionError("--from-hf DIR needs --workdir OUT (and no --out)")
            lowercase = {"auto": None, "true": True, "false": False}[args.lowercase]
            import_hf(args.from_hf, args.workdir, lowercase, getattr(args, "drop_unknown", False))
        else:
            if not args.out or args.workdir:
                raise ConversionError("--to-hf WORKDIR needs --out DIR (and no --workdir)")
            export_hf(args.to_hf, args.out)
    except (ValueError, OSError) as e:  # ConversionError, ConfigError, missing files
        print(f"flaxbert convert: error: {e}", file=sys.stderr)
        return 2
    return 0
