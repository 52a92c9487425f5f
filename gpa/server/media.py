"""Audio in and out of the HTTP layer: upload decoding with limits, output encoding, long-audio segments."""

from __future__ import annotations

import base64
import binascii
import io
import re
import struct

import numpy as np
import soundfile as sf

from gpa.audio import SAMPLE_RATE, AudioError, load_audio
from gpa.server.errors import APIError, bad_request

MEDIA_TYPES = {"wav": "audio/wav", "pcm": "audio/pcm", "flac": "audio/flac", "mp3": "audio/mpeg",
               "opus": "audio/ogg", "aac": "audio/aac"}
WRITABLE = ("wav", "pcm", "flac", "mp3", "opus")  # libsndfile has no AAC encoder
STREAMABLE = ("pcm", "wav")  # formats whose bytes can be sent as samples arrive
_SOUNDFILE = {"flac": ("FLAC", "PCM_16"), "mp3": ("MP3", "MPEG_LAYER_III"), "opus": ("OGG", "OPUS")}
_DATA_URL = re.compile(r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[\w-]+=[\w.-]+)*)(?P<b64>;base64)?,")


# --- input -------------------------------------------------------------------------------------------


def decode_upload(data: bytes, what: str, max_seconds: float) -> np.ndarray:
    """Encoded audio bytes -> (N,) float32 at 16 kHz, at the level recorded (no volume normalisation).

    Raises APIError 415 for bytes no decoder understands, 413 for audio longer than ``max_seconds``,
    422 for audio that decodes but cannot be used (empty, silent, NaN).
    """
    if not data:
        raise APIError(422, f"{what}: the upload is empty", param=what, code="invalid_audio")
    try:
        info = sf.info(io.BytesIO(data))
    except (sf.LibsndfileError, RuntimeError, TypeError) as e:
        raise APIError(415, f"{what}: cannot decode the upload as audio ({e}); send wav, flac, ogg/opus or mp3",
                       param=what, code="unsupported_audio") from e
    if info.frames / max(info.samplerate, 1) > max_seconds:
        raise APIError(413, f"{what}: {info.frames / info.samplerate:.1f} s of audio exceeds the limit of "
                       f"{max_seconds:g} s", param=what, code="audio_too_long")
    try:
        return load_audio(data, normalize=False, name=what)
    except AudioError as e:
        raise APIError(422, str(e), param=what, code="invalid_audio") from e


def decode_base64_audio(value: str, what: str = "ref_audio") -> bytes:
    """A data: URL (``data:audio/wav;base64,...``) or bare base64 -> the encoded file bytes."""
    value = value.strip()
    if value.startswith(("http://", "https://", "file:")):
        raise bad_request(f"{what}: URLs are not fetched; send the clip as base64 or a data: URL", what,
                          "unsupported_url")
    match = _DATA_URL.match(value)
    if value.startswith("data:") and (match is None or not match.group("b64")):
        raise bad_request(f"{what}: a data: URL must be base64-encoded (data:audio/wav;base64,...)", what)
    payload = value[match.end():] if match else value
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as e:
        raise bad_request(f"{what}: not valid base64 ({e})", what, "invalid_base64") from e


# --- output ------------------------------------------------------------------------------------------


def check_format(fmt: str, param: str = "response_format") -> str:
    if fmt not in WRITABLE:
        raise bad_request(f"response_format {fmt!r} is not supported; use one of {list(WRITABLE)}", param,
                          "unsupported_format")
    return fmt


def pcm16(samples: np.ndarray) -> bytes:
    """(N,) float samples -> little-endian int16 bytes (clipped to [-1, 1], scaled by 32767, rounded)."""
    x = np.clip(np.asarray(samples, dtype=np.float32), -1.0, 1.0)
    return np.round(x * 32767.0).astype("<i2").tobytes()


def wav_header(num_samples: int | None, sample_rate: int = SAMPLE_RATE) -> bytes:
    """A 44-byte PCM16 mono WAV header; ``None`` samples marks a stream of unknown length (sizes 0xFFFFFFFF)."""
    data = 0xFFFFFFFF if num_samples is None else 2 * num_samples
    riff = 0xFFFFFFFF if num_samples is None else 36 + data
    return (b"RIFF" + struct.pack("<I", riff) + b"WAVEfmt " + struct.pack("<IHHIIHH", 16, 1, 1, sample_rate,
            2 * sample_rate, 2, 16) + b"data" + struct.pack("<I", data))


def encode(samples: np.ndarray, fmt: str, sample_rate: int = SAMPLE_RATE) -> bytes:
    """A whole waveform as a file of ``fmt`` (wav and pcm byte-identical to their streamed form)."""
    if fmt == "pcm":
        return pcm16(samples)
    if fmt == "wav":
        return wav_header(len(samples), sample_rate) + pcm16(samples)
    container, subtype = _SOUNDFILE[check_format(fmt)]
    buf = io.BytesIO()
    x = np.clip(np.asarray(samples, dtype=np.float32), -1.0, 1.0)
    if len(x) == 0:  # encoders reject empty input; a few samples of silence keep the file valid
        x = np.zeros(sample_rate // 100, dtype=np.float32)
    if fmt == "flac":  # lossless: the very samples of wav and pcm
        x = np.frombuffer(pcm16(x), dtype="<i2")
    sf.write(buf, x, sample_rate, format=container, subtype=subtype)
    return buf.getvalue()


# --- long audio --------------------------------------------------------------------------------------


def split_points(samples: np.ndarray, max_seconds: float, sample_rate: int = SAMPLE_RATE) -> list[tuple[int, int]]:
    """Cut (N,) audio into consecutive [start, end) spans of at most ``max_seconds``.

    Each cut falls at the quietest 100 ms (RMS over 20 ms frames, smoothed) in the last third of the
    span, so words are rarely split; audio that fits is one span.
    """
    n, limit = len(samples), int(max_seconds * sample_rate)
    hop = sample_rate // 50
    frames = len(samples) // hop
    energy = np.sqrt(np.mean(samples[: frames * hop].reshape(frames, hop).astype(np.float64) ** 2, axis=1))
    smooth = np.convolve(energy, np.ones(5) / 5, mode="same") if frames else energy
    spans, start = [], 0
    while n - start > limit:
        lo, hi = (start + 2 * limit // 3) // hop, (start + limit) // hop
        cut = (lo + int(np.argmin(smooth[lo:hi]))) * hop if hi > lo else start + limit
        cut = min(max(cut, start + hop), start + limit)
        spans.append((start, cut))
        start = cut
    spans.append((start, n))
    return spans
