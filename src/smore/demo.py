"""``smore demo``: the whole life of an adapter in a minute, on a model built in-process.

Until the embedded pretrained model lands (SmolLM2 from PyPI), the demo uses a tiny randomly initialised Llama and a
synthetic task whose answer the frozen model cannot know: every sequence counts upwards in steps of a fixed stride,
so the next token is determined by the previous one. It shows that the zero-initialised adapter leaves the model
unchanged, that training only the adapter drives the loss down, and that the saved adapter reloads exactly.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

import smore

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DemoResult:
    loss_before: float
    loss_after: float
    accuracy_before: float
    accuracy_after: float
    trainable: int
    total: int
    seconds: float
    adapter_dir: Path
    reload_max_diff: float


def tiny_model(seed: int = 0, vocab_size: int = 64):
    """A 2-layer Llama (hidden 64) with random weights: small enough to train on a laptop CPU in seconds."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    return LlamaForCausalLM(config)


def counting_batch(batch: int, length: int, vocab_size: int, stride: int, generator: torch.Generator):
    """Sequences ``t, t+s, t+2s, …`` modulo the vocabulary: the next token follows from the current one."""
    start = torch.randint(0, vocab_size, (batch, 1), generator=generator)
    return (start + stride * torch.arange(length)) % vocab_size


def _next_token_accuracy(model, input_ids: torch.Tensor) -> tuple[float, float]:
    with torch.no_grad():
        out = model(input_ids=input_ids, labels=input_ids)
    predicted = out.logits[:, :-1].argmax(-1)
    return out.loss.item(), (predicted == input_ids[:, 1:]).float().mean().item()


def run_demo(
    *,
    steps: int = 150,
    output_dir: str | Path = "smore_demo_out",
    seed: int = 0,
    config: smore.SMoREConfig | None = None,
    lr: float = 3e-3,
    batch_size: int = 16,
    length: int = 24,
) -> DemoResult:
    """Adapt, train, save and reload a S'MoRE adapter on the tiny model; returns what was measured."""
    vocab, stride = 64, 7
    config = config or smore.SMoREConfig(
        num_experts=[4, 4], top_k=[2, 2], ranks=[4, 4], router_dims=[16, 16], down_proj_dim=16
    )
    generator = torch.Generator().manual_seed(seed)
    held_out = counting_batch(64, length, vocab, stride, generator)
    model = tiny_model(seed, vocab).eval()
    base_loss, base_acc = _next_token_accuracy(model, held_out)
    smore.adapt(model, config)
    zero_init_loss, _ = _next_token_accuracy(model, held_out)
    logger.info("%s", smore.summary(model))
    logger.info(
        "held-out loss of the base model %.4f; with the zero-initialised adapter %.4f", base_loss, zero_init_loss
    )

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    start = time.perf_counter()
    progress = tqdm(range(steps), desc="training S'MoRE", unit="step")
    for _ in progress:
        batch = counting_batch(batch_size, length, vocab, stride, generator)
        out = model(input_ids=batch, labels=batch)
        loss = out.loss + smore.aux_loss(model)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        progress.set_postfix(loss=f"{out.loss.item():.3f}")
    seconds = time.perf_counter() - start
    model.eval()
    loss_after, acc_after = _next_token_accuracy(model, held_out)

    adapter_dir = Path(output_dir) / "adapter"
    smore.save_adapter(model, adapter_dir)
    reloaded = smore.load_adapter(tiny_model(seed, vocab).eval(), adapter_dir)
    with torch.no_grad():
        diff = (reloaded(input_ids=held_out).logits - model(input_ids=held_out).logits).abs().max().item()
    summary = smore.summary(model)
    return DemoResult(
        loss_before=base_loss,
        loss_after=loss_after,
        accuracy_before=base_acc,
        accuracy_after=acc_after,
        trainable=summary.trainable,
        total=summary.total,
        seconds=seconds,
        adapter_dir=adapter_dir,
        reload_max_diff=diff,
    )


def format_result(result: DemoResult) -> str:
    rows = [
        ("", "base model", "with S'MoRE"),
        ("held-out loss", f"{result.loss_before:.4f}", f"{result.loss_after:.4f}"),
        ("next-token accuracy", f"{result.accuracy_before:.1%}", f"{result.accuracy_after:.1%}"),
    ]
    lines = [f"{a:<22}{b:>12}{c:>14}" for a, b, c in rows]
    lines += [
        f"trainable parameters: {result.trainable:,} of {result.total:,}; training took {result.seconds:.1f} s",
        f"adapter saved to {result.adapter_dir} (reloaded: max logit difference {result.reload_max_diff:.1e})",
        "load it with: smore.load_adapter(base_model, " + repr(str(result.adapter_dir)) + ")",
    ]
    return "\n".join(lines)
