"""The registry of offline voices (Debian TTS engines) and pitch/tempo perturbations as pseudo-speakers.

Quality and speaker identity were measured on this machine kind (see docs/corpus.md): ``good`` voices have a
Whisper judge WER of at most about 20 % on Harvard sentences, ``fair`` ones 20-40 %, ``low`` ones more
(formant and MBROLA voices: extra timbres for ASR/VC input, poor TTS targets). Voices sharing a ``person``
are the same recorded speaker through different engines: held-out voices are chosen so that no other
voice has their person.
"""

from __future__ import annotations

import logging
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

ENGINES = ("espeak", "flite", "festival", "pico", "rhvoice")
BINARIES = {"espeak": "espeak-ng", "flite": "flite", "festival": "festival", "pico": "pico2wave",
            "rhvoice": "RHVoice-test"}
PACKAGES = {"espeak": "espeak-ng", "flite": "flite", "festival": "festival + festvox-*", "pico": "libttspico-utils",
            "rhvoice": "rhvoice rhvoice-english", "mbrola": "mbrola mbrola-<voice>"}

# Licences of the voice data (the engines: espeak-ng GPL-3, flite BSD-like/GPL-2 parts, festival/festvox
# BSD-like, mbrola AGPL-3, SVOX pico Apache-2.0, RHVoice LGPL-2.1+).
FREE = "free"  # permissive or copyleft: audio may train a model we redistribute
NON_FREE = "non-free"  # MBROLA database licence: use only with mbrola, no sale; kept out of default sets
NC_ND = "CC-BY-NC-ND-4.0"  # RHVoice evgeniy-eng, lyubov: non-commercial, no derivatives; kept out of default sets


@dataclass(frozen=True)
class Voice:
    """One engine voice; ``name`` is its speaker id in manifests and file paths."""

    name: str  # speaker id, e.g. "rhvoice_bdl"
    engine: str  # one of ENGINES
    voice: str  # the engine's own voice name
    person: str  # the recorded speaker behind it (same person across engines -> same value)
    sex: str  # "F" or "M"
    accent: str  # "US", "UK", "Scottish", ...
    quality: str  # "good", "fair" or "low"
    licence: str  # FREE, NON_FREE or NC_ND (see above)
    licence_note: str  # where the licence is stated

    @property
    def restricted(self) -> bool:
        """Whether the voice's licence keeps it out of data for a redistributed model."""
        return self.licence != FREE


def _v(name: str, engine: str, voice: str, person: str, sex: str, accent: str, quality: str,
       licence: str = FREE, note: str = "") -> Voice:
    return Voice(name, engine, voice, person, sex, accent, quality, licence, note)


_RH = "/usr/share/doc/rhvoice-english/copyright"
_FV = "festvox licence (BSD-like, Edinburgh/CMU)"
_MB = "/usr/share/doc/mbrola-{v}/copyright: MBROLA database licence (not for sale, only with mbrola)"
REGISTRY: dict[str, Voice] = {v.name: v for v in (
    _v("rhvoice_alan", "rhvoice", "alan", "awb", "M", "Scottish", "good", note=f"LGPL-2.1+ ({_RH})"),
    _v("rhvoice_bdl", "rhvoice", "bdl", "bdl", "M", "US", "good", note=f"LGPL-2.1+ ({_RH})"),
    _v("rhvoice_clb", "rhvoice", "clb", "clb", "F", "US", "good", note=f"LGPL-2.1+ ({_RH})"),
    _v("rhvoice_slt", "rhvoice", "slt", "slt", "F", "US", "good", note=f"LGPL-2.1+ ({_RH})"),
    _v("rhvoice_evgeniy", "rhvoice", "evgeniy-eng", "evgeniy", "M", "Russian", "good", NC_ND, _RH),
    _v("rhvoice_lyubov", "rhvoice", "lyubov", "lyubov", "F", "US", "good", NC_ND, _RH),
    _v("festival_slt_hts", "festival", "cmu_us_slt_arctic_hts", "slt", "F", "US", "good", note="EST-2003/BSD-3"),
    _v("festival_kal", "festival", "kal_diphone", "kal", "M", "US", "good", note=_FV),
    _v("festival_ked", "festival", "ked_diphone", "ked", "M", "US", "good", note=_FV),
    _v("festival_rab", "festival", "rab_diphone", "rab", "M", "UK", "fair", note=_FV),
    _v("festival_don", "festival", "don_diphone", "don", "M", "UK", "fair", note=_FV),
    _v("flite_awb", "flite", "awb", "awb", "M", "Scottish", "good", note="flite (CMU, BSD-like)"),
    _v("flite_rms", "flite", "rms", "rms", "M", "US", "good", note="flite (CMU, BSD-like)"),
    _v("flite_slt", "flite", "slt", "slt", "F", "US", "good", note="flite (CMU, BSD-like)"),
    _v("flite_kal16", "flite", "kal16", "kal", "M", "US", "fair", note="flite (CMU, BSD-like)"),
    _v("pico_en-US", "pico", "en-US", "pico_us", "F", "US", "good", note="Apache-2.0 (lingware without source)"),
    _v("pico_en-GB", "pico", "en-GB", "pico_gb", "F", "UK", "good", note="Apache-2.0 (lingware without source)"),
    _v("espeak_en-us", "espeak", "en-us", "espeak_m1", "M", "US", "low", note="GPL-3 (espeak-ng)"),
    _v("espeak_en-us+f2", "espeak", "en-us+f2", "espeak_f2", "F", "US", "low", note="GPL-3 (espeak-ng)"),
    _v("espeak_en-us+m3", "espeak", "en-us+m3", "espeak_m3", "M", "US", "low", note="GPL-3 (espeak-ng)"),
    _v("espeak_en+f4", "espeak", "en+f4", "espeak_f4", "F", "UK", "low", note="GPL-3 (espeak-ng)"),
    _v("mbrola_us1", "espeak", "mb-us1", "mbrola_us1", "F", "US", "low", NON_FREE, _MB.format(v="us1")),
    _v("mbrola_us2", "espeak", "mb-us2", "mbrola_us2", "M", "US", "low", NON_FREE, _MB.format(v="us2")),
    _v("mbrola_us3", "espeak", "mb-us3", "mbrola_us3", "M", "US", "low", NON_FREE, _MB.format(v="us3")),
    _v("mbrola_en1", "espeak", "mb-en1", "mbrola_en1", "M", "UK", "low", NON_FREE, _MB.format(v="en1")),
)}

