"""The GPA-nano speech codec: BiCodec's roles at a size that trains on a CPU.

GPA needs three token streams from audio and one way back:

- **semantic** codes (BiCodec's content tokens): a pretrained Whisper encoder (tiny.en) read to
  block ``semantic_layer``, averaged onto a fixed token grid (``hop_length`` output samples per code,
  21.5 codes per second by default) and quantized by k-means;
- **ASR** codes (the GLM-4-Voice tokens' role): the encoder's final output on a grid ``asr_stride``
  times coarser, quantized by a second k-means;
- **global** codes (speaker identity, 32 per utterance): a small encoder over the reference's
  log-mel, attention-pooled into 32 vectors and quantized by FSQ;
- **decoding**: a convolutional token decoder turns semantic codes plus the speaker vector into the
  log-mel of a pretrained HiFi-GAN (universal V1, 22,050 Hz), which makes the waveform.

Everything in the decoder is convolutional with "same" padding, so a code influences only a bounded
stretch of samples (:attr:`NanoCodec.context`); streaming decodes each code once, every layer keeping
the left context it still needs (:mod:`gpa.codecs.nano_stream`), and equals the offline decode up to
float rounding, as does the slower re-decoding of windows with that much context (:class:`WindowedDecoder`).

A nano checkpoint keeps this codec in ``nano-codec/``: ``config.json``, ``encoder.safetensors`` (Whisper),
``vocoder.safetensors`` (HiFi-GAN) and ``model.safetensors`` (the trained parts); large matrices are stored
as int8 with per-row scales (:func:`gpa.weights.unpack_int8`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import threading
from collections import OrderedDict
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import soxr
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from gpa.audio import load_audio
from gpa.codecs.bicodec_speaker import fsq_bound
from gpa.codecs.checks import check_batch, check_codes
from gpa.codecs.hifigan import HiFiGAN, HiFiGANConfig, MelSpectrogram
from gpa.codecs.nano_stream import IncrementalDecoder
from gpa.codecs.whisper_encoder import WhisperEncoder, WhisperEncoderConfig, log_mel
from gpa.config import require_fields
from gpa.weights import CheckpointError, load_strict, pack_int8, read_safetensors, unpack_int8

logger = logging.getLogger(__name__)

INPUT_RATE = 16000  # what every encoder here reads (gpa.audio.load_audio's rate)
WHISPER_FRAME_S = 0.02  # one Whisper encoder frame
# Weight files of a nano-codec directory -> the parameter prefix each holds ("" = everything else).
WEIGHT_FILES = {"encoder.safetensors": "whisper.", "vocoder.safetensors": "vocoder.", "model.safetensors": ""}


def weight_file(key: str) -> str:
    """The file of :data:`WEIGHT_FILES` that holds parameter ``key``."""
    return next((name for name, prefix in WEIGHT_FILES.items() if prefix and key.startswith(prefix)),
                "model.safetensors")
FEATURE_CACHE = 8  # waveforms whose encoder features are kept (ASR prompts need two code streams of one input)


@dataclass(frozen=True)
class NanoCodecConfig:
    """Sizes of the nano codec (``nano-codec/config.json``)."""

    semantic_codebook_size: int = 2048  # k-means centroids of the semantic codes
    asr_codebook_size: int = 1024  # k-means centroids of the ASR codes
    mel_per_token: int = 4  # vocoder mel frames per semantic code (hop_length = this * vocoder hop)
    asr_stride: int = 2  # semantic codes per ASR code
    semantic_layer: int = 3  # Whisper blocks run for the semantic features (no final LayerNorm)
    num_global_tokens: int = 32  # speaker codes per utterance
    fsq_levels: tuple[int, ...] = (4, 4, 4, 4, 4)  # FSQ levels per global token: prod = global codebook size
    fsq_version: int = 2  # 2: normalised reference, LayerNorm, BiCodec's FSQ; 1: GPA-nano 0.x's (fsq_quantize_v1)
    speaker_dim: int = 128  # speaker encoder width
    speaker_blocks: int = 2  # ConvNeXt blocks of the speaker encoder
    speaker_vector: int = 192  # the decoder's condition vector
    ref_max_seconds: float = 8.0  # reference audio used for the global codes (the middle part if longer)
    decoder_dim: int = 256  # token decoder width
    token_blocks: int = 3  # ConvNeXt blocks at the code rate
    mel_blocks: int = 4  # ConvNeXt blocks at the mel rate
    token_kernel: int = 5  # depthwise kernel at the code rate
    mel_kernel: int = 7  # depthwise kernel at the mel rate
    whisper: WhisperEncoderConfig = field(default_factory=WhisperEncoderConfig)
    vocoder: HiFiGANConfig = field(default_factory=HiFiGANConfig)
    context: int = 0  # codes of reach on each side of a code (written by NanoCodec.save; 0: measure on first use)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> NanoCodecConfig:
        """From :meth:`to_dict` output; unknown keys are an error."""
        try:
            require_fields(cls, raw, "nano codec config keys")
        except ValueError as e:
            raise CheckpointError(str(e)) from None
        raw = dict(raw)
        if "whisper" in raw:
            raw["whisper"] = WhisperEncoderConfig.from_dict(raw["whisper"])
        if "vocoder" in raw:
            raw["vocoder"] = HiFiGANConfig.from_dict(raw["vocoder"])
        if "fsq_levels" in raw:
            raw["fsq_levels"] = tuple(raw["fsq_levels"])
        raw.setdefault("fsq_version", 1)  # configs written before the field existed
        if raw["fsq_version"] not in (1, 2):
            raise CheckpointError(f"nano codec config: fsq_version must be 1 or 2, got {raw['fsq_version']!r}")
        return cls(**raw)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict."""
        return asdict(self)

    @property
    def hop_length(self) -> int:
        """Output samples per semantic code."""
        return self.mel_per_token * self.vocoder.hop

    @property
    def global_codebook_size(self) -> int:
        return int(np.prod(self.fsq_levels))


