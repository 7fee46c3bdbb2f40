"""Record formats: a data record → chat messages, through the one registry ``FORMATS``.

``to_example(record, format=None)`` turns a record into chat messages; the format is detected from the record's keys,
so one file may mix formats:

===================  =======================================  ===================================================
format               fields                                   messages
===================  =======================================  ===================================================
``instruction``      instruction, input (optional), output    user: instruction + "\\n\\n" + input; assistant: output
``chat``             messages: [{role, content}, ...]         as given; every assistant turn is trained on
``multiple_choice``  question, choices, answer                user: the paper's prompt (SPEC §1.8); assistant: the
                                                              answer's letter
===================  =======================================  ===================================================

Every ``assistant`` turn carries loss, the others do not (see :mod:`smore.data.tokenize`). For generation,
``prompt_example(record)`` takes a record of the same formats whose response (``output``, ``answer``, a last
assistant turn) may be left out, so a prompt is built exactly as training built it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from smore.checks import is_int
from smore.errors import UserError

MULTIPLE_CHOICE_INSTRUCTION = "Please choose the correct answer to the question:"
"""The paper's multiple-choice prompt opens with this sentence (SPEC §1.8)."""
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
ROLES = ("system", "user", "assistant", "tool")

Message = dict[str, str]
"""One chat turn, ``{"role": ..., "content": ...}``, the form ``apply_chat_template`` takes."""


@dataclass(frozen=True)
class Example:
    """A record as chat turns. Every ``assistant`` turn carries loss, the others do not."""

    messages: tuple[Message, ...]
    location: str = "example"
    """Where the record came from, for error messages."""


Fail = Callable[[str], ValueError]
"""Builds the error for a bad field: the message is prefixed with the record's location and followed by the format."""


@dataclass(frozen=True)
class RecordFormat:
    """A record layout: the key that identifies it, its fields (shown in errors) and how it becomes messages."""

    name: str
    key: str
    """A record holding this key is in this format (when no ``format=`` is given)."""
    schema: str
    to_messages: Callable[[Mapping[str, Any], Fail], list[Message]]
    stand_in: Callable[[Mapping[str, Any]], Mapping[str, Any]] | None = None
    """The record with a placeholder response where it has none (a record written for generation), so that
    ``to_messages`` converts it as in training; ``None``: records of this format always carry their response."""


def multiple_choice_prompt(question: str, choices: Sequence[str]) -> str:
    """The paper's prompt (SPEC §1.8): ``Please choose the correct answer to the question: Q (A) c0 (B) c1 ...``."""
    options = " ".join(f"({LETTERS[i]}) {choice}" for i, choice in enumerate(choices))
    return f"{MULTIPLE_CHOICE_INSTRUCTION} {question} {options}"


def _text(record: Mapping[str, Any], name: str, fail: Fail, *, required: bool = True) -> str:
    """A string field; non-empty when required. A missing optional field (or ``null``) reads as ``""``."""
    value = record.get(name)
    if value is None:
        if required:
            raise fail(f"missing field {name!r}")
        return ""
    if not isinstance(value, str):
        raise fail(f"field {name!r} must be a string, not {type(value).__name__}")
    if required and not value.strip():
        raise fail(f"field {name!r} is empty")
    return value


def _instruction_messages(record: Mapping[str, Any], fail: Fail) -> list[Message]:
    instruction = _text(record, "instruction", fail)
    extra = _text(record, "input", fail, required=False)
    output = _text(record, "output", fail)
    prompt = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": output}]


def _chat_messages(record: Mapping[str, Any], fail: Fail) -> list[Message]:
    turns = record.get("messages")
    if turns is None:
        raise fail("missing field 'messages'")
    if not isinstance(turns, list) or not turns:
        raise fail("field 'messages' must be a non-empty list")
    messages = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, Mapping):
            raise fail(f"messages[{i}] must be an object {{role, content}}, not {type(turn).__name__}")
        role, content = turn.get("role"), turn.get("content")
        if role not in ROLES:
            raise fail(f"messages[{i}].role={role!r} is not one of {list(ROLES)}")
        if not isinstance(content, str):
            raise fail(f"messages[{i}].content must be a string, not {type(content).__name__}")
        if role == "assistant" and not content.strip():
            raise fail(f"messages[{i}] is an assistant turn with empty content")
        # Other keys (name, tool_calls, ...) are dropped: the loss mask is built from role and content only.
        messages.append({"role": role, "content": content})
    if not any(m["role"] == "assistant" for m in messages):
        raise fail("'messages' has no assistant turn, and only assistant turns carry loss")
    return messages


