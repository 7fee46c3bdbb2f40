"""Import of the S'MoRE authors' checkpoints (peft fork, tuner ``hier_moe``): config mapping, state-dict layout, and
the adapted layer's output against an independent per-token computation written from their tensors (SPEC §1.2-1.3).
"""

from __future__ import annotations

import contextlib
import logging
import math
import random

import pytest
import torch
import torch.nn.functional as F

import smore
from helpers import tiny_batch, tiny_llama
from smore.analysis.params import model_report
from smore.interop import (
    adapt_from_reference,
    config_from_reference,
    export_reference_state_dict,
    load_reference_state_dict,
)
from smore.routing.gates import SwitchGate

# -- the authors' configs ------------------------------------------------------------------------------------------

PEFT_EXTRAS = dict(  # what their peft adapter_config.json carries besides the S'MoRE settings
    peft_type="HIER_MOE",
    task_type="CAUSAL_LM",
    base_model_name_or_path=None,
    revision=None,
    inference_mode=False,
    auto_mapping=None,
    moe_arch="smore",
    layer_forward_mode="subgraph",
    moe_dropout=0.0,
    init_moe_weights=True,
    bias="none",
    modules_to_save=None,
    exclude_modules=None,
    layers_to_transform=None,
    lora_scaling=None,
)


def reference_config(**overrides) -> dict:
    values = dict(
        num_experts=[3, 4],
        num_active=[2, 2],
        expert_dims=[2, 3],
        gate_dims=[8, 8],
        dim_downproj_x=8,
        gate_act_fn="relu",
        expert_act_fn="relu",
        gate_type="switch",
        gate_arch="mlp",
        init_method="w_final_zero",
        is_shared_expert_pool=False,
        activation_position="all",
        lora_alpha=None,
        balance_loss_weight=0.01,
        target_modules=["gate_proj", "up_proj", "down_proj"],
        **PEFT_EXTRAS,
    )
    values.update(overrides)
    return values


def test_peft_config_maps_every_field():
    config = config_from_reference(
        reference_config(
            num_experts=[4, 4],
            num_active=[2, 1],
            expert_dims=[8, 4],
            gate_dims=[16, 32],
            dim_downproj_x=24,
            gate_act_fn="tanh",
            expert_act_fn="prelu|0.1",
            gate_type="noisy_topk",
            init_method="eq_1_layer",
            activation_position="child_v2",
            lora_alpha=[16, 4],
            balance_loss_weight=0.02,
            target_modules=["up_proj", "down_proj"],
            layers_to_transform=[1],
        )
    )
    assert isinstance(config, smore.SMoREConfig)
    assert config.num_experts == [4, 4] and config.top_k == [2, 1] and config.ranks == [8, 4]
    assert config.router_dims == [16, 32] and config.down_proj_dim == 24
    assert config.router_activation == "tanh" and config.gate == "noisy_topk"
    assert config.activation == "prelu" and config.prelu_init == pytest.approx(0.1)
    assert config.init == "eq_1_layer" and config.activation_position == "child_v2"
    assert config.alpha == [16.0, 4.0] and config.scalings == [2.0, 1.0]
    assert config.balance_weight == pytest.approx(0.02) and not config.shared_pool
    assert config.target_modules == ["up_proj", "down_proj"] and config.layers_to_transform == [1]


def test_llama_factory_yaml_names_with_moe_prefix():
    # As their LLaMA-Factory/examples/gemma2_9b_smore_sft_peft.yaml, after yaml.safe_load; PyYAML reads 1e-2 as str.
    yaml_values = {
        "moe_arch": "smore",
        "moe_num_experts": [4, 4],
        "moe_num_active": [2, 2],
        "moe_expert_dims": [8, 8],
        "moe_gate_dims": [32],  # one entry: broadcast to every level
        "moe_dim_downproj_x": 32,
        "moe_gate_act_fn": "relu",
        "moe_gate_type": "dense",
        "moe_gate_arch": "mlp",
        "moe_expert_act_fn": "tanh",
        "moe_target_modules": ["up_proj", "down_proj", "gate_proj"],
        "moe_exclude_modules": ["mlp\\..*"],
        "moe_init_method": "eq_1_layer",
        "moe_balance_loss_weight": "1e-2",
        "moe_is_shared_expert_pool": True,
        "moe_activation_position": "child",
    }
    config = config_from_reference(yaml_values)
    assert config.num_experts == [4, 4] and config.top_k == [2, 2] and config.ranks == [8, 8]
    assert config.router_dims == [32, 32] and config.down_proj_dim == 32 and config.gate == "dense"
    assert config.activation == "tanh" and config.init == "eq_1_layer" and config.shared_pool
    assert config.activation_position == "child" and config.balance_weight == pytest.approx(0.01)
    assert config.target_modules == ["up_proj", "down_proj", "gate_proj"]
    assert config.exclude_modules == ["mlp\\..*"]  # a suffix list, in their fork as here: it excludes nothing
    assert config.alpha is None