# --- building blocks --------------------------------------------------------------------------------


class ConvNeXtBlock(nn.Module):
    """1-D ConvNeXt block; with ``cond_dim`` its LayerNorm's scale and shift come from a condition vector."""

    def __init__(self, dim: int, kernel: int, cond_dim: int = 0) -> None:
        super().__init__()
        self.dw = nn.Conv1d(dim, dim, kernel, padding=kernel // 2, groups=dim)
        self.norm = nn.LayerNorm(dim, elementwise_affine=cond_dim == 0)
        self.ada = nn.Linear(cond_dim, 2 * dim) if cond_dim else None
        self.pw1, self.pw2 = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, D, T); cond (B, C) -> (B, D, T)."""
        h = self.norm(self.dw(x).transpose(1, 2))  # (B, T, D)
        if self.ada is not None:
            scale, shift = self.ada(cond)[:, None].chunk(2, dim=-1)
            h = h * (1 + scale) + shift
        return x + self.pw2(F.gelu(self.pw1(h))).transpose(1, 2)


def _fsq_basis(levels: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """Place values of the FSQ digits in a code: (1, L0, L0 L1, ...)."""
    return torch.cumprod(torch.tensor((1,) + tuple(levels[:-1]), device=device), 0)


def fsq_quantize(z: torch.Tensor, levels: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """Finite scalar quantization (BiCodec's bound: L distinct integer levels, also for even L) with a
    straight-through gradient.

    Args:
        z: (..., len(levels)) unbounded values.

    Returns:
        (quantized values (..., len(levels)) in [-1, 1], exactly :func:`fsq_values` of the codes;
        codes (...,) int64 in [0, prod(levels))).
    """
    lv = torch.tensor(levels, dtype=z.dtype, device=z.device)
    bounded = fsq_bound(z, lv)
    rounded = torch.round(bounded)
    width = torch.floor(lv / 2)
    q = (bounded + (rounded - bounded).detach()) / width
    basis = _fsq_basis(levels, z.device)
    return q, ((rounded.detach() + width).long() * basis).sum(-1)


def fsq_values(codes: torch.Tensor, levels: tuple[int, ...]) -> torch.Tensor:
    """FSQ codes (...,) -> their quantized values (..., len(levels)) in [-1, 1] (:func:`fsq_quantize`'s)."""
    lv = torch.tensor(levels, device=codes.device)
    basis = _fsq_basis(levels, codes.device)
    width = lv // 2
    return ((codes[..., None] // basis) % lv - width) / width


def fsq_quantize_v1(z: torch.Tensor, levels: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """GPA-nano 0.x's quantizer, kept so that its shipped codec decodes as it was trained. Flawed: with even
    L the rounded values span L + 1 integers, of which codes keep L (-L/2 and -L/2 + 1 share code 0), and
    :func:`fsq_values_v1` of a code differs from the value trained with; no input normalisation, so the
    shipped speaker encoder's latents saturated and every reference gives the same codes."""
    lv = torch.tensor(levels, dtype=z.dtype, device=z.device)
    half = (lv - 1) / 2
    bounded = torch.tanh(z) * half
    rounded = torch.round(bounded)
    q = bounded + (rounded - bounded).detach()
    basis = _fsq_basis(levels, z.device)
    return q / half, ((rounded + half).long() * basis).sum(-1)


def fsq_values_v1(codes: torch.Tensor, levels: tuple[int, ...]) -> torch.Tensor:
    """What GPA-nano 0.x's decoder is given for its codes (see :func:`fsq_quantize_v1`)."""
    lv = torch.tensor(levels, device=codes.device)
    basis = _fsq_basis(levels, codes.device)
    half = (lv - 1) / 2
    return ((codes[..., None] // basis) % lv - half) / half


class SpeakerEncoder(nn.Module):
    """Reference log-mel (B, n_mels, F) -> global codes (B, G) and the decoder's condition (B, V)."""

    def __init__(self, c: NanoCodecConfig) -> None:
        super().__init__()
        self.levels = c.fsq_levels
        self.version = c.fsq_version
        self.inp = nn.Conv1d(c.vocoder.n_mels, c.speaker_dim, 5, padding=2)
        self.blocks = nn.ModuleList(ConvNeXtBlock(c.speaker_dim, 7) for _ in range(c.speaker_blocks))
        self.queries = nn.Parameter(torch.randn(c.num_global_tokens, c.speaker_dim) * 0.02)
        self.attn = nn.MultiheadAttention(c.speaker_dim, 4, batch_first=True)
        # version 2 normalises the pooled vectors, so that the FSQ latents start and stay near the bound's
        # linear range (version 1's grew until tanh saturated and the straight-through gradient vanished)
        self.fsq_norm = nn.LayerNorm(c.speaker_dim) if c.fsq_version >= 2 else None
        self.to_fsq = nn.Linear(c.speaker_dim, len(c.fsq_levels))
        if c.fsq_version >= 2:  # start with distinct queries and unit-scale latents: every FSQ level in use
            nn.init.normal_(self.queries, std=1.0)
            nn.init.normal_(self.to_fsq.weight, std=c.speaker_dim**-0.5)
        self.out = nn.Sequential(nn.Linear(c.num_global_tokens * len(c.fsq_levels), c.speaker_vector), nn.GELU(),
                                 nn.Linear(c.speaker_vector, c.speaker_vector))

    def quantized(self, mel: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, n_mels, F) -> (FSQ values (B, G, len(levels)), codes (B, G))."""
        if self.version >= 2:
            # Per utterance: each band's mean over time removed, one overall scale. Without it the pooled
            # vectors of different speakers start 0.96-0.99 cosine-similar (the log-mel's common part) and
            # training collapses them to one code (GPA-nano 0.1, 0.2); with it a 3-minute run used 125 distinct
            # codes per batch and the speaker loss fell from 2.9 to 0.66 nats.
            mel = mel - mel.mean(-1, keepdim=True)
            mel = mel / (mel.std((1, 2), keepdim=True) + 1e-5)
        x = self.inp(mel)
        for b in self.blocks:
            x = b(x)
        x = x.transpose(1, 2)
        pooled, _ = self.attn(self.queries[None].expand(len(mel), -1, -1), x, x, need_weights=False)
        if self.fsq_norm is None:
            return fsq_quantize_v1(self.to_fsq(pooled), self.levels)
        return fsq_quantize(self.to_fsq(self.fsq_norm(pooled)), self.levels)

    def condition(self, values: torch.Tensor) -> torch.Tensor:
        """FSQ values (B, G, len(levels)) -> (B, speaker_vector)."""
        return self.out(values.flatten(1))

    def condition_from_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """Global codes (B, G) -> (B, speaker_vector): what the decoder sees at inference."""
        values = (fsq_values if self.version >= 2 else fsq_values_v1)(codes, self.levels)
        return self.condition(values.to(self.out[0].weight.dtype))


class TokenDecoder(nn.Module):
    """Semantic codes (B, T) + condition (B, V) -> vocoder log-mel (B, n_mels, mel_per_token * T).

    A per-code mean mel patch (``mel_table``) is the starting point; ConvNeXt blocks at the code rate,
    a transposed convolution to the mel rate and ConvNeXt blocks there predict the residual.
    """

    def __init__(self, c: NanoCodecConfig) -> None:
        super().__init__()
        d, r, m = c.decoder_dim, c.mel_per_token, c.vocoder.n_mels
        self.r, self.n_mels = r, m
        self.embed = nn.Embedding(c.semantic_codebook_size, d)
        self.mel_table = nn.Embedding(c.semantic_codebook_size, r * m)
        self.token_blocks = nn.ModuleList(ConvNeXtBlock(d, c.token_kernel, c.speaker_vector)
                                          for _ in range(c.token_blocks))
        self.up = nn.ConvTranspose1d(d, d, 2 * r, stride=r, padding=r // 2)
        self.mel_blocks = nn.ModuleList(ConvNeXtBlock(d, c.mel_kernel, c.speaker_vector) for _ in range(c.mel_blocks))
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, m)

    def forward(self, codes: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """(B, T) codes, (B, V) condition -> (B, n_mels, r T) log-mel."""
        return self.from_embedded(self.embed(codes), self.mel_table(codes), cond)

    def from_embedded(self, emb: torch.Tensor, base: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """The network after the two lookups: emb (B, T, D), base (B, T, r * n_mels), cond (B, V)."""
        b, t, _ = emb.shape
        x = emb.transpose(1, 2)  # (B, D, T)
        for blk in self.token_blocks:
            x = blk(x, cond)
        x = self.up(x)[:, :, : t * self.r]  # (B, D, r T)
        for blk in self.mel_blocks:
            x = blk(x, cond)
        base = base.reshape(b, t * self.r, self.n_mels)
        return (base + self.head(self.norm(x.transpose(1, 2)))).transpose(1, 2)


class KMeans(nn.Module):
    """Standardise features, then the nearest of K centroids (squared L2)."""

    def __init__(self, k: int, dim: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("std", torch.ones(dim))
        self.register_buffer("centroids", torch.zeros(k, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, D) features -> (N,) int64 codes."""
        z = (x.float() - self.mean) / self.std
        c = self.centroids
        return torch.addmm(c.pow(2).sum(1), z, c.t(), alpha=-2.0).argmin(1)


def pool_matrix(n_out: int, out_seconds: float, n_in: int, in_seconds: float = WHISPER_FRAME_S) -> torch.Tensor:
    """(n_out, n_in) weights averaging input frames onto an output grid by time overlap.

    Output frame i spans [i, i+1) * out_seconds, input frame j spans [j, j+1) * in_seconds. An output
    frame past the inputs' end takes the last input frame.
    """
    i = torch.arange(n_out, dtype=torch.float64)[:, None]
    j = torch.arange(n_in, dtype=torch.float64)[None]
    lo = torch.maximum(i * out_seconds, j * in_seconds)
    hi = torch.minimum((i + 1) * out_seconds, (j + 1) * in_seconds)
    w = (hi - lo).clamp_min(0)
    empty = w.sum(1) == 0
    w[empty, -1] = 1.0
    return (w / w.sum(1, keepdim=True)).float()


# --- the codec -------------------------------------------------------------------------------------------


class NanoCodec(nn.Module):
    """The nano codec in BiCodec's interface (plus :meth:`encode_asr` for the GLM role)."""

    def __init__(self, config: NanoCodecConfig) -> None:
        super().__init__()
        c = self.config = config
        if not 1 <= c.semantic_layer <= c.whisper.n_layers:
            raise CheckpointError(f"semantic_layer {c.semantic_layer} not in 1..{c.whisper.n_layers}")
        self.whisper = WhisperEncoder(c.whisper)
        self.semantic_kmeans = KMeans(c.semantic_codebook_size, c.whisper.d_model)
        self.asr_kmeans = KMeans(c.asr_codebook_size, c.whisper.d_model)
        self.speaker = SpeakerEncoder(c)
        self.decoder = TokenDecoder(c)
        self.vocoder = HiFiGAN(c.vocoder)
        self.mel = MelSpectrogram(c.vocoder)
        self._decode_dtype = torch.float32
        self._context: int | None = config.context or None
        # ASR and semantic codes of one utterance come from one encoder pass: the last few
        # waveforms' features are kept, keyed by content.
        self._features: OrderedDict[str, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self._features_lock = threading.Lock()

    # --- sizes (BiCodec's names) ---

    @property
    def sample_rate(self) -> int:
        """Output sample rate (the vocoder's)."""
        return self.config.vocoder.sample_rate

    @property
    def hop_length(self) -> int:
        return self.config.hop_length

    @property
    def frame_rate(self) -> float:
        """Semantic codes per second."""
        return self.sample_rate / self.hop_length

    @property
    def semantic_codebook_size(self) -> int:
        return self.config.semantic_codebook_size

    @property
    def global_codebook_size(self) -> int:
        return self.config.global_codebook_size

    @property
    def num_global_tokens(self) -> int:
        return self.config.num_global_tokens

    @property
    def decode_dtype(self) -> torch.dtype:
        return self._decode_dtype

    @property
    def _device(self) -> torch.device:
        return self.semantic_kmeans.centroids.device

    # --- loading ---

    @classmethod
    def from_dir(cls, path: str | Path, device: str | torch.device = "cpu") -> NanoCodec:
        """Load ``config.json`` and ``model.safetensors`` from a ``nano-codec`` directory, strictly."""
        path = Path(path)
        cfg_file = path / "config.json"
        if not cfg_file.is_file():
            raise CheckpointError(f"missing nano codec config: {cfg_file}")
        try:
            config = NanoCodecConfig.from_dict(json.loads(cfg_file.read_text()))
        except (json.JSONDecodeError, TypeError) as e:
            raise CheckpointError(f"bad nano codec config {cfg_file}: {e}") from e
        model = cls(config)
        state: dict[str, torch.Tensor] = {}
        for name in WEIGHT_FILES:
            weights = path / name
            part = unpack_int8(read_safetensors(weights), str(weights))  # a missing file is a CheckpointError
            wrong = [k for k in part if weight_file(k) != name]
            if wrong:
                raise CheckpointError(f"{weights} holds tensors that belong in another file: {wrong[:5]}")
            state.update(part)
        load_strict(model, {k: v.float() for k, v in state.items()}, str(path))
        return model.to(device).eval().requires_grad_(False)

    def save(self, path: str | Path, int8: bool = True) -> None:
        """Write ``config.json`` and the weight files of :data:`WEIGHT_FILES` (large matrices int8 when ``int8``).

        The pretrained encoder and vocoder have files of their own, so a retrained decoder changes
        only ``model.safetensors`` (a few MB in version control, not the whole codec).
        """
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.config = replace(self.config, context=self._measure_context())  # structural: weights do not change it
        state = {k: v.detach().float().cpu().contiguous() for k, v in self.state_dict().items()}
        keep = ("semantic_kmeans.", "asr_kmeans.", "decoder.mel_table")  # distances need full precision
        if int8:
            state = pack_int8(state, skip=keep)
            # the per-code mean log-mel patch the decoder adds its output to: float16 (steps <= 0.008 at
            # |value| < 16, ~1 % of the decoder's error) halves its bytes (2.6 MB at 2048 x 320)
            state["decoder.mel_table.weight"] = state["decoder.mel_table.weight"].half()
        for name in WEIGHT_FILES:  # the pretrained parts in files of their own
            save_file({k: v for k, v in state.items() if weight_file(k) == name}, str(path / name))
        (path / "config.json").write_text(json.dumps(self.config.to_dict(), indent=1) + "\n")

    def set_decode_dtype(self, dtype: torch.dtype) -> NanoCodec:
        """Run the token decoder and the vocoder in ``dtype``; tokenisation is unchanged. Returns self."""
        if not dtype.is_floating_point:
            raise ValueError(f"decode dtype must be a floating point type, got {dtype}")
        self.decoder.to(dtype)
        self.vocoder.to(dtype)
        self.speaker.out.to(dtype)
        self._decode_dtype = dtype
        return self

    # --- encoding ---

    def num_codes(self, num_samples: int) -> int:
        """Semantic codes for ``num_samples`` input samples at 16 kHz (same duration, at least 1)."""
        return max(1, round(num_samples / INPUT_RATE * self.sample_rate / self.hop_length))

    def features(self, wav: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Whisper features of one 16 kHz waveform on the two code grids.

        Returns:
            (semantic features (T, D), ASR features (ceil(T / asr_stride), D)), T = :meth:`num_codes`.
        """
        wav = np.ascontiguousarray(wav, dtype=np.float32)
        if wav.ndim != 1 or wav.size == 0:
            raise ValueError(f"expected a non-empty (N,) waveform, got shape {wav.shape}")
        key = hashlib.sha1(wav.tobytes()).hexdigest()
        with self._features_lock:
            if key in self._features:
                self._features.move_to_end(key)
                return self._features[key]
        out = self._features_uncached(wav)
        with self._features_lock:
            self._features[key] = out
            while len(self._features) > FEATURE_CACHE:
                self._features.popitem(last=False)
        return out

    @torch.inference_mode()
    def _features_uncached(self, wav: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.config
        limit = c.whisper.max_positions * WHISPER_FRAME_S * INPUT_RATE
        if wav.size > limit:
            raise ValueError(f"audio of {wav.size / INPUT_RATE:.1f} s exceeds the nano encoder's "
                             f"{limit / INPUT_RATE:.0f} s window; split it first")
        mel = log_mel(wav, c.whisper.n_mels, pad_to_window=False)[None].to(self._device)
        states = self.whisper.hidden_states(mel)  # embeddings, blocks 1..n (last LayerNormed)
        sem, top = states[c.semantic_layer][0], states[-1][0]
        t = self.num_codes(wav.size)
        step = self.hop_length / self.sample_rate
        sem = pool_matrix(t, step, len(sem)).to(sem) @ sem
        asr = pool_matrix(math.ceil(t / c.asr_stride), step * c.asr_stride, len(top)).to(top) @ top
        return sem, asr

    def encode_semantic(self, wavs: list[np.ndarray]) -> list[torch.Tensor]:
        """Semantic codes of each 16 kHz waveform: B tensors (T_i,) int64, T_i = num_codes(N_i)."""
        check_batch(wavs)
        return [self.semantic_kmeans(self.features(w)[0]).cpu() for w in wavs]

    def encode_asr(self, wavs: list[np.ndarray]) -> list[torch.Tensor]:
        """ASR codes (the GLM tokens' role): B tensors (ceil(T_i / asr_stride),) int64."""
        check_batch(wavs)
        return [self.asr_kmeans(self.features(w)[1]).cpu() for w in wavs]

    def encode_both(self, wavs: list[np.ndarray]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(semantic codes, ASR codes) of each waveform with one encoder pass each."""
        check_batch(wavs)
        out = []
        for w in wavs:
            sem, asr = self.features(w)
            out.append((self.semantic_kmeans(sem).cpu(), self.asr_kmeans(asr).cpu()))
        return out

    def reference_mel(self, wav: np.ndarray) -> torch.Tensor:
        """The speaker encoder's input: log-mel (n_mels, F) of the middle ``ref_max_seconds`` at 22,050 Hz."""
        wav = np.asarray(wav, dtype=np.float32)
        keep = int(self.config.ref_max_seconds * INPUT_RATE)
        if wav.size > keep:
            start = (wav.size - keep) // 2
            wav = wav[start : start + keep]
        hi = soxr.resample(wav, INPUT_RATE, self.sample_rate).astype(np.float32)
        need = self.config.vocoder.n_fft + 1
        if hi.size < need:
            hi = np.pad(hi, (0, need - hi.size))
        return self.mel(torch.from_numpy(hi).to(self._device))

    @torch.inference_mode()
    def encode_global(self, wavs: list[np.ndarray]) -> torch.Tensor:
        """Global (speaker) codes: B 16 kHz waveforms -> (B, num_global_tokens) int64."""
        check_batch(wavs)
        return torch.cat([self.speaker.quantized(self.reference_mel(w)[None])[1] for w in wavs]).cpu()

    # --- decoding ---

    def check_codes(self, semantic: torch.Tensor, global_codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Validate (B, T) semantic and (B, G) global codes: integers in range; as int64."""
        return check_codes(semantic, global_codes, self.num_global_tokens, self.semantic_codebook_size,
                           self.global_codebook_size, self._device)

    @torch.inference_mode()
    def decode_mel(self, semantic: torch.Tensor, global_codes: torch.Tensor) -> torch.Tensor:
        """(B, T) semantic + (B, G) global codes -> (B, n_mels, mel_per_token * T) vocoder log-mel."""
        semantic, global_codes = self.check_codes(semantic, global_codes)
        cond = self.speaker.condition_from_codes(global_codes).to(self._decode_dtype)
        return self.decoder(semantic, cond)

    @torch.inference_mode()
    def decode(self, semantic: torch.Tensor, global_codes: torch.Tensor) -> torch.Tensor:
        """Waveform: (B, T) semantic + (B, G) global codes -> (B, hop_length * T) float32 at :attr:`sample_rate`."""
        if torch.as_tensor(semantic).shape[-1] == 0:
            self.check_codes(semantic, global_codes)
            return torch.zeros(torch.as_tensor(semantic).shape[0], 0)
        return self.vocoder(self.decode_mel(semantic, global_codes)).float()

    @property
    def context(self) -> int:
        """Codes on each side that can influence a code's samples (structural, found by autograd and
        stored in the config by :meth:`save`; measured here only for a codec that was never saved)."""
        if self._context is None:
            self._context = self._measure_context()
        return self._context

    def _measure_context(self, bound: int = 64) -> int:
        n, dtype, dec = 2 * bound + 1, self._decode_dtype, self.decoder
        self.set_decode_dtype(torch.float32)
        try:
            with torch.enable_grad():
                codes = torch.zeros(1, n, dtype=torch.long, device=self._device)
                emb = dec.embed(codes).detach().requires_grad_(True)
                base = dec.mel_table(codes).detach().requires_grad_(True)
                cond = self.speaker.condition_from_codes(torch.zeros(1, self.num_global_tokens, dtype=torch.long,
                                                                     device=self._device))
                wav = self.vocoder(dec.from_embedded(emb, base, cond.detach()))
                mid = wav[0, bound * self.hop_length : (bound + 1) * self.hop_length].sum()
                g_emb, g_base = torch.autograd.grad(mid, (emb, base))
        finally:
            self.set_decode_dtype(dtype)
        touched = torch.nonzero((g_emb.abs().sum(-1) + g_base.abs().sum(-1))[0] > 0).flatten()
        radius = int(max(bound - touched.min(), touched.max() - bound))
        if radius >= bound:
            raise RuntimeError(f"the nano decoder's reach exceeds the measurement bound of {bound} codes")
        return radius

    def incremental_decoder(self, global_codes: torch.Tensor) -> IncrementalDecoder:
        """A decoder state for one stream of codes: each code decoded once, the samples equal to
        :meth:`decode` (see :mod:`gpa.codecs.nano_stream`; :class:`WindowedDecoder` is the re-decoding
        reference)."""
        return IncrementalDecoder(self, global_codes)


class WindowedDecoder:
    """Streaming decode by windows: each new stretch of codes is decoded with :attr:`NanoCodec.context`
    codes of real context on both sides, so its samples equal the offline decode's.

    Same interface as :class:`gpa.codecs.bicodec_stream.IncrementalDecoder` (``push``, ``finish``,
    ``preview``, ``lookahead``, ``finished``).
    """

    def __init__(self, codec: NanoCodec, global_codes: torch.Tensor) -> None:
        self.codec = codec
        global_codes = torch.as_tensor(global_codes).reshape(1, -1)
        self.global_codes = codec.check_codes(torch.zeros(1, 0, dtype=torch.long), global_codes)[1]
        self.context = codec.context
        self.codes = torch.zeros(1, 0, dtype=torch.long)
        self.start = 0  # absolute index of self.codes[0] (older codes are dropped once out of reach)
        self.done = 0  # codes whose samples are out
        self.finished = False

    @property
    def lookahead(self) -> int:
        """Codes needed after a code before its samples are final."""
        return self.context

    def push(self, semantic: torch.Tensor) -> torch.Tensor:
        """Add (1, T) codes; return the samples that became final (1, N) float32."""
        if self.finished:
            raise RuntimeError("push() after finish(): this decoder's stream has ended")
        semantic, _ = self.codec.check_codes(semantic, self.global_codes)
        self.codes = torch.cat([self.codes, semantic.cpu()], dim=1)
        ready = self.start + self.codes.shape[1] - self.context
        return self._decode(ready) if ready > self.done else torch.zeros(1, 0)

    def finish(self) -> torch.Tensor:
        """End the stream: the remaining samples (1, N)."""
        if self.finished:
            raise RuntimeError("finish() called twice")
        self.finished = True
        return self._decode(self.start + self.codes.shape[1])

    def preview(self) -> torch.Tensor:
        """What :meth:`finish` would return now, without ending the stream."""
        lo = max(self.done - self.context, self.start)
        codes = self.codes[:, lo - self.start :]
        if codes.shape[1] == 0:
            return torch.zeros(1, 0)
        wav = self.codec.decode(codes, self.global_codes)
        return wav[:, (self.done - lo) * self.codec.hop_length :].cpu()

    def _decode(self, stop: int) -> torch.Tensor:
        if stop <= self.done:
            return torch.zeros(1, 0)
        lo = max(self.done - self.context, self.start)
        hi = min(stop + self.context, self.start + self.codes.shape[1])
        wav = self.codec.decode(self.codes[:, lo - self.start : hi - self.start], self.global_codes)
        hop = self.codec.hop_length
        out = wav[:, (self.done - lo) * hop : (stop - lo) * hop].cpu()
        self.done = stop
        keep_from = max(self.done - self.context, self.start)  # older codes can no longer matter
        self.codes = self.codes[:, keep_from - self.start :]
        self.start = keep_from
        return out


class NanoASRTokenizer:
    """The GLM tokenizer's role for a nano checkpoint: ``encode`` and ``codebook_size``."""

    def __init__(self, codec: NanoCodec) -> None:
        self.codec = codec

    @property
    def codebook_size(self) -> int:
        return self.codec.config.asr_codebook_size

    @property
    def sample_rate(self) -> int:
        return INPUT_RATE

    def encode(self, wavs: list[np.ndarray], batch_size: int = 8) -> list[torch.Tensor]:
        """ASR codes per 16 kHz waveform at its raw level (as GLM takes it).

        The audio is volume-normalised here like the semantic codes' input, so both streams come
        from one encoder pass. ``batch_size`` is accepted for the GLM interface; items run one by one.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        check_batch(wavs)
        # exactly load_audio's normalisation (float64 arithmetic), so the cached features are found
        return self.codec.encode_asr([load_audio(np.asarray(w, dtype=np.float32), INPUT_RATE, normalize=True)
                                      for w in wavs])

