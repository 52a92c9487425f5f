"""The shared vocabulary: Qwen BPE text, structural tokens, and three audio-code ranges.

Every id here is discovered from the checkpoint's ``tokenizer.json``; none is written in code.
Naming rule: ``*_codes`` are codec-local indices (0..K-1); ``*_ids`` are LLM vocabulary ids.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch
from tokenizers import Tokenizer

STRUCTURAL_TOKENS = (
    "<|start_glm_token|>", "<|end_glm_token|>",
    "<|start_semantic_token|>", "<|end_semantic_token|>",
    "<|start_global_token|>", "<|end_global_token|>",
    "<|start_content|>", "<|end_content|>",
)
END_TOKEN = "<|im_end|>"
AUDIO_TOKEN_PATTERNS = {
    "glm": re.compile(r"<\|glm_semantic_(\d+)\|>"),
    "global": re.compile(r"<\|bicodec_global_(\d+)\|>"),
    "semantic": re.compile(r"<\|bicodec_semantic_(\d+)\|>"),
}


class VocabError(ValueError):
    """The tokenizer lacks a token GPA needs, or its audio ranges are not contiguous."""


@dataclass(frozen=True)
class CodeRange:
    """A contiguous block of vocabulary ids holding one codec's codes: id = offset + code."""

    name: str
    offset: int
    size: int

    @property
    def stop(self) -> int:
        return self.offset + self.size

    def ids(self, codes: Sequence[int] | torch.Tensor) -> list[int]:
        """Codec codes -> vocabulary ids; raises on a code outside 0..size-1."""
        codes = codes.tolist() if isinstance(codes, torch.Tensor) else list(codes)
        bad = [c for c in codes if not 0 <= c < self.size]
        if bad:
            raise ValueError(f"{self.name} codes must be in [0, {self.size}), got {bad[:5]}")
        return [self.offset + int(c) for c in codes]

    def codes(self, ids: Sequence[int]) -> list[int]:
        """Vocabulary ids -> codec codes; raises on an id outside the range."""
        bad = [i for i in ids if not self.offset <= i < self.stop]
        if bad:
            raise ValueError(f"ids {bad[:5]} are not {self.name} tokens [{self.offset}, {self.stop})")
        return [int(i) - self.offset for i in ids]

    def __contains__(self, token_id: int) -> bool:
        return self.offset <= token_id < self.stop


