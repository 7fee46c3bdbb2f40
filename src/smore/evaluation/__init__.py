"""Evaluation: benchmark tasks, scoring (log-likelihood and generation), a sandbox for generated code, reports.

    from smore.evaluation import evaluate, write_report
    metrics = evaluate(model, tokenizer, ["arc_easy", "gsm8k"], limit=100)
    write_report("eval.json", metrics, model="meta-llama/Llama-3.2-1B", adapter="run/adapter")

``smore eval`` is :func:`~smore.evaluation.evaluate.eval_command` from the command line.
"""

from smore.evaluation.evaluate import (
    MAX_NEW_TOKENS,
    METHODS,
    adapter_hash,
    add_parser,
    eval_command,
    evaluate,
    format_metrics,
    generate,
    run_eval,
    write_report,
)
from smore.evaluation.sandbox import Result, run_untrusted
from smore.evaluation.scoring import (
    canonical_number,
    encode_pair,
    extract_choice,
    extract_code,
    extract_letter,
    extract_number,
    gsm8k_target,
    humaneval_program,
    loglik_choice_scores,
    loglikelihoods,
)
from smore.evaluation.tasks import (
    PAPER_TASKS,
    TASKS,
    CodeExample,
    MathExample,
    MCExample,
    TaskSpec,
    load_task,
)

__all__ = [
    "MAX_NEW_TOKENS",
    "METHODS",
    "PAPER_TASKS",
    "TASKS",
    "CodeExample",
    "MCExample",
    "MathExample",
    "Result",
    "TaskSpec",
    "adapter_hash",
    "add_parser",
    "canonical_number",
    "encode_pair",
    "eval_command",
    "evaluate",
    "extract_choice",
    "extract_code",
    "extract_letter",
    "extract_number",
    "format_metrics",
    "generate",
    "gsm8k_target",
    "humaneval_program",
    "load_task",
    "loglik_choice_scores",
    "loglikelihoods",
    "run_eval",
    "run_untrusted",
    "write_report",
]
