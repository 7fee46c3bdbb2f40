"""Benchmark 3: generation speed of the adapted model (SmolLM2-135M shapes, randomly initialised, no download):
prefill tokens/s and decode tokens/s with the KV cache, batch 1 and 8, S'MoRE against the base model and against
HF PEFT LoRA unmerged at matched trainable parameters, all timed in turns in the same run.

Prefill is one forward over the prompt that fills the cache; decode is a greedy loop of single-token forwards
reusing the cache (the loop ``generate()`` runs, without its bookkeeping). Eval mode, ``torch.inference_mode``.

    python bench/generation.py --quick
    python bench/generation.py --json bench/results/generation.json
    python bench/generation.py --device cuda --dtype bfloat16
    python bench/generation.py --quick --compile          # every model through torch.compile (inductor)
    python bench/generation.py --batches 1 --siblings-alone   # also each S'MoRE adapter decoding alone

``--siblings-alone`` adds a copy of each S'MoRE model whose sibling adapters (gate_proj and up_proj) decode one by
one instead of in one pass (``smore_decode.DecodeGroup``), timed in the same rounds: what the fusion gains.

``--compile [BACKEND]`` passes every model (base, S'MoRE, PEFT LoRA) through ``torch.compile`` the same way
(default backend inductor); the warmup calls absorb the compilation, the cache's growing length included (dynamo
marks it dynamic at its second length), so keep ``--warmup`` at 1 or more.
"""

from __future__ import annotations

import copy
import logging
import time

import torch
from transformers import DynamicCache

import smore
from smore.compat import cache_argument, output_cache

if __package__ in (None, ""):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import common
    from train_step import TARGETS, base_model, target_shapes
else:
    from bench import common
    from bench.train_step import TARGETS, base_model, target_shapes

logger = logging.getLogger("bench.generation")

SMORE_CONFIGS = {
    "S'MoRE (4-4) switch": dict(num_experts=[4, 4], top_k=[2, 2], ranks=[8, 8], gate="switch"),
    "S'MoRE (2-2) switch": dict(num_experts=[2, 2], top_k=[1, 1], ranks=[16, 16], gate="switch"),
}


def generate_fn(model, prompt: torch.Tensor, new_tokens: int, device, record: dict[str, list[float]]):
    """Prefill, then ``new_tokens`` greedy decode steps; appends the prefill and decode seconds to ``record``."""

    # 'cache' from transformers 5.24, 'past_key_values' before; read on the model a torch.compile wrapper holds
    cache_name = cache_argument(getattr(model, "_orig_mod", model))

    def run() -> None:
        with torch.inference_mode():
            cache = DynamicCache()
            common.synchronize(device)
            start = time.perf_counter()
            out = model(input_ids=prompt, **{cache_name: cache}, use_cache=True)
            token = out.logits[:, -1:].argmax(-1)
            common.synchronize(device)
            middle = time.perf_counter()
            for _ in range(new_tokens):
                out = model(input_ids=token, **{cache_name: output_cache(out)}, use_cache=True)
                token = out.logits[:, -1:].argmax(-1)
            common.synchronize(device)
            end = time.perf_counter()
        record["prefill"].append(middle - start)
        record["decode"].append(end - middle)

    return run


