"""Which distributed engine a launch asked for, which one Accelerate formed, and what each needs from the trainer.

``accelerate launch --config_file configs/accelerate/X.yaml`` says what it wants through the environment
(``ACCELERATE_USE_FSDP``, ``ACCELERATE_USE_DEEPSPEED`` and ``ACCELERATE_DEEPSPEED_ZERO_STAGE``). Accelerate 1.15-1.16
forms FSDP and DeepSpeed only on GPUs: on a CPU machine an FSDP launch runs as plain DDP and a ZeRO launch as a
group of one, so the trainer refuses them there instead of running something else than was asked. Plain DDP (one
process included) is ``ddp``; a checkpoint records its engine, and a resume under another one is refused (their
optimizer states are laid out differently).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass

from torch import nn

from smore.errors import UserError
from smore.routing.stats import routed_deltas

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Engine:
    name: str
    config_file: str
    """The shipped Accelerate config that launches it."""
    needs_gpu: bool


ENGINES = {
    "ddp": Engine("ddp", "configs/accelerate/ddp.yaml", needs_gpu=False),
    "fsdp": Engine("fsdp", "configs/accelerate/fsdp.yaml", needs_gpu=True),
    "deepspeed-zero2": Engine("deepspeed-zero2", "configs/accelerate/zero2.yaml", needs_gpu=True),
    "deepspeed-zero3": Engine("deepspeed-zero3", "configs/accelerate/zero3.yaml", needs_gpu=True),
}


def _flag(env: Mapping[str, str], name: str) -> bool:
    return env.get(name, "false").lower() in ("true", "1", "yes")


def requested_engine(env: Mapping[str, str] = os.environ) -> Engine:
    """The engine the launcher's environment asks for."""
    if _flag(env, "ACCELERATE_USE_DEEPSPEED"):
        stage = env.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2")
        name = f"deepspeed-zero{stage}"
        if name not in ENGINES:
            raise UserError(
                f"DeepSpeed ZeRO stage {stage} is not supported; use zero_stage 2 or 3 "
                "(configs/accelerate/zero2.yaml, zero3.yaml)."
            )
        return ENGINES[name]
    if _flag(env, "ACCELERATE_USE_FSDP"):
        return ENGINES["fsdp"]
    return ENGINES["ddp"]


def check_engine_device(engine: Engine, cuda: bool) -> None:
    """Refuse an engine that cannot form on this machine, before Accelerate quietly forms another."""
    if engine.needs_gpu and not cuda:
        raise UserError(
            f"this launch asks for {engine.name}, which needs CUDA GPUs: Accelerate forms it only on GPUs, and on "
            "this CPU machine would run something else (FSDP as plain DDP, ZeRO as a group of one). Launch with "
            "`accelerate launch --config_file configs/accelerate/ddp.yaml` (or --multi_gpu --num_processes N) here, "
            f"and {engine.config_file} on a GPU machine."
        )


def formed_engine(accelerator) -> str:
    """The engine Accelerate formed."""
    from accelerate.utils import DistributedType

    kind = accelerator.distributed_type
    if kind == DistributedType.DEEPSPEED:
        return f"deepspeed-zero{accelerator.state.deepspeed_plugin.zero_stage}"
    if kind == DistributedType.FSDP:
        return "fsdp"
    return "ddp"


SHARDED = ("fsdp", "deepspeed-zero3")
"""Engines whose processes each hold only a shard of every parameter."""


def gathered_state_dict(accelerator, model: nn.Module) -> dict | None:
    """The whole model's state dict gathered from every process's shards under FSDP and ZeRO-3, so the adapter
    file is the same as one process writes; ``None`` elsewhere (each process holds whole tensors). A collective:
    every process calls it, the main one writes."""
    if formed_engine(accelerator) not in SHARDED:
        return None
    return accelerator.get_state_dict(model)


