"""A stock Whisper audio encoder (tiny/base/... sizes) in torch, loaded from safetensors.

Whisper's encoder: log-mel (B, n_mels, F) -> conv(k3, pad 1) + GELU -> conv(k3, stride 2, pad 1) + GELU
-> + positional table -> pre-LN transformer blocks (full attention, no mask) -> final LayerNorm.
Output frames are 20 ms (50 Hz). The blocks are the GLM-4-Voice tokenizer's (:mod:`gpa.codecs.glm`),
which is a Whisper-large-v3 encoder with causal changes; this module is the unchanged original.

Whisper was trained on 30 s windows (3000 mel frames, 1500 positions): shorter inputs run with the
table truncated, which changes the features somewhat (see ``docs/nano-codec-design.md`` for the
measurement); :func:`pad_or_trim_samples` gives the stock 30 s input.

Weights come from a CTranslate2 Whisper ``model.bin`` via :func:`state_from_ct2` (run once, saved as
safetensors); the encoder itself only ever reads safetensors.
"""

from __future__ import annotations

import logging
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from gpa.codecs.ct2 import dequantize, read_ct2
from gpa.codecs.glm import EncoderLayer
from gpa.codecs.whisper_features import LogMel, WhisperFeatureConfig
from gpa.config import require_fields
from gpa.weights import CheckpointError, load_strict, read_safetensors

logger = logging.getLogger(__name__)

SAMPLE_RATE = 16000
HOP = 160  # samples per mel frame (10 ms)
CONV_STRIDE = 2  # mel frames per encoder frame
WINDOW_SAMPLES = 30 * SAMPLE_RATE  # Whisper's training window


@dataclass(frozen=True)
class WhisperEncoderConfig:
    """Encoder hyper-parameters (tiny.en defaults)."""

    n_mels: int = 80  # log-mel bands (128 for large-v3)
    d_model: int = 384  # width
    n_heads: int = 6  # attention heads
    ffn_dim: int = 1536  # MLP hidden width (4 x d_model)
    n_layers: int = 4  # transformer blocks
    max_positions: int = 1500  # positional table rows: 30 s at 50 Hz

    @classmethod
    def from_dict(cls, raw: dict) -> WhisperEncoderConfig:
        """Build from :meth:`to_dict` output; unknown keys are an error."""
        try:
            require_fields(cls, raw, "Whisper encoder config keys")
        except ValueError as e:
            raise CheckpointError(str(e)) from None
        return cls(**raw)

    def to_dict(self) -> dict:
        """Plain dict for safetensors metadata / JSON."""
        return asdict(self)


