"""One audio front end for every path: load, mono mix, resample to 16 kHz, Spark volume normalisation.

The reference implementation had three loaders that disagreed (channel 0 vs mean, soxr vs torchaudio,
percentile normalisation vs peak 0.9, no resampling at all for GLM). Everything in gpa goes through
:func:`load_audio` so BiCodec, GLM, training and serving see the same samples.
"""

from __future__ import annotations

import io
import logging
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

logger = logging.getLogger(__name__)

SAMPLE_RATE = 16000  # every codec in GPA works at 16 kHz
OUTPUT_FORMATS = ("wav", "flac")

AudioInput = str | Path | bytes | np.ndarray


class AudioError(ValueError):
    """Audio that cannot be used: missing, unreadable, empty, silent or of the wrong type."""


def _read(source: str | Path | bytes) -> tuple[np.ndarray, int]:
    """Decode a file path or encoded bytes with soundfile; returns (samples, channels) float64 and rate."""
    name = "<bytes>" if isinstance(source, bytes) else str(source)
    if not isinstance(source, bytes):
        path = Path(source)
        if not path.exists():
            raise AudioError(f"audio file not found: {name}")
        if not path.is_file():
            raise AudioError(f"audio path is not a file: {name}")
    try:
        data, sr = sf.read(io.BytesIO(source) if isinstance(source, bytes) else str(source), always_2d=True)
    except (sf.LibsndfileError, RuntimeError, TypeError) as e:
        raise AudioError(
            f"cannot decode audio {name}: {e}; supported: any format libsndfile reads (wav, flac, ogg/opus, mp3)"
        ) from e
    return data, int(sr)


def to_mono(samples: np.ndarray) -> np.ndarray:
    """Mix (N,) or (N, C) samples down to (N,) by the channel mean."""
    if samples.ndim == 1:
        return samples
    if samples.ndim != 2:
        raise AudioError(f"audio array must be (samples,) or (samples, channels), got shape {samples.shape}")
    return samples.mean(axis=1) if samples.shape[1] > 1 else samples[:, 0]


def resample(samples: np.ndarray, sr: int, target_sr: int = SAMPLE_RATE) -> np.ndarray:
    """Resample (N,) samples with soxr "VHQ" (the quality the authors' BiCodec loader uses)."""
    if sr == target_sr:
        return samples
    return soxr.resample(samples, sr, target_sr, quality="VHQ")


def volume_normalize(samples: np.ndarray, coeff: float = 0.2) -> np.ndarray:
    """Spark-TTS percentile volume normalisation, as BiCodec was trained with.

    Brings the mean of the 90th-99th percentile of |x| (over samples above 0.01) to ``coeff``,
    with the gain clipped to [0.1, 10]; very quiet audio is first lifted to a 0.1 peak.
    """
    # The percentile statistics are taken from the input level, before the quiet-audio lift,
    # exactly as BiCodec's training loader does; the gain then applies to the lifted signal.
    magnitude = np.abs(samples)
    peak = magnitude.max()
    x = samples / max(peak, 1e-3) * 0.1 if peak < 0.1 else samples.copy()
    loud = np.sort(magnitude[magnitude > 0.01])
    if len(loud) <= 10:
        return x
    n = len(loud)
    volume = loud[int(0.9 * n) : int(0.99 * n)].mean()
    x = x * np.clip(coeff / volume, 0.1, 10)
    peak = np.abs(x).max()
    return x / peak if peak > 1 else x


def load_audio(
    source: AudioInput,
    sample_rate: int | None = None,
    *,
    normalize: bool = True,
    name: str | None = None,
) -> np.ndarray:
    """Load audio as 16 kHz float32 mono.

    Args:
        source: a file path, encoded file bytes, or a float array (N,) / (N, C) with ``sample_rate``.
        sample_rate: the rate of an array ``source``; must be None for files (read from the header).
        normalize: apply Spark's volume normalisation (BiCodec input); GLM takes the raw level.
        name: how to refer to the input in error messages.

    Returns:
        (N,) float32 at :data:`SAMPLE_RATE`.
    """
    label = name or (str(source) if isinstance(source, (str, Path)) else type(source).__name__)
    if isinstance(source, np.ndarray):
        if sample_rate is None:
            raise AudioError(f"{label}: an audio array needs its sample_rate")
        if not np.issubdtype(source.dtype, np.floating):
            raise AudioError(f"{label}: audio array must be floating point in [-1, 1], got dtype {source.dtype}")
        data, sr = source.astype(np.float64), int(sample_rate)
    elif isinstance(source, (str, Path, bytes)):
        if sample_rate is not None:
            raise AudioError(f"{label}: sample_rate is read from the file; pass it only with an array")
        data, sr = _read(source)
    else:
        raise AudioError(f"audio must be a path, bytes or numpy array, got {type(source).__name__}")
    if sr <= 0:
        raise AudioError(f"{label}: invalid sample rate {sr}")
    x = to_mono(data)
    if x.size == 0:
        raise AudioError(f"{label}: audio is empty")
    if not np.isfinite(x).all():
        raise AudioError(f"{label}: audio contains NaN or infinite samples")
    if np.abs(x).max() == 0:
        raise AudioError(f"{label}: audio is silent (all samples are zero)")
    x = resample(x, sr)
    if normalize:
        x = volume_normalize(x)
    return np.ascontiguousarray(x, dtype=np.float32)


def save_audio(path: str | Path, samples: np.ndarray, sample_rate: int = SAMPLE_RATE) -> None:
    """Write (N,) float samples to ``path``; the format (wav or flac) follows the extension."""
    fmt = Path(path).suffix.lower().lstrip(".")
    if fmt not in OUTPUT_FORMATS:
        raise AudioError(f"cannot write {path}: output format must be one of {OUTPUT_FORMATS}")
    sf.write(str(path), np.asarray(samples, dtype=np.float32), sample_rate, format=fmt.upper())


def encode_audio(samples: np.ndarray, sample_rate: int = SAMPLE_RATE, fmt: str = "wav") -> bytes:
    """Encode (N,) float samples as wav (PCM16) or flac bytes."""
    if fmt not in OUTPUT_FORMATS:
        raise AudioError(f"output format must be one of {OUTPUT_FORMATS}, got {fmt!r}")
    buf = io.BytesIO()
    sf.write(buf, np.asarray(samples, dtype=np.float32), sample_rate, format=fmt.upper(), subtype="PCM_16")
    return buf.getvalue()
