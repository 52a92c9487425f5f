"""Prototype token decoder and speaker (global-token) encoder for GPA-nano (to be moved into gpa/codecs).

TokenDecoder: 50 Hz semantic codes -> embeddings -> ConvNeXt blocks -> linear resampling to the
vocoder's 86.13 Hz frame rate -> ConvNeXt blocks conditioned by the speaker vector (adaptive LayerNorm)
-> 80-band HiFi-GAN log-mel.
SpeakerEncoder: reference log-mel -> ConvNeXt blocks -> attention pooling with 32 learned queries ->
FSQ (levels 4^6 = 4096 codes per token, straight-through rounding) -> 32 global codes -> speaker vector.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

FSQ_LEVELS = (4, 4, 4, 4, 4, 4)  # 4096 codes per global token, BiCodec's global codebook size


class Block(nn.Module):
    """ConvNeXt-1D block; with ``cond_dim`` the LayerNorm scale/shift come from a conditioning vector."""

    def __init__(self, dim: int, cond_dim: int = 0, kernel: int = 7) -> None:
        super().__init__()
        self.dw = nn.Conv1d(dim, dim, kernel, padding=kernel // 2, groups=dim)
        self.norm = nn.LayerNorm(dim, elementwise_affine=cond_dim == 0)
        self.ada = nn.Linear(cond_dim, 2 * dim) if cond_dim else None
        self.pw1, self.pw2 = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)
        nn.init.zeros_(self.pw2.weight)
        nn.init.zeros_(self.pw2.bias)

    def forward(self, x: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, D, T); cond (B, C) -> (B, D, T)."""
        h = self.norm(self.dw(x).transpose(1, 2))  # (B, T, D)
        if self.ada is not None:
            scale, shift = self.ada(cond)[:, None].chunk(2, dim=-1)
            h = h * (1 + scale) + shift
        return x + self.pw2(F.gelu(self.pw1(h))).transpose(1, 2)


def fsq(z: torch.Tensor, levels: tuple[int, ...] = FSQ_LEVELS) -> tuple[torch.Tensor, torch.Tensor]:
    """Finite scalar quantization: (..., len(levels)) -> (quantized in [-1, 1], codes (...,) int64)."""
    lv = torch.tensor(levels, dtype=z.dtype, device=z.device)
    half = (lv - 1) / 2
    bounded = torch.tanh(z) * half  # (..., d) in [-half, half]
    q = bounded + (torch.round(bounded) - bounded).detach()  # straight-through
    digits = (torch.round(bounded) + half).long()  # (..., d) in [0, level)
    basis = torch.cumprod(torch.tensor((1,) + levels[:-1], device=z.device), 0)
    return q / half, (digits * basis).sum(-1)


class SpeakerEncoder(nn.Module):
    """Reference log-mel (B, 80, T) -> 32 FSQ global codes and a (B, out_dim) speaker vector."""

    def __init__(self, n_mels: int = 80, dim: int = 128, n_tokens: int = 32, out_dim: int = 192,
                 n_blocks: int = 2) -> None:
        super().__init__()
        self.inp = nn.Conv1d(n_mels, dim, 5, padding=2)
        self.blocks = nn.ModuleList(Block(dim) for _ in range(n_blocks))
        self.queries = nn.Parameter(torch.randn(n_tokens, dim) * 0.02)
        self.attn = nn.MultiheadAttention(dim, 4, batch_first=True)
        self.to_fsq = nn.Linear(dim, len(FSQ_LEVELS))
        self.out = nn.Sequential(nn.Linear(n_tokens * len(FSQ_LEVELS), out_dim), nn.GELU(), nn.Linear(out_dim, out_dim))

    def codes_and_vector(self, mel: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.inp(mel)
        for b in self.blocks:
            x = b(x)
        q = self.queries[None].expand(len(mel), -1, -1)
        pooled, _ = self.attn(q, x.transpose(1, 2), x.transpose(1, 2))  # (B, 32, D)
        zq, codes = fsq(self.to_fsq(pooled))  # (B, 32, 6), (B, 32)
        return codes, self.vector(zq)

    def vector(self, zq: torch.Tensor) -> torch.Tensor:
        """(B, 32, 6) quantized global tokens -> (B, out_dim)."""
        return self.out(zq.flatten(1))

    def vector_from_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """(B, 32) int64 global codes -> (B, out_dim): what the decoder sees at inference."""
        lv = torch.tensor(FSQ_LEVELS, device=codes.device)
        basis = torch.cumprod(torch.tensor((1,) + FSQ_LEVELS[:-1], device=codes.device), 0)
        digits = (codes[..., None] // basis) % lv
        half = (lv - 1) / 2
        return self.vector((digits - half) / half)


class TokenDecoder(nn.Module):
    """(B, T) semantic codes at 50 Hz + speaker vector -> (B, 80, T_mel) HiFi-GAN log-mel."""

    def __init__(self, k: int, dim: int = 192, cond_dim: int = 192, n_pre: int = 2, n_post: int = 4,
                 n_mels: int = 80) -> None:
        super().__init__()
        self.embed = nn.Embedding(k, dim)
        self.mel_table = nn.Embedding(k, n_mels)  # per-code mean mel: the residual network refines it
        self.pre = nn.ModuleList(Block(dim, cond_dim) for _ in range(n_pre))
        self.post = nn.ModuleList(Block(dim, cond_dim) for _ in range(n_post))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, n_mels)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, codes: torch.Tensor, spk: torch.Tensor, mel_frames: int) -> torch.Tensor:
        x = self.embed(codes).transpose(1, 2)  # (B, D, T)
        for b in self.pre:
            x = b(x, spk)
        x = F.interpolate(x, size=mel_frames, mode="linear", align_corners=False)  # (B, D, T_mel)
        for b in self.post:
            x = b(x, spk)
        base = F.interpolate(self.mel_table(codes).transpose(1, 2), size=mel_frames, mode="linear",
                             align_corners=False)  # (B, 80, T_mel)
        return base + self.head(self.norm(x.transpose(1, 2))).transpose(1, 2)


def mel_frames_for(token_frames: int) -> int:
    """Mel frames (hop 256 at 22,050 Hz) covering ``token_frames`` 20 ms frames."""
    return round(token_frames * 0.02 * 22050 / 256)
