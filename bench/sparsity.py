"""Benchmark 4: sparsity pays. S'MoRE with top_k well below num_experts (s = [16, 16], f = [2, 2]: 2 of 16 experts
per parent in each level) timed against the same config computed the way the authors' code does (every expert of
each level for every token, then gather the selected ones), with the same weights and the same routing.

Three ways, forward + backward: ``grouped`` (this library's path for such configs: each expert computes only its
own routed slots), ``dense`` (this library's other path: every expert's A and B, then gather; what it runs when a
token uses most of the experts) and ``authors`` (the reference below, written for this benchmark). Two scopes: the
whole adapter (router, experts, tree, W_proj) and the experts alone (every level's slot outputs U, where the
number of experts owned enters; W_proj maps the full message x_L of width Σ s_ℓ r_ℓ in every way). A sweep over s
shows which cost grows with the experts owned and which with the experts used.

    python bench/sparsity.py --quick
    python bench/sparsity.py --json bench/results/sparsity.json
    python bench/sparsity.py --device cuda --dtype bfloat16
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F

import smore
from smore.adapters.smore import SMoREDelta, build_smore
from smore.routing.types import TreeRouting

if __package__ in (None, ""):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import common
else:
    from bench import common

logger = logging.getLogger("bench.sparsity")


def authors_slot_outputs(delta: SMoREDelta, x: torch.Tensor, routing: TreeRouting) -> list[torch.Tensor]:
    """U of the routed slots per level, computed as the authors' code does: every expert of the level for every
    token (its A rows, then its B), then the selected slots gathered."""
    outputs = []
    for level in range(delta.num_levels):
        s, r = delta.num_experts[level], delta.ranks[level]
        rows = slice(delta.a_offsets[level], delta.a_offsets[level] + s * r)
        pool = 0 if delta.shared_pool else level
        hidden = F.linear(x, delta.A[rows], delta.A_bias[rows]).view(-1, s, r)  # (N, s, r): every expert
        every = torch.einsum("nsr,sdr->nsd", hidden, delta.B[pool]) + delta.B_bias[pool]  # (N, s, d_{ℓ+1})
        index = routing.indices[level].unsqueeze(-1).expand(-1, -1, every.shape[-1])
        outputs.append(delta.scalings[level] * every.gather(1, index))  # (N, F_ℓ, d_{ℓ+1}): then gather
    return outputs


def authors_forward(delta: SMoREDelta, x: torch.Tensor, routing: TreeRouting | None = None) -> torch.Tensor:
    """The whole adapter with the authors' expert computation (router, tree and W_proj as this library's)."""
    routing = delta.router(x) if routing is None else routing
    message = None
    for level, u in enumerate(authors_slot_outputs(delta, x, routing)):
        message = delta.combine(level, u, routing.weights[level], message)
    return delta.proj(message.squeeze(1))


def ours_slot_outputs(delta: SMoREDelta, path: str):
    def slot_outputs(x, routing):
        if path == "grouped":
            return delta._grouped_slot_outputs(x, routing)
        return delta._dense_slot_outputs(x, routing)

    return slot_outputs


def run_case(args, device, dtype, d_in: int, d_out: int, experts: int, tokens: int, repeats: int) -> dict[str, Any]:
    config = smore.SMoREConfig(num_experts=[experts, experts], top_k=[2, 2], ranks=[8, 8], gate="switch", init="normal")
    torch.manual_seed(0)
    delta = build_smore(config, d_in, d_out).to(device=device, dtype=dtype).eval()  # eval: the same routing each call
    generator = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(tokens, d_in, generator=generator).to(device=device, dtype=dtype).requires_grad_(True)
    upstream = torch.randn(tokens, d_out, generator=generator).to(device=device, dtype=dtype)
    with torch.no_grad():
        routing = delta.router(x)
        delta.expert_path = "grouped"
        grouped = delta(x, routing=routing)
        delta.expert_path = "dense"
        dense = delta(x, routing=routing)
        authors = authors_forward(delta, x, routing)
    tolerance = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=5e-2, rtol=5e-2)
    torch.testing.assert_close(grouped, authors, **tolerance)  # the same function, computed three ways
    torch.testing.assert_close(dense, authors, **tolerance)
    params = [p for p in delta.parameters() if p.requires_grad]

    def whole(path: str):
        def call() -> None:
            x.grad = None
            for p in params:
                p.grad = None
            if path == "authors":
                out = authors_forward(delta, x)
            else:
                delta.expert_path = path
                out = delta(x)
            out.backward(upstream)

        return call

    slot_upstream = [
        torch.randn(u.shape, generator=generator).to(device=device, dtype=dtype)
        for u in authors_slot_outputs(delta, x.detach(), routing)
    ]

    def experts_only(path: str):
        compute = (
            (lambda t, rt: authors_slot_outputs(delta, t, rt)) if path == "authors" else ours_slot_outputs(delta, path)
        )

        def call() -> None:
            x.grad = None
            for p in params:
                p.grad = None
            outputs = compute(x, routing)
            torch.autograd.backward(outputs, slot_upstream)

        return call

    ways = ("grouped", "dense", "authors")
    calls = {f"{scope} {way}": (whole if scope == "adapter" else experts_only)(way)
             for scope in ("adapter", "experts") for way in ways}  # fmt: skip
    times = common.time_interleaved(calls, device=device, warmup=args.warmup, repeats=repeats)
    medians = {name: common.median(t) for name, t in times.items()}
    return {
        "shape": [d_in, d_out],
        "tokens": tokens,
        "num_experts": [experts, experts],
        "top_k": [2, 2],
        "ranks": [8, 8],
        "auto_path": build_smore(config, d_in, d_out).expert_path,
        "times_s": times,
        "median_s": medians,
        "speedup_adapter": medians["adapter authors"] / medians["adapter grouped"],
        "speedup_experts": medians["experts authors"] / medians["experts grouped"],
    }


def main(argv: list[str] | None = None) -> None:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--shapes", default=None, help="d_in:d_out,... (default 576:1536,4096:4096)")
    p.add_argument("--experts", default=None, help="experts per level to sweep (default 4,8,16,32)")
    p.add_argument("--tokens", type=int, default=None, help="tokens (default 4096)")
    args = p.parse_args(argv)
    device, dtype = common.setup(args)
    shapes = [(576, 1536)] if args.quick else [(576, 1536), (4096, 4096)]
    if args.shapes:
        shapes = [tuple(int(v) for v in item.split(":")) for item in args.shapes.split(",")]
    sweep = [int(v) for v in (args.experts or ("16" if args.quick else "4,8,16,32")).split(",")]
    tokens = args.tokens or (256 if args.quick else 4096)
    repeats = args.repeats or (3 if args.quick else 5)
    results, table = [], []
    for d_in, d_out in shapes:
        for experts in sweep:
            logger.info("%d -> %d, s = [%d, %d], %d tokens", d_in, d_out, experts, experts, tokens)
            row = run_case(args, device, dtype, d_in, d_out, experts, tokens, repeats)
            results.append(row)
            m = row["median_s"]
            table.append(
                [
                    f"{d_in} → {d_out}",
                    f"[{experts}, {experts}]",
                    row["auto_path"],
                    *(f"{m[f'adapter {way}'] * 1e3:.1f}" for way in ("grouped", "dense", "authors")),
                    f"{row['speedup_adapter']:.2f}×",
                    *(f"{m[f'experts {way}'] * 1e3:.1f}" for way in ("grouped", "dense", "authors")),
                    f"{row['speedup_experts']:.2f}×",
                ]
            )
    columns = ["shape", "s", "auto path", "adapter grouped ms", "dense ms", "authors ms", "authors / grouped",
               "experts grouped ms", "dense ms", "authors ms", "authors / grouped"]  # fmt: skip
    title = f"Sparsity: f = [2, 2], r = [8, 8], switch gate, {tokens} tokens, forward + backward (median of {repeats})"
    common.print_table(title, columns, table)
    common.write_json(
        args.json, {"benchmark": "sparsity", **common.environment(args, device, dtype), "results": results}
    )


if __name__ == "__main__":
    main()
