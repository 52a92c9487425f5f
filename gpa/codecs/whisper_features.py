"""Whisper log-mel features, as the GLM-4-Voice tokenizer was trained on them.

Follows the torch path of HF's ``WhisperFeatureExtractor`` (the one it takes whenever torch is
installed, which is how the authors ran it): a float32 centred STFT with a periodic Hann window and
reflect padding, the last frame dropped, power spectrum, Slaney mel filters (0-8 kHz),
``log10(max(mel, 1e-10))``, floored at ``max - 8`` per utterance, then ``(x + 4) / 4``.
Unlike stock Whisper nothing is padded to 30 s: the caller pads to a multiple of the tokenizer's
samples-per-token, exactly as the authors call the extractor (``padding="longest"``).
"""

from __future__ import annotations

import json
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from gpa.codecs.mel import slaney_filterbank
from gpa.weights import CheckpointError

logger = logging.getLogger(__name__)

_LOG_FLOOR = 1e-10  # clamp before log10
_DYNAMIC_RANGE = 8.0  # log10 units kept below the utterance maximum (80 dB)
_MEL_F_MAX = 8000.0  # Whisper's filterbank top, whatever the sample rate


@dataclass(frozen=True)
class WhisperFeatureConfig:
    """The fields of ``preprocessor_config.json`` that shape the features."""

    n_mels: int = 128  # feature_size
    sample_rate: int = 16000  # sampling_rate
    n_fft: int = 400  # 25 ms window
    hop_length: int = 160  # 10 ms hop: 100 frames per second
    chunk_length: int = 30  # seconds in a stock Whisper window (not used for padding here)
    padding_value: float = 0.0  # value the waveform is padded with

    @classmethod
    def from_file(cls, path: str | Path) -> WhisperFeatureConfig:
        """Read ``preprocessor_config.json``; keys we do not model are ignored, missing ones default."""
        path = Path(path)
        if not path.is_file():
            raise CheckpointError(f"missing feature extractor config: {path}")
        try:
            raw = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise CheckpointError(f"cannot read {path} as JSON: {e}") from e
        kind = raw.get("feature_extractor_type", "WhisperFeatureExtractor")
        if kind != "WhisperFeatureExtractor":
            raise CheckpointError(f"{path}: feature_extractor_type {kind!r}; "
                                  "expected 'WhisperFeatureExtractor'")
        if raw.get("dither", 0.0):
            # Dither adds random noise: only useful in training, and it makes codes non-deterministic.
            warnings.warn(f"{path}: dither={raw['dither']} is ignored; features are computed without it",
                          stacklevel=2)
        names = {"feature_size": "n_mels", "sampling_rate": "sample_rate", "n_fft": "n_fft",
                 "hop_length": "hop_length", "chunk_length": "chunk_length", "padding_value": "padding_value"}
        return cls(**{ours: raw[theirs] for theirs, ours in names.items() if theirs in raw})


class LogMel:
    """Whisper log-mel spectrogram on the CPU in float32."""

    def __init__(self, config: WhisperFeatureConfig) -> None:
        self.config = config
        self.window = torch.hann_window(config.n_fft)  # periodic, float32
        fb = slaney_filterbank(config.sample_rate, config.n_fft, config.n_mels, 0.0, _MEL_F_MAX)
        self.filters = torch.from_numpy(fb.T.astype(np.float32))  # (n_mels, n_fft//2+1)

    def __call__(self, wav: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Log-mel of one waveform.

        Args:
            wav: (N,) float samples at ``config.sample_rate``; N > n_fft // 2 (reflect padding).

        Returns:
            (n_mels, N // hop_length) float32: one frame per hop, the STFT's extra last frame dropped.
        """
        x = torch.as_tensor(wav, dtype=torch.float32).cpu()
        if x.ndim != 1:
            raise ValueError(f"log-mel takes one (N,) waveform, got shape {tuple(x.shape)}")
        c = self.config
        spec = torch.stft(x, c.n_fft, c.hop_length, window=self.window, center=True,
                          pad_mode="reflect", return_complex=True)  # (F, N//hop + 1)
        power = spec[:, :-1].abs() ** 2  # (F, frames)
        mel = self.filters @ power  # (n_mels, frames)
        log_spec = torch.clamp(mel, min=_LOG_FLOOR).log10()
        log_spec = torch.maximum(log_spec, log_spec.max() - _DYNAMIC_RANGE)
        return (log_spec + 4.0) / 4.0


def pad_to_multiple(wav: np.ndarray, multiple: int, value: float = 0.0) -> np.ndarray:
    """Right-pad (N,) samples with ``value`` up to a multiple of ``multiple`` (unchanged if already one)."""
    extra = -len(wav) % multiple
    return np.pad(wav, (0, extra), constant_values=value) if extra else wav
