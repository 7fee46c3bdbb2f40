"""Paired statistics and the accuracy plot of ``bench/paper_comparison.py``, from its ``results.jsonl`` rows.

Every row of a comparison since issue 17 records, per metric, the 0/1 correctness of each scored question in question
order (``row["correct"][metric]``, a string of ``0`` and ``1``). All methods score the same questions, so two methods
are compared *paired*: per task, the difference of their correctness on each (seed, question) they share.

* **Mean difference** (points): over a task's seeds and questions; overall, the mean of the tasks' means (each task
  weighs the same, whatever its number of questions).
* **95 % interval**: a bootstrap that resamples, per task and independently of the other tasks, the seeds and the
  questions (with replacement; the same drawn questions for every drawn seed, since a question is the same item in
  every seed), ``resamples`` times from a fixed ``numpy`` generator seed, then the 2.5th and 97.5th percentiles.
* **Wins / ties / losses**: over the (task, seed) pairs, whose accuracy is higher.

Rows without ``correct`` (older comparisons) give no paired statistics; the plot falls back to mean ± 1.96·SE over
seeds for them.
"""

from __future__ import annotations

import logging
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger("paper_comparison")

RESAMPLES = 2000
BOOTSTRAP_SEED = 0
TREATMENT_PREFIX = "smore"
"""Methods whose name starts with this are S'MoRE variants, compared against every other trained method."""
READING = "Reading: an interval containing 0 is no difference, whatever the sign of the mean."


def correctness(row: dict[str, Any], metric: str) -> np.ndarray | None:
    """A row's 0/1 correctness per question for ``metric``, or ``None`` for a row that did not record it."""
    bits = (row.get("correct") or {}).get(metric)
    if bits is None:
        return None
    return np.frombuffer(bits.encode(), dtype=np.uint8) - ord("0") if isinstance(bits, str) else np.asarray(bits)


def _cells(rows: Sequence[dict[str, Any]], metric: str) -> dict[tuple[str, str], dict[int, np.ndarray]]:
    """``(method, task) -> {seed: correctness}`` of the rows that recorded ``metric``'s correctness."""
    cells: dict[tuple[str, str], dict[int, np.ndarray]] = {}
    for row in rows:
        bits = correctness(row, metric)
        if bits is not None:
            cells.setdefault((row["method"], row["task"]), {})[row["seed"]] = bits
    return cells


def _counts(draws: np.ndarray, size: int) -> np.ndarray:
    """How often each of ``size`` indices was drawn, per resample: ``(resamples, size)``."""
    counts = np.zeros((draws.shape[0], size))
    np.add.at(counts, (np.arange(draws.shape[0])[:, None], draws), 1)
    return counts


def resampled_means(matrix: np.ndarray, resamples: int, rng: np.random.Generator) -> np.ndarray:
    """The mean of ``matrix`` (seeds × questions) under ``resamples`` bootstrap draws of its seeds and questions."""
    seeds, questions = matrix.shape
    seed_counts = _counts(rng.integers(0, seeds, (resamples, seeds)), seeds)  # (B, S)
    question_counts = _counts(rng.integers(0, questions, (resamples, questions)), questions)  # (B, Q)
    return np.einsum("bs,sq,bq->b", seed_counts, matrix, question_counts) / (seeds * questions)


@dataclass(frozen=True)
class Difference:
    """S'MoRE minus a baseline on one task or overall, in points of accuracy."""

    mean: float
    low: float
    high: float
    wins: int
    ties: int
    losses: int

    def cell(self) -> str:
        return f"{self.mean:+.1f} [{self.low:+.1f}, {self.high:+.1f}]"


@dataclass(frozen=True)
class Comparison:
    treatment: str
    baseline: str
    metric: str
    tasks: dict[str, Difference]
    overall: Difference | None


def _interval(draws: np.ndarray) -> tuple[float, float]:
    low, high = np.percentile(100 * draws, [2.5, 97.5])
    return float(low), float(high)


def compare(
    rows: Sequence[dict[str, Any]],
    treatment: str,
    baseline: str,
    metric: str = "acc",
    *,
    resamples: int = RESAMPLES,
    seed: int = BOOTSTRAP_SEED,
) -> Comparison:
    """``treatment`` against ``baseline``, paired by (task, seed, question); see the module docstring."""
    cells = _cells(rows, metric)
    tasks = list(dict.fromkeys(row["task"] for row in rows))
    rng = np.random.default_rng(seed)  # its own generator per comparison: reproducible whatever else is compared
    per_task: dict[str, Difference] = {}
    draws: list[np.ndarray] = []
    for task in tasks:
        mine, theirs = cells.get((treatment, task), {}), cells.get((baseline, task), {})
        seeds = [s for s in mine if s in theirs and len(mine[s]) == len(theirs[s])]
        if len(seeds) < len(set(mine) & set(theirs)):
            logger.warning("%s vs %s on %s: some seeds scored different numbers of questions; left out",
                           treatment, baseline, task)  # fmt: skip
        if not seeds:
            continue
        matrix = np.stack([mine[s].astype(float) - theirs[s].astype(float) for s in sorted(seeds)])  # (S, Q)
        per_seed = matrix.mean(axis=1)
        task_draws = resampled_means(matrix, resamples, rng)
        draws.append(task_draws)
        per_task[task] = Difference(100 * float(matrix.mean()), *_interval(task_draws), int((per_seed > 0).sum()),
                                    int((per_seed == 0).sum()), int((per_seed < 0).sum()))  # fmt: skip
    overall = None
    if per_task:
        done = list(per_task.values())
        counts = (sum(d.wins for d in done), sum(d.ties for d in done), sum(d.losses for d in done))
        overall = Difference(statistics.fmean(d.mean for d in done), *_interval(np.mean(draws, axis=0)), *counts)
    return Comparison(treatment, baseline, metric, per_task, overall)


