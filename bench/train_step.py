"""Benchmark 2: one training step of the embedded model (SmolLM2-135M shapes, randomly initialised, no download),
S'MoRE against HF PEFT LoRA at matched trainable parameters on the same target modules: step time and peak memory.

A step is forward (batch 8 × 128 tokens, labels = inputs), loss (+ the routers' aux loss for S'MoRE), backward and
an AdamW step on the adapter's parameters; the two models are built from the same weights and timed in turns.
"Saved" is what autograd keeps for backward in one forward (tensors packed by autograd, each storage counted once,
parameters left out): the activation memory an adapter adds. S'MoRE runs with ``recompute`` on (the default: the
router and the tree are recomputed in backward) and off.

    python bench/train_step.py --quick
    python bench/train_step.py --layers 4
    python bench/train_step.py --json bench/results/train_step.json
    python bench/train_step.py --device cuda --dtype bfloat16
"""

from __future__ import annotations

import copy
import logging
from typing import Any

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import smore
from smore.analysis.budget import MODEL_SHAPES

if __package__ in (None, ""):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import common
else:
    from bench import common

logger = logging.getLogger("bench.train_step")

TARGETS = ["gate_proj", "up_proj", "down_proj"]
SMORE_CONFIGS = {
    "S'MoRE (4-4) switch": dict(num_experts=[4, 4], top_k=[2, 2], ranks=[8, 8], gate="switch"),
    "S'MoRE (2-2) switch": dict(num_experts=[2, 2], top_k=[1, 1], ranks=[16, 16], gate="switch"),
}


def base_model(quick: bool, device, dtype, layers: int | None = None) -> LlamaForCausalLM:
    values = dict(MODEL_SHAPES["smollm2-135m"])
    if quick or layers:
        values.update(num_hidden_layers=layers or 2)
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**values)).to(device=device, dtype=dtype)


def target_shapes(model) -> list[tuple[int, int]]:
    return [
        (m.in_features, m.out_features)
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and name.rsplit(".", 1)[-1] in TARGETS
    ]


def step_fn(model, batch: dict[str, torch.Tensor], with_aux: bool):
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)

    def step() -> None:
        loss = model(**batch, labels=batch["input_ids"]).loss
        if with_aux:
            loss = loss + smore.aux_loss(model).to(loss.dtype)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def saved_bytes(model, batch: dict[str, torch.Tensor], with_aux: bool) -> int:
    """Bytes autograd saves for backward in one forward (+ loss), each storage once, parameters excluded."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in params:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = model(**batch, labels=batch["input_ids"]).loss
        if with_aux:
            loss = loss + smore.aux_loss(model).to(loss.dtype)
    del loss
    return sum(storages.values())


def main(argv: list[str] | None = None) -> None:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=None, help="sequences per step (default 8)")
    p.add_argument("--length", type=int, default=None, help="tokens per sequence (default 128)")
    p.add_argument("--layers", type=int, default=None, help="decoder layers (default 30, --quick 2)")
    p.add_argument("--no-recompute-off", action="store_true", help="skip the S'MoRE rows with recompute off")
    args = p.parse_args(argv)
    device, dtype = common.setup(args)
    batch_size = args.batch or (2 if args.quick else 8)
    length = args.length or (32 if args.quick else 128)
    repeats = args.repeats or 3
    base = base_model(args.quick, device, dtype, args.layers).train()
    generator = torch.Generator(device="cpu").manual_seed(0)
    input_ids = torch.randint(0, base.config.vocab_size, (batch_size, length), generator=generator).to(device)
    batch = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
    shapes = target_shapes(base)

    models: dict[str, Any] = {}
    counts: dict[str, int] = {}
    references: dict[str, str] = {}
    variants = dict(SMORE_CONFIGS)
    if not args.no_recompute_off:
        variants.update(
            {f"{name}, recompute off": dict(values, recompute=False) for name, values in SMORE_CONFIGS.items()}
        )
    for name, values in variants.items():
        model = smore.adapt(
            copy.deepcopy(base), smore.SMoREConfig(**values, target_modules=TARGETS), aux_loss_in_output=False
        )
        models[name], counts[name] = model, smore.summary(model).trainable
        rank = common.matched_lora_rank(counts[name], shapes)
        references[name] = f"PEFT LoRA r={rank}"
        if references[name] not in models:
            peft_model = common.peft_lora(copy.deepcopy(base), rank, TARGETS)
            common.cast_peft_adapter(peft_model, dtype)
            models[references[name]] = peft_model
            counts[references[name]] = common.trainable_parameters(peft_model)
    del base
    calls = {name: step_fn(model, batch, name.startswith("S'MoRE")) for name, model in models.items()}
    times = common.time_interleaved(calls, device=device, warmup=args.warmup, repeats=repeats)
    memory = {} if args.no_memory else {name: common.peak_memory(call, device) for name, call in calls.items()}
    saved = {name: saved_bytes(model, batch, name.startswith("S'MoRE")) for name, model in models.items()}

    results, table = [], []
    for name in models:
        ref = references.get(name)
        row = {
            "variant": name,
            "trainable": counts[name],
            "reference": ref,
            "reference_trainable": counts[ref] if ref else None,
            "step_s": common.median(times[name]),
            "step_times_s": times[name],
            "peak_bytes": memory.get(name),
            "time_ratio": common.median(times[name]) / common.median(times[ref]) if ref else None,
            "memory_ratio": memory[name] / memory[ref] if ref and name in memory else None,
            "saved_bytes": saved[name],
            "saved_ratio": saved[name] / saved[ref] if ref else None,
        }
        results.append(row)
        table.append(
            [
                name,
                f"{counts[name]:,}",
                f"{ref} ({counts[ref]:,})" if ref else "",
                f"{row['step_s']:.2f}",
                "" if row["time_ratio"] is None else f"{row['time_ratio']:.3f}×",
                "" if row["peak_bytes"] is None else common.format_bytes(row["peak_bytes"]),
                "" if row["memory_ratio"] is None else f"{row['memory_ratio']:.3f}×",
                common.format_bytes(row["saved_bytes"]),
                "" if row["saved_ratio"] is None else f"{row['saved_ratio']:.3f}×",
            ]
        )
    title = (
        f"Training step, {len(shapes) // 3}-layer SmolLM2-135M shapes, batch {batch_size} × {length} tokens "
        f"(median of {repeats})"
    )
    columns = [
        "variant",
        "trainable",
        "vs (trainable)",
        "step s",
        "time ×",
        "peak memory",
        "memory ×",
        "saved",
        "saved ×",
    ]
    common.print_table(title, columns, table)
    payload = {"benchmark": "train_step", **common.environment(args, device, dtype), "batch": batch_size}
    common.write_json(args.json, {**payload, "length": length, "results": results})


if __name__ == "__main__":
    main()
