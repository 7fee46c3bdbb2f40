"""No adapter makes the host wait for the device: no host sync in a training forward and backward, nor in decoding.

A sync is an operation whose result the host must read from the device before it can go on: ``.item()``,
``.tolist()``, ``.cpu()``, ``bool(tensor)``, ``nonzero`` and boolean selection, ``bincount`` (its size),
``unique``, ``masked_select``. On CPU nothing waits, but the same operations are syncs on CUDA, so
:class:`SyncRecorder` records them at the torch-function and at the dispatcher level, and attributes each to the
innermost Python frame outside torch: the tests count those inside the ``smore`` package (the base model's own
syncs are not ours). The grouped expert path may sync exactly where it says it does (``ExpertGroups.sizes``).

On CUDA, :func:`test_no_sync_on_cuda` runs the adapters under ``torch.cuda.set_sync_debug_mode("error")``.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

import smore
from helpers import ADAPTER_CASES, adapted_tiny_llama, tiny_batch
from smore.adapters.base import AdapterWrapper, ExpertGroups, adapted_modules
from smore.errors import UserError
from smore.routing.stats import routing_health, tracking

SMORE_DIR = os.path.dirname(smore.__file__) + os.sep
TORCH_DIR = os.path.dirname(torch.__file__) + os.sep

SYNC_METHODS = {"item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__", "nonzero"}
"""Tensor methods and torch functions (by name) that read the device's data on the host."""
SYNC_FUNCTIONS = {"nonzero", "masked_select", "bincount", "unique", "unique_consecutive", "argwhere"}
SYNC_OPS = {
    "_local_scalar_dense",  # .item(), bool(), int(), float() reach the dispatcher as this
    "nonzero",  # boolean indexing and masks
    "masked_select",
    "is_nonzero",
    "equal",
    "bincount",
    "_unique2",
    "unique_consecutive",
    "unique_dim",
}
"""aten operators whose output size or value the host must read from the device."""


def _caller() -> str:
    """``file:line`` of the innermost frame outside torch and outside this file."""
    frame = sys._getframe(2)
    while frame is not None:
        name = frame.f_code.co_filename
        if not name.startswith(TORCH_DIR) and name != __file__:
            return f"{name}:{frame.f_lineno}"
        frame = frame.f_back
    return "?"


