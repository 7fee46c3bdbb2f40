"""Supervised fine-tuning data: local JSON / JSONL records → chat messages → token ids with a loss mask.

Three steps, each a plain function, and a dataset that runs them:

1. ``load_records(path)`` reads a ``.jsonl`` file (one object per line, blank lines skipped) or a ``.json`` file (a
   list of objects, or ``{"data": [...]}``). Every record remembers where it was read (``"train.jsonl, line 7"``), so
   later errors name the file and line. The file is only ever opened for reading.
2. ``to_example(record, format=None)`` turns a record into chat messages through the registry ``FORMATS``; the
   format is detected from the record's keys, so one file may mix formats:

   ===================  =======================================  ===================================================
   format               fields                                   messages
   ===================  =======================================  ===================================================
   ``instruction``      instruction, input (optional), output    user: instruction + "\\n\\n" + input; assistant: output
   ``chat``             messages: [{role, content}, ...]         as given; every assistant turn is trained on
   ``multiple_choice``  question, choices, answer                user: the paper's prompt (SPEC §1.8); assistant: the
                                                                 answer's letter
   ===================  =======================================  ===================================================

3. ``encode(example, tokenizer, max_length)`` renders the messages (with the tokenizer's chat template when it has
   one) and labels every token ``-100`` except the assistant turns' (and the end-of-turn or EOS token after each),
   so only responses carry loss.

``SFTDataset`` runs 2–3 over a list of records; ``collate`` pads a batch; ``encode_prompt`` gives the ids a model
continues at evaluation, rendered exactly as in training.
"""

from __future__ import annotations

import json
import logging
import re
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch.utils.data import Dataset
from tqdm.auto import tqdm

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
"""Label of the tokens that carry no loss (the default ``ignore_index`` of PyTorch's cross-entropy)."""
MULTIPLE_CHOICE_INSTRUCTION = "Please choose the correct answer to the question:"
"""The paper's multiple-choice prompt opens with this sentence (SPEC §1.8)."""
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
ROLES = ("system", "user", "assistant", "tool")
PLAIN_SEPARATOR = "\n"
"""Without a chat template, every non-assistant turn ends with this, so the response starts on its own line."""
PROGRESS_MIN_RECORDS = 1000
"""Below this many records tokenising takes a moment and a progress bar is only noise."""

Message = dict[str, str]
"""One chat turn, ``{"role": ..., "content": ...}``, the form ``apply_chat_template`` takes."""


# ----------------------------------------------------------------------------------------------------------------
# 1. Reading files


class Record(dict):
    """A data record: a plain ``dict`` that also remembers where it was read, e.g. ``"train.jsonl, line 7"``."""

    def __init__(self, values: Mapping[str, Any], location: str) -> None:
        super().__init__(values)
        self.location = location


