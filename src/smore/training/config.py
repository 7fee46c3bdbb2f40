"""The run configuration of ``smore train``: one YAML file, ``key=value`` overrides, typed and checked up front.

Layout (every key is a field below; an unknown key or a wrong type fails with the key named, before any model is
loaded)::

    model: HuggingFaceTB/SmolLM2-135M        # HF folder or hub id
    output_dir: runs/smollm2-smore
    adapter: {method: smore, num_experts: [4, 4], ...}   # any method of the registry
    data: {train_file: train.jsonl, eval_file: null, format: null, max_length: 512}
    train: {learning_rate: 1.0e-4, epochs: 2, global_batch_size: 32, micro_batch_size: 8, precision: bf16, ...}
    quantization: {load_in_4bit: true, bnb_4bit_quant_type: nf4, bnb_4bit_compute_dtype: bfloat16}   # or null

Overrides address nested keys with dots: ``train.learning_rate=3e-4 adapter.ranks=[4,4]`` (values are YAML).
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml

from smore.checks import is_int
from smore.config import AdapterConfig
from smore.errors import UserError
from smore.registry import config_from_dict


@dataclass
class DataConfig:
    train_file: str = ""
    """JSON or JSONL records (instruction, chat ``messages`` or multiple-choice), ``task:NAME[start:stop]`` (a shipped
    benchmark split) or ``hf:NAME@SPLIT`` (a hub dataset); see ``smore.data.load_training_records``."""
    eval_file: str | None = None
    """Held-out records for the periodic evaluation loss, in the same forms; null: none."""
    format: str | None = None
    """Force one record format (instruction, chat, multiple_choice); null: detected per record."""
    max_length: int = 512
    """Longest tokenised example; longer ones keep their start."""

    def __post_init__(self) -> None:
        if not self.train_file:
            raise UserError("data.train_file is required: a JSON or JSONL file of training records.")
        if self.max_length < 8:
            raise UserError(f"data.max_length={self.max_length} is too small; use at least 8 tokens.")


@dataclass
class OptimConfig:
    learning_rate: float = 1e-4
    """Peak learning rate."""
    epochs: float = 1.0
    """Passes over the training data (fractions allowed); ignored when max_steps is set."""
    max_steps: int | None = None
    """Optimizer steps to run; null: derived from epochs."""
    lr_scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    """Schedule after warm-up."""
    warmup_ratio: float = 0.1
    """Share of the steps with a linear warm-up."""
    global_batch_size: int = 32
    """Sequences per optimizer step, over all processes and accumulation steps."""
    micro_batch_size: int = 8
    """Sequences per forward pass on one process; accumulation = global / (micro × processes)."""
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    """Gradient-norm clip; null: no clipping."""
    seed: int = 0
    """Seed of adapter initialisation, data order and gate noise."""
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    """Compute dtype (mixed precision through Accelerate); fp16 needs a GPU."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward (non-reentrant, so routing and aux losses stay exact)."""
    aux_reduction: Literal["sum", "mean"] = "sum"
    """How the adapters' load-balancing losses combine (SPEC §1.3: sum, as the paper)."""
    log_every: int = 10
    """Optimizer steps between log lines."""
    eval_every: int = 0
    """Optimizer steps between held-out evaluations; 0: only at the end (when an eval_file is given)."""
    save_every: int | Literal["auto"] = "auto"
    """Optimizer steps between checkpoints, so that a killed run can ``--resume``; 0: only at the end; auto: about
    :data:`AUTO_SAVES` times a run, at most every :data:`AUTO_SAVE_MAX` steps (Hugging Face Trainer's habit)."""
    keep_checkpoints: int = 2
    """Most recent checkpoints kept on disk."""
    on_nonfinite: Literal["skip", "stop"] = "skip"
    """A step whose loss or gradient is not finite is skipped (logged), or stops the run."""

    def __post_init__(self) -> None:
        positive = {"learning_rate": self.learning_rate, "epochs": self.epochs}
        for name, value in positive.items():
            if not math.isfinite(value) or value <= 0:
                raise UserError(f"train.{name}={value} must be a positive number.")
        for name in ("global_batch_size", "micro_batch_size", "log_every", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise UserError(f"train.{name}={getattr(self, name)} must be at least 1.")
        if self.max_steps is not None and self.max_steps < 1:
            raise UserError(f"train.max_steps={self.max_steps} must be at least 1 (or null to use epochs).")
        if self.global_batch_size % self.micro_batch_size:
            raise UserError(
                f"train.global_batch_size={self.global_batch_size} is not a multiple of train.micro_batch_size="
                f"{self.micro_batch_size}; make it one (accumulation steps are global / micro / processes)."
            )
        if not 0 <= self.warmup_ratio < 1:
            raise UserError(f"train.warmup_ratio={self.warmup_ratio} must be in [0, 1).")
        if self.weight_decay < 0 or (self.max_grad_norm is not None and self.max_grad_norm <= 0):
            raise UserError("train.weight_decay must be >= 0 and train.max_grad_norm > 0 (or null).")
        for name in ("eval_every", "save_every"):
            if getattr(self, name) != "auto" and getattr(self, name) < 0:
                raise UserError(f"train.{name}={getattr(self, name)} must be >= 0.")

    def save_interval(self, total_steps: int) -> int:
        """Steps between checkpoints of a run of ``total_steps`` (0: only at the end), ``save_every`` resolved."""
        if self.save_every != "auto":
            return self.save_every
        return min(AUTO_SAVE_MAX, max(1, math.ceil(total_steps / AUTO_SAVES)))


AUTO_SAVES = 5
"""Checkpoints of a run with ``train.save_every: auto`` (the last one included)."""
AUTO_SAVE_MAX = 500
"""The longest interval of ``train.save_every: auto``: Hugging Face Trainer's default ``save_steps``."""


@dataclass
class RunConfig:
    model: str
    """Base model: a local HF folder or a hub id."""
    output_dir: str
    """Where checkpoints, logs, plots and the final adapter go."""
    adapter: AdapterConfig
    data: DataConfig
    train: OptimConfig = field(default_factory=OptimConfig)
    quantization: dict[str, Any] | None = None
    """Load the base quantized (QLoRA-style): the keyword arguments of transformers' ``BitsAndBytesConfig``, e.g.
    ``{load_in_4bit: true, bnb_4bit_quant_type: nf4}``; null: the base in full precision. Needs bitsandbytes."""

    def to_dict(self) -> dict[str, Any]:
        document = {
            "model": self.model,
            "output_dir": self.output_dir,
            "adapter": self.adapter.to_dict(),
            "data": dataclasses.asdict(self.data),
            "train": dataclasses.asdict(self.train),
        }
        if self.quantization is not None:  # absent when off, as in the run configs written before the key existed
            document["quantization"] = dict(self.quantization)
        return document


RESUMABLE = {
    "output_dir": "the folder is found by it anyway",
    "train.log_every": "logging cadence",
    "train.eval_every": "evaluation cadence",
    "train.save_every": "checkpoint cadence",
    "train.keep_checkpoints": "checkpoints kept",
    "train.max_steps": "to extend the run",
    "train.epochs": "to extend the run",
}
"""Keys ``--resume`` accepts changed, and why they are safe: they change no step already taken. The length of the
run (``max_steps``, ``epochs``) may change as long as it still reaches the checkpoint's step; the learning-rate
schedule is then laid over the new length."""


def _flat(document: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(document, dict):
        return {prefix: document}
    flat: dict[str, Any] = {}
    for key, value in document.items():
        flat.update(_flat(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def config_changes(saved: dict[str, Any], current: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """The dotted keys whose values differ between two run-config mappings: ``{key: (saved, current)}`` (a key
    missing on one side reads as ``<absent>``)."""
    old, new = _flat(saved), _flat(current)
    absent = "<absent>"
    return {
        key: (old.get(key, absent), new.get(key, absent))
        for key in sorted(old.keys() | new.keys())
        if old.get(key, absent) != new.get(key, absent)
    }


def _check_type(name: str, value: Any, annotation: Any) -> Any:
    """``value`` if it fits the annotation (ints widen to floats); a ValueError naming ``name`` otherwise."""
    origin = get_origin(annotation)
    if origin is Literal:
        if value not in get_args(annotation):
            raise UserError(f"{name}={value!r} must be one of {list(get_args(annotation))}.")
        return value
    if origin in (typing.Union, types.UnionType):
        errors = []
        for option in get_args(annotation):
            if option is type(None):
                if value is None:
                    return None
                continue
            try:
                return _check_type(name, value, option)
            except ValueError as error:
                errors.append(str(error))
        raise UserError(errors[0] if errors else f"{name}={value!r} has the wrong type.")
    if annotation is float and is_int(value):
        return float(value)
    if annotation is float and isinstance(value, str):  # YAML 1.1 reads 3e-4 (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if annotation in (int, float, str, bool) and (
        not isinstance(value, annotation) or (annotation is not bool and isinstance(value, bool))
    ):
        raise UserError(f"{name}={value!r} must be of type {annotation.__name__}.")
    return value


def _section(cls: type, values: Any, prefix: str):
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise UserError(f"{prefix} must be a mapping of {sorted(f.name for f in dataclasses.fields(cls))}.")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise UserError(f"unknown key(s) {[f'{prefix}.{k}' for k in unknown]}; {prefix} takes {sorted(known)}.")
    checked = {k: _check_type(f"{prefix}.{k}", v, hints[k]) for k, v in values.items()}
    return cls(**checked)


def check_quantization(values: Any) -> dict[str, Any] | None:
    """The ``quantization`` mapping if transformers' ``BitsAndBytesConfig`` takes it and bitsandbytes is installed,
    so that a run fails here and not after the data is read."""
    if values is None:
        return None
    from transformers import BitsAndBytesConfig

    known = sorted(set(inspect.signature(BitsAndBytesConfig).parameters) - {"self", "kwargs"})
    if not isinstance(values, dict):
        raise UserError(f"quantization={values!r} must be a mapping of BitsAndBytesConfig arguments ({known}) or null.")
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise UserError(f"unknown key(s) {[f'quantization.{k}' for k in unknown]}; quantization takes {known}.")
    if [bool(values.get("load_in_4bit")), bool(values.get("load_in_8bit"))].count(True) != 1:
        raise UserError("quantization needs exactly one of load_in_4bit: true or load_in_8bit: true (or null).")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as error:
        raise UserError(
            "quantization needs bitsandbytes, which is not installed: pip install bitsandbytes "
            "(or set quantization: null to train on the full-precision base)."
        ) from error
    return dict(values)


def run_config_from_dict(document: Any) -> RunConfig:
    """Build and check a :class:`RunConfig` from its YAML mapping."""
    if not isinstance(document, dict):
        raise UserError("a run config must be a mapping with keys model, output_dir, adapter, data, train.")
    known = {"model", "output_dir", "adapter", "data", "train", "quantization"}
    unknown = sorted(set(document) - known)
    if unknown:
        raise UserError(f"unknown top-level key(s) {unknown}; a run config takes {sorted(known)}.")
    for key in ("model", "output_dir", "adapter", "data"):
        if document.get(key) in (None, ""):
            raise UserError(f"the run config needs {key!r}.")
    for key in ("model", "output_dir"):
        if not isinstance(document[key], str):
            raise UserError(f"{key}={document[key]!r} must be a string (a path or a hub id).")
    try:
        adapter = config_from_dict(document["adapter"])
    except (TypeError, ValueError) as error:
        raise UserError(f"adapter: {error}") from error
    return RunConfig(
        model=document["model"],
        output_dir=document["output_dir"],
        adapter=adapter,
        data=_section(DataConfig, document["data"], "data"),
        train=_section(OptimConfig, document.get("train"), "train"),
        quantization=check_quantization(document.get("quantization")),
    )


def apply_overrides(document: dict, overrides: list[str]) -> dict:
    """``key.sub=value`` overrides (YAML values) applied to a copy of the document."""
    document = yaml.safe_load(yaml.safe_dump(document))  # a deep copy that stays plain YAML data
    for override in overrides:
        key, sep, raw = override.partition("=")
        if not sep or not key:
            raise UserError(f"override {override!r} must look like key=value, e.g. train.learning_rate=3e-4.")
        value = yaml.safe_load(raw) if raw else None
        parts = key.split(".")
        node = document
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise UserError(f"override {override!r}: {part!r} is not a section.")
            node = child
        node[parts[-1]] = value
    return document


def load_run_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML run config, apply overrides, check everything; a ValueError names what is wrong."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path} does not exist; pass a YAML run config (see configs/README.md).")
    try:
        document = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise UserError(f"{path} is not valid YAML: {error}") from error
    if not isinstance(document, dict):
        raise UserError(f"{path} must hold a mapping (model, output_dir, adapter, data, train).")
    return run_config_from_dict(apply_overrides(document, overrides or []))
