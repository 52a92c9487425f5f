"""Incremental BiCodec decoding: semantic codes in, final waveform samples out, nothing computed twice.

Every layer on BiCodec's decode path is local in time: pointwise maps (codebook lookup, linear
layers, layer norms over channels, GELU, Snake, tanh, the speaker condition added to every frame),
convolutions with symmetric zero padding, and transposed convolutions. So each layer runs on a
growing input: a convolution keeps only the inputs it still needs (its left context), emits only
the outputs whose whole right context has arrived, and pads with zeros where the offline decode
does (at the sequence start, and at its end on :meth:`IncrementalDecoder.finish`). The concatenated
output therefore equals :meth:`BiCodec.decode` up to float rounding, at a fixed delay: after n
codes, exactly ``n * hop_length - lag`` samples are final.

Most of that delay is in the cheap frame-rate layers before the wave generator (57 of BiCodec's 67
frames of lookahead): :meth:`StreamDecoder.limit_context` commits those layers' outputs a given number
of codes after their code, computed as if the codes ended there, and the upsampling layers after them
decode every frame once, exactly. That is an approximation with a much shorter delay and little extra
work (one pass of the frame-rate layers over their pending frames per commit).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from gpa.codecs.bicodec_layers import (
    ConvNeXtBlock,
    DecoderBlock,
    ResidualUnit,
    SamplingBlock,
    Snake1d,
    VocosBackbone,
    WaveGenerator,
    fixed_norm,
    transposed_conv,
)

if TYPE_CHECKING:
    from gpa.codecs.bicodec import BiCodec

Frames = torch.Tensor | None  # (B, C, T) with T >= 1, or None for "nothing yet"


def _cat(a: Frames, b: Frames) -> Frames:
    if a is None or b is None:
        return b if a is None else a
    return torch.cat([a, b], dim=-1)


class Op:
    """A layer run incrementally along time on (B, C, T) tensors.

    ``rate`` output samples per input sample; after N inputs, ``rate * N - lag`` outputs are final
    (all of them after :meth:`flush`, which marks the end of the sequence).
    """

    rate = 1
    lag = 0

    def step(self, x: torch.Tensor) -> Frames:
        """Take new input frames (B, C, T); return the outputs that became final."""
        raise NotImplementedError

    def flush(self) -> Frames:
        """The sequence has ended: return the remaining outputs."""
        return None

    def copy(self) -> Op:
        """An independent copy of this state (buffers are never modified in place, so sharing is safe)."""
        new = object.__new__(type(self))
        new.__dict__.update(self.__dict__)
        return new


class Pointwise(Op):
    """A map applied to every frame on its own."""

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.fn = fn

    def step(self, x: torch.Tensor) -> Frames:
        return self.fn(x)


class Chain(Op):
    """Ops applied one after another."""

    def __init__(self, ops: list[Op]) -> None:
        self.ops = ops
        self.rate, self.lag = 1, 0
        for op in ops:  # N -> r1 N - l1 -> r2 (r1 N - l1) - l2 ...
            self.rate, self.lag = self.rate * op.rate, self.lag * op.rate + op.lag

    def step(self, x: torch.Tensor) -> Frames:
        y: Frames = x
        for op in self.ops:
            y = op.step(y)
            if y is None:
                return None
        return y

    def flush(self) -> Frames:
        y: Frames = None
        for op in self.ops:
            y = _cat(None if y is None else op.step(y), op.flush())
        return y

    def copy(self) -> Chain:
        new = super().copy()
        new.ops = [op.copy() for op in self.ops]
        return new


class Residual(Op):
    """x + inner(x), the input held back until the inner ops' outputs for it are final."""

    def __init__(self, inner: Op) -> None:
        if inner.rate != 1:
            raise ValueError(f"a residual branch must keep the rate, got rate {inner.rate}")
        self.inner, self.lag = inner, inner.lag
        self.held: Frames = None

    def step(self, x: torch.Tensor) -> Frames:
        self.held = _cat(self.held, x)
        return self._add(self.inner.step(x))

    def flush(self) -> Frames:
        return self._add(self.inner.flush())

    def _add(self, y: Frames) -> Frames:
        if y is None:
            return None
        n = y.shape[-1]
        assert self.held is not None and self.held.shape[-1] >= n, "residual output ahead of its input"
        out, rest = self.held[..., :n] + y, self.held[..., n:]
        self.held = rest if rest.shape[-1] else None
        return out

    def copy(self) -> Residual:
        new = super().copy()
        new.inner = self.inner.copy()
        return new


