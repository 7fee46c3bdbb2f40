"""Question formats: how a multiple-choice question is asked in training and scored in evaluation, shared by
``smore eval`` (:mod:`smore.evaluation`), ``smore demo`` and ``smore train`` (which records the format it trained).

==========  ================================================================  ======================================
format      training records (:data:`~smore.data.FORMATS`)                      what each choice is scored as
==========  ================================================================  ======================================
``cloze``   (none: the benchmarks' own zero-shot templates)                   ``Question: {q}\\nAnswer:`` + `` {c}``,
                                                                              no chat template (lm-eval's default)
``answer``  ``instruction`` = the question, ``output`` = the right choice     the choice as the assistant's answer to
                                                                              the question, rendered as in training
``options`` ``instruction`` = the question and its options (no letters),      the choice as the assistant's answer to
            ``output`` = the right choice                                     that prompt, rendered as in training
``letter``  ``multiple_choice`` (the paper's lettered prompt, SPEC §1.8)      the choice's letter as the assistant's
                                                                              answer to the lettered prompt
==========  ================================================================  ======================================

"Rendered as in training" is the tokenizer's chat template when it has one, else the plain format of
:mod:`~smore.data.tokenize` (the prompt, then a newline). :func:`as_scored` rewrites a task's examples into a format;
the lettered scorings (``letter``, ``generate``) always read the lettered prompt, whatever the format.

A trained adapter folder holds :data:`TRAINING_FORMAT_FILE` (written by ``smore train``), the format closest to what
its records trained (:func:`trained_format`), so that ``smore eval --adapter`` scores that format by default.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from smore.data.formats import LETTERS, PLAIN_SEPARATOR, multiple_choice_prompt
from smore.data.tasks import MCExample
from smore.errors import UserError
from smore.files import read_json_object, write_json

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

CLOZE = "cloze"
"""The benchmarks' own templates, no chat template: what ``smore eval`` scores when nothing says otherwise."""


@dataclass(frozen=True)
class QuestionFormat:
    """How multiple-choice questions are asked in training and scored: the training records made from the task's
    examples (in a record format of :data:`smore.data.FORMATS`), the examples as the evaluator scores them, and the
    metric read."""

    description: str
    records: Callable[[Sequence[MCExample]], list[dict[str, Any]]]
    scored: Callable[[Sequence[MCExample], Any], list[MCExample]]
    method: str
    """The evaluator's scoring (``smore.evaluation.SCORINGS``) the demo reads its accuracy from."""
    metric: str
    generative: str
    """The evaluator method that scores the same format by a greedy answer (the paper's second way)."""

    @property
    def scorings(self) -> tuple[str, ...]:
        """What ``smore eval`` scores in this format unless ``--methods`` says otherwise."""
        return (self.method, self.generative)


def _question(ex: MCExample) -> str:
    return ex.question


def _question_and_options(ex: MCExample) -> str:
    options = "\n".join(f"- {choice}" for choice in ex.choices)
    return f"{ex.question}\n\nOptions:\n{options}\n\nAnswer with one of the options."


def _lettered(ex: MCExample) -> str:
    return multiple_choice_prompt(ex.question, ex.choices)


def render_prompt(tokenizer: PreTrainedTokenizerBase, user: str) -> str:
    """The text a model continues to answer one user turn, as training renders it: the chat template with the
    assistant's turn opened, or (a tokenizer without one) the plain format's prompt and separator."""
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": user}]
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return user + PLAIN_SEPARATOR


def _words_records(ask: Callable[[MCExample], str]) -> Callable[[Sequence[MCExample]], list[dict[str, Any]]]:
    return lambda examples: [{"instruction": ask(ex), "output": ex.choices[ex.answer_index]} for ex in examples]


def _answered(
    ask: Callable[[MCExample], str], answers: Callable[[MCExample], Sequence[str]]
) -> Callable[[Sequence[MCExample], Any], list[MCExample]]:
    """Each choice scored as the assistant's whole answer (``answers(ex)``) to ``ask(ex)``, rendered as in training."""

    def scored(examples: Sequence[MCExample], tokenizer: Any) -> list[MCExample]:
        out = []
        for ex in examples:
            context = render_prompt(tokenizer, ask(ex))
            out.append(replace(ex, contexts=(context,) * len(ex.choices), continuations=tuple(answers(ex))))
        return out

    return scored


def _choices(ex: MCExample) -> Sequence[str]:
    return ex.choices


def _letters(ex: MCExample) -> Sequence[str]:
    return LETTERS[: len(ex.choices)]


