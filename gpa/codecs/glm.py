"""GLM-4-Voice speech tokenizer: the first half of a Whisper encoder plus a VQ codebook, 12.5 tokens/s.

Forward (THUDM's ``WhisperVQEncoder`` in inference, only the parts the codes depend on):
causal convs (left pad 2, strides 1 and 2) with GELU -> learned positions -> pre-LN encoder layers
under a block-causal mask (causal, plus full attention inside blocks of 200 frames = 4 s, and the
key-padding mask) -> average pooling by 4 after layer ``pooling_position`` -> nearest codebook entry
by squared L2 after layer ``quantize_position``. Layers past ``quantize_position`` are never built.

The positional table limits one pass to 30 s; :meth:`GLMTokenizer.encode` cuts longer audio into
30 s chunks and concatenates their codes, as THUDM's own ``extract_speech_token`` helper does.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from gpa import native
from gpa.codecs.whisper_features import LogMel, WhisperFeatureConfig, pad_to_multiple
from gpa.weights import CheckpointError, build_for_loading, load_strict, read_safetensors

logger = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
FEATURES_FILE = "preprocessor_config.json"
WEIGHTS_FILE = "model.safetensors"
CONV_STRIDE = 2  # conv1 stride 1 * conv2 stride 2: mel frames per encoder position
# Checkpoint tensors used only in training or by the layers after the quantizer.
UNUSED_KEYS = ("embed_positions2.", "ema_count", "ema_weight", "layer_norm.")


@dataclass(frozen=True)
class GLMConfig:
    """The WhisperVQ encoder hyper-parameters, from the tokenizer's ``config.json``."""

    n_mels: int = 128  # num_mel_bins
    d_model: int = 1280  # hidden width
    n_heads: int = 20  # encoder_attention_heads
    ffn_dim: int = 5120  # encoder_ffn_dim
    encoder_layers: int = 32  # layers in the full encoder (the checkpoint may hold them all)
    max_positions: int = 1500  # max_source_positions: 30 s at 50 Hz
    pooling_kernel: int = 4  # pooling_kernel_size: 50 Hz -> 12.5 Hz
    pooling_type: str = "avg"  # "avg" or "max"
    pooling_position: int = 16  # pool after this many layers
    quantize_position: int = 16  # quantize after this many layers (= layers built)
    codebook_size: int = 16384  # quantize_vocab_size
    block_size: int | None = 200  # quantize_causal_block_size at 50 Hz; None: plain padding mask
    causal_conv: bool = True  # encoder_causal_convolution
    causal_attention: bool = False  # encoder_causal_attention or quantize_causal_encoder

    @classmethod
    def from_dict(cls, raw: dict, source: str = "config") -> GLMConfig:
        """Map HF ``WhisperVQConfig`` keys; other keys (decoder, training) are ignored."""
        names = {"num_mel_bins": "n_mels", "d_model": "d_model", "encoder_attention_heads": "n_heads",
                 "encoder_ffn_dim": "ffn_dim", "encoder_layers": "encoder_layers",
                 "max_source_positions": "max_positions", "pooling_kernel_size": "pooling_kernel",
                 "pooling_type": "pooling_type", "pooling_position": "pooling_position",
                 "quantize_position": "quantize_position", "quantize_vocab_size": "codebook_size",
                 "quantize_causal_block_size": "block_size",
                 "encoder_causal_convolution": "causal_conv"}
        required = ("d_model", "quantize_position", "quantize_vocab_size", "pooling_kernel_size")
        absent = [k for k in required if raw.get(k) is None]
        if absent:
            raise CheckpointError(f"{source}: not a WhisperVQ tokenizer config, missing {absent}")
        kw = {ours: raw[theirs] for theirs, ours in names.items() if theirs in raw}
        causal = raw.get("encoder_causal_attention") or raw.get("quantize_causal_encoder")
        kw["causal_attention"] = bool(causal)
        config = cls(**kw)
        config.validate(source)
        return config

    def validate(self, source: str = "config") -> None:
        """Reject settings the encoder cannot run."""
        problems = []
        if self.d_model % self.n_heads:
            problems.append(f"d_model {self.d_model} not divisible by {self.n_heads} heads")
        if self.pooling_type not in ("avg", "max"):
            problems.append(f"pooling_type {self.pooling_type!r} not one of ('avg', 'max')")
        if not 1 <= self.pooling_position <= self.quantize_position <= self.encoder_layers:
            problems.append(f"need 1 <= pooling_position ({self.pooling_position}) <= quantize_position "
                            f"({self.quantize_position}) <= encoder_layers ({self.encoder_layers})")
        if problems:
            raise CheckpointError(f"{source}: " + "; ".join(problems))

    @property
    def frames_per_token(self) -> int:
        """Mel frames per output code (8: stride-2 conv, then pooling by 4)."""
        return CONV_STRIDE * self.pooling_kernel


