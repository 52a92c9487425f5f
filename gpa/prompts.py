"""The one definition of each task's token layout, shared by inference and training.

Layouts (G: 32 BiCodec global ids, S: BiCodec semantic ids, M: GLM ids, T: text BPE ids):

    ASR  <start_glm> M <end_glm> <start_semantic> S <end_semantic> <start_content> | T <end_content> <im_end>
    TTS  <start_global> G <end_global> <start_content> T <end_content>             | S <im_end>
    TTS with the reference's transcript (prompt continuation):
         <start_global> G <end_global> <start_content> T(ref + text) <end_content> <start_semantic> S(ref) | S <im_end>
    VC   <start_global> G <end_global> <start_semantic> S(src) <end_semantic> <end_content> | S <im_end>

``|`` marks ``target_start``: inference stops the prompt there, training puts the loss after it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from gpa.vocab import Vocab

Codes = Sequence[int] | torch.Tensor
IGNORE_INDEX = -100  # label value that the loss skips


@dataclass(frozen=True)
class Prompt:
    """Token ids of one example; ``ids[:target_start]`` is the prompt, the rest the target (if any)."""

    ids: list[int]
    target_start: int

    @property
    def prompt_ids(self) -> list[int]:
        return self.ids[: self.target_start]

    @property
    def target_ids(self) -> list[int]:
        return self.ids[self.target_start :]

    def labels(self) -> list[int]:
        """Per-position labels: :data:`IGNORE_INDEX` over the prompt, the ids over the target."""
        return [IGNORE_INDEX] * self.target_start + self.target_ids


def _with_target(prompt: list[int], target: list[int] | None) -> Prompt:
    return Prompt(prompt + (target or []), len(prompt))


def _wrap(open_id: int, ids: list[int], close_id: int) -> list[int]:
    return [open_id, *ids, close_id]


def _global_block(vocab: Vocab, global_codes: Codes) -> list[int]:
    ids = vocab.global_ids(global_codes)
    if len(ids) == 0:
        raise ValueError("global codes are empty; a reference voice gives 32")
    return _wrap(vocab.start_global, ids, vocab.end_global)


def voice_prefix(vocab: Vocab, prompt_ids: Sequence[int]) -> int:
    """Length of the voice block a TTS or VC prompt starts with (``<start_global> G <end_global>``), which every
    prompt in that voice shares; 0 for a prompt that starts otherwise."""
    if not prompt_ids or prompt_ids[0] != vocab.start_global:
        return 0
    try:
        return list(prompt_ids).index(vocab.end_global) + 1
    except ValueError:
        return 0


def _nonempty(codes: Codes, what: str) -> Codes:
    if len(codes) == 0:
        raise ValueError(f"{what} is empty")
    return codes


def asr_prompt(vocab: Vocab, glm_codes: Codes, semantic_codes: Codes, text: str | None = None) -> Prompt:
    """Speech recognition: both token streams of the same audio, then the transcript."""
    ids = _wrap(vocab.start_glm, vocab.glm_ids(_nonempty(glm_codes, "GLM codes")), vocab.end_glm)
    ids += _wrap(vocab.start_semantic, vocab.semantic_ids(_nonempty(semantic_codes, "semantic codes")),
                 vocab.end_semantic)
    ids.append(vocab.start_content)
    target = None if text is None else [*vocab.encode_text(text), vocab.end_content, vocab.end]
    return _with_target(ids, target)


def tts_prompt(
    vocab: Vocab,
    global_codes: Codes,
    text: str,
    target_semantic: Codes | None = None,
    reference_text: str | None = None,
    reference_semantic: Codes | None = None,
) -> Prompt:
    """Speech synthesis in the voice of ``global_codes``.

    With ``reference_text`` and ``reference_semantic`` (the reference clip's transcript and codes)
    the prompt continues the reference's own semantic stream, which keeps its accent; the text is
    joined to the transcript as the authors do, with no separator.
    """
    if not isinstance(text, str) or not text.strip():
        raise ValueError("text to synthesise is empty")
    if (reference_text is None) != (reference_semantic is None):
        raise ValueError("reference_text and reference_semantic go together (prompt continuation)")
    content = text if reference_text is None else reference_text + text
    ids = _global_block(vocab, global_codes)
    ids += _wrap(vocab.start_content, vocab.encode_text(content), vocab.end_content)
    if reference_semantic is not None:
        ids += [vocab.start_semantic, *vocab.semantic_ids(_nonempty(reference_semantic, "reference codes"))]
    target = None if target_semantic is None else [*vocab.semantic_ids(target_semantic), vocab.end]
    return _with_target(ids, target)


def vc_prompt(vocab: Vocab, global_codes: Codes, source_semantic: Codes,
              target_semantic: Codes | None = None) -> Prompt:
    """Voice conversion: the source's content in the voice of ``global_codes``."""
    ids = _global_block(vocab, global_codes)
    ids += _wrap(vocab.start_semantic, vocab.semantic_ids(_nonempty(source_semantic, "source codes")),
                 vocab.end_semantic)
    ids.append(vocab.end_content)
    target = None if target_semantic is None else [*vocab.semantic_ids(target_semantic), vocab.end]
    return _with_target(ids, target)
