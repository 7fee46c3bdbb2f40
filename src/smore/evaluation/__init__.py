"""Evaluation: scoring (log-likelihood and generation) on benchmark tasks, a sandbox for generated code, reports.

    from smore.evaluation import evaluate, write_report
    metrics = evaluate(model, tokenizer, ["arc_easy", "gsm8k"], limit=100)
    write_report("eval.json", metrics, model="meta-llama/Llama-3.2-1B", adapter="run/adapter")
    detailed = evaluate_detailed(model, tokenizer, ["file:chat.jsonl"])   # + every example's outputs
    write_report("chat.json", detailed.metrics, model="...", examples=detailed.examples)

The tasks themselves (:data:`TASKS`, :func:`load_task`) are :mod:`smore.data`'s, shared with training; ``smore eval``
is :func:`~smore.evaluation.cli.eval_command` from the command line.
"""

from smore.data import (
    PAPER_TASKS,
    TASKS,
    CodeExample,
    FreeFormExample,
    MathExample,
    MCExample,
    TaskSpec,
    canonical_number,
    gsm8k_target,
    load_task,
)
from smore.evaluation.cli import add_parser, eval_command, run_eval
from smore.evaluation.evaluate import (
    MAX_NEW_TOKENS,
    SCORINGS,
    Evaluation,
    default_scorings,
    evaluate,
    evaluate_detailed,
)
from smore.evaluation.generation import generate
from smore.evaluation.report import adapter_hash, examples_path, format_metrics, format_mismatch, write_report
from smore.evaluation.sandbox import Result, run_untrusted
from smore.evaluation.scoring import (
    encode_pair,
    extract_choice,
    extract_code,
    extract_letter,
    extract_number,
    humaneval_program,
    label_losses,
    loglik_choice_scores,
    loglikelihoods,
)

__all__ = [
    "MAX_NEW_TOKENS",
    "PAPER_TASKS",
    "SCORINGS",
    "TASKS",
    "CodeExample",
    "Evaluation",
    "FreeFormExample",
    "MCExample",
    "MathExample",
    "Result",
    "TaskSpec",
    "adapter_hash",
    "add_parser",
    "canonical_number",
    "default_scorings",
    "encode_pair",
    "eval_command",
    "evaluate",
    "evaluate_detailed",
    "examples_path",
    "extract_choice",
    "extract_code",
    "extract_letter",
    "extract_number",
    "format_metrics",
    "format_mismatch",
    "generate",
    "gsm8k_target",
    "humaneval_program",
    "label_losses",
    "load_task",
    "loglik_choice_scores",
    "loglikelihoods",
    "run_eval",
    "run_untrusted",
    "write_report",
]
