"""Where a run's training records come from: a local file, a shipped benchmark split or a Hugging Face dataset."""

from __future__ import annotations

import re

from smore.data.records import Record, load_records
from smore.data.tasks import MathExample, MCExample, load_task
from smore.errors import UserError

_TASK_SLICE = re.compile(r"^task:(?P<name>[\w.-]+)(?:\[(?P<start>\d*):(?P<stop>\d*)\])?$")


def load_training_records(source: str) -> list[Record]:
    """Records from a data source of a run config:

    - ``path.jsonl`` / ``path.json``: a local file (see :func:`~smore.data.records.load_records`);
    - ``task:NAME`` or ``task:NAME[start:stop]``: a benchmark split shipped in a package, as the evaluator reads it
      (:mod:`smore.data.tasks`), e.g. ``task:arc_easy[0:1000]`` for training and ``task:arc_easy[1000:]`` held out;
      multiple-choice tasks become multiple-choice records, math tasks instruction records with the worked solution;
    - ``hf:NAME[:CONFIG]@SPLIT``: a Hugging Face ``datasets`` dataset when a hub is reachable (``pip install
      datasets``); its rows must already be in one of the record formats
      (:data:`~smore.data.FORMATS`: instruction, chat, multiple choice, sharegpt, prompt_completion, text).
    """
    if source.startswith("task:"):
        return _task_records(source)
    if source.startswith("hf:"):
        return _hub_records(source)
    return load_records(source)


def _task_records(source: str) -> list[Record]:
    match = _TASK_SLICE.match(source)
    if match is None:
        raise UserError(f"data source {source!r} must look like task:NAME or task:NAME[start:stop].")
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
            raise UserError(f"task {match['name']!r} has no training form (code tasks are for evaluation only).")
        records.append(Record(values, location))
    if not records:
        raise UserError(f"data source {source!r} selects no example; the task has {len(examples)}.")
    return records


def _hub_records(source: str) -> list[Record]:
    name, _, split = source[len("hf:") :].partition("@")
    if not name or not split:
        raise UserError(
            f"data source {source!r} must look like hf:NAME[:CONFIG]@SPLIT, e.g. hf:tatsu-lab/alpaca@train."
        )
    try:
        from datasets import load_dataset
    except ImportError as error:
        raise UserError(f"data source {source!r} needs the datasets package: pip install datasets.") from error
    dataset_name, _, config = name.partition(":")
    rows = load_dataset(dataset_name, config or None, split=split)
    return [Record(dict(row), f"{source}, row {i}") for i, row in enumerate(rows)]