def load_records(path: str | Path) -> list[Record]:
    """The records of a ``.jsonl`` file (one JSON object per line; blank lines are skipped) or a ``.json`` file (a
    list of objects, or an object whose ``"data"`` is that list).

    A malformed line or a record that is not an object raises ``ValueError`` naming the file and the 1-based line
    (``.jsonl``) or record number (``.json``); so does a file with no records. The file is never written.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".json", ".jsonl"):
        raise ValueError(
            f"{path}: unsupported data file type {path.suffix!r}; use .jsonl (one JSON object per line) or .json "
            '(a list of objects, or {"data": [...]}).'
        )
    if not path.is_file():
        raise ValueError(f"{path} does not exist or is not a file.")
    try:
        # utf-8-sig: files saved by some editors start with a byte-order mark, which JSON does not allow.
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} cannot be read as UTF-8 text ({error}).") from error
    records = _parse_jsonl(path, text) if suffix == ".jsonl" else _parse_json(path, text)
    if not records:
        raise ValueError(f"{path} holds no records; the dataset is empty.")
    return records


_TASK_SLICE = re.compile(r"^task:(?P<name>[\w.-]+)(?:\[(?P<start>\d*):(?P<stop>\d*)\])?$")


def load_training_records(source: str) -> list[Record]:
    """Records from a data source of a run config:

    - ``path.jsonl`` / ``path.json``: a local file (see :func:`load_records`);
    - ``task:NAME`` or ``task:NAME[start:stop]``: a benchmark split shipped in a package, as the evaluator reads it
      (``smore.evaluation.tasks``), e.g. ``task:arc_easy[0:1000]`` for training and ``task:arc_easy[1000:]`` held out;
      multiple-choice tasks become multiple-choice records, math tasks instruction records with the worked solution;
    - ``hf:NAME[:CONFIG]@SPLIT``: a Hugging Face ``datasets`` dataset when a hub is reachable (``pip install
      datasets``); its rows must already be in one of the record formats (instruction, chat, multiple choice).
    """
    if source.startswith("task:"):
        return _task_records(source)
    if source.startswith("hf:"):
        return _hub_records(source)
    return load_records(source)


def _task_records(source: str) -> list[Record]:
    from smore.evaluation.tasks import MathExample, MCExample, load_task

    match = _TASK_SLICE.match(source)
    if match is None:
        raise ValueError(f"data source {source!r} must look like task:NAME or task:NAME[start:stop].")
    examples = load_task(match["name"])
    start, stop = int(match["start"] or 0), int(match["stop"]) if match["stop"] else None
    records = []
    for index, example in enumerate(examples[start:stop], start=start):
        location = f"{match['name']}, example {index}"
        if isinstance(example, MCExample):
            values = {"question": example.question, "choices": list(example.choices), "answer": example.answer_index}
        elif isinstance(example, MathExample):
            values = {"instruction": example.question, "output": example.solution or example.answer}
        else:
            raise ValueError(f"task {match['name']!r} has no training form (code tasks are for evaluation only).")
        records.append(Record(values, location))
    if not records:
        raise ValueError(f"data source {source!r} selects no example; the task has {len(examples)}.")
    return records


def _hub_records(source: str) -> list[Record]:
    name, _, split = source[len("hf:") :].partition("@")
    if not name or not split:
        raise ValueError(
            f"data source {source!r} must look like hf:NAME[:CONFIG]@SPLIT, e.g. hf:tatsu-lab/alpaca@train."
        )
    try:
        from datasets import load_dataset
    except ImportError as error:
        raise ValueError(f"data source {source!r} needs the datasets package: pip install datasets.") from error
    dataset_name, _, config = name.partition(":")
    rows = load_dataset(dataset_name, config or None, split=split)
    return [Record(dict(row), f"{source}, row {i}") for i, row in enumerate(rows)]


def _parse_jsonl(path: Path, text: str) -> list[Record]:
    records = []
    # Split on "\n" only: str.splitlines also splits on U+2028 and friends, which JSON strings may hold unescaped.
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        location = f"{path}, line {number}"
        try:
            value = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(
                f"{location}: not valid JSON ({error.msg} at column {error.colno}); fix or remove that line "
                "(each line of a .jsonl file is one JSON object)."
            ) from error
        if not isinstance(value, dict):
            raise ValueError(f"{location}: a record must be a JSON object, not {type(value).__name__}.")
        records.append(Record(value, location))
    return records


def _parse_json(path: Path, text: str) -> list[Record]:
    try:
        document = json.loads(text)
    except json.JSONDecodeError as error:
        hint = " (one object per line? name the file .jsonl)" if error.msg == "Extra data" else ""
        raise ValueError(
            f"{path}, line {error.lineno}: not valid JSON ({error.msg} at column {error.colno}){hint}."
        ) from error
    if isinstance(document, dict) and isinstance(document.get("data"), list):
        items = document["data"]
    elif isinstance(document, list):
        items = document
    else:
        found = f"an object with keys {sorted(document)}" if isinstance(document, dict) else type(document).__name__
        raise ValueError(
            f'{path}: a .json data file must hold a list of records or an object {{"data": [...]}}, not {found}.'
        )
    records = []
    for number, value in enumerate(items, start=1):
        location = f"{path}, record {number}"
        if not isinstance(value, dict):
            raise ValueError(f"{location}: a record must be a JSON object, not {type(value).__name__}.")
        records.append(Record(value, location))
    return records


# ----------------------------------------------------------------------------------------------------------------
# 2. Records → chat messages


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
    if isinstance(answer, int) and not isinstance(answer, bool):
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


def _multiple_choice_messages(record: Mapping[str, Any], fail: Fail) -> list[Message]:
    question = _text(record, "question", fail).strip()
    labels, texts = _choices(record, fail)
    index = _answer_index(record.get("answer"), labels, texts, fail)
    return [
        {"role": "user", "content": multiple_choice_prompt(question, texts)},
        {"role": "assistant", "content": LETTERS[index]},
    ]


FORMATS: dict[str, RecordFormat] = {
    f.name: f
    for f in (
        RecordFormat(
            "instruction",
            "instruction",
            "{instruction: str, input: str (optional), output: str}",
            _instruction_messages,
        ),
        RecordFormat(
            "chat",
            "messages",
            "{messages: [{role: system|user|assistant|tool, content: str}, ...]} with at least one assistant turn",
            _chat_messages,
        ),
        RecordFormat(
            "multiple_choice",
            "question",
            "{question: str, choices: [str, ...] or [{label, text}, ...], answer: a letter, a 0-based index or the "
            "text of a choice}",
            _multiple_choice_messages,
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
        raise ValueError(
            f"{location}: cannot tell the format of a record with keys {sorted(record)}; expected one of: "
            f"{_format_list()}."
        )
    raise ValueError(f"{location}: the record fits several formats {matches}; pass format= to choose one.")


def to_example(record: Mapping[str, Any], format: str | None = None, *, location: str | None = None) -> Example:
    """The chat messages of one record, in ``format`` or in the format detected from its keys.

    A missing or ill-typed field raises ``ValueError`` naming the record's location (file and line for records from
    ``load_records``), the field and the expected format.
    """
    if location is None:
        location = getattr(record, "location", "record")
    if not isinstance(record, Mapping):
        raise ValueError(f"{location}: a record must be an object (a dict), not {type(record).__name__}.")
    if format is None:
        format = detect_format(record, location)
    elif format not in FORMATS:
        raise ValueError(f"format={format!r} is not a known record format; choose one of {list(FORMATS)}.")
    spec = FORMATS[format]

    def fail(message: str) -> ValueError:
        return ValueError(f"{location}: {message}; the {spec.name} format is {spec.schema}.")

    return Example(tuple(spec.to_messages(record, fail)), location)


# ----------------------------------------------------------------------------------------------------------------
# 3. Messages → token ids and labels

Segment = tuple[list[int], bool]
"""A run of token ids and whether it carries loss."""


@dataclass(frozen=True)
class _Encoded:
    input_ids: list[int]
    labels: list[int]
    truncated: bool
    fallback: str | None
    """Why the chat template's own tokens could not be used as they are (``None`` when they could)."""


