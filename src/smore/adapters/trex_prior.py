"""The semantic prior of T-REX (SPEC §3): a per-sample routing bias from clustered prompt embeddings.

Fit once: embed the training prompts, cluster them into K centroids (K = the number of T-REX experts). Then, for every
model call, embed each sequence's prompt the same way and use ``c = centroids · emb`` as its prior, identical for all
tokens of the sequence. The centroids are saved with the adapter, so inference reproduces the prior exactly.

The default encoder is the frozen base model itself (mean-pooled last hidden state, adapters off), so nothing extra
is downloaded. Any encoder can be plugged in: a callable ``encoder(model, input_ids, attention_mask, pool_mask)``
returning (B, d_e) embeddings (it receives the language model's token ids, so a sentence encoder with its own
tokenizer would decode them first).

When the prior is computed: once per sequence, from its prompt.

- ``model.generate(...)`` embeds the prompt once, before the first step, and holds that prior for every step, with or
  without a KV cache (so cached and uncached decoding route alike, and beams or ``num_return_sequences`` reuse their
  sequence's row). Nothing re-enters the model from inside its own forward.
- A plain forward (training, scoring) embeds its own batch; a call that continues a cached sequence (a cache of
  non-zero length, or fewer input tokens than mask columns) keeps the prior of the call that began it.
- A caller may give the prior (B, K) instead: ``with smore.use_prior(model, prior): ...``; ``smore.compute_prior``
  computes it as the model would.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterable, Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from smore.adapters.base import disable_adapters
from smore.compat import CACHE_ARGUMENTS
from smore.constants import IGNORE_INDEX
from smore.errors import UserError

logger = logging.getLogger(__name__)

Encoder = Callable[[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def base_model_encoder(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, pool_mask: torch.Tensor
) -> torch.Tensor:
    """Mean of the model's last hidden state over ``pool_mask`` (B, T) → (B, d).

    Runs the decoder stack only (``model.base_model``: its last hidden state is the causal LM's ``hidden_states[-1]``),
    which skips the vocabulary projection and never calls the top-level model, whose hooks would see this pass."""
    backbone = getattr(model, "base_model", model)
    out = backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    hidden = out.last_hidden_state.float()  # (B, T, d)
    weights = pool_mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)


def kmeans(points: torch.Tensor, k: int, *, iterations: int = 50, seed: int = 0) -> torch.Tensor:
    """Lloyd's k-means with k-means++ seeding, deterministic for a seed; (M, d) → (k, d) centroids.

    Written here (twenty lines) rather than taken from scikit-learn so that T-REX needs no SciPy stack.
    """
    if points.shape[0] < k:
        raise UserError(
            f"the semantic prior needs at least {k} prompts to form {k} clusters (one per T-REX expert), got "
            f"{points.shape[0]}; pass more training prompts to fit_prior."
        )
    generator = torch.Generator().manual_seed(seed)
    points = points.float().cpu()
    centroids = points[torch.randint(points.shape[0], (1,), generator=generator)]
    while centroids.shape[0] < k:  # k-means++: next centre with probability ∝ squared distance
        distance = torch.cdist(points, centroids).min(dim=1).values.square()
        if distance.sum() <= 0:  # fewer distinct points than clusters: repeat one
            choice = torch.randint(points.shape[0], (1,), generator=generator)
        else:
            choice = torch.multinomial(distance / distance.sum(), 1, generator=generator)
        centroids = torch.cat([centroids, points[choice]])
    for _ in range(iterations):
        assignment = torch.cdist(points, centroids).argmin(dim=1)
        updated = centroids.clone()
        for cluster in range(k):  # k is small (r1·r2); an empty cluster keeps its centre
            members = points[assignment == cluster]
            if members.shape[0]:
                updated[cluster] = members.mean(dim=0)
        if torch.allclose(updated, centroids):
            break
        centroids = updated
    return centroids


def prompt_mask(attention_mask: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
    """Tokens of each sequence's prompt: real tokens whose label is ignored; all real tokens of a sequence without
    any (plain language modelling, or inference, where the input is the prompt)."""
    real = attention_mask.bool()
    if labels is None:
        return real
    prompt = real & (labels == IGNORE_INDEX)
    return torch.where(prompt.any(dim=1, keepdim=True), prompt, real)


class SemanticPrior:
    """Centroids and encoder of one model's T-REX prior, and the prior of the model call in flight (``prior``, one
    row per sequence). It is T-REX's model-level state: the model's forward pre-hook hands it every call
    (:meth:`on_call`), and each T-REX adapter takes its tokens' rows (:meth:`prior_for`). The prior stays until the
    next model call, so a gradient-checkpointing recomputation during backward sees what the forward saw."""

    def __init__(self, num_clusters: int, encoder: Encoder | None = None) -> None:
        self.num_clusters = num_clusters
        self.encoder = encoder or base_model_encoder
        self.centroids: torch.Tensor | None = None
        self.busy = False  # True during the embedding pass, which runs through the same model
        self.given: torch.Tensor | None = None  # (B, K) held for every call: by the caller, or by generate()
        self.prior: torch.Tensor | None = None  # (B, K) of the call in flight

    def on_call(self, model: nn.Module, arguments: dict) -> None:
        """The forward pre-hook's hand-off: set the prior of this call (its arguments by name)."""
        self.prior = self.prior_for_call(model, arguments, self.prior)

    def prior_for(self, leading_shape: torch.Size) -> torch.Tensor:
        """(N, K) prior of every token: its sequence's row, for an input whose leading dims are (batch, time)."""
        prior = self.prior
        if prior is None:
            raise UserError(
                "this adapter routes with a semantic prior, but none is set: call smore.fit_prior(model, batches) "
                "on training prompts before training, or load an adapter saved with its prior."
            )
        if len(leading_shape) != 2 or leading_shape[0] != prior.shape[0]:
            raise UserError(
                f"the semantic prior holds {prior.shape[0]} sequences but the adapter sees inputs of shape "
                f"{tuple(leading_shape)}; T-REX needs (batch, time, features) inputs of the model call."
            )
        return prior.repeat_interleave(leading_shape[1], dim=0)

    def embed(
        self, model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, labels=None
    ) -> torch.Tensor:
        """L2-normalised prompt embeddings (B, d_e), computed with every adapter off and no gradient."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        pool = prompt_mask(attention_mask, labels)
        was_training = model.training
        self.busy = True
        model.eval()  # the prior must not depend on dropout: training and inference embed alike
        try:
            with torch.no_grad(), disable_adapters(model):
                embedding = self.encoder(model, input_ids, attention_mask, pool)
        finally:
            self.busy = False
            model.train(was_training)
        return F.normalize(embedding.float(), dim=-1)

    def from_embedding(self, embedding: torch.Tensor) -> torch.Tensor:
        """``c = centroids · emb`` for each sequence: (B, d_e) → (B, K)."""
        if self.centroids is None:
            raise UserError(
                "the semantic prior has no centroids yet: call smore.fit_prior(model, batches) on training prompts "
                "before training, or load an adapter saved with its prior."
            )
        if embedding.shape[-1] != self.centroids.shape[-1]:
            raise UserError(
                f"prompt embeddings have width {embedding.shape[-1]}, the prior's centroids "
                f"{self.centroids.shape[-1]}: the prior was fitted with another encoder or base model."
            )
        return embedding @ self.centroids.to(embedding.device).t()

    def compute(self, model: nn.Module, input_ids: torch.Tensor, attention_mask=None, labels=None) -> torch.Tensor:
        """The prior (B, K) of each sequence of a batch, as a model call on it would compute it."""
        return self.from_embedding(self.embed(model, input_ids, attention_mask, labels))

    def prior_for_call(self, model: nn.Module, arguments: dict, previous: torch.Tensor | None):
        """The prior of a model call: the one given or held by ``generate``, the one of the call that began a cached
        sequence, or computed from this call's prompt."""
        input_ids = arguments.get("input_ids")
        if self.given is not None:
            return _rows_for(self.given, input_ids)
        if previous is not None and continues_sequence(arguments):
            return previous
        if self.centroids is None:
            return None  # the adapter says what to do if it is used
        if input_ids is None:
            raise UserError(
                "T-REX computes its semantic prior from input_ids; call the model with input_ids, or give the prior "
                "with smore.use_prior(model, prior)."
            )
        return self.compute(model, input_ids, arguments.get("attention_mask"), arguments.get("labels"))

    @contextlib.contextmanager
    def holding(self, prior: torch.Tensor) -> Iterator[None]:
        """Every model call inside the block uses ``prior`` (B, K), one row per sequence."""
        if not isinstance(prior, torch.Tensor) or prior.dim() != 2 or prior.shape[1] != self.num_clusters:
            shape = tuple(prior.shape) if isinstance(prior, torch.Tensor) else type(prior).__name__
            raise UserError(
                f"the semantic prior must be a (batch, {self.num_clusters}) tensor, one row per sequence; got {shape}. "
                "smore.compute_prior(model, input_ids, attention_mask) gives one."
            )
        outer = self.given
        self.given = prior
        try:
            yield
        finally:
            self.given = outer

    def generate(self, model: nn.Module, generate: Callable, args: tuple, kwargs: dict):
        """``model.generate`` with the prompt's prior computed once, before the first step, and held for all."""
        if self.given is not None or self.centroids is None:
            return generate(*args, **kwargs)  # the caller's prior, or none to compute (the adapter will say so)
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        if not isinstance(input_ids, torch.Tensor):
            raise UserError(
                "T-REX's generate() computes the semantic prior from the prompt's input_ids; pass input_ids, or give "
                "the prior with smore.use_prior(model, prior)."
            )
        with self.holding(self.compute(model, input_ids, kwargs.get("attention_mask"))):
            return generate(*args, **kwargs)

    def fit(self, model: nn.Module, batches: Iterable[dict], *, seed: int = 0, iterations: int = 50) -> torch.Tensor:
        """Cluster the prompts of ``batches`` (dicts with input_ids, attention_mask and optionally labels)."""
        if isinstance(batches, Mapping):
            batches = [batches]  # one batch given as a dict
        embeddings = []
        for number, batch in enumerate(batches):
            if not isinstance(batch, Mapping) or not isinstance(batch.get("input_ids"), torch.Tensor):
                raise UserError(
                    f"fit_prior batch {number} must be a dict with an input_ids tensor (B, T), and optionally "
                    f"attention_mask and labels; got {type(batch).__name__}."
                )
            embedding = self.embed(model, batch["input_ids"], batch.get("attention_mask"), batch.get("labels"))
            embeddings.append(embedding.cpu())
        if not embeddings:
            raise UserError("fit_prior got no batches; pass the training prompts (dicts with input_ids).")
        self.centroids = kmeans(torch.cat(embeddings), self.num_clusters, iterations=iterations, seed=seed)
        logger.info(
            "semantic prior: %d centroids from %d prompts", self.num_clusters, sum(e.shape[0] for e in embeddings)
        )
        return self.centroids


