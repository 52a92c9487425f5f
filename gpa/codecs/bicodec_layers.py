"""BiCodec building blocks: Vocos backbones, content encoder, factorised VQ, prenet, wave generator.

Module and parameter names follow the BiCodec checkpoint, so ``state_dict`` keys line up with
``model.safetensors`` once weight norm is folded into plain ``weight`` tensors.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from gpa import native

LN_EPS = 1e-6  # every LayerNorm in the Vocos backbones


class AdaLayerNorm(nn.Module):
    """Layer norm without affine terms, then a scale and shift predicted from a condition vector."""

    def __init__(self, condition_dim: int, dim: int) -> None:
        super().__init__()
        self.dim = dim
        self.scale = nn.Linear(condition_dim, dim)
        self.shift = nn.Linear(condition_dim, dim)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """x: (B, T, C), cond: (B, condition_dim) -> (B, T, C)."""
        return self.fixed(cond)(x)

    def fixed(self, cond: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
        """This norm for one condition (B, condition_dim), its scale and shift computed once: a stream's
        decoder applies it to every block of frames (BiCodec: 26 such norms)."""
        scale, shift = self.scale(cond)[:, None], self.shift(cond)[:, None]  # (B, 1, C)
        return lambda x: F.layer_norm(x, (self.dim,), eps=LN_EPS) * scale + shift


def _norm(dim: int, condition_dim: int | None) -> nn.Module:
    return AdaLayerNorm(condition_dim, dim) if condition_dim else nn.LayerNorm(dim, eps=LN_EPS)


def apply_norm(norm: nn.Module, x: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
    """Apply a LayerNorm or an AdaLayerNorm (with ``cond``) to x: (B, T, C)."""
    return norm(x, cond) if isinstance(norm, AdaLayerNorm) else norm(x)


def fixed_norm(norm: nn.Module, cond: torch.Tensor | None) -> Callable[[torch.Tensor], torch.Tensor]:
    """:func:`apply_norm` for one condition, as a function of x (an AdaLayerNorm's scale and shift computed now)."""
    return norm.fixed(cond) if isinstance(norm, AdaLayerNorm) else norm


class ConvNeXtBlock(nn.Module):
    """Depthwise conv k7, (Ada)LayerNorm, pointwise MLP with GELU, layer scale, residual."""

    def __init__(self, dim: int, intermediate_dim: int, condition_dim: int | None = None) -> None:
        super().__init__()
        self.dwconv = nn.Conv1d(dim, dim, kernel_size=7, padding=3, groups=dim)
        self.norm = _norm(dim, condition_dim)
        self.pwconv1 = nn.Linear(dim, intermediate_dim)
        self.pwconv2 = nn.Linear(intermediate_dim, dim)
        self.gamma = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, C, T) -> (B, C, T)."""
        return x + self.branch(self.dwconv(x), cond)

    def branch(self, y: torch.Tensor, cond: torch.Tensor | None = None,
               norm: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
        """The per-frame rest of the residual branch: dwconv output (B, C, T) -> (B, C, T).

        ``norm``: this block's norm already fixed to the condition (:func:`fixed_norm`), instead of ``cond``.
        """
        y = y.transpose(1, 2)  # (B, T, C)
        y = norm(y) if norm is not None else apply_norm(self.norm, y, cond)
        y = self.pwconv2(F.gelu(self.pwconv1(y)))
        return (self.gamma * y).transpose(1, 2)


class VocosBackbone(nn.Module):
    """Embedding conv k7, norm, ConvNeXt blocks, final LayerNorm. Takes (B, C_in, T), returns (B, T, C)."""

    def __init__(self, input_channels: int, dim: int, intermediate_dim: int, num_layers: int,
                 condition_dim: int | None = None) -> None:
        super().__init__()
        self.embed = nn.Conv1d(input_channels, dim, kernel_size=7, padding=3)
        self.norm = _norm(dim, condition_dim)
        self.convnext = nn.ModuleList(
            ConvNeXtBlock(dim, intermediate_dim, condition_dim) for _ in range(num_layers)
        )
        self.final_layer_norm = nn.LayerNorm(dim, eps=LN_EPS)

    def forward(self, x: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        x = self.embed(x).transpose(1, 2)  # (B, T, C)
        x = apply_norm(self.norm, x, cond).transpose(1, 2)  # (B, C, T)
        for block in self.convnext:
            x = block(x, cond)
        return self.final_layer_norm(x.transpose(1, 2))  # (B, T, C)


class SamplingBlock(nn.Module):
    """BiCodec's resampling block at ratio 1, the only ratio the published configs use.

    With no up- or down-sampling its three branches (conv, skip of the merge, skip of the repeat)
    are all the identity, so the block returns 3 * x; the trained weights after it expect that.
    It takes (B, T, C) and returns (B, C, T).
    """

    def __init__(self, ratio: int) -> None:
        super().__init__()
        if ratio != 1:
            raise ValueError(f"BiCodec sample ratio {ratio} is not supported; only 1 (Spark's [1, 1])")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.transpose(1, 2)  # (B, C, T)
        return x + x + x  # summed like the reference, which is bitwise 3 * x


def resampling_stage(dim: int, intermediate_dim: int, ratio: int) -> nn.Sequential:
    """SamplingBlock then a 2-layer VocosBackbone: (B, T, C) -> (B, T, C)."""
    return nn.Sequential(SamplingBlock(ratio), VocosBackbone(dim, dim, intermediate_dim, num_layers=2))


class Snake1d(nn.Module):
    """Snake activation x + sin^2(alpha x) / alpha with a learned alpha per channel."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.alpha = nn.Parameter(torch.ones(1, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ops = native.loaded()  # bf16 decoding with gpa's kernels loaded: one fused pass in float32, rounded once
        if ops is not None and x.dtype == torch.bfloat16 and x.device.type == "cpu" and not (
                torch.is_grad_enabled() and (x.requires_grad or self.alpha.requires_grad)):
            return ops.snake(x, self.alpha)
        return x + (self.alpha + 1e-9).reciprocal() * torch.sin(self.alpha * x).pow(2)


