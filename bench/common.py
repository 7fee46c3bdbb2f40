"""Shared helpers of the benchmarks: arguments, timing (warmup, interleaved repeats, median), peak memory, matched
PEFT LoRA, tables and JSON.

Ratios are what the benchmarks report: every variant of one table is timed in the same run, the repeats interleaved
(variant a, b, c, a, b, c, …) so that a load change on a shared machine hits all of them alike, and the median of
the repeats is kept.

Peak memory: on CUDA, ``torch.cuda.max_memory_allocated`` minus what was allocated before the call. On CPU, the
allocator keeps no peak, so one extra, untimed call runs under ``torch.profiler`` with ``profile_memory=True``; the
peak is the maximum over time of the bytes torch allocated minus freed during that call (every CPU tensor
allocation, temporaries inside kernels included; what was live before the call, such as weights and inputs, is not
counted).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import platform
import statistics
import sys
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from torch import nn

logger = logging.getLogger("bench")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parser(description: str) -> argparse.ArgumentParser:
    """The arguments every benchmark takes."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="small sizes, finishes in under a minute on 2 CPU cores")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="default float32 on CPU, bfloat16 on GPU")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats per variant (the median is reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls per variant before timing")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (default 1: on a shared, loaded machine more threads wait on each other)",
    )
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory pass")
    p.add_argument("--json", type=Path, default=None, help="write the results here as JSON")
    return p


def setup(args: argparse.Namespace) -> tuple[torch.device, torch.dtype]:
    """Logging, threads, seed; the device and dtype the arguments ask for."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", datefmt="%H:%M:%S")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda was asked for, but torch sees no CUDA device.")
    dtype = DTYPES[args.dtype or ("bfloat16" if device.type == "cuda" else "float32")]
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    logger.info(
        "device %s, dtype %s, torch %s, %d CPU threads", device, dtype, torch.__version__, torch.get_num_threads()
    )
    return device, dtype


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(
    variants: dict[str, Callable[[], Any]], *, device: torch.device, warmup: int, repeats: int
) -> dict[str, list[float]]:
    """Seconds per call of every variant: ``warmup`` untimed calls each, then ``repeats`` rounds, each round
    calling every variant once in turn."""
    for name, fn in variants.items():
        for _ in range(warmup):
            fn()
        synchronize(device)
        logger.debug("warmed up %s", name)
    times: dict[str, list[float]] = {name: [] for name in variants}
    for round_ in range(repeats):
        for name, fn in variants.items():
            synchronize(device)
            start = time.perf_counter()
            fn()
            synchronize(device)
            times[name].append(time.perf_counter() - start)
        logger.info("round %d/%d done", round_ + 1, repeats)
    return times


def median(values: list[float]) -> float:
    return statistics.median(values) if values else math.nan


def peak_memory(fn: Callable[[], Any], device: torch.device) -> int:
    """Peak bytes allocated during one call of ``fn`` above what was live before it (see the module docstring)."""
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    from torch.profiler import ProfilerActivity, profile
    from torch.profiler._memory_profiler import Action

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        fn()
    live = peak = 0
    for _, action, _, size in prof._memory_profile().timeline:
        if action == Action.CREATE:
            live += size
        elif action == Action.DESTROY:
            live -= size
        peak = max(peak, live)
    return peak


def trainable_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def matched_lora_rank(parameters: int, shapes: list[tuple[int, int]]) -> int:
    """The LoRA rank whose trainable count ``r · Σ (d_in + d_out)`` over ``shapes`` is closest to ``parameters``."""
    per_rank = sum(d_in + d_out for d_in, d_out in shapes)
    low = max(1, parameters // per_rank)
    return min((low, low + 1), key=lambda r: abs(r * per_rank - parameters))


def peft_lora(model: nn.Module, rank: int, target_modules: list[str]) -> nn.Module:
    """HF PEFT LoRA (unmerged, alpha = 2r, no dropout) on ``target_modules`` of ``model``; returns the PeftModel."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=target_modules)
    return get_peft_model(model, config)


def cast_peft_adapter(model: nn.Module, dtype: torch.dtype) -> None:
    """Put PEFT's adapter weights in ``dtype`` (PEFT keeps them in float32 by default) so both libraries run the
    adapter in the same precision."""
    for name, param in model.named_parameters():
        if "lora_" in name:
            param.data = param.data.to(dtype)


def format_bytes(value: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024 or unit == "GiB":
            return f"{value:.1f} {unit}" if unit != "B" else f"{value:.0f} B"
        value /= 1024
    return f"{value:.1f} GiB"


def print_table(title: str, columns: list[str], rows: list[list[Any]]) -> None:
    """A Markdown table on stdout (the only thing the benchmarks print)."""
    print(f"\n{title}\n")
    print("| " + " | ".join(columns) + " |")
    print("| " + " | ".join("---" if i == 0 else "---:" for i in range(len(columns))) + " |")
    for row in rows:
        print("| " + " | ".join(str(cell) for cell in row) + " |")
    sys.stdout.flush()


def environment(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    return {
        "command": " ".join(sys.argv),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
        "dtype": str(dtype).removeprefix("torch."),
        "threads": torch.get_num_threads(),
        "quick": args.quick,
        "memory_method": "torch.cuda.max_memory_allocated"
        if device.type == "cuda"
        else "torch.profiler profile_memory timeline: max of allocated minus freed bytes during one call",
    }


def write_json(path: Path | None, payload: dict[str, Any]) -> None:
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n")
    logger.info("wrote %s", path)
