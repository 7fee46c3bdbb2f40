"""S'MoRE's sibling adapters decoded in one pass (``smore_decode.DecodeGroup``): a gated MLP's gate_proj and up_proj
read the same input, so their decode path computes both in the torch calls of one. The fused outputs and side outputs
must equal each adapter computed alone; the group must notice when its members do not share an input, or when that
input or their weights changed. Timings are never asserted here (``bench/generation.py``)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import smore
from helpers import assert_close, count_torch_calls, randomize_biases_, tiny_llama
from smore.adapters import smore_decode
from smore.compat import cache_argument, output_cache

# Paths layout with block experts on the tiny model's widths: the layout whose tables stack.
FUSING = dict(num_experts=[2, 2], top_k=[1, 1], ranks=[2, 2], router_dims=[4, 4], down_proj_dim=8, init="normal")


def adapted(config: dict | None = None, **model_overrides) -> nn.Module:
    model = smore.adapt(tiny_llama(**model_overrides).double(), smore.SMoREConfig(**(config or FUSING))).eval()
    for module in model.modules():
        if hasattr(module, "prepare_inference"):
            randomize_biases_(module)
    return model


def alone(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose adapters all decode alone."""
    model = copy.deepcopy(model)
    for module in model.modules():
        module.__dict__.pop("_decode_group", None)
    return model


def group_of(model: nn.Module, layer: int = 0, name: str = "gate_proj"):
    return getattr(model.model.layers[layer].mlp, name).delta.__dict__.get("_decode_group")


def decode(model: nn.Module, steps: int = 3, batch: int = 2) -> list:
    """Logits and, per step, every adapter's aux loss and selection, over a prefill and ``steps`` cached steps."""
    ids = torch.randint(0, model.config.vocab_size, (batch, 4), generator=torch.Generator().manual_seed(0))
    deltas = [m for m in model.modules() if hasattr(m, "prepare_inference")]
    record = []
    with torch.no_grad():
        out = model(input_ids=ids, use_cache=True)
        for _ in range(steps):
            token = out.logits[:, -1:].argmax(-1)
            out = model(input_ids=token, **{cache_argument(model): output_cache(out)}, use_cache=True)
            selections = [tuple(d.last_selection.indices) for d in deltas]
            record.append((out.logits, [d.aux_loss for d in deltas], selections))
    return record


def assert_same_decoding(fused: list, reference: list) -> None:
    for (logits, aux, selections), (ref_logits, ref_aux, ref_selections) in zip(fused, reference, strict=True):
        assert_close(logits, ref_logits)
        for a, b in zip(aux, ref_aux, strict=True):
            assert_close(a, b)
        for a, b in zip(selections, ref_selections, strict=True):
            assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def test_injection_groups_the_layers_of_one_parent_with_the_same_shape():
    model = adapted()
    for layer in range(2):
        group = group_of(model, layer)
        mlp = model.model.layers[layer].mlp
        assert group.members == [mlp.gate_proj.delta, mlp.up_proj.delta]
        assert group_of(model, layer, "up_proj") is group
        assert group_of(model, layer, "down_proj") is None  # another shape, and no sibling of it
    assert group_of(model, 0) is not group_of(model, 1)
    copied = copy.deepcopy(model)  # a copy's group holds the copy's deltas
    copied_mlp = copied.model.layers[0].mlp
    assert group_of(copied, 0).members == [copied_mlp.gate_proj.delta, copied_mlp.up_proj.delta]


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_fused_decoding_equals_each_adapter_alone(mode):
    model = adapted()
    reference_model = alone(model)  # copied outside inference mode, which would make its weights inference tensors
    context = torch.inference_mode if mode == "inference_mode" else torch.no_grad
    with context():
        fused = decode(model)
        reference = decode(reference_model)
    assert group_of(model).fusing, "the siblings never decoded in one pass"
    assert_same_decoding(fused, reference)


