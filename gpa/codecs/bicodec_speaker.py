"""BiCodec's speaker branch: ECAPA-TDNN latents -> Perceiver resampler -> FSQ global tokens, and back.

Only the frame-level latent branch of the ECAPA-TDNN is built; its x-vector head (attentive
pooling, batch norm, linear) exists in the checkpoint but plays no part in tokenisation.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

ECAPA_CHANNELS = 512  # fixed in the reference (ECAPA_TDNN_GLOB_c512)
ECAPA_LATENT = 3 * 512  # width of the latent map (cat of three 512-channel blocks, projected)
RES2_SCALE = 8
SE_BOTTLENECK = 128
PERCEIVER_DEPTH = 2
PERCEIVER_HEADS = 8
PERCEIVER_HEAD_DIM = 64
PERCEIVER_FF_MULT = 4
FSQ_EPS = 1e-3  # FSQ bound(): half range (L - 1) * (1 + eps) / 2


class ConvReluBn(nn.Module):
    """Conv1d, ReLU, BatchNorm (in that order)."""

    def __init__(self, c_in: int, c_out: int, kernel: int = 1, padding: int = 0, dilation: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv1d(c_in, c_out, kernel, padding=padding, dilation=dilation)
        self.bn = nn.BatchNorm1d(c_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(F.relu(self.conv(x)))


class Res2Conv(nn.Module):
    """Res2Net-style multi-scale conv: channel groups processed in a chain, the last group passed through."""

    def __init__(self, channels: int, kernel: int, padding: int, dilation: int, scale: int) -> None:
        super().__init__()
        self.width = channels // scale
        n = scale - 1
        self.convs = nn.ModuleList(
            nn.Conv1d(self.width, self.width, kernel, padding=padding, dilation=dilation) for _ in range(n)
        )
        self.bns = nn.ModuleList(nn.BatchNorm1d(self.width) for _ in range(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = torch.split(x, self.width, dim=1)
        out, sp = [], parts[0]
        for i, (conv, bn) in enumerate(zip(self.convs, self.bns, strict=True)):
            if i:
                sp = sp + parts[i]
            sp = bn(F.relu(conv(sp)))
            out.append(sp)
        out.append(parts[len(self.convs)])
        return torch.cat(out, dim=1)


class SqueezeExcite(nn.Module):
    """Channel gating from the time-averaged activations."""

    def __init__(self, channels: int, bottleneck: int) -> None:
        super().__init__()
        self.linear1 = nn.Linear(channels, bottleneck)
        self.linear2 = nn.Linear(bottleneck, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = torch.sigmoid(self.linear2(F.relu(self.linear1(x.mean(dim=2)))))  # (B, C)
        return x * gate[:, :, None]


class SERes2Block(nn.Module):
    """1x1 ConvReluBn, Res2 conv, 1x1 ConvReluBn, squeeze-excite; residual."""

    def __init__(self, channels: int, dilation: int) -> None:
        super().__init__()
        self.se_res2block = nn.Sequential(
            ConvReluBn(channels, channels),
            Res2Conv(channels, kernel=3, padding=dilation, dilation=dilation, scale=RES2_SCALE),
            ConvReluBn(channels, channels),
            SqueezeExcite(channels, SE_BOTTLENECK),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.se_res2block(x)


class EcapaLatent(nn.Module):
    """ECAPA-TDNN (512 channels) up to its frame-level latent map."""

    def __init__(self, feat_dim: int) -> None:
        super().__init__()
        c = ECAPA_CHANNELS
        self.layer1 = ConvReluBn(feat_dim, c, kernel=5, padding=2)
        self.layer2 = SERes2Block(c, dilation=2)
        self.layer3 = SERes2Block(c, dilation=3)
        self.layer4 = SERes2Block(c, dilation=4)
        self.conv = nn.Conv1d(3 * c, ECAPA_LATENT, kernel_size=1)

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        """mel: (B, n_mels, T) -> (B, 1536, T)."""
        out1 = self.layer1(mel)
        out2 = self.layer2(out1)
        out3 = self.layer3(out2)
        out4 = self.layer4(out3)
        return F.relu(self.conv(torch.cat([out2, out3, out4], dim=1)))


class CrossAttention(nn.Module):
    """Latents attend to themselves concatenated with the context; bias-free projections."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        inner = PERCEIVER_HEADS * PERCEIVER_HEAD_DIM
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(self, latents: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        B, N, _ = latents.shape
        kv = torch.cat([latents, context], dim=1)  # (B, N + T, dim)
        k, v = self.to_kv(kv).chunk(2, dim=-1)
        q, k, v = (t.reshape(B, t.shape[1], PERCEIVER_HEADS, -1).transpose(1, 2)
                   for t in (self.to_q(latents), k, v))  # (B, H, *, head_dim)
        att = torch.softmax(q @ k.transpose(2, 3) * PERCEIVER_HEAD_DIM**-0.5, dim=-1)  # (B, H, N, N + T)
        return self.to_out((att @ v).transpose(1, 2).reshape(B, N, -1))


class GEGLU(nn.Module):
    """Split in two halves; GELU of the second gates the first."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, gate = x.chunk(2, dim=-1)
        return F.gelu(gate) * x


def feed_forward(dim: int) -> nn.Sequential:
    """Linear -> GEGLU -> Linear with inner width int(dim * mult * 2 / 3)."""
    inner = int(dim * PERCEIVER_FF_MULT * 2 / 3)
    return nn.Sequential(nn.Linear(dim, 2 * inner), GEGLU(), nn.Linear(inner, dim))


class RMSNorm(nn.Module):
    """x / ||x|| * sqrt(dim) * gamma."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.scale = dim**0.5
        self.gamma = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, dim=-1) * self.scale * self.gamma


