"""Text helpers: long-text splitting for TTS (bounded pieces, sentence boundaries first, nothing lost) and the
compression ratio behind ASR's loop guard."""

from __future__ import annotations

import pytest

from gpa.config import ASR_FALLBACK, ASRFallback, SamplingParams
from gpa.text import compression_ratio, split_text


def _words(pieces: list[str]) -> str:
    return " ".join(pieces).replace(" ", "")


@pytest.mark.parametrize("text", [
    "One sentence. Another one here! And a question? " * 20,
    "a, very, long, list, of, clauses, " * 30,
    "nopunctuation " * 80,
    "x" * 450,
    "这是第一句。这是第二句！这是第三句？" * 15,
    "Mixed text. 中文句子。 More English; and a clause, with commas. " * 10,
])
def test_pieces_are_bounded_and_lossless(text):
    pieces = split_text(text, max_chars=100)
    assert all(0 < len(p) <= 100 for p in pieces)
    assert _words(pieces) == text.replace(" ", "")


def test_sentences_are_kept_whole_when_they_fit():
    text = "First sentence is here. Second sentence follows. Third one ends it."
    assert split_text(text, max_chars=30) == ["First sentence is here.", "Second sentence follows.",
                                              "Third one ends it."]
    assert split_text(text) == [text]
    assert split_text("   ") == []
    with pytest.raises(ValueError):
        split_text("x", max_chars=0)


def test_compression_ratio_flags_loops_not_sentences():
    sentence = "Offer of the danger trail, feel its terror."
    assert 0.5 < compression_ratio(sentence) < 1.5
    assert compression_ratio("Deeath food" + "hood" * 60) > 8  # a transcript stuck in a loop
    assert compression_ratio("") == 0.0
    assert not ASR_FALLBACK.needs_retry(compression_ratio(sentence))
    assert ASR_FALLBACK.needs_retry(compression_ratio("hood" * 60))


def test_asr_fallback_retries_only_above_the_request_temperature():
    greedy = SamplingParams(temperature=0.0, seed=3)
    assert [p.temperature for p in ASR_FALLBACK.retries(greedy)] == [0.2, 0.4, 0.6, 0.8, 1.0]
    assert all(p.seed == 3 for p in ASR_FALLBACK.retries(greedy))
    assert [p.temperature for p in ASR_FALLBACK.retries(greedy.replace(temperature=0.5))] == [0.6, 0.8, 1.0]
    assert not ASRFallback(compression_ratio_threshold=None).needs_retry(100.0)
    for bad in ({"compression_ratio_threshold": 0.5}, {"temperatures": (0.4, 0.2)}, {"temperatures": (0.0,)}):
        with pytest.raises(ValueError):
            ASRFallback(**bad)
