"""Long-text splitting for TTS: bounded pieces, sentence boundaries first, nothing lost."""

from __future__ import annotations

import pytest

from gpa.text import split_text


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
