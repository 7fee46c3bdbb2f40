"""``smore train``: one explicit loop from a :class:`RunConfig` to a saved adapter, on one CPU or many GPUs.

The run is a few named phases over one :class:`_Run` state, and :func:`train` reads as the loop:

- :func:`_setup`: accelerator, data, output folder, model and adapter, optimizer, a resumed checkpoint;
- :func:`_optimizer_step`: the step's global batch in a seeded order, split into micro-batches per process,
  forward, ``CE + aux``, backward, the non-finite policy, clip, step;
- :func:`_log`: metrics of the steps since the last line (always one at the last step), routing health (counted
  on the device by a :class:`~smore.routing.stats.RoutingTracker`) and collapse warnings;
- :func:`_save`: a checkpoint, and pruning of the old ones;
- :func:`_finish`: the final held-out loss, the last checkpoint, the adapter and the plots.

Distribution is Accelerate's (``accelerate launch`` / ``torchrun``: DDP; FSDP and DeepSpeed through Accelerate's
own configs). The loss is normalised by the number of response tokens of the whole global batch (all processes and
accumulation steps), so the gradient is the same however the batch is split; each micro-batch's aux loss gets the
same weight as its cross-entropy (its share of the step's tokens). The data order depends only on the seed and the
epoch, so ``--resume`` continues exactly where a run stopped; with another number of processes too: step k takes
the same global batch (the examples ``[k' * B, (k' + 1) * B)`` of its epoch's seeded permutation, k' its position in
the epoch), only split into other per-process slices, so the optimizer step, the remaining examples and, up to
floating-point summation order, the result are those of the uninterrupted run.

A user error found by one process ends every process with the same message: what can be refused is decided
together (:func:`_decided_together`) before the next collective, so no process is left waiting in one.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
import math
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn
from tqdm.auto import tqdm

from smore.adapter_io import restore_adapter, save_adapter
from smore.compat import enable_checkpointing
from smore.constants import IGNORE_INDEX
from smore.data import SFTDataset, collate, load_training_records, write_training_format
from smore.errors import UserError
from smore.files import atomic_write
from smore.inject import adapt, aux_loss, summary
from smore.plots import plot_expert_load, plot_losses
from smore.registry import get_method
from smore.resources import check_model_source, check_training_memory
from smore.routing.stats import LevelHealth, RoutingTracker
from smore.training.checkpoint import (
    checkpoints,
    load_checkpoint,
    prune_checkpoints,
    read_progress,
    read_run_config,
    save_checkpoint,
    verify_checkpoint,
)
from smore.training.config import RESUMABLE, OptimConfig, RunConfig, config_changes
from smore.training.engines import (
    SHARDED,
    backward_options,
    check_engine_device,
    configure_deepspeed,
    formed_engine,
    gathered_optimizer_state,
    gathered_state_dict,
    mark_zero3_leaves,
    requested_engine,
    restore_optimizer_state,
)
from smore.training.loss import response_loss

logger = logging.getLogger(__name__)

LOG_COLUMNS = [
    "step",
    "epoch",
    "loss",
    "step_loss",
    "aux_loss",
    "lr",
    "grad_norm",
    "tokens_per_second",
    "elapsed",
    "eval_loss",
]


@dataclass(frozen=True)
class TrainResult:
    output_dir: Path
    adapter_dir: Path
    steps: int
    final_loss: float
    """The cross-entropy of the last optimizer step (a log line's ``loss`` is the mean of its window's steps; its
    ``step_loss`` is the loss of its own step)."""
    eval_loss: float | None
    history: list[dict[str, Any]]


def _prepare_output(config: RunConfig, *, resume: bool, overwrite: bool, total_steps: int | None = None) -> Path | None:
    """Make the output folder ready; returns the checkpoint to resume from, if any. Every refusal says what to type
    next: ``--resume`` (and from which checkpoint), ``--overwrite`` or another output_dir."""
    output = Path(config.output_dir)
    if not output.exists() or not any(output.iterdir()):
        output.mkdir(parents=True, exist_ok=True)
        return None
    found = checkpoints(output)
    if resume:
        if not found:
            raise UserError(
                f"--resume: {output} holds no complete checkpoint (the run stopped before its first save, see "
                "train.save_every), so there is nothing to continue; rerun the same command with --overwrite "
                "instead of --resume to start it over, or choose another output_dir."
            )
        _check_resumable(config, found[-1], total_steps)
        return found[-1]
    if overwrite:
        _empty_run_folder(output)
        return None
    if not found:
        advice = "it holds no complete checkpoint, so it cannot be resumed: pass --overwrite to start over"
    else:
        step = int(found[-1].name.split("-")[1])
        refused = _resume_refusal(config, found[-1], total_steps)
        if refused is not None:
            advice = f"its last checkpoint, {found[-1].name}, {refused}; pass --overwrite to start over"
        elif total_steps is not None and step >= total_steps:
            advice = (
                f"that run is complete ({found[-1].name}); to train it further, raise train.max_steps above {step} "
                "and pass --resume; or pass --overwrite to start over"
            )
        else:
            advice = f"pass --resume to continue it from {found[-1].name} (step {step}), or --overwrite to start over"
    raise UserError(
        f"output_dir {output} already holds files of another run; {advice} (it replaces them), or choose another "
        "output_dir."
    )


def _resume_refusal(config: RunConfig, checkpoint: Path, total_steps: int | None) -> str | None:
    """Why ``config`` cannot continue from ``checkpoint`` (``None``: it can): the keys that differ and may not, or a
    run now shorter than the checkpoint."""
    changes = config_changes(read_run_config(checkpoint), config.to_dict())
    if changes and not set(changes) - set(RESUMABLE):
        logger.info(
            "%s: changed %s", checkpoint.name, ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changes.items())
        )
    refused = {key: change for key, change in changes.items() if key not in RESUMABLE}
    if refused:
        listed = "; ".join(f"{key}: {old!r} -> {new!r}" for key, (old, new) in refused.items())
        return (
            f"belongs to a different run config ({listed}); only {sorted(RESUMABLE)} may change on --resume, so "
            "set the others back"
        )
    step = int(checkpoint.name.split("-")[1])
    if total_steps is not None and total_steps < step:
        return (
            f"is at step {step}, beyond this config's {total_steps} steps; set train.max_steps to at least {step} to "
            "resume it"
        )
    return None


def _check_resumable(config: RunConfig, checkpoint: Path, total_steps: int | None) -> None:
    refused = _resume_refusal(config, checkpoint, total_steps)
    if refused is not None:
        raise UserError(
            f"--resume: the checkpoint {checkpoint} {refused}, start over with --overwrite instead of --resume, or "
            "pick another output_dir."
        )


def _empty_run_folder(output: Path) -> None:
    """``--overwrite``: delete what a run wrote in ``output``. Only that: a folder holding anything else (data,
    code, a home folder) is refused rather than emptied."""
    foreign = sorted(p.name for p in output.iterdir() if not _RUN_ENTRY.match(p.name))
    if foreign:
        raise UserError(
            f"--overwrite: {output} holds files no run writes ({foreign[:5]}); it is not a run's output folder, so "
            "it is left alone; choose another output_dir."
        )
    for entry in output.iterdir():
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


_RUN_ENTRY = re.compile(r"^(run_config\.yaml|logs|adapter|checkpoint-\d+(\.(tmp|old|trash))?)$")
"""What ``train`` writes into ``output_dir``: all that ``--overwrite`` may remove."""


def _load_tokenizer(config: RunConfig):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(config.model)
    if tokenizer.pad_token_id is None:  # many causal LMs ship without one; padding is masked anyway
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _load_model(config: RunConfig):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    if config.quantization is None:
        return AutoModelForCausalLM.from_pretrained(config.model)
    # The base frozen and quantized (QLoRA-style); the adapters take float32 (adapt's choice for non-float bases).
    quantization = BitsAndBytesConfig(**config.quantization)
    return AutoModelForCausalLM.from_pretrained(config.model, quantization_config=quantization)


class _Logger:
    """metrics.jsonl and metrics.csv under ``output/logs`` (and TensorBoard when it is installed).

    A resumed run first cuts the logs back to the checkpoint it resumes from (``resumed_at``): the steps after it are
    trained again, so their old lines would otherwise appear twice."""

    def __init__(self, output: Path, enabled: bool, resumed_at: int = 0) -> None:
        self.enabled = enabled
        self.folder = output / "logs"
        self.tensorboard = None
        if not enabled:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        if resumed_at:
            self._cut_to(resumed_at)
        try:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step: TensorBoard hides the events of the steps trained again
            self.tensorboard = SummaryWriter(
                str(self.folder / "tensorboard"), purge_step=resumed_at + 1 if resumed_at else None
            )
        except ImportError:  # optional: pip install tensorboard
            logger.debug("tensorboard is not installed; logging to JSONL and CSV only")

    def _cut_to(self, step: int) -> None:
        """Keep the lines of steps up to ``step``; a line a kill left half-written is dropped too."""

        def kept(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
            return [row for row in rows if str(row.get("step", "")).isdigit() and int(row["step"]) <= step]

        for name in ("metrics.jsonl", "routing.jsonl"):
            path = self.folder / name
            if path.is_file():
                rows = []
                for line in path.read_text().splitlines():
                    with contextlib.suppress(json.JSONDecodeError):
                        rows.append(json.loads(line))
                _replace_text(path, "".join(json.dumps(row) + "\n" for row in kept(rows)))
        path = self.folder / "metrics.csv"
        if path.is_file():
            with path.open(newline="") as handle:
                rows = [
                    row for row in csv.DictReader(handle) if None not in row and None not in row.values()
                ]  # cut lines
            buffer = io.StringIO()
            writer = csv.DictWriter(buffer, fieldnames=LOG_COLUMNS, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(kept(rows))
            _replace_text(path, buffer.getvalue())

    def write_routing(self, step: int, health) -> None:
        """Per adapter and level: expert load, normalised entropy, share of dead experts."""
        with (self.folder / "routing.jsonl").open("a") as handle:
            for level in health:
                entry = {"step": step, "module": level.module, "level": level.level, "load": level.load}
                entry.update(entropy=level.entropy, dead_share=level.dead_share, collapsed=level.collapsed)
                handle.write(json.dumps(entry) + "\n")

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with (self.folder / "metrics.jsonl").open("a") as handle:
            handle.write(json.dumps(record) + "\n")
        csv_file = self.folder / "metrics.csv"
        new = not csv_file.exists()
        with csv_file.open("a", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=LOG_COLUMNS, extrasaction="ignore")
            if new:
                writer.writeheader()
            writer.writerow(record)
        if self.tensorboard is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and value is not None:
                    self.tensorboard.add_scalar(key, value, record["step"])
            self.tensorboard.flush()


def _replace_text(path: Path, text: str) -> None:
    """Rewrite a log file so that a kill leaves the old file or the new one, never half of it."""
    atomic_write(path, lambda tmp: tmp.write_text(text))


def _batches(dataset, indices: list[int], size: int, pad_token_id: int) -> list[dict[str, torch.Tensor]]:
    """Padded micro-batches of ``size`` examples, in the order of ``indices``."""
    return [collate([dataset[i] for i in indices[k : k + size]], pad_token_id) for k in range(0, len(indices), size)]


def _response_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Tokens that carry loss after the causal shift (label t predicts token t)."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def _evaluate_loss(model, dataset, micro_batch_size: int, pad_token_id: int, accelerator) -> float:
    """Mean cross-entropy per response token on a held-out set."""
    model.eval()
    total, count = torch.zeros((), dtype=torch.float64), 0
    with torch.no_grad():
        for start in range(0, len(dataset), micro_batch_size):
            batch = collate(
                [dataset[i] for i in range(start, min(start + micro_batch_size, len(dataset)))], pad_token_id
            )
            batch = {k: v.to(accelerator.device) for k, v in batch.items()}
            tokens = _response_tokens(batch)
            if tokens == 0:
                continue
            with accelerator.autocast():
                loss = response_loss(model, batch)
            total += loss.double().cpu() * tokens
            count += tokens
    model.train()
    return float(total / max(count, 1))


@dataclass
class _Run:
    """One run's state, shared by its phases: what :func:`_setup` built, then the progress the steps update."""

    config: RunConfig
    accelerator: Any
    output: Path
    dataset: SFTDataset
    eval_set: SFTDataset | None
    pad: int
    steps_per_epoch: int
    total_steps: int
    save_interval: int
    """Steps between checkpoints (``train.save_every`` resolved); 0: only at the end."""
    model: nn.Module
    """As Accelerate prepared it (wrapped for DDP when distributed): forward and backward go through it."""
    unwrapped: nn.Module
    """The model itself: adapters, aux losses, routing and saving are read from it."""
    trainable: list[nn.Parameter]
    optimizer: torch.optim.Optimizer
    scheduler: Any
    start_step: int
    history: list[dict[str, Any]]
    log: _Logger
    tracker: RoutingTracker
    """Counts expert selections per log window, for routing health."""
    bar: Any
    started: float = field(default_factory=time.perf_counter)
    tokens_seen: int = 0
    window: list[tuple[float, float]] = field(default_factory=list)
    """(loss, aux) of the steps since the last log line."""
    grad_norm: float | None = None
    last_eval: float | None = None
    skipped: int = 0
    health: list[LevelHealth] = field(default_factory=list)
    collapsed_before: set[tuple[str, int]] = field(default_factory=set)

    @property
    def opt(self) -> OptimConfig:
        return self.config.train

    @property
    def processes(self) -> int:
        return self.accelerator.num_processes

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process