# Never trained on: intelligible voices whose person no other registry voice has (US F, US M, UK F).
HELDOUT_VOICES = ("rhvoice_clb", "flite_rms", "pico_en-GB")
# The default set: every good or fair voice whose licence allows a redistributed model (12 train + 3 held out).
DEFAULT_VOICES = tuple(n for n, v in REGISTRY.items() if v.quality != "low" and not v.restricted)


@dataclass(frozen=True)
class Perturbation:
    """A sox pitch shift and/or tempo change that turns a voice into a pseudo-speaker."""

    pitch_cents: int = 0  # sox "pitch" shift in cents (100 = one semitone), formants move with it
    tempo: float = 1.0  # sox "tempo" factor (speed without pitch change)

    _SPEC = re.compile(r"^(?:p([+-]\d+))?(?:t(\d+(?:\.\d+)?))?$")

    @classmethod
    def parse(cls, spec: str) -> Perturbation:
        """Parse "p+300", "p-200t1.1" or "t0.9" (pitch in cents, tempo factor)."""
        m = cls._SPEC.match(spec.strip())
        if not spec.strip() or m is None:
            raise ValueError(f"bad perturbation {spec!r}; expected p<+/-cents>, t<factor> or both, e.g. p+300t0.9")
        p = cls(int(m.group(1) or 0), float(m.group(2) or 1.0))
        if not -1200 <= p.pitch_cents <= 1200 or not 0.5 <= p.tempo <= 2.0 or p == cls():
            raise ValueError(f"perturbation {spec!r} out of range: pitch in [-1200, 1200] cents, tempo in "
                             "[0.5, 2], and not both neutral")
        return p

    @property
    def suffix(self) -> str:
        """The part appended to a voice name: "_p+300", "_t1.1", "_p-200_t0.9"."""
        parts = ([f"p{self.pitch_cents:+d}"] if self.pitch_cents else []) + (
            [f"t{self.tempo:g}"] if self.tempo != 1.0 else [])
        return "_" + "_".join(parts)

    def sox_effects(self) -> list[str]:
        """The sox effect arguments."""
        return (["pitch", str(self.pitch_cents)] if self.pitch_cents else []) + (
            ["tempo", "-s", f"{self.tempo:g}"] if self.tempo != 1.0 else [])


@dataclass(frozen=True)
class Speaker:
    """A voice, optionally perturbed: one speaker id of the corpus."""

    voice: Voice
    perturbation: Perturbation | None = None

    @property
    def name(self) -> str:
        return self.voice.name + (self.perturbation.suffix if self.perturbation else "")


def resolve(names: tuple[str, ...]) -> list[Voice]:
    """Registry voices by name; "default" and "all" expand to those sets. Raises on unknown names."""
    out: list[Voice] = []
    for name in names:
        if name in ("default", "all"):
            expanded = DEFAULT_VOICES if name == "default" else tuple(REGISTRY)
            out.extend(REGISTRY[n] for n in expanded)
        elif name in REGISTRY:
            out.append(REGISTRY[name])
        else:
            raise ValueError(f"unknown voice {name!r}; expected 'default', 'all' or one of {sorted(REGISTRY)}")
    return list(dict.fromkeys(out))


def missing_requirement(voice: Voice) -> str | None:
    """What this machine lacks to run ``voice`` (binary or voice data), or None when it can run."""
    binary = BINARIES[voice.engine]
    if shutil.which(binary) is None:
        return f"{binary} not found (Debian package {PACKAGES[voice.engine]})"
    data = _voice_data(voice)
    if data is not None and not any(Path(p).exists() for p in data):
        pkg = PACKAGES["mbrola"] if voice.voice.startswith("mb-") else PACKAGES[voice.engine]
        return f"voice data {data[0]} not found (Debian package {pkg})"
    if voice.voice.startswith("mb-") and shutil.which("mbrola") is None:
        return f"mbrola not found (Debian package {PACKAGES['mbrola']})"
    return None


def _voice_data(voice: Voice) -> list[str] | None:
    if voice.engine == "festival":
        return [f"/usr/share/festival/voices/{d}/{voice.voice}" for d in ("english", "us")]
    if voice.engine == "rhvoice":
        return [f"/usr/share/RHVoice/voices/{voice.voice}"]
    if voice.engine == "pico":
        return [f"/usr/share/pico/lang/{voice.voice}_ta.bin"]
    if voice.voice.startswith("mb-"):
        return [f"/usr/share/mbrola/{voice.voice[3:]}"]
    return None


def available(voices: list[Voice]) -> tuple[list[Voice], dict[str, str]]:
    """Split ``voices`` into those this machine can run and {name: what is missing}; warns for each missing."""
    ok, missing = [], {}
    for v in voices:
        why = missing_requirement(v)
        if why is None:
            ok.append(v)
        else:
            missing[v.name] = why
            logger.warning("voice %s skipped: %s", v.name, why)
    return ok, missing
