"""One utterance: run a TTS engine, perturb with sox, write 16 kHz mono 16-bit PCM WAV atomically."""

from __future__ import annotations

import os
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import soundfile as sf

from gpa.audio import SAMPLE_RATE, resample, to_mono
from gpa.corpus.voices import Speaker, Voice

ENGINE_TIMEOUT_S = 60.0  # one sentence of at most 200 characters takes well under a second
MIN_SECONDS = 0.3  # shorter output is an engine failure, not speech
MIN_RMS = 1e-3  # quieter output is treated as silence


class SynthesisError(RuntimeError):
    """An engine or sox failed, or produced no usable audio."""


def engine_command(voice: Voice, text: str, out: Path) -> tuple[list[str], str | None]:
    """The argv that makes ``voice`` speak ``text`` into ``out`` (a .wav) and the stdin text, if any."""
    if voice.engine == "espeak":
        return ["espeak-ng", "-v", voice.voice, "-w", str(out), text], None
    if voice.engine == "flite":
        return ["flite", "-voice", voice.voice, "-t", text, "-o", str(out)], None
    if voice.engine == "festival":
        return ["text2wave", "-o", str(out), "-eval", f"(voice_{voice.voice})"], text
    if voice.engine == "pico":
        return ["pico2wave", "-l", voice.voice, "-w", str(out), text], None
    if voice.engine == "rhvoice":
        return ["RHVoice-test", "-p", voice.voice, "-o", str(out)], text
    raise ValueError(f"unknown engine {voice.engine!r}")


def _run(argv: list[str], stdin: str | None) -> None:
    try:
        done = subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=ENGINE_TIMEOUT_S,
                              check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise SynthesisError(f"{argv[0]} failed: {e}") from e
    if done.returncode != 0:
        raise SynthesisError(f"{argv[0]} exited with {done.returncode}: {done.stderr.strip()[-300:]}")


def render(speaker: Speaker, text: str, workdir: Path) -> np.ndarray:
    """Speak ``text`` in ``speaker``'s voice.

    Returns:
        (N,) float32 samples at 16 kHz, mono.
    """
    raw = workdir / "engine.wav"
    argv, stdin = engine_command(speaker.voice, text, raw)
    _run(argv, stdin)
    if speaker.perturbation is not None:
        shifted = workdir / "perturbed.wav"
        # -R: repeatable (no random dither seed); float output so sox does not dither at all.
        _run(["sox", "-R", "-D", str(raw), "-e", "floating-point", "-b", "32", str(shifted),
              *speaker.perturbation.sox_effects()], None)
        raw = shifted
    try:
        data, sr = sf.read(str(raw), dtype="float64", always_2d=True)
    except (sf.LibsndfileError, RuntimeError) as e:
        raise SynthesisError(f"{speaker.name}: unreadable engine output: {e}") from e
    x = resample(to_mono(data), sr, SAMPLE_RATE)
    return np.clip(x, -1.0, 1.0).astype(np.float32)


def check(x: np.ndarray, name: str) -> None:
    """Raise SynthesisError when ``x`` (16 kHz) is too short or silent to be speech."""
    seconds = len(x) / SAMPLE_RATE
    if seconds < MIN_SECONDS:
        raise SynthesisError(f"{name}: {seconds:.2f} s of audio is too short to be speech")
    rms = float(np.sqrt(np.mean(np.square(x, dtype=np.float64))))
    if rms < MIN_RMS:
        raise SynthesisError(f"{name}: the audio is silent (rms {rms:.2e})")


def synthesize(speaker: Speaker, text: str, out: Path) -> float:
    """Write ``text`` spoken by ``speaker`` to ``out`` (16 kHz mono PCM16 WAV); returns its duration in seconds.

    The file appears atomically (written beside and renamed), so an interrupted build never leaves a
    truncated WAV that a resumed build would take as done.
    """
    with tempfile.TemporaryDirectory(prefix="gpa-corpus-") as tmp:
        x = render(speaker, text, Path(tmp))
    check(x, f"{speaker.name} {out.name}")
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(f".{out.name}.{os.getpid()}.partial")
    sf.write(str(partial), x, SAMPLE_RATE, subtype="PCM_16", format="WAV")
    os.replace(partial, out)
    return len(x) / SAMPLE_RATE