def train(config: RunConfig, *, resume: bool = False, overwrite: bool = False) -> TrainResult:
    """Fine-tune ``config.model`` with ``config.adapter`` on ``config.data``; returns where the adapter went."""
    run = _setup(config, resume=resume, overwrite=overwrite)
    opt = run.opt
    with run.tracker, run.bar:  # however the loop ends: stop counting routing, close the progress bar
        for step in range(run.start_step, run.total_steps):
            if not _optimizer_step(run, step):  # non-finite: skipped (train.on_nonfinite=skip)
                continue
            done = step + 1
            if run.eval_set is not None and opt.eval_every and done % opt.eval_every == 0:
                run.last_eval = _evaluate_loss(run.model, run.eval_set, opt.micro_batch_size, run.pad, run.accelerator)
            if run.window and (done % opt.log_every == 0 or done == run.total_steps):
                _log(run, done)
            if run.save_interval and done % run.save_interval == 0 and done < run.total_steps:
                _save(run, done)
        if run.window:  # the last step was skipped (non-finite): the steps before it still get their line
            _log(run, run.total_steps)
    return _finish(run)


# -- setup -------------------------------------------------------------------------------------------------------
def _setup(config: RunConfig, *, resume: bool, overwrite: bool) -> _Run:
    """Everything before the first step. What can be refused is checked before the output folder is touched and
    before the model loads; the model, optimizer and scheduler are restored from the checkpoint when resuming. A
    fresh start that fails here (the model does not load, the method's state cannot be prepared) leaves no files."""
    opt = config.train
    accelerator = _accelerator(config)
    main = accelerator.is_main_process
    # Every process reads the model and the data itself (another machine may lack a file): what one refuses ends all.
    dataset, eval_set, pad, steps_per_epoch = _decided_together(accelerator, lambda: _inputs(config, accelerator))
    total_steps = opt.max_steps or max(1, math.ceil(opt.epochs * steps_per_epoch))
    output = Path(config.output_dir)
    existed = output.exists()
    resume_from = _claim_output(config, accelerator, resume=resume, overwrite=overwrite, total_steps=total_steps)
    if main:
        logger.info(
            "processes=%d, micro-batches per process and step=%d, steps=%d (%d per epoch), checkpoints: %s",
            accelerator.num_processes,
            opt.global_batch_size // accelerator.num_processes // opt.micro_batch_size,
            total_steps,
            steps_per_epoch,
            f"every {opt.save_interval(total_steps)} steps" if opt.save_interval(total_steps) else "at the end only",
        )
    try:
        return _start(config, accelerator, (dataset, eval_set, pad), steps_per_epoch, total_steps, resume_from)
    except BaseException:
        if main and resume_from is None:
            _remove_fresh_start(output, existed)
        raise