def _choices(record: Mapping[str, Any], fail: Fail) -> tuple[list[str | None], list[str]]:
    """The (labels, texts) of the choices. Labels are the dataset's own (``None`` for plain strings); the prompt
    always letters the choices A, B, ... in order."""
    choices = record.get("choices")
    if choices is None:
        raise fail("missing field 'choices'")
    # The Hugging Face ARC layout, {"label": [...], "text": [...]}, is accepted as well.
    if isinstance(choices, Mapping) and isinstance(choices.get("text"), list):
        labels = choices.get("label", [None] * len(choices["text"]))
        if not isinstance(labels, list) or len(labels) != len(choices["text"]):
            raise fail("field 'choices' has 'label' and 'text' lists of different lengths")
        choices = [{"label": label, "text": text} for label, text in zip(labels, choices["text"])]
    if not isinstance(choices, list) or not 2 <= len(choices) <= len(LETTERS):
        raise fail(f"field 'choices' must be a list of 2 to {len(LETTERS)} choices")
    labels, texts = [], []
    for i, choice in enumerate(choices):
        label, text = (choice.get("label"), choice.get("text")) if isinstance(choice, Mapping) else (None, choice)
        if not isinstance(text, str) or not text.strip():
            raise fail(f"choices[{i}] must be a non-empty string or an object {{label, text}}, not {choice!r}")
        labels.append(None if label is None else str(label).strip())
        texts.append(text.strip())
    return labels, texts


def _answer_index(answer: Any, labels: list[str | None], texts: list[str], fail: Fail) -> int:
    """The 0-based index of the right choice. A string is read, in this order, as one of the dataset's labels, a
    letter A, B, ..., or the text of a choice (so a letter wins over a choice whose text is that letter)."""
    if answer is None:
        raise fail("missing field 'answer'")
    if is_int(answer):
        if not 0 <= answer < len(texts):
            raise fail(f"answer={answer} is out of range for {len(texts)} choices (a 0-based index)")
        return answer
    if not isinstance(answer, str):
        raise fail(f"field 'answer' must be a letter, a 0-based index or a choice's text, not {type(answer).__name__}")
    answer = answer.strip()
    for candidates in (labels, LETTERS[: len(texts)], texts):
        if answer in candidates:
            return list(candidates).index(answer)
    raise fail(
        f"answer={answer!r} is neither a label, a letter A-{LETTERS[len(texts) - 1]} nor the text of a choice "
        "(for a 0-based index, write a JSON number)"
    )


@dataclass(frozen=True)
class MultipleChoice:
    """A multiple-choice record, read and checked: the question, the choices' texts in order and the right one."""

    question: str
    choices: tuple[str, ...]
    answer_index: int


def _multiple_choice(record: Mapping[str, Any], fail: Fail) -> MultipleChoice:
    question = _text(record, "question", fail).strip()
    labels, texts = _choices(record, fail)
    return MultipleChoice(question, tuple(texts), _answer_index(record.get("answer"), labels, texts, fail))


def _multiple_choice_messages(record: Mapping[str, Any], fail: Fail) -> list[Message]:
    read = _multiple_choice(record, fail)
    return [
        {"role": "user", "content": multiple_choice_prompt(read.question, read.choices)},
        {"role": "assistant", "content": LETTERS[read.answer_index]},
    ]


STAND_IN = "A"
"""The placeholder response of a record written for generation: never shown to the model (the prompt ends before
the response), and valid in every format (a multiple-choice answer must be a letter)."""


def _with_field(name: str) -> Callable[[Mapping[str, Any]], Mapping[str, Any]]:
    return lambda record: {**record, name: STAND_IN} if record.get(name) in (None, "") else record


