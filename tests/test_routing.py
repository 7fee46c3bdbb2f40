"""Routing against SPEC §1.3: the three gates (selection, weights, auxiliary losses computed independently with
loops), the tree router (slot layout, input widths, ancestor keys, forced routing, statistics over every parent
branch, padding) and the padding mask travelling from a real model call to every adapter."""

from __future__ import annotations

import math
import statistics

import pytest
import torch
import torch.nn.functional as F

import smore
from helpers import small_smore, tiny_batch, tiny_llama
from smore.adapters.smore import SMoREConfig
from smore.routing import DenseGate, NoisyTopKGate, SwitchGate, TreeRouter
from smore.routing.gates import cv_squared

F64 = torch.float64
GATES = ("dense", "switch", "noisy_topk")
SOFTPLUS_0 = math.log(2.0)


def assert_close(actual, expected, **kwargs) -> None:
    kwargs.setdefault("atol", 1e-12)
    kwargs.setdefault("rtol", 1e-10)
    torch.testing.assert_close(torch.as_tensor(actual, dtype=F64), torch.as_tensor(expected, dtype=F64), **kwargs)


# -- independent computations, plain Python ------------------------------------------------------------------------
def softmax_by_hand(row: list[float]) -> list[float]:
    top = max(row)
    exps = [math.exp(v - top) for v in row]
    return [e / sum(exps) for e in exps]


def switch_aux_by_hand(probs: list[list[float]], indices: list[list[int]], valid, weight: float) -> float:
    """Switch Transformer: w · s · Σ_j f_j P_j over the real rows; f_j slots routed to j per row (Σ_j f_j = k, the
    authors' and HF Mixtral's convention), P_j mean probability."""
    rows = [m for m in range(len(probs)) if valid is None or valid[m]]
    s = len(probs[0])
    counts = [0] * s
    for m in rows:
        for j in indices[m]:
            counts[j] += 1
    share = [c / len(rows) for c in counts]
    mean_prob = [sum(probs[m][j] for m in rows) / len(rows) for j in range(s)]
    return weight * s * sum(f * p for f, p in zip(share, mean_prob))


def cv2_by_hand(values: list[float]) -> float:
    if len(values) == 1:
        return 0.0
    return statistics.variance(values) / (statistics.fmean(values) ** 2 + 1e-10)


def normal_cdf(v: float) -> float:
    return 0.5 * (1.0 + math.erf(v / math.sqrt(2.0)))


def noisy_by_hand(clean, eps, std, k, valid, weight, training=True):
    """Shazeer's noisy top-k, row by row: (weights per row as {expert: α}, aux loss)."""
    s = len(clean[0])
    chosen, importance, load = [], [0.0] * s, [0.0] * s
    for m in range(len(clean)):
        noisy = [c + e * sd for c, e, sd in zip(clean[m], eps[m], std[m])] if training else list(clean[m])
        order = sorted(range(s), key=lambda j: -noisy[j])
        top = order[:k]
        alpha = softmax_by_hand([noisy[j] for j in top]) if k > 1 else [noisy[top[0]]]
        chosen.append(dict(zip(top, alpha)))
        if valid is not None and not valid[m]:
            continue
        for j, a in zip(top, alpha):
            importance[j] += a
        if training:
            threshold_in, threshold_out = noisy[order[k]], noisy[order[k - 1]]
            for j in range(s):
                threshold = threshold_in if noisy[j] > threshold_in else threshold_out
                load[j] += normal_cdf((clean[m][j] - threshold) / std[m][j])
        else:  # no noise: Shazeer's count of the positive gates (a raw logit <= 0 at k = 1 adds no load)
            for j, a in zip(top, alpha):
                load[j] += 1.0 if a > 0 else 0.0
    return chosen, weight * (cv2_by_hand(importance) + cv2_by_hand(load))


def as_dicts(indices: torch.Tensor, weights: torch.Tensor) -> list[dict[int, float]]:
    return [dict(zip(i.tolist(), w.tolist())) for i, w in zip(indices, weights)]


