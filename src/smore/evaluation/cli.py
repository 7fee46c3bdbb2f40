"""``smore eval``: load a model (and an adapter) from paths, evaluate, write the report; and its argument parser."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from smore.adapter_io import load_adapter
from smore.data import CLOZE, EVAL_FORMATS, PAPER_TASKS, load_task, read_training_format
from smore.errors import UserError
from smore.evaluation.evaluate import SCORINGS, default_scorings, evaluate_detailed
from smore.evaluation.evaluate import __doc__ as METRICS_HELP
from smore.evaluation.report import examples_path, format_metrics, write_report

logger = logging.getLogger(__name__)

DTYPES = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _task_list(tasks: str | Sequence[str]) -> list[str]:
    names = [t.strip() for t in tasks.split(",")] if isinstance(tasks, str) else [t.strip() for t in tasks]
    names = [t for t in names if t]
    if not names:
        raise UserError("no tasks given; name at least one, e.g. --tasks arc_easy,gsm8k.")
    return names


def check_output(output: str | os.PathLike, overwrite: bool) -> None:
    """Refuse to replace an earlier report (or its per-example file) unless ``overwrite``, as ``smore train``
    refuses an output folder of another run."""
    if Path(output).is_dir():
        raise UserError(f"--output {output} is a folder; give the JSON report a file name, e.g. {output}/eval.json.")
    existing = [str(p) for p in (Path(output), examples_path(output)) if p.exists()]
    if existing and not overwrite:
        raise UserError(
            f"--output {output} would replace {' and '.join(existing)}, written by an earlier evaluation; pass "
            "--overwrite to replace them, or choose another --output."
        )


def eval_command(
    model_path: str,
    adapter_path: str | None = None,
    tasks: str | Sequence[str] = PAPER_TASKS,
    limit: int | None = None,
    batch_size: int = 8,
    output: str | os.PathLike = "eval_results.json",
    *,
    max_new_tokens: int | None = None,
    methods: str | Sequence[str] | None = None,
    format: str | None = None,
    device: str | None = None,
    dtype: str = "auto",
    tokenizer_path: str | None = None,
    code_timeout: float = 10.0,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Load a model (``AutoModelForCausalLM.from_pretrained(model_path)``, a hub name or a folder) and, when given,
    the adapter saved in ``adapter_path``; evaluate; write the report to ``output``, every example's outputs beside
    it (:func:`~smore.evaluation.report.examples_path`), and return the report.

    Multiple-choice tasks are asked in ``format`` (:data:`smore.data.EVAL_FORMATS`), by default the one the adapter
    was trained in (:func:`smore.data.read_training_format`), else ``cloze``; another format than the trained one
    is scored with a warning, and the report's ``format`` says what was scored. ``methods`` default to the
    format's (:func:`~smore.evaluation.evaluate.default_scorings`).

    An existing report is refused unless ``overwrite``. The tokenizer comes from ``tokenizer_path``, else from the
    adapter folder when it holds one (training may have set a chat template), else from ``model_path``. Every
    task's data load before the model does."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    names = _task_list(tasks)
    if dtype not in DTYPES:
        raise UserError(f"dtype={dtype!r} must be one of {list(DTYPES)}.")
    trained = read_training_format(adapter_path) if adapter_path is not None else None
    scored_format = format or (trained.format if trained else CLOZE)
    defaults = default_scorings(scored_format)  # refuses an unknown format before anything loads
    if methods is None:
        methods = list(defaults)
    else:
        methods = _task_list(methods) if isinstance(methods, str) else list(methods)
    check_output(output, overwrite)
    examples = {name: load_task(name, limit) for name in names}
    if tokenizer_path is None:
        has_tokenizer = adapter_path is not None and (Path(adapter_path) / "tokenizer_config.json").is_file()
        tokenizer_path = adapter_path if has_tokenizer else model_path
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    chat_template = bool(getattr(tokenizer, "chat_template", None))
    if trained is not None and trained.chat_template != chat_template:
        _warn_chat_template(trained.chat_template, tokenizer_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=DTYPES[dtype])
    if adapter_path is not None:
        load_adapter(model, adapter_path)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    evaluation = evaluate_detailed(
        model,
        tokenizer,
        examples,
        batch_size=batch_size,
        max_new_tokens=max_new_tokens,
        methods=methods,
        code_timeout=code_timeout,
        format=scored_format,
        trained_format=trained.format if trained else None,
    )
    config = {
        "tasks": names,
        "limit": limit,
        "batch_size": batch_size,
        "max_new_tokens": max_new_tokens,
        "methods": list(methods),
        "format": scored_format,
        "chat_template": chat_template,
        "dtype": dtype,
        "device": device,
        "tokenizer": str(tokenizer_path),
        "code_timeout": code_timeout,
    }
    return write_report(output, evaluation.metrics, model=model_path, adapter=adapter_path, config=config,
                        examples=evaluation.examples, format=evaluation.format,
                        trained_format=evaluation.trained_format)  # fmt: skip


def _warn_chat_template(trained_with: bool, tokenizer_path: str) -> None:
    """Training rendered its prompts with a chat template and this tokenizer has none, or the other way round."""
    with_or_without, has = ("with", "none") if trained_with else ("without", "one")
    logger.warning("the adapter was trained %s a chat template, but the tokenizer of %s has %s; prompts are rendered "
                   "differently from training (pass --tokenizer with the training tokenizer).", with_or_without,
                   tokenizer_path, has)  # fmt: skip


def run_eval(args: argparse.Namespace) -> int:
    """``smore eval``: :func:`eval_command` with the parsed flags; prints the table and returns 0."""
    document = eval_command(
        args.model,
        args.adapter,
        args.tasks,
        args.limit,
        args.batch_size,
        args.output,
        max_new_tokens=args.max_new_tokens,
        methods=args.methods,
        format=args.format,
        device=args.device,
        dtype=args.dtype,
        tokenizer_path=args.tokenizer,
        code_timeout=args.code_timeout,
        overwrite=args.overwrite,
    )
    written = f"written to {args.output} (every example's outputs: {examples_path(args.output)})"
    scored = document["format"]
    trained = f", trained in {scored['trained']}" if scored["trained"] else ""
    asked = f"multiple choice asked in the {scored['scored']} format{trained}"
    warning = f"warning: {scored['warning']}\n" if scored["warning"] else ""
    sys.stdout.write(format_metrics(document["metrics"]) + f"\n{asked}\n{warning}{written}\n")
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``smore eval`` on the main CLI's subparsers; its ``func`` is :func:`run_eval`."""
    parser = subparsers.add_parser(
        "eval",
        help="evaluate a model (and adapter) on multiple-choice, GSM8K and HumanEval benchmarks or your own data",
        description=METRICS_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", required=True, help="base model: a hub name or a local folder")
    parser.add_argument("--adapter", help="adapter folder saved by smore (omit to evaluate the base model)")
    parser.add_argument(
        "--tasks",
        default=",".join(PAPER_TASKS),
        help="comma-separated task names or file:path.jsonl (multiple-choice or free-form records; default: the "
        "paper's benchmarks)",
    )
    parser.add_argument("--limit", type=int, help="score only the first N examples of each task")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, help="generation length for every task (default by kind)")
    parser.add_argument(
        "--methods",
        help=f"multiple-choice scoring, some of {','.join(SCORINGS)} (default: the format's; loglik,generate for "
        "cloze)",
    )
    parser.add_argument(
        "--format",
        choices=list(EVAL_FORMATS),
        help="how multiple-choice questions are asked: cloze (the benchmarks' templates, no chat template), answer / "
        "options (the answer in words, as training renders it), letter (the paper's lettered prompt); default: the "
        "format the adapter was trained in, else cloze",
    )
    parser.add_argument(
        "--output",
        default="eval_results.json",
        help="JSON report (default eval_results.json); every example's outputs go beside it, as NAME.examples.jsonl",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing report (refused without it)")
    parser.add_argument("--device", help="default: cuda when available, else cpu")
    parser.add_argument("--dtype", default="auto", choices=list(DTYPES))
    parser.add_argument("--tokenizer", help="tokenizer to use (default: the adapter folder's, else the model's)")
    parser.add_argument("--code-timeout", type=float, default=10.0, help="seconds per HumanEval program")
    parser.set_defaults(func=run_eval)
    return parser
