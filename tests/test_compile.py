"""``torch.compile`` of an adapted model: no graph break inside an adapter, and the compiled model computes what the
eager one does.

``torch._dynamo.explain`` traces the tiny Llama adapted with every method (a training step with labels, and a cached
decoding step in eval mode) and reports each graph break with the stack of the code that caused it; none may lie in
the ``smore`` package. (The model-level hooks of ``adapt``, the aux-loss hook after the forward and T-REX's prior
hook before it, run as frames of their own beside the forward: they are separate graphs, not breaks inside one.)
The ``aot_eager`` backend (dynamo's graphs run through AOTAutograd, no code generation) must give the eager outputs
and gradients. Inductor compiles C++ or Triton code, minutes on a small CPU: it runs only with
``SMORE_INDUCTOR_TESTS=1``.

The grouped expert paths step aside under compilation (their group sizes depend on the routing), so a compiled
S'MoRE or MixLoRA runs the dense path: the equality tests force the grouped path in eager, which checks both.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch
import torch._dynamo

import smore
from helpers import ADAPTER_CASES, adapted_tiny_llama, tiny_batch

SMORE_DIR = os.path.dirname(smore.__file__) + os.sep

FAST_DECODE_CASES = ("smore-switch", "mixlora", "trex")
"""Decoding steps checked in every run; the other methods' decoding steps are marked slow."""


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _breaks_in_smore(explanation) -> list[str]:
    """The graph breaks whose stack passes through the smore package, as readable lines."""
    found = []
    for reason in explanation.break_reasons:
        frames = [f"{frame.filename}:{frame.lineno}" for frame in reason.user_stack]
        if any(frame.startswith(SMORE_DIR) for frame in frames):
            found.append(f"{reason.reason.splitlines()[0]} at {frames[-1]}")
    return found


def _labelled(batch: dict) -> dict:
    labels = batch["input_ids"].clone()
    labels[batch["attention_mask"] == 0] = -100
    return {**batch, "labels": labels}


def test_a_break_inside_smore_is_reported():
    """The check can fail: a graph break forced inside an adapter's forward is found and located in smore."""
    model = adapted_tiny_llama("lora")
    delta = next(m for m in model.modules() if type(m).__name__ == "LoRADelta")
    original = type(delta).forward

    def breaking(self, x, valid=None):
        torch._dynamo.graph_break()
        return original(self, x, valid)

    breaking.__code__ = breaking.__code__.replace(co_filename=smore.adapters.lora.__file__)
    type(delta).forward = breaking
    try:
        explanation = torch._dynamo.explain(model)(**_labelled(tiny_batch()))
    finally:
        type(delta).forward = original
    assert explanation.graph_break_count > 0 and _breaks_in_smore(explanation)


@pytest.mark.parametrize("case", ADAPTER_CASES)
def test_training_forward_has_no_graph_break_in_the_adapters(case):
    model = adapted_tiny_llama(case)
    explanation = torch._dynamo.explain(model)(**_labelled(tiny_batch()))
    assert _breaks_in_smore(explanation) == []
    assert explanation.graph_count <= 3, "forward, aux-loss hook and (T-REX) prior hook, nothing split further"


def _decode_inputs(model) -> dict:
    """A cached decoding step: the prompt's cache, one new token per sequence."""
    batch = tiny_batch(batch=2, length=6)
    with torch.no_grad():
        out = model(**batch, use_cache=True)
    token = out.logits[:, -1:].argmax(-1)
    mask = torch.cat([batch["attention_mask"], torch.ones_like(token)], dim=1)
    return {"input_ids": token, "attention_mask": mask, "cache": out.past_key_values, "use_cache": True}


@pytest.mark.parametrize(
    "case", [c if c in FAST_DECODE_CASES else pytest.param(c, marks=pytest.mark.slow) for c in ADAPTER_CASES]
)
def test_cached_decoding_step_has_no_graph_break_in_the_adapters(case):
    model = adapted_tiny_llama(case, train=False)
    inputs = _decode_inputs(model)
    with torch.no_grad():
        explanation = torch._dynamo.explain(model)(**inputs)
    assert _breaks_in_smore(explanation) == []