@dataclass
class SyncRecorder:
    """Records every host sync made inside the block, with the code that asked for it."""

    calls: list[tuple[str, str]] = field(default_factory=list)

    def record(self, op: str) -> None:
        self.calls.append((op, _caller()))

    def in_smore(self) -> list[tuple[str, str]]:
        return [(op, where) for op, where in self.calls if where.startswith(SMORE_DIR)]

    def __enter__(self) -> SyncRecorder:
        recorder = self

        class Functions(TorchFunctionMode):
            def __torch_function__(self, func, types, args=(), kwargs=None):
                name = getattr(func, "__name__", "")
                if name in SYNC_METHODS or name in SYNC_FUNCTIONS:
                    recorder.record(name)
                return func(*args, **(kwargs or {}))

        class Dispatch(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                name = func.overloadpacket.__name__
                repeats = name == "repeat_interleave" and isinstance(args[0], torch.Tensor) and len(args) == 1
                masked = name in ("index", "index_put", "index_put_") and any(  # boolean selection: nonzero inside
                    isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in args[1] or ()
                )
                if name in SYNC_OPS or masked or (repeats and (kwargs or {}).get("output_size") is None):
                    recorder.record(f"aten.{name}")
                return func(*args, **(kwargs or {}))

        self._modes = [Functions(), Dispatch()]
        for mode in self._modes:
            mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        for mode in reversed(self._modes):
            mode.__exit__(*exc)


def test_recorder_sees_a_sync_in_smore_and_leaves_others_out():
    """The recorder must be able to fail: a boolean selection and ``.item()`` called from smore code are caught,
    the same operations in test code are not attributed to smore."""
    from smore.routing import gates

    values, valid = torch.randn(4, 3), torch.tensor([True, False, True, True])
    with SyncRecorder() as recorder:
        values[valid].sum().item()  # this file: not smore's
        gates.cv_squared(values[valid])  # the selection is here, not in smore
    assert recorder.calls and not recorder.in_smore()
    # the same selection in code whose file is smore's (compiled with that file name) is
    code = compile("def select(v):\n    return v[v > 0].sum()\n", gates.__file__, "exec")
    namespace: dict = {}
    exec(code, namespace)
    with SyncRecorder() as recorder:
        namespace["select"](values)
    assert [op for op, _ in recorder.in_smore()] == ["aten.index"]


def _groupings(model) -> int:
    """ExpertGroups one forward builds: one per S'MoRE level of a grouped delta, one per grouped MixLoRA block."""
    total = 0
    for module in adapted_modules(model).values():
        delta = module.delta
        if getattr(delta, "expert_path", None) == "grouped":
            total += getattr(delta, "num_levels", 1)
    return total


def _allowed(calls: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """The syncs that are not the grouped path's documented one (ExpertGroups.sizes)."""
    sizes = ExpertGroups.sizes.__code__
    lines = range(sizes.co_firstlineno, sizes.co_firstlineno + 12)
    base_file = sizes.co_filename
    return [(op, where) for op, where in calls if not any(where == f"{base_file}:{line}" for line in lines)]


def _labelled_batch() -> dict[str, torch.Tensor]:
    batch = tiny_batch(batch=2, length=8)
    labels = batch["input_ids"].clone()
    labels[batch["attention_mask"] == 0] = -100
    return {**batch, "labels": labels, "num_items_in_batch": 12}


@pytest.mark.parametrize("case", ADAPTER_CASES)
def test_training_step_makes_no_host_sync_in_the_adapters(case):
    model = adapted_tiny_llama(case)
    batch = _labelled_batch()
    with SyncRecorder() as recorder:
        loss = model(**batch).loss
        forward, before_backward = recorder.in_smore(), len(recorder.calls)
        loss.backward()
    assert _allowed(forward) == [], f"host syncs in the adapters' training forward: {_allowed(forward)}"
    assert len(forward) == _groupings(model), f"the grouped path syncs once per grouping: {forward}"
    # autograd's backward runs no Python of ours: any sync there is an operator's, counted wherever it comes from
    assert recorder.calls[before_backward:] == [], f"host syncs in the backward: {recorder.calls[before_backward:]}"
    assert all(p.grad is not None for n, p in model.named_parameters() if p.requires_grad and "lora_A" in n)


@pytest.mark.parametrize("case", ADAPTER_CASES)
def test_cached_decoding_makes_no_host_sync_in_the_adapters(case):
    """A prefill and two cached decoding steps in eval mode, as ``generate`` runs them."""
    model = adapted_tiny_llama(case, train=False)
    batch = tiny_batch(batch=2, length=6)
    with torch.no_grad(), SyncRecorder() as recorder:
        out = model(**batch, use_cache=True)
        mask, cache = batch["attention_mask"], out.past_key_values  # the output keeps the old name
        token = out.logits[:, -1:].argmax(-1)
        for _ in range(2):
            mask = torch.cat([mask, torch.ones_like(token)], dim=1)
            out = model(input_ids=token, attention_mask=mask, cache=cache, use_cache=True)
            token, cache = out.logits[:, -1:].argmax(-1), out.past_key_values
    # decoding steps have too few tokens for MixLoRA's grouped path ("auto" would mask); forced, it groups
    assert _allowed(recorder.in_smore()) == [], f"host syncs in the adapters while decoding: {recorder.in_smore()}"


def test_aux_loss_reads_a_value_only_after_a_forward_without_autograd():
    """The check that a training loss kept its graph reads the value only for a forward that ran without autograd,
    and still refuses a non-zero loss from such a forward."""
    model = adapted_tiny_llama("smore-switch")
    smore.set_aux_loss_in_output(model, False)
    batch = tiny_batch()
    model(**batch)
    with SyncRecorder() as recorder:
        smore.aux_loss(model)
    assert recorder.in_smore() == []
    with torch.no_grad():
        model(**batch)
    assert not any(m.ran_with_grad for m in model.modules() if isinstance(m, AdapterWrapper))
    with pytest.raises(UserError, match="no gradient"):
        smore.aux_loss(model)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("case", [c for c in ADAPTER_CASES if c not in ("smore-grouped", "mixlora-grouped")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_no_sync_on_cuda(case, dtype):
    """Each adapter's training forward, backward and aux loss, and its eval forward, on CUDA with the sync debug
    mode raising. The adapters are called directly: the base model's own code may sync (its masks), ours may not."""
    model = adapted_tiny_llama(case).to("cuda", dtype)
    state = model.smore_state.context
    mask = torch.ones(2, 8, dtype=torch.long, device="cuda")
    mask[0, :2] = 0
    wrappers = list(adapted_modules(model).values())
    inputs = [torch.randn(2, 8, w.shape[0], device="cuda", dtype=dtype) for w in wrappers]
    if state.state is not None:  # T-REX: the prior of the call in flight
        state.state.prior = torch.rand(2, state.state.num_clusters, device="cuda")
    state.mask = mask
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        total = sum(w(x).float().square().mean() for w, x in zip(wrappers, inputs)) + smore.aux_loss(model)
        total.backward()
        model.eval()
        with torch.no_grad():
            for w, x in zip(wrappers, inputs):
                w(x[:, -1:])
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("case", ["smore-grouped", "mixlora-grouped"])
def test_grouped_path_on_cuda_bf16_needs_no_sync_and_matches_dense(case):
    """With bf16 and widths that are multiples of 8 the grouped path is one torch._grouped_mm per projection: no
    sync, and the outputs and gradients of the dense (masked) path."""
    from helpers import tiny_llama

    config = {
        "smore-grouped": smore.SMoREConfig(num_experts=[8, 8], top_k=[2, 2], ranks=[8, 8], init="normal"),
        "mixlora-grouped": smore.MixLoRAConfig(num_experts=4, top_k=2, rank=8),
    }[case]
    dense_path = "dense" if case.startswith("smore") else "masked"
    results = []
    for path in ("grouped", dense_path):
        model = smore.adapt(tiny_llama(0), config).to("cuda", torch.bfloat16).train()
        wrapper = next(iter(adapted_modules(model).values()))
        wrapper.delta.expert_path = path
        x = torch.randn(4, 16, wrapper.shape[0], device="cuda", dtype=torch.bfloat16, requires_grad=True)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error" if path == "grouped" else 0)
        try:
            y = wrapper(x)
            y.float().square().sum().backward()
        finally:
            torch.cuda.set_sync_debug_mode(0)
        results.append((y.float(), x.grad.float()))
    (y_grouped, g_grouped), (y_dense, g_dense) = results
    torch.testing.assert_close(y_grouped, y_dense, atol=5e-2, rtol=5e-2)
    torch.testing.assert_close(g_grouped, g_dense, atol=5e-2, rtol=5e-2)


def test_grouped_mm_branch_matches_the_split_branch_without_a_sync(monkeypatch):
    """The torch._grouped_mm branch of ExpertGroups (CUDA only in use; torch runs it on CPU too) against the split
    branch, with an empty group, outputs and gradients, and no host sync."""
    from smore.adapters import base

    if not hasattr(torch, "_grouped_mm"):
        pytest.skip("this torch has no _grouped_mm")
    generator = torch.Generator().manual_seed(0)
    experts = torch.tensor([2, 0, 2, 3, 0, 2, 3, 3, 0, 2, 2, 0])  # expert 1 gets no slot
    results = []
    for grouped in (True, False):
        monkeypatch.setattr(base, "_grouped_mm_fits", lambda rows, weight, grouped=grouped: grouped)
        rows = torch.randn(12, 16, generator=generator).bfloat16().requires_grad_()
        weight = torch.randn(4, 8, 16, generator=generator).bfloat16().requires_grad_()
        bias = torch.randn(4, 8, generator=generator).bfloat16().requires_grad_()
        groups = ExpertGroups(experts, 4)
        with SyncRecorder() as recorder:
            out = groups.unsort(groups.linear(groups.sort(rows), weight, bias))
        out.float().sum().backward()  # a broadcast gradient, which _grouped_mm's backward needs made contiguous
        results.append((out, rows.grad, weight.grad, bias.grad, len(recorder.in_smore())))
        generator.manual_seed(0)
    (*fast, fast_syncs), (*split, split_syncs) = results
    for got, expected in zip(fast, split):
        torch.testing.assert_close(got.float(), expected.float(), atol=0.1, rtol=0.02)
    assert (fast_syncs, split_syncs) == (0, 1)


@pytest.mark.parametrize("case", ["smore-switch", "mixlora", "hydralora"])
def test_routing_statistics_count_on_the_device_and_reach_the_host_when_read(case):
    """With routing tracked (as ``smore train`` does), a training step still makes no host sync in smore; the one
    transfer happens when the health is read."""
    model = adapted_tiny_llama(case)
    with tracking(model):
        with SyncRecorder() as recorder:
            model(**_labelled_batch()).loss.backward()
        assert recorder.in_smore() == []
        with SyncRecorder() as recorder:
            health = routing_health(model)
    assert health and recorder.in_smore(), "reading the health is where the counts come to the host"
