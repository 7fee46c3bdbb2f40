"""The JSON report of an evaluation (what was scored, with what, and the metrics) and its plain-text table."""

from __future__ import annotations

import os
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from smore._version import __version__
from smore.adapter_io import CONFIG_NAME, WEIGHTS_NAME
from smore.errors import UserError
from smore.files import read_json_object, sha256_file, write_json

Metrics = dict[str, float | int]
"""One task's metrics by name (``n``, ``acc``, ...)."""


def adapter_hash(adapter: str | os.PathLike) -> str:
    """SHA-256 of an adapter's weights file (``adapter_model.safetensors`` in an adapter folder, or the file)."""
    path = Path(adapter)
    file = path / WEIGHTS_NAME if path.is_dir() else path
    if not file.is_file():
        raise UserError(f"{file} does not exist; an adapter folder holds {WEIGHTS_NAME}.")
    return sha256_file(file)


def write_report(
    path: str | os.PathLike,
    metrics: Mapping[str, Metrics],
    *,
    model: str,
    adapter: str | os.PathLike | None = None,
    config: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Write the metrics as JSON with what produced them, and return the document.

    The document holds ``smore_version``, ``timestamp`` (UTC), ``model``, ``adapter`` (its path, the SHA-256 of its
    weights and its saved config; ``null`` for the base model), ``config`` (the evaluation settings),
    ``num_examples`` per task and ``metrics``."""
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
        "num_examples": {task: values["n"] for task, values in metrics.items()},
        "metrics": {task: dict(values) for task, values in metrics.items()},
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, document)
    return document


def format_metrics(metrics: Mapping[str, Metrics]) -> str:
    """A plain-text table, one task per row."""
    columns = ["n", "acc", "acc_norm", "acc_gen", "acc_answer", "exact_match", "pass@1"]
    shown = [c for c in columns if any(c in values for values in metrics.values())]
    width = max([4, *map(len, metrics)])
    lines = [f"{'task':<{width}}  " + "  ".join(f"{c:>11}" for c in shown)]
    for task, values in metrics.items():
        cells = []
        for column in shown:
            value = values.get(column)
            cells.append(f"{'-' if value is None else value if column == 'n' else f'{100 * value:.2f}':>11}")
        lines.append(f"{task:<{width}}  " + "  ".join(cells))
    return "\n".join(lines)