class CausalConv1d(nn.Conv1d):
    """Conv1d that pads only on the left, so frame t never sees frames after t."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(F.pad(x, (self.kernel_size[0] - 1, 0)))


class Attention(nn.Module):
    """Multi-head self-attention; the key projection has no bias, as in Whisper."""

    def __init__(self, d_model: int, n_heads: int) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.q_proj = nn.Linear(d_model, d_model)
        self.k_proj = nn.Linear(d_model, d_model, bias=False)
        self.v_proj = nn.Linear(d_model, d_model)
        self.out_proj = nn.Linear(d_model, d_model)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, causal: bool = True, block: int | None = None
                ) -> torch.Tensor:
        """x (B, T, D); mask (B, 1, T, T) bool, True = may attend; None: causal, or full if not ``causal``.

        ``block``: the same mask as gpa.native's flash kernel states it (0 causal, > 0 block-causal, < 0 full),
        where the mask has no padding; the bfloat16 mode then runs that kernel (GLM, 10 s: ~0.18 -> ~0.07 s).
        """
        b, t, d = x.shape
        q, k, v = (p(x).view(b, t, self.n_heads, -1) for p in (self.q_proj, self.k_proj, self.v_proj))  # (B, T, H, hd)
        if block is not None:
            y = native.flash_attention(q, k.transpose(1, 2), v.transpose(1, 2), block)
            if y is not None:
                return self.out_proj(y.reshape(b, t, d))
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, hd)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and causal)  # (B, H, T, hd)
        return self.out_proj(y.transpose(1, 2).reshape(b, t, d))


class EncoderLayer(nn.Module):
    """Pre-LN Whisper encoder block."""

    def __init__(self, config: GLMConfig) -> None:
        """``config`` needs only ``d_model``, ``n_heads`` and ``ffn_dim`` (a Whisper encoder config works too)."""
        super().__init__()
        self.self_attn = Attention(config.d_model, config.n_heads)
        self.self_attn_layer_norm = nn.LayerNorm(config.d_model)
        self.fc1 = nn.Linear(config.d_model, config.ffn_dim)
        self.fc2 = nn.Linear(config.ffn_dim, config.d_model)
        self.final_layer_norm = nn.LayerNorm(config.d_model)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, causal: bool = True, block: int | None = None
                ) -> torch.Tensor:
        """x (B, T, D); ``mask``/``causal``/``block`` as in :class:`Attention`."""
        x = x + self.self_attn(self.self_attn_layer_norm(x), mask, causal, block)
        return x + self.fc2(F.gelu(self.fc1(self.final_layer_norm(x))))


def attention_mask(valid: torch.Tensor, block_size: int | None) -> torch.Tensor:
    """Block-causal attention mask: causal, or both positions in the same block, and key not padding.

    Args:
        valid: (B, T) bool, True at real (non-padding) positions.
        block_size: positions per fully-visible block; None gives a plain key-padding mask.

    Returns:
        (B, 1, T, T) bool, True where query t may attend to key s.
    """
    t = valid.shape[1]
    if block_size is None:
        allowed = torch.ones(t, t, dtype=torch.bool, device=valid.device)
    else:
        pos = torch.arange(t, device=valid.device)
        allowed = (pos[None, :] <= pos[:, None]) | (pos[:, None] // block_size == pos[None, :] // block_size)
    return (allowed[None] & valid[:, None, :]).unsqueeze(1)  # (B, 1, T, T)


def nearest_code(x: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Index of the nearest codebook row by squared L2, (B, T, D) -> (B, T) int64 (first on ties)."""
    flat = x.reshape(-1, x.shape[-1]).float()  # (B*T, D)
    book = codebook.float()  # (K, D)
    # ||c||^2 + ||x||^2 - 2 x.c in one addmm, the same evaluation order as the reference.
    dist = torch.addmm(book.pow(2).sum(1) + flat.pow(2).sum(1, keepdim=True), flat, book.t(),
                       alpha=-2.0, beta=1.0)  # (B*T, K)
    return dist.argmin(dim=1).view(x.shape[:-1])


