"""Benchmark 6: one adapted linear layer at decoding (1 or 8 tokens a call, no autograd): the time S'MoRE's decode
path adds to the frozen layer, in its two layouts (every path of the tree at once, and slot by slot), against what
HF PEFT LoRA unmerged adds at the same trainable parameters, all timed in turns in the same run.

The whole-model figure is ``generation.py``'s; this one isolates the adapter, where the decode path's torch calls
are the cost (see ``smore/adapters/smore_decode.py``). Each timed sample is ``--calls`` calls of the layer.

    python bench/decode_layer.py --quick
    python bench/decode_layer.py --json bench/results/decode_layer.json
"""

from __future__ import annotations

import copy
import dataclasses
import logging

import torch
from torch import nn

import smore
from smore.adapters import smore_decode
from smore.adapters.base import adapted_modules

if __package__ in (None, ""):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import common
    from generation import SMORE_CONFIGS
else:
    from bench import common
    from bench.generation import SMORE_CONFIGS

logger = logging.getLogger("bench.decode_layer")

SHAPE = (576, 1536)  # SmolLM2-135M's gate/up projection


def adapted_layer(config: smore.SMoREConfig, dtype, device, paths: bool) -> nn.Module:
    """One ``nn.Linear`` adapted with ``config`` (the wrapper itself, as the model calls it: the model-level hook
    runs once per model call, not per layer), its decode tables built in the layout asked for."""
    torch.manual_seed(0)
    layer = nn.Sequential(nn.Linear(*SHAPE, bias=False)).to(device=device, dtype=dtype)
    model = smore.adapt(layer, dataclasses.replace(config, target_modules=["0"])).eval()
    (wrapper,) = adapted_modules(model).values()
    with torch.no_grad():  # outside inference mode: the tables follow parameter versions
        wrapper.delta.__dict__["_folded"] = smore_decode.fold(wrapper.delta, paths=paths)
    return wrapper


def main(argv: list[str] | None = None) -> None:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--batches", default="1,8", help="tokens per call, comma-separated")
    p.add_argument("--calls", type=int, default=None, help="layer calls per timed sample (default 200, --quick 50)")
    args = p.parse_args(argv)
    device, dtype = common.setup(args)
    repeats = args.repeats or (5 if args.quick else 30)
    calls = args.calls or (50 if args.quick else 200)
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(*SHAPE, bias=False)).to(device=device, dtype=dtype).eval()
    layers: dict[str, nn.Module] = {"base": base}
    counts = {"base": 0}
    lora_name = None
    for name, values in SMORE_CONFIGS.items():
        config = smore.SMoREConfig(**values, init="normal")  # Δy ≠ 0, so nothing is skipped
        for paths, layout in ((True, "every path"), (False, "slot by slot")):
            variant = f"{name}, {layout}"
            layers[variant] = adapted_layer(config, dtype, device, paths)
            counts[variant] = common.trainable_parameters(layers[variant])
        if lora_name is None:
            rank = common.matched_lora_rank(counts[variant], [SHAPE])
            lora_name = f"PEFT LoRA r={rank} unmerged"
            peft_model = common.peft_lora(copy.deepcopy(base), rank, ["0"]).eval()
            common.cast_peft_adapter(peft_model, dtype)
            peft_layer = peft_model.base_model.model[0]  # PEFT's lora.Linear, as the model calls it
            layers[lora_name], counts[lora_name] = peft_layer, common.trainable_parameters(peft_layer)

    results, table = [], []
    for tokens in [int(b) for b in args.batches.split(",")]:
        x = torch.randn(tokens, 1, SHAPE[0], device=device, dtype=dtype)

        def timed(layer: nn.Module, x: torch.Tensor = x):
            def run() -> None:
                with torch.inference_mode():
                    for _ in range(calls):
                        layer(x)

            return run

        times = common.time_interleaved(
            {name: timed(layer) for name, layer in layers.items()}, device=device, warmup=args.warmup, repeats=repeats
        )
        per_call = {name: common.median(t) / calls * 1e6 for name, t in times.items()}  # µs
        added = {name: per_call[name] - per_call["base"] for name in layers}
        for name in layers:
            ratio = added[name] / added[lora_name] if name != "base" else float("nan")
            results.append(
                {
                    "tokens": tokens,
                    "variant": name,
                    "trainable": counts[name],
                    "us_per_call": per_call[name],
                    "us_added": added[name],
                    "added_vs_lora": ratio,
                }
            )
            shown = "" if name == "base" else f"{ratio:.2f}×"
            table.append([tokens, name, f"{counts[name]:,}", f"{per_call[name]:.1f}", f"{added[name]:.1f}", shown])
    common.print_table(
        f"One {SHAPE[0]} → {SHAPE[1]} layer at decoding, µs per call (median of {repeats} × {calls} calls)",
        ["tokens", "variant", "trainable", "µs per call", "µs added to the base", "added vs LoRA's"],
        table,
    )
    common.write_json(args.json, {"environment": common.environment(args, device, dtype), "results": results})


if __name__ == "__main__":
    main()