def _letter_records(examples: Sequence[MCExample]) -> list[dict[str, Any]]:
    return [{"question": ex.question, "choices": list(ex.choices), "answer": ex.answer_index} for ex in examples]


QUESTION_FORMATS: dict[str, QuestionFormat] = {
    # A 135M model knows some science but cannot yet map it to option letters (OLMES: the lettered format emerges
    # at larger scale); trained on letters it stays at chance. Answering in words shows what the adapter learns.
    "answer": QuestionFormat("the question, answered in words; each choice scored by its log-likelihood as the "
                             "answer", _words_records(_question), _answered(_question, _choices), "loglik", "acc",
                             "answer"),
    # The options listed (without letters), answered by copying one: a greedy answer can then name a choice, which
    # an answer to the bare question rarely does word for word.
    "options": QuestionFormat("the question and its options, answered with an option's words; each choice scored "
                              "by its log-likelihood as the answer", _words_records(_question_and_options),
                              _answered(_question_and_options, _choices), "loglik", "acc", "answer"),
    # The letter scorings read the lettered prompt themselves; the log-likelihood one scores each letter as the
    # assistant's answer to it, as training trained it.
    "letter": QuestionFormat("the paper's lettered prompt, answered by a letter; scored by the most likely letter",
                             _letter_records, _answered(_lettered, _letters), "letter", "acc_letter", "generate"),
}  # fmt: skip
"""The trainable ways of asking a multiple-choice question (``smore demo --format``), by name."""
EVAL_FORMATS = (CLOZE, *QUESTION_FORMATS)
"""Every format ``smore eval --format`` scores."""


def check_eval_format(format: str, key: str = "format") -> None:
    if format not in EVAL_FORMATS:
        raise UserError(f"{key}={format!r} is not a question format; choose one of {list(EVAL_FORMATS)}.")


def as_scored(examples: Sequence[MCExample], format: str, tokenizer: PreTrainedTokenizerBase) -> list[MCExample]:
    """A task's multiple-choice examples rewritten into ``format`` (``cloze``: as they are)."""
    check_eval_format(format)
    if format == CLOZE:
        return list(examples)
    return QUESTION_FORMATS[format].scored(examples, tokenizer)


# ----------------------------------------------------------------------------------------------------------------
# The format an adapter was trained in

TRAINING_FORMAT_FILE = "smore_training.json"
"""Beside ``adapter_config.json``: the question format the adapter was trained in (see :class:`TrainingFormat`)."""


@dataclass(frozen=True)
class TrainingFormat:
    """What an adapter's training records looked like, for scoring it the same way."""

    format: str
    """The closest question format (a key of :data:`EVAL_FORMATS`)."""
    chat_template: bool
    """Whether training rendered the records with the tokenizer's chat template."""
    record_formats: tuple[str, ...] = ()
    """The record formats of the training data (:data:`smore.data.FORMATS` keys)."""

    def __post_init__(self) -> None:
        check_eval_format(self.format, "training format")


def trained_format(record_formats: Collection[str], raw: bool) -> str:
    """The question format closest to what records of ``record_formats`` train: the lettered prompt when any is a
    multiple-choice record; text continued as it is written (``raw``: every record is ``text`` or a plain
    prompt/completion) is ``cloze``; any other conversation is a question answered in words (``answer``)."""
    if "multiple_choice" in record_formats:
        return "letter"
    return CLOZE if raw else "answer"


def write_training_format(folder: str | os.PathLike, info: TrainingFormat) -> None:
    """Write :data:`TRAINING_FORMAT_FILE` into an adapter folder (after the adapter itself is saved)."""
    document = {"format": info.format, "chat_template": info.chat_template, "record_formats": list(info.record_formats)}
    write_json(Path(folder) / TRAINING_FORMAT_FILE, document)


def read_training_format(folder: str | os.PathLike) -> TrainingFormat | None:
    """The format an adapter folder was trained in; ``None`` when it holds no :data:`TRAINING_FORMAT_FILE` (an
    adapter saved by ``smore.save_adapter`` rather than by ``smore train``)."""
    file = Path(folder) / TRAINING_FORMAT_FILE
    if not file.is_file():
        return None
    document = read_json_object(file, "written by smore train")
    format, chat = document.get("format"), document.get("chat_template")
    if format not in EVAL_FORMATS or not isinstance(chat, bool):
        raise UserError(f"{file}: 'format' must be one of {list(EVAL_FORMATS)} and 'chat_template' true or false, "
                         f"got {format!r} and {chat!r}; delete the file to score the cloze format.")  # fmt: skip
    return TrainingFormat(format, chat, tuple(document.get("record_formats") or ()))