def assert_same_choice(actual: list[dict[int, float]], expected: list[dict[int, float]]) -> None:
    assert [sorted(a) for a in actual] == [sorted(e) for e in expected]
    for a, e in zip(actual, expected):
        for j in e:
            assert math.isclose(a[j], e[j], rel_tol=1e-10, abs_tol=1e-12), (a, e)


VALID = torch.tensor([True, False, True, True, False, True, True, True, False, True])


# -- switch ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("k", [1, 2, 3])
def test_switch_gate_takes_top_k_of_softmax(k):
    gate = SwitchGate(num_experts=5, top_k=k, balance_weight=0.1)
    logits = torch.randn(10, 5, dtype=F64)
    out = gate(logits)
    expected = []
    for row in logits.tolist():
        p = softmax_by_hand(row)
        top = sorted(range(5), key=lambda j: -p[j])[:k]
        norm = sum(p[j] for j in top) if k > 1 else 1.0  # k = 1 keeps p
        expected.append({j: p[j] / norm for j in top})
    assert out.indices.shape == out.weights.shape == (10, k)
    assert_same_choice(as_dicts(out.indices, out.weights), expected)
    assert_close(out.probs, [softmax_by_hand(row) for row in logits.tolist()])
    if k == 1:
        assert (out.weights < 1).all()  # not renormalised to 1


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("k", [1, 2, 3])
def test_switch_aux_loss_matches_direct_computation(k, masked):
    gate = SwitchGate(num_experts=5, top_k=k, balance_weight=0.3)
    logits = torch.randn(10, 5, dtype=F64)
    valid = VALID if masked else None
    out = gate(logits, valid=valid)
    probs = [softmax_by_hand(row) for row in logits.tolist()]
    expected = switch_aux_by_hand(probs, out.indices.tolist(), None if valid is None else valid.tolist(), 0.3)
    assert_close(out.aux_loss, expected)
    assert out.aux_loss > 0


@pytest.mark.parametrize("gate", ["switch", "noisy_topk"])
def test_padded_rows_do_not_count_in_gate_statistics(gate):
    kind = SwitchGate if gate == "switch" else NoisyTopKGate
    extra = {} if gate == "switch" else {"router_input_dim": 3}
    module = kind(num_experts=5, top_k=2, balance_weight=0.5, **extra).to(F64)
    logits = torch.randn(10, 5, dtype=F64)
    changed = logits.clone()
    changed[~VALID] = 10 * torch.randn(int((~VALID).sum()), 5, dtype=F64)  # only the padded rows change
    z = torch.randn(10, 3, dtype=F64)
    for training in (False, True):
        module.train(training)
        torch.manual_seed(0)
        masked = module(logits, router_input=z, valid=VALID).aux_loss
        torch.manual_seed(0)
        masked_changed = module(changed, router_input=z, valid=VALID).aux_loss
        assert_close(masked_changed, masked)
        torch.manual_seed(0)
        unmasked = module(logits, router_input=z).aux_loss
        torch.manual_seed(0)
        unmasked_changed = module(changed, router_input=z).aux_loss
        assert not torch.allclose(unmasked, unmasked_changed)  # without the mask the padded rows would count


# -- noisy top-k ----------------------------------------------------------------------------------------------------
def test_noisy_gate_scores_are_cosine():
    gate = NoisyTopKGate(num_experts=4, top_k=2, router_input_dim=3)
    query, keys = torch.randn(6, 5, dtype=F64), torch.rand(4, 5, dtype=F64)
    logits, scored_keys = gate.scores(query, keys)
    expected = [
        [sum(a * b for a, b in zip(q, k)) / (math.hypot(*q) * math.hypot(*k)) for k in keys.tolist()]
        for q in query.tolist()
    ]
    assert_close(logits, expected)
    assert_close(gate.scores(3.0 * query, 0.5 * keys)[0], logits)  # scale-free
    assert_close(scored_keys.norm(dim=-1), torch.ones(4))  # the keys handed down are the normalised ones
    assert_close(scored_keys * keys.norm(dim=-1, keepdim=True), keys)


