"""The real recordings in the project's data folder: cathy (CMU ARCTIC prompts) and LibriSpeech excerpts.

cathy's recordings follow the text split of :mod:`gpa.corpus.text`: a recording whose transcript is in the
held-out hash bucket is test data ("heldout_text"), never training data, and its sentence is never
synthesised for training either. LibriSpeech excerpts have no transcripts: they are unseen reference
voices ("reference") for voice cloning, conversion and speaker similarity.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from gpa.corpus.text import is_heldout

logger = logging.getLogger(__name__)

DATA_ENV = "GPA_DATA"  # overrides where the real recordings are looked for
CATHY = "cathy"
LIBRISPEECH = "librispeech-excerpts"
CATHY_SPEAKER = "cathy"


@dataclass(frozen=True)
class RealUtterance:
    """One real recording."""

    path: Path  # absolute path of the audio file
    rel: str  # path below the data folder, e.g. "cathy/arctic_a0001_1592748574.flac"
    text: str | None  # transcript (None: LibriSpeech excerpts have none)
    speaker: str  # "cathy" or "libri-<LibriSpeech speaker id>"
    split: str  # "train", "heldout_text" or "reference"


def default_data_dir() -> Path | None:
    """$GPA_DATA, else ``shared/data`` beside this repository checkout, if it exists."""
    env = os.environ.get(DATA_ENV)
    if env:
        return Path(env)
    beside = Path(__file__).resolve().parents[3] / "shared" / "data"
    return beside if beside.is_dir() else None


def cathy(data_dir: Path) -> list[RealUtterance]:
    """cathy's recordings with transcripts, split by the text hash ("train" or "heldout_text")."""
    out = []
    for txt in sorted((data_dir / CATHY).glob("*.txt")):
        audio = txt.with_suffix(".flac")
        if not audio.is_file():
            logger.warning("cathy transcript %s has no recording %s; skipped", txt, audio.name)
            continue
        text = " ".join(txt.read_text(encoding="utf-8").split())
        split = "heldout_text" if is_heldout(text) else "train"
        out.append(RealUtterance(audio, f"{CATHY}/{audio.name}", text, CATHY_SPEAKER, split))
    return out


def librispeech(data_dir: Path) -> list[RealUtterance]:
    """The LibriSpeech excerpts (every file is a "reference"; speaker from the LibriSpeech file name)."""
    root = data_dir / LIBRISPEECH
    return [RealUtterance(p, str(p.relative_to(data_dir)), None, "libri-" + p.name.split("-")[0], "reference")
            for p in sorted(root.rglob("*.flac"))]