def paired_statistics(
    rows: Sequence[dict[str, Any]], metric: str = "acc", *, resamples: int = RESAMPLES, seed: int = BOOTSTRAP_SEED
) -> list[Comparison]:
    """Every S'MoRE variant (a method named ``smore...``) against every other trained method (not ``base``)."""
    methods = [m for m in dict.fromkeys(row["method"] for row in rows) if m != "base"]
    treatments = [m for m in methods if m.startswith(TREATMENT_PREFIX)]
    baselines = [m for m in methods if not m.startswith(TREATMENT_PREFIX)]
    return [compare(rows, t, b, metric, resamples=resamples, seed=seed) for t in treatments for b in baselines]


def format_paired_table(comparisons: Sequence[Comparison], tasks: Sequence[str], resamples: int = RESAMPLES) -> str:
    """The Markdown table of :func:`paired_statistics`; empty when no rows recorded per-question correctness."""
    shown = [c for c in comparisons if c.overall is not None]
    if not shown:
        return ""
    metric = shown[0].metric
    out = [f"**Paired differences in `{metric}`** (S'MoRE minus baseline, points; in brackets a 95 % bootstrap "
           f"interval resampling questions and seeds within each task, {resamples} resamples; wins / ties / losses "
           "over (task, seed) pairs)", "",
           "| S'MoRE | baseline | " + " | ".join(tasks) + " | overall | wins / ties / losses |",
           "| --- | --- | " + " | ".join("---:" for _ in tasks) + " | ---: | ---: |"]  # fmt: skip
    for c in shown:
        cells = [c.tasks[t].cell() if t in c.tasks else "" for t in tasks]
        total = c.overall
        out.append(f"| {c.treatment} | {c.baseline} | " + " | ".join(cells) + f" | {total.cell()} | "
                   f"{total.wins} / {total.ties} / {total.losses} |")  # fmt: skip
    out += ["", READING]
    return "\n".join(out)


@dataclass(frozen=True)
class Bar:
    mean: float
    low: float
    high: float


def accuracy_bars(
    rows: Sequence[dict[str, Any]], metric: str, *, resamples: int = RESAMPLES, seed: int = BOOTSTRAP_SEED
) -> tuple[dict[tuple[str, str], Bar], bool]:
    """Accuracy (%) per (method, task) with a 95 % interval, and whether every interval is a bootstrap.

    A cell whose rows all recorded per-question correctness gets the bootstrap over its seeds and questions;
    otherwise mean ± 1.96·SE over seeds (no interval with one seed)."""
    cells = _cells(rows, metric)
    bars, all_bootstrap = {}, True
    for method, task in dict.fromkeys((row["method"], row["task"]) for row in rows):
        mine = [r for r in rows if r["method"] == method and r["task"] == task and metric in r["metrics"]]
        if not mine:
            continue
        seeds = cells.get((method, task), {})
        lengths = {len(bits) for bits in seeds.values()}
        if len(seeds) == len(mine) and len(lengths) == 1:
            matrix = np.stack([seeds[s] for s in sorted(seeds)]).astype(float)
            low, high = _interval(resampled_means(matrix, resamples, np.random.default_rng(seed)))
            bars[method, task] = Bar(100 * float(matrix.mean()), low, high)
            continue
        all_bootstrap = False
        values = [100 * r["metrics"][metric] for r in mine]
        mean = statistics.fmean(values)
        half = 1.96 * statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else 0.0
        bars[method, task] = Bar(mean, mean - half, mean + half)
    return bars, all_bootstrap


def plot_accuracy(
    rows: Sequence[dict[str, Any]],
    metric: str,
    path: str | Path,
    *,
    title: str = "",
    resamples: int = RESAMPLES,
    seed: int = BOOTSTRAP_SEED,
) -> Path:
    """A PNG of accuracy per task (groups) and method (bars), with 95 % intervals (see :func:`accuracy_bars`)."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers
    import matplotlib.pyplot as plt

    bars, all_bootstrap = accuracy_bars(rows, metric, resamples=resamples, seed=seed)
    methods = list(dict.fromkeys(method for method, _ in bars))
    tasks = list(dict.fromkeys(task for _, task in bars))
    width = 0.8 / max(len(methods), 1)
    figure, axis = plt.subplots(figsize=(max(6.0, 1.1 * len(tasks) * max(len(methods), 3) * 0.45 + 2), 4.5))
    for i, method in enumerate(methods):
        xs = [t + (i - (len(methods) - 1) / 2) * width for t, task in enumerate(tasks) if (method, task) in bars]
        shown = [bars[method, task] for task in tasks if (method, task) in bars]
        errors = np.array([[b.mean - b.low for b in shown], [b.high - b.mean for b in shown]])
        axis.bar(xs, [b.mean for b in shown], width, yerr=errors, capsize=3, label=method)
    axis.set_xticks(range(len(tasks)), tasks)
    axis.set_ylabel(f"{metric} (%)")
    kind = "bootstrap over questions and seeds"
    if not all_bootstrap:
        kind += ", or mean ± 1.96·SE over seeds for runs without per-question results"
    axis.set_title(f"{title}\n95 % intervals: {kind}" if title else f"95 % intervals: {kind}", fontsize=9)
    axis.legend(fontsize=8, ncol=min(len(methods), 7), loc="lower center", bbox_to_anchor=(0.5, 1.12))
    axis.grid(axis="y", alpha=0.3)
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path
