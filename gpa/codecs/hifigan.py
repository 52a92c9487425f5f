"""HiFi-GAN V1 generator (Kong et al. 2020) and the log-mel it was trained on, read from safetensors.

Mel (the HiFi-GAN training recipe): reflect-pad (n_fft - hop) / 2 samples on both sides, STFT without
centring (periodic Hann window), magnitude ``sqrt(re^2 + im^2 + 1e-9)``, Slaney mel filters
(fmin..fmax), natural log of ``max(x, 1e-5)``. One frame per ``hop`` samples.

Generator: conv_pre (k7) -> per upsampling stage: LeakyReLU(0.1), transposed conv, mean of
``len(resblock_kernel_sizes)`` residual blocks (each: three pairs of dilated/plain convs with
LeakyReLU(0.1) before each) -> LeakyReLU(0.01) -> conv_post (k7) -> tanh. Weight norm is folded into
plain weights at conversion time (:func:`gpa.weights.fold_weight_norm`).
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from gpa.codecs.mel import slaney_filterbank
from gpa.config import require_fields
from gpa.weights import CheckpointError, load_strict, read_safetensors

logger = logging.getLogger(__name__)

_SLOPE = 0.1  # LeakyReLU slope inside the network
_POST_SLOPE = 0.01  # the last LeakyReLU uses torch's default slope, as the original does
_MAG_EPS = 1e-9
_LOG_FLOOR = 1e-5


@dataclass(frozen=True)
class HiFiGANConfig:
    """V1 hyper-parameters and mel format (defaults: the ``universal`` 22,050 Hz model)."""

    sample_rate: int = 22050  # output rate
    n_mels: int = 80  # input bands
    n_fft: int = 1024  # STFT size of the mel
    hop: int = 256  # samples per mel frame (= product of upsample_rates)
    win: int = 1024  # STFT window
    fmin: float = 0.0  # mel filter bottom (Hz)
    fmax: float = 8000.0  # mel filter top (Hz)
    upsample_rates: tuple[int, ...] = (8, 8, 2, 2)  # per stage
    upsample_kernel_sizes: tuple[int, ...] = (16, 16, 4, 4)  # transposed-conv kernels
    upsample_initial_channel: int = 512  # channels after conv_pre; halved per stage
    resblock_kernel_sizes: tuple[int, ...] = (3, 7, 11)  # parallel residual blocks per stage
    resblock_dilation_sizes: tuple[tuple[int, ...], ...] = field(
        default=((1, 3, 5), (1, 3, 5), (1, 3, 5)))  # dilations of each block's three conv pairs

    def __post_init__(self) -> None:
        if int(np.prod(self.upsample_rates)) != self.hop:
            raise CheckpointError(f"upsample_rates {self.upsample_rates} multiply to "
                                  f"{int(np.prod(self.upsample_rates))}, not hop {self.hop}")

    @classmethod
    def from_dict(cls, raw: dict) -> HiFiGANConfig:
        """From :meth:`to_dict` output (lists become tuples); unknown keys are an error."""
        try:
            require_fields(cls, raw, "HiFi-GAN config keys")
        except ValueError as e:
            raise CheckpointError(str(e)) from None
        fixed = {k: (tuple(tuple(x) if isinstance(x, list) else x for x in v) if isinstance(v, list) else v)
                 for k, v in raw.items()}
        return cls(**fixed)

    def to_dict(self) -> dict:
        """Plain dict (JSON-able)."""
        return asdict(self)


class MelSpectrogram(nn.Module):
    """The vocoder's input features from a waveform at ``config.sample_rate``."""

    def __init__(self, config: HiFiGANConfig) -> None:
        super().__init__()
        self.config = config
        fb = slaney_filterbank(config.sample_rate, config.n_fft, config.n_mels, config.fmin, config.fmax)
        self.register_buffer("filters", torch.from_numpy(fb.T.astype(np.float32)), persistent=False)  # (M, F)
        self.register_buffer("window", torch.hann_window(config.win), persistent=False)

    def forward(self, wav: torch.Tensor) -> torch.Tensor:
        """(B, N) or (N,) float samples -> (B, n_mels, N // hop) or (n_mels, N // hop) log-mel."""
        c = self.config
        squeeze = wav.ndim == 1
        x = wav[None] if squeeze else wav
        if x.shape[-1] <= c.n_fft:
            raise ValueError(f"need more than {c.n_fft} samples for a mel frame, got {x.shape[-1]}")
        pad = (c.n_fft - c.hop) // 2
        x = F.pad(x[:, None], (pad, pad), mode="reflect")[:, 0]
        spec = torch.stft(x.float(), c.n_fft, c.hop, c.win, self.window, center=False, return_complex=True)
        mag = torch.sqrt(spec.real.pow(2) + spec.imag.pow(2) + _MAG_EPS)  # (B, F, T)
        mel = torch.log(torch.clamp(self.filters @ mag, min=_LOG_FLOOR))  # (B, M, T)
        return mel[0] if squeeze else mel