class Parallel(Op):
    """Branches run on the same input, their outputs summed frame by frame (averaged with ``mean``).

    The branches must share a rate; their lags may differ: a branch's outputs wait until every other
    branch has produced the same frames. Sums run in branch order, ``((y0 + y1) + y2) / n``, as
    Python's ``sum(...) / n`` does offline.
    """

    def __init__(self, branches: list[Op], mean: bool = False) -> None:
        if not branches:
            raise ValueError("Parallel needs at least one branch")
        rates = sorted({b.rate for b in branches})
        if len(rates) != 1:
            raise ValueError(f"parallel branches must share one rate, got rates {rates}")
        self.branches, self.mean = branches, mean
        self.rate, self.lag = rates[0], max(b.lag for b in branches)
        self.held: list[Frames] = [None] * len(branches)  # each branch's outputs not yet combined

    def step(self, x: torch.Tensor) -> Frames:
        return self._combine([b.step(x) for b in self.branches])

    def flush(self) -> Frames:
        return self._combine([b.flush() for b in self.branches])

    def _combine(self, ys: list[Frames]) -> Frames:
        self.held = [_cat(h, y) for h, y in zip(self.held, ys, strict=True)]
        held = [h for h in self.held if h is not None]
        if len(held) < len(self.held):
            return None
        n = min(h.shape[-1] for h in held)
        out = held[0][..., :n]
        for h in held[1:]:
            out = out + h[..., :n]
        self.held = [h[..., n:] if h.shape[-1] > n else None for h in held]
        return out / len(self.branches) if self.mean else out

    def copy(self) -> Parallel:
        new = super().copy()
        new.branches = [b.copy() for b in self.branches]
        new.held = list(self.held)
        return new