class ResidualUnit(nn.Module):
    """Snake, dilated conv k7, Snake, conv k1, residual (lengths are preserved)."""

    def __init__(self, dim: int, dilation: int) -> None:
        super().__init__()
        self.block = nn.Sequential(
            Snake1d(dim),
            nn.Conv1d(dim, dim, kernel_size=7, dilation=dilation, padding=3 * dilation),
            Snake1d(dim),
            nn.Conv1d(dim, dim, kernel_size=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block(x)


def tap_matrix(weight: torch.Tensor) -> torch.Tensor:
    """A ConvTranspose1d weight (C_in, C_out, k) as the (C_in, k * C_out) matrix :func:`transposed_conv` multiplies by.

    Cached on the weight tensor (rebuilt when its storage, dtype or version changes) outside autograd: a bf16
    matmul on the transposed view of the weight copied it on every call, ~65 ms for BiCodec's first upsampler
    however short the input (a streamed chunk of 5 codes).
    """
    c_in, c_out, k = weight.shape
    if weight.requires_grad and torch.is_grad_enabled():
        return weight.permute(0, 2, 1).reshape(c_in, k * c_out)
    key = (weight.data_ptr(), weight.dtype, None if weight.is_inference() else weight._version)  # no counter there
    cached = getattr(weight, "_gpa_taps", None)
    if cached is None or cached[0] != key:
        with torch.inference_mode(False), torch.no_grad():
            taps = weight.detach().permute(0, 2, 1).reshape(c_in, k * c_out).contiguous()
        cached = (key, taps)
        weight._gpa_taps = cached  # type: ignore[attr-defined]
    return cached[1]


def transposed_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride: int) -> torch.Tensor:
    """ConvTranspose1d without cropping, as one matrix product and an overlap-add of whole blocks.

    PyTorch's CPU kernel falls back to a very slow path for short inputs (the streaming decoder's
    blocks); this form is fast at every length. Time-major: input frame t's k outputs land at t * stride
    + j, so tap block i (taps i s .. i s + s - 1) of every frame is one contiguous add, shifted by i frames.
    x: (B, C_in, T), weight: (C_in, C_out, k) -> (B, C_out, (T - 1) * stride + k).
    """
    c_in, c_out, k = weight.shape
    batch, _, t = x.shape
    blocks = -(-k // stride)
    cols = torch.matmul(x.transpose(1, 2), tap_matrix(weight)).view(batch, t, k, c_out)  # (B, T, k, C_out)
    y = x.new_zeros(batch, t + blocks - 1, stride, c_out)
    for i in range(blocks):
        taps = cols[:, :, i * stride : (i + 1) * stride]
        y[:, i : i + t, : taps.shape[2]] += taps
    y = y.view(batch, -1, c_out)[:, : (t - 1) * stride + k].transpose(1, 2)  # (B, C_out, n)
    return y if bias is None else y + bias[:, None]


class Upsample(nn.ConvTranspose1d):
    """ConvTranspose1d (same parameters and output) computed with :func:`transposed_conv`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        """x: (B, C_in, T) -> (B, C_out, T * stride)."""
        p = self.padding[0]
        y = transposed_conv(x, self.weight, self.bias, self.stride[0])
        return y[..., p : y.shape[-1] - p]


class DecoderBlock(nn.Module):
    """Snake, transposed conv upsampling by ``stride``, residual units with dilation 1, 3, 9."""

    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int) -> None:
        super().__init__()
        if (kernel - stride) % 2:
            raise ValueError(f"decoder kernel {kernel} and rate {stride} must differ by an even number")
        self.block = nn.Sequential(
            Snake1d(c_in),
            Upsample(c_in, c_out, kernel, stride=stride, padding=(kernel - stride) // 2),
            ResidualUnit(c_out, 1),
            ResidualUnit(c_out, 3),
            ResidualUnit(c_out, 9),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)  # (B, C_out, T * stride)


class WaveGenerator(nn.Module):
    """Conv k7, upsampling blocks halving the channels each time, Snake, conv k7 to one channel, tanh."""

    def __init__(self, input_channel: int, channels: int, rates: list[int], kernel_sizes: list[int]) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv1d(input_channel, channels, kernel_size=7, padding=3)]
        for i, (kernel, stride) in enumerate(zip(kernel_sizes, rates, strict=True)):
            layers.append(DecoderBlock(channels // 2**i, channels // 2 ** (i + 1), kernel, stride))
        out_dim = channels // 2 ** len(rates)
        layers += [Snake1d(out_dim), nn.Conv1d(out_dim, 1, kernel_size=7, padding=3), nn.Tanh()]
        self.model = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C, T) -> (B, 1, T * prod(rates))."""
        return self.model(x)


class Encoder(nn.Module):
    """Content encoder: wav2vec2 features (B, C_in, T) -> latents (B, C_out, T)."""

    def __init__(self, input_channels: int, dim: int, intermediate_dim: int, num_layers: int,
                 out_channels: int, sample_ratios: tuple[int, ...]) -> None:
        super().__init__()
        self.encoder = VocosBackbone(input_channels, dim, intermediate_dim, num_layers)
        self.downsample = nn.Sequential(*(resampling_stage(dim, intermediate_dim, r) for r in sample_ratios))
        self.project = nn.Linear(dim, out_channels)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        x = self.downsample(self.encoder(feats))  # (B, T, D)
        return self.project(x).transpose(1, 2)


class FactorizedVQ(nn.Module):
    """Project to a low-dimensional space and pick the nearest L2-normalised codebook entry."""

    def __init__(self, input_dim: int, codebook_size: int, codebook_dim: int) -> None:
        super().__init__()
        if input_dim == codebook_dim:
            raise ValueError("a factorised VQ needs codebook_dim != input_dim")
        self.in_project = nn.Conv1d(input_dim, codebook_dim, kernel_size=1)
        self.out_project = nn.Conv1d(codebook_dim, input_dim, kernel_size=1)
        self.codebook = nn.Embedding(codebook_size, codebook_dim)

    def tokenize(self, z: torch.Tensor) -> torch.Tensor:
        """z: (B, C, T) -> (B, T) int64 codes."""
        B, d = z.shape[0], self.codebook.embedding_dim
        z = self.in_project(z)
        if not torch.isfinite(z).all():
            raise FloatingPointError("non-finite content latents before the VQ; are the weights valid?")
        e = F.normalize(z.transpose(1, 2).reshape(-1, d))  # (B*T, d)
        c = F.normalize(self.codebook.weight)  # (K, d)
        # The full squared distance (not just the dot product), as the reference computes it, so
        # that near ties round the same way.
        dist = e.pow(2).sum(1, keepdim=True) - 2 * e @ c.t() + c.pow(2).sum(1, keepdim=True).t()
        return (-dist).max(dim=1).indices.reshape(B, -1)

    def detokenize(self, codes: torch.Tensor) -> torch.Tensor:
        """codes: (B, T) -> (B, C, T), from the raw (un-normalised) codebook."""
        return self.out_project(self.codebook(codes).transpose(1, 2))


class Prenet(nn.Module):
    """Quantised latents (B, C, T) and speaker vector (B, cond) -> decoder input (B, C_out, T)."""

    def __init__(self, input_channels: int, dim: int, intermediate_dim: int, num_layers: int,
                 out_channels: int, condition_dim: int, sample_ratios: tuple[int, ...]) -> None:
        super().__init__()
        self.linear_pre = nn.Linear(input_channels, dim)
        self.downsample = nn.Sequential(*(resampling_stage(dim, intermediate_dim, r) for r in sample_ratios))
        self.vocos_backbone = VocosBackbone(dim, dim, intermediate_dim, num_layers, condition_dim)
        self.linear = nn.Linear(dim, out_channels)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        x = self.downsample(self.linear_pre(x.transpose(1, 2)))  # (B, T, D)
        x = self.vocos_backbone(x.transpose(1, 2), cond)  # (B, T, D)
        return self.linear(x).transpose(1, 2)