def _inputs(config: RunConfig, accelerator) -> tuple[SFTDataset, SFTDataset | None, int, int]:
    """This process's datasets, padding id and steps per epoch, with what can be refused before the model loads."""
    opt = config.train
    check_model_source(config.model)  # a missing folder, not transformers' "Repo id must be in the form ..."
    dataset, eval_set, pad = _datasets(config)
    steps_per_epoch = _steps_per_epoch(
        config, len(dataset), accelerator.num_processes, warn=accelerator.is_main_process
    )
    state = get_method(config.adapter.method).state
    if state is not None and state.check_data is not None:  # e.g. T-REX needs a prompt per cluster of its prior
        state.check_data(config.adapter, len(dataset))
    check_training_memory(
        config.model,
        opt.micro_batch_size,
        config.data.max_length,
        lengths=[len(e["input_ids"]) for e in dataset.examples],
        gradient_checkpointing=opt.gradient_checkpointing,
    )  # refuse now, not an hour in
    return dataset, eval_set, pad, steps_per_epoch


def _start(config: RunConfig, accelerator, data, steps_per_epoch: int, total_steps: int, resume_from) -> _Run:
    """The model, adapter, optimizer and logs of a run whose output folder is claimed."""
    dataset, eval_set, pad = data
    opt, main, output = config.train, accelerator.is_main_process, Path(config.output_dir)
    sharded = formed_engine(accelerator) in SHARDED

    def adapted() -> nn.Module:
        model = _adapted_model(config, dataset, pad, main=main, fresh=resume_from is None)
        if resume_from is not None:
            verify_checkpoint(resume_from)  # on every process: another machine may see another copy
            if sharded:  # FSDP and ZeRO-3 shard the parameters in prepare: the adapter goes in before it
                restore_adapter(model, resume_from / "adapter")
        return model

    model = _decided_together(accelerator, adapted)  # before prepare, whose collectives a refusal would leave hanging
    # prepare wraps this module and does not replace it (DDP, FSDP and DeepSpeed's engine hold it as .module, FSDP2
    # shards it in place, torch.compile holds it as _orig_mod): it is what accelerator.unwrap_model would return. Not
    # that call: it imports deepspeed whenever it is installed, which warns "Setting accelerator to CPU" on CPU runs.
    unwrapped = model
    trainable, optimizer, scheduler = _optimization(model, opt, total_steps)
    _engine_setup(accelerator, model, opt)
    model, optimizer = accelerator.prepare(model, optimizer)
    start_step, history = 0, []
    if resume_from is not None:
        progress = load_checkpoint(
            resume_from,
            load_adapter_weights=(lambda path: None) if sharded else (lambda path: restore_adapter(unwrapped, path)),
            optimizer=optimizer,
            scheduler=scheduler,
            restore_optimizer=lambda state: restore_optimizer_state(accelerator, model, optimizer, state),
        )
        start_step, history = progress["step"], progress["history"]  # its engine and processes: _claim_output
        logger.info("resuming %s from step %d of %d", output, start_step, total_steps)

    log = _Logger(output, main, resumed_at=start_step)
    model.train()
    tracker = RoutingTracker(unwrapped)
    bar = tqdm(total=total_steps, initial=start_step, desc=f"train {config.adapter.method}", disable=not main)
    return _Run(
        config=config,
        accelerator=accelerator,
        output=output,
        dataset=dataset,
        eval_set=eval_set,
        pad=pad,
        steps_per_epoch=steps_per_epoch,
        total_steps=total_steps,
        save_interval=opt.save_interval(total_steps),
        model=model,
        unwrapped=unwrapped,
        trainable=trainable,
        optimizer=optimizer,
        scheduler=scheduler,
        start_step=start_step,
        history=history,
        log=log,
        tracker=tracker,
        bar=bar,
    )


