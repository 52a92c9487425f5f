"""Incremental GPA-nano decoding: semantic codes in, final waveform samples out, nothing computed twice.

The nano decode path is local in time, like BiCodec's, and is built from the same incremental ops
(:mod:`gpa.codecs.bicodec_stream`):

- token decoder: the code embedding and the per-code mel patch (``mel_table``) are lookups, so
  pointwise on codes; ConvNeXt blocks (depthwise conv, then per-frame norm and MLP) at the code
  rate; the transposed-conv upsampler; ConvNeXt blocks at the mel rate; the norm and head; and the
  mel-patch branch added to the network's output (a :class:`Parallel` sum of two branches of one rate);
- HiFi-GAN: conv_pre, then per stage LeakyReLU, transposed conv and the mean of its residual blocks
  (a :class:`Parallel` mean), then LeakyReLU, conv_post and tanh.

The upsampler's output crop ``[:, :, :T * r]`` is at the end only, so it holds nothing back while
streaming: the transposed conv makes ``(T + 1) r`` frames and its padding drops ``r // 2`` at each end,
leaving ``T r`` (``T r + 1`` with an odd ``r``, whose last frame the crop cuts). What is kept are the
uncropped frames ``[r // 2, T r + r // 2)``: exactly those a :class:`ConvTranspose` op emits, the last
``r // 2`` of them on :meth:`Op.flush`.

After n codes ``n * hop_length - lag`` samples are final; :class:`IncrementalDecoder` hands them out
in whole codes (``(n - lookahead) * hop_length``), the contract of the windowed decoder it replaces,
which holds back less than one code's samples.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from gpa.codecs.bicodec_stream import Chain, Conv, ConvTranspose, Frames, Op, Parallel, Pointwise, Residual, _cat
from gpa.codecs.hifigan import _POST_SLOPE, _SLOPE, HiFiGAN, ResBlock

if TYPE_CHECKING:
    from torch import nn

    from gpa.codecs.nano import ConvNeXtBlock, NanoCodec, TokenDecoder


class Patches(Op):
    """Each input frame becomes ``rate`` output frames by a per-frame map (no context, no lag)."""

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor], rate: int) -> None:
        self.fn, self.rate = fn, rate

    def step(self, x: torch.Tensor) -> Frames:
        return self.fn(x)


def _convnext(block: ConvNeXtBlock, cond: torch.Tensor) -> Op:
    """``ConvNeXtBlock.forward``: x + MLP(conditioned norm(depthwise conv(x))), on (B, D, T)."""
    scale, shift = block.ada(cond)[:, None].chunk(2, dim=-1) if block.ada is not None else (None, None)

    def branch(y: torch.Tensor) -> torch.Tensor:
        h = block.norm(y.transpose(1, 2))  # (B, T, D)
        if scale is not None:
            h = h * (1 + scale) + shift
        return block.pw2(F.gelu(block.pw1(h))).transpose(1, 2)

    return Residual(Chain([Conv(block.dw), Pointwise(branch)]))


def _upsampler(up: nn.ConvTranspose1d, r: int) -> Op:
    (k,), (s,), (p,) = up.kernel_size, up.stride, up.padding
    if s != r or k - s < 2 * p:  # the offline crop must keep uncropped frames [p, T r + p)
        raise ValueError(f"no incremental form for the token decoder's upsampler {up} at {r} mel frames per code")
    return ConvTranspose(up)


def token_decoder_ops(dec: TokenDecoder, cond: torch.Tensor) -> Op:
    """``TokenDecoder.forward`` as ops: codes (B, 1, T) int64 -> log-mel (B, n_mels, r T).

    Args:
        dec: the token decoder.
        cond: (B, speaker_vector) condition in the decoder's dtype.
    """
    r, m = dec.r, dec.n_mels

    def patches(codes: torch.Tensor) -> torch.Tensor:  # (B, 1, T) -> (B, n_mels, r T)
        b, _, t = codes.shape
        return dec.mel_table(codes[:, 0]).reshape(b, t * r, m).transpose(1, 2)

    net = Chain([
        Pointwise(lambda codes: dec.embed(codes[:, 0]).transpose(1, 2)),  # (B, D, T)
        *(_convnext(b, cond) for b in dec.token_blocks),
        _upsampler(dec.up, r),  # (B, D, r T)
        *(_convnext(b, cond) for b in dec.mel_blocks),
        Pointwise(lambda x: dec.head(dec.norm(x.transpose(1, 2))).transpose(1, 2)),  # (B, n_mels, r T)
    ])
    return Parallel([Patches(patches, r), net])  # base + network, as offline


def _resblock(block: ResBlock) -> Op:
    def act(x: torch.Tensor) -> torch.Tensor:
        return F.leaky_relu(x, _SLOPE)

    return Chain([Residual(Chain([Pointwise(act), Conv(c1), Pointwise(act), Conv(c2)]))
                  for c1, c2 in zip(block.convs1, block.convs2, strict=True)])


def vocoder_ops(voc: HiFiGAN) -> Op:
    """``HiFiGAN.forward`` as ops: log-mel (B, n_mels, T) -> waveform (B, 1, T * hop)."""
    n = len(voc.config.resblock_kernel_sizes)
    ops: list[Op] = [Pointwise(lambda x: x.to(voc.conv_pre.weight.dtype)), Conv(voc.conv_pre)]
    for i, up in enumerate(voc.ups):
        (k,), (s,), (p,) = up.kernel_size, up.stride, up.padding
        if k - s != 2 * p:  # else the offline output is not T * stride frames long
            raise ValueError(f"no incremental form for HiFi-GAN upsampler {up}: need kernel - stride == 2 * padding")
        ops += [Pointwise(lambda x: F.leaky_relu(x, _SLOPE)), ConvTranspose(up),
                Parallel([_resblock(voc.resblocks[i * n + j]) for j in range(n)], mean=True)]
    ops += [Pointwise(lambda x: F.leaky_relu(x, _POST_SLOPE)), Conv(voc.conv_post), Pointwise(torch.tanh)]
    return Chain(ops)


class IncrementalDecoder:
    """One stream's nano decoder state: push semantic codes, get the waveform samples that are final.

    Build with :meth:`NanoCodec.incremental_decoder`. Every code is decoded once; the concatenation of
    every :meth:`push` and the :meth:`finish` output equals ``NanoCodec.decode`` of all the codes
    (float rounding aside). After n codes, exactly ``max(0, n - lookahead) * hop_length`` samples are
    out. The codec's decode dtype (:meth:`NanoCodec.set_decode_dtype`) is fixed for the stream's life.
    """

    @torch.inference_mode()
    def __init__(self, codec: NanoCodec, global_codes: torch.Tensor) -> None:
        self.codec = codec
        global_codes = torch.as_tensor(global_codes)
        if global_codes.dim() == 1:
            global_codes = global_codes[None]
        if global_codes.dim() != 2:
            raise ValueError(f"expected global codes ({codec.num_global_tokens},) or (B, {codec.num_global_tokens}),"
                             f" got {tuple(global_codes.shape)}")
        _, self.global_codes = codec.check_codes(torch.zeros(len(global_codes), 0, dtype=torch.long), global_codes)
        self.dtype = codec.decode_dtype
        cond = codec.speaker.condition_from_codes(self.global_codes).to(self.dtype)  # (B, speaker_vector)
        self.ops = Chain([token_decoder_ops(codec.decoder, cond), vocoder_ops(codec.vocoder)])
        assert self.ops.rate == codec.hop_length, f"decoder rate {self.ops.rate} != hop {codec.hop_length}"
        self.frames = 0  # codes pushed
        self.samples = 0  # samples returned
        self.held: Frames = None  # final samples not yet returned (less than one code's)
        self.finished = False

    @property
    def lag(self) -> int:
        """Samples behind ``hop_length * frames`` that are not final until more codes (or the end) come."""
        return self.ops.lag

    @property
    def lookahead(self) -> int:
        """Codes needed after a code before all of its samples are final: ceil(lag / hop_length)."""
        return math.ceil(self.ops.lag / self.codec.hop_length)

    @torch.inference_mode()
    def push(self, semantic: torch.Tensor) -> torch.Tensor:
        """Add codes; return the samples that became final.

        Args:
            semantic: (B, T) integer codes in [0, semantic_codebook_size), T >= 0.

        Returns:
            (B, N) float32 samples on the CPU at :attr:`NanoCodec.sample_rate`, continuing the
            previous outputs; N = (max(0, frames - lookahead) - max(0, old frames - lookahead)) * hop_length.
        """
        if self.finished:
            raise RuntimeError("push() after finish(): this decoder's stream has ended")
        self._check_dtype()
        semantic, _ = self.codec.check_codes(semantic, self.global_codes)
        if not semantic.shape[1]:
            return self._out(None, max(0, self.frames - self.lookahead))
        self.frames += semantic.shape[1]
        return self._out(self.ops.step(semantic[:, None]), max(0, self.frames - self.lookahead))

    @torch.inference_mode()
    def finish(self) -> torch.Tensor:
        """End the stream: return the remaining samples (B, N), float32 on the CPU."""
        if self.finished:
            raise RuntimeError("finish() called twice")
        self._check_dtype()
        self.finished = True
        out = self._out(self.ops.flush(), self.frames)
        assert self.held is None, f"{self.held.shape[-1]} samples past the end"
        return out

    def preview(self) -> torch.Tensor:
        """The samples :meth:`finish` would return now, without ending the stream (B, N), float32.

        They are exact only if no more codes come. Costs the work of decoding about ``lookahead`` codes.
        """
        return self.copy().finish()

    def copy(self) -> IncrementalDecoder:
        """An independent copy of the state (cheap: it holds only each layer's left context)."""
        new = object.__new__(IncrementalDecoder)
        new.__dict__.update(self.__dict__)
        new.ops = self.ops.copy()
        return new

    def _check_dtype(self) -> None:
        if self.codec.decode_dtype != self.dtype:
            raise RuntimeError(f"the codec's decode dtype changed from {self.dtype} to {self.codec.decode_dtype} "
                               "during a stream; start a new incremental decoder")

    def _out(self, y: Frames, codes_out: int) -> torch.Tensor:
        """Add new final samples (B, 1, N); return those up to ``codes_out`` codes' worth (B, M)."""
        held = _cat(self.held, y)
        n = codes_out * self.codec.hop_length - self.samples
        if held is None or n <= 0:
            self.held = held
            return torch.zeros(self.global_codes.shape[0], 0)
        assert held.shape[-1] >= n, f"{n} samples due, {held.shape[-1]} final"
        self.held = held[..., n:] if held.shape[-1] > n else None
        self.samples += n
        return held[:, 0, :n].float().cpu()
