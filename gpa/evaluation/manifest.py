"""Test sets (a JSONL manifest of recordings) and the seeded choice of inputs and reference voices."""

from __future__ import annotations

import json
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

MANIFEST_KEYS = ("audio", "text", "speaker", "id")  # "text" and "id" are optional
TASKS = ("asr", "tts", "vc")
REFERENCE_MODES = ("same-speaker", "other-speaker")


@dataclass(frozen=True)
class Item:
    """One recording of a test set."""

    id: str  # unique in its manifest (default: the audio path as written there)
    audio: Path  # resolved against the manifest's directory
    speaker: str
    text: str | None = None  # its transcript; None for a recording used only as a reference voice


@dataclass(frozen=True)
class TestSet:
    """A manifest's recordings, in file order."""

    name: str  # the report's key (default: the manifest's file stem)
    path: Path
    items: tuple[Item, ...]

    @property
    def speakers(self) -> list[str]:
        """Distinct speakers in order of first appearance."""
        return list(dict.fromkeys(i.speaker for i in self.items))


def _item(record: object, root: Path, where: str) -> Item:
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
    unknown = set(record) - set(MANIFEST_KEYS)
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {sorted(unknown)}; allowed: {list(MANIFEST_KEYS)}")
    for key in ("audio", "speaker"):
        if not isinstance(record.get(key), str) or not record[key].strip():
            raise ValueError(f"{where}: {key!r} must be a non-empty string, got {record.get(key)!r}")
    text = record.get("text")
    if text is not None and (not isinstance(text, str) or not text.strip()):
        raise ValueError(f"{where}: 'text' must be a non-empty string or absent, got {text!r}")
    audio = root / record["audio"]
    if not audio.is_file():
        raise ValueError(f"{where}: audio file {audio} not found")
    return Item(str(record.get("id", record["audio"])), audio, record["speaker"], text)


def load_manifest(path: str | Path, name: str | None = None) -> TestSet:
    """Read a JSONL manifest: one ``{"audio", "speaker", "text"?, "id"?}`` object per line.

    Raises:
        ValueError: a bad line (naming ``path:line``), a duplicate id or an empty manifest.
    """
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise ValueError(f"cannot read manifest {path}: {e.strerror}") from e
    items: list[Item] = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n}: not JSON ({e.msg})") from e
        items.append(_item(record, path.parent, f"{path}:{n}"))
    if not items:
        raise ValueError(f"manifest {path} has no items")
    ids = [i.id for i in items]
    dupes = sorted({i for i in ids if ids.count(i) > 1})
    if dupes:
        raise ValueError(f"manifest {path}: duplicate id(s) {dupes[:5]}")
    return TestSet(name or path.stem, path, tuple(items))


def write_manifest(path: str | Path, items: Iterable[Item]) -> None:
    """Write items as a JSONL manifest, audio paths relative to its directory where possible."""
    path = Path(path)
    root = path.parent.resolve()
    lines = []
    for item in items:
        audio = item.audio.resolve()
        rel = audio.relative_to(root) if audio.is_relative_to(root) else audio
        record = {"id": item.id, "audio": str(rel), "speaker": item.speaker}
        if item.text is not None:
            record["text"] = item.text
        lines.append(json.dumps(record, ensure_ascii=False))
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")


@dataclass(frozen=True)
class EvalSpec:
    """What to evaluate on each test set, and how inputs meet reference voices."""

    tasks: tuple[str, ...] = TASKS  # any of "asr", "tts", "vc"
    limit: int | None = None  # inputs per test set: a seeded subset of the transcribed items (None: all)
    seed: int = 0  # drives the subset, the pairing and the model's sampling seeds
    tts_reference: str = "same-speaker"  # TTS voice: another recording of the text's speaker, or another speaker
    warmup: bool = True  # one untimed model call per task before timing (first-call overheads)
    asr_beam_size: int | None = None  # ASR beam search width (None: greedy)

    def __post_init__(self) -> None:
        bad = [t for t in self.tasks if t not in TASKS]
        if bad or not self.tasks:
            raise ValueError(f"unknown or no task(s) {bad}; expected some of {list(TASKS)}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit must be >= 1 or None, got {self.limit}")
        if self.asr_beam_size is not None and self.asr_beam_size < 1:
            raise ValueError(f"asr_beam_size must be >= 1 or None, got {self.asr_beam_size}")
        if self.tts_reference not in REFERENCE_MODES:
            raise ValueError(f"tts_reference {self.tts_reference!r}; expected one of {list(REFERENCE_MODES)}")

    def rng(self, test_set: str, purpose: str) -> random.Random:
        """A generator seeded by (seed, test set, purpose): the same choices on every run."""
        return random.Random(f"{self.seed}/{test_set}/{purpose}")


def select_inputs(test_set: TestSet, spec: EvalSpec) -> list[Item]:
    """The transcribed items every task uses as inputs: all, or ``spec.limit`` of them (seeded), in file order."""
    transcribed = [i for i in test_set.items if i.text is not None]
    if spec.limit is None or spec.limit >= len(transcribed):
        return transcribed
    keep = set(spec.rng(test_set.name, "inputs").sample(range(len(transcribed)), spec.limit))
    return [item for n, item in enumerate(transcribed) if n in keep]


@dataclass(frozen=True)
class Pair:
    """An input with the reference voice it is spoken or converted in."""

    input: Item  # TTS: its text is spoken; VC: its recording is converted
    reference: Item  # the voice to clone
    other: Item | None  # another recording of the reference's speaker: the ground truth for similarity


def _differs(a: Item, b: Item) -> bool:
    """Another recording, and not of the same sentence (a reference must not give the content away)."""
    return a.audio != b.audio and (a.text is None or a.text != b.text)


def pair_references(inputs: Sequence[Item], pool: Sequence[Item], same_speaker: bool,
                    rng: random.Random) -> tuple[list[Pair], dict[str, int]]:
    """Give each input a reference from ``pool`` that does not say the input's sentence: another recording of
    its own speaker (``same_speaker``), or a recording of a different speaker (the speaker drawn uniformly among
    those with a candidate, then the recording).

    The ground-truth recording (:attr:`Pair.other`) is the input itself for ``same_speaker``; otherwise another
    recording of the reference's speaker, preferably of the input's sentence (a parallel corpus has the true
    target of a conversion).

    Returns:
        the pairs, and counts of inputs left out by reason (no candidate reference).
    """
    by_speaker: dict[str, list[Item]] = {}
    for item in pool:
        by_speaker.setdefault(item.speaker, []).append(item)
    pairs, skipped = [], {}
    for item in inputs:
        if same_speaker:
            refs = [r for r in by_speaker.get(item.speaker, []) if _differs(r, item)]
            ref = rng.choice(refs) if refs else None
            other: Item | None = item  # the input's own recording is the speaker's other recording
        else:
            speakers = [s for s, rs in by_speaker.items() if s != item.speaker and any(_differs(r, item) for r in rs)]
            ref = rng.choice([r for r in by_speaker[rng.choice(speakers)] if _differs(r, item)]) if speakers else None
            others = [] if ref is None else [r for r in by_speaker[ref.speaker] if r.audio != ref.audio]
            parallel = [r for r in others if item.text is not None and r.text == item.text]
            other = rng.choice(parallel or others) if others else None
        if ref is None:
            reason = ("no recording of its speaker with another sentence" if same_speaker
                      else "no recording of another speaker with another sentence")
            skipped[reason] = skipped.get(reason, 0) + 1
            continue
        pairs.append(Pair(item, ref, other))
    return pairs, skipped
