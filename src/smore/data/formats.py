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
``sharegpt``         conversations: [{from, value}, ...]      from human/user → user, gpt/assistant → assistant,
                                                              system, tool; every assistant turn is trained on
``prompt_completion`` prompt, completion (TRL)                strings: the two texts as they are, no chat template
                                                              (only the completion is trained on); lists of
                                                              messages: prompt + completion as chat turns (only
                                                              the completion's assistant turns are trained on)
``text``             text (continued pre-training)            the text as it is, no chat template; every token is
                                                              trained on (detected only when no other format is)
===================  =======================================  ===================================================

Which turns carry loss is the example's (:attr:`Example.loss_turns`: every ``assistant`` turn unless the format says
otherwise); see :mod:`smore.data.tokenize`. :func:`to_examples` converts a whole file and reports every bad record
(the first :data:`~smore.data.records.MAX_LISTED`) in one error. For generation, ``prompt_example(record)`` takes a
record of the same formats whose response (``output``, ``answer``, a last assistant turn) may be left out, so a prompt
is built exactly as training built it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from smore.checks import is_int
from smore.data.records import RecordError, bad_records_error
from smore.errors import UserError

MULTIPLE_CHOICE_INSTRUCTION = "Please choose the correct answer to the question:"
"""The paper's multiple-choice prompt opens with this sentence (SPEC §1.8)."""
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
ROLES = ("system", "user", "assistant", "tool")
PLAIN_SEPARATOR = "\n"
"""Without a chat template, every non-assistant turn ends with this, so the response starts on its own line."""

Message = dict[str, str]
"""One chat turn, ``{"role": ..., "content": ...}``, the form ``apply_chat_template`` takes."""


@dataclass(frozen=True)
class Example:
    """A record as chat turns, and which of them carry loss."""

    messages: tuple[Message, ...]
    location: str = "example"
    """Where the record came from, for error messages."""
    trained: tuple[int, ...] | None = None
    """Indices of the messages that carry loss; ``None``: every ``assistant`` turn."""
    raw: bool = False
    """The contents are joined as they are, without the chat template or separators (TRL's standard prompt /
    completion and plain text: text to continue, not a conversation)."""

    @property
    def loss_turns(self) -> tuple[int, ...]:
        """Indices of the messages that carry loss."""
        if self.trained is not None:
            return self.trained
        return tuple(i for i, m in enumerate(self.messages) if m["role"] == "assistant")


Fail = Callable[[str], RecordError]
"""Builds the error for a bad field: the message is prefixed with the record's location and followed by the format."""


@dataclass(frozen=True)
class RecordFormat:
    """A record layout: the key that identifies it, its fields (shown in errors) and how it becomes messages."""

    name: str
    key: str
    """A record holding this key is in this format (when no ``format=`` is given)."""
    schema: str
    to_example: Callable[[Mapping[str, Any], Fail, str], Example]
    """(record, fail, location) → the example."""
    fallback: bool = False
    """Detected only when no other format's key is present (``text`` is a field of many other layouts too)."""
    stand_in: Callable[[Mapping[str, Any]], Mapping[str, Any]] | None = None
    """The record with a placeholder response where it has none (a record written for generation), so that
    ``to_example`` converts it as in training; ``None``: records of this format always carry their response."""


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


def _turns(
    turns: Any,
    field: str,
    fail: Fail,
    *,
    role_key: str = "role",
    content_key: str = "content",
    roles: Mapping[str, str] | None = None,
    need_assistant: bool = True,
) -> list[Message]:
    """Checked chat turns from a list of objects: each one's role (mapped through ``roles`` when given) and content.
    Other keys (name, tool_calls, ...) are dropped: the loss mask is built from role and content only."""
    roles = roles or {role: role for role in ROLES}
    if turns is None:
        raise fail(f"missing field {field!r}")
    if not isinstance(turns, list) or not turns:
        raise fail(f"field {field!r} must be a non-empty list")
    messages = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, Mapping):
            raise fail(f"{field}[{i}] must be an object {{{role_key}, {content_key}}}, not {type(turn).__name__}")
        role, content = turn.get(role_key), turn.get(content_key)
        if role not in roles:
            raise fail(f"{field}[{i}].{role_key}={role!r} is not one of {list(roles)}")
        if not isinstance(content, str):
            raise fail(f"{field}[{i}].{content_key} must be a string, not {type(content).__name__}")
        if roles[role] == "assistant" and not content.strip():
            raise fail(f"{field}[{i}] is an assistant turn with empty content")
        messages.append({"role": roles[role], "content": content})
    if need_assistant and not any(m["role"] == "assistant" for m in messages):
        raise fail(f"{field!r} has no assistant turn, and only assistant turns carry loss")
    return messages