class ResBlock(nn.Module):
    """Three (dilated conv, plain conv) pairs, each with a residual connection."""

    def __init__(self, channels: int, kernel: int, dilations: tuple[int, ...]) -> None:
        super().__init__()
        self.convs1 = nn.ModuleList(nn.Conv1d(channels, channels, kernel, dilation=d, padding=(kernel * d - d) // 2)
                                    for d in dilations)
        self.convs2 = nn.ModuleList(nn.Conv1d(channels, channels, kernel, padding=(kernel - 1) // 2)
                                    for _ in dilations)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for c1, c2 in zip(self.convs1, self.convs2, strict=True):
            x = x + c2(F.leaky_relu(c1(F.leaky_relu(x, _SLOPE)), _SLOPE))
        return x


class HiFiGAN(nn.Module):
    """HiFi-GAN V1 generator: log-mel (B, n_mels, T) -> waveform (B, T * hop) in [-1, 1]."""

    def __init__(self, config: HiFiGANConfig | None = None) -> None:
        super().__init__()
        c = self.config = config or HiFiGANConfig()
        ch = c.upsample_initial_channel
        self.conv_pre = nn.Conv1d(c.n_mels, ch, 7, padding=3)
        self.ups = nn.ModuleList()
        self.resblocks = nn.ModuleList()
        for i, (u, k) in enumerate(zip(c.upsample_rates, c.upsample_kernel_sizes, strict=True)):
            self.ups.append(nn.ConvTranspose1d(ch // 2**i, ch // 2 ** (i + 1), k, u, padding=(k - u) // 2))
            for kr, d in zip(c.resblock_kernel_sizes, c.resblock_dilation_sizes, strict=True):
                self.resblocks.append(ResBlock(ch // 2 ** (i + 1), kr, d))
        self.conv_post = nn.Conv1d(ch // 2 ** len(c.upsample_rates), 1, 7, padding=3)
        self.mel = MelSpectrogram(c)

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        """(B, n_mels, T) log-mel -> (B, T * hop) waveform at ``config.sample_rate``."""
        if mel.ndim != 3 or mel.shape[1] != self.config.n_mels:
            raise ValueError(f"mel must be (B, {self.config.n_mels}, T), got {tuple(mel.shape)}")
        n = len(self.config.resblock_kernel_sizes)
        x = self.conv_pre(mel.to(self.conv_pre.weight.dtype))
        for i, up in enumerate(self.ups):
            x = up(F.leaky_relu(x, _SLOPE))
            x = sum(self.resblocks[i * n + j](x) for j in range(n)) / n  # type: ignore[assignment]
        x = torch.tanh(self.conv_post(F.leaky_relu(x, _POST_SLOPE)))
        return x[:, 0].float()

    @classmethod
    def from_safetensors(cls, path: str | Path, dtype: torch.dtype = torch.float32) -> HiFiGAN:
        """Load weights written by :meth:`save_safetensors`; computes in ``dtype`` (stored dtype is cast)."""
        from safetensors import safe_open

        path = Path(path)
        state = read_safetensors(path)
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        if "config" not in meta:
            raise CheckpointError(f"{path}: no 'config' metadata; not written by HiFiGAN.save_safetensors")
        model = cls(HiFiGANConfig.from_dict(json.loads(meta["config"])))
        load_strict(model, {k: v.to(dtype) for k, v in state.items()}, str(path))
        return model.to(dtype).eval()

    def save_safetensors(self, path: str | Path, dtype: torch.dtype = torch.float16) -> None:
        """Write weights (cast to ``dtype``) with the config as metadata."""
        from safetensors.torch import save_file

        state = {k: v.detach().to(dtype).contiguous() for k, v in self.state_dict().items()}
        save_file(state, str(path), metadata={"config": json.dumps(self.config.to_dict())})
        logger.info("wrote HiFi-GAN (%d tensors, %s) to %s", len(state), dtype, path)
