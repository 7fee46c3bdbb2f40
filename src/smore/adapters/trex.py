"""T-REX (arXiv 2404.08985), SPEC §3: a mixture of rank-one experts with a semantic prior.

The LoRA factors ``A ∈ R^{r1×d_in}`` (rows a_i) and ``B ∈ R^{d_out×r2}`` (columns b_j) span r1·r2 rank-one experts
``b_j a_iᵀ`` (expert e = i·r2 + j): a quadratic number of experts from linear parameters. Per token::

    R = reshape( 32·ω·softmax(W_r x) + 4·(1−ω)·c , (r1, r2) )        c: the sample's semantic prior (smore.prior)
    Δy = g · B (Rᵀ (A x)) = g · Σ_{i,j} R_ij (a_i·x) b_j

with ``g = sigmoid(100·w_g)``, ``ω = sigmoid(100·w_ω)`` (both ½ at init), W_r zero-initialised, B = 0 (LoRA init).
"""

from __future__ import annotations

import math
import types

import torch
from torch import nn


class TREXDelta(nn.Module):
    uses_prior = True  # the wrapper hands each token its sequence's prior

    def __init__(self, *, in_features: int, out_features: int, rank_in: int, rank_out: int) -> None:
        super().__init__()
        self.rank_in, self.rank_out = rank_in, rank_out
        self.lora_A = nn.Linear(in_features, rank_in, bias=False)
        self.lora_B = nn.Linear(rank_out, out_features, bias=False)
        self.router = nn.Linear(in_features, rank_in * rank_out, bias=False)
        self.gate_logit = nn.Parameter(torch.zeros(()))  # w_g
        self.mix_logit = nn.Parameter(torch.zeros(()))  # w_ω
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        nn.init.zeros_(self.router.weight)
        self.aux_loss = None

    @property
    def num_experts(self) -> int:
        return self.rank_in * self.rank_out

    def routing(self, x: torch.Tensor, prior: torch.Tensor) -> torch.Tensor:
        """R (N, r1, r2) from tokens (N, d_in) and their priors (N, r1·r2)."""
        omega = torch.sigmoid(100 * self.mix_logit)
        mixed = 32 * omega * self.router(x).softmax(dim=-1) + 4 * (1 - omega) * prior
        return mixed.view(-1, self.rank_in, self.rank_out)

    def forward(self, x: torch.Tensor, valid: torch.Tensor | None = None, prior: torch.Tensor | None = None):
        if prior is None:
            raise ValueError("TREXDelta needs each token's semantic prior (N, r1·r2); see smore.fit_prior.")
        routing = self.routing(x, prior)
        hidden = torch.einsum("ni,nij->nj", self.lora_A(x), routing)  # (N, r2): Σ_i R_ij (a_i·x)
        return torch.sigmoid(100 * self.gate_logit) * self.lora_B(hidden)


def build_trex(config, in_features: int, out_features: int) -> TREXDelta:
    return TREXDelta(
        in_features=in_features, out_features=out_features, rank_in=config.rank_in, rank_out=config.rank_out
    )


def setup_trex_prior(model: nn.Module, config, context):
    """Attach the model-level semantic prior that every T-REX adapter of the model reads, and make
    ``model.generate`` compute it once from the prompt (see :mod:`smore.prior`). Returns what undoes it."""
    from smore.prior import SemanticPrior

    prior = context.prior_source = SemanticPrior(config.rank_in * config.rank_out)
    generate = getattr(model, "generate", None)
    if not callable(generate):
        return None

    def generate_with_prior(self, *args, **kwargs):
        return prior.generate(self, type(self).generate.__get__(self), args, kwargs)

    # An instance attribute bound to the model: deepcopy rebinds it, and the class's generate stays untouched.
    model.generate = types.MethodType(generate_with_prior, model)

    def undo() -> None:
        model.__dict__.pop("generate", None)

    return undo
