"""Benchmark 1: forward + backward time and peak memory per token of one adapted linear layer, every method against
HF PEFT LoRA at the same trainable parameters (the LoRA rank whose count is closest), measured in the same run.

Two columns of time: the whole layer (frozen base + adapter, what a model pays) and the adapter alone (its
``Δy`` and its backward, PEFT's ``lora_B(lora_A(x)) · scaling`` on the other side), because at the large shape the
frozen base matmul dominates the layer. MixLoRA adapts whole MLP blocks, so it has its own table: one gated MLP
``d → d_ff → d`` against PEFT LoRA on its gate/up/down projections.

    python bench/layer.py --quick
    python bench/layer.py --json bench/results/layer.json
    python bench/layer.py --device cuda --dtype bfloat16
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaMLP

import smore
from smore.adapters.base import AdaptedFFN, AdaptedLinear, ForwardContext
from smore.adapters.trex_prior import SemanticPrior
from smore.analysis.budget import TargetShapes, propose_configs
from smore.registry import method_of

if __package__ in (None, ""):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import common
else:
    from bench import common

logger = logging.getLogger("bench.layer")

SMORE_CONFIGS = {
    "(2-2)": dict(num_experts=[2, 2], top_k=[1, 1], ranks=[16, 16]),
    "(4-4)": dict(num_experts=[4, 4], top_k=[2, 2], ranks=[8, 8]),
}
GATES = ("dense", "switch", "noisy_topk")
BASELINES = ("molora", "hydralora", "trex")


class Holder(nn.Module):
    """A parent for the layer PEFT wraps (PEFT replaces a named child)."""

    def __init__(self, proj: nn.Module) -> None:
        super().__init__()
        self.proj = proj


def fwd_bwd(module: Callable, x: torch.Tensor, upstream: torch.Tensor, params: list[nn.Parameter]) -> Callable:
    """One training-style call: forward, backward into the input and the trainable parameters."""

    def step() -> None:
        x.grad = None
        for p in params:
            p.grad = None
        module(x).backward(upstream)

    return step


def linear_variants(d_in: int, d_out: int, device, dtype) -> tuple[nn.Linear, dict[str, dict[str, Any]]]:
    """Every adapted-linear variant on one frozen base: its wrapper, its adapter-only call and parameters."""
    base = nn.Linear(d_in, d_out, bias=False, device=device, dtype=dtype).requires_grad_(False)
    variants: dict[str, dict[str, Any]] = {}
    context = ForwardContext()
    for size, values in SMORE_CONFIGS.items():
        for gate in GATES:
            config = smore.SMoREConfig(**values, gate=gate)
            variants[f"S'MoRE {size} {gate}"] = {"config": config}
    reference = smore.SMoREConfig(**SMORE_CONFIGS["(4-4)"])
    for row in propose_configs([(d_in, d_out)], reference, methods=list(BASELINES), strict=False):
        variants[f"{row.method} ({row.summary})"] = {"config": row.config}
    for entry in variants.values():
        config = entry["config"]
        delta = method_of(config).build(config, d_in, d_out).to(device=device, dtype=dtype).train()
        entry["module"] = AdaptedLinear(base, delta, context)
        entry["delta"] = delta
        entry["trainable"] = common.trainable_parameters(delta)
        if hasattr(delta, "call_inputs"):  # T-REX reads each token's semantic prior from the model call
            entry["prior_size"] = delta.num_experts
    return base, variants


def peft_variant(base: nn.Linear, rank: int, dtype) -> dict[str, Any]:
    model = common.peft_lora(Holder(base), rank, ["proj"])
    common.cast_peft_adapter(model, dtype)
    layer = model.base_model.model.proj
    lora_a, lora_b, scaling = layer.lora_A["default"], layer.lora_B["default"], layer.scaling["default"]
    return {
        "module": layer,
        "adapter": lambda t: lora_b(lora_a(t)) * scaling,
        "trainable": common.trainable_parameters(layer),
        "params": [p for p in layer.parameters() if p.requires_grad],
    }


def run_linear(args, device, dtype, d_in: int, d_out: int, tokens: int, repeats: int) -> list[dict[str, Any]]:
    logger.info("linear %d -> %d, %d tokens", d_in, d_out, tokens)
    base, variants = linear_variants(d_in, d_out, device, dtype)
    if args.only:
        variants = {name: v for name, v in variants.items() if re.search(args.only, name)}
    ranks = {name: common.matched_lora_rank(v["trainable"], [(d_in, d_out)]) for name, v in variants.items()}
    peft = {rank: peft_variant(base, rank, dtype) for rank in sorted(set(ranks.values()))}
    generator = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(1, tokens, d_in, generator=generator).to(device=device, dtype=dtype).requires_grad_(True)
    upstream = torch.randn(1, tokens, d_out, generator=generator).to(device=device, dtype=dtype)
    flat_x = x.detach().reshape(tokens, d_in).requires_grad_(True)
    flat_up = upstream.reshape(tokens, d_out)
    context = next(iter(variants.values()))["module"].context
    prior_size = next((v["prior_size"] for v in variants.values() if "prior_size" in v), None)
    if prior_size is not None:  # T-REX: one sample's semantic prior, the same for all its tokens
        context.state = SemanticPrior(prior_size)
        context.state.prior = torch.rand(1, prior_size, generator=generator).to(device=device, dtype=dtype)
    flat_prior = None if prior_size is None else context.state.prior.expand(tokens, -1)

    layer_calls = {"base": fwd_bwd(base, x, upstream, [])}
    adapter_calls = {}
    for rank, entry in peft.items():
        layer_calls[f"PEFT LoRA r={rank}"] = fwd_bwd(entry["module"], x, upstream, entry["params"])
        adapter_calls[f"PEFT LoRA r={rank}"] = fwd_bwd(entry["adapter"], flat_x, flat_up, entry["params"])
    for name, entry in variants.items():
        params = [p for p in entry["delta"].parameters() if p.requires_grad]
        delta = entry["delta"]
        layer_calls[name] = fwd_bwd(entry["module"], x, upstream, params)
        if "prior_size" in entry:
            adapter_calls[name] = fwd_bwd(lambda t, d=delta: d(t, prior=flat_prior), flat_x, flat_up, params)
        else:
            adapter_calls[name] = fwd_bwd(delta, flat_x, flat_up, params)
    layer_times = common.time_interleaved(layer_calls, device=device, warmup=args.warmup, repeats=repeats)
    adapter_times = common.time_interleaved(adapter_calls, device=device, warmup=args.warmup, repeats=repeats)
    memory = {}
    if not args.no_memory:
        for name, call in layer_calls.items():
            memory[name] = common.peak_memory(call, device)

    results = []
    names = ["base", *(f"PEFT LoRA r={r}" for r in peft), *variants]
    for name in names:
        rank = ranks.get(name)
        ref = f"PEFT LoRA r={rank}" if rank is not None else None
        layer = common.median(layer_times[name])
        adapter = common.median(adapter_times[name]) if name in adapter_times else None
        row = {
            "shape": [d_in, d_out],
            "tokens": tokens,
            "variant": name,
            "trainable": _trainable(name, variants, peft),
            "reference": ref,
            "reference_trainable": peft[rank]["trainable"] if rank is not None else None,
            "layer_s": layer,
            "layer_times_s": layer_times[name],
            "adapter_s": adapter,
            "adapter_times_s": adapter_times.get(name),
            "peak_bytes": memory.get(name),
            "peak_bytes_per_token": None if name not in memory else memory[name] / tokens,
        }
        if ref is not None:
            row["layer_ratio"] = layer / common.median(layer_times[ref])
            row["adapter_ratio"] = adapter / common.median(adapter_times[ref])
            if name in memory:
                row["memory_ratio"] = memory[name] / memory[ref]
        results.append(row)
    return results


def _trainable(name: str, variants: dict, peft: dict) -> int:
    if name in variants:
        return variants[name]["trainable"]
    if name.startswith("PEFT LoRA r="):
        return peft[int(name.rsplit("=", 1)[1])]["trainable"]
    return 0


def run_ffn(args, device, dtype, hidden: int, intermediate: int, tokens: int, repeats: int) -> list[dict[str, Any]]:
    """MixLoRA's block against PEFT LoRA on gate/up/down of the same MLP, at the same trainable parameters."""
    logger.info("MLP block %d -> %d -> %d, %d tokens", hidden, intermediate, hidden, tokens)
    config = LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, hidden_act="silu")
    mlp = LlamaMLP(config).to(device=device, dtype=dtype).requires_grad_(False)
    shapes = TargetShapes(
        linear=((hidden, intermediate),) * 2 + ((intermediate, hidden),), blocks=((hidden, intermediate),)
    )
    reference = smore.SMoREConfig(**SMORE_CONFIGS["(4-4)"])
    row = propose_configs(shapes, reference, methods=["mixlora"], strict=False)[0]
    mix_config = dataclasses.replace(row.config)
    wrapper = smore.adapt(_Block(mlp), dataclasses.replace(mix_config, target_modules=["mlp"])).mlp
    wrapper.delta.to(device=device, dtype=dtype).train()
    assert isinstance(wrapper, AdaptedFFN)
    trainable = common.trainable_parameters(wrapper.delta)
    rank = common.matched_lora_rank(trainable, list(shapes.linear))
    peft_model = common.peft_lora(_Block(mlp), rank, ["gate_proj", "up_proj", "down_proj"])
    common.cast_peft_adapter(peft_model, dtype)
    peft_block = peft_model.base_model.model.mlp
    peft_params = [p for p in peft_block.parameters() if p.requires_grad]
    generator = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(1, tokens, hidden, generator=generator).to(device=device, dtype=dtype).requires_grad_(True)
    upstream = torch.randn(1, tokens, hidden, generator=generator).to(device=device, dtype=dtype)
    calls = {
        "base MLP": fwd_bwd(mlp, x, upstream, []),
        f"PEFT LoRA r={rank} (gate/up/down)": fwd_bwd(peft_block, x, upstream, peft_params),
        f"MixLoRA ({row.summary})": fwd_bwd(wrapper, x, upstream, list(wrapper.delta.parameters())),
    }
    times = common.time_interleaved(calls, device=device, warmup=args.warmup, repeats=repeats)
    memory = {} if args.no_memory else {name: common.peak_memory(call, device) for name, call in calls.items()}
    ref = f"PEFT LoRA r={rank} (gate/up/down)"
    counts = {"base MLP": 0, ref: common.trainable_parameters(peft_block), f"MixLoRA ({row.summary})": trainable}
    results = []
    for name in calls:
        results.append(
            {
                "shape": [hidden, intermediate],
                "tokens": tokens,
                "variant": name,
                "trainable": counts[name],
                "reference": ref if name.startswith("MixLoRA") else None,
                "reference_trainable": counts[ref] if name.startswith("MixLoRA") else None,
                "layer_s": common.median(times[name]),
                "layer_times_s": times[name],
                "peak_bytes": memory.get(name),
                "peak_bytes_per_token": None if name not in memory else memory[name] / tokens,
                "layer_ratio": common.median(times[name]) / common.median(times[ref])
                if name.startswith("MixLoRA")
                else None,
                "memory_ratio": memory[name] / memory[ref] if name in memory and name.startswith("MixLoRA") else None,
            }
        )
    return results


