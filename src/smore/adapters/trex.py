"""T-REX (arXiv 2404.08985), SPEC §3: a mixture of rank-one experts with a semantic prior.

The LoRA factors ``A ∈ R^{r1×d_in}`` (rows a_i) and ``B ∈ R^{d_out×r2}`` (columns b_j) span r1·r2 rank-one experts
``b_j a_iᵀ`` (expert e = i·r2 + j): a quadratic number of experts from linear parameters. Per token::

    R = reshape( 32·ω·softmax(W_r x) + 4·(1−ω)·c , (r1, r2) )        c: the sample's semantic prior (trex_prior.py)
    Δy = g · B (Rᵀ (A x)) = g · Σ_{i,j} R_ij (a_i·x) b_j

with ``g = sigmoid(100·w_g)``, ``ω = sigmoid(100·w_ω)`` (both ½ at init), W_r zero-initialised, B = 0 (LoRA init).
"""

from __future__ import annotations

import dataclasses
import math
import types
from collections.abc import Iterable
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from smore.adapters.method import (
    CostModel,
    Counts,
    Method,
    ModelState,
    SearchSpace,
    check_config,
    check_features,
    with_total,
)
from smore.adapters.trex_prior import SemanticPrior
from smore.checks import check_int
from smore.config import AdapterConfig
from smore.errors import UserError
from smore.routing.stats import ExpertSelection

PRIOR_KEY = "smore_prior.centroids"
"""The semantic prior's centroids in a saved adapter's weights file."""


@dataclass
class TREXConfig(AdapterConfig):
    """T-REX: rank_in·rank_out rank-one experts from LoRA factors, routed by tokens and a per-sample semantic prior
    (SPEC §3). Call ``smore.fit_prior(model, batches)`` on the training prompts before training."""

    method: ClassVar[str] = "trex"

    target_modules: list[str] | str = "all-linear"
    """Every linear layer except the output head, as the authors; or suffixes / a regex as for other methods."""
    rank_in: int = 4
    """r1: rows of A, i.e. the down-projection rank."""
    rank_out: int = 8
    """r2: columns of B; rank_in·rank_out experts (and prior clusters)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("rank_in", self.rank_in)
        check_int("rank_out", self.rank_out)


class TREXDelta(nn.Module):
    """``Δy = g · B (Rᵀ (A x))`` for one linear layer; each token's prior comes from the model call (the wrapper
    asks :meth:`call_inputs`)."""

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
        self.last_selection: ExpertSelection | None = None  # the last forward's token-router weights (RoutedDelta)

    @property
    def num_experts(self) -> int:
        return self.rank_in * self.rank_out

    def routing(self, x: torch.Tensor, prior: torch.Tensor, token_weights: torch.Tensor | None = None) -> torch.Tensor:
        """R (N, r1, r2) from tokens (N, d_in) and their priors (N, r1·r2); ``token_weights``: the router's
        ``softmax(W_r x)`` when the caller already has it."""
        omega = torch.sigmoid(100 * self.mix_logit)
        if token_weights is None:
            token_weights = self.router(x).softmax(dim=-1)
        mixed = 32 * omega * token_weights + 4 * (1 - omega) * prior
        return mixed.view(-1, self.rank_in, self.rank_out)

    @staticmethod
    def call_inputs(context, leading_shape: torch.Size, dtype: torch.dtype) -> dict:
        """Each token's semantic prior (N, r1·r2): its sequence's row of the model call's prior."""
        return {"prior": context.state.prior_for(leading_shape).to(dtype)}

    def forward(self, x: torch.Tensor, valid: torch.Tensor | None = None, prior: torch.Tensor | None = None):
        if prior is None:
            raise UserError("TREXDelta needs each token's semantic prior (N, r1·r2); see smore.fit_prior.")
        token_weights = self.router(x).softmax(dim=-1)
        # The routing statistics read the learned token router's softmax over the r1·r2 experts; the prior's term is
        # left out: it is fixed by the clustering, and a similarity that can be negative is no share of the load.
        self.last_selection = ExpertSelection((), (self.num_experts,), valid, weights=(token_weights.detach(),))
        routing = self.routing(x, prior, token_weights)
        hidden = torch.einsum("ni,nij->nj", self.lora_A(x), routing)  # (N, r2): Σ_i R_ij (a_i·x)
        return torch.sigmoid(100 * self.gate_logit) * self.lora_B(hidden)


def build_trex(config, in_features: int, out_features: int) -> TREXDelta:
    return TREXDelta(
        in_features=in_features, out_features=out_features, rank_in=config.rank_in, rank_out=config.rank_out
    )


def trex_parameter_counts(config: TREXConfig, in_features: int, out_features: int) -> Counts:
    """T-REX (SPEC §3): ``A`` r1 d_in, ``B`` r2 d_out, the token router ``d_in r1 r2`` and the two gate scalars."""
    config = check_config(config, TREXConfig)
    check_features(in_features, out_features)
    r1, r2 = config.rank_in, config.rank_out
    return with_total({"A": r1 * in_features, "B": r2 * out_features, "router": in_features * r1 * r2, "gates": 2})


def trex_flops_per_token(config: TREXConfig, in_features: int, out_features: int) -> Counts:
    """Multiply-adds per token: ``A x`` d_in r1, the router d_in r1 r2, the mix ``Rᵀ(Ax)`` r1 r2, ``B`` r2 d_out.

    The semantic prior adds one forward of the frozen encoder per sequence (not per layer), left out here."""
    config = check_config(config, TREXConfig)
    check_features(in_features, out_features)
    r1, r2 = config.rank_in, config.rank_out
    counts = {"A": in_features * r1, "router": in_features * r1 * r2, "mix": r1 * r2, "B": r2 * out_features}
    return with_total(counts)