def gathered_optimizer_state(accelerator, model: nn.Module, optimizer) -> dict | None:
    """Under FSDP, the optimizer's state gathered from every process's shards, in the layout of one process's
    ``optimizer.state_dict()`` (state keyed by the parameter's index in the param groups), so a checkpoint's
    optimizer file is the one a single process writes; ``None`` elsewhere. A collective: every process calls it; the
    main process gets the state (on the CPU), the others an empty one."""
    if formed_engine(accelerator) != "fsdp":
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    full = get_optimizer_state_dict(model, getattr(optimizer, "optimizer", optimizer), options=options)
    if not full:  # not the main process: cpu_offload leaves the gathered state on the main one only
        return {}
    index = {name: i for i, name in enumerate(name for group in full["param_groups"] for name in group["params"])}
    return {
        "state": {index[name]: values for name, values in full["state"].items()},
        "param_groups": [{**group, "params": [index[n] for n in group["params"]]} for group in full["param_groups"]],
    }


def restore_optimizer_state(accelerator, model: nn.Module, optimizer, state: dict) -> None:
    """Load a checkpoint's optimizer state (one process's layout) into this run's optimizer: under FSDP every process
    takes its shards of the whole state (a collective); elsewhere ``optimizer.load_state_dict``."""
    if formed_engine(accelerator) != "fsdp":
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    optimizer = getattr(optimizer, "optimizer", optimizer)  # the torch optimizer inside Accelerate's wrapper
    names = {id(p): name for name, p in model.named_parameters()}
    order = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
    groups = [{**group, "params": [order[int(i)] for i in group["params"]]} for group in state["param_groups"]]
    full = {"state": {order[int(i)]: values for i, values in state["state"].items()}, "param_groups": groups}
    set_optimizer_state_dict(model, optimizer, full, options=StateDictOptions(full_state_dict=True))


def configure_deepspeed(accelerator, micro_batch_size: int, accumulation: int, max_grad_norm: float | None) -> None:
    """Write the run's batch split into DeepSpeed's config, whatever the launcher's config file said (DeepSpeed checks
    train_batch_size = micro × accumulation × processes itself); a value replaced is logged. With the loss passed
    unscaled (:func:`backward_options`), ``gradient_accumulation_steps`` is bookkeeping only (samples counted, the
    batch-size check): the update is taken where the trainer marks the last micro-batch."""
    config = accelerator.state.deepspeed_plugin.deepspeed_config
    wanted = {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": accumulation,
        "train_batch_size": micro_batch_size * accumulation * accelerator.num_processes,
        "gradient_clipping": max_grad_norm or 0.0,
    }
    for key, value in wanted.items():
        given = config.get(key, "auto")
        if given not in ("auto", value):
            logger.info("DeepSpeed config: %s=%r replaced by %r (from train.* of the run config)", key, given, value)
        config[key] = value


def backward_options(accelerator) -> dict[str, bool]:
    """What ``accelerator.backward`` must pass on for the trainer's loss, already normalised by the global batch's
    response tokens: under DeepSpeed, ``scale_wrt_gas=False``, since ``DeepSpeedEngine.backward`` would otherwise
    divide it once more by its ``gradient_accumulation_steps`` (the micro-batches per process and step, see
    :func:`configure_deepspeed`); elsewhere nothing (Accelerate divides by its own ``gradient_accumulation_steps``,
    which the trainer leaves at 1, and ``loss.backward`` takes no such option)."""
    from accelerate.utils import DistributedType

    return {"scale_wrt_gas": False} if accelerator.distributed_type == DistributedType.DEEPSPEED else {}


def mark_zero3_leaves(model: nn.Module) -> list[str]:
    """Register the routed adapter modules as ZeRO-3 leaf modules: DeepSpeed then gathers all their experts at once,
    rather than hooking each expert, which hangs when an expert gets no token on one rank. Returns their class
    names."""
    from deepspeed.utils import set_z3_leaf_modules

    classes = sorted({type(delta) for delta in routed_deltas(model).values()}, key=lambda c: c.__name__)
    if classes:
        set_z3_leaf_modules(model, classes)
        logger.info("ZeRO-3 leaf modules: %s", ", ".join(c.__name__ for c in classes))
    return [c.__name__ for c in classes]