class Conv(Op):
    """A stride-1 Conv1d with symmetric zero padding ("same" length)."""

    def __init__(self, conv: nn.Conv1d) -> None:
        (k,), (d,), (s,), pad = conv.kernel_size, conv.dilation, conv.stride, conv.padding
        if s != 1 or conv.padding_mode != "zeros" or pad != (d * (k - 1) // 2,) or d * (k - 1) % 2:
            raise ValueError(f"no incremental form for {conv}: need stride 1 and symmetric zero padding")
        self.conv, self.span, self.lag = conv, d * (k - 1) + 1, pad[0]
        self.buf: Frames = None  # the inputs later outputs still need; starts as the left zero padding

    def step(self, x: torch.Tensor) -> Frames:
        if self.buf is None:
            self.buf = x.new_zeros(*x.shape[:-1], self.lag)
        buf = torch.cat([self.buf, x], dim=-1)
        n = buf.shape[-1] - self.span + 1  # outputs whose window is complete
        if n <= 0:
            self.buf = buf
            return None
        c = self.conv
        y = F.conv1d(buf, c.weight, c.bias, dilation=c.dilation, groups=c.groups)
        self.buf = buf[..., n:]
        return y

    def flush(self) -> Frames:
        if self.buf is None:
            return None
        return self.step(self.buf.new_zeros(*self.buf.shape[:-1], self.lag))  # the right zero padding


class ConvTranspose(Op):
    """A ConvTranspose1d (upsampling by its stride) with ``padding`` samples cropped at both ends."""

    def __init__(self, conv: nn.ConvTranspose1d) -> None:
        (k,), (s,), (p,) = conv.kernel_size, conv.stride, conv.padding
        if conv.dilation != (1,) or conv.output_padding != (0,) or conv.groups != 1 or p > k - s:
            raise ValueError(f"no incremental form for {conv}")
        self.conv, self.k, self.rate, self.lag = conv, k, s, p
        self.keep = (k - 1) // s  # earlier inputs that still reach outputs not yet final
        self.ctx: Frames = None
        self.skip = p  # the offline output drops its first p samples

    def step(self, x: torch.Tensor) -> Frames:
        ctx = _cat(self.ctx, x)
        assert ctx is not None
        c, s = ctx.shape[-1] - x.shape[-1], self.rate
        # Uncropped output j*s .. j*s + k - 1 gets input j; keep those complete: inputs up to now.
        y = transposed_conv(ctx, self.conv.weight, self.conv.bias, s)[..., c * s : ctx.shape[-1] * s]
        self.ctx = ctx[..., ctx.shape[-1] - self.keep :] if self.keep else None
        return self._crop(y)

    def flush(self) -> Frames:
        if self.ctx is None or not self.lag:
            return None
        c = self.ctx.shape[-1]
        y = transposed_conv(self.ctx, self.conv.weight, self.conv.bias, self.rate)
        return self._crop(y[..., c * self.rate : c * self.rate + self.lag])  # up to the right crop

    def _crop(self, y: torch.Tensor) -> Frames:
        if self.skip:
            drop = min(self.skip, y.shape[-1])
            y, self.skip = y[..., drop:], self.skip - drop
        return y if y.shape[-1] else None


def _transposed(fn: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
    """A per-frame map written for (B, T, C), applied to (B, C, T)."""
    return lambda x: fn(x.transpose(1, 2)).transpose(1, 2)


def _convnext(block: ConvNeXtBlock, cond: torch.Tensor | None) -> Op:
    norm = fixed_norm(block.norm, cond)  # the condition's scale and shift once per stream, not per block of frames
    return Residual(Chain([Conv(block.dwconv), Pointwise(lambda y: block.branch(y, norm=norm))]))


def _backbone(m: VocosBackbone, cond: torch.Tensor | None) -> Chain:
    """(B, C_in, T) -> (B, C, T); the offline module returns (B, T, C)."""
    return Chain([
        Conv(m.embed),
        Pointwise(_transposed(fixed_norm(m.norm, cond))),
        *(_convnext(b, cond) for b in m.convnext),
        Pointwise(_transposed(m.final_layer_norm)),
    ])


def _wave_op(m: nn.Module) -> Op:
    if isinstance(m, WaveGenerator):
        return _wave_op(m.model)
    if isinstance(m, DecoderBlock):
        return _wave_op(m.block)
    if isinstance(m, ResidualUnit):
        return Residual(_wave_op(m.block))
    if isinstance(m, nn.Sequential):
        return Chain([_wave_op(c) for c in m])
    if isinstance(m, nn.Conv1d):
        return Conv(m)
    if isinstance(m, nn.ConvTranspose1d):
        return ConvTranspose(m)
    if isinstance(m, Snake1d | nn.Tanh):
        return Pointwise(m)
    raise TypeError(f"no incremental form for {type(m).__name__}")


@torch.inference_mode()  # the norms' scales and shifts are computed here, for use inside push()
def decoder_ops(codec: BiCodec, cond: torch.Tensor) -> Chain:
    """The decode path after the codebook lookup as ops: latents (B, C, T) -> waveform (B, 1, T * hop).

    Mirrors ``BiCodec.decode``: prenet (linear, resampling stages, conditioned backbone, linear),
    plus the speaker condition, then the wave generator.
    """
    pre = codec.prenet
    ops: list[Op] = [Pointwise(_transposed(pre.linear_pre))]
    for stage in pre.downsample:
        sampling, backbone = stage
        assert isinstance(sampling, SamplingBlock), f"unexpected resampling stage {stage}"
        ops += [Pointwise(lambda x, b=sampling: b(x.transpose(1, 2))), _backbone(backbone, None)]
    ops += [
        _backbone(pre.vocos_backbone, cond),
        Pointwise(_transposed(pre.linear)),
        Pointwise(lambda x: x + cond[:, :, None]),
        _wave_op(codec.decoder),
    ]
    return Chain(ops)


class StreamDecoder:
    """What every codec's incremental decoder shares: the stream state (codes in, samples out), its limits and
    its copy. A codec's subclass builds :attr:`ops` and says how codes enter them (:meth:`_input`) and how
    final samples are handed out (:meth:`_out`)."""

    ops: Op

    def __init__(self, codec: Any, global_codes: torch.Tensor) -> None:
        self.codec = codec
        global_codes = torch.as_tensor(global_codes)
        if global_codes.dim() != 2:
            raise ValueError(f"expected global codes (B, {codec.num_global_tokens}), got {tuple(global_codes.shape)}")
        _, self.global_codes = codec.check_codes(torch.zeros(len(global_codes), 0, dtype=torch.long), global_codes)
        self.frames = 0  # codes pushed
        self.samples = 0  # samples returned
        self.finished = False
        self.context: int | None = None  # limit_context(): codes of right context the front's outputs wait for
        self._front_out = 0  # frames the front has made final (exactly)
        self._committed = 0  # frames handed on to the ops after the front

    def _check_ops(self) -> None:
        assert self.ops.rate == self.codec.hop_length, f"decoder rate {self.ops.rate} != hop {self.codec.hop_length}"

    @property
    def lag(self) -> int:
        """Samples behind ``hop_length * frames`` that are not final until more codes (or the end) come."""
        if self.context is None:
            return self.ops.lag
        return self.context * self.codec.hop_length + self._back().lag

    @property
    def lookahead(self) -> int:
        """Codes needed after a code before all of its samples are final: ceil(lag / hop_length)."""
        return math.ceil(self.lag / self.codec.hop_length)

    @property
    def min_lookahead(self) -> int:
        """The lookahead of the ops after the frame-rate front: the least :meth:`limit_context` can give."""
        return math.ceil(self._back().lag / self.codec.hop_length)

    def _front_ops(self) -> int:
        """How many of the decoder's top-level ops run at the frame rate before the first that upsamples."""
        ops = self.ops.ops
        return next((i for i, op in enumerate(ops) if op.rate != 1), len(ops))

    def limit_context(self, frames: int) -> None:
        """Approximate decoding with a shorter delay: the frame-rate front commits its outputs ``frames`` codes
        after their code.

        The ops before the first that upsamples (the front: BiCodec's prenet, before its wave generator) hold
        most of the lookahead; from now on each committing push hands the ops after them every front output up
        to ``frames`` codes before the newest code, those
        not yet final computed as if the codes ended there (the offline decode's zero padding). The ops after
        the front then decode each frame once, exactly. :attr:`lookahead` becomes ``frames +``
        :attr:`min_lookahead`. Which frames are committed early depends on how the codes are split into
        pushes; pushing every code at once gives the offline decode.

        Args:
            frames: codes of right context each front output waits for, 0 <= frames < the front's own
                lookahead (beyond it nothing would be approximate).
        """
        if self.frames or self.context is not None:
            raise RuntimeError("limit_context() must come before the first push, once")
        front_lag = self._front().lag
        if not 0 <= frames < front_lag:
            raise ValueError(f"context must be in [0, {front_lag}) frames (the frame-rate front's lookahead), "
                             f"got {frames}")
        self.context = frames

    def _front(self) -> Chain:
        """The frame-rate ops before the first that upsamples (they share their state with :attr:`ops`)."""
        return Chain(self.ops.ops[: self._front_ops()])

    def _back(self) -> Chain:
        """The ops from the first that upsamples on."""
        return Chain(self.ops.ops[self._front_ops() :])

    def _step(self, x: torch.Tensor | None, commit: bool) -> Frames:
        """Run new input frames (if any) through the ops; with a context limit, commit the front's outputs."""
        if self.context is None:
            return None if x is None else self.ops.step(x)
        front = self._front()
        ready = None if x is None else self._from_front(front.step(x))
        target = self.frames - self.context
        if commit and target > self._committed:  # the front's pending outputs, as if the codes ended now
            pending = front.copy().flush()
            assert pending is not None and pending.shape[-1] == self.frames - self._front_out
            ready = _cat(ready, pending[..., self._committed - self._front_out : target - self._front_out])
            self._committed = target
        return None if ready is None else self._back().step(ready)

    def _flush(self) -> Frames:
        if self.context is None:
            return self.ops.flush()
        back = self._back()
        ready = self._from_front(self._front().flush())
        return _cat(None if ready is None else back.step(ready), back.flush())

    def _from_front(self, y: Frames) -> Frames:
        """Exact front outputs (continuing at frame ``_front_out``) less those already committed."""
        if y is None:
            return None
        start, self._front_out = self._front_out, self._front_out + y.shape[-1]
        if self._front_out <= self._committed:
            return None
        y = y[..., max(0, self._committed - start) :]
        self._committed = self._front_out
        return y

    @torch.inference_mode()
    def push(self, semantic: torch.Tensor, commit: bool = True) -> torch.Tensor:
        """Add codes; return the samples that became final.

        Args:
            semantic: (B, T) integer codes in [0, semantic_codebook_size), T >= 0.
            commit: with a context limit (:meth:`limit_context`), commit the front's outputs now; False
                leaves that for a later push (one commit per chunk costs one pass over the pending frames).

        Returns:
            (B, N) float32 samples at the codec's sample rate, continuing the previous outputs (N may be 0).
        """
        if self.finished:
            raise RuntimeError("push() after finish(): this decoder's stream has ended")
        self._check_state()
        semantic, _ = self.codec.check_codes(semantic, self.global_codes)
        self.frames += semantic.shape[1]
        x = self._input(semantic) if semantic.shape[1] else None
        return self._out(self._step(x, commit), final=False)

    @torch.inference_mode()
    def finish(self) -> torch.Tensor:
        """End the stream: return the remaining samples (B, N), float32."""
        if self.finished:
            raise RuntimeError("finish() called twice")
        self._check_state()
        self.finished = True
        out = self._out(self._flush(), final=True)
        assert self.samples == self.frames * self.codec.hop_length, (self.samples, self.frames)
        return out

    def preview(self) -> torch.Tensor:
        """The samples :meth:`finish` would return now, without ending the stream (B, N), float32.

        They are exact only if no more codes come; a stream that goes on changes the last ``lag`` of them.
        Costs the work of decoding about ``lookahead`` codes.
        """
        return self.copy().finish()

    def copy(self) -> StreamDecoder:
        """An independent copy of the state (cheap: it holds only each layer's left context)."""
        new = object.__new__(type(self))
        new.__dict__.update(self.__dict__)
        new.ops = self.ops.copy()
        return new

    def _check_state(self) -> None:
        """Raise when the stream can no longer go on (a subclass's own conditions)."""

    def _input(self, semantic: torch.Tensor) -> torch.Tensor:
        """(B, T) checked codes -> the first op's input (B, C, T)."""
        raise NotImplementedError

    def _out(self, y: Frames, final: bool) -> torch.Tensor:
        """New final samples (B, 1, N) or None -> the samples to hand out now (B, M) float32."""
        raise NotImplementedError


class IncrementalDecoder(StreamDecoder):
    """One stream's BiCodec decoder state: push codes, get the waveform samples that are final.

    Build with :meth:`BiCodec.incremental_decoder`. The concatenation of every :meth:`push` and the
    :meth:`finish` output equals ``BiCodec.decode`` of all the codes (float rounding aside).
    """

    def __init__(self, codec: BiCodec, global_codes: torch.Tensor) -> None:
        super().__init__(codec, global_codes)
        self.ops = decoder_ops(codec, codec.decode_condition(self.global_codes))  # condition (B, condition_dim)
        self._check_ops()

    def _input(self, semantic: torch.Tensor) -> torch.Tensor:
        return self.codec.decode_latents(semantic)

    def _out(self, y: Frames, final: bool) -> torch.Tensor:
        if y is None:
            return torch.zeros(self.global_codes.shape[0], 0)
        self.samples += y.shape[-1]
        return y[:, 0].float()
