"""The ``smore`` command line: one table maps each subcommand to a plain, importable function.

smore demo [--compare] [--steps N]          fine-tune the embedded SmolLM2 on ARC-Easy; score before and after
smore train CONFIG.yaml [key=value ...]     fine-tune any model with any adapter
smore eval --model M [--adapter A]          score a model on the paper's benchmarks
smore analyze {params,flexibility,overhead} parameter, FLOP and structural-flexibility analysis
"""

from __future__ import annotations

import argparse
import logging
import sys

from smore.errors import UserError

logger = logging.getLogger("smore")


def _demo(args: argparse.Namespace) -> int:
    from smore.demo import demo_config_from_args, format_table, run_demo

    result = run_demo(demo_config_from_args(args))
    sys.stdout.write(format_table(result) + "\n")
    return 0


def _add_demo(subparsers) -> None:
    from smore.demo import add_arguments

    parser = subparsers.add_parser(
        "demo", help="fine-tune the embedded SmolLM2-135M-Instruct on ARC-Easy, offline, and score it before/after"
    )
    add_arguments(parser)
    parser.set_defaults(func=_demo)


def _train(args: argparse.Namespace) -> int:
    from smore.training.config import load_run_config
    from smore.training.trainer import train

    config = load_run_config(args.config, args.overrides)
    result = train(config, resume=args.resume, overwrite=args.overwrite)
    summary = f"trained {result.steps} steps; final loss {result.final_loss:.4f}"
    if result.eval_loss is not None:
        summary += f", held-out loss {result.eval_loss:.4f}"
    sys.stdout.write(f"{summary}\nadapter saved to {result.adapter_dir}\n")
    return 0


def _add_train(subparsers) -> None:
    parser = subparsers.add_parser("train", help="fine-tune a model with any adapter from a YAML run config")
    parser.add_argument("config", help="YAML run config (model, output_dir, adapter, data, train)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.learning_rate=3e-4")
    parser.add_argument("--resume", action="store_true", help="continue from the last checkpoint in output_dir")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output_dir")
    parser.set_defaults(func=_train)


def _add_eval(subparsers) -> None:
    from smore.evaluation.cli import add_parser

    add_parser(subparsers)


def _add_analyze(subparsers) -> None:
    from smore.analysis.cli import add_parser

    add_parser(subparsers)


SUBCOMMANDS = {"demo": _add_demo, "train": _add_train, "eval": _add_eval, "analyze": _add_analyze}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="smore", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for add in SUBCOMMANDS.values():
        add(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        return args.func(args)
    except (
        UserError
    ) as error:  # the user's mistake: one clear line; any other exception is a bug and shows its traceback
        logger.error("%s", error)
        return 2


if __name__ == "__main__":
    sys.exit(main())