def test_compiled_decoding_reads_the_decode_tables_and_follows_weight_updates():
    """Compiled, S'MoRE decodes through its folded tables (``smore_decode``), which the model's pre-hook keeps
    current eagerly: the compiled step equals the eager one, before and after the weights change in place (as an
    optimizer step changes them), without a new trace."""
    from torch._dynamo.utils import counters

    eager = adapted_tiny_llama("smore-switch", train=False)
    compiled_model = adapted_tiny_llama("smore-switch", train=False)
    compiled = torch.compile(compiled_model, backend="aot_eager")
    inputs = _decode_inputs(eager)
    deltas = [m for m in compiled_model.modules() if type(m).__name__ == "SMoREDelta"]

    def step(model):
        with torch.inference_mode():
            return model(**{**inputs, "cache": copy.deepcopy(inputs["cache"])}).logits

    before = step(eager)
    for _ in range(2):  # the second call may trace again: the first left the adapters' side outputs set
        torch.testing.assert_close(step(compiled), before, atol=1e-5, rtol=1e-4)
    # The decode path leaves the aux loss as a thunk; the plain forward would have set it.
    assert deltas and all("_aux_thunk" in d.__dict__ and "_folded" in d.__dict__ for d in deltas)
    graphs = counters["stats"]["unique_graphs"]
    with torch.no_grad():
        for model in (eager, compiled_model):
            for name, param in model.named_parameters():
                if "delta" in name:
                    param.mul_(1.5)
    after = step(eager)
    assert not torch.allclose(after, before, atol=1e-4)
    torch.testing.assert_close(step(compiled), after, atol=1e-5, rtol=1e-4)
    assert counters["stats"]["unique_graphs"] == graphs, "new tables are new inputs to the same graphs"


def _step(model, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Logits and the adapters' gradients of one training step (loss with the aux term)."""
    model.zero_grad()
    out = model(**batch)
    out.loss.backward()
    grads = {
        name.removeprefix("_orig_mod."): p.grad.clone()  # torch.compile's wrapper names the model _orig_mod
        for name, p in model.named_parameters()
        if p.requires_grad and p.grad is not None
    }
    return out.logits.detach(), grads


def _compiled_equals_eager(case: str, backend: str) -> None:
    """A grouped case computes the grouped path in eager and the dense one compiled: both are checked at once."""
    eager = adapted_tiny_llama(case)
    compiled_model = adapted_tiny_llama(case)  # the same seed: the same weights
    compiled = torch.compile(compiled_model, backend=backend, fullgraph=False)
    batch = _labelled(tiny_batch())
    logits, grads = _step(eager, batch)
    for _ in range(2):  # the second call reuses the compiled graphs
        compiled_logits, compiled_grads = _step(compiled, batch)
        torch.testing.assert_close(compiled_logits, logits, atol=1e-5, rtol=1e-4)
        assert compiled_grads.keys() == grads.keys() and grads
        for name, grad in grads.items():
            torch.testing.assert_close(compiled_grads[name], grad, atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize(
    "case",
    [
        "smore-switch",
        "mixlora",
        pytest.param("smore-grouped", marks=pytest.mark.slow),
        pytest.param("mixlora-grouped", marks=pytest.mark.slow),
    ],
)
def test_aot_eager_compiled_model_equals_eager(case):
    _compiled_equals_eager(case, "aot_eager")


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("SMORE_INDUCTOR_TESTS") != "1", reason="set SMORE_INDUCTOR_TESTS=1 (minutes)")
@pytest.mark.parametrize("case", ["smore-switch", "mixlora"])
def test_inductor_compiled_model_equals_eager(case):
    _compiled_equals_eager(case, "inductor")
