"""Data files: local JSON / JSONL records, each remembering where it was read.

``load_records(path)`` reads a ``.jsonl`` file (one object per line, blank lines skipped) or a ``.json`` file (a list
of objects, or ``{"data": [...]}``). Every record remembers where it was read (``"train.jsonl, line 7"``), so later
errors name the file and line. The file is only ever opened for reading.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from smore.errors import UserError


class Record(dict):
    """A data record: a plain ``dict`` that also remembers where it was read, e.g. ``"train.jsonl, line 7"``."""

    def __init__(self, values: Mapping[str, Any], location: str) -> None:
        super().__init__(values)
        self.location = location


class RecordError(UserError):
    """A bad record: where it is, what is wrong, and the hint on its format (kept apart so that
    :func:`~smore.data.formats.to_examples` can list many records and give each format's hint once)."""

    def __init__(self, location: str, problem: str, hint: str) -> None:
        super().__init__(f"{location}: {problem}; {hint}" if hint else f"{location}: {problem}.")
        self.location, self.problem, self.hint = location, problem, hint


JSONL_HINT = "fix or remove that line (each line of a .jsonl file is one JSON object)."
MAX_LISTED = 20
"""A file's bad records listed in one error; the rest are counted."""


def bad_records_error(errors: Sequence[RecordError], total: int) -> UserError:
    """One error for every bad record of a file: each one's location and problem (the first :data:`MAX_LISTED`,
    then how many more), and each format's hint once. A single bad record keeps its own message."""
    if len(errors) == 1:
        return errors[0]
    lines = [f"  {e.location}: {e.problem}" for e in errors[:MAX_LISTED]]
    if len(errors) > MAX_LISTED:
        lines.append(f"  ... and {len(errors) - MAX_LISTED} more")
    hints = list(dict.fromkeys(e.hint for e in errors if e.hint))
    listed = "\n".join(lines)
    return UserError(f"{len(errors)} of {total} records are bad; fix or remove them:\n{listed}" + "".join(
        f"\n({hint.rstrip('.')})" for hint in hints))  # fmt: skip


def load_records(path: str | Path) -> list[Record]:
    """The records of a ``.jsonl`` file (one JSON object per line; blank lines are skipped) or a ``.json`` file (a
    list of objects, or an object whose ``"data"`` is that list).

    Malformed lines and records that are not objects raise one ``ValueError`` naming the file and every bad 1-based
    line (``.jsonl``) or record number (``.json``), the first :data:`MAX_LISTED` of them; so does a file with no
    records. The file is never written.
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
    records, errors, total = [], [], 0
    # Split on "\n" only: str.splitlines also splits on U+2028 and friends, which JSON strings may hold unescaped.
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        total += 1
        location = f"{path}, line {number}"
        try:
            value = json.loads(line)
        except json.JSONDecodeError as error:
            problem = f"not valid JSON ({error.msg} at column {error.colno})"
            errors.append(RecordError(location, problem, JSONL_HINT))
            continue
        if not isinstance(value, dict):
            errors.append(RecordError(location, f"a record must be a JSON object, not {type(value).__name__}", ""))
            continue
        records.append(Record(value, location))
    if errors:
        raise bad_records_error(errors, total)
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
    records, errors = [], []
    for number, value in enumerate(items, start=1):
        location = f"{path}, record {number}"
        if isinstance(value, dict):
            records.append(Record(value, location))
        else:
            errors.append(RecordError(location, f"a record must be a JSON object, not {type(value).__name__}", ""))
    if errors:
        raise bad_records_error(errors, len(items))
    return records