def _engine_setup(accelerator, model: nn.Module, opt: OptimConfig) -> None:
    """What DeepSpeed needs before ``prepare``: the run's batch split in its config and, under ZeRO-3, the routed
    adapter modules as leaf modules. (Not yet run on GPUs: Accelerate forms DeepSpeed only there.)"""
    engine = formed_engine(accelerator)
    if engine.startswith("deepspeed"):
        accumulation = opt.global_batch_size // (opt.micro_batch_size * accelerator.num_processes)
        configure_deepspeed(accelerator, opt.micro_batch_size, accumulation, opt.max_grad_norm)
    if engine == "deepspeed-zero3":
        mark_zero3_leaves(model)


def _check_launch_of(checkpoint: Path, progress: dict[str, Any], accelerator, step: int) -> None:
    """A checkpoint continues under the engine that wrote it (another engine is refused: its optimizer state is laid
    out differently); with another number of processes it continues too, and the log says how. Checked on the main
    process before the output folder is written to (:func:`_claim_output`). Checkpoints written before these keys
    existed came from plain DDP."""
    engine, processes = progress.get("engine", "ddp"), progress.get("processes")
    if engine != formed_engine(accelerator):
        raise UserError(
            f"--resume: {checkpoint} was written under {engine}, this launch runs {formed_engine(accelerator)}; "
            f"their optimizer states differ, so resume it with the {engine} launch it came from, or start over "
            "with --overwrite."
        )
    if processes is not None and processes != accelerator.num_processes:
        logger.warning(
            "%s was written by %d process(es), this launch has %d: the data order depends only on the seed and the "
            "step, so step %d takes the same global batch as it would have, now split over %d process(es); the "
            "result equals the uninterrupted run up to floating-point summation order.",
            checkpoint.name,
            processes,
            accelerator.num_processes,
            step + 1,
            accelerator.num_processes,
        )


