"""Chat-template tokenisation: chat messages → token ids with a loss mask → padded batches.

``encode(example, tokenizer, max_length)`` renders the messages (with the tokenizer's chat template when it has one)
and labels every token ``-100`` except the assistant turns' (and the end-of-turn or EOS token after each), so only
responses carry loss. ``SFTDataset`` converts and encodes a list of records (see :mod:`smore.data.formats`);
``collate`` pads a batch; ``encode_prompt`` gives the ids a model continues at evaluation, rendered exactly as in
training, and ``prompt_for`` the same for a record written for generation (its response left out).
"""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from smore.checks import is_int
from smore.constants import IGNORE_INDEX
from smore.data.formats import PLAIN_SEPARATOR, Example, Message, detect_format, prompt_example, to_examples
from smore.data.questions import TrainingFormat, trained_format
from smore.data.records import load_records
from smore.errors import UserError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

PROGRESS_MIN_RECORDS = 1000
"""Below this many records tokenising takes a moment and a progress bar is only noise."""

Segment = tuple[list[int], bool]
"""A run of token ids and whether it carries loss."""


@dataclass(frozen=True)
class _Encoded:
    input_ids: list[int]
    labels: list[int]
    truncated: bool
    fallback: str | None
    """Why the chat template's own tokens could not be used as they are (``None`` when they could)."""


