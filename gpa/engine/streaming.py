"""Incremental detokenization: semantic codes -> PCM chunks, and text ids -> text deltas.

Audio is decoded by one :class:`~gpa.codecs.bicodec_stream.IncrementalDecoder` per stream: each
code is decoded once, every layer keeping the left context it still needs, and a sample is final
once the decoder's right context (its ``lookahead``, 67 frames = 1.34 s with the official BiCodec)
has arrived. The stream then equals the offline decode up to float rounding (no duplicated or
missing samples, no crossfades). A smaller ``lookahead`` trades exactness for latency. Down to the
lookahead of the decoder's upsampling layers (10 frames with the official BiCodec) the frame-rate
layers before them commit their outputs early, as if the codes ended there, and every code is still
decoded once (:meth:`~gpa.codecs.bicodec_stream.StreamDecoder.limit_context`). Below that, each chunk's
last samples are decoded as if the codes ended there (the offline decode's zero padding) and re-decoded
exactly later: a preview per chunk that costs about the decoder's whole lookahead in work.

The previous method, re-decoding every chunk inside a window of ``left`` and ``lookahead`` frames of
context, stays available by setting ``StreamConfig.left`` (it costs about (chunk + left + lookahead)
/ chunk times the work).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from gpa.codecs.bicodec import BiCodec
from gpa.codecs.bicodec_stream import StreamDecoder
from gpa.config import STREAM_APPROXIMATIONS
from gpa.vocab import Vocab


@dataclass(frozen=True)
class StreamConfig:
    """How audio is cut into chunks (all sizes in semantic frames of 20 ms)."""

    first_chunk: int = 5  # frames in the first chunk (short, for the time to first audio)
    chunk: int = 10  # the largest chunk: chunks double from first_chunk up to this
    # Decoding is incremental, so chunk sizes barely change the vocoder's work; steady small chunks
    # keep playback smooth when generation is only a little faster than real time.
    lookahead: int | None = None  # codes after a chunk before it is emitted; None: exact (the decoder's lookahead)
    # How a lookahead below the decoder's is made up (see the module doc): "commit" (every code decoded
    # once, each frame approximate; lookahead >= the decoder's min_lookahead) or "preview" (each chunk's
    # tail decoded as if the codes ended, then re-decoded exactly: closer, but about the decoder's whole
    # lookahead in extra work per chunk).
    approximate: str = "commit"
    left: int | None = None  # set: the old method, re-decoding each chunk with this much left context

    def __post_init__(self) -> None:
        if self.first_chunk < 1 or self.chunk < 1:
            raise ValueError(f"chunk sizes must be >= 1, got first_chunk={self.first_chunk}, chunk={self.chunk}")
        if self.approximate not in STREAM_APPROXIMATIONS:
            raise ValueError(f"unknown approximate={self.approximate!r}; "
                             f"choose one of {', '.join(STREAM_APPROXIMATIONS)}")
        for name in ("left", "lookahead"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"{name} must be >= 0 or None, got {value}")


@torch.inference_mode()
def receptive_field(codec: BiCodec, bound: int = 128) -> int:
    """Frames on each side that measurably influence a frame's samples (found by perturbing one frame).

    Influence that rounds away in float32 is not seen: with random weights this is a few frames less
    than the structural reach (``codec.incremental_decoder(...).lookahead``), 61 vs 67 frames at the
    official size.
    """
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


def check_lookahead(codec: BiCodec, config: StreamConfig) -> None:
    """Raise ValueError if ``config.lookahead`` cannot be had with ``config.approximate`` on ``codec``."""
    if config.left is None and config.lookahead is not None and config.approximate == "commit":
        _check_commit_lookahead(
            codec.incremental_decoder(torch.zeros(1, codec.num_global_tokens, dtype=torch.long)), config.lookahead)


def _check_commit_lookahead(decoder: StreamDecoder, ahead: int) -> None:
    """Raise ValueError if ``decoder`` cannot stream with ``ahead`` codes of lookahead in commit mode."""
    if ahead < decoder.lookahead and ahead < decoder.min_lookahead:
        raise ValueError(f"lookahead {ahead} is below what approximate='commit' allows with this codec "
                         f"({decoder.min_lookahead} to {decoder.lookahead} codes, or None for exact); "
                         "approximate='preview' allows less")


class AudioStreamer:
    """Turns a growing list of semantic codes into consecutive waveform chunks.

    Args:
        codec: the BiCodec that decodes.
        global_codes: (num_global_tokens,) or (1, num_global_tokens) speaker codes.
        config: chunk sizes and context.
        field: context for the re-decode method (``config.left`` set) where ``config.left`` or
            ``config.lookahead`` is None; measured with :func:`receptive_field` if not given.
    """

    def __init__(self, codec: BiCodec, global_codes: torch.Tensor, config: StreamConfig,
                 field: int | None = None) -> None:
        self.codec = codec
        self.global_codes = torch.as_tensor(global_codes).reshape(1, -1)
        self.config = config
        self.codes: list[int] = []
        self.emitted = 0  # frames already turned into samples
        self.chunks = 0  # chunks emitted
        self.decoder = None if config.left is not None else codec.incremental_decoder(self.global_codes)
        if self.decoder is not None:
            self.left = 0  # never re-decoded: the decoder keeps its own left context
            ahead = config.lookahead
            self.exact = ahead is None or ahead >= self.decoder.lookahead  # the stream equals the offline decode
            if not self.exact and config.approximate == "commit":
                # Approximate at almost no extra work: the frame-rate layers commit their outputs early and
                # the upsampling layers decode every frame once (StreamDecoder.limit_context).
                _check_commit_lookahead(self.decoder, ahead)
                self.decoder.limit_context(ahead - self.decoder.min_lookahead)
            self.lookahead = self.decoder.lookahead if ahead is None else ahead
            self.fed = 0  # codes given to the decoder
            self.done = 0  # samples the decoder has made final (some may already be out, if not exact)
            self.held: list[torch.Tensor] = [torch.zeros(0)]  # final samples not yet out, from self.emitted
        else:
            if config.lookahead is None or field is None:
                field = receptive_field(codec) if field is None else field
            self.left = config.left
            self.lookahead = field if config.lookahead is None else config.lookahead

    def _next_size(self) -> int:
        size = self.config.first_chunk * 2**self.chunks
        return min(max(size, self.config.first_chunk), max(self.config.chunk, self.config.first_chunk))

    def push(self, codes: list[int]) -> list[np.ndarray]:
        """Add newly generated codes; return the chunks that are now final."""
        self.codes.extend(codes)
        chunks = []
        while len(self.codes) >= self.emitted + self._next_size() + self.lookahead:
            chunks.append(self._emit(self.emitted + self._next_size()))
        if self.decoder is not None and len(self.codes) - self.fed >= max(self.config.chunk, self.config.first_chunk):
            # Decode ahead in blocks of the largest chunk, so little is left when a chunk falls due; smaller
            # blocks cost more (each op's overhead per call: feeding the official BiCodec 5 codes at a time took
            # 176 ms of vocoder work before the first exact chunk, in blocks of 50 78 ms). A context-limited
            # decoder commits (a pass over its pending frames) only when a chunk is due.
            self._feed(commit=False)
        return chunks

    def finish(self) -> list[np.ndarray]:
        """Emit everything that is left (no more codes will come)."""
        if self.decoder is not None:
            self._feed()
            self._take(self.decoder.finish())
        return [self._emit(len(self.codes))] if len(self.codes) > self.emitted else []

    def _emit(self, stop: int) -> np.ndarray:
        out = self._redecode(stop) if self.decoder is None else self._incremental(stop)
        self.emitted = stop
        self.chunks += 1
        return out

    def _incremental(self, stop: int) -> np.ndarray:
        hop = self.codec.hop_length
        self._feed()
        held = torch.cat(self.held)  # exact samples from self.emitted * hop on
        if self.done < stop * hop and not self.decoder.finished:
            # Approximate: the unfinished tail decoded as if the codes ended here; its samples that
            # do go out are dropped when their exact values arrive.
            tail = self.decoder.preview()[0]
            held = torch.cat([held, tail[max(0, self.emitted * hop - self.done) :]])
        n = (stop - self.emitted) * hop
        assert len(held) >= n, f"chunk up to sample {stop * hop} is not decoded ({self.done} exact)"
        self.held = [held[n:] if self.done > stop * hop else held[:0]]  # drop approximate samples
        return held[:n].numpy()

    def _feed(self, commit: bool = True) -> None:
        if self.decoder.finished:
            return
        if len(self.codes) > self.fed or (commit and self.decoder.context is not None):
            self._take(self.decoder.push(torch.tensor([self.codes[self.fed :]], dtype=torch.long), commit))
            self.fed = len(self.codes)

    def _take(self, samples: torch.Tensor) -> None:
        """New exact samples (1, N) from the decoder, starting at sample self.done."""
        skip = self.emitted * self.codec.hop_length - self.done  # > 0: already out approximately
        self.done += samples.shape[1]
        if samples.shape[1] > skip:
            self.held.append(samples[0, max(skip, 0) :])

    def _redecode(self, stop: int) -> np.ndarray:
        start = max(0, self.emitted - self.left)
        end = min(len(self.codes), stop + self.lookahead)
        window = torch.tensor([self.codes[start:end]])
        wav = self.codec.decode(window, self.global_codes)[0]
        hop = self.codec.hop_length
        out = wav[(self.emitted - start) * hop : (stop - start) * hop].cpu().numpy()
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