class _Block(nn.Module):
    """A module holding one MLP as ``mlp``, so that injection finds it by name."""

    def __init__(self, mlp: nn.Module) -> None:
        super().__init__()
        self.mlp = mlp


def _fmt_ratio(value) -> str:
    return "" if value is None else f"{value:.2f}×"


def _fmt_ms(value) -> str:
    return "" if value is None else f"{value * 1e3:.1f}"


def print_results(results: list[dict[str, Any]]) -> None:
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for row in results:
        groups.setdefault((row["kind"], tuple(row["shape"]), row["tokens"]), []).append(row)
    for (kind, shape, tokens), rows in groups.items():
        if kind == "linear":
            title = f"Layer {shape[0]} → {shape[1]}, {tokens} tokens, forward + backward (median)"
            columns = ["variant", "trainable", "vs PEFT (trainable)", "layer ms", "layer ×", "adapter ms",
                       "adapter ×", "peak / token", "memory ×"]  # fmt: skip
        else:
            title = f"MLP block {shape[0]} → {shape[1]} → {shape[0]}, {tokens} tokens, forward + backward (median)"
            columns = ["variant", "trainable", "vs PEFT (trainable)", "block ms", "block ×", "peak / token",
                       "memory ×"]  # fmt: skip
        table = []
        for row in rows:
            ref = "" if row["reference"] is None else f"{row['reference']} ({row['reference_trainable']:,})"
            peak = "" if row["peak_bytes_per_token"] is None else common.format_bytes(row["peak_bytes_per_token"])
            cells = [row["variant"], f"{row['trainable']:,}", ref, _fmt_ms(row["layer_s"]),
                     _fmt_ratio(row.get("layer_ratio") if row["reference"] else None)]  # fmt: skip
            if kind == "linear":
                cells += [_fmt_ms(row["adapter_s"]), _fmt_ratio(row.get("adapter_ratio"))]
            cells += [peak, _fmt_ratio(row.get("memory_ratio"))]
            table.append(cells)
        common.print_table(title, columns, table)