@pytest.mark.parametrize("gate, top_k", [("dense", 1), ("switch", 1), ("switch", 2), ("noisy_topk", 1)])
def test_fused_decoding_equals_the_plain_forward_for_every_gate(gate, top_k, monkeypatch):
    model = adapted({**FUSING, "gate": gate, "top_k": top_k})
    fused = decode(model)
    assert group_of(model).fusing
    monkeypatch.setattr(smore_decode, "MAX_TOKENS", 0)  # every call through the plain forward
    assert_same_decoding(fused, decode(model))


class SplitInputs(nn.Module):
    """A gated MLP whose up_proj reads the same input as gate_proj (before it, or after), another input, or the same
    one changed in place between."""

    def __init__(self, mode: str) -> None:
        super().__init__()
        self.mode = mode
        self.gate_proj, self.up_proj = nn.Linear(32, 64), nn.Linear(32, 64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "up first":
            up = self.up_proj(x)
            return self.gate_proj(x) * up
        gate = self.gate_proj(x)
        if self.mode == "other input":
            x = x * 2
        elif self.mode == "changed in place" and not torch.is_inference(x):
            x.mul_(2)
        return gate * self.up_proj(x)


@pytest.mark.parametrize("mode", ["shared", "up first", "other input", "changed in place"])
def test_a_group_fuses_only_while_its_members_read_one_unchanged_input(mode, monkeypatch):
    torch.manual_seed(0)
    config = smore.SMoREConfig(**FUSING, target_modules=["gate_proj", "up_proj"])
    block = smore.adapt(SplitInputs(mode).double(), config).eval()
    for module in block.modules():
        if hasattr(module, "prepare_inference"):
            randomize_biases_(module)
    group = block.gate_proj.delta.__dict__["_decode_group"]
    inputs = [torch.randn(2, 32, dtype=torch.float64) for _ in range(4)]
    with torch.no_grad():
        outputs = [block(x.clone()) for x in inputs]
        monkeypatch.setattr(smore_decode, "MAX_TOKENS", 0)
        expected = [block(x.clone()) for x in inputs]
    assert group.fusing == (mode in ("shared", "up first"))
    for out, ref in zip(outputs, expected):
        assert_close(out, ref)


def test_fused_decoding_follows_weight_updates():
    model = adapted()
    decode(model)
    assert group_of(model).fusing
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.delta.proj.weight.mul_(1.5)  # one member only, in place
    assert_same_decoding(decode(model), decode(alone(model)))


def test_a_fused_pair_saves_about_one_adapter_of_torch_calls():
    """Every kernel of one adapter is saved; the group adds a few reads of the input's pointer and strides."""
    model, single = adapted(), None
    single = alone(model)
    mlp, single_mlp = model.model.layers[0].mlp, single.model.layers[0].mlp
    x = torch.randn(1, 1, 32, dtype=torch.float64)
    with torch.no_grad():
        for block in (mlp, single_mlp):
            block(x), block(x)  # the tables, and the group sees its members share x
    assert group_of(model).fusing
    fused = count_torch_calls(lambda: mlp(x), attributes=False)
    separate = count_torch_calls(lambda: single_mlp(x), attributes=False)
    one_adapter = count_torch_calls(lambda: single_mlp.up_proj.delta(x.view(1, -1)), attributes=False)
    assert separate - fused >= 0.6 * one_adapter, f"{fused} torch calls fused, {separate} alone, {one_adapter} each"


def test_members_whose_tables_do_not_stack_decode_alone():
    model = adapted({**FUSING, "num_experts": [3, 3], "ranks": [4, 4]})  # paths, but per-level experts
    reference = decode(alone(model))
    assert_same_decoding(decode(model), reference)
    group = group_of(model)
    assert not group.fusing and not group.stacks


def test_a_member_in_training_mode_is_not_computed_by_its_sibling():
    model = adapted()
    decode(model)
    mlp = model.model.layers[0].mlp
    mlp.up_proj.train()  # its forward takes the training path, which the stacked eval pass must not stand in for
    x = torch.randn(1, 1, 32, dtype=torch.float64)
    with torch.no_grad():
        mlp(x)
        assert group_of(model).pending is None, "the eval pass computed a member in training mode"
        torch.manual_seed(0)
        out = mlp(x)
        torch.manual_seed(0)
        expected = alone(model).model.layers[0].mlp(x)
    assert_close(out, expected)
