"""Built-in voices: named reference clips a checkpoint directory carries in ``voices/``.

Layout (every file optional except each voice's wav)::

    voices/NAME.wav       mono PCM16 WAV at 16 kHz, 3-8 s of speech
    voices/NAME.txt       its transcript (UTF-8), shown in listings; never used unless the caller asks
    voices/voices.json    {"NAME": {"description": ..., "licence": ..., "source": ...}, "default": "NAME"}

A name is 1-64 letters, digits, '_', '-' or '.', starting with a letter or digit, without '..': the
pattern is what keeps a name from ever pointing outside ``voices/`` (symlinked files are allowed, as
in a Hugging Face snapshot). The default voice is the one ``voices.json`` names under ``"default"``,
else a voice called ``default``, else the first name in sorted order.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf

from gpa.audio import AudioError
from gpa.weights import CheckpointError

VOICES_DIR = "voices"  # the sub-directory of a checkpoint holding its built-in voices
CATALOG = "voices.json"
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
NAME_RULE = "1-64 letters, digits, '_', '-' or '.', starting with a letter or digit, no '..'"
SAMPLE_RATE = 16000  # built-in clips are stored at the codecs' input rate, so none is resampled
MIN_SECONDS, MAX_SECONDS = 3.0, 8.0  # a reference long enough for the speaker codes, short enough to be cheap
ENTRY_KEYS = ("description", "licence", "source")  # what voices.json may say about a voice
DEFAULT_KEY = "default"  # voices.json: {"default": "NAME"} picks the default voice
EXTRA_FILE_PREFIXES = ("readme", "license", "licence")  # documentation files allowed beside the voices


class VoiceError(CheckpointError):
    """A checkpoint's ``voices/`` directory that breaks the layout (the message names the file)."""


class UnknownVoiceError(AudioError):
    """A reference that is neither an existing audio file nor a built-in voice of the model."""


@dataclass(frozen=True)
class BuiltinVoice:
    """One built-in voice of a checkpoint."""

    name: str
    audio_path: Path  # voices/NAME.wav: mono PCM16, 16 kHz
    text: str | None  # the clip's transcript (voices/NAME.txt), None without one
    description: str | None  # from voices.json
    licence: str | None  # from voices.json, e.g. "CC0-1.0"
    source: str | None = None  # from voices.json: where the recording comes from
    seconds: float = 0.0  # the clip's duration
    default: bool = False  # the voice used when none is named

    def to_dict(self) -> dict[str, object]:
        """A JSON-ready summary (what ``gpa voices`` prints)."""
        return {"name": self.name, "default": self.default, "description": self.description, "licence": self.licence,
                "source": self.source, "text": self.text, "seconds": self.seconds, "audio": str(self.audio_path)}


def valid_name(name: str) -> bool:
    """Whether ``name`` is a safe voice name (see the module docstring)."""
    return bool(NAME_RE.match(name)) and ".." not in name


def builtin_voices(checkpoint_dir: str | Path) -> dict[str, BuiltinVoice]:
    """The built-in voices of a checkpoint directory, by name in sorted order ({} without ``voices/``).

    Every wav is read and checked (mono PCM16 WAV, 16 kHz, 3-8 s, not silent), so a broken voice
    is reported here, naming its file, rather than at its first use.

    Raises:
        VoiceError: a bad name, a voice listed in voices.json without its wav, a transcript without
            audio, an unreadable or out-of-spec wav, or a malformed voices.json.
    """
    root = Path(checkpoint_dir) / VOICES_DIR
    if not root.is_dir():
        return {}
    wavs, texts = _scan(root)
    entries, default = _read_catalog(root / CATALOG)
    for name in entries:
        if name not in wavs:
            raise VoiceError(f"{root / CATALOG} lists voice {name!r} but {root / (name + '.wav')} is missing")
    for name in texts:
        if name not in wavs:
            raise VoiceError(f"{texts[name]}: a transcript without its audio ({name}.wav is missing)")
    if default is not None and default not in wavs:
        raise VoiceError(f"{root / CATALOG}: the default voice {default!r} is not one of the voices "
                         f"({', '.join(sorted(wavs)) or 'none'})")
    if default is None and wavs:
        default = DEFAULT_KEY if DEFAULT_KEY in wavs else min(wavs)
    voices = {}
    for name in sorted(wavs):
        entry = entries.get(name, {})
        voices[name] = BuiltinVoice(name, wavs[name], _read_text(texts[name]) if name in texts else None,
                                    entry.get("description"), entry.get("licence"), entry.get("source"),
                                    _check_wav(wavs[name]), name == default)
    return voices