def main(argv: list[str] | None = None) -> None:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--shapes", default=None, help="d_in:d_out,... (default 576:1536,4096:14336)")
    p.add_argument("--tokens", default=None, help="token counts, comma-separated (default 512,4096)")
    p.add_argument("--skip-ffn", action="store_true", help="leave out the MixLoRA block table")
    p.add_argument("--only", default=None, help="regex: time only the adapter variants whose name matches (PEFT kept)")
    args = p.parse_args(argv)
    device, dtype = common.setup(args)
    if args.quick:
        shapes, token_counts, repeats = [(576, 1536)], [128], args.repeats or 3
    else:
        shapes, token_counts, repeats = [(576, 1536), (4096, 14336)], [512, 4096], args.repeats or 5
    if args.shapes:
        shapes = [tuple(int(v) for v in item.split(":")) for item in args.shapes.split(",")]
    if args.tokens:
        token_counts = [int(v) for v in args.tokens.split(",")]
    results = []
    for d_in, d_out in shapes:
        for tokens in token_counts:
            for row in run_linear(args, device, dtype, d_in, d_out, tokens, repeats):
                results.append({"kind": "linear", **row})
            if not args.skip_ffn:
                for row in run_ffn(args, device, dtype, d_in, d_out, tokens, repeats):
                    results.append({"kind": "ffn", **row})
    print_results(results)
    common.write_json(args.json, {"benchmark": "layer", **common.environment(args, device, dtype), "results": results})


if __name__ == "__main__":
    main()
