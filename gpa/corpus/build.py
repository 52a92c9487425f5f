"""``build_corpus``: the same sentences in many voices, written resumably, plus manifests and a summary.

Layout of ``out_dir``::

    wav/<speaker>/<sentence id>.wav   16 kHz mono PCM16, one per (speaker, sentence)
    real -> <data dir>                 a link to the real recordings (cathy, LibriSpeech excerpts)
    sentences.jsonl                    the chosen sentences: id, text, source, split
    train.jsonl heldout_text.jsonl heldout_voice.jsonl cathy_test.jsonl references.jsonl  {audio, text, speaker}
    utterances.jsonl                   every utterance: audio, text, speaker, voice, split, sentence, source, duration
    train.list train_gpa.jsonl         the train split for gpa prepare (audio|text list, task records)
    summary.json                       config, voices, counts, hours, failures

Seen (train) voices speak every chosen sentence: train-bucket sentences go to ``train``, held-out-bucket
ones to ``heldout_text``. Held-out voices speak only the held-out sentences (``heldout_voice``), so no
held-out voice and no held-out sentence ever reaches ``train``.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import soundfile as sf
from tqdm import tqdm

from gpa.corpus import manifests, real, text, voices
from gpa.corpus.manifests import Entry
from gpa.corpus.synth import SynthesisError, synthesize_many
from gpa.corpus.voices import Perturbation, Speaker

logger = logging.getLogger(__name__)

WAV_DIR = "wav"
BATCH_SENTENCES = 16  # sentences per batch: one festival process speaks them all
REAL_LINK = "real"


@dataclass(frozen=True)
class CorpusConfig:
    """What ``build_corpus`` makes; the same config always gives the same files."""

    sentences: int = 1000  # train-bucket sentences spoken by every seen voice
    heldout_sentences: int | None = None  # held-out-bucket sentences (None: sentences // 10, at least 1)
    voices: tuple[str, ...] = ("default",)  # registry names, "default" or "all"; missing engines are skipped
    perturbations: tuple[str, ...] = ()  # e.g. ("p+300", "p-300t1.1"): each adds a pseudo-speaker per voice
    sources: tuple[str, ...] = text.DEFAULT_SOURCES  # sentence sources (text.SOURCES), earlier first in the round-robin
    seed: int = 0  # which sentences are chosen, and the pairing of task records
    workers: int = 2  # engine processes running at once
    data_dir: str | None = None  # real recordings (cathy/, librispeech-excerpts/); None: real.default_data_dir()
    real: bool = True  # include cathy and the LibriSpeech excerpts
    min_chars: int = text.MIN_CHARS  # cleaned sentence length bounds
    max_chars: int = text.MAX_CHARS
    skip_sentences: int = 0  # leave out the first N chosen train sentences (an earlier part of the corpus has them)
    voices_per_sentence: int | None = None  # None: every seen voice speaks every train sentence; k: k of them

    def __post_init__(self) -> None:
        if self.sentences < 1 or self.workers < 1:
            raise ValueError(f"sentences and workers must be >= 1, got {self.sentences} and {self.workers}")
        if self.skip_sentences < 0:
            raise ValueError(f"skip_sentences must be >= 0, got {self.skip_sentences}")
        if self.voices_per_sentence is not None and self.voices_per_sentence < 1:
            raise ValueError(f"voices_per_sentence must be >= 1 or None, got {self.voices_per_sentence}")
        if self.heldout_sentences is not None and self.heldout_sentences < 0:
            raise ValueError(f"heldout_sentences must be >= 0, got {self.heldout_sentences}")
        if not self.voices:
            raise ValueError("no voices given")
        if not 1 <= self.min_chars <= self.max_chars:
            raise ValueError(f"need 1 <= min_chars <= max_chars, got {self.min_chars}, {self.max_chars}")
        bad = [s for s in self.sources if s not in text.SOURCES]
        if bad or not self.sources:
            raise ValueError(f"unknown or no sentence sources {bad}; expected some of {text.SOURCES}")
        voices.resolve(self.voices)  # raises on unknown names
        for p in self.perturbations:
            Perturbation.parse(p)

    @property
    def n_heldout(self) -> int:
        return max(1, self.sentences // 10) if self.heldout_sentences is None else self.heldout_sentences


@dataclass(frozen=True)
class Job:
    """One utterance to make."""

    speaker: Speaker
    sentence: text.Sentence
    split: str  # "train", "heldout_text" or "heldout_voice"
    rel: str  # audio path relative to the corpus folder


@dataclass
class Summary:
    """What ``build_corpus`` did."""

    out_dir: str
    config: dict[str, Any]
    voices_available: list[str]
    voices_missing: dict[str, str]  # name -> what is missing on this machine
    speakers: dict[str, list[str]]  # "train" / "heldout": speaker ids
    sentences: dict[str, int]  # "train" / "heldout": counts
    utterances: dict[str, int]  # manifest -> lines
    hours: dict[str, float]  # manifest -> hours of audio
    synthesised: int  # new files this run
    reused: int  # files found from an earlier run
    failed: list[dict[str, str]] = field(default_factory=list)  # {"speaker", "sentence", "error"}
    seconds: float = 0.0  # wall time of this run
    manifests: dict[str, str] = field(default_factory=dict)  # what -> file name


def choose_sentences(cfg: CorpusConfig, data_dir: Path | None) -> list[text.Sentence]:
    """The train-bucket and held-out-bucket sentences of ``cfg``, train ones first."""
    seen: set[str] = set()
    cathy = None if data_dir is None else data_dir / real.CATHY
    pools = {s: list(text.pool(text.read_source(s, cathy), s, seen, cfg.min_chars, cfg.max_chars))
             for s in cfg.sources}
    train = text.select({k: [s for s in p if not s.heldout] for k, p in pools.items()},
                        cfg.skip_sentences + cfg.sentences, cfg.seed)[cfg.skip_sentences:]
    held = text.select({k: [s for s in p if s.heldout] for k, p in pools.items()}, cfg.n_heldout, cfg.seed)
    return train + held


def speakers_of(cfg: CorpusConfig) -> tuple[list[Speaker], dict[str, str]]:
    """Every runnable voice, plain and perturbed, and the voices skipped for missing software."""
    ok, missing = voices.available(voices.resolve(cfg.voices))
    perturbations = [Perturbation.parse(p) for p in cfg.perturbations]
    return [Speaker(v, p) for v in ok for p in (None, *perturbations)], missing


def plan(speakers: list[Speaker], sentences: list[text.Sentence],
         voices_per_sentence: int | None = None) -> list[list[Job]]:
    """Batches of jobs: seen speakers x all sentences, held-out speakers x held-out sentences.

    With ``voices_per_sentence`` = k, train sentence number i (in chosen order) is spoken by the seen speakers
    i*k .. i*k+k-1 (cyclically), so every seen speaker gets the same share and the text varies k-fold more
    per hour of audio; held-out sentences are still spoken by every speaker.

    Sentences go in chunks of BATCH_SENTENCES, train and held-out ones interleaved in proportion, each in
    its chosen order; a batch is one speaker's jobs of one chunk (one festival process). So the files of an
    interrupted build are all voices of a prefix of both lists, which is what a build with fewer sentences
    (same seed) chooses: rebuilding with a smaller ``sentences`` gives complete manifests at once.
    """
    buckets = {False: [s for s in sentences if not s.heldout], True: [s for s in sentences if s.heldout]}
    progress = {s.id: i / len(b) for b in buckets.values() for i, s in enumerate(b)}
    order = sorted(sentences, key=lambda s: progress[s.id])
    seen = {name: i for i, name in enumerate(sp.name for sp in speakers if sp.voice.name not in voices.HELDOUT_VOICES)}
    k = len(seen) if voices_per_sentence is None else min(voices_per_sentence, len(seen))
    train_rank = {s.id: i for i, s in enumerate(buckets[False])}

    def speaks(sp: Speaker, s: text.Sentence) -> bool:
        if s.heldout:
            return True
        if sp.voice.name in voices.HELDOUT_VOICES:
            return False
        return (seen[sp.name] - train_rank[s.id] * k) % len(seen) < k

    # A batch keeps about BATCH_SENTENCES jobs per engine process when each speaker has only a share of them.
    chunk = BATCH_SENTENCES * max(1, len(seen) // k) if seen else BATCH_SENTENCES
    batches = []
    for start in range(0, len(order), chunk):
        for sp in speakers:
            held_voice = sp.voice.name in voices.HELDOUT_VOICES
            batch = [Job(sp, s, "heldout_voice" if held_voice else ("heldout_text" if s.heldout else "train"),
                         f"{WAV_DIR}/{sp.name}/{s.id}.wav")
                     for s in order[start : start + chunk] if speaks(sp, s)]
            if batch:
                batches.append(batch)
    return batches


Result = tuple[Job, float | None, bool, str | None]  # job, duration (None: failed), reused, error


def _run_batch(batch: list[Job], out: Path) -> list[Result]:
    """Reuse the files that exist, synthesise the others in one engine call where the engine allows it."""
    done: dict[str, Result] = {}
    todo = []
    for job in batch:
        path = out / job.rel
        if path.is_file():
            done[job.rel] = (job, sf.info(str(path)).duration, True, None)
        else:
            todo.append(job)
    if todo:
        results = synthesize_many(todo[0].speaker, [(j.sentence.text, out / j.rel) for j in todo])
        for job, r in zip(todo, results, strict=True):
            done[job.rel] = (job, None, False, str(r)) if isinstance(r, SynthesisError) else (job, r, False, None)
    return [done[j.rel] for j in batch]


def synthesise_all(batches: list[list[Job]], out: Path, workers: int, progress: bool) -> tuple[
        list[Entry], int, int, list[dict[str, str]]]:
    """Run ``batches`` on ``workers`` threads (each drives one engine process); returns entries, new, reused, failed."""
    entries, new, reused, failed = [], 0, 0, []
    # Threads suffice: the work is in the engine and sox subprocesses, which run on all cores.
    with ThreadPoolExecutor(max_workers=workers) as pool, tqdm(total=sum(map(len, batches)), disable=not progress,
                                                               unit="utt", desc="synthesise") as bar:
        for results in pool.map(lambda b: _run_batch(b, out), batches):
            bar.update(len(results))
            for job, duration, was_there, error in results:
                if duration is None:
                    logger.warning("failed %s %s: %s", job.speaker.name, job.sentence.id, error)
                    failed.append({"speaker": job.speaker.name, "sentence": job.sentence.id, "error": str(error)})
                    continue
                reused, new = (reused + 1, new) if was_there else (reused, new + 1)
                p = job.speaker.perturbation
                entries.append(Entry(job.rel, job.sentence.text, job.speaker.name, job.speaker.voice.name, job.split,
                                     job.sentence.id, "synthetic", round(duration, 3),
                                     job.speaker.voice.person + (p.suffix if p else "")))
    return entries, new, reused, failed


def link_real(out: Path, data_dir: Path) -> None:
    """Make ``out/real`` a link to ``data_dir`` (replacing an older link); refuses to replace anything else."""
    link = out / REAL_LINK
    if link.is_symlink():
        if Path(os.readlink(link)) == data_dir.resolve():
            return
        link.unlink()
    elif link.exists():
        raise FileExistsError(f"{link} exists and is not a link; remove it or build into another folder")
    link.symlink_to(data_dir.resolve(), target_is_directory=True)


def real_entries(out: Path, data_dir: Path) -> dict[str, list[Entry]]:
    """Manifest entries of the real recordings: cathy train / test and the LibriSpeech references."""
    link_real(out, data_dir)
    groups: dict[str, list[Entry]] = defaultdict(list)
    for u in real.cathy(data_dir) + real.librispeech(data_dir):
        group = {"train": "train", "heldout_text": "cathy_test", "reference": "references"}[u.split]
        sentence = text.sentence_id(u.text) if u.text else None
        groups[group].append(Entry(f"{REAL_LINK}/{u.rel}", u.text, u.speaker, "real", u.split, sentence, "real",
                                   round(sf.info(str(u.path)).duration, 3), u.speaker))
    return groups


def _sort_key(e: Entry) -> tuple[str, str]:
    return e.speaker, e.audio


def build_corpus(out_dir: str | Path, config: CorpusConfig = CorpusConfig(), progress: bool = False) -> Summary:
    """Synthesise (or resume) the corpus of ``config`` into ``out_dir`` and write its manifests.

    Args:
        out_dir: the corpus folder (created; files of an earlier run with the same config are reused).
        config: sentences, voices, perturbations, seed and workers.
        progress: show a tqdm bar.

    Returns:
        The summary, also written to ``out_dir/summary.json``.
    """
    start = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data_dir = Path(config.data_dir) if config.data_dir else real.default_data_dir()
    sentences = choose_sentences(config, data_dir)
    speakers, missing = speakers_of(config)
    if not speakers:
        raise ValueError(f"none of the voices {list(config.voices)} can run here: {missing}; "
                         "bash .ci/install-voices installs them")
    manifests.write_jsonl(out / "sentences.jsonl", ({"id": s.id, "text": s.text, "source": s.source,
                                                     "split": "heldout" if s.heldout else "train"}
                                                    for s in sentences))
    for stale in (out / WAV_DIR).glob("*/.*.partial"):  # left by a killed run
        stale.unlink()
    jobs = plan(speakers, sentences, config.voices_per_sentence)
    entries, new, reused, failed = synthesise_all(jobs, out, config.workers, progress)
    groups: dict[str, list[Entry]] = defaultdict(list)
    for e in entries:
        groups[e.split].append(e)
    if config.real and data_dir is not None and data_dir.is_dir():
        for group, real_list in real_entries(out, data_dir).items():
            groups[group].extend(real_list)
    elif config.real:
        logger.warning("real recordings not found (data_dir %s; set %s); real manifests are empty", data_dir,
                       real.DATA_ENV)
    for g in groups.values():
        g.sort(key=_sort_key)
    names = manifests.write_splits(out, groups)
    manifests.write_jsonl(out / manifests.TRAIN_TASKS, manifests.task_records(groups["train"], config.seed))
    summary = Summary(
        str(out), asdict(config), sorted({sp.voice.name for sp in speakers}), missing,
        {"train": sorted(sp.name for sp in speakers if sp.voice.name not in voices.HELDOUT_VOICES),
         "heldout": sorted(sp.name for sp in speakers if sp.voice.name in voices.HELDOUT_VOICES)},
        {"train": sum(not s.heldout for s in sentences), "heldout": sum(s.heldout for s in sentences)},
        {k: len(groups.get(k, [])) for k in manifests.SPLITS},
        {k: round(sum(e.duration for e in groups.get(k, [])) / 3600, 4) for k in manifests.SPLITS},
        new, reused, failed, round(time.perf_counter() - start, 2),
        {**names, "list": manifests.TRAIN_LIST, "tasks": manifests.TRAIN_TASKS, "sentences": "sentences.jsonl",
         "utterances": manifests.UTTERANCES})
    (out / "summary.json").write_text(json.dumps(asdict(summary), indent=2) + "\n", encoding="utf-8")
    logger.info("corpus %s: %d new, %d reused, %d failed utterances in %.1f s", out, new, reused, len(failed),
                summary.seconds)
    return summary
