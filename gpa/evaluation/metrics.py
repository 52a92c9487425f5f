"""Word and character error rates after Whisper's English normaliser, and aggregation helpers."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np

from gpa.evaluation.deps import require


@functools.cache
def _normalizer() -> Callable[[str], str]:
    english = require("whisper_normalizer.english", "text normalisation (Whisper's EnglishTextNormalizer)")
    return english.EnglishTextNormalizer()


def normalize_text(text: str) -> str:
    """Whisper's English normalisation (case, punctuation, spelling, numbers) with single spaces."""
    return " ".join(_normalizer()(text).split())


@dataclass(frozen=True)
class Errors:
    """Edit counts of one or more hypotheses against their references (after normalisation)."""

    word_edits: int = 0  # substitutions + deletions + insertions, over words
    words: int = 0  # reference words
    char_edits: int = 0  # the same over characters (spaces included, as jiwer's CER)
    chars: int = 0  # reference characters

    @property
    def wer(self) -> float | None:
        """Word error rate (None without reference words)."""
        return self.word_edits / self.words if self.words else None

    @property
    def cer(self) -> float | None:
        """Character error rate (None without reference characters)."""
        return self.char_edits / self.chars if self.chars else None

    def __add__(self, other: Errors) -> Errors:
        return Errors(self.word_edits + other.word_edits, self.words + other.words,
                      self.char_edits + other.char_edits, self.chars + other.chars)


def errors(reference: str, hypothesis: str) -> Errors:
    """Edits turning the normalised ``reference`` into the normalised ``hypothesis``.

    Raises:
        ValueError: the reference is empty after normalisation (no error rate is defined).
    """
    jiwer = require("jiwer", "WER/CER")
    ref, hyp = normalize_text(reference), normalize_text(hypothesis)
    if not ref:
        raise ValueError(f"reference transcript {reference!r} is empty after normalisation; WER is undefined")
    w = jiwer.process_words(ref, hyp)
    c = jiwer.process_characters(ref, hyp)
    return Errors(w.substitutions + w.deletions + w.insertions, w.substitutions + w.deletions + w.hits,
                  c.substitutions + c.deletions + c.insertions, c.substitutions + c.deletions + c.hits)


def corpus(per_item: Iterable[Errors]) -> Errors:
    """Corpus-level counts: the sum of edits over the sum of reference words (not a mean of rates)."""
    return sum(per_item, Errors())


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine similarity of two embeddings (D,)."""
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


def mean(values: Iterable[float | None]) -> float | None:
    """Mean of the values that are not None (None when there are none)."""
    present = [v for v in values if v is not None]
    return float(np.mean(present)) if present else None