def _chat_messages(record: Mapping[str, Any], fail: Fail) -> list[Message]:
    return _turns(record.get("messages"), "messages", fail)


SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "tool": "tool"}  # fmt: skip
"""ShareGPT's speakers (``from``) and the chat roles they become."""


def _sharegpt_messages(record: Mapping[str, Any], fail: Fail) -> list[Message]:
    return _turns(record.get("conversations"), "conversations", fail, role_key="from", content_key="value",
                  roles=SHAREGPT_ROLES)  # fmt: skip


def _prompt_completion(record: Mapping[str, Any], fail: Fail, location: str) -> Example:
    """TRL's prompt/completion: two strings (text to continue, no template) or two lists of messages."""
    prompt, completion = record.get("prompt"), record.get("completion")
    if prompt is None:
        raise fail("missing field 'prompt'")
    if isinstance(prompt, str) and isinstance(completion, str):
        if not completion.strip():
            raise fail("field 'completion' is empty")
        messages = ({"role": "user", "content": prompt}, {"role": "assistant", "content": completion})
        return Example(messages, location, trained=(1,), raw=True)
    if isinstance(prompt, list) and isinstance(completion, list):
        before = _turns(prompt, "prompt", fail, need_assistant=False)
        after = _turns(completion, "completion", fail)
        trained = tuple(len(before) + i for i, m in enumerate(after) if m["role"] == "assistant")
        return Example(tuple(before + after), location, trained=trained)
    kinds = f"prompt is {type(prompt).__name__}, completion is {type(completion).__name__}"
    raise fail(f"'prompt' and 'completion' must both be strings or both lists of messages ({kinds})")


def _text_example(record: Mapping[str, Any], fail: Fail, location: str) -> Example:
    return Example(({"role": "assistant", "content": _text(record, "text", fail)},), location, raw=True)


def _chat_format(to_messages: Callable[[Mapping[str, Any], Fail], list[Message]]):
    """A format whose record becomes chat messages, every assistant turn trained on."""
    return lambda record, fail, location: Example(tuple(to_messages(record, fail)), location)


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
            _chat_format(_instruction_messages),
            stand_in=_with_field("output"),
        ),
        RecordFormat(
            "chat",
            "messages",
            "{messages: [{role: system|user|assistant|tool, content: str}, ...]} with at least one assistant turn",
            _chat_format(_chat_messages),
            stand_in=_with_last_turn,
        ),
        RecordFormat(
            "multiple_choice",
            "question",
            "{question: str, choices: [str, ...] or [{label, text}, ...], answer: a letter, a 0-based index or the "
            "text of a choice}",
            _chat_format(_multiple_choice_messages),
            stand_in=_with_field("answer"),
        ),
        RecordFormat(
            "sharegpt",
            "conversations",
            "{conversations: [{from: system|human|user|gpt|assistant|tool, value: str}, ...]} with at least one gpt "
            "turn",
            _chat_format(_sharegpt_messages),
        ),
        RecordFormat(
            "prompt_completion",
            "completion",
            "{prompt: str, completion: str} (text, no chat template) or {prompt: [{role, content}, ...], completion: "
            "[{role: assistant, content}, ...]}",
            _prompt_completion,
        ),
        RecordFormat("text", "text", "{text: str} (every token is trained on)", _text_example, fallback=True),
    )
}
"""Record formats by name. Adding one is a function from record to messages and one entry here."""