def test_comma_strings_and_scaling_and_whole_yaml():
    config = config_from_reference(
        {
            "moe_num_experts": "4,4",
            "moe_num_active": "2, 2",
            "moe_expert_dims": "[8, 16]",
            "moe_gate_dims": "32",
            "moe_dim_downproj_x": "16",
            "moe_gate_type": "switch",
            "moe_expert_act_fn": "prelu|0.25",
            "moe_target_modules": "gate_proj,up_proj,down_proj",
            "moe_lora_scaling": [2.0],  # LLaMA-Factory: alpha = scaling * r, one entry broadcast
            "learning_rate": 1e-4,  # the rest of a LLaMA-Factory YAML
            "dataset": "arc_c",
        },
        ignore_unknown=True,
    )
    assert config.num_experts == [4, 4] and config.top_k == [2, 2] and config.ranks == [8, 16]
    assert config.router_dims == [32, 32] and config.down_proj_dim == 16
    assert config.activation == "prelu" and config.prelu_init == pytest.approx(0.25)
    assert config.target_modules == ["gate_proj", "up_proj", "down_proj"]
    assert config.alpha == [16.0, 32.0] and config.scalings == [2.0, 2.0]
    # a regex string stays a regex (peft's and our rule for one string)
    regex = r".*\.mlp\.(up|down)_proj"
    assert config_from_reference(reference_config(target_modules=regex)).target_modules == regex
    # the authors' defaults fill what a YAML leaves out
    minimal = config_from_reference(dict(num_experts=[4], num_active=[2], expert_dims=[8], gate_dims=[32]))
    assert minimal.gate == "noisy_topk" and minimal.init == "b_zero" and minimal.activation == "relu"
    assert minimal.down_proj_dim == 32


@pytest.mark.parametrize(
    "overrides, key",
    [
        (dict(gate_arch="linear"), "gate_arch"),
        (dict(gate_arch="bottom_up"), "gate_arch"),
        (dict(dim_downproj_x=2.5), "dim_downproj_x"),
        (dict(dim_downproj_x="wide"), "dim_downproj_x"),
        (dict(gate_act_fn="swish"), "gate_act_fn"),
        (dict(gate_act_fn="identity"), "gate_act_fn"),
        (dict(expert_act_fn="gelu"), "expert_act_fn"),
        (dict(expert_act_fn="prelu|abc"), "expert_act_fn"),
        (dict(gate_type="topk"), "gate_type"),
        (dict(num_active=[2]), "num_active"),
        (dict(gate_dims=[8, 8, 8]), "gate_dims"),
        (dict(expert_dims=[2, "x"]), "expert_dims"),
        (dict(lora_alpha=[1.0]), "lora_alpha"),
        (dict(balance_loss_weight="heavy"), "balance_loss_weight"),
        (dict(is_shared_expert_pool="maybe"), "is_shared_expert_pool"),
        (dict(modules_to_save=["lm_head"]), "modules_to_save"),
        (dict(moe_arch="mixlora"), "moe_arch"),
        (dict(peft_type="LORA"), "peft_type"),
        (dict(target_modules="all-linear"), "target_modules"),
        (dict(num_experts=None), "num_experts"),
        (dict(some_new_option=1), "some_new_option"),
        (dict(moe_num_experts=[5, 5]), "moe_num_experts"),  # conflicts with num_experts=[3, 4]
    ],
)
def test_bad_keys_and_values_name_the_key(overrides, key):
    with pytest.raises(ValueError, match=key):
        config_from_reference(reference_config(**overrides))


