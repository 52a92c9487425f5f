"""Text helpers: splitting long text for TTS at sentence boundaries (English and CJK punctuation), and
the compression ratio that flags a looping transcript."""

from __future__ import annotations

import re
import zlib

# A sentence ends at . ! ? ; (or their CJK forms) followed by space or the end; CJK marks need no space.
_SENTENCE_END = re.compile(r"(?<=[.!?;])\s+|(?<=[。！？；])")
_CLAUSE_END = re.compile(r"(?<=[,:])\s+|(?<=[，、：])")

MAX_CHARS = 200  # about 12-15 s of speech: well inside what one generation should cover


def _pieces(text: str, pattern: re.Pattern[str]) -> list[str]:
    return [p.strip() for p in pattern.split(text) if p and p.strip()]


def _pack(parts: list[str], max_chars: int) -> list[str]:
    """Greedily join consecutive parts while the result stays within ``max_chars``."""
    out: list[str] = []
    for part in parts:
        if out and len(out[-1]) + 1 + len(part) <= max_chars:
            joiner = "" if _is_cjk(out[-1][-1]) else " "
            out[-1] = out[-1] + joiner + part
        else:
            out.append(part)
    return out


def _is_cjk(ch: str) -> bool:
    return "\u3000" <= ch <= "\u9fff" or "\uff00" <= ch <= "\uffef"


def _hard_split(text: str, max_chars: int) -> list[str]:
    """Last resort for a run without punctuation: cut at spaces, or anywhere for CJK."""
    words = text.split(" ")
    if len(words) > 1:
        return _pack(words, max_chars) if all(len(w) <= max_chars for w in words) else [
            piece for w in words for piece in _hard_split(w, max_chars)]
    return [text[i : i + max_chars] for i in range(0, len(text), max_chars)]


def split_text(text: str, max_chars: int = MAX_CHARS) -> list[str]:
    """Cut ``text`` into pieces of at most ``max_chars``: at sentence ends, then clauses, then spaces.

    Nothing is dropped: joining the pieces with single spaces gives the input back up to whitespace.
    """
    if max_chars < 1:
        raise ValueError(f"max_chars must be >= 1, got {max_chars}")
    text = " ".join(text.split())
    if len(text) <= max_chars:
        return [text] if text else []
    out: list[str] = []
    for sentence in _pieces(text, _SENTENCE_END):
        if len(sentence) <= max_chars:
            out.append(sentence)
            continue
        for clause in _pieces(sentence, _CLAUSE_END):
            out.extend([clause] if len(clause) <= max_chars else _hard_split(clause, max_chars))
    return _pack(out, max_chars)


def compression_ratio(text: str) -> float:
    """UTF-8 length over zlib-compressed length (whisper's loop signal; 0.0 for empty text).

    Ordinary sentences score about 1-2; text that repeats itself scores far higher.
    """
    data = text.encode("utf-8")
    return len(data) / len(zlib.compress(data)) if data else 0.0