def _has_chat_template(tokenizer: PreTrainedTokenizerBase) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def _tokenize(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    # No special tokens: a template writes its own BOS into the text, and the plain format adds it explicitly.
    return list(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []


def _render(tokenizer: PreTrainedTokenizerBase, messages: Sequence[Message], generation_prompt: bool) -> str:
    text = tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=generation_prompt)
    if not isinstance(text, str):
        raise TypeError(f"apply_chat_template returned {type(text).__name__}, not a string")
    return text


def _template_segments(
    messages: Sequence[Message], trained: Sequence[int], tokenizer: PreTrainedTokenizerBase
) -> tuple[list[Segment] | None, str | None]:
    """The messages rendered by the chat template, cut into prompt and response segments.

    For each trained turn i the template renders ``messages[:i]`` with the generation prompt (the response starts
    after it) and ``messages[:i+1]`` (the response and its end-of-turn marker end there); the whole conversation is
    rendered last. When each rendering's tokens are a prefix of the next one's, the cuts are exact and the ids are
    the template's own. When only the texts nest (tokens merged across a cut), the text pieces are tokenised one by
    one. When the template rewrites earlier turns (the texts do not nest) or fails, ``None``: use the plain format.
    The second value says which fallback was taken, for the warning.
    """
    cuts: list[str] = []
    try:
        for i in trained:
            cuts.append(_render(tokenizer, messages[:i], generation_prompt=True))
            cuts.append(_render(tokenizer, messages[: i + 1], generation_prompt=False))
        cuts.append(_render(tokenizer, messages, generation_prompt=False))
    except Exception as error:  # Templates raise their own errors (jinja2, raise_exception, ...) on odd input.
        return None, (
            f"the chat template failed on these messages ({type(error).__name__}: {error}); the plain format (no "
            "template) was used"
        )
    responses = [messages[i]["content"] for i in trained]
    # Between cuts[k-1] and cuts[k]: odd k is a response (+ its end-of-turn marker), even k a prompt.
    starts = ["", *cuts[:-1]]
    pieces = [cut[len(start) :] for start, cut in zip(starts, cuts)]

    ids = [_tokenize(tokenizer, cut) for cut in cuts]
    if all(current[: len(previous)] == previous for previous, current in zip([[], *ids[:-1]], ids)):
        runs = [current[len(previous) :] for previous, current in zip([[], *ids[:-1]], ids)]
        fallback = None
    elif all(cut.startswith(start) for start, cut in zip(starts, cuts)):
        runs = [_tokenize(tokenizer, piece) for piece in pieces]
        fallback = (
            "the chat template's tokens merge across a prompt/response boundary; the parts were tokenised separately"
        )
    else:
        return None, "the chat template rewrites earlier turns; the plain format (no template) was used"

    eos = tokenizer.eos_token_id
    segments: list[Segment] = []
    for k, run in enumerate(runs):
        trained = k % 2 == 1
        # A template that writes nothing after the response gives no end-of-turn token to learn: add EOS, so that
        # the model learns to stop.
        if trained and eos is not None and pieces[k].rstrip().endswith(responses[k // 2].strip()):
            run = [*run, eos]
        segments.append((run, trained))
    return segments, fallback


def _plain_segments(
    messages: Sequence[Message], trained: Sequence[int], tokenizer: PreTrainedTokenizerBase, *, raw: bool = False
) -> list[Segment]:
    """Without a chat template: BOS (when the tokenizer has one), then each turn's content tokenised on its own,
    trained turns followed by EOS (when the tokenizer has one), the others by ``PLAIN_SEPARATOR`` (by nothing when
    ``raw``: text continued as it is written, TRL's standard prompt/completion)."""
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    segments: list[Segment] = [([bos], False)] if bos is not None else []
    for i, message in enumerate(messages):
        if i in trained:
            ids = _tokenize(tokenizer, message["content"])
            segments.append(([*ids, eos] if eos is not None else ids, True))
        else:
            segments.append((_tokenize(tokenizer, message["content"] + ("" if raw else PLAIN_SEPARATOR)), False))
    return segments


def _segments(example: Example, tokenizer: PreTrainedTokenizerBase) -> tuple[list[Segment], str | None]:
    trained = example.loss_turns
    if example.raw:
        return _plain_segments(example.messages, trained, tokenizer, raw=True), None
    if _has_chat_template(tokenizer):
        segments, fallback = _template_segments(example.messages, trained, tokenizer)
        if segments is not None:
            return segments, fallback
        return _plain_segments(example.messages, trained, tokenizer), fallback
    return _plain_segments(example.messages, trained, tokenizer), None


def _check_max_length(max_length: int) -> None:
    if not is_int(max_length) or max_length < 1:
        raise UserError(f"max_length={max_length!r} must be a positive integer (tokens per example).")


def _encode(example: Example, tokenizer: PreTrainedTokenizerBase, max_length: int) -> _Encoded:
    segments, fallback = _segments(example, tokenizer)
    input_ids: list[int] = []
    labels: list[int] = []
    for ids, trained in segments:
        input_ids += ids
        labels += ids if trained else [IGNORE_INDEX] * len(ids)
    truncated = len(input_ids) > max_length
    return _Encoded(input_ids[:max_length], labels[:max_length], truncated, fallback)


def encode(example: Example, tokenizer: PreTrainedTokenizerBase, max_length: int) -> dict[str, list[int]]:
    """``input_ids``, ``attention_mask`` and ``labels`` of one example.

    ``labels`` equal ``input_ids`` on the assistant turns (with the end-of-turn token the chat template writes after
    each, or EOS when it writes none) and are ``-100`` everywhere else. With a chat template (``tokenizer.
    chat_template``) the text is the template's; without one it is BOS, the prompt and a newline, the response, EOS.

    Examples longer than ``max_length`` keep their first ``max_length`` tokens: the prompt is what a response needs,
    and cutting the start would drop the question. A warning is logged; when nothing of the response is left, every
    label is -100 (``SFTDataset`` drops such examples).
    """
    _check_max_length(max_length)
    encoded = _encode(example, tokenizer, max_length)
    if encoded.fallback:
        logger.warning("%s: %s.", example.location, encoded.fallback)
    if encoded.truncated:
        logger.warning("%s: longer than max_length=%d tokens; the end was cut.", example.location, max_length)
    return _features(encoded)


def _features(encoded: _Encoded) -> dict[str, list[int]]:
    return {
        "input_ids": encoded.input_ids,
        "attention_mask": [1] * len(encoded.input_ids),
        "labels": encoded.labels,
    }


def encode_prompt(example: Example, tokenizer: PreTrainedTokenizerBase) -> dict[str, list[int]]:
    """``input_ids`` and ``attention_mask`` for generating the example's last trained turn: the tokens ``encode``
    gives before that turn's first response token (the turns before it and the generation prompt), not truncated."""
    turns = example.loss_turns
    if not turns:
        raise UserError(f"{example.location}: the example has no assistant turn to generate.")
    last = max(turns)
    before = dataclasses.replace(example, messages=example.messages[: last + 1], trained=tuple(turns))
    segments, _ = _segments(before, tokenizer)
    final = max(k for k, (_, trained) in enumerate(segments) if trained)
    input_ids = [token for ids, _ in segments[:final] for token in ids]
    return {"input_ids": input_ids, "attention_mask": [1] * len(input_ids)}


def prompt_for(
    record: Mapping[str, Any], tokenizer: PreTrainedTokenizerBase, format: str | None = None
) -> dict[str, list[int]]:
    """``input_ids`` and ``attention_mask`` a trained model continues to answer ``record``, rendered as training
    rendered that record's prompt (the chat template or the plain format; ``instruction`` and ``input`` joined the
    same way). ``record`` is in any training format, its response may be left out (see
    :func:`~smore.data.formats.prompt_example`). Pad a batch of them with ``collate(..., padding_side="left")``."""
    return encode_prompt(prompt_example(record, format), tokenizer)


# ----------------------------------------------------------------------------------------------------------------
# Dataset and batches


class SFTDataset(Dataset):
    """Encoded examples of a list of records, built once up front (errors surface before training starts).

    Every record is converted first, so bad records anywhere fail (all of them in one error) before any tokenising;
    then each is encoded.
    Truncated examples and the ones dropped for having no response token within ``max_length`` are counted and
    reported in one warning each.
    """

    def __init__(
        self,
        records: Sequence[Mapping[str, Any]],
        tokenizer: PreTrainedTokenizerBase,
        max_length: int,
        format: str | None = None,
    ) -> None:
        _check_max_length(max_length)
        if len(records) == 0:
            raise UserError("no records to train on; the dataset is empty.")
        examples = to_examples(records, format)
        # The question format these records train, which smore train writes beside the adapter for smore eval.
        record_formats = {format} if format else {detect_format(record) for record in records}
        self.training_format = TrainingFormat(
            trained_format(record_formats, raw=all(example.raw for example in examples)),
            chat_template=_has_chat_template(tokenizer),
            record_formats=tuple(sorted(record_formats)),
        )
        self.examples: list[dict[str, list[int]]] = []
        truncated, dropped = 0, 0
        fallbacks: Counter[str] = Counter()
        progress = tqdm(examples, desc="tokenising", unit="example", disable=len(examples) < PROGRESS_MIN_RECORDS)
        for example in progress:
            encoded = _encode(example, tokenizer, max_length)
            truncated += encoded.truncated
            if encoded.fallback:
                fallbacks[encoded.fallback] += 1
            if all(label == IGNORE_INDEX for label in encoded.labels):
                dropped += 1
                continue
            self.examples.append(_features(encoded))
        for reason, count in fallbacks.items():
            logger.warning("%d of %d examples: %s.", count, len(examples), reason)
        if truncated:
            logger.warning(
                "%d of %d examples are longer than max_length=%d tokens; their ends were cut.",
                truncated,
                len(examples),
                max_length,
            )
        if dropped:
            logger.warning(
                "dropped %d of %d examples: no response token is left within max_length=%d (the prompt fills it); "
                "raise max_length to keep them.",
                dropped,
                len(examples),
                max_length,
            )
        if not self.examples:
            raise UserError(
                f"every one of the {len(examples)} examples was dropped (no response token within max_length="
                f"{max_length}); raise max_length."
            )

    @classmethod
    def from_file(
        cls, path: str | Path, tokenizer: PreTrainedTokenizerBase, max_length: int, format: str | None = None
    ) -> SFTDataset:
        """``SFTDataset(load_records(path), ...)``."""
        return cls(load_records(path), tokenizer, max_length, format)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        return self.examples[index]


def collate(
    examples: Sequence[Mapping[str, Sequence[int]]],
    pad_token_id: int | None,
    padding_side: Literal["right", "left"] = "right",
) -> dict[str, torch.Tensor]:
    """Pad a list of encoded examples to the longest into ``(batch, length)`` long tensors.

    ``input_ids`` are padded with ``pad_token_id``, ``attention_mask`` with 0 (all ones where absent) and ``labels``
    (when every example has them) with -100. Right padding is for training; left padding for generation, so that
    every row's last position is its last real token.
    """
    if not examples:
        raise UserError("collate got no examples; a batch needs at least one.")
    if pad_token_id is None:
        raise UserError(
            "pad_token_id is None: the tokenizer has no padding token. Set tokenizer.pad_token = "
            "tokenizer.eos_token (padded positions are masked out, so any token works)."
        )
    if padding_side not in ("right", "left"):
        raise UserError(f"padding_side={padding_side!r} must be 'right' or 'left'.")
    pad_values = {"input_ids": pad_token_id, "attention_mask": 0}
    if all("labels" in example for example in examples):
        pad_values["labels"] = IGNORE_INDEX
    width = max(len(example["input_ids"]) for example in examples)
    batch = {key: torch.full((len(examples), width), value, dtype=torch.long) for key, value in pad_values.items()}
    for row, example in enumerate(examples):
        n = len(example["input_ids"])
        columns = slice(0, n) if padding_side == "right" else slice(width - n, width)
        for key in pad_values:
            values = example.get(key, [1] * n) if key == "attention_mask" else example[key]
            if len(values) != n:
                raise UserError(f"example {row}: {key} has {len(values)} entries but input_ids has {n}.")
            batch[key][row, columns] = torch.as_tensor(values, dtype=torch.long)
    return batch