def test_layer_width_down_projection_and_unused_options(caplog):
    config = config_from_reference(reference_config(dim_downproj_x=0))
    assert config.down_proj_dim is None  # each layer's own width, resolved at adapt time
    model = smore.adapt(tiny_llama(seed=0), config)
    widths = {name: m.delta.router.down_proj.out_features for name, m in smore.adapted_modules(model).items()}
    assert widths["model.layers.0.mlp.gate_proj"] == 32 and widths["model.layers.0.mlp.down_proj"] == 64
    assert smore.summary(model).trainable == model_report(tiny_llama(seed=0), config).trainable
    router = config_from_reference(reference_config(gate_act_fn="prelu|0.1"))
    assert (router.router_activation, router.router_prelu_init) == ("prelu", 0.1)
    assert config_from_reference(reference_config(gate_act_fn="prelu")).router_activation == "prelu"
    with pytest.raises(ValueError, match=r"gate_act_fn='prelu\|x'.*must be a number"):
        config_from_reference(reference_config(gate_act_fn="prelu|x"))
    with pytest.raises(ValueError, match="gate_act_fn='gelu' is not supported; choose relu, tanh or prelu"):
        config_from_reference(reference_config(gate_act_fn="gelu"))
    with caplog.at_level(logging.WARNING, logger="smore.interop"):
        config = config_from_reference(reference_config(moe_dropout=0.1))  # declared, never applied by their layer
    assert config.num_experts == [3, 4] and "moe_dropout" in caplog.text


# -- their state-dict layout, built independently of our code ---------------------------------------------------


def reference_widths(cfg: dict) -> list[int]:
    s, r = cfg["num_experts"], cfg["expert_dims"]
    if cfg.get("is_shared_expert_pool"):
        return [0] + [s[0] * r[0]] * len(s)
    widths = [0]
    for s_l, r_l in zip(s, r):
        widths.append(widths[-1] + s_l * r_l)
    return widths


