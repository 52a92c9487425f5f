"""Per-task output constraints (whisper's LogitFilter pattern) and stop tokens.

The authors' code decodes unconstrained and regex-parses strings afterwards; here TTS/VC can only
emit semantic tokens and the end token, and ASR only text and its end tokens.
"""

from __future__ import annotations

import torch
from torch import Tensor

from gpa.config import Task
from gpa.vocab import Vocab


class LogitFilter:
    """Edits (B, V) logits in place given the tokens generated so far."""

    supports_ids = False  # True: :meth:`apply_ids` works on logits over a subset of the vocabulary

    def apply(self, logits: Tensor, num_generated: int) -> None:
        raise NotImplementedError

    def apply_ids(self, logits: Tensor, ids: Tensor, num_generated: int) -> None:
        """:meth:`apply` on (B, K) logits whose columns are the vocabulary ids ``ids`` (K,)."""
        raise NotImplementedError


class AllowedIds(LogitFilter):
    """Everything outside an allowed id set becomes -inf."""

    def __init__(self, allowed: Tensor) -> None:
        self.allowed = allowed  # (V,) bool
        self._blocked = ~allowed

    supports_ids = True

    def apply(self, logits: Tensor, num_generated: int) -> None:
        logits.masked_fill_(self._blocked.to(logits.device), float("-inf"))

    def apply_ids(self, logits: Tensor, ids: Tensor, num_generated: int) -> None:
        logits.masked_fill_(self._blocked.to(logits.device)[ids], float("-inf"))


class SuppressAtStart(LogitFilter):
    """Forbid some ids for the first ``steps`` tokens (e.g. ending audio before any audio)."""

    def __init__(self, ids: list[int], steps: int = 1) -> None:
        self.ids, self.steps = ids, steps

    supports_ids = True

    def apply(self, logits: Tensor, num_generated: int) -> None:
        if num_generated < self.steps:
            logits[:, self.ids] = float("-inf")

    def apply_ids(self, logits: Tensor, ids: Tensor, num_generated: int) -> None:
        if num_generated < self.steps:
            logits.masked_fill_(torch.isin(ids, torch.tensor(self.ids, device=ids.device)), float("-inf"))


def allowed_ids(vocab: Vocab, task: Task, lm_vocab_size: int) -> Tensor:
    """(lm_vocab_size,) bool mask of the ids ``task`` may emit."""
    mask = torch.zeros(lm_vocab_size, dtype=torch.bool)
    if task is Task.ASR:
        mask[: vocab.text_size] = True
        mask[[vocab.end_content, vocab.end]] = True
    else:
        mask[vocab.semantic.offset : vocab.semantic.stop] = True
        mask[vocab.end] = True
    return mask


def task_filters(vocab: Vocab, task: Task, lm_vocab_size: int, allowed: Tensor | None = None) -> list[LogitFilter]:
    """The constraints a task's output obeys (``allowed``: its :func:`allowed_ids`, if already built)."""
    # <|im_end|> never comes first: audio needs at least one token, and ASR text closes with
    # <|end_content|> before it.
    allowed = allowed_ids(vocab, task, lm_vocab_size) if allowed is None else allowed
    return [AllowedIds(allowed), SuppressAtStart([vocab.end])]


def stop_ids(vocab: Vocab, task: Task) -> frozenset[int]:
    """Tokens that end generation. ASR's text is complete at ``<|end_content|>``."""
    return frozenset({vocab.end, vocab.end_content} if task is Task.ASR else {vocab.end})
