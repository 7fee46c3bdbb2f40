"""The three gates of S'MoRE (SPEC §1.3): they turn router logits into a selection, mixing weights and an auxiliary
load-balancing loss. The same gates serve the flat mixtures (MoLoRA, HydraLoRA), which feed them ``W_g x``.

``scores(query, keys)`` makes the logits (dot product, or cosine for the noisy gate) and returns the keys as they
were scored, since S'MoRE hands exactly those keys down to the children's routers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from smore.errors import UserError
from smore.routing.types import GateOutput

# Padding never counts in routing statistics. The padded rows are weighted by 0 rather than dropped: selecting the
# rows of a boolean mask (``tensor[valid]``) asks the device how many there are, a host sync per gate and forward,
# and gives torch.compile a shape that depends on the data.


def _valid_rows_only(tensor: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """``tensor`` (M, …) with the rows of padding tokens set to 0 (``where``, so no value of a padded row leaks)."""
    if valid is None:
        return tensor
    return torch.where(valid.view(-1, *([1] * (tensor.dim() - 1))), tensor, tensor.new_zeros(()))


def _valid_sum(tensor: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """Σ over the real rows of ``tensor`` (M, s): (s,)."""
    return _valid_rows_only(tensor, valid).sum(dim=0)


def _valid_count(valid: torch.Tensor | None, rows: int, like: torch.Tensor) -> torch.Tensor | int:
    """How many of the M rows are real: a 0-dim tensor of ``like``'s dtype (never read on the host), or M."""
    return rows if valid is None else valid.sum().to(like.dtype)


def cv_squared(values: torch.Tensor) -> torch.Tensor:
    """Squared coefficient of variation var/mean² (unbiased var, eps 1e-10), 0 for a single expert (Shazeer 2017)."""
    if values.numel() <= 1:
        return values.new_zeros(())
    values = values.to(torch.promote_types(values.dtype, torch.float32))
    return values.var() / (values.mean() ** 2 + 1e-10)


