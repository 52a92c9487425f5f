"""Wav2Vec2 (XLSR-53, stable-layer-norm variant): only what BiCodec needs, its intermediate hidden states.

BiCodec's content branch averages hidden states 11, 14 and 16 of wav2vec2-large-xlsr-53, in the
numbering of Hugging Face's ``output_hidden_states``: index 0 is the input to the first transformer
layer (projected features plus positional convolution) and index i >= 1 the output of layer i. In
the stable-layer-norm variant the encoder's final layer norm is applied only after the last layer,
so any index below ``num_hidden_layers`` is a raw residual-stream output. We build and run only the
layers up to the highest index requested (16 of 24).

Weights load strictly from the Hugging Face checkpoint directory (``config.json`` and
``model.safetensors``, keys without a model prefix).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from gpa import native
from gpa.weights import CheckpointError, build_for_loading, load_strict, read_safetensors

logger = logging.getLogger(__name__)

NORM_EPS = 1e-7  # Wav2Vec2FeatureExtractor: (x - mean) / sqrt(var + 1e-7)

# Checkpoint entries that the feature path never uses: the final encoder norm (applied only after
# the last layer), the SpecAugment mask vector, and the pre-training heads of a
# Wav2Vec2ForPreTraining save.
_UNUSED_PREFIXES = ("encoder.layer_norm.", "masked_spec_embed", "quantizer.", "project_q.", "project_hid.")


@dataclass(frozen=True)
class Wav2Vec2Config:
    """The architecture fields of a Hugging Face ``Wav2Vec2Config`` (defaults are HF's)."""

    hidden_size: int = 768  # transformer width
    num_hidden_layers: int = 12  # transformer layers in the checkpoint
    num_attention_heads: int = 12
    intermediate_size: int = 3072  # feed-forward width
    conv_dim: tuple[int, ...] = (512,) * 7  # feature-encoder channels per conv layer
    conv_kernel: tuple[int, ...] = (10, 3, 3, 3, 3, 2, 2)
    conv_stride: tuple[int, ...] = (5, 2, 2, 2, 2, 2, 2)
    conv_bias: bool = False
    num_conv_pos_embeddings: int = 128  # positional conv kernel size
    num_conv_pos_embedding_groups: int = 16
    layer_norm_eps: float = 1e-5
    feat_extract_norm: str = "group"  # only "layer" (XLSR) is supported
    do_stable_layer_norm: bool = False  # only True (pre-norm layers, XLSR) is supported
    hidden_act: str = "gelu"
    feat_extract_activation: str = "gelu"

    @classmethod
    def from_dict(cls, d: dict) -> Wav2Vec2Config:
        """Pick the architecture fields out of a HF config.json dict and check they are supported."""
        fields = {f.name for f in dataclasses.fields(cls)}
        kw = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if k in fields}
        cfg = cls(**kw)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        """Raise ValueError for variants this implementation does not cover."""
        unsupported = {
            "feat_extract_norm": (self.feat_extract_norm, "layer"),
            "do_stable_layer_norm": (self.do_stable_layer_norm, True),
            "hidden_act": (self.hidden_act, "gelu"),
            "feat_extract_activation": (self.feat_extract_activation, "gelu"),
        }
        for name, (got, want) in unsupported.items():
            if got != want:
                raise ValueError(f"wav2vec2 {name}={got!r} is not supported; expected {want!r}")
        if not len(self.conv_dim) == len(self.conv_kernel) == len(self.conv_stride):
            raise ValueError("wav2vec2 conv_dim, conv_kernel and conv_stride must have the same length")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by {self.num_attention_heads}")


def normalize_input(wav: np.ndarray) -> np.ndarray:
    """Zero-mean, unit-variance normalisation of one utterance, as Wav2Vec2FeatureExtractor does it.

    Computed in float32 numpy like the extractor, so the result matches it to the last bit.

    Args:
        wav: (N,) samples.

    Returns:
        (N,) float32.
    """
    x = np.asarray(wav, dtype=np.float32)
    return (x - x.mean()) / np.sqrt(x.var() + np.float32(NORM_EPS))


class ConvLayer(nn.Module):
    """Feature-encoder conv, layer norm over channels, GELU."""

    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int, bias: bool) -> None:
        super().__init__()
        self.conv = nn.Conv1d(c_in, c_out, kernel, stride=stride, bias=bias)
        self.layer_norm = nn.LayerNorm(c_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)  # (B, C, T)
        x = self.layer_norm(x.transpose(1, 2)).transpose(1, 2)
        return F.gelu(x)