def _remove_fresh_start(output: Path, existed: bool) -> None:
    """Undo what a fresh start wrote before its first step, so that the next attempt needs no --overwrite."""
    for name in ("run_config.yaml", "logs"):
        entry = output / name
        if entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)
        elif entry.exists():
            entry.unlink()
    if not existed and output.is_dir() and not any(output.iterdir()):
        output.rmdir()


def _steps_per_epoch(config: RunConfig, examples: int, processes: int, *, warn: bool) -> int:
    """Optimizer steps per pass over the data; refuses data smaller than one global batch, and warns when the
    batch size leaves examples out of every epoch (the order is reshuffled, so a different few each epoch)."""
    opt = config.train
    steps, dropped = divmod(examples, opt.global_batch_size)
    unit = opt.micro_batch_size * processes
    if steps == 0:
        fits = examples // unit * unit
        advice = (
            f"set train.global_batch_size={fits} (a multiple of micro_batch_size × processes)"
            if fits
            else f"lower train.micro_batch_size to at most {examples // processes} and the global batch with it"
        )
        raise UserError(
            f"{config.data.train_file} gives {examples} examples, fewer than train.global_batch_size="
            f"{opt.global_batch_size}; {advice}, or add data."
        )
    # A run that stops within its first epoch (max_steps) never reaches the examples an epoch leaves out.
    within_first_epoch = bool(opt.max_steps) and opt.max_steps < steps
    if dropped and warn and not within_first_epoch:
        fits = [size for size in range(opt.global_batch_size, 0, -unit) if examples % size == 0]
        advice = (
            f"train.global_batch_size={fits[0]} uses them all"
            if fits
            else f"a global batch size that divides {examples} uses them all"
        )
        logger.warning(
            "train.global_batch_size=%d on %d examples (data.train_file): %d step(s) per epoch, and %d examples are "
            "left out of each epoch (a different %d each epoch, the order is reshuffled); %s.",
            opt.global_batch_size,
            examples,
            steps,
            dropped,
            dropped,
            advice,
        )
    return steps


def _adapted_model(config: RunConfig, dataset: SFTDataset, pad: int, *, main: bool, fresh: bool) -> nn.Module:
    """The base model, seeded, with the adapter injected; model-level adapter state is fitted on a fresh start."""
    from accelerate.utils import set_seed

    opt = config.train
    set_seed(opt.seed)
    model = _load_model(config)
    # The loop adds aux_loss itself, weighted per micro-batch like its cross-entropy: none in the model's output.
    adapt(model, config.adapter, aux_loss_in_output=False)
    if main:
        logger.info("%s", summary(model))
    state = get_method(config.adapter.method).state
    if state is not None and state.prepare is not None and fresh:
        # e.g. T-REX clusters the training prompts once, before the first step (a resumed run restores the state).
        state.prepare(model, _batches(dataset, list(range(len(dataset))), opt.micro_batch_size, pad), opt.seed)
    if opt.gradient_checkpointing:
        enable_checkpointing(model)
    return model


