"""``recompute`` (SMoREDelta.forward): the router and the tree rerun in backward under a checkpoint. Outputs, aux
loss, routing and every gradient equal the saving forward's; the noisy gate replays its noise; autograd saves fewer
bytes; evaluation never recomputes."""

from __future__ import annotations

import copy

import pytest
import torch

from helpers import F64, GATES, assert_close, make_delta, randomize_biases_


def pair(levels: int, gate: str, path: str, shared_pool: bool):
    torch.manual_seed(0)
    on = make_delta(levels, gate=gate, shared_pool=shared_pool, activation="prelu")
    randomize_biases_(on)
    on.expert_path = path
    off = copy.deepcopy(on)
    on.recompute, off.recompute = True, False
    return on.train(), off.train()


def step(delta, x: torch.Tensor, valid: torch.Tensor):
    x = x.clone().requires_grad_(True)
    torch.manual_seed(7)  # the noisy gate's noise
    out = delta(x, valid)
    aux, selection = delta.aux_loss, delta.last_selection
    (out.square().sum() + out.sum() + aux).backward()
    assert delta.aux_loss is aux and delta.last_selection is selection  # backward's rerun sets nothing
    grads = {name: p.grad for name, p in delta.named_parameters()}
    return out.detach(), aux.detach(), selection.indices, grads, x.grad


@pytest.mark.parametrize("levels", [2, 3])
@pytest.mark.parametrize("shared_pool", [False, True])
@pytest.mark.parametrize("path", ["dense", "grouped"])
@pytest.mark.parametrize("gate", GATES)
def test_recompute_gives_the_same_outputs_and_gradients(gate, path, shared_pool, levels):
    on, off = pair(levels, gate, path, shared_pool)
    x = torch.randn(9, on.in_features, dtype=F64, generator=torch.Generator().manual_seed(3))
    valid = torch.ones(9, dtype=torch.bool)
    valid[:2] = False
    out_on, aux_on, idx_on, grads_on, xg_on = step(on, x, valid)
    out_off, aux_off, idx_off, grads_off, xg_off = step(off, x, valid)
    assert_close(out_on, out_off)
    assert_close(aux_on, aux_off)
    for a, b in zip(idx_on, idx_off):
        assert torch.equal(a, b)
    assert_close(xg_on, xg_off)
    for name, grad in grads_off.items():
        if grad is None:
            assert grads_on[name] is None, name
        else:
            assert_close(grads_on[name], grad, msg=name)


def test_noisy_gate_replays_its_noise_in_backward():
    on, _ = pair(2, "noisy_topk", "dense", False)
    seen = []
    on.router.register_forward_hook(lambda module, args, out: seen.append(out))
    x = torch.randn(16, on.in_features, dtype=F64)
    torch.manual_seed(11)
    on(x).sum().backward()
    assert len(seen) == 2  # the forward, then backward's rerun
    for first, again in zip(seen[0].indices + seen[0].weights, seen[1].indices + seen[1].weights):
        assert torch.equal(first, again)


def saved_bytes(fn) -> int:
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(storages.values())


@pytest.mark.parametrize("gate", GATES)
def test_recompute_saves_fewer_bytes(gate):
    on, off = pair(2, gate, "dense", False)
    x = torch.randn(64, on.in_features, dtype=F64)
    assert saved_bytes(lambda: on(x)) < saved_bytes(lambda: off(x))


def test_eval_and_no_grad_never_recompute(monkeypatch):
    on, _ = pair(2, "switch", "dense", False)
    calls = []
    monkeypatch.setattr("smore.adapters.smore.checkpoint", lambda *a, **k: [calls.append(1), 1 / 0])
    x = torch.randn(5, on.in_features, dtype=F64)
    with torch.no_grad():
        on(x)
    on.eval()
    on(x)
    assert not calls
    on.train()
    with pytest.raises(ZeroDivisionError):  # the training forward is the one that checkpoints
        on(x)


def test_composes_with_hf_gradient_checkpointing():
    import smore
    from helpers import small_smore, tiny_batch, tiny_llama
    from smore.compat import enable_checkpointing

    results = []
    for recompute, hf in ((False, False), (True, False), (True, True)):
        model = smore.adapt(tiny_llama(0), small_smore(recompute=recompute, init="normal")).train()
        if hf:
            enable_checkpointing(model, use_reentrant=False)
        batch = tiny_batch()
        loss = model(**batch, labels=batch["input_ids"]).loss
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        results.append((loss.detach(), grads))
    for loss, grads in results[1:]:
        torch.testing.assert_close(loss, results[0][0])
        for name, grad in grads.items():
            torch.testing.assert_close(grad, results[0][1][name], msg=name)
