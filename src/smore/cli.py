"""The ``smore`` command line: one table maps each subcommand to a plain, importable function.

smore demo [--compare] [--steps N]          fine-tune the embedded SmolLM2 on ARC-Easy; score before and after
smore train CONFIG.yaml [key=value ...]     fine-tune any model with any adapter
smore eval --model M [--adapter A]          score a model on the paper's benchmarks
smore analyze {params,flexibility,overhead} parameter, FLOP and structural-flexibility analysis
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Mapping

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


_MPI_WORLD_SIZES = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")
"""Where MPI, which Accelerate's multi-CPU launch (``--mpirun_hostfile``) goes through, says how many processes run."""


def check_launch(env: Mapping[str, str] = os.environ) -> None:
    """Refuse ``accelerate launch --cpu --num_processes N`` (N > 1) rather than train on one process unannounced.

    Without MPI, Accelerate's ``--cpu`` launch starts the script once whatever ``--num_processes`` says; it marks a
    request for several processes only by setting ``MASTER_ADDR``, and no ``WORLD_SIZE``, so the run would form a
    group of one."""
    asked_for_cpu = env.get("ACCELERATE_USE_CPU", "").lower() in ("true", "1", "yes")
    alone = "WORLD_SIZE" not in env and not any(name in env for name in _MPI_WORLD_SIZES)
    if asked_for_cpu and "MASTER_ADDR" in env and alone:
        raise UserError(
            "accelerate launch --cpu --num_processes N starts ONE process (Accelerate runs several CPU processes only "
            "through MPI, --mpirun_hostfile). For N processes on this machine use `accelerate launch --multi_gpu "
            "--num_processes N -m smore.cli train RUN.yaml` (on a machine without a GPU the processes form a CPU "
            "group over gloo) or `torchrun --nproc_per_node N -m smore.cli train RUN.yaml`; "
            "for one process drop --num_processes (and unset MASTER_ADDR)."
        )


def _train(args: argparse.Namespace) -> int:
    from smore.training.config import load_run_config
    from smore.training.trainer import train

    check_launch()
    config = load_run_config(args.config, args.overrides)
    result = train(config, resume=args.resume, overwrite=args.overwrite)
    if int(os.environ.get("RANK", "0")) != 0:
        return 0  # one summary per run, not one per process
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
        code = args.func(args)
    except (
        UserError
    ) as error:  # the user's mistake: one clear line; any other exception is a bug and shows its traceback
        logger.error("%s", error)
        code = 2
    _leave_process_group()
    return code


def _leave_process_group() -> None:
    """End a launched run's process group before the interpreter does: torn down at exit, gloo's threads can abort
    a process ("terminate called without an active exception", SIGABRT) after it said why it stopped."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