def test_noisy_gate_is_deterministic_in_eval_and_noisy_in_training():
    gate = NoisyTopKGate(num_experts=6, top_k=2, balance_weight=0.1, router_input_dim=3).to(F64)
    assert torch.count_nonzero(gate.weight_noise.weight) == 0  # W_noise starts at 0
    logits, z = torch.randn(50, 6, dtype=F64), torch.randn(50, 3, dtype=F64)
    gate.eval()
    first, second = gate(logits, router_input=z), gate(logits, router_input=z)
    assert torch.equal(first.indices, second.indices) and torch.equal(first.weights, second.weights)
    expected, _ = noisy_by_hand(logits.tolist(), None, None, 2, None, 0.1, training=False)
    assert_same_choice(as_dicts(first.indices, first.weights), expected)  # eval: top-k of the clean logits
    gate.train()
    first, second = gate(logits, router_input=z), gate(logits, router_input=z)
    assert not torch.equal(first.weights, second.weights)


@pytest.mark.parametrize("noise_weights", ["zero", "random"])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("k", [1, 2, 3])
def test_noisy_gate_weights_and_aux_with_fixed_noise(k, masked, noise_weights, monkeypatch):
    gate = NoisyTopKGate(num_experts=5, top_k=k, balance_weight=0.2, router_input_dim=3).to(F64).train()
    if noise_weights == "random":
        with torch.no_grad():
            gate.weight_noise.weight.normal_()
    logits, z = torch.randn(10, 5, dtype=F64), torch.randn(10, 3, dtype=F64)
    eps = torch.randn(10, 5, dtype=F64)
    monkeypatch.setattr(torch, "randn_like", lambda t, **kw: eps.to(t.dtype))
    valid = VALID if masked else None
    out = gate(logits, router_input=z, valid=valid)

    w_noise = gate.weight_noise.weight.tolist()
    std = [
        [math.log1p(math.exp(sum(a * b for a, b in zip(w_row, z_row)))) + 0.01 for w_row in w_noise]
        for z_row in z.tolist()
    ]
    if noise_weights == "zero":
        assert_close(std, torch.full((10, 5), SOFTPLUS_0 + 0.01, dtype=F64))
    expected_choice, expected_aux = noisy_by_hand(
        logits.tolist(), eps.tolist(), std, k, None if valid is None else valid.tolist(), 0.2
    )
    assert_same_choice(as_dicts(out.indices, out.weights), expected_choice)
    assert_close(out.aux_loss, expected_aux, rtol=1e-5, atol=1e-7)  # the CV² is taken in float32
    assert out.aux_loss > 0


@pytest.mark.parametrize("k", [1, 2])
def test_noisy_gate_eval_aux_counts_positive_gates(k):
    gate = NoisyTopKGate(num_experts=5, top_k=k, balance_weight=0.2, router_input_dim=3).to(F64).eval()
    logits = torch.randn(10, 5, dtype=F64) - 1.5  # cosine logits can be negative: some top-1 gates are <= 0
    if k == 1:
        assert (logits.max(dim=-1).values[VALID] <= 0).any()
    out = gate(logits, router_input=torch.randn(10, 3, dtype=F64), valid=VALID)
    _, expected = noisy_by_hand(logits.tolist(), None, None, k, VALID.tolist(), 0.2, training=False)
    assert_close(out.aux_loss, expected, rtol=1e-5, atol=1e-7)


def test_cv_squared():
    assert cv_squared(torch.tensor([3.0])) == 0  # one expert: no imbalance
    assert cv_squared(torch.full((4,), 2.0)) == 0
    values = [1.0, 2.0, 4.0, 0.5]
    assert math.isclose(float(cv_squared(torch.tensor(values))), cv2_by_hand(values), rel_tol=1e-6)


# -- dense ----------------------------------------------------------------------------------------------------------
def test_dense_gate_uses_every_expert_with_softmax_and_no_aux():
    gate = DenseGate(num_experts=4, top_k=1, balance_weight=1.0)
    assert gate.fanout == 4  # top_k is ignored
    logits = torch.randn(7, 4, dtype=F64)
    out = gate(logits)
    assert torch.equal(out.indices, torch.arange(4).expand(7, 4))
    assert_close(out.weights, [softmax_by_hand(row) for row in logits.tolist()])
    assert out.aux_loss == 0