def main(argv: list[str] | None = None) -> None:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--prompt", type=int, default=None, help="prompt tokens (default 128)")
    p.add_argument("--new-tokens", type=int, default=None, help="decoded tokens (default 32)")
    p.add_argument("--batches", default="1,8", help="batch sizes, comma-separated")
    p.add_argument(
        "--compile",
        nargs="?",
        const="inductor",
        default=None,
        metavar="BACKEND",
        help="torch.compile every model with this backend (default inductor), all alike",
    )
    p.add_argument(
        "--siblings-alone",
        action="store_true",
        help="also time each S'MoRE model with its sibling adapters decoding one by one (no DecodeGroup)",
    )
    args = p.parse_args(argv)
    if args.compile is not None and args.warmup < 1:
        raise SystemExit("--compile needs --warmup 1 or more: the first calls compile, they must not be timed.")
    device, dtype = common.setup(args)
    prompt_len = args.prompt or (16 if args.quick else 128)
    new_tokens = args.new_tokens or (8 if args.quick else 32)
    repeats = args.repeats or 3
    base = base_model(args.quick, device, dtype).eval()
    shapes = target_shapes(base)
    models, counts = {"base": base}, {"base": 0}
    lora_name = None
    for name, values in SMORE_CONFIGS.items():
        model = smore.adapt(copy.deepcopy(base), smore.SMoREConfig(**values, target_modules=TARGETS)).eval()
        models[name], counts[name] = model, smore.summary(model).trainable
        if args.siblings_alone:
            alone = copy.deepcopy(model)
            for module in alone.modules():
                module.__dict__.pop("_decode_group", None)
            models[f"{name}, siblings alone"], counts[f"{name}, siblings alone"] = alone, counts[name]
        if lora_name is None:  # one LoRA, matched to the first S'MoRE config
            rank = common.matched_lora_rank(counts[name], shapes)
            lora_name = f"PEFT LoRA r={rank} unmerged"
            peft_model = common.peft_lora(copy.deepcopy(base), rank, TARGETS).eval()
            common.cast_peft_adapter(peft_model, dtype)
            models[lora_name], counts[lora_name] = peft_model, common.trainable_parameters(peft_model)

    if args.compile is not None:  # the same call for every variant, so the ratios compare like with like
        # The variants share the model class's forward, and dynamo's recompile limit counts per code object: each
        # model compiles a prefill, a decode step and a dynamic-length decode step, and past the default limit (8)
        # the later models would silently run in eager.
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 8 * len(models))
        models = {name: torch.compile(m, backend=args.compile) for name, m in models.items()}
        logger.info("compiled every model with torch.compile(backend=%r)", args.compile)

    results, table = [], []
    for batch_size in [int(b) for b in args.batches.split(",")]:
        generator = torch.Generator(device="cpu").manual_seed(batch_size)
        prompt = torch.randint(0, base.config.vocab_size, (batch_size, prompt_len), generator=generator).to(device)
        records = {name: {"prefill": [], "decode": []} for name in models}
        calls = {name: generate_fn(m, prompt, new_tokens, device, records[name]) for name, m in models.items()}
        common.time_interleaved(calls, device=device, warmup=args.warmup, repeats=repeats)
        for record in records.values():  # drop the warmup calls
            for key in record:
                del record[key][: args.warmup]
        rate = {
            name: {
                "prefill": batch_size * prompt_len / common.median(r["prefill"]),
                "decode": batch_size * new_tokens / common.median(r["decode"]),
            }
            for name, r in records.items()
        }
        for name in models:
            row = {
                "batch": batch_size,
                "variant": name,
                "trainable": counts[name],
                "prefill_tokens_per_s": rate[name]["prefill"],
                "decode_tokens_per_s": rate[name]["decode"],
                "prefill_times_s": records[name]["prefill"],
                "decode_times_s": records[name]["decode"],
                "prefill_vs_base": rate[name]["prefill"] / rate["base"]["prefill"],
                "decode_vs_base": rate[name]["decode"] / rate["base"]["decode"],
                "prefill_vs_lora": rate[name]["prefill"] / rate[lora_name]["prefill"],
                "decode_vs_lora": rate[name]["decode"] / rate[lora_name]["decode"],
            }
            results.append(row)
            table.append(
                [
                    batch_size,
                    name,
                    f"{counts[name]:,}",
                    f"{row['prefill_tokens_per_s']:.0f}",
                    f"{row['prefill_vs_base']:.2f}×",
                    f"{row['prefill_vs_lora']:.2f}×",
                    f"{row['decode_tokens_per_s']:.1f}",
                    f"{row['decode_vs_base']:.2f}×",
                    f"{row['decode_vs_lora']:.2f}×",
                ]
            )
    title = (
        f"Generation, {len(shapes) // 3}-layer SmolLM2-135M shapes, prompt {prompt_len}, {new_tokens} new tokens, "
        f"KV cache (median of {repeats})" + (f", torch.compile {args.compile}" if args.compile else "")
    )
    columns = ["batch", "variant", "trainable", "prefill tok/s", "vs base", "vs LoRA", "decode tok/s", "vs base",
               "vs LoRA"]  # fmt: skip
    common.print_table(title, columns, table)
    payload = {"benchmark": "generation", **common.environment(args, device, dtype), "prompt": prompt_len}
    payload["compile"] = args.compile
    common.write_json(args.json, {**payload, "new_tokens": new_tokens, "results": results})


if __name__ == "__main__":
    main()