def _has_chat_template(tokenizer: PreTrainedTokenizerBase) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def _tokenize(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    # No special tokens: a template writes its own BOS into the text, and the plain format adds it explicitly.
    return list(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []


def _render(tokenizer: PreTrainedTokenizerBase, messages: Sequence[Message], generation_prompt: bool) -> str:
    text = tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=generation_prompt)
    if not isinstance(text, str):
        raise TypeError(f"apply_chat_template returned {type(text).__name__}, not a string")
    return text


def _template_segments(
    messages: Sequence[Message], tokenizer: PreTrainedTokenizerBase
) -> tuple[list[Segment] | None, str | None]:
    """The messages rendered by the chat template, cut into prompt and response segments.

    For each assistant turn i the template renders ``messages[:i]`` with the generation prompt (the response starts
    after it) and ``messages[:i+1]`` (the response and its end-of-turn marker end there); the whole conversation is
    rendered last. When each rendering's tokens are a prefix of the next one's, the cuts are exact and the ids are
    the template's own. When only the texts nest (tokens merged across a cut), the text pieces are tokenised one by
    one. When the template rewrites earlier turns (the texts do not nest) or fails, ``None``: use the plain format.
    The second value says which fallback was taken, for the warning.
    """
    cuts: list[str] = []
    try:
        for i, message in enumerate(messages):
            if message["role"] == "assistant":
                cuts.append(_render(tokenizer, messages[:i], generation_prompt=True))
                cuts.append(_render(tokenizer, messages[: i + 1], generation_prompt=False))
        cuts.append(_render(tokenizer, messages, generation_prompt=False))
    except Exception as error:  # Templates raise their own errors (jinja2, raise_exception, ...) on odd input.
        return None, (
            f"the chat template failed on these messages ({type(error).__name__}: {error}); the plain format (no "
            "template) was used"
        )
    responses = [m["content"] for m in messages if m["role"] == "assistant"]
    # Between cuts[k-1] and cuts[k]: odd k is a response (+ its end-of-turn marker), even k a prompt.
    starts = ["", *cuts[:-1]]
    pieces = [cut[len(start) :] for start, cut in zip(starts, cuts)]

    ids = [_tokenize(tokenizer, cut) for cut in cuts]
    if all(current[: len(previous)] == previous for previous, current in zip([[], *ids[:-1]], ids)):
        runs = [current[len(previous) :] for previous, current in zip([[], *ids[:-1]], ids)]
        fallback = None
    elif all(cut.startswith(start) for start, cut in zip(starts, cuts)):
        runs = [_tokenize(tokenizer, piece) for piece in pieces]
        fallback = (
            "the chat template's tokens merge across a prompt/response boundary; the parts were tokenised separately"
        )
    else:
        return None, "the chat template rewrites earlier turns; the plain format (no template) was used"

    eos = tokenizer.eos_token_id
    segments: list[Segment] = []
    for k, run in enumerate(runs):
        trained = k % 2 == 1
        # A template that writes nothing after the response gives no end-of-turn token to learn: add EOS, so that
        # the model learns to stop.
        if trained and eos is not None and pieces[k].rstrip().endswith(responses[k // 2].strip()):
            run = [*run, eos]
        segments.append((run, trained))
    return segments, fallback


def _plain_segments(messages: Sequence[Message], tokenizer: PreTrainedTokenizerBase) -> list[Segment]:
    """Without a chat template: BOS (when the tokenizer has one), then each turn's content tokenised on its own,
    non-assistant turns followed by ``PLAIN_SEPARATOR``, assistant turns by EOS (when the tokenizer has one)."""
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    segments: list[Segment] = [([bos], False)] if bos is not None else []
    for message in messages:
        if message["role"] == "assistant":
            ids = _tokenize(tokenizer, message["content"])
            segments.append(([*ids, eos] if eos is not None else ids, True))
        else:
            segments.append((_tokenize(tokenizer, message["content"] + PLAIN_SEPARATOR), False))
    return segments


def _segments(messages: Sequence[Message], tokenizer: PreTrainedTokenizerBase) -> tuple[list[Segment], str | None]:
    if _has_chat_template(tokenizer):
        segments, fallback = _template_segments(messages, tokenizer)
        if segments is not None:
            return segments, fallback
        return _plain_segments(messages, tokenizer), fallback
    return _plain_segments(messages, tokenizer), None


def _check_max_length(max_length: int) -> None:
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:
        raise ValueError(f"max_length={max_length!r} must be a positive integer (tokens per example).")


def _encode(example: Example, tokenizer: PreTrainedTokenizerBase, max_length: int) -> _Encoded:
    segments, fallback = _segments(example.messages, tokenizer)
    input_ids: list[int] = []
    labels: list[int] = []
    for ids, trained in segments:
        input_ids += ids
        labels += ids if trained else [IGNORE_INDEX] * len(ids)
    truncated = len(input_ids) > max_length
    return _Encoded(input_ids[:max_length], labels[:max_length], truncated, fallback)


def encode(example: Example, tokenizer: PreTrainedTokenizerBase, max_length: int) -> dict[str, list[int]]:
    """``input_ids``, ``attention_mask`` and ``labels`` of one example.

    ``labels`` equal ``input_ids`` on the assistant turns (with the end-of-turn token the chat template writes after
    each, or EOS when it writes none) and are ``-100`` everywhere else. With a chat template (``tokenizer.
    chat_template``) the text is the template's; without one it is BOS, the prompt and a newline, the response, EOS.

    Examples longer than ``max_length`` keep their first ``max_length`` tokens: the prompt is what a response needs,
    and cutting the start would drop the question. A warning is logged; when nothing of the response is left, every
    label is -100 (``SFTDataset`` drops such examples).
    """
    _check_max_length(max_length)
    encoded = _encode(example, tokenizer, max_length)
    if encoded.fallback:
        logger.warning("%s: %s.", example.location, encoded.fallback)
    if encoded.truncated:
        logger.warning("%s: longer than max_length=%d tokens; the end was cut.", example.location, max_length)
    return _features(encoded)


def _features(encoded: _Encoded) -> dict[str, list[int]]:
    return {
        "input_ids": encoded.input_ids,
        "attention_mask": [1] * len(encoded.input_ids),
        "labels": encoded.labels,
    }


def encode_prompt(example: Example, tokenizer: PreTrainedTokenizerBase) -> dict[str, list[int]]:
    """``input_ids`` and ``attention_mask`` for generating the example's last assistant turn: the tokens ``encode``
    gives before that turn's first response token (the turns before it and the generation prompt), not truncated."""
    last = max((i for i, m in enumerate(example.messages) if m["role"] == "assistant"), default=None)
    if last is None:
        raise ValueError(f"{example.location}: the example has no assistant turn to generate.")
    segments, _ = _segments(example.messages[: last + 1], tokenizer)
    final = max(k for k, (_, trained) in enumerate(segments) if trained)
    input_ids = [token for ids, _ in segments[:final] for token in ids]
    return {"input_ids": input_ids, "attention_mask": [1] * len(input_ids)}


# ----------------------------------------------------------------------------------------------------------------
# 4. Dataset and batches


class SFTDataset(Dataset):
    """Encoded examples of a list of records, built once up front (errors surface before training starts).

    Every record is converted first, so a bad record anywhere fails before any tokenising; then each is encoded.
    Truncated examples and the ones dropped for having no response token within ``max_length`` are counted and
    reported in one warning each.
    """

    def __init__(
        self,
        records: Sequence[Mapping[str, Any]],
        tokenizer: PreTrainedTokenizerBase,
        max_length: int,
        format: str | None = None,
    ) -> None:
        _check_max_length(max_length)
        if len(records) == 0:
            raise ValueError("no records to train on; the dataset is empty.")
        examples = [
            to_example(record, format, location=getattr(record, "location", f"record {i + 1}"))
            for i, record in enumerate(records)
        ]
        self.examples: list[dict[str, list[int]]] = []
        truncated, dropped = 0, 0
        fallbacks: Counter[str] = Counter()
        progress = tqdm(examples, desc="tokenising", unit="example", disable=len(examples) < PROGRESS_MIN_RECORDS)
        for example in progress:
            encoded = _encode(example, tokenizer, max_length)
            truncated += encoded.truncated
            if encoded.fallback:
                fallbacks[encoded.fallback] += 1
            if all(label == IGNORE_INDEX for label in encoded.labels):
                dropped += 1
                continue
            self.examples.append(_features(encoded))
        for reason, count in fallbacks.items():
            logger.warning("%d of %d examples: %s.", count, len(examples), reason)
        if truncated:
            logger.warning(
                "%d of %d examples are longer than max_length=%d tokens; their ends were cut.",
                truncated,
                len(examples),
                max_length,
            )
        if dropped:
            logger.warning(
                "dropped %d of %d examples: no response token is left within max_length=%d (the prompt fills it); "
                "raise max_length to keep them.",
                dropped,
                len(examples),
                max_length,
            )
        if not self.examples:
            raise ValueError(
                f"every one of the {len(examples)} examples was dropped (no response token within max_length="
                f"{max_length}); raise max_length."
            )

    @classmethod
    def from_file(
        cls, path: str | Path, tokenizer: PreTrainedTokenizerBase, max_length: int, format: str | None = None
    ) -> SFTDataset:
        """``SFTDataset(load_records(path), ...)``."""
        return cls(load_records(path), tokenizer, max_length, format)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        return self.examples[index]


def collate(
    examples: Sequence[Mapping[str, Sequence[int]]],
    pad_token_id: int | None,
    padding_side: Literal["right", "left"] = "right",
) -> dict[str, torch.Tensor]:
    """Pad a list of encoded examples to the longest into ``(batch, length)`` long tensors.

    ``input_ids`` are padded with ``pad_token_id``, ``attention_mask`` with 0 (all ones where absent) and ``labels``
    (when every example has them) with -100. Right padding is for training; left padding for generation, so that
    every row's last position is its last real token.
    """
    if not examples:
        raise ValueError("collate got no examples; a batch needs at least one.")
    if pad_token_id is None:
        raise ValueError(
            "pad_token_id is None: the tokenizer has no padding token. Set tokenizer.pad_token = "
            "tokenizer.eos_token (padded positions are masked out, so any token works)."
        )
    if padding_side not in ("right", "left"):
        raise ValueError(f"padding_side={padding_side!r} must be 'right' or 'left'.")
    pad_values = {"input_ids": pad_token_id, "attention_mask": 0}
    if all("labels" in example for example in examples):
        pad_values["labels"] = IGNORE_INDEX
    width = max(len(example["input_ids"]) for example in examples)
    batch = {key: torch.full((len(examples), width), value, dtype=torch.long) for key, value in pad_values.items()}
    for row, example in enumerate(examples):
        n = len(example["input_ids"])
        columns = slice(0, n) if padding_side == "right" else slice(width - n, width)
        for key in pad_values:
            values = example.get(key, [1] * n) if key == "attention_mask" else example[key]
            if len(values) != n:
                raise ValueError(f"example {row}: {key} has {len(values)} entries but input_ids has {n}.")
            batch[key][row, columns] = torch.as_tensor(values, dtype=torch.long)
    return batch