class FeatureEncoder(nn.Module):
    """Strided conv stack: 16 kHz samples -> 50 Hz frames."""

    def __init__(self, cfg: Wav2Vec2Config) -> None:
        super().__init__()
        dims = (1, *cfg.conv_dim)
        self.conv_layers = nn.ModuleList(
            ConvLayer(dims[i], dims[i + 1], k, s, cfg.conv_bias)
            for i, (k, s) in enumerate(zip(cfg.conv_kernel, cfg.conv_stride, strict=True))
        )

    def forward(self, wav: torch.Tensor) -> torch.Tensor:
        x = wav[:, None, :]  # (B, 1, N)
        for layer in self.conv_layers:
            x = layer(x)
        return x.transpose(1, 2)  # (B, T, C)


class FeatureProjection(nn.Module):
    """Layer norm of the conv features, then a linear map to the transformer width."""

    def __init__(self, cfg: Wav2Vec2Config) -> None:
        super().__init__()
        self.layer_norm = nn.LayerNorm(cfg.conv_dim[-1], eps=cfg.layer_norm_eps)
        self.projection = nn.Linear(cfg.conv_dim[-1], cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.projection(self.layer_norm(x))


class PositionalConv(nn.Module):
    """Grouped convolution over time, used as a relative positional embedding."""

    def __init__(self, cfg: Wav2Vec2Config) -> None:
        super().__init__()
        k = cfg.num_conv_pos_embeddings
        self.conv = nn.Conv1d(cfg.hidden_size, cfg.hidden_size, k, padding=k // 2,
                              groups=cfg.num_conv_pos_embedding_groups)
        # An even kernel with padding k // 2 yields one extra frame; the last one is dropped.
        self.trim = 1 if k % 2 == 0 else 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x.transpose(1, 2))  # (B, D, T + trim)
        if self.trim:
            y = y[:, :, : -self.trim]
        return F.gelu(y).transpose(1, 2)  # (B, T, D)


class Attention(nn.Module):
    """Multi-head self-attention with biased projections."""

    def __init__(self, cfg: Wav2Vec2Config) -> None:
        super().__init__()
        d = cfg.hidden_size
        self.heads = cfg.num_attention_heads
        self.scale = (d // self.heads) ** -0.5
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        q, k, v = (p(x).view(B, T, self.heads, -1) for p in (self.q_proj, self.k_proj, self.v_proj))  # (B, T, H, hd)
        y = native.flash_attention(q, k.transpose(1, 2), v.transpose(1, 2), -1)  # bf16 mode: gpa's flash kernel
        if y is not None:
            return self.out_proj(y.reshape(B, T, D))
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, head_dim)
        att = torch.softmax(q @ k.transpose(2, 3) * self.scale, dim=-1)  # (B, H, T, T)
        out = (att @ v).transpose(1, 2).reshape(B, T, D)
        return self.out_proj(out)


class FeedForward(nn.Module):
    """Dense, GELU, dense."""

    def __init__(self, cfg: Wav2Vec2Config) -> None:
        super().__init__()
        self.intermediate_dense = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.output_dense = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output_dense(F.gelu(self.intermediate_dense(x)))


class Layer(nn.Module):
    """Pre-norm transformer layer (the "stable layer norm" arrangement)."""

    def __init__(self, cfg: Wav2Vec2Config) -> None:
        super().__init__()
        self.layer_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.attention = Attention(cfg)
        self.final_layer_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.feed_forward = FeedForward(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.layer_norm(x))
        return x + self.feed_forward(self.final_layer_norm(x))


class Encoder(nn.Module):
    """Positional convolution and the first ``num_layers`` transformer layers."""

    def __init__(self, cfg: Wav2Vec2Config, num_layers: int) -> None:
        super().__init__()
        self.pos_conv_embed = PositionalConv(cfg)
        self.layers = nn.ModuleList(Layer(cfg) for _ in range(num_layers))


