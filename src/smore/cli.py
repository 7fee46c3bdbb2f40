"""The ``smore`` command line: one table maps each subcommand to a plain, importable function.

smore demo [--steps N] [--output DIR]      the whole life of an adapter on a model built in-process
smore analyze {params,flexibility,overhead} parameter, FLOP and structural-flexibility analysis
"""

from __future__ import annotations

import argparse
import logging
import sys

logger = logging.getLogger("smore")


def _demo(args: argparse.Namespace) -> int:
    from smore.demo import format_result, run_demo

    result = run_demo(steps=args.steps, output_dir=args.output, seed=args.seed)
    sys.stdout.write(format_result(result) + "\n")
    return 0


def _add_demo(subparsers) -> None:
    parser = subparsers.add_parser("demo", help="train, save and reload a S'MoRE adapter on a tiny in-process model")
    parser.add_argument("--steps", type=int, default=150, help="training steps (default 150)")
    parser.add_argument("--output", default="smore_demo_out", help="folder for the adapter (default smore_demo_out)")
    parser.add_argument("--seed", type=int, default=0)
    parser.set_defaults(func=_demo)


def _add_analyze(subparsers) -> None:
    from smore.analysis.cli import add_parser

    add_parser(subparsers)


SUBCOMMANDS = {"demo": _add_demo, "analyze": _add_analyze}


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
    except ValueError as error:  # user errors: one clear line, no traceback
        logger.error("%s", error)
        return 2


if __name__ == "__main__":
    sys.exit(main())