def _accelerator(config: RunConfig):
    """Accelerate's process group for this launch, with the batch split checked against it."""
    from accelerate import Accelerator

    opt = config.train
    if opt.precision == "fp16" and not torch.cuda.is_available():
        raise UserError("train.precision=fp16 needs a CUDA GPU; use bf16 or fp32 on this machine.")
    if opt.precision == "bf16" and not torch.cuda.is_available():
        # Accelerate autocasts to bf16 on a CPU too, where few chips compute it natively: the run works, slowly.
        logger.warning(
            "train.precision=bf16 on a CPU: most CPUs compute bf16 slower than fp32; set train.precision=fp32 for "
            "a faster CPU run (the recipes assume a GPU)."
        )
    # Launched as several processes without a GPU, Accelerate needs cpu=True to form a gloo group (MULTI_CPU);
    # otherwise every process would believe it is alone.
    engine = requested_engine()
    check_engine_device(engine, torch.cuda.is_available())
    multi_cpu = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()
    accelerator = Accelerator(
        mixed_precision={"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[opt.precision], cpu=multi_cpu
    )
    if int(os.environ.get("WORLD_SIZE", "1")) != accelerator.num_processes:
        raise UserError(
            f"launched as {os.environ['WORLD_SIZE']} processes but Accelerate formed a group of "
            f"{accelerator.num_processes}; check the launcher and the backend."
        )
    if formed_engine(accelerator) != engine.name:
        raise UserError(
            f"this launch asks for {engine.name} but Accelerate formed {formed_engine(accelerator)}; check the "
            f"launcher's config ({engine.config_file} is the shipped one)."
        )
    processes = accelerator.num_processes
    if opt.global_batch_size % (opt.micro_batch_size * processes):
        raise UserError(
            f"train.global_batch_size={opt.global_batch_size} must be a multiple of micro_batch_size × processes = "
            f"{opt.micro_batch_size} × {processes}; launch {_fitting_processes(opt)} processes or change the batch "
            "sizes."
        )
    return accelerator


def _fitting_processes(opt: OptimConfig) -> str:
    """Process counts that split this global batch evenly, for the refusal's advice."""
    fits = [n for n in range(1, 65) if opt.global_batch_size % (opt.micro_batch_size * n) == 0]
    return ", ".join(map(str, fits[:6])) + (" …" if len(fits) > 6 else "")


def _datasets(config: RunConfig) -> tuple[SFTDataset, SFTDataset | None, int]:
    """The training set, the held-out set (if any) and the tokenizer's padding id."""
    data = config.data
    records = _records("data.train_file", data.train_file)
    eval_records = _records("data.eval_file", data.eval_file) if data.eval_file else None
    tokenizer = _load_tokenizer(config)
    dataset = SFTDataset(records, tokenizer, data.max_length, data.format)
    eval_set = None if eval_records is None else SFTDataset(eval_records, tokenizer, data.max_length, data.format)
    return dataset, eval_set, tokenizer.pad_token_id


def _records(key: str, source: str):
    """The records of one data key of the run config; a missing file is named by its key, with the fix."""
    if not source.startswith(("task:", "hf:")) and not Path(source).exists():
        fix = " or set data.eval_file=null (no held-out loss)" if key == "data.eval_file" else ""
        raise UserError(f"{key}={source!r}: no such file; point {key} at a JSON or JSONL file of records{fix}.")
    try:
        return load_training_records(source)
    except UserError as error:
        raise UserError(f"{key}: {error}") from error


def _claim_output(config: RunConfig, accelerator, *, resume: bool, overwrite: bool, total_steps: int) -> Path | None:
    """The main process prepares ``output_dir`` and records the run config there; every process learns the
    checkpoint to resume from (``None``: a fresh start)."""
    output = Path(config.output_dir)

    def claim() -> str | None:
        found = _prepare_output(config, resume=resume, overwrite=overwrite, total_steps=total_steps)
        if found is not None:  # refused before anything is written or loaded: the checkpoint and its run stay
            progress = read_progress(found)
            _check_launch_of(found, progress, accelerator, progress["step"])
        (output / "run_config.yaml").write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
        return None if found is None else str(found)

    resume_from = _main_decides(accelerator, claim)
    return None if resume_from is None else Path(resume_from)


def _main_decides(accelerator, decide):
    """Run ``decide`` on the main process and give every process its result, or its refusal (see
    :func:`_decided_together`)."""
    return _decided_together(accelerator, decide, everywhere=False)


def _decided_together(accelerator, decide, *, everywhere: bool = True):
    """Run ``decide`` on every process (``everywhere``; each gets its own result) or on the main one (each gets the
    main one's result), then end every process with the same UserError if any process refused.

    A refusal found by one process alone (a data file one machine lacks, the main process's checkpoint writer) would
    otherwise end that process while the others wait in the next collective, to die there with the process group's
    "Connection closed by peer" or a launcher's SIGTERM. Found by some processes only, the message names the first
    of them. Every process must call this at the same point: it is a collective."""
    refusal, result = None, None
    if everywhere or accelerator.is_main_process:
        try:
            result = decide()
        except UserError as error:
            refusal = str(error)
    if accelerator.num_processes == 1:
        if refusal is not None:
            raise UserError(refusal)
        return result
    import torch.distributed as dist

    verdicts: list = [None] * accelerator.num_processes
    dist.all_gather_object(verdicts, (refusal, None if everywhere else result))
    refused = [(rank, message) for rank, (message, _) in enumerate(verdicts) if message is not None]
    if refused:
        rank, message = refused[0]
        everyone = len(refused) == len(verdicts) or not everywhere
        # The run ends here on every process: leave the group now, as every process agreed to; torn down at the
        # interpreter's exit instead, gloo's threads can abort a process (SIGABRT) after it said why it stopped.
        dist.destroy_process_group()
        raise UserError(message if everyone else f"process {rank} of {len(verdicts)}: {message}")
    return result if everywhere else verdicts[0][1]


def _optimization(model: nn.Module, opt: OptimConfig, total_steps: int):
    """The trainable parameters, AdamW over them and the learning-rate schedule."""
    from transformers import get_scheduler

    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=opt.learning_rate, weight_decay=opt.weight_decay)
    scheduler = get_scheduler(
        opt.lr_scheduler,
        optimizer,
        num_warmup_steps=int(opt.warmup_ratio * total_steps),
        num_training_steps=total_steps,
    )
    return trainable, optimizer, scheduler


# -- one optimizer step ------------------------------------------------------------------------------------------
def _micro_batches(run: _Run, step: int) -> list[dict[str, torch.Tensor]]:
    """This process's micro-batches of the step's global batch. The order depends only on the seed and the epoch,
    so a resumed run sees the same batches as an uninterrupted one."""
    opt = run.opt
    epoch, position = divmod(step, run.steps_per_epoch)
    order = torch.randperm(len(run.dataset), generator=torch.Generator().manual_seed(opt.seed * 100003 + epoch))
    global_batch = order[position * opt.global_batch_size : (position + 1) * opt.global_batch_size]
    per_process = opt.global_batch_size // run.processes
    rank = run.accelerator.process_index
    mine = global_batch[rank * per_process : (rank + 1) * per_process].tolist()
    return _batches(run.dataset, mine, opt.micro_batch_size, run.pad)