def continues_sequence(arguments: Mapping) -> bool:
    """Whether a model call continues sequences begun by an earlier call (a cached decoding step)."""
    if any(_cached_length(arguments.get(name)) > 0 for name in CACHE_ARGUMENTS):
        return True
    position = arguments.get("cache_position")
    if isinstance(position, torch.Tensor) and position.numel() and int(position.reshape(-1)[0]) > 0:
        return True
    input_ids, mask = arguments.get("input_ids"), arguments.get("attention_mask")
    # The mask covers the cached tokens too: fewer new tokens than mask columns means a cache holds the rest.
    return (
        isinstance(input_ids, torch.Tensor)
        and isinstance(mask, torch.Tensor)
        and mask.dim() == 2
        and input_ids.dim() == 2
        and input_ids.shape[1] < mask.shape[1]
    )


def _rows_for(prior: torch.Tensor, input_ids: torch.Tensor | None) -> torch.Tensor:
    """The held prior's rows for a call's batch: beams and ``num_return_sequences`` repeat each sequence in place
    (HF expands the batch with ``repeat_interleave``), so each copy takes its sequence's row."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.shape[0] == prior.shape[0]:
        return prior
    batch = input_ids.shape[0]
    if batch % prior.shape[0]:
        raise UserError(
            f"the semantic prior holds {prior.shape[0]} sequences but the model was called with a batch of {batch}; "
            "give one prior row per sequence."
        )
    return prior.repeat_interleave(batch // prior.shape[0], dim=0)


def _cached_length(past) -> int:
    if past is None:
        return 0
    if hasattr(past, "get_seq_length"):
        return int(past.get_seq_length())
    try:  # legacy tuple of (key, value) per layer
        return int(past[0][0].shape[-2])
    except (TypeError, IndexError, AttributeError):
        return 0
