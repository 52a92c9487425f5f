"""Mel filterbanks on the Slaney scale with Slaney area normalisation (BiCodec and Whisper both use it)."""

from __future__ import annotations

import numpy as np

_F_SP = 200.0 / 3  # Hz per mel below the break frequency
_BREAK_HZ = 1000.0
_BREAK_MEL = _BREAK_HZ / _F_SP
_LOG_STEP = np.log(6.4) / 27.0


def hz_to_mel(hz: np.ndarray) -> np.ndarray:
    """Slaney mel scale: linear below 1 kHz, logarithmic above."""
    hz = np.asarray(hz, dtype=np.float64)
    mel = hz / _F_SP
    log_part = _BREAK_MEL + np.log(np.maximum(hz, _BREAK_HZ) / _BREAK_HZ) / _LOG_STEP
    return np.where(hz >= _BREAK_HZ, log_part, mel)


def mel_to_hz(mel: np.ndarray) -> np.ndarray:
    """Inverse of :func:`hz_to_mel`."""
    mel = np.asarray(mel, dtype=np.float64)
    hz = mel * _F_SP
    log_part = _BREAK_HZ * np.exp(_LOG_STEP * (mel - _BREAK_MEL))
    return np.where(mel >= _BREAK_MEL, log_part, hz)


def slaney_filterbank(sample_rate: int, n_fft: int, n_mels: int, f_min: float = 0.0,
                      f_max: float | None = None) -> np.ndarray:
    """Triangular mel filters, area-normalised.

    Returns:
        (n_fft // 2 + 1, n_mels) float64: multiply a (…, freq) magnitude spectrum by it.
    """
    f_max = sample_rate / 2 if f_max is None else f_max
    freqs = np.linspace(0, sample_rate // 2, n_fft // 2 + 1)  # (F,)
    edges = mel_to_hz(np.linspace(hz_to_mel(f_min), hz_to_mel(f_max), n_mels + 2))  # (M+2,)
    widths = np.diff(edges)  # (M+1,)
    slopes = edges[None, :] - freqs[:, None]  # (F, M+2)
    rising = -slopes[:, :-2] / widths[:-1]
    falling = slopes[:, 2:] / widths[1:]
    fb = np.maximum(0.0, np.minimum(rising, falling))  # (F, M)
    return fb * (2.0 / (edges[2:] - edges[:-2]))[None, :]
