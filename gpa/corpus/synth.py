"""Utterances: run a TTS engine, perturb with sox, write 16 kHz mono 16-bit PCM WAVs atomically."""

from __future__ import annotations

import os
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import soundfile as sf

from gpa.audio import SAMPLE_RATE, resample, to_mono
from gpa.corpus.voices import Speaker, Voice

ENGINE_TIMEOUT_S = 120.0  # a festival batch of 16 sentences takes a few seconds
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
        return ["festival", "-b", str(_festival_script(voice, [text], [out]))], None
    if voice.engine == "pico":
        return ["pico2wave", "-l", voice.voice, "-w", str(out), text], None
    if voice.engine == "rhvoice":
        return ["RHVoice-test", "-p", voice.voice, "-o", str(out)], text
    raise ValueError(f"unknown engine {voice.engine!r}")


def _scheme_string(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _festival_script(voice: Voice, texts: list[str], outs: list[Path]) -> Path:
    """A festival batch script speaking each text into its file (written beside the first output).

    One festival process per batch: its start-up (about 0.17 s of CPU) is most of the cost of a sentence.
    Each sentence is one utterance, as text2wave makes it for a one-sentence text.
    """
    script = outs[0].with_suffix(".scm")
    lines = [f"(voice_{voice.voice})"] + [
        f"(utt.save.wave (utt.synth (Utterance Text {_scheme_string(t)})) {_scheme_string(str(o))} (quote riff))"
        for t, o in zip(texts, outs, strict=True)]
    script.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return script


def _run(argv: list[str], stdin: str | None) -> None:
    try:
        done = subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=ENGINE_TIMEOUT_S,
                              check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise SynthesisError(f"{argv[0]} failed: {e}") from e
    if done.returncode != 0:
        raise SynthesisError(f"{argv[0]} exited with {done.returncode}: {done.stderr.strip()[-300:]}")


def engine_outputs(voice: Voice, texts: list[str], workdir: Path) -> list[Path | SynthesisError]:
    """Run the engine on each text; the raw WAV of each, or the error that kept it from being made."""
    outs = [workdir / f"engine{i}.wav" for i in range(len(texts))]
    if voice.engine == "festival" and len(texts) > 1:
        try:
            _run(["festival", "-b", str(_festival_script(voice, texts, outs))], None)
            return list(outs)
        except SynthesisError:
            pass  # one bad sentence stops the batch: redo them one by one to find it
    results: list[Path | SynthesisError] = []
    for text, out in zip(texts, outs, strict=True):
        try:
            _run(*engine_command(voice, text, out))
            results.append(out)
        except SynthesisError as e:
            results.append(e)
    return results


def finish(speaker: Speaker, raw: Path, workdir: Path) -> np.ndarray:
    """The engine's WAV ``raw``, perturbed with sox if ``speaker`` asks for it.

    Returns:
        (N,) float32 samples at 16 kHz, mono, in [-1, 1].
    """
    if speaker.perturbation is not None:
        shifted = raw.with_name(raw.stem + "-perturbed.wav")
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


def _write(x: np.ndarray, out: Path) -> None:
    # Written beside and renamed, so an interrupted build never leaves a truncated WAV taken as done.
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(f".{out.name}.{os.getpid()}.partial")
    sf.write(str(partial), x, SAMPLE_RATE, subtype="PCM_16", format="WAV")
    os.replace(partial, out)


def synthesize_many(speaker: Speaker, items: list[tuple[str, Path]]) -> list[float | SynthesisError]:
    """Write each (text, out) spoken by ``speaker`` to ``out`` (16 kHz mono PCM16 WAV).

    Returns:
        per item, its duration in seconds, or the SynthesisError that kept it from being written.
    """
    results: list[float | SynthesisError] = []
    with tempfile.TemporaryDirectory(prefix="gpa-corpus-") as tmp:
        raws = engine_outputs(speaker.voice, [t for t, _ in items], Path(tmp))
        for (_, out), raw in zip(items, raws, strict=True):
            try:
                if isinstance(raw, SynthesisError):
                    raise raw
                x = finish(speaker, raw, Path(tmp))
                check(x, f"{speaker.name} {out.name}")
                _write(x, out)
                results.append(len(x) / SAMPLE_RATE)
            except SynthesisError as e:
                results.append(e)
    return results


def synthesize(speaker: Speaker, text: str, out: Path) -> float:
    """Write ``text`` spoken by ``speaker`` to ``out`` (16 kHz mono PCM16 WAV); returns its duration in seconds."""
    (result,) = synthesize_many(speaker, [(text, out)])
    if isinstance(result, SynthesisError):
        raise result
    return result