def default_voice(voices: Mapping[str, BuiltinVoice]) -> str | None:
    """The name of the default voice among ``voices`` (None when there are none)."""
    return next((v.name for v in voices.values() if v.default), None)


def lookup(reference: str, voices: Mapping[str, BuiltinVoice]) -> BuiltinVoice:
    """The built-in voice named ``reference``; for a reference that is not an existing file.

    Raises:
        UnknownVoiceError: naming the built-in voices and saying that a file path was expected otherwise.
    """
    if reference in voices:
        return voices[reference]
    known = (f"the model's built-in voices are: {', '.join(voices)}" if voices
             else "this model has no built-in voices")
    raise UnknownVoiceError(f"reference {reference!r}: audio file not found, and not a built-in voice name; "
                            f"{known}; otherwise give the path of an audio file")


def _scan(root: Path) -> tuple[dict[str, Path], dict[str, Path]]:
    """NAME.wav and NAME.txt files of ``voices/`` by name; anything unexpected is an error."""
    wavs: dict[str, Path] = {}
    texts: dict[str, Path] = {}
    for path in sorted(root.iterdir()):
        name, suffix = path.stem, path.suffix.lower()
        if path.name.startswith(".") or path.name == CATALOG or path.name.lower().startswith(EXTRA_FILE_PREFIXES):
            continue
        if suffix not in (".wav", ".txt") or not path.is_file():
            raise VoiceError(f"{path}: unexpected entry in {root}; expected NAME.wav, NAME.txt, {CATALOG} "
                             "(and README/LICENSE files)")
        if not valid_name(name) or path.suffix != suffix:
            raise VoiceError(f"{path}: invalid voice file name; a name is {NAME_RULE}, "
                             f"with the lower-case suffix .wav or .txt")
        (wavs if suffix == ".wav" else texts)[name] = path
    return wavs, texts


def _read_catalog(path: Path) -> tuple[dict[str, dict[str, str]], str | None]:
    """voices.json -> (entries by voice name, the default name or None)."""
    if not path.is_file():
        return {}, None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise VoiceError(f"cannot read {path}: {e}") from e
    if not isinstance(data, dict):
        raise VoiceError(f"{path}: expected a JSON object of voice name -> {{{', '.join(ENTRY_KEYS)}}}")
    default = data.get(DEFAULT_KEY) if isinstance(data.get(DEFAULT_KEY), str) else None
    entries = {}
    for name, entry in data.items():
        if name == DEFAULT_KEY and default is not None:
            continue
        if not valid_name(name):
            raise VoiceError(f"{path}: invalid voice name {name!r}; a name is {NAME_RULE}")
        if not isinstance(entry, dict):
            raise VoiceError(f"{path}: the entry of voice {name!r} must be an object with {', '.join(ENTRY_KEYS)}")
        unknown = sorted(set(entry) - set(ENTRY_KEYS))
        if unknown:
            raise VoiceError(f"{path}: voice {name!r} has unknown keys {unknown}; allowed: {', '.join(ENTRY_KEYS)}")
        bad = [k for k, v in entry.items() if not isinstance(v, str)]
        if bad:
            raise VoiceError(f"{path}: voice {name!r}: {', '.join(bad)} must be strings")
        entries[name] = entry
    return entries, default


def _read_text(path: Path) -> str:
    try:
        text = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as e:
        raise VoiceError(f"cannot read transcript {path}: {e}") from e
    if not text:
        raise VoiceError(f"{path}: the transcript is empty (remove the file for a voice without one)")
    return text


def _check_wav(path: Path) -> float:
    """The clip's duration in seconds, after checking it is the format built-in voices use."""
    want = f"mono PCM16 WAV at {SAMPLE_RATE} Hz, {MIN_SECONDS:g}-{MAX_SECONDS:g} s of speech"
    try:
        info = sf.info(str(path))
        samples, _ = sf.read(str(path), dtype="int16")
    except (sf.LibsndfileError, RuntimeError, OSError) as e:
        raise VoiceError(f"built-in voice {path.stem!r}: cannot read {path} ({e}); expected {want}") from e
    found = f"{info.format} {info.subtype}, {info.channels} channel(s), {info.samplerate} Hz, {info.duration:.2f} s"
    if (info.format, info.subtype, info.channels, info.samplerate) != ("WAV", "PCM_16", 1, SAMPLE_RATE) or not (
            MIN_SECONDS <= info.duration <= MAX_SECONDS):
        raise VoiceError(f"built-in voice {path.stem!r}: {path} is {found}; expected {want}")
    if not np.any(samples):
        raise VoiceError(f"built-in voice {path.stem!r}: {path} is silent; expected {want}")
    return round(info.frames / info.samplerate, 3)