def _accumulate(run: _Run, step: int, micro: list[dict[str, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward and backward over the micro-batches, gradients synchronised once at the last one; returns this
    process's share of the step's cross-entropy and aux loss.

    Accelerate's ``sync_gradients`` flag says which backward is the last: DDP and FSDP skip their reduction under
    ``no_sync`` before it, and under DeepSpeed (where ``no_sync`` does nothing for ZeRO-2/3) Accelerate's engine
    wrapper passes the flag on as DeepSpeed's accumulation boundary and calls ``engine.step()`` (clip, update) only
    when it is set; left at its default (True), DeepSpeed would update after every micro-batch. The loss goes
    unscaled to DeepSpeed (:func:`~smore.training.engines.backward_options`): it is already a share of the step."""
    accelerator, processes, device = run.accelerator, run.processes, run.accelerator.device
    local_tokens = torch.tensor(sum(_response_tokens(b) for b in micro), device=device)
    step_tokens = int(accelerator.reduce(local_tokens, reduction="sum"))
    if step_tokens == 0:
        raise UserError(f"step {step}: no token of the global batch carries loss; check the data's responses.")
    step_loss, step_aux = torch.zeros((), device=device), torch.zeros((), device=device)
    options = backward_options(accelerator)
    try:
        for index, batch in enumerate(micro):
            weight = _response_tokens(batch) / step_tokens * processes  # DDP averages over processes: undo it
            batch = {k: v.to(device) for k, v in batch.items()}
            sync = index == len(micro) - 1
            accelerator.gradient_state._set_sync_gradients(sync)
            with contextlib.nullcontext() if sync else accelerator.no_sync(run.model), accelerator.autocast():
                loss = response_loss(run.model, batch)
                aux = aux_loss(run.unwrapped, reduction=run.opt.aux_reduction)
                if sync:
                    _nonfinite_before_deepspeed_update(run, step, step_loss + step_aux + (loss + aux).detach() * weight)
                accelerator.backward((loss + aux) * weight, **options)
            step_loss += loss.detach() * weight / processes
            step_aux += aux.detach() * weight / processes
    finally:  # the optimizer step, clipping and whatever runs between steps see a synchronised state
        accelerator.gradient_state._set_sync_gradients(True)
    return step_loss, step_aux


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """This process's part of ``tensor``: its shard under FSDP2 (a ``DTensor``, whose whole value would take a
    collective), else the tensor itself (under FSDP1 already this process's shard of the flat parameter)."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def _finite(tensor: torch.Tensor) -> bool:
    return bool(torch.isfinite(_local(tensor)).all())


def _all_finite(accelerator, local: torch.Tensor) -> bool:
    """``local`` (a boolean) holds on every process: one all-reduce, the same answer everywhere. A maximum of the
    failures, since Accelerate's ``reduce`` knows only sum, mean and max (any other name sums: a "min" of the flags
    let one process's failure through when another's check passed)."""
    failed = (~local.bool()).float().to(accelerator.device)
    return not bool(accelerator.reduce(failed, reduction="max"))


def _finite_everywhere(run: _Run, loss: torch.Tensor) -> bool:
    """The loss and every gradient are finite on every process, decided by one all-reduce so that every process
    skips or stops at the same step.

    Each process checks its own gradients: under DDP whole tensors (the same after the reduction), under FSDP its
    shards (FSDP2's ``DTensor`` read through ``to_local``: every element is on exactly one process, so the
    reduction sees all of them). Under DeepSpeed the engine has already clipped, updated and released the gradients
    inside the last backward (``p.grad`` is ``None``), so only the loss is checked here; :func:`_accumulate` checks
    it before that backward (:func:`_nonfinite_before_deepspeed_update`)."""
    grads = [torch.isfinite(_local(p.grad)).all() for p in run.trainable if p.grad is not None]
    finite = torch.isfinite(loss) & torch.stack(grads or [torch.tensor(True)]).all()
    return _all_finite(run.accelerator, finite)


def _nonfinite_stop(step: int, why: str = "") -> UserError:
    return UserError(
        f"step {step + 1}: the loss or a gradient is not finite; stopped ({why or 'train.on_nonfinite=stop'}). "
        "The last checkpoint is intact; lower the learning rate or use fp32, then --resume."
    )


def _nonfinite_before_deepspeed_update(run: _Run, step: int, loss_so_far: torch.Tensor) -> None:
    """Under DeepSpeed (bf16 or fp32), before the step's last backward, in which the engine updates the weights:
    a non-finite loss of the step on any process stops the run there, so it never reaches the weights. It stops
    even under ``train.on_nonfinite=skip``: the step's earlier micro-batches are already accumulated in the
    engine's gradient partitions, which the trainer cannot discard. Under fp16 DeepSpeed's loss scaler skips
    overflowing steps itself. A gradient that is non-finite while the loss is finite is DeepSpeed's to see."""
    engine = formed_engine(run.accelerator)
    if not engine.startswith("deepspeed") or run.opt.precision == "fp16":
        return
    if not _all_finite(run.accelerator, torch.isfinite(loss_so_far)):
        raise _nonfinite_stop(step, f"under {engine} a step cannot be skipped once accumulated")


def _optimizer_step(run: _Run, step: int) -> bool:
    """Step ``step`` (0-based): accumulate, clip, update. A non-finite loss or gradient on any process never reaches
    the weights: the update is skipped (False) or the run stops (``train.on_nonfinite``). Under DeepSpeed the engine
    clips and updates within the last micro-batch's backward (the optimizer's ``step`` is then a no-op), so there a
    non-finite loss still stops or counts the step but comes after DeepSpeed's own update (fp16's loss scaler skips
    overflowing steps itself); in bf16 and fp32 a non-finite loss stops the run before that backward
    (:func:`_nonfinite_before_deepspeed_update`)."""
    opt, accelerator = run.opt, run.accelerator
    micro = _micro_batches(run, step)
    step_loss, step_aux = _accumulate(run, step, micro)
    if not _finite_everywhere(run, step_loss + step_aux):
        run.optimizer.zero_grad(set_to_none=True)
        if opt.on_nonfinite == "stop":
            raise _nonfinite_stop(step)
        run.skipped += 1
        logger.warning("step %d: non-finite loss or gradient, update skipped (%d so far)", step + 1, run.skipped)
        run.bar.update(1)
        return False
    run.grad_norm = None
    if opt.max_grad_norm is not None:
        run.grad_norm = float(accelerator.clip_grad_norm_(run.trainable, opt.max_grad_norm))
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    reduced = accelerator.reduce(torch.stack([step_loss, step_aux]), reduction="sum")
    run.window.append((float(reduced[0]), float(reduced[1])))
    run.tokens_seen += int(sum(int(b["attention_mask"].sum()) for b in micro)) * run.processes
    run.bar.update(1)
    speed = run.tokens_seen / (time.perf_counter() - run.started)
    run.bar.set_postfix(loss=f"{run.window[-1][0]:.4f}", tokens_per_s=f"{speed:.0f}")
    return True


# -- log ---------------------------------------------------------------------------------------------------------
def _log(run: _Run, done: int) -> None:
    """One metrics line for the steps since the last one (their mean losses), then the window's routing health."""
    elapsed = time.perf_counter() - run.started
    record = {
        "step": done,
        "epoch": round(done / run.steps_per_epoch, 4),
        "loss": sum(loss for loss, _ in run.window) / len(run.window),
        "step_loss": run.window[-1][0],  # the window's last step alone: what a run's final loss reports
        "aux_loss": sum(aux for _, aux in run.window) / len(run.window),
        "lr": run.scheduler.get_last_lr()[0],
        "grad_norm": run.grad_norm,
        "tokens_per_second": run.tokens_seen / max(elapsed, 1e-9),
        "elapsed": elapsed,
        "eval_loss": run.last_eval,
    }
    run.history.append(record)
    run.log.write(record)
    run.window.clear()
    run.health = run.tracker.health() or run.health  # the counts reach the host here, once per log line
    if run.main and run.health:
        run.log.write_routing(done, run.health)
        _warn_collapse(run, done)
    run.tracker.reset()


def _warn_collapse(run: _Run, done: int) -> None:
    """One line per log window for the levels that collapsed since the last warning, not one per adapter: a model
    has hundreds of routed levels."""
    health = run.health
    if done <= run.opt.log_every:
        return  # the first window shows the routers as initialised, not a collapse that training brought about
    new = [h for h in health if h.collapsed and h.conclusive and (h.module, h.level) not in run.collapsed_before]
    run.collapsed_before.update((h.module, h.level) for h in new)
    if not new:
        return
    worst = max(new, key=lambda h: max(h.load))
    logger.warning(
        "routing collapse at step %d in %d of %d routed levels (worst: %s level %d, max expert load "
        "%.2f, %.0f%% experts unused); consider a larger balance_weight. Details: logs/routing.jsonl",
        done,
        len(new),
        len(health),
        worst.module,
        worst.level,
        max(worst.load),
        100 * worst.dead_share,
    )


# -- checkpoint --------------------------------------------------------------------------------------------------
def _save(run: _Run, step: int) -> None:
    """Checkpoint ``step`` (main process), then prune the old ones; every process waits for it."""
    model = run.unwrapped

    def finite() -> None:  # under FSDP and ZeRO-3 each process checks its own shards
        bad = [name for name, p in model.named_parameters() if p.requires_grad and not _finite(p)]
        if bad:  # never write a checkpoint that cannot be resumed from
            raise UserError(f"step {step}: adapter weights are not finite ({bad[:3]}); no checkpoint written.")

    _decided_together(run.accelerator, finite)
    gathered = gathered_state_dict(run.accelerator, run.model)  # on every process: a collective under sharding
    optimizer_state = gathered_optimizer_state(run.accelerator, run.model, run.optimizer)  # FSDP: a collective too

    def write() -> None:
        save_checkpoint(
            run.output / f"checkpoint-{step}",
            save_adapter=lambda path: save_adapter(model, path, state_dict=gathered),
            optimizer=run.optimizer,
            scheduler=run.scheduler,
            progress={
                "step": step,
                "history": run.history,
                "processes": run.processes,
                "engine": formed_engine(run.accelerator),
            },
            run_config=run.config.to_dict(),
            optimizer_state=optimizer_state,
        )
        prune_checkpoints(run.output, run.opt.keep_checkpoints)

    _main_decides(run.accelerator, write)  # the others wait for it, and end with its refusal


# -- finish ------------------------------------------------------------------------------------------------------
def _finish(run: _Run) -> TrainResult:
    """The final held-out loss, the last checkpoint, the adapter and the plots."""
    if run.eval_set is not None:
        run.last_eval = _evaluate_loss(run.model, run.eval_set, run.opt.micro_batch_size, run.pad, run.accelerator)
        if run.history:
            run.history[-1]["eval_loss"] = run.last_eval
    _save(run, run.total_steps)
    adapter_dir = run.output / "adapter"
    gathered = gathered_state_dict(run.accelerator, run.model)

    def write() -> None:
        save_adapter(run.unwrapped, adapter_dir, state_dict=gathered)
        write_training_format(adapter_dir, run.dataset.training_format)  # smore eval --adapter scores it so
        if run.history:
            plot_losses(run.history, run.output / "logs" / "loss.png")
        if run.health:
            plot_expert_load(run.health, run.output / "logs" / "expert_load.png")
        logger.info(
            "adapter saved to %s; load it with smore.load_adapter(base_model, %r)", adapter_dir, str(adapter_dir)
        )

    _main_decides(run.accelerator, write)
    final_loss = run.history[-1].get("step_loss", run.history[-1]["loss"]) if run.history else float("nan")
    return TrainResult(run.output, adapter_dir, run.total_steps, final_loss, run.last_eval, run.history)