# -- the tree router ------------------------------------------------------------------------------------------------
TREE = dict(num_experts=[3, 4, 3], top_k=[2, 1, 2], router_dims=[5, 6, 7], down_proj_dim=4)


def build_router(gate: str, balance_weight: float = 0.1) -> TreeRouter:
    return TreeRouter(in_features=6, gate=gate, balance_weight=balance_weight, **TREE).to(F64)


def capture_router_inputs(router: TreeRouter) -> dict[int, torch.Tensor]:
    """Level → the input z its MLP saw in the last forward."""
    seen: dict[int, torch.Tensor] = {}
    for level, level_router in enumerate(router.levels):
        level_router.mlp.register_forward_hook(lambda m, args, out, level=level: seen.__setitem__(level, args[0]))
    return seen


def scored_keys(router: TreeRouter, gate: str) -> list[torch.Tensor]:
    return [F.normalize(lr.keys, dim=-1) if gate == "noisy_topk" else lr.keys for lr in router.levels]


def ancestor_slots(fanouts: list[int], level: int, slot: int) -> list[tuple[int, int]]:
    """(level, slot) of every ancestor of ``slot`` of ``level``, top first; the parent of slot t is t // f_ℓ."""
    chain = []
    for above in range(level + 1, len(fanouts)):
        slot //= fanouts[above - 1]
        chain.append((above, slot))
    return chain[::-1]


@pytest.mark.parametrize("gate", GATES)
def test_tree_router_shapes_follow_the_config(gate):
    config = SMoREConfig(gate=gate, ranks=[2, 2, 2], **TREE)
    router = build_router(gate).eval()
    assert router.fanouts == config.fanouts
    for level, level_router in enumerate(router.levels):
        # d_down + Σ_{j>ℓ} d_g,j
        assert level_router.mlp[0].in_features == 4 + sum(TREE["router_dims"][level + 1 :])
        assert level_router.keys.shape == (TREE["num_experts"][level], TREE["router_dims"][level])
    routing = router(torch.randn(5, 6, dtype=F64))
    assert routing.num_levels == 3
    for level in range(3):
        assert routing.indices[level].shape == routing.weights[level].shape == (5, config.slots[level])
        assert routing.probs[level].shape == (5, config.slots[level + 1], TREE["num_experts"][level])


@pytest.mark.parametrize("gate", GATES)
def test_tree_router_input_is_token_then_ancestor_keys_and_slots_are_parent_major(gate):
    router = build_router(gate).eval()
    seen = capture_router_inputs(router)
    x = torch.randn(5, 6, dtype=F64)
    with torch.no_grad():
        routing = router(x)
        keys = scored_keys(router, gate)
        down = router.down_proj(x)
        fanouts = router.fanouts
        for level in reversed(range(3)):
            parents = 1 if level == 2 else routing.indices[level + 1].shape[1]
            z_seen = seen[level].reshape(5, parents, -1)
            for n in range(5):
                for parent in range(parents):
                    # the parent's own slot is `parent` at level + 1; its ancestors above that
                    chain = [] if level == 2 else [*ancestor_slots(fanouts, level + 1, parent), (level + 1, parent)]
                    z = torch.cat([down[n], *(keys[j][routing.indices[j][n, t]] for j, t in chain)])
                    assert_close(z_seen[n, parent], z)
                    # the children of this parent sit in slots parent * f .. parent * f + f - 1, as its gate picks
                    level_router = router.levels[level]
                    logits, _ = level_router.gate.scores(level_router.mlp(z[None]), level_router.keys)
                    gate_out = level_router.gate(logits, router_input=z[None])
                    f = fanouts[level]
                    block = slice(parent * f, (parent + 1) * f)
                    assert torch.equal(routing.indices[level][n, block], gate_out.indices[0])
                    assert_close(routing.weights[level][n, block], gate_out.weights[0])