class Vocab:
    """Text tokenizer plus the special tokens and audio ranges of a GPA checkpoint."""

    def __init__(self, tokenizer: Tokenizer, glm_codebook_size: int | None = None, source: str = "tokenizer") -> None:
        self.tokenizer = tokenizer
        self.source = source
        self._added = {tok.content: i for i, tok in tokenizer.get_added_tokens_decoder().items()}
        for token in (*STRUCTURAL_TOKENS, END_TOKEN):
            self.token_id(token)
        self.semantic = self._find_range("semantic")
        self.global_ = self._find_range("global")
        self.glm = self._find_glm_range(glm_codebook_size)
        self._check_disjoint()

    @classmethod
    def from_dir(cls, path: str | Path, glm_codebook_size: int | None = None) -> Vocab:
        """Load ``tokenizer.json`` from a checkpoint directory."""
        file = Path(path) / "tokenizer.json"
        if not file.is_file():
            raise VocabError(f"missing text tokenizer: {file}")
        try:
            tok = Tokenizer.from_file(str(file))
        except Exception as e:  # the tokenizers library raises a bare Exception on bad JSON
            raise VocabError(f"cannot read {file}: {e}") from e
        return cls(tok, glm_codebook_size, source=str(file))

    # --- special tokens -------------------------------------------------------------------------

    def token_id(self, token: str) -> int:
        """The single id of a special token; raises if the tokenizer lacks it."""
        if token not in self._added:
            raise VocabError(f"{self.source} lacks the special token {token}; GPA needs {STRUCTURAL_TOKENS}")
        return self._added[token]

    @cached_property
    def end(self) -> int:
        """``<|im_end|>``: the stop token of every task."""
        return self.token_id(END_TOKEN)

    @cached_property
    def pad(self) -> int:
        """``<|endoftext|>`` when present (Qwen's pad), else the end token."""
        return self._added.get("<|endoftext|>", self.end)

    @cached_property
    def start_glm(self) -> int:
        return self.token_id("<|start_glm_token|>")

    @cached_property
    def end_glm(self) -> int:
        return self.token_id("<|end_glm_token|>")

    @cached_property
    def start_semantic(self) -> int:
        return self.token_id("<|start_semantic_token|>")

    @cached_property
    def end_semantic(self) -> int:
        return self.token_id("<|end_semantic_token|>")

    @cached_property
    def start_global(self) -> int:
        return self.token_id("<|start_global_token|>")

    @cached_property
    def end_global(self) -> int:
        return self.token_id("<|end_global_token|>")

    @cached_property
    def start_content(self) -> int:
        return self.token_id("<|start_content|>")

    @cached_property
    def end_content(self) -> int:
        return self.token_id("<|end_content|>")

    # --- text -----------------------------------------------------------------------------------

    @cached_property
    def text_size(self) -> int:
        """Ids below this are ordinary BPE text tokens."""
        return self.tokenizer.get_vocab_size(with_added_tokens=False)

    @cached_property
    def size(self) -> int:
        """Number of ids the tokenizer knows (the LM's vocab_size may be larger, padded)."""
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def encode_text(self, text: str) -> list[int]:
        """Plain text -> BPE ids. Text that spells a special or audio token is refused, not parsed."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        smuggled = [i for i in ids if i >= self.text_size]
        if smuggled:
            names = sorted({self.tokenizer.id_to_token(i) for i in smuggled})
            raise ValueError(f"text may not contain special or audio token strings, found {names[:5]}")
        return ids

    def decode_text(self, ids: Sequence[int]) -> str:
        """BPE ids -> text; ids outside the text range are dropped."""
        return self.tokenizer.decode([i for i in ids if i < self.text_size], skip_special_tokens=False)

    # --- audio ranges ---------------------------------------------------------------------------

    def _find_range(self, kind: str) -> CodeRange:
        pattern = AUDIO_TOKEN_PATTERNS[kind]
        found = {int(m.group(1)): i for tok, i in self._added.items() if (m := pattern.fullmatch(tok))}
        if not found:
            raise VocabError(f"{self.source} has no {pattern.pattern} tokens")
        offset = found.get(0)
        if offset is None or any(found.get(k) != offset + k for k in range(len(found))):
            raise VocabError(f"{self.source}: {kind} tokens are not a contiguous block starting at code 0")
        return CodeRange(kind, offset, len(found))

    def _find_glm_range(self, glm_codebook_size: int | None) -> CodeRange:
        # The official spelling of GLM tokens is not published; when they are not named
        # <|glm_semantic_k|>, they sit directly below the BiCodec global range (the official order).
        try:
            found = self._find_range("glm")
        except VocabError:
            if glm_codebook_size is None:
                raise
            return CodeRange("glm", self.global_.offset - glm_codebook_size, glm_codebook_size)
        if glm_codebook_size is not None and found.size != glm_codebook_size:
            raise VocabError(f"{self.source} has {found.size} GLM tokens but the GLM tokenizer has "
                             f"{glm_codebook_size} codes")
        return found

    def _check_disjoint(self) -> None:
        ranges = sorted((self.glm, self.global_, self.semantic), key=lambda r: r.offset)
        for a, b in zip(ranges, ranges[1:], strict=False):
            if a.stop > b.offset:
                raise VocabError(f"{self.source}: audio ranges {a} and {b} overlap")
        if ranges[0].offset < self.text_size:
            raise VocabError(f"{self.source}: audio range {ranges[0]} overlaps the text vocabulary")

    def glm_ids(self, codes: Sequence[int] | torch.Tensor) -> list[int]:
        return self.glm.ids(codes)

    def global_ids(self, codes: Sequence[int] | torch.Tensor) -> list[int]:
        return self.global_.ids(codes)

    def semantic_ids(self, codes: Sequence[int] | torch.Tensor) -> list[int]:
        return self.semantic.ids(codes)

    def semantic_codes(self, ids: Sequence[int]) -> list[int]:
        return self.semantic.codes(ids)
