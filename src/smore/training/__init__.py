"""Fine-tuning: the data layer (records → token ids with a loss mask → padded batches)."""

from smore.training.data import (
    FORMATS,
    IGNORE_INDEX,
    Example,
    Record,
    RecordFormat,
    SFTDataset,
    collate,
    detect_format,
    encode,
    encode_prompt,
    load_records,
    multiple_choice_prompt,
    to_example,
)

__all__ = [
    "FORMATS",
    "IGNORE_INDEX",
    "Example",
    "Record",
    "RecordFormat",
    "SFTDataset",
    "collate",
    "detect_format",
    "encode",
    "encode_prompt",
    "load_records",
    "multiple_choice_prompt",
    "to_example",
]