@pytest.mark.parametrize("gate", ["switch", "noisy_topk"])
def test_tree_router_respects_forced_routing(gate):
    router = build_router(gate).eval()
    seen = capture_router_inputs(router)
    config = SMoREConfig(gate=gate, ranks=[2, 2, 2], **TREE)
    x = torch.randn(5, 6, dtype=F64)
    generator = torch.Generator().manual_seed(3)
    forced = []
    for level in range(3):  # distinct children per parent, drawn at random
        s, f, parents = TREE["num_experts"][level], config.fanouts[level], config.slots[level + 1]
        rows = [torch.randperm(s, generator=generator)[:f] for _ in range(5 * parents)]
        forced.append(torch.stack(rows).reshape(5, parents * f))
    free = router(x)
    routing = router(x, forced=forced)
    assert any(not torch.equal(a, b) for a, b in zip(free.indices, forced))  # forcing does change something
    for level in range(3):
        assert torch.equal(routing.indices[level], forced[level])
    # the children's routers read the keys of the forced ancestors
    keys = scored_keys(router, gate)
    down = router.down_proj(x)
    z = seen[0].reshape(5, config.slots[1], -1)
    for n in range(5):
        for slot in range(config.slots[1]):
            top = slot // config.fanouts[1]
            expected = torch.cat([down[n], keys[2][forced[2][n, top]], keys[1][forced[1][n, slot]]])
            assert_close(z[n, slot], expected)
    if gate == "switch":  # weights are the gate's own: renormalised softmax at the forced experts
        probs = routing.probs[0].reshape(-1, 3)
        picked = probs.gather(1, forced[0].reshape(-1, 2))
        assert_close(routing.weights[0].reshape(-1, 2), picked / picked.sum(-1, keepdim=True))


@pytest.mark.parametrize("gate", GATES)
def test_ancestor_keys_reach_the_childrens_routers(gate):
    router = build_router(gate).eval()
    routing = router(torch.randn(8, 6, dtype=F64))
    weights = torch.randn_like(routing.weights[0])
    grads = torch.autograd.grad((routing.weights[0] * weights).sum(), [lr.keys for lr in router.levels])
    # level 0's weights depend on the keys of levels 1 and 2 only through the router inputs handed down
    assert grads[1].abs().sum() > 0 and grads[2].abs().sum() > 0
    assert torch.isfinite(grads[0]).all() and grads[0].abs().sum() > 0


@pytest.mark.parametrize("masked", [False, True])
def test_tree_router_aux_counts_every_parent_branch(masked):
    router = build_router("switch", balance_weight=0.3).eval()
    config = SMoREConfig(gate="switch", ranks=[2, 2, 2], **TREE)
    valid = torch.tensor([True, False, True, True, True, False]) if masked else None
    x = torch.randn(6, 6, dtype=F64)
    routing = router(x, valid)
    expected = 0.0
    for level in range(3):
        parents = config.slots[level + 1]
        probs = routing.probs[level].reshape(6 * parents, -1).tolist()
        indices = routing.indices[level].reshape(6 * parents, -1).tolist()
        rows_valid = None if valid is None else valid.repeat_interleave(parents).tolist()
        expected += switch_aux_by_hand(probs, indices, rows_valid, 0.3)
    assert_close(routing.aux_loss, expected)