def _format_list() -> str:
    return "; ".join(f"{f.name} {f.schema}" for f in FORMATS.values())


def _detected(record: Mapping[str, Any]) -> list[str]:
    keyed = [f.name for f in FORMATS.values() if f.key in record and not f.fallback]
    return keyed or [f.name for f in FORMATS.values() if f.key in record]


def detect_format(record: Mapping[str, Any], location: str = "record") -> str:
    """The name of the one format whose identifying key the record holds (a fallback format's key counts only when
    no other format's does)."""
    matches = _detected(record)
    if len(matches) == 1:
        return matches[0]
    if not matches:
        raise RecordError(
            location, f"cannot tell the format of a record with keys {sorted(record)}", f"expected one of: "
            f"{_format_list()}."
        )  # fmt: skip
    raise RecordError(
        location, f"the record fits several formats {matches}", "pass format= (data.format in a run config) to "
        "choose one."
    )  # fmt: skip


def check_format(format: str | None) -> None:
    """Refuse a format name that is not in :data:`FORMATS` (``None``: detect per record)."""
    if format is not None and format not in FORMATS:
        raise UserError(
            f"format={format!r} is not a known record format (data.format in a run config); choose one of "
            f"{list(FORMATS)}, or null to detect it per record."
        )


def _checked(record: Mapping[str, Any], format: str | None, location: str) -> tuple[RecordFormat, Fail]:
    """The record's format and the error builder for its fields, once the record is known to be an object."""
    if not isinstance(record, Mapping):
        raise RecordError(location, f"a record must be an object (a dict), not {type(record).__name__}", "")
    check_format(format)
    spec = FORMATS[format or detect_format(record, location)]

    def fail(message: str) -> RecordError:
        return RecordError(location, message, f"the {spec.name} format is {spec.schema}.")

    return spec, fail


def to_example(record: Mapping[str, Any], format: str | None = None, *, location: str | None = None) -> Example:
    """The chat messages of one record, in ``format`` or in the format detected from its keys.

    A missing or ill-typed field raises :class:`RecordError` (a ``ValueError``) naming the record's location (file
    and line for records from ``load_records``), the field and the expected format.
    """
    location = getattr(record, "location", "record") if location is None else location
    spec, fail = _checked(record, format, location)
    return spec.to_example(record, fail, location)


def to_examples(records: Sequence[Mapping[str, Any]], format: str | None = None) -> list[Example]:
    """Every record's example; every bad record is reported in one error (see
    :func:`~smore.data.records.bad_records_error`). Records without a ``location`` are numbered from 1."""
    check_format(format)
    examples, errors = [], []
    for i, record in enumerate(records):
        try:
            examples.append(to_example(record, format, location=getattr(record, "location", f"record {i + 1}")))
        except RecordError as error:
            errors.append(error)
    if errors:
        raise bad_records_error(errors, len(records))
    return examples


def prompt_example(record: Mapping[str, Any], format: str | None = None, *, location: str | None = None) -> Example:
    """The chat messages for generating the response of ``record``: a record as in training (any format), whose
    response may be left out (an instruction record without ``output``, a multiple-choice one without ``answer``, a
    chat that ends on a user turn). The last assistant turn is the one to generate (a placeholder when absent);
    :func:`smore.data.tokenize.encode_prompt` renders what comes before it."""
    location = getattr(record, "location", "record") if location is None else location
    spec, fail = _checked(record, format, location)
    if spec.stand_in is not None:
        record = spec.stand_in(record)
    return spec.to_example(record, fail, location)


def read_multiple_choice(record: Mapping[str, Any], *, location: str | None = None) -> MultipleChoice:
    """The question, choices and answer of a multiple-choice record, checked as ``to_example(record,
    "multiple_choice")`` checks them (the same errors), for readers that need the parts rather than the prompt."""
    location = getattr(record, "location", "record") if location is None else location
    _, fail = _checked(record, "multiple_choice", location)
    return _multiple_choice(record, fail)