# -- the model-level state: one semantic prior for every T-REX adapter of a model ----------------------------------


def attach_prior(model: nn.Module, config: TREXConfig, context):
    """Attach the model-level semantic prior that every T-REX adapter of the model reads, and make
    ``model.generate`` compute it once from the prompt (see :mod:`smore.adapters.trex_prior`). Returns what undoes
    it."""
    prior = context.state = SemanticPrior(config.rank_in * config.rank_out)
    if not callable(getattr(model, "generate", None)):
        return None

    def generate_with_prior(self, *args, **kwargs):
        return prior.generate(self, type(self).generate.__get__(self), args, kwargs)

    # An instance attribute bound to the model: deepcopy rebinds it, and the class's generate stays untouched.
    model.generate = types.MethodType(generate_with_prior, model)

    def undo() -> None:
        model.__dict__.pop("generate", None)

    return undo


def prior_tensors(context) -> dict[str, torch.Tensor]:
    """What a saved adapter holds besides the weights: the centroids, so inference reproduces the prior."""
    if context.state.centroids is None:
        raise UserError(
            "this trex adapter has no semantic prior yet; call smore.fit_prior(model, batches) before saving, so that "
            "inference can reproduce the prior."
        )
    return {PRIOR_KEY: context.state.centroids.detach().contiguous().cpu()}


def restore_prior(context, tensors: dict[str, torch.Tensor]) -> None:
    if PRIOR_KEY not in tensors:
        raise UserError(f"the adapter's weights hold no {PRIOR_KEY}: the trex adapter lacks its prior.")
    context.state.centroids = tensors.pop(PRIOR_KEY)


def _semantic_prior(model: nn.Module) -> SemanticPrior:
    state = getattr(model, "smore_state", None)
    if state is None:
        raise UserError("this model carries no smore adapter; call smore.adapt(model, config) first.")
    if not isinstance(state.context.state, SemanticPrior):
        raise UserError(
            f"method {state.config.method!r} has no semantic prior: only T-REX has one, and only T-REX needs fit_prior."
        )
    return state.context.state


def fit_prior(model: nn.Module, batches, *, seed: int = 0, iterations: int = 50) -> torch.Tensor:
    """Fit the semantic prior of a T-REX adapter on training prompts: ``batches`` yields dicts with ``input_ids``,
    ``attention_mask`` and optionally ``labels`` (-100 marks prompt tokens). Returns the (K, d_e) centroids."""
    return _semantic_prior(model).fit(model, batches, seed=seed, iterations=iterations)


def compute_prior(model: nn.Module, input_ids: torch.Tensor, attention_mask=None, labels=None) -> torch.Tensor:
    """The T-REX semantic prior (B, K) of each sequence of a batch, as a model call on it computes it (the prompt's
    embedding against the fitted centroids; ``labels`` of -100 mark the prompt)."""
    return _semantic_prior(model).compute(model, input_ids, attention_mask, labels)


def use_prior(model: nn.Module, prior: torch.Tensor):
    """A context manager: inside it every call of the T-REX ``model`` (forward and ``generate``) routes with
    ``prior`` (B, K), one row per sequence, instead of computing it: e.g. a prior from another encoder, or one
    computed once for many calls. Beams and ``num_return_sequences`` take their sequence's row."""
    return _semantic_prior(model).holding(prior)


def _prepare(model: nn.Module, batches: Iterable[dict], seed: int) -> None:
    fit_prior(model, batches, seed=seed)  # cluster the training prompts once, before the first step


def check_prior_data(config: TREXConfig, num_records: int) -> None:
    """The prior clusters the training prompts into rank_in·rank_out groups, one per expert: it needs at least as
    many prompts (one per record) as experts. Checked before the model loads, with the change to make."""
    experts = config.rank_in * config.rank_out
    if num_records >= experts:
        return
    if num_records >= config.rank_in:
        smaller = f"adapter.rank_out={num_records // config.rank_in} (rank_in={config.rank_in})"
    else:
        smaller = f"adapter.rank_in=1 adapter.rank_out={num_records}"
    raise UserError(
        f"adapter: trex with rank_in={config.rank_in} × rank_out={config.rank_out} = {experts} experts clusters the "
        f"training prompts into {experts} groups (its semantic prior), but the training data has {num_records} "
        f"records; use fewer experts, e.g. {smaller}, or train on at least {experts} records."
    )


METHOD = Method(
    name="trex",
    config_class=TREXConfig,
    build=build_trex,
    costs=CostModel(trex_parameter_counts, trex_parameter_counts, trex_flops_per_token),
    search=SearchSpace(
        # T-REX adapts every linear layer by default; here it goes where the others go, the FFN projections.
        default=lambda: TREXConfig(target_modules=["gate_proj", "up_proj", "down_proj"]),
        resize=lambda c, r: dataclasses.replace(c, rank_out=r),
        describe=lambda c: f"r1={c.rank_in} r2={c.rank_out}",
        gamma=lambda c: 1,  # a dense mixture of every rank-one expert: one structure, as HydraLoRA
        variants=lambda c: [[dataclasses.replace(c, rank_in=r)] for r in (2, 8, 1, 16) if r != c.rank_in],
    ),
    state=ModelState(
        attach=attach_prior,
        tensors=prior_tensors,
        restore=restore_prior,
        prepare=_prepare,
        check_data=check_prior_data,
    ),
)
