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

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from gpa.codecs.bicodec_stream import (
    Chain,
    Conv,
    ConvTranspose,
    Frames,
    Op,
    Parallel,
    Pointwise,
    Residual,
    StreamDecoder,
    _cat,
)
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


class IncrementalDecoder(StreamDecoder):
    """One stream's nano decoder state: push semantic codes, get the waveform samples that are final.

    Build with :meth:`NanoCodec.incremental_decoder`. Every code is decoded once; the concatenation of
    every :meth:`push` and the :meth:`finish` output equals ``NanoCodec.decode`` of all the codes
    (float rounding aside). After n codes, exactly ``max(0, n - lookahead) * hop_length`` samples are
    out, on the CPU. The codec's decode dtype (:meth:`NanoCodec.set_decode_dtype`) is fixed for the
    stream's life.
    """

    @torch.inference_mode()
    def __init__(self, codec: NanoCodec, global_codes: torch.Tensor) -> None:
        global_codes = torch.as_tensor(global_codes)
        super().__init__(codec, global_codes[None] if global_codes.dim() == 1 else global_codes)
        self.dtype = codec.decode_dtype
        cond = codec.speaker.condition_from_codes(self.global_codes).to(self.dtype)  # (B, speaker_vector)
        self.ops = Chain([token_decoder_ops(codec.decoder, cond), vocoder_ops(codec.vocoder)])
        self._check_ops()
        self.held: Frames = None  # final samples not yet returned (less than one code's)

    def _check_state(self) -> None:
        if self.codec.decode_dtype != self.dtype:
            raise RuntimeError(f"the codec's decode dtype changed from {self.dtype} to {self.codec.decode_dtype} "
                               "during a stream; start a new incremental decoder")

    def _input(self, semantic: torch.Tensor) -> torch.Tensor:
        return semantic[:, None]

    def _out(self, y: Frames, final: bool) -> torch.Tensor:
        """Add new final samples (B, 1, N); hand out those of whole codes (all of them at the end)."""
        held = _cat(self.held, y)
        codes_out = self.frames if final else max(0, self.frames - self.lookahead)
        n = codes_out * self.codec.hop_length - self.samples
        if held is None or n <= 0:
            self.held = held
            assert not final or held is None, f"{held.shape[-1]} samples past the end"
            return torch.zeros(self.global_codes.shape[0], 0)
        assert held.shape[-1] >= n, f"{n} samples due, {held.shape[-1]} final"
        self.held = held[..., n:] if held.shape[-1] > n else None
        assert not final or self.held is None, f"{self.held.shape[-1]} samples past the end"
        self.samples += n
        return held[:, 0, :n].float().cpu()
