"""Incremental detokenization: semantic codes -> PCM chunks, and text ids -> text deltas.

BiCodec's decoder is non-causal: the samples of frame t depend on frames t-R .. t+R. A chunk is
therefore decoded from a window holding ``left`` frames of context before it and ``lookahead``
frames after it, and only its own samples are kept. With both at least R the stream equals the
offline decode up to float rounding (no duplicated or missing samples, no crossfades); smaller
values trade exactness for latency. The first chunk can be shorter, for a short time to first audio.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from gpa.codecs.bicodec import BiCodec
from gpa.vocab import Vocab


@dataclass(frozen=True)
class StreamConfig:
    """How audio is cut into chunks (all sizes in semantic frames of 20 ms)."""

    first_chunk: int = 10  # frames in the first chunk (short, for the time to first audio)
    chunk: int = 100  # the largest chunk: chunks double from first_chunk up to this
    # Every chunk re-decodes its context (about 2 x 61 frames at the official size), so small
    # chunks multiply the vocoder's work; doubling keeps the start quick and the steady state cheap.
    left: int | None = None  # context before a chunk; None: the decoder's receptive field (exact)
    lookahead: int | None = None  # context after a chunk; None: the receptive field (exact)

    def __post_init__(self) -> None:
        if self.first_chunk < 1 or self.chunk < 1:
            raise ValueError(f"chunk sizes must be >= 1, got first_chunk={self.first_chunk}, chunk={self.chunk}")
        for name in ("left", "lookahead"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"{name} must be >= 0 or None, got {value}")


@torch.inference_mode()
def receptive_field(codec: BiCodec, bound: int = 128) -> int:
    """Frames on each side that influence a frame's samples, measured by perturbing one input frame."""
    n = 2 * bound + 1
    glob = torch.zeros(1, codec.num_global_tokens, dtype=torch.long)
    base = torch.zeros(1, n, dtype=torch.long)
    bumped = base.clone()
    bumped[0, bound] = 1
    diff = (codec.decode(base, glob) - codec.decode(bumped, glob)).abs().view(n, codec.hop_length).amax(1)
    touched = torch.nonzero(diff > 0).flatten()
    radius = int(max(bound - touched.min(), touched.max() - bound))
    if radius >= bound:
        raise RuntimeError(f"BiCodec's receptive field reaches the measurement bound of {bound} frames")
    return radius


class AudioStreamer:
    """Turns a growing list of semantic codes into consecutive waveform chunks."""

    def __init__(self, codec: BiCodec, global_codes: torch.Tensor, config: StreamConfig, field: int) -> None:
        self.codec = codec
        self.global_codes = torch.as_tensor(global_codes).reshape(1, -1)
        self.config = config
        self.left = field if config.left is None else config.left
        self.lookahead = field if config.lookahead is None else config.lookahead
        self.codes: list[int] = []
        self.emitted = 0  # frames already turned into samples
        self.chunks = 0  # chunks emitted

    def _next_size(self) -> int:
        size = self.config.first_chunk * 2**self.chunks
        return min(max(size, self.config.first_chunk), max(self.config.chunk, self.config.first_chunk))

    def push(self, codes: list[int]) -> list[np.ndarray]:
        """Add newly generated codes; return the chunks that are now final."""
        self.codes.extend(codes)
        chunks = []
        while len(self.codes) >= self.emitted + self._next_size() + self.lookahead:
            chunks.append(self._emit(self.emitted + self._next_size()))
        return chunks

    def finish(self) -> list[np.ndarray]:
        """Emit everything that is left (no more codes will come)."""
        return [self._emit(len(self.codes))] if len(self.codes) > self.emitted else []

    def _emit(self, stop: int) -> np.ndarray:
        start = max(0, self.emitted - self.left)
        end = min(len(self.codes), stop + self.lookahead)
        window = torch.tensor([self.codes[start:end]])
        wav = self.codec.decode(window, self.global_codes)[0]
        hop = self.codec.hop_length
        out = wav[(self.emitted - start) * hop : (stop - start) * hop].cpu().numpy()
        self.emitted = stop
        self.chunks += 1
        return out


class TextStreamer:
    """Turns a growing list of text ids into text deltas that never split a UTF-8 character."""

    def __init__(self, vocab: Vocab) -> None:
        self.vocab = vocab
        self.ids: list[int] = []
        self.sent = ""

    def push(self, ids: list[int]) -> str:
        """Add ids; return the newly completed text."""
        self.ids.extend(ids)
        text = self.vocab.decode_text(self.ids)
        if text.endswith("\ufffd"):  # a multi-byte character still missing bytes: wait for them
            return ""
        return self._delta(text)

    def finish(self) -> str:
        """The rest of the text (whatever is decodable)."""
        return self._delta(self.vocab.decode_text(self.ids))

    def _delta(self, text: str) -> str:
        if not text.startswith(self.sent):  # a later byte re-formed an earlier character
            return ""
        delta, self.sent = text[len(self.sent) :], text
        return delta