class WhisperEncoder(nn.Module):
    """Whisper audio encoder; parameter names follow :mod:`gpa.codecs.glm` (HF-style)."""

    def __init__(self, config: WhisperEncoderConfig) -> None:
        super().__init__()
        self.config = config
        self.conv1 = nn.Conv1d(config.n_mels, config.d_model, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(config.d_model, config.d_model, kernel_size=3, stride=CONV_STRIDE, padding=1)
        self.embed_positions = nn.Embedding(config.max_positions, config.d_model)
        self.layers = nn.ModuleList(EncoderLayer(config) for _ in range(config.n_layers))  # type: ignore[arg-type]
        self.layer_norm = nn.LayerNorm(config.d_model)

    def forward(self, mel: torch.Tensor, n_layers: int | None = None) -> torch.Tensor:
        """Encoder output.

        Args:
            mel: (B, n_mels, F) Whisper log-mel, F even and at most 2 * max_positions.
            n_layers: run only this many blocks and skip the final LayerNorm (None: the full encoder).

        Returns:
            (B, F // 2, d_model) float hidden states at 50 Hz.
        """
        return self.hidden_states(mel, n_layers)[-1]

    def hidden_states(self, mel: torch.Tensor, n_layers: int | None = None) -> list[torch.Tensor]:
        """[embeddings, after block 1, ..., after block n]; with ``n_layers=None`` the last is LayerNormed.

        Args:
            mel: (B, n_mels, F) log-mel.
            n_layers: blocks to run (0..n_layers of the config); None runs all and applies the final norm.

        Returns:
            list of (B, F // 2, d_model) tensors.
        """
        c = self.config
        if mel.ndim != 3 or mel.shape[1] != c.n_mels:
            raise ValueError(f"mel must be (B, {c.n_mels}, F), got {tuple(mel.shape)}")
        if mel.shape[2] % CONV_STRIDE or mel.shape[2] > c.max_positions * CONV_STRIDE:
            raise ValueError(f"mel frames must be even and <= {c.max_positions * CONV_STRIDE}, got {mel.shape[2]}")
        depth = c.n_layers if n_layers is None else n_layers
        if not 0 <= depth <= c.n_layers:
            raise ValueError(f"n_layers must be in 0..{c.n_layers}, got {n_layers}")
        x = F.gelu(self.conv2(F.gelu(self.conv1(mel)))).transpose(1, 2)  # (B, T, D)
        x = x + self.embed_positions.weight[: x.shape[1]]
        out = [x]
        for layer in self.layers[:depth]:
            x = layer(x, None, causal=False)
            out.append(x)
        if n_layers is None:
            out[-1] = self.layer_norm(x)
        return out

    @classmethod
    def from_safetensors(cls, path: str | Path, config: WhisperEncoderConfig | None = None) -> WhisperEncoder:
        """Load weights written by :func:`save_safetensors` (config read from the file's metadata)."""
        from safetensors import safe_open

        path = Path(path)
        state = read_safetensors(path)
        if config is None:
            with safe_open(str(path), "pt") as f:
                meta = f.metadata() or {}
            if "config" not in meta:
                raise CheckpointError(f"{path}: no 'config' metadata; pass the WhisperEncoderConfig")
            import json

            config = WhisperEncoderConfig.from_dict(json.loads(meta["config"]))
        model = cls(config)
        load_strict(model, state, str(path))
        return model.eval()

    def save_safetensors(self, path: str | Path, dtype: torch.dtype = torch.float16) -> None:
        """Write the weights (cast to ``dtype``) with the config as metadata."""
        import json

        from safetensors.torch import save_file

        state = {k: v.detach().to(dtype).contiguous() for k, v in self.state_dict().items()}
        save_file(state, str(path), metadata={"config": json.dumps(self.config.to_dict())})


def log_mel(wav: np.ndarray, n_mels: int = 80, pad_to_window: bool = True) -> torch.Tensor:
    """Whisper log-mel of one 16 kHz waveform.

    Args:
        wav: (N,) float32 samples at 16 kHz.
        n_mels: bands (80 for tiny..large-v2).
        pad_to_window: zero-pad to 30 s first, as Whisper does (its dynamic-range floor then sees the pad);
            otherwise pad to an even number of frames only.

    Returns:
        (n_mels, 3000) if padded, else (n_mels, F) with F = N // 160 rounded up to even.
    """
    wav = np.asarray(wav, dtype=np.float32)
    if wav.ndim != 1 or wav.size == 0:
        raise ValueError(f"log_mel takes a non-empty (N,) waveform, got shape {wav.shape}")
    if pad_to_window:
        if wav.size > WINDOW_SAMPLES:
            raise ValueError(f"{wav.size} samples exceed Whisper's 30 s window ({WINDOW_SAMPLES}); split first")
        wav = np.pad(wav, (0, WINDOW_SAMPLES - wav.size))
    else:
        wav = np.pad(wav, (0, -wav.size % (HOP * CONV_STRIDE)))
    return LogMel(WhisperFeatureConfig(n_mels=n_mels))(wav)


def state_from_ct2(model_bin: str | Path) -> tuple[WhisperEncoderConfig, dict[str, torch.Tensor]]:
    """Map a CTranslate2 Whisper ``model.bin``'s encoder variables onto :class:`WhisperEncoder` names.

    CTranslate2 fuses q/k/v into ``self_attention/linear_0`` (rows q, k, v) with a zero key bias (Whisper's
    key projection has none); names its LayerNorm parameters gamma/beta; stores the positional table.

    Returns:
        (config, float32 state dict) ready for ``load_strict``.
    """
    spec, v, _ = read_ct2(model_bin)
    if spec != "WhisperSpec":
        raise CheckpointError(f"{model_bin}: spec {spec!r}, expected 'WhisperSpec'")
    e = "encoder/"
    n_layers = len({k.split("/")[1] for k in v if re.fullmatch(r"layer_\d+", k.split("/")[1])})
    d_model, n_mels, _ = v[e + "conv1/weight"].shape
    config = WhisperEncoderConfig(n_mels=n_mels, d_model=d_model, n_heads=int(v[e + "num_heads"]),
                                  ffn_dim=v[e + "layer_0/ffn/linear_0/weight"].shape[0], n_layers=n_layers,
                                  max_positions=v[e + "position_encodings/encodings"].shape[0])
    state = {"embed_positions.weight": dequantize(v, e + "position_encodings/encodings")}
    for conv in ("conv1", "conv2"):
        state[f"{conv}.weight"] = dequantize(v, f"{e}{conv}/weight")
        state[f"{conv}.bias"] = v[f"{e}{conv}/bias"].float()
    state["layer_norm.weight"] = v[e + "layer_norm/gamma"].float()
    state["layer_norm.bias"] = v[e + "layer_norm/beta"].float()
    for i in range(n_layers):
        src, dst = f"{e}layer_{i}/", f"layers.{i}."
        qkv_w = dequantize(v, src + "self_attention/linear_0/weight")  # (3D, D)
        qkv_b = v[src + "self_attention/linear_0/bias"].float()  # (3D,)
        q_w, k_w, v_w = qkv_w.split(d_model)
        q_b, k_b, v_b = qkv_b.split(d_model)
        if k_b.abs().max() > 0:
            raise CheckpointError(f"{model_bin}: layer {i} has a non-zero key bias; Whisper's key has none")
        state.update({dst + "self_attn.q_proj.weight": q_w, dst + "self_attn.q_proj.bias": q_b,
                      dst + "self_attn.k_proj.weight": k_w,
                      dst + "self_attn.v_proj.weight": v_w, dst + "self_attn.v_proj.bias": v_b})
        pairs = {"self_attention/linear_1": "self_attn.out_proj", "ffn/linear_0": "fc1", "ffn/linear_1": "fc2"}
        for theirs, ours in pairs.items():
            state[f"{dst}{ours}.weight"] = dequantize(v, f"{src}{theirs}/weight")
            state[f"{dst}{ours}.bias"] = v[f"{src}{theirs}/bias"].float()
        for theirs, ours in {"self_attention/layer_norm": "self_attn_layer_norm",
                             "ffn/layer_norm": "final_layer_norm"}.items():
            state[f"{dst}{ours}.weight"] = v[f"{src}{theirs}/gamma"].float()
            state[f"{dst}{ours}.bias"] = v[f"{src}{theirs}/beta"].float()
    return config, state


def encoder_from_ct2(model_bin: str | Path) -> WhisperEncoder:
    """Build a float32 :class:`WhisperEncoder` straight from a CTranslate2 ``model.bin`` (for conversion)."""
    config, state = state_from_ct2(model_bin)
    model = WhisperEncoder(config)
    load_strict(model, state, str(model_bin))
    logger.info("converted Whisper encoder from %s: %d layers, d_model %d", model_bin, config.n_layers,
                config.d_model)
    return model.eval()