class Gate(nn.Module):
    """Base gate: dot-product scores; subclasses pick experts and define the auxiliary loss."""

    def __init__(self, *, num_experts: int, top_k: int, balance_weight: float = 0.0) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.top_k = top_k
        self.balance_weight = balance_weight

    @property
    def fanout(self) -> int:
        """Experts picked per query."""
        return self.top_k

    def scores(self, query: torch.Tensor, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits (M, s) of queries (M, d_g) against keys (s, d_g), and the keys as scored."""
        return query @ keys.t(), keys

    def forward(
        self,
        logits: torch.Tensor,
        *,
        router_input: torch.Tensor | None = None,
        valid: torch.Tensor | None = None,
        forced: torch.Tensor | None = None,
    ) -> GateOutput:
        """Select experts for logits (M, s). ``valid`` (M,) masks padding out of the statistics; ``forced`` (M, k)
        imposes the selection (used to enumerate routing trees) while weights are still computed by the gate."""
        raise NotImplementedError


class DenseGate(Gate):
    """Every expert, weighted by the softmax of the logits; no auxiliary loss (top_k is not used)."""

    @property
    def fanout(self) -> int:
        return self.num_experts

    def forward(self, logits, *, router_input=None, valid=None, forced=None) -> GateOutput:
        probs = logits.softmax(dim=-1)
        indices = torch.arange(self.num_experts, device=logits.device).expand_as(probs)
        return GateOutput(indices=indices, weights=probs, probs=probs, aux_loss=logits.new_zeros(()))


class SwitchGate(Gate):
    """Top-k of the softmax, renormalised when k > 1; Switch Transformer loss ``w · s · Σ_j f_j P_j``.

    Over the M valid rows (tokens × parent branches): ``f_j`` = slots routed to j / M, so Σ_j f_j = k, and ``P_j`` =
    Σ p_j / M (SPEC §1.3). That is the authors' S'MoRE gate and HF Mixtral's top-k loss (MixLoRA's), so a
    ``balance_weight`` means here what it means in their configs.

    With k = 1 the weight stays p (so the router gets a gradient), unless ``renormalize_top1`` asks for weight 1
    as MixLoRA does.
    """

    def __init__(
        self, *, num_experts: int, top_k: int, balance_weight: float = 0.0, renormalize_top1: bool = False
    ) -> None:
        super().__init__(num_experts=num_experts, top_k=top_k, balance_weight=balance_weight)
        self.renormalize = top_k > 1 or renormalize_top1

    def forward(self, logits, *, router_input=None, valid=None, forced=None) -> GateOutput:
        probs = logits.softmax(dim=-1)  # (M, s)
        if forced is None:
            weights, indices = probs.topk(self.top_k, dim=-1)  # (M, k) each: p of the selection, the selection
        else:
            indices, weights = forced, probs.gather(-1, forced)
        if self.renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return GateOutput(indices=indices, weights=weights, probs=probs, aux_loss=self._aux(probs, indices, valid))

    def _aux(self, probs: torch.Tensor, indices: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
        if self.balance_weight == 0:
            return probs.new_zeros(())
        slot_weights = _valid_rows_only(torch.ones_like(indices, dtype=probs.dtype), valid)  # 1 per real slot
        counts = torch.zeros(self.num_experts, device=probs.device, dtype=probs.dtype)
        counts.scatter_add_(0, indices.reshape(-1), slot_weights.reshape(-1))
        rows = _valid_count(valid, indices.shape[0], probs)
        if torch.is_tensor(rows):
            rows = rows.clamp(min=1)  # no real row: counts and sums are 0, and so is the loss
        share = counts / rows  # f_j: slots sent to expert j per row, Σ_j f_j = k
        mean_prob = _valid_sum(probs, valid) / rows  # P_j
        return self.balance_weight * self.num_experts * (share * mean_prob).sum()


class NoisyTopKGate(Gate):
    """Shazeer's noisy top-k on cosine logits; loss ``w · (CV²(importance) + CV²(load))``.

    In training the logits get ``ε · (softplus(W_noise z) + 0.01)``; ``W_noise`` starts at 0. α is the softmax over the
    k selected noisy logits (for k = 1, the selected logit itself).
    """

    def __init__(self, *, num_experts: int, top_k: int, balance_weight: float = 0.0, router_input_dim: int) -> None:
        super().__init__(num_experts=num_experts, top_k=top_k, balance_weight=balance_weight)
        self.weight_noise = nn.Linear(router_input_dim, num_experts, bias=False)
        nn.init.zeros_(self.weight_noise.weight)

    def scores(self, query, keys):
        keys = F.normalize(keys, dim=-1)
        return F.normalize(query, dim=-1) @ keys.t(), keys

    def forward(self, logits, *, router_input=None, valid=None, forced=None) -> GateOutput:
        noisy, noise_std = logits, None
        if self.training:
            if router_input is None:
                raise UserError("NoisyTopKGate needs router_input in training to compute its noise scale.")
            noise_std = F.softplus(self.weight_noise(router_input)) + 0.01
            noisy = logits + torch.randn_like(logits) * noise_std
        top = noisy.topk(min(self.top_k + 1, self.num_experts), dim=-1)
        indices = top.indices[:, : self.top_k] if forced is None else forced
        chosen = noisy.gather(-1, indices)
        weights = chosen.softmax(dim=-1) if self.top_k > 1 else chosen
        gates = torch.zeros_like(logits).scatter(-1, indices, weights)  # (M, s)
        aux = self._aux(gates, logits, noisy, noise_std, top.values, valid)
        return GateOutput(indices=indices, weights=weights, probs=gates, aux_loss=aux)

    def _aux(self, gates, clean, noisy, noise_std, top_values, valid) -> torch.Tensor:
        if self.balance_weight == 0:
            return gates.new_zeros(())
        importance = _valid_sum(gates, valid)
        if noise_std is not None and self.top_k < self.num_experts:
            load = _valid_sum(self._prob_in_top_k(clean, noisy, noise_std, top_values), valid)
        else:  # no noise (eval): Shazeer's count of the gates that are positive, as the authors' gate counts it;
            # with k = 1 the gate is the raw cosine logit, so a selection with a logit <= 0 adds no load.
            load = _valid_sum((gates > 0).to(gates.dtype), valid)
        return self.balance_weight * (cv_squared(importance) + cv_squared(load))

    def _prob_in_top_k(self, clean, noisy, noise_std, top_values) -> torch.Tensor:
        """Smooth P(expert j in top-k) under re-drawn noise, from the (k+1)-th and k-th noisy logits (Shazeer)."""
        threshold_if_in = top_values[:, self.top_k : self.top_k + 1]
        threshold_if_out = top_values[:, self.top_k - 1 : self.top_k]
        # The standard normal CDF as one function: torch.distributions.Normal validates its arguments, a host sync.
        prob_if_in = torch.special.ndtr((clean - threshold_if_in) / noise_std)
        prob_if_out = torch.special.ndtr((clean - threshold_if_out) / noise_std)
        return torch.where(noisy > threshold_if_in, prob_if_in, prob_if_out)


GATES: dict[str, type[Gate]] = {"dense": DenseGate, "switch": SwitchGate, "noisy_topk": NoisyTopKGate}


def build_gate(gate: str, *, num_experts: int, top_k: int, balance_weight: float, router_input_dim: int) -> Gate:
    """Gate by name from the registry ``GATES``."""
    if gate not in GATES:
        raise UserError(f"gate={gate!r} is unknown; choose one of {sorted(GATES)}.")
    kwargs = {"num_experts": num_experts, "top_k": top_k, "balance_weight": balance_weight}
    if gate == "noisy_topk":
        kwargs["router_input_dim"] = router_input_dim
    return GATES[gate](**kwargs)
