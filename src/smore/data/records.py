"""Data files: local JSON / JSONL records, each remembering where it was read.

``load_records(path)`` reads a ``.jsonl`` file (one object per line, blank lines skipped) or a ``.json`` file (a list
of objects, or ``{"data": [...]}``). Every record remembers where it was read (``"train.jsonl, line 7"``), so later
errors name the file and line. The file is only ever opened for reading.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from smore.errors import UserError


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
        raise UserError(
            f"{path}: unsupported data file type {path.suffix!r}; use .jsonl (one JSON object per line) or .json "
            '(a list of objects, or {"data": [...]}).'
        )
    if not path.is_file():
        raise UserError(f"{path} does not exist or is not a file.")
    try:
        # utf-8-sig: files saved by some editors start with a byte-order mark, which JSON does not allow.
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as error:
        raise UserError(f"{path} cannot be read as UTF-8 text ({error}).") from error
    records = _parse_jsonl(path, text) if suffix == ".jsonl" else _parse_json(path, text)
    if not records:
        raise UserError(f"{path} holds no records; the dataset is empty.")
    return records


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
            raise UserError(
                f"{location}: not valid JSON ({error.msg} at column {error.colno}); fix or remove that line "
                "(each line of a .jsonl file is one JSON object)."
            ) from error
        if not isinstance(value, dict):
            raise UserError(f"{location}: a record must be a JSON object, not {type(value).__name__}.")
        records.append(Record(value, location))
    return records


def _parse_json(path: Path, text: str) -> list[Record]:
    try:
        document = json.loads(text)
    except json.JSONDecodeError as error:
        hint = " (one object per line? name the file .jsonl)" if error.msg == "Extra data" else ""
        raise UserError(
            f"{path}, line {error.lineno}: not valid JSON ({error.msg} at column {error.colno}){hint}."
        ) from error
    if isinstance(document, dict) and isinstance(document.get("data"), list):
        items = document["data"]
    elif isinstance(document, list):
        items = document
    else:
        found = f"an object with keys {sorted(document)}" if isinstance(document, dict) else type(document).__name__
        raise UserError(
            f'{path}: a .json data file must hold a list of records or an object {{"data": [...]}}, not {found}.'
        )
    records = []
    for number, value in enumerate(items, start=1):
        location = f"{path}, record {number}"
        if not isinstance(value, dict):
            raise UserError(f"{location}: a record must be a JSON object, not {type(value).__name__}.")
        records.append(Record(value, location))
    return records