class Wav2Vec2(nn.Module):
    """Wav2Vec2 feature model truncated after ``num_layers`` transformer layers."""

    def __init__(self, cfg: Wav2Vec2Config, num_layers: int | None = None) -> None:
        super().__init__()
        num_layers = cfg.num_hidden_layers if num_layers is None else num_layers
        if not 0 <= num_layers <= cfg.num_hidden_layers:
            raise ValueError(f"num_layers must be in [0, {cfg.num_hidden_layers}], got {num_layers}")
        self.config = cfg
        self.num_layers = num_layers
        self.feature_extractor = FeatureEncoder(cfg)
        self.feature_projection = FeatureProjection(cfg)
        self.encoder = Encoder(cfg, num_layers)

    def num_frames(self, num_samples: int) -> int:
        """Frames the conv stack yields for ``num_samples`` samples (0 when too short)."""
        n = num_samples
        for k, s in zip(self.config.conv_kernel, self.config.conv_stride, strict=True):
            n = (n - k) // s + 1 if n >= k else 0
        return n

    def hidden_states(self, input_values: torch.Tensor, indices: Sequence[int]) -> list[torch.Tensor]:
        """Hidden states at the given indices (HF ``output_hidden_states`` numbering).

        Args:
            input_values: (B, N) normalised waveforms of equal length (see :func:`normalize_input`);
                no padding mask is applied, so run padded items separately.
            indices: which states, each in [0, num_layers]; below ``config.num_hidden_layers``
                they carry no final layer norm, as in HF's stable-layer-norm model.

        Returns:
            one (B, T, hidden_size) tensor per index, in the order asked.
        """
        last = max(indices)
        if min(indices) < 0 or last > self.num_layers:
            raise ValueError(f"hidden-state indices must be in [0, {self.num_layers}], got {list(indices)}")
        x = self.feature_projection(self.feature_extractor(input_values))  # (B, T, D)
        x = x + self.encoder.pos_conv_embed(x)
        states = [x]
        for layer in self.encoder.layers[:last]:
            states.append(layer(states[-1]))
        return [states[i] for i in indices]

    @classmethod
    def from_dir(cls, path: str | Path, num_layers: int | None = None) -> Wav2Vec2:
        """Load ``config.json`` and ``model.safetensors`` from a HF Wav2Vec2 directory.

        Args:
            path: the checkpoint directory.
            num_layers: transformer layers to build; the checkpoint's later layers are skipped.
        """
        path = Path(path)
        config_file = path / "config.json"
        if not config_file.is_file():
            raise CheckpointError(f"missing wav2vec2 config file: {config_file}")
        try:
            cfg = Wav2Vec2Config.from_dict(json.loads(config_file.read_text()))
        except (json.JSONDecodeError, ValueError, TypeError) as e:
            raise CheckpointError(f"bad wav2vec2 config {config_file}: {e}") from e
        if num_layers is not None and num_layers > cfg.num_hidden_layers:
            raise CheckpointError(f"{config_file} has {cfg.num_hidden_layers} layers; {num_layers} are needed")
        model = build_for_loading(lambda: cls(cfg, num_layers))  # no random init: load_strict fills every tensor
        weights = path / "model.safetensors"
        if not weights.is_file() and (path / "pytorch_model.bin").is_file():
            raise CheckpointError(f"missing checkpoint file: {weights}; only pytorch_model.bin is there, and gpa "
                                  "does not unpickle: convert it to safetensors first")
        state = _prepare_state(read_safetensors(weights))
        skipped = tuple(f"encoder.layers.{i}." for i in range(model.num_layers, cfg.num_hidden_layers))
        load_strict(model, state, str(weights), ignore_unexpected=_UNUSED_PREFIXES + skipped)
        logger.info("loaded wav2vec2 from %s (%d of %d layers)", path, model.num_layers,
                    cfg.num_hidden_layers)
        return model.eval()


def _prepare_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Strip a ``wav2vec2.`` model prefix and fold the positional conv's weight norm."""
    state = {k.removeprefix("wav2vec2."): v for k, v in state.items()}
    prefix = "encoder.pos_conv_embed.conv."
    pairs = (("weight_g", "weight_v"),
             ("parametrizations.weight.original0", "parametrizations.weight.original1"))
    for g_name, v_name in pairs:
        if prefix + g_name in state or prefix + v_name in state:
            g, v = state.pop(prefix + g_name, None), state.pop(prefix + v_name, None)
            if g is None or v is None:
                raise CheckpointError(f"positional conv weight norm needs both {g_name} and {v_name}")
            state[prefix + "weight"] = _fold(g, v)
    return state


def _fold(g: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """weight = g * v / ||v||, the norm taken over every dim where g has size 1 (HF uses dim=2)."""
    dims = tuple(i for i in range(v.dim()) if g.shape[i] == 1)
    g, v = g.float(), v.float()
    return v * (g / v.norm(p=2, dim=dims, keepdim=True))