def _with_last_turn(record: Mapping[str, Any]) -> Mapping[str, Any]:
    turns = record.get("messages")
    last = turns[-1] if isinstance(turns, list) and turns else None
    if not isinstance(last, Mapping) or last.get("role") == "assistant":
        return record  # already ends on its response, or malformed: to_messages says what is wrong
    return {**record, "messages": [*turns, {"role": "assistant", "content": STAND_IN}]}


FORMATS: dict[str, RecordFormat] = {
    f.name: f
    for f in (
        RecordFormat(
            "instruction",
            "instruction",
            "{instruction: str, input: str (optional), output: str}",
            _instruction_messages,
            _with_field("output"),
        ),
        RecordFormat(
            "chat",
            "messages",
            "{messages: [{role: system|user|assistant|tool, content: str}, ...]} with at least one assistant turn",
            _chat_messages,
            _with_last_turn,
        ),
        RecordFormat(
            "multiple_choice",
            "question",
            "{question: str, choices: [str, ...] or [{label, text}, ...], answer: a letter, a 0-based index or the "
            "text of a choice}",
            _multiple_choice_messages,
            _with_field("answer"),
        ),
    )
}
"""Record formats by name. Adding one is a function from record to messages and one entry here."""


def _format_list() -> str:
    return "; ".join(f"{f.name} {f.schema}" for f in FORMATS.values())


def detect_format(record: Mapping[str, Any], location: str = "record") -> str:
    """The name of the one format whose identifying key the record holds."""
    matches = [f.name for f in FORMATS.values() if f.key in record]
    if len(matches) == 1:
        return matches[0]
    if not matches:
        raise UserError(
            f"{location}: cannot tell the format of a record with keys {sorted(record)}; expected one of: "
            f"{_format_list()}."
        )
    raise UserError(f"{location}: the record fits several formats {matches}; pass format= to choose one.")


def _checked(record: Mapping[str, Any], format: str | None, location: str) -> tuple[RecordFormat, Fail]:
    """The record's format and the error builder for its fields, once the record is known to be an object."""
    if not isinstance(record, Mapping):
        raise UserError(f"{location}: a record must be an object (a dict), not {type(record).__name__}.")
    if format is None:
        format = detect_format(record, location)
    elif format not in FORMATS:
        raise UserError(f"format={format!r} is not a known record format; choose one of {list(FORMATS)}.")
    spec = FORMATS[format]

    def fail(message: str) -> ValueError:
        return ValueError(f"{location}: {message}; the {spec.name} format is {spec.schema}.")

    return spec, fail


def to_example(record: Mapping[str, Any], format: str | None = None, *, location: str | None = None) -> Example:
    """The chat messages of one record, in ``format`` or in the format detected from its keys.

    A missing or ill-typed field raises ``ValueError`` naming the record's location (file and line for records from
    ``load_records``), the field and the expected format.
    """
    location = getattr(record, "location", "record") if location is None else location
    spec, fail = _checked(record, format, location)
    return Example(tuple(spec.to_messages(record, fail)), location)


def prompt_example(record: Mapping[str, Any], format: str | None = None, *, location: str | None = None) -> Example:
    """The chat messages for generating the response of ``record``: a record as in training (any format), whose
    response may be left out (an instruction record without ``output``, a multiple-choice one without ``answer``, a
    chat that ends on a user turn). The last assistant turn is the one to generate (a placeholder when absent);
    :func:`smore.data.tokenize.encode_prompt` renders what comes before it."""
    location = getattr(record, "location", "record") if location is None else location
    spec, fail = _checked(record, format, location)
    if spec.stand_in is not None:
        record = spec.stand_in(record)
    return Example(tuple(spec.to_messages(record, fail)), location)


def read_multiple_choice(record: Mapping[str, Any], *, location: str | None = None) -> MultipleChoice:
    """The question, choices and answer of a multiple-choice record, checked as ``to_example(record,
    "multiple_choice")`` checks them (the same errors), for readers that need the parts rather than the prompt."""
    location = getattr(record, "location", "record") if location is None else location
    _, fail = _checked(record, "multiple_choice", location)
    return _multiple_choice(record, fail)