@pytest.mark.parametrize("gate", ["switch", "noisy_topk"])
@pytest.mark.parametrize("masked", [False, True])
def test_forced_aux_loss_of_a_routing_is_the_routers_own(gate, masked):
    """The decode path's deferred aux loss (the gates forced to a routing's selection) sums the levels as the router
    does: the same number, to the bit."""
    router = build_router(gate, balance_weight=0.3).eval()
    valid = torch.tensor([True, False, True, True, True, False]) if masked else None
    x = torch.randn(6, 6, dtype=F64)
    logits = {}
    for level, level_router in enumerate(router.levels):
        level_router.gate.register_forward_pre_hook(lambda m, args, level=level: logits.__setitem__(level, args[0]))
    routing = router(x, valid)
    per_level = [logits[level].reshape(6, logits[level].shape[0] // 6, -1) for level in range(len(router.levels))]
    assert torch.equal(router.forced_aux_loss(per_level, list(routing.indices), valid), routing.aux_loss)


@pytest.mark.parametrize("gate", ["switch", "noisy_topk"])
def test_tree_router_aux_ignores_padded_tokens(gate):
    router = build_router(gate, balance_weight=0.5)
    valid = torch.tensor([True, False, True, True, False, True, True])
    x = torch.randn(7, 6, dtype=F64)
    changed = x.clone()
    changed[~valid] = 3 * torch.randn(2, 6, dtype=F64)
    for training in (False, True):
        router.train(training)
        losses = []
        for inputs, mask in ((x, valid), (changed, valid), (x, None), (changed, None)):
            torch.manual_seed(0)  # the same noise draw in training
            losses.append(router(inputs, mask).aux_loss)
        assert_close(losses[1], losses[0])
        assert not torch.allclose(losses[2], losses[3])


# -- through a model ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("gate", ["switch", "noisy_topk"])
def test_padding_mask_reaches_every_adapter(gate):
    model = smore.adapt(tiny_llama(), small_smore(init="normal", gate=gate))
    batch = tiny_batch()
    padded = batch["attention_mask"] == 0
    assert padded.any()
    other = dict(batch, input_ids=torch.where(padded, (batch["input_ids"] + 17) % 128, batch["input_ids"]))
    modules = smore.adapted_modules(model)
    assert modules

    def aux_per_adapter(inputs):
        with torch.no_grad():
            model(**inputs)
        return torch.stack([m.delta.aux_loss for m in modules.values()])

    assert_close(aux_per_adapter(other), aux_per_adapter(batch), atol=1e-7, rtol=1e-6)
    # the probe is sensitive: when those positions are real tokens, changing them does change the aux losses
    unmasked = dict(batch, attention_mask=torch.ones_like(batch["attention_mask"]))
    unmasked_other = dict(other, attention_mask=unmasked["attention_mask"])
    assert not torch.allclose(aux_per_adapter(unmasked), aux_per_adapter(unmasked_other))


def test_routing_health_counts_real_tokens_and_flags_collapse():
    from helpers import small_smore, tiny_batch, tiny_llama
    from smore.routing.stats import routing_counts, routing_health, tracking

    model = smore.adapt(tiny_llama(), small_smore(init="normal"))
    batch = tiny_batch()
    with tracking(model):
        model(**batch)
    health = routing_health(model)
    real = int(batch["attention_mask"].sum())
    top = next(h for h in health if h.module == "model.layers.0.mlp.up_proj" and h.level == 1)
    counts = routing_counts(model)["model.layers.0.mlp.up_proj"]  # kept by the tracker, not by the delta
    assert int(counts[1].sum()) == real * 2  # top level: f = 2 slots per real token
    assert int(counts[0].sum()) == real * 4  # bottom: 2 × 2
    assert abs(sum(top.load) - 1) < 1e-9 and 0 <= top.entropy <= 1
    model(**batch)  # outside the block nothing is counted
    assert int(counts[1].sum()) == real * 2
    counts[1] = torch.tensor([100, 0, 0, 0])
    collapsed = next(h for h in routing_health(model) if h.module == "model.layers.0.mlp.up_proj" and h.level == 1)
    assert collapsed.collapsed and collapsed.entropy == 0 and collapsed.dead_share == 0.75


def test_a_collapse_is_called_only_after_enough_slots():
    """At step 1 of a tiny run one expert may take every slot by chance: the trainer warns only on conclusive
    levels (MIN_ROUTED_PER_EXPERT slots per expert)."""
    from smore.routing.stats import MIN_ROUTED_PER_EXPERT, LevelHealth

    few = LevelHealth("m", 0, [1.0, 0.0, 0.0, 0.0], 0.0, 0.75, routed=12)
    many = LevelHealth("m", 0, [1.0, 0.0, 0.0, 0.0], 0.0, 0.75, routed=4 * MIN_ROUTED_PER_EXPERT)
    assert few.collapsed and not few.conclusive
    assert many.collapsed and many.conclusive


@pytest.mark.parametrize(
    "config",
    [
        smore.SMoREConfig(num_experts=[4, 3], top_k=[2, 2], ranks=[2, 2], router_dims=[8, 8], down_proj_dim=8),
        smore.MoLoRAConfig(num_experts=3, top_k=2, rank=2),
        smore.MixLoRAConfig(num_experts=4, top_k=2, rank=2),
    ],
    ids=["smore", "molora", "mixlora"],
)
def test_tracker_counts_what_the_layers_selected_and_stops_when_closed(config):
    """The layers expose their last selection; the tracker's device-side counts equal a bincount of its real
    tokens, summed over forwards, and nothing is counted once it is closed."""
    from smore.routing.stats import RoutingTracker, routed_deltas

    model = smore.adapt(tiny_llama(), config)
    deltas = routed_deltas(model)
    assert deltas
    expected = {}
    with RoutingTracker(model) as tracker:
        for seed in (1, 2):
            model(**tiny_batch(seed=seed))
            for name, delta in deltas.items():
                selection = delta.last_selection
                assert selection.valid is not None and not selection.valid.all()  # the batch has padding
                for level, (index, size) in enumerate(zip(selection.indices, selection.sizes)):
                    counts = torch.bincount(index[selection.valid].reshape(-1), minlength=size)
                    previous = expected.setdefault(name, {}).get(level, torch.zeros(size, dtype=torch.long))
                    expected[name][level] = previous + counts
    assert tracker.counts.keys() == expected.keys()
    for name, levels in expected.items():
        assert [c.tolist() for c in tracker.counts[name]] == [levels[i].tolist() for i in range(len(levels))]
    model(**tiny_batch(seed=3))
    for name, levels in expected.items():
        assert [c.tolist() for c in tracker.counts[name]] == [levels[i].tolist() for i in range(len(levels))]
    assert [h.module for h in tracker.health()] == [name for name in deltas for _ in expected[name]]


def _dense_model(method: str):
    """A HydraLoRA or a fitted T-REX model with random routers (not the uniform zero init)."""
    if method == "hydralora":
        model = smore.adapt(tiny_llama(), smore.HydraLoRAConfig(num_experts=3, rank=2))
    else:
        model = smore.adapt(tiny_llama(), smore.TREXConfig(rank_in=2, rank_out=2))
        smore.fit_prior(model, [tiny_batch(batch=4, length=8, seed=s) for s in (1, 2)])
    generator = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "router" in name:
                param.copy_(torch.randn(param.shape, generator=generator))
    return model


@pytest.mark.parametrize("method", ["hydralora", "trex"])
def test_dense_routers_report_their_mean_weight_per_expert(method):
    """HydraLoRA's and T-REX's routers weigh every expert for every token: the tracker sums each expert's router
    weight over the real tokens, and the health's load is that mean weight as a share, as a top-k load is."""
    from smore.routing.stats import RoutingTracker, routed_deltas

    model = _dense_model(method)
    deltas = routed_deltas(model)
    assert deltas  # the dense deltas are routed deltas too
    expected: dict[str, torch.Tensor] = {}
    with RoutingTracker(model) as tracker:
        for seed in (1, 2):
            batch = tiny_batch(seed=seed)
            model(**batch)
            for name, delta in deltas.items():
                selection = delta.last_selection
                assert selection.dense and selection.indices == () and not selection.valid.all()
                (weights,) = selection.weights
                assert weights.shape[1] == selection.sizes[0]
                torch.testing.assert_close(weights.sum(-1), torch.ones(weights.shape[0]))  # a softmax per token
                real = weights[selection.valid].sum(0)
                expected[name] = expected.get(name, torch.zeros_like(real)) + real
    for name, total in expected.items():
        torch.testing.assert_close(tracker.counts[name][0], total)
    health = {h.module: h for h in tracker.health()}
    assert health.keys() == expected.keys()
    for name, total in expected.items():
        assert health[name].load == pytest.approx((total / total.sum()).tolist(), rel=1e-5)
        assert 0 < health[name].entropy <= 1 and health[name].dead_share == 0


def test_a_dense_expert_is_dead_below_a_hundredth_of_its_balanced_share():
    from smore.routing.stats import DENSE_DEAD_SHARE, RoutingTracker

    model = _dense_model("hydralora")
    with RoutingTracker(model) as tracker:
        model(**tiny_batch())
    name = next(iter(tracker.counts))
    tracker.counts[name][0] = torch.tensor([1.0, 1.0, 2 * DENSE_DEAD_SHARE / 3 * 0.99])  # under 1 % of 1/3
    level = next(h for h in tracker.health() if h.module == name)
    assert level.dead_share == pytest.approx(1 / 3)