def reference_tensors(cfg: dict, d_in: int, d_out: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Random weights of one SMoREFFN in the authors' names (adapter "default"), keys relative to the module."""

    def rand(*shape, scale=1.0):
        return torch.randn(*shape, generator=generator) * scale

    s, r, d_g = cfg["num_experts"], cfg["expert_dims"], cfg["gate_dims"]
    levels, widths = len(s), reference_widths(cfg)
    down = cfg["dim_downproj_x"] if cfg["dim_downproj_x"] > 0 else d_in
    p: dict[str, torch.Tensor] = {}
    for lv in range(levels):
        if cfg.get("is_shared_expert_pool") and lv > 0:  # one pool: every level holds the same tensors
            for name in ("moe_A", "moe_A_bias", "moe_B", "moe_B_bias"):
                p[f"{name}.default.{lv}"] = p[f"{name}.default.0"]
            continue
        p[f"moe_A.default.{lv}"] = rand(s[lv], r[lv], d_in, scale=1 / math.sqrt(d_in))
        p[f"moe_A_bias.default.{lv}"] = rand(s[lv], r[lv], scale=0.3)
        p[f"moe_B.default.{lv}"] = rand(s[lv], widths[lv + 1], r[lv], scale=1 / math.sqrt(r[lv]))
        p[f"moe_B_bias.default.{lv}"] = rand(s[lv], widths[lv + 1], scale=0.3)
    for lv in range(1, levels):
        p[f"moe_W.default.{lv}"] = rand(widths[lv + 1], widths[lv], scale=1 / math.sqrt(widths[lv]))
        p[f"moe_W_bias.default.{lv}"] = rand(widths[lv + 1], scale=0.3)
    p["moe_W_final.default"] = rand(d_out, widths[-1], scale=1 / math.sqrt(widths[-1]))
    p["moe_W_final_bias.default"] = rand(d_out, scale=0.3)
    p["moe_downproj_x.default.weight"] = rand(down, d_in, scale=1 / math.sqrt(d_in))
    p["moe_downproj_x.default.bias"] = rand(down, scale=0.3)
    for lv in range(levels):
        gate_in = down + sum(d_g[lv + 1 :])
        g = f"moe_gate.default.{lv}"
        p[f"{g}.mlp.0.weight"] = rand(d_g[lv], gate_in, scale=2 / math.sqrt(gate_in))
        p[f"{g}.mlp.0.bias"] = rand(d_g[lv], scale=0.3)
        p[f"{g}.mlp.2.weight"] = rand(d_g[lv], d_g[lv], scale=2 / math.sqrt(d_g[lv]))
        p[f"{g}.mlp.2.bias"] = rand(d_g[lv], scale=0.3)
        p[f"{g}.keys"] = torch.rand(s[lv], d_g[lv], generator=generator)
        if cfg["gate_act_fn"].startswith("prelu"):
            p[f"{g}.mlp.1.weight"] = torch.rand(1, generator=generator) * 0.5
        if cfg["gate_type"] == "noisy_topk":
            p[f"{g}.weight_noise.weight"] = rand(s[lv], gate_in, scale=0.1)
    if cfg["expert_act_fn"].startswith("prelu"):
        for lv in range(levels):
            p[f"moe_expert_act_param.default.{lv}"] = torch.rand(1, generator=generator) * 0.5
    return p


def reference_cv_squared(v: torch.Tensor) -> torch.Tensor:
    """Their cv_squared: 0 for one expert, else unbiased var / (mean² + 1e-10)."""
    return torch.zeros(()) if v.shape[0] == 1 else v.var() / (v.mean() ** 2 + 1e-10)


class ReferenceSMoRE:
    """The authors' forward for one token, written straight from SPEC §1.2 Eq. 3 and §1.3, and their gates' balance
    losses read from their ``moe_gates.py`` (SMoRESwitchGate, SMoREGate), independently of our code.

    ``calls[lv]`` collects what level lv's router computed for every valid token and parent branch; ``noise``
    (training only) gives the ε each router call drew: ``noise[lv][t * F_{lv+1} + p]`` for token t and parent slot p,
    the slots of a level being numbered in the depth-first order in which :meth:`node` visits them.
    """

    def __init__(self, p: dict[str, torch.Tensor], cfg: dict, noise: dict[int, torch.Tensor] | None = None) -> None:
        self.p, self.cfg, self.noise = p, cfg, noise
        self.levels = len(cfg["num_experts"])
        self.calls: list[list[dict]] = [[] for _ in range(self.levels)]
        self.token, self.slot = 0, [0] * self.levels

    def sigma(self, t: torch.Tensor, lv: int) -> torch.Tensor:
        act = self.cfg["expert_act_fn"]
        if act == "identity":
            return t
        if act == "tanh":
            return torch.tanh(t)
        if act == "relu":
            return torch.clamp(t, min=0)
        slope = self.p[f"moe_expert_act_param.default.{lv}"]
        return torch.where(t >= 0, t, slope * t)

    def gate_act(self, t: torch.Tensor, lv: int) -> torch.Tensor:
        act = self.cfg["gate_act_fn"]
        if act == "tanh":
            return torch.tanh(t)
        if act.startswith("prelu"):
            return torch.where(t >= 0, t, self.p[f"moe_gate.default.{lv}.mlp.1.weight"] * t)
        return torch.clamp(t, min=0)

    def expert(self, x: torch.Tensor, lv: int, e: int) -> torch.Tensor:
        """U = γ (B[e] @ (A[e] @ x + a[e]) + b[e])."""
        p = self.p
        alpha = self.cfg.get("lora_alpha")
        gamma = 1.0 if alpha is None else alpha[lv] / self.cfg["expert_dims"][lv]
        hidden = p[f"moe_A.default.{lv}"][e] @ x + p[f"moe_A_bias.default.{lv}"][e]
        return gamma * (p[f"moe_B.default.{lv}"][e] @ hidden + p[f"moe_B_bias.default.{lv}"][e])

    def route(self, lv: int, z: torch.Tensor, record: bool) -> list[tuple[int, torch.Tensor, torch.Tensor]]:
        """(expert, α, key handed to the children) for the experts level lv picks for router input z."""
        p, g = self.p, f"moe_gate.default.{lv}"
        q = p[f"{g}.mlp.2.weight"] @ self.gate_act(p[f"{g}.mlp.0.weight"] @ z + p[f"{g}.mlp.0.bias"], lv)
        q = q + p[f"{g}.mlp.2.bias"]
        keys = p[f"{g}.keys"]
        s, k, gate = self.cfg["num_experts"][lv], self.cfg["num_active"][lv], self.cfg["gate_type"]
        slot, self.slot[lv] = self.slot[lv], self.slot[lv] + 1
        call: dict = {}
        if gate == "noisy_topk":
            keys = keys / keys.norm(dim=-1, keepdim=True)
            clean = keys @ (q / q.norm().clamp(min=1e-12))
            logits = clean
            if self.noise is not None:  # training: ε · (softplus(W_noise z) + 0.01)
                std = F.softplus(p[f"{g}.weight_noise.weight"] @ z) + 0.01
                logits = clean + self.noise[lv][self.token * self.slots_above(lv) + slot] * std
            top_values, top = torch.topk(logits, min(k + 1, s))
            chosen = top[:k]
            alphas = torch.softmax(logits[chosen], dim=0) if k > 1 else logits[chosen]
            scores = torch.zeros(s).scatter(0, chosen, alphas)
            if self.noise is not None:  # their load: P(j in top-k) under re-drawn noise
                normal = torch.distributions.Normal(0.0, 1.0)
                prob_in = normal.cdf((clean - top_values[-1]) / std)
                prob_out = normal.cdf((clean - top_values[-2]) / std)
                call["load"] = torch.where(logits > top_values[-1], prob_in, prob_out)
            else:  # their eval load: the gates that are positive
                call["load"] = (scores > 0).float()
            call["importance"] = scores
        elif gate == "switch":
            probs = torch.softmax(keys @ q, dim=0)
            chosen = torch.topk(probs, k).indices
            alphas = probs[chosen] / probs[chosen].sum() if k > 1 else probs[chosen]
            call["probs"], call["chosen"] = probs, chosen
        else:  # dense: every expert
            probs = torch.softmax(keys @ q, dim=0)
            chosen = torch.arange(len(probs))
            alphas = probs
        if record:
            self.calls[lv].append(call)
        return [(int(e), a, keys[e]) for e, a in zip(chosen, alphas)]

    def slots_above(self, lv: int) -> int:
        """F_{lv+1}: the parent slots of level lv per token."""
        fanouts = [
            s if self.cfg["gate_type"] == "dense" else k
            for s, k in zip(self.cfg["num_experts"], self.cfg["num_active"])
        ]
        return math.prod(fanouts[lv + 1 :])

    def node(self, x, lv: int, e: int, alpha, z: torch.Tensor, key: torch.Tensor, record: bool) -> torch.Tensor:
        """What expert e of level lv (picked with router input z) adds to its parent's sum."""
        u = self.expert(x, lv, e)
        position = self.cfg["activation_position"]
        if lv == 0:
            return alpha * (self.sigma(u, 0) if position == "all" else u)
        child_z = torch.cat([z, key])  # children's router input: the token, then every ancestor's key
        children = self.route(lv - 1, child_z, record)
        message = sum(self.node(x, lv - 1, c, a_c, child_z, key_c, record) for c, a_c, key_c in children)
        w, w_bias = self.p[f"moe_W.default.{lv}"], self.p[f"moe_W_bias.default.{lv}"]
        if position == "all":
            return alpha * self.sigma(u + w @ message + w_bias, lv)
        carried = w @ self.sigma(message, lv) + w_bias
        return alpha * u + carried if position == "child" else alpha * (u + carried)

    def delta(self, x: torch.Tensor, record: bool = False, token: int = 0) -> torch.Tensor:
        self.token, self.slot = token, [0] * self.levels
        p, top = self.p, self.levels - 1
        z = p["moe_downproj_x.default.weight"] @ x + p["moe_downproj_x.default.bias"]
        root = sum(self.node(x, top, e, a, z, key, record) for e, a, key in self.route(top, z, record))
        return p["moe_W_final.default"] @ root + p["moe_W_final_bias.default"]

    def aux(self) -> torch.Tensor:
        """Σ over levels of their gate's balance loss, over every recorded router call (valid tokens × parents)."""
        total, weight = torch.zeros(()), self.cfg["balance_loss_weight"]
        for lv, calls in enumerate(self.calls):
            s = self.cfg["num_experts"][lv]
            if self.cfg["gate_type"] == "switch":  # SMoRESwitchGate: counts and probabilities per valid row
                tokens_per_expert = sum(F.one_hot(c["chosen"], s).sum(0).float() for c in calls) / len(calls)
                score_per_expert = sum(c["probs"] for c in calls) / len(calls)
                total = total + weight * s * (tokens_per_expert * score_per_expert).sum()
            elif self.cfg["gate_type"] == "noisy_topk":  # SMoREGate
                importance = sum(c["importance"] for c in calls)
                load = sum(c["load"] for c in calls)
                total = total + weight * (reference_cv_squared(importance) + reference_cv_squared(load))
        return total


def reference_state_dict(model, cfg: dict, seed: int = 0, prefix: str = "base_model.model.") -> dict:
    """Their layout for every adapted module of ``model`` (each module its own random weights), peft prefix."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name, module in smore.adapted_modules(model).items():
        for key, tensor in reference_tensors(cfg, module.in_features, module.out_features, generator).items():
            state[f"{prefix}{name}.{key}"] = tensor
    return state


def module_params(state: dict, name: str, prefix: str = "base_model.model.") -> dict:
    head = f"{prefix}{name}."
    return {k[len(head) :]: v for k, v in state.items() if k.startswith(head)}


CASES = {
    "2lvl-switch-relu-all": dict(),
    "3lvl-switch-tanh-child-alpha": dict(
        num_experts=[3, 4, 3],
        num_active=[2, 1, 2],
        expert_dims=[2, 2, 3],
        gate_dims=[8, 6, 4],
        gate_act_fn="tanh",
        expert_act_fn="tanh",
        activation_position="child",
        lora_alpha=[4.0, 2.0, 6.0],
    ),
    "2lvl-dense-prelu-all": dict(num_experts=[3, 2], gate_type="dense", expert_act_fn="prelu|0.25"),
    "3lvl-dense-relu-child": dict(
        num_experts=[2, 3, 2],
        num_active=[1, 1, 1],
        expert_dims=[2, 1, 2],
        gate_dims=[4, 4, 4],
        gate_type="dense",
        activation_position="child",
    ),
    "2lvl-noisy-relu-all": dict(num_experts=[4, 4], num_active=[2, 1], gate_type="noisy_topk"),
    "3lvl-shared-switch-prelu-all": dict(
        num_experts=[3, 3, 3],
        num_active=[2, 1, 2],
        expert_dims=[2, 2, 2],
        gate_dims=[8, 8, 8],
        is_shared_expert_pool=True,
        expert_act_fn="prelu|0.1",
    ),
    "2lvl-shared-noisy-tanh-child": dict(
        num_experts=[4, 4],
        num_active=[1, 2],
        expert_dims=[3, 3],
        is_shared_expert_pool=True,
        gate_type="noisy_topk",
        expert_act_fn="tanh",
        activation_position="child",
    ),
    "2lvl-switch-downproj-width": dict(dim_downproj_x=0),
    # the two cases where an earlier eval load (every selection counted) differed from theirs (positive gates only)
    "1lvl-noisy-tanh-top1": dict(
        num_experts=[3], num_active=[1], expert_dims=[2], gate_dims=[8], gate_type="noisy_topk", expert_act_fn="tanh"
    ),
    "3lvl-noisy-relu-child": dict(
        num_experts=[3, 4, 2],
        num_active=[2, 2, 1],
        expert_dims=[2, 2, 2],
        gate_dims=[8, 6, 4],
        gate_type="noisy_topk",
        activation_position="child",
    ),
    "2lvl-switch-prelu-router": dict(gate_act_fn="prelu|0.1", num_active=[2, 3]),
}


def random_case(seed: int) -> dict:
    """A random valid config of theirs: 1-3 levels, any gate and activations, any fanout the gate allows."""
    rng = random.Random(seed)
    levels = rng.randint(1, 3)
    gate = rng.choice(["switch", "noisy_topk", "dense"])
    num_experts = [rng.randint(2, 4) for _ in range(levels)]
    high = (lambda s: s - 1) if gate == "noisy_topk" else (lambda s: s)
    return dict(
        num_experts=num_experts,
        num_active=[rng.randint(1, min(high(s), 2)) for s in num_experts],
        expert_dims=[rng.randint(1, 3) for _ in range(levels)],
        gate_dims=[rng.choice([4, 6, 8]) for _ in range(levels)],
        dim_downproj_x=rng.choice([0, 8]),
        gate_act_fn=rng.choice(["relu", "tanh", "prelu|0.2"]),
        expert_act_fn=rng.choice(["identity", "tanh", "relu", "prelu|0.3"]),
        gate_type=gate,
        activation_position=rng.choice(["all", "child", "child_v2"]),
        lora_alpha=rng.choice([None, [float(rng.randint(1, 6)) for _ in range(levels)]]),
        balance_loss_weight=rng.choice([0.01, 0.5]),
        init_method="normal",
    )


def run_with_layer_io(model, batch):
    """Forward ``batch``; return each adapted layer's (input, output), flattened to tokens."""
    captured, handles = {}, []
    for name, module in smore.adapted_modules(model).items():

        def hook(mod, args, output, name=name):
            captured[name] = (args[0].reshape(-1, args[0].shape[-1]), output.reshape(-1, output.shape[-1]))

        handles.append(module.register_forward_hook(hook))
    with torch.no_grad():
        model(**batch)
    for handle in handles:
        handle.remove()
    return captured


def loaded_model(cfg: dict):
    model = tiny_llama(seed=0)
    smore.adapt(model, config_from_reference(cfg))
    state = reference_state_dict(model, cfg)
    return model, state, load_reference_state_dict(model, state)


@contextlib.contextmanager
def recorded_noise():
    """Every ``torch.randn_like`` drawn inside the block (the noisy gate's ε), in order."""
    drawn: list[torch.Tensor] = []
    original = torch.randn_like

    def recording(t, *args, **kwargs):
        drawn.append(original(t, *args, **kwargs))
        return drawn[-1]

    torch.randn_like = recording
    try:
        yield drawn
    finally:
        torch.randn_like = original


def check_against_reference(model, state, cfg, *, training: bool, label: str) -> None:
    """Every adapted layer's output and balance loss equal the reference's, token by token, padding excluded. In
    training the noise our noisy gate draws is recorded and handed to the reference as its ε."""
    batch = tiny_batch(batch=2, length=6)  # row 0 is left-padded
    valid = batch["attention_mask"].reshape(-1).bool()
    model.eval()
    io = run_with_layer_io(model, batch)
    model.train(training)
    for name, module in smore.adapted_modules(model).items():
        x = io[name][0]
        with recorded_noise() as drawn, torch.no_grad():
            y = module(x.reshape(2, 6, -1)).reshape(-1, module.out_features)  # the context masks the padding
        noise = None
        if training and cfg["gate_type"] == "noisy_topk":
            levels = len(cfg["num_experts"])
            noise = {levels - 1 - i: tensor for i, tensor in enumerate(drawn)}  # the router runs top level first
        reference = ReferenceSMoRE(module_params(state, name), cfg, noise)
        with torch.no_grad():
            expected = torch.stack(
                [
                    module.base_layer(x[t]) + reference.delta(x[t], record=bool(valid[t]), token=t)
                    for t in range(x.shape[0])
                ]
            )
        # fp32: the error of an output element grows with the size of the row's largest terms, not its own value
        scale = float(expected.abs().max().clamp(min=1))
        torch.testing.assert_close(
            y, expected, rtol=1e-5, atol=2e-5 * scale, msg=lambda m, name=name: f"{label}: {name} output: {m}"
        )
        if cfg["gate_type"] != "dense":
            torch.testing.assert_close(
                module.delta.aux_loss, reference.aux(), rtol=1e-5, atol=1e-7, msg=f"{label}: {name} aux loss"
            )


@pytest.mark.parametrize("case", list(CASES))
def test_loaded_checkpoint_matches_independent_computation(case):
    cfg = reference_config(**CASES[case])
    model, state, report = loaded_model(cfg)
    modules = smore.adapted_modules(model)
    shared_levels = len(cfg["num_experts"]) - 1 if cfg["is_shared_expert_pool"] else 0
    assert report.modules == len(modules)
    assert report.tensors + report.shared_checked == len(state)
    assert report.shared_checked == len(modules) * 4 * shared_levels

    # the export is the exact inverse of the load
    exported = export_reference_state_dict(model)
    assert exported.keys() == state.keys()
    assert all(torch.equal(exported[k], state[k]) for k in state)
    for training in (False, True):
        check_against_reference(model, state, cfg, training=training, label=f"{case} training={training}")


@pytest.mark.parametrize("seed", range(12))
def test_random_configs_match_the_reference_in_training_and_eval(seed):
    cfg = reference_config(**random_case(seed))
    model, state, _ = loaded_model(cfg)
    for training in (False, True):
        check_against_reference(model, state, cfg, training=training, label=f"seed {seed} training={training}")


def test_switch_loss_counts_k_slots_per_row_as_theirs():
    """Σ_j f_j = k (SPEC §1.3 as corrected): with k = 2 the loss is twice the per-slot normalisation's."""
    gate = SwitchGate(num_experts=4, top_k=2, balance_weight=1.0)
    logits = torch.randn(10, 4)
    out = gate(logits)
    probs = logits.softmax(-1)
    share = torch.bincount(out.indices.reshape(-1), minlength=4).float() / 10
    torch.testing.assert_close(out.aux_loss, 4 * (share * probs.mean(0)).sum())
    assert share.sum() == 2


def test_export_load_round_trip_gives_identical_outputs():
    cfg = reference_config(init_method="normal", expert_act_fn="prelu|0.2", gate_type="noisy_topk", num_active=[2, 1])
    source = smore.adapt(tiny_llama(seed=0), config_from_reference(cfg))
    with torch.no_grad():  # make every tensor, biases included, distinct and non-zero
        for module in smore.adapted_modules(source).values():
            for param in module.delta.parameters():
                param.add_(torch.randn_like(param) * 0.1)
    batch = tiny_batch()
    with torch.no_grad():
        expected = source(**batch).logits
    # peft's save_pretrained form: adapter name dropped; any prefix
    for adapter_name, prefix in (("default", "base_model.model."), (None, ""), (None, "base_model.model.")):
        exported = export_reference_state_dict(source, adapter_name=adapter_name, prefix=prefix)
        torch.manual_seed(99)
        target = smore.adapt(tiny_llama(seed=0), config_from_reference(cfg))
        report = load_reference_state_dict(target, exported)
        assert report.modules == 6 and report.tensors == len(exported)
        with torch.no_grad():
            torch.testing.assert_close(target(**batch).logits, expected, rtol=0, atol=0)


def test_adapt_from_reference_in_one_call():
    cfg = reference_config()
    probe = smore.adapt(tiny_llama(seed=0), config_from_reference(cfg))
    state = reference_state_dict(probe, cfg, prefix="")
    model, report = adapt_from_reference(tiny_llama(seed=0), cfg, state)
    assert report.modules == 6
    assert torch.equal(
        model.model.layers[1].mlp.up_proj.delta.proj.bias, state["model.layers.1.mlp.up_proj.moe_W_final_bias.default"]
    )


def test_every_bad_key_is_reported_at_once_and_nothing_is_copied():
    cfg = reference_config()
    model = smore.adapt(tiny_llama(seed=0), config_from_reference(cfg))
    state = reference_state_dict(model, cfg)
    up = "base_model.model.model.layers.0.mlp.up_proj"
    del state[f"{up}.moe_B.default.1"]
    state[f"{up}.moe_gate.default.0.extra"] = torch.zeros(3)
    state[f"{up}.moe_W_final.default"] = torch.zeros(5, 5)
    state["base_model.model.model.layers.0.self_attn.q_proj.moe_A.default.0"] = torch.zeros(1)
    state["base_model.model.lm_head.weight"] = torch.zeros(1)
    before = model.model.layers[0].mlp.up_proj.delta.A.detach().clone()
    with pytest.raises(ValueError) as error:
        load_reference_state_dict(model, state)
    message = str(error.value)
    for expected in (
        "model.layers.0.mlp.up_proj' moe_B.1: missing",
        "moe_gate.default.0.extra",
        "moe_W_final: shape (5, 5) in the state dict, (64, 18) expected",
        "self_attn.q_proj.moe_A.default.0",
        "lm_head.weight",
    ):
        assert expected in message, expected
    assert torch.equal(model.model.layers[0].mlp.up_proj.delta.A, before)
    # a state dict for another adapter name is refused by name
    with pytest.raises(ValueError, match="adapter named 'other'"):
        load_reference_state_dict(model, reference_state_dict(model, cfg), adapter_name="other")


def test_shared_pool_levels_must_agree_or_be_absent():
    cfg = reference_config(num_experts=[3, 3], expert_dims=[2, 2], is_shared_expert_pool=True)
    model = smore.adapt(tiny_llama(seed=0), config_from_reference(cfg))
    state = reference_state_dict(model, cfg)
    pool = ("moe_A", "moe_A_bias", "moe_B", "moe_B_bias")
    absent = {k: v for k, v in state.items() if not any(f"{n}.default.1" in k for n in pool)}
    assert len(absent) == len(state) - 6 * 4
    assert load_reference_state_dict(model, absent).shared_checked == 0
    key = "base_model.model.model.layers.1.mlp.down_proj.moe_B_bias.default.1"
    state[key] = state[key] + 1
    with pytest.raises(ValueError, match=r"moe_B_bias\.1: differs from moe_B_bias\.0"):
        load_reference_state_dict(model, state)


def test_reference_helpers_agree_with_a_plain_lora_when_one_level():
    """Sanity of the test's own reference: one level, identity σ, switch gate is a top-k mixture of LoRAs."""
    cfg = reference_config(num_experts=[4], num_active=[2], expert_dims=[3], gate_dims=[8], expert_act_fn="identity")
    generator = torch.Generator().manual_seed(0)
    p = reference_tensors(cfg, 32, 16, generator)
    x = torch.randn(32, generator=generator)
    reference = ReferenceSMoRE(p, cfg)
    z = p["moe_downproj_x.default.weight"] @ x + p["moe_downproj_x.default.bias"]
    q = p["moe_gate.default.0.mlp.2.weight"] @ F.relu(
        p["moe_gate.default.0.mlp.0.weight"] @ z + p["moe_gate.default.0.mlp.0.bias"]
    )
    probs = torch.softmax(p["moe_gate.default.0.keys"] @ (q + p["moe_gate.default.0.mlp.2.bias"]), 0)
    top = probs.topk(2).indices
    mix = sum(
        probs[e]
        / probs[top].sum()
        * (
            p["moe_B.default.0"][e] @ (p["moe_A.default.0"][e] @ x + p["moe_A_bias.default.0"][e])
            + p["moe_B_bias.default.0"][e]
        )
        for e in top
    )
    expected = p["moe_W_final.default"] @ mix + p["moe_W_final_bias.default"]
    torch.testing.assert_close(reference.delta(x), expected)