class PerceiverResampler(nn.Module):
    """Resample a (B, T, dim_context) sequence into ``num_latents`` learned query vectors."""

    def __init__(self, dim: int, dim_context: int, num_latents: int) -> None:
        super().__init__()
        self.proj_context = nn.Linear(dim_context, dim)
        self.latents = nn.Parameter(torch.zeros(num_latents, dim))
        self.layers = nn.ModuleList(
            nn.ModuleList([CrossAttention(dim), feed_forward(dim)]) for _ in range(PERCEIVER_DEPTH)
        )
        self.norm = RMSNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, T, dim_context) -> (B, num_latents, dim)."""
        context = self.proj_context(x)
        latents = self.latents.expand(x.shape[0], -1, -1)
        for attn, ff in self.layers:
            latents = attn(latents, context) + latents
            latents = ff(latents) + latents
        return self.norm(latents)


def fsq_bound(z: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """FSQ's bound: z (..., D) -> values whose rounding gives L distinct integers per dimension (offset by a
    half for even L), in the float32 tensor arithmetic of the reference so that rounding sees its values."""
    half_l = (levels - 1) * (1 + FSQ_EPS) / 2
    offset = torch.where(levels % 2 == 0, 0.5, 0.0)
    shift = (offset / half_l).atanh()
    return (z + shift).tanh() * half_l - offset


class FSQ(nn.Module):
    """Finite scalar quantisation with a linear projection in and out (one quantiser)."""

    def __init__(self, levels: list[int], dim: int) -> None:
        super().__init__()
        self.levels = list(levels)
        self.project_in = nn.Linear(dim, len(levels))
        self.project_out = nn.Linear(len(levels), dim)
        basis = [math.prod(levels[:i]) for i in range(len(levels))]
        self.register_buffer("_levels", torch.tensor(levels, dtype=torch.int32, device="cpu"), persistent=False)
        self.register_buffer("_basis", torch.tensor(basis, dtype=torch.int32, device="cpu"), persistent=False)

    @property
    def codebook_size(self) -> int:
        return math.prod(self.levels)

    def _bound(self, z: torch.Tensor) -> torch.Tensor:
        return fsq_bound(z, self._levels)

    def tokenize(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, N, dim) -> (B, N) int64 indices in [0, codebook_size)."""
        z = self.project_in(x).float()  # quantisation always runs in float32, as in the reference
        if not torch.isfinite(z).all():
            raise FloatingPointError("non-finite speaker latents before FSQ; are the weights (BatchNorm "
                                     "running_var) valid?")
        half_width = self._levels // 2
        codes = self._bound(z).round() / half_width  # (B, N, D) in [-1, 1]
        return ((codes * half_width + half_width) * self._basis).sum(dim=-1).long()

    def detokenize(self, indices: torch.Tensor) -> torch.Tensor:
        """indices: (B, N) -> (B, N, dim) projected codes."""
        level = (indices[..., None] // self._basis) % self._levels  # (B, N, D)
        half_width = self._levels // 2
        codes = (level - half_width) / half_width
        return self.project_out(codes.to(self.project_out.weight.dtype))


class SpeakerEncoder(nn.Module):
    """Mel -> global tokens (tokenize) and global tokens -> speaker condition vector (detokenize)."""

    def __init__(
        self, input_dim: int, out_dim: int, latent_dim: int, token_num: int, fsq_levels: list[int]
    ) -> None:
        super().__init__()
        self.token_num = token_num
        self.speaker_encoder = EcapaLatent(input_dim)
        self.perceiver_sampler = PerceiverResampler(latent_dim, ECAPA_LATENT, token_num)
        self.quantizer = FSQ(fsq_levels, latent_dim)
        self.project = nn.Linear(latent_dim * token_num, out_dim)

    def tokenize(self, mel: torch.Tensor) -> torch.Tensor:
        """mel: (B, n_mels, T) -> (B, token_num) int64."""
        latent = self.speaker_encoder(mel)  # (B, 1536, T)
        return self.quantizer.tokenize(self.perceiver_sampler(latent.transpose(1, 2)))

    def detokenize(self, indices: torch.Tensor) -> torch.Tensor:
        """indices: (B, token_num) -> (B, out_dim)."""
        z = self.quantizer.detokenize(indices)  # (B, N, latent)
        # The reference flattens channel-major: element (n, c) lands at c * token_num + n.
        return self.project(z.transpose(1, 2).reshape(z.shape[0], -1))
