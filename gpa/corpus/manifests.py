"""Manifest files of a corpus: one JSONL per split, an ``audio|text`` list and a task manifest for ``gpa prepare``.

A split manifest line is exactly what the eval harness reads, ``{"audio", "text", "speaker"}`` (no ``text``
for recordings without a transcript), with ``audio`` relative to the manifest's folder. ``utterances.jsonl``
has every utterance with all its fields: ``audio, text, speaker, voice, split, sentence, source, duration``.
``train_gpa.jsonl`` holds the authors' task records (``stt``, ``tts-a``, ``vc``) built from the
parallel train utterances, which :func:`gpa.train.manifest.read_manifest` reads.
"""

from __future__ import annotations

import json
import os
import random
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

SPLITS = ("train", "heldout_text", "heldout_voice", "cathy_test", "references")
SPLIT_FILES = {s: f"{s}.jsonl" for s in SPLITS}
TRAIN_LIST = "train.list"  # "audio|text" lines (gpa prepare's plain list format)
TRAIN_TASKS = "train_gpa.jsonl"  # the authors' task format (gpa prepare's jsonl format)
UTTERANCES = "utterances.jsonl"  # every utterance with all Entry fields


@dataclass(frozen=True)
class Entry:
    """One utterance of the corpus, as written to a split manifest."""

    audio: str  # path relative to the corpus folder
    text: str | None  # transcript; None for reference recordings without one
    speaker: str  # speaker id (voice name plus perturbation suffix, "cathy", "libri-<id>")
    voice: str  # registry voice name, or "real"
    split: str  # "train", "heldout_text", "heldout_voice" or "reference"
    sentence: str | None  # sentence id (text.sentence_id) or None
    source: str  # "synthetic" or "real"
    duration: float  # seconds
    identity: str = ""  # who it sounds like: the recorded person plus any perturbation (not written)

    def to_json(self) -> dict[str, Any]:
        """All fields but ``identity`` (a line of utterances.jsonl)."""
        d = asdict(self)
        d.pop("identity")
        return d

    def to_eval(self) -> dict[str, Any]:
        """The eval harness's fields: audio, text (when there is one), speaker."""
        return {"audio": self.audio, **({"text": self.text} if self.text else {}), "speaker": self.speaker}


def write_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> int:
    """Write ``rows`` one JSON object per line, atomically; returns the number of lines."""
    lines = [json.dumps(r, ensure_ascii=True) for r in rows]
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    os.replace(partial, path)
    return len(lines)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The objects of a JSONL file."""
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def write_splits(out: Path, by_split: dict[str, list[Entry]]) -> dict[str, str]:
    """One manifest per split (empty splits still get an empty file) and utterances.jsonl; returns {split: file}."""
    for split in SPLITS:
        write_jsonl(out / SPLIT_FILES[split], (e.to_eval() for e in by_split.get(split, [])))
    write_jsonl(out / UTTERANCES, (e.to_json() for split in SPLITS for e in by_split.get(split, [])))
    train = by_split.get("train", [])
    partial = out / f".{TRAIN_LIST}.partial"
    partial.write_text("".join(f"{e.audio}|{e.text}\n" for e in train if e.text), encoding="utf-8")
    os.replace(partial, out / TRAIN_LIST)
    return dict(SPLIT_FILES)


def task_records(train: list[Entry], seed: int) -> list[dict[str, Any]]:
    """The authors' task records for the train utterances: stt and tts-a for each, vc where a parallel one exists.

    tts-a takes as speaker reference another sentence of the same speaker; vc converts to a speaker of
    another identity that spoke the same sentence (``vc_audio``), referenced by another sentence of that
    speaker (``ref_audio``), so the reference never gives the content away. Choices are seeded.
    """
    rng = random.Random(seed)
    by_speaker: dict[str, list[Entry]] = defaultdict(list)
    by_sentence: dict[str, list[Entry]] = defaultdict(list)
    for e in train:
        by_speaker[e.speaker].append(e)
        if e.sentence is not None:
            by_sentence[e.sentence].append(e)

    def other_sentence(speaker: str, sentence: str | None) -> Entry | None:
        others = [o for o in by_speaker[speaker] if o.sentence != sentence]
        return rng.choice(others) if others else None

    out: list[dict[str, Any]] = []
    for e in train:
        if e.text is None:
            continue
        out.append({"task": "stt", "audio": e.audio, "text": e.text})
        ref = other_sentence(e.speaker, e.sentence)
        out.append({"task": "tts-a", "audio": e.audio, "text": e.text, "ref_audio": ref.audio if ref else ""})
        targets = [t for t in by_sentence.get(e.sentence or "", []) if t.identity != e.identity]
        if targets:
            target = rng.choice(targets)
            target_ref = other_sentence(target.speaker, e.sentence)
            if target_ref is not None:
                out.append({"task": "vc", "audio": e.audio, "ref_audio": target_ref.audio, "vc_audio": target.audio})
    return out