class VQEncoder(nn.Module):
    """WhisperVQ encoder up to the quantizer; parameter names match the THUDM checkpoint."""

    def __init__(self, config: GLMConfig) -> None:
        super().__init__()
        self.config = config
        conv = CausalConv1d if config.causal_conv else nn.Conv1d
        pad = {} if config.causal_conv else {"padding": 1}
        self.conv1 = conv(config.n_mels, config.d_model, kernel_size=3, **pad)
        self.conv2 = conv(config.d_model, config.d_model, kernel_size=3, stride=CONV_STRIDE, **pad)
        self.embed_positions = nn.Embedding(config.max_positions, config.d_model)
        self.layers = nn.ModuleList(EncoderLayer(config) for _ in range(config.quantize_position))
        self.codebook = nn.Embedding(config.codebook_size, config.d_model)

    def forward(self, features: torch.Tensor, frame_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Quantize a batch of log-mel features.

        Args:
            features: (B, n_mels, F) log-mel, F a multiple of ``config.frames_per_token``.
            frame_mask: (B, F) bool, True on frames of real audio.

        Returns:
            codes (B, F // frames_per_token) int64 and their validity mask (B, F // frames_per_token) bool.
        """
        c = self.config
        x = F.gelu(self.conv2(F.gelu(self.conv1(features)))).transpose(1, 2)  # (B, T, D), T = F/2
        if x.shape[1] > c.max_positions:
            raise ValueError(f"{features.shape[-1]} frames exceed the encoder's {c.max_positions} positions "
                             f"({c.max_positions * CONV_STRIDE} frames); split the audio first")
        x = x + self.embed_positions.weight[: x.shape[1]]
        valid = frame_mask[:, ::CONV_STRIDE]  # (B, T)
        mask, block = self._mask(valid, c.block_size)  # (B, 1, T, T)
        for i, layer in enumerate(self.layers, start=1):
            x = layer(x, mask, True, block)
            if i == c.pooling_position:
                x = self._pool(x)  # (B, T/k, D)
                valid = valid[:, :: c.pooling_kernel]
                mask, block = self._mask(valid, None if c.block_size is None else c.block_size // c.pooling_kernel)
        return nearest_code(x, self.codebook.weight), valid

    def _mask(self, valid: torch.Tensor, block_size: int | None) -> tuple[torch.Tensor | None, int | None]:
        """The layers' attention mask (None when they attend causally: the reference then drops padding), and
        the same as the flash kernel's ``block`` where it has no padding (see :class:`Attention`), else None."""
        if self.config.causal_attention:
            return None, 0
        block = (block_size or -1) if bool(valid.all()) else None
        return attention_mask(valid, block_size), block

    def _pool(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, D) -> (B, ceil(T/k), D), right-padding the time axis with zeros to a multiple of k."""
        k = self.config.pooling_kernel
        y = F.pad(x.transpose(1, 2), (0, -x.shape[1] % k))  # (B, D, T')
        y = F.avg_pool1d(y, k) if self.config.pooling_type == "avg" else F.max_pool1d(y, k)
        return y.transpose(1, 2)


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise CheckpointError(f"missing GLM tokenizer file: {path}")
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot read {path} as JSON: {e}") from e


class GLMTokenizer(nn.Module):
    """GLM-4-Voice speech tokenizer: 16 kHz audio -> codes at 12.5 Hz."""

    def __init__(self, config: GLMConfig, feature_config: WhisperFeatureConfig | None = None,
                 encoder: VQEncoder | None = None) -> None:
        super().__init__()
        self.config = config
        self.feature_config = feature_config or WhisperFeatureConfig()
        if self.feature_config.n_mels != config.n_mels:
            raise CheckpointError(f"feature extractor gives {self.feature_config.n_mels} mels, "
                                  f"encoder expects {config.n_mels}")
        self.log_mel = LogMel(self.feature_config)
        self.encoder = encoder or VQEncoder(config)  # random weights unless given

    @classmethod
    def from_dir(cls, path: str | Path, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32) -> GLMTokenizer:
        """Load a ``glm-4-voice-tokenizer`` dir: config.json, preprocessor_config.json, model.safetensors.

        Every encoder parameter must be in the checkpoint with its shape; the checkpoint may also hold
        tensors the tokenizer does not use (training EMA state, the second positional table, layers
        after the quantizer and the encoder's final norm).
        """
        path = Path(path)
        if not path.is_dir():
            raise CheckpointError(f"GLM tokenizer directory not found: {path}")
        config = GLMConfig.from_dict(_read_json(path / CONFIG_FILE), str(path / CONFIG_FILE))
        features = WhisperFeatureConfig.from_file(path / FEATURES_FILE)
        encoder = build_for_loading(lambda: VQEncoder(config))  # no random init: load_strict fills every tensor
        skipped = tuple(f"layers.{i}." for i in range(config.quantize_position, config.encoder_layers))
        state = read_safetensors(path / WEIGHTS_FILE)
        load_strict(encoder, state, str(path / WEIGHTS_FILE), ignore_unexpected=UNUSED_KEYS + skipped)
        model = cls(config, features, encoder)
        logger.info("loaded GLM tokenizer from %s (%d layers, %d codes)", path, config.quantize_position,
                    config.codebook_size)
        return model.to(device=device, dtype=dtype).eval()

    @property
    def sample_rate(self) -> int:
        """Input sample rate in Hz (16000)."""
        return self.feature_config.sample_rate

    @property
    def samples_per_token(self) -> int:
        """Input samples per code (1280 = 80 ms)."""
        return self.config.frames_per_token * self.feature_config.hop_length

    @property
    def frame_rate(self) -> float:
        """Codes per second (12.5)."""
        return self.sample_rate / self.samples_per_token

    @property
    def codebook_size(self) -> int:
        """Number of distinct codes (``quantize_vocab_size``)."""
        return self.config.codebook_size

    @property
    def max_samples(self) -> int:
        """Longest input one encoder pass takes (30 s); :meth:`encode` splits longer audio at this length."""
        frames = self.config.max_positions * CONV_STRIDE
        return frames // self.config.frames_per_token * self.samples_per_token

    def features(self, wav: np.ndarray) -> torch.Tensor:
        """Whisper log-mel of one waveform, padded with zeros to a multiple of :attr:`samples_per_token`.

        Args:
            wav: (N,) float samples at :attr:`sample_rate`, without volume normalisation.

        Returns:
            (n_mels, ceil(N / samples_per_token) * frames_per_token) float32 on the CPU.
        """
        wav = _check_wav(wav)
        return self.log_mel(pad_to_multiple(wav, self.samples_per_token, self.feature_config.padding_value))

    @torch.inference_mode()
    def encode(self, wavs: list[np.ndarray], batch_size: int = 8) -> list[torch.Tensor]:
        """Tokenize waveforms; longer than 30 s are cut every 30 s and the chunks' codes concatenated.

        Args:
            wavs: each (N_i,) float samples at :attr:`sample_rate` (use ``load_audio(..., normalize=False)``).
            batch_size: chunks per encoder pass; results do not depend on it.

        Returns:
            per input, (ceil(N_i / samples_per_token),) int64 codes in [0, codebook_size) on the CPU.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        chunks = [(i, w[s : s + self.max_samples]) for i, w in enumerate(map(_check_wav, wavs))
                  for s in range(0, len(w), self.max_samples)]
        order = sorted(range(len(chunks)), key=lambda j: len(chunks[j][1]))  # similar lengths batch together
        codes: list[torch.Tensor | None] = [None] * len(chunks)
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            for j, c in zip(batch, self._encode_batch([chunks[j][1] for j in batch]), strict=True):
                codes[j] = c
        out: list[list[torch.Tensor]] = [[] for _ in wavs]
        for (i, _), c in zip(chunks, codes, strict=True):
            out[i].append(c)
        return [torch.cat(parts) for parts in out]

    def _encode_batch(self, wavs: list[np.ndarray]) -> list[torch.Tensor]:
        """Codes of up to 30 s chunks in one pass; features per chunk, then right-padded to the longest."""
        feats = [self.features(w) for w in wavs]  # each (n_mels, F_i)
        longest = max(f.shape[1] for f in feats)
        batch = torch.stack([F.pad(f, (0, longest - f.shape[1])) for f in feats])  # (B, n_mels, F)
        # A frame is real audio when it starts inside the signal (HF: sample mask[::hop_length]).
        starts = torch.arange(longest) * self.feature_config.hop_length  # (F,)
        frame_mask = starts[None, :] < torch.tensor([len(w) for w in wavs])[:, None]  # (B, F)
        p = next(self.encoder.parameters())
        codes, valid = self.encoder(batch.to(device=p.device, dtype=p.dtype), frame_mask.to(p.device))
        return [c[v].cpu() for c, v in zip(codes, valid, strict=True)]


def _check_wav(wav: np.ndarray) -> np.ndarray:
    """Validate one (N,) float waveform and return it as float32."""
    wav = np.asarray(wav)
    if wav.ndim != 1:
        raise ValueError(f"GLM tokenizer takes (N,) mono samples, got shape {wav.shape}; mix down first")
    if not np.issubdtype(wav.dtype, np.floating):
        raise ValueError(f"GLM tokenizer takes float samples in [-1, 1], got dtype {wav.dtype}")
    if wav.size == 0:
        raise ValueError("GLM tokenizer got an empty waveform")
    return wav.astype(np.float32, copy=False)

