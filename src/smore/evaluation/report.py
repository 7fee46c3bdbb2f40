"""The JSON report of an evaluation (what was scored, with what, and the metrics), the per-example outputs beside it
(JSONL: :func:`examples_path`), and the plain-text table."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from smore._version import __version__
from smore.adapter_io import CONFIG_NAME, WEIGHTS_NAME
from smore.data import CLOZE
from smore.errors import UserError
from smore.files import atomic_write, read_json_object, sha256_file, write_json

Metrics = dict[str, float | int]
"""One task's metrics by name (``n``, ``acc``, ...)."""


def format_mismatch(scored: str, trained: str | None) -> str | None:
    """The warning when a model is scored in another question format than its adapter was trained in (``None``
    when it is not): the scores then measure the format as much as the adapter."""
    if trained is None or scored == trained:
        return None
    return (
        f"the adapter was trained in the {trained!r} question format but is scored in {scored!r}; scored anyway, "
        f"but its multiple-choice scores may understate what it learnt (drop --format, or pass --format {trained})."
    )


def adapter_hash(adapter: str | os.PathLike) -> str:
    """SHA-256 of an adapter's weights file (``adapter_model.safetensors`` in an adapter folder, or the file)."""
    path = Path(adapter)
    file = path / WEIGHTS_NAME if path.is_dir() else path
    if not file.is_file():
        raise UserError(f"{file} does not exist; an adapter folder holds {WEIGHTS_NAME}.")
    return sha256_file(file)


def examples_path(report: str | os.PathLike) -> Path:
    """Where the per-example outputs of a report go: beside it, ``eval.json`` → ``eval.examples.jsonl``."""
    report = Path(report)
    return report.with_name(f"{report.stem if report.suffix == '.json' else report.name}.examples.jsonl")


def write_report(
    path: str | os.PathLike,
    metrics: Mapping[str, Metrics],
    *,
    model: str,
    adapter: str | os.PathLike | None = None,
    config: Mapping[str, Any] | None = None,
    examples: Mapping[str, Sequence[Mapping[str, Any]]] | None = None,
    format: str = CLOZE,
    trained_format: str | None = None,
) -> dict[str, Any]:
    """Write the metrics as JSON with what produced them, and return the document.

    The document holds ``smore_version``, ``timestamp`` (UTC), ``model``, ``adapter`` (its path, the SHA-256 of its
    weights and its saved config; ``null`` for the base model), ``config`` (the evaluation settings),
    ``format`` (the question format the multiple-choice tasks were scored in, ``scored``; the one the adapter was
    trained in, ``trained``, ``null`` when unknown; and ``warning`` when the two differ), ``num_examples`` per task
    and ``metrics``. With ``examples`` (per task, one row per example, as
    :func:`~smore.evaluation.evaluate.evaluate_detailed` gives them), those rows are written to
    :func:`examples_path` (one JSON object per line, each with its ``task``) and the document names that file
    under ``examples_file``."""
    adapter_info = None
    if adapter is not None:
        config_file = Path(adapter) / CONFIG_NAME
        adapter_info = {
            "path": str(adapter),
            "sha256": adapter_hash(adapter),
            "config": read_json_object(config_file, "written by save_adapter") if config_file.exists() else None,
        }
    document = {
        "smore_version": __version__,
        "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model": model,
        "adapter": adapter_info,
        "config": dict(config or {}),
        "format": {"scored": format, "trained": trained_format, "warning": format_mismatch(format, trained_format)},
        "num_examples": {task: values["n"] for task, values in metrics.items()},
        "metrics": {task: dict(values) for task, values in metrics.items()},
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if examples is not None:
        rows = [{"task": task, **row} for task, task_rows in examples.items() for row in task_rows]
        lines = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
        atomic_write(examples_path(path), lambda temporary: temporary.write_text(lines, encoding="utf-8"))
        document["examples_file"] = examples_path(path).name
    write_json(path, document)
    return document


COLUMNS = ("n", "acc", "acc_norm", "acc_letter", "acc_gen", "no_letter", "acc_answer", "no_choice", "exact_match",
           "no_number", "pass@1", "timeout", "loss", "perplexity", "tokens")  # fmt: skip
"""The table's columns in order; a metric not named here comes after them, so no metric goes unshown."""
COUNTS = ("n", "timeout", "tokens")
"""Columns that are counts, not fractions (shown as they are)."""
VALUES = ("loss", "perplexity")
"""Columns that are values, not fractions (shown with four decimals); every other is a fraction shown in percent."""


def _cell(column: str, value: float | int | None) -> str:
    if value is None:
        return "-"
    if column in COUNTS:
        return str(value)
    return f"{value:.4f}" if column in VALUES else f"{100 * value:.2f}"


def format_metrics(metrics: Mapping[str, Metrics]) -> str:
    """A plain-text table, one task per row and one column per metric any task has (fractions in percent)."""
    present = {column for values in metrics.values() for column in values}
    shown = [c for c in COLUMNS if c in present] + sorted(present - set(COLUMNS))
    width = max([4, *map(len, metrics)])
    lines = [f"{'task':<{width}}  " + "  ".join(f"{c:>11}" for c in shown)]
    for task, values in metrics.items():
        lines.append(f"{task:<{width}}  " + "  ".join(f"{_cell(c, values.get(c)):>11}" for c in shown))
    return "\n".join(lines)
