"""Evaluate a model on test sets: ASR, TTS and VC, each beside the same judges' scores on the recordings."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from gpa.audio import SAMPLE_RATE, load_audio, save_audio
from gpa.evaluation.judges import DNSMOS_KEYS, Judges
from gpa.evaluation.manifest import EvalSpec, Item, Pair, TestSet, pair_references, select_inputs
from gpa.evaluation.metrics import Errors, corpus, cosine, errors, mean

logger = logging.getLogger(__name__)

MODEL, TRUTH = "model", "ground_truth"


def _to_16k(wav: np.ndarray, sr: int) -> np.ndarray:
    if len(wav) == 0:
        return np.zeros(0, dtype=np.float32)
    return load_audio(np.asarray(wav, dtype=np.float32), sr, normalize=False, name="model output")


class Scorer:
    """The judges, with their verdicts on recordings cached by file (a reference is scored once)."""

    def __init__(self, judges: Judges) -> None:
        self.judges = judges
        self._cache: dict[tuple[str, Path], Any] = {}

    def _cached(self, kind: str, item: Item, fn: Callable[[np.ndarray], Any]) -> Any:
        key = (kind, item.audio)
        if key not in self._cache:
            self._cache[key] = fn(self.wav(item))
        return self._cache[key]

    def wav(self, item: Item) -> np.ndarray:
        """The recording at 16 kHz, at its own level."""
        key = ("wav", item.audio)
        if key not in self._cache:
            self._cache[key] = load_audio(item.audio, normalize=False)
        return self._cache[key]

    def transcript(self, item: Item) -> str:
        """The ASR judge's transcript of the recording."""
        return self._cached("asr", item, self.judges.asr.transcribe)

    def embedding(self, item: Item) -> np.ndarray | None:
        """The speaker judge's embedding of the recording."""
        return self._cached("spk", item, self.judges.speaker.embed)

    def quality(self, item: Item) -> dict[str, float] | None:
        """DNSMOS of the recording."""
        return self._cached("mos", item, self.judges.quality.score)

    def similarity(self, a: np.ndarray | Item | None, b: np.ndarray | Item | None) -> float | None:
        """Cosine of two speaker embeddings (an Item is embedded through the cache; None propagates)."""
        ea, eb = (self.embedding(x) if isinstance(x, Item) else x for x in (a, b))
        return None if ea is None or eb is None else cosine(ea, eb)


@dataclass
class Row:
    """Per-item results of one row (the model, or the ground truth) and their summary."""

    errors: list[Errors] = field(default_factory=list)
    scores: dict[str, list[float | None]] = field(default_factory=dict)  # similarity etc., per item
    quality: list[dict[str, float] | None] = field(default_factory=list)
    failed: int = 0  # model calls that raised (scored as empty outputs)
    wall_s: float = 0.0  # model time
    audio_s: float = 0.0  # audio the RTF divides by (ASR input, TTS/VC output)

    def add_score(self, name: str, value: float | None) -> None:
        """Record one item's ``name`` score (None: the judge found nothing to score)."""
        self.scores.setdefault(name, []).append(value)

    def summary(self, timed: bool) -> dict[str, Any]:
        """Corpus WER/CER, mean scores with their counts, mean DNSMOS and the real-time factor."""
        total = corpus(self.errors)
        out: dict[str, Any] = {"wer": total.wer, "cer": total.cer, "words": total.words}
        for name, values in self.scores.items():
            out[name] = mean(values)
            out[f"{name}_n"] = sum(v is not None for v in values)
        if self.quality:
            out["dnsmos"] = {k: mean(q[k] if q else None for q in self.quality) for k in DNSMOS_KEYS}
            out["dnsmos_n"] = sum(q is not None for q in self.quality)
        if timed:
            out |= {"failed": self.failed, "wall_s": self.wall_s, "audio_s": self.audio_s,
                    "rtf": self.wall_s / self.audio_s if self.audio_s else None}
        return out


def _timed(fn: Callable[[], Any], row: Row, what: str, empty: Any) -> tuple[Any, float, dict[str, str]]:
    """Call the model on item ``what`` -> (result, wall seconds, {} or {"error": message} for its record).

    A call that raises ValueError (bad input, too long) scores as an empty output and is counted in
    ``row.failed`` (a failure must not look better than a miss)."""
    start = time.perf_counter()
    try:
        result, failure = fn(), {}
    except ValueError as e:
        logger.warning("model failed on %s: %s", what, e)
        result, failure = empty, {"error": str(e)}
        row.failed += 1
    return result, time.perf_counter() - start, failure


def _warm_up(fn: Callable[[], Any]) -> None:
    """An untimed first call; if it fails, the timed call of the same item records the failure."""
    try:
        fn()
    except ValueError as e:
        logger.warning("warm-up call failed: %s", e)


def _ovrl(q: dict[str, float] | None) -> float | None:
    return None if q is None else q["ovrl"]


@dataclass
class TaskRun:
    """Everything one task needs: the model (None: ground truth only), judges, options and output folder."""

    model: Any
    scorer: Scorer
    options: dict[str, Any]
    seed: int
    save_dir: Path | None
    progress: bool
    asr_beam_size: int | None = None

    def bar(self, items: Sequence[Any], what: str) -> Any:
        """A progress bar over ``items`` (stderr)."""
        return tqdm(items, desc=what, disable=not self.progress, unit="item")

    def save(self, task: str, n: int, wav: np.ndarray) -> None:
        """Keep an output for listening (``save_dir/task/NNNN.wav``)."""
        if self.save_dir is not None and len(wav):
            path = self.save_dir / task / f"{n:04d}.wav"
            path.parent.mkdir(parents=True, exist_ok=True)
            save_audio(path, wav, SAMPLE_RATE)


def run_asr(run: TaskRun, inputs: Sequence[Item], warmup: bool) -> dict[str, Any]:
    """The model's transcripts against the references, beside the judge's transcripts of the same audio.

    Every model call runs before any judge does, so that the judges' thread pools (which keep spinning a
    while after each call) do not slow the timed model calls.
    """
    rows, items = {MODEL: Row(), TRUTH: Row()}, []
    made: list[tuple[str, float, dict[str, str]]] = []
    if run.model is not None:
        if warmup and inputs:
            _warm_up(lambda: run.model.asr(str(inputs[0].audio), beam_size=run.asr_beam_size, **run.options))
        made = [_timed(lambda: run.model.asr(str(item.audio), beam_size=run.asr_beam_size, **run.options),  # noqa: B023
                       rows[MODEL], item.id, "")
                for item in run.bar(inputs, "asr")]
    for k, item in enumerate(inputs):
        record: dict[str, Any] = {"id": item.id, "text": item.text}
        truth = run.scorer.transcript(item)
        rows[TRUTH].errors.append(e := errors(item.text, truth))
        record[TRUTH] = {"hypothesis": truth, "wer": e.wer}
        if run.model is not None:
            hyp, wall, failure = made[k]
            record.update(failure)
            rows[MODEL].errors.append(e := errors(item.text, hyp))
            rows[MODEL].wall_s += wall
            rows[MODEL].audio_s += len(run.scorer.wav(item)) / SAMPLE_RATE
            record[MODEL] = {"hypothesis": hyp, "wer": e.wer, "wall_s": wall}
        items.append(record)
    return _task_report(run, rows, len(inputs), {}, items)


def _judge_output(run: TaskRun, wav: np.ndarray, text: str) -> tuple[Errors, str, np.ndarray | None, Any]:
    hyp = run.scorer.judges.asr.transcribe(wav)
    return errors(text, hyp), hyp, run.scorer.judges.speaker.embed(wav), run.scorer.judges.quality.score(wav)


Made = tuple[np.ndarray, float, dict[str, str]]  # a model output (16 kHz), its wall time, its failure if any


def _make(run: TaskRun, task: str, n: int, pair: Pair, row: Row) -> Made:
    """One timed TTS or VC call (the reference is tokenized outside the timing, once per call)."""
    voice = run.model.voice(str(pair.reference.audio))
    if task == "tts":
        fn = lambda: run.model.tts(pair.input.text, voice, seed=run.seed + n, **run.options)  # noqa: E731
    else:
        fn = lambda: run.model.vc(str(pair.input.audio), voice, seed=run.seed + n, **run.options)  # noqa: E731
    (wav, sr), wall, failure = _timed(fn, row, pair.input.id, (np.zeros(0, np.float32), SAMPLE_RATE))
    return _to_16k(wav, sr), wall, failure


def _tts_item(run: TaskRun, n: int, pair: Pair, rows: dict[str, Row], made: Made | None) -> dict[str, Any]:
    item, ref = pair.input, pair.reference
    record: dict[str, Any] = {"id": item.id, "text": item.text, "reference": ref.id,
                              "ground_truth_recording": pair.other.id if pair.other else None}
    truth = rows[TRUTH]
    truth.errors.append(e := errors(item.text, run.scorer.transcript(item)))
    truth.add_score("similarity", sim := run.scorer.similarity(pair.other, ref))
    truth.quality.append(q := run.scorer.quality(item))
    record[TRUTH] = {"hypothesis": run.scorer.transcript(item), "wer": e.wer, "similarity": sim, "dnsmos": _ovrl(q)}
    if made is not None:
        wav, wall, failure = made
        record.update(failure)
        run.save("tts", n, wav)
        e, hyp, emb, q = _judge_output(run, wav, item.text)
        row = rows[MODEL]
        row.errors.append(e)
        row.add_score("similarity", sim := run.scorer.similarity(emb, ref))
        row.quality.append(q)
        row.wall_s += wall
        row.audio_s += len(wav) / SAMPLE_RATE
        record[MODEL] = {"hypothesis": hyp, "wer": e.wer, "similarity": sim, "dnsmos": _ovrl(q),
                         "seconds": len(wav) / SAMPLE_RATE, "wall_s": wall}
    return record


def _vc_item(run: TaskRun, n: int, pair: Pair, rows: dict[str, Row], made: Made | None) -> dict[str, Any]:
    src, ref, other = pair.input, pair.reference, pair.other
    record: dict[str, Any] = {"id": src.id, "text": src.text, "reference": ref.id,
                              "ground_truth_recording": other.id if other else None}
    truth = rows[TRUTH]
    truth.errors.append(e := errors(src.text, run.scorer.transcript(src)))
    target, source = run.scorer.similarity(other, ref), run.scorer.similarity(other, src)
    for name, value in (("similarity_target", target), ("similarity_source", source)):
        truth.add_score(name, value)
    truth.add_score("transfer", None if target is None or source is None else target - source)
    truth.quality.append(q := run.scorer.quality(src))
    record[TRUTH] = {"hypothesis": run.scorer.transcript(src), "wer": e.wer, "similarity_target": target,
                     "similarity_source": source, "dnsmos": _ovrl(q)}
    if made is not None:
        wav, wall, failure = made
        record.update(failure)
        run.save("vc", n, wav)
        e, hyp, emb, q = _judge_output(run, wav, src.text)
        target, source = run.scorer.similarity(emb, ref), run.scorer.similarity(emb, src)
        row = rows[MODEL]
        row.errors.append(e)
        row.add_score("similarity_target", target)
        row.add_score("similarity_source", source)
        row.add_score("transfer", None if target is None or source is None else target - source)
        row.quality.append(q)
        row.wall_s += wall
        row.audio_s += len(wav) / SAMPLE_RATE
        record[MODEL] = {"hypothesis": hyp, "wer": e.wer, "similarity_target": target, "similarity_source": source,
                         "dnsmos": _ovrl(q), "seconds": len(wav) / SAMPLE_RATE, "wall_s": wall}
    return record


def run_pairs(run: TaskRun, task: str, pairs: Sequence[Pair], skipped: dict[str, int],
              warmup: bool) -> dict[str, Any]:
    """TTS or VC over (input, reference) pairs."""
    rows = {MODEL: Row(), TRUTH: Row()}
    if run.model is not None and warmup and pairs:
        p = pairs[0]
        if task == "tts":
            _warm_up(lambda: run.model.tts(p.input.text, str(p.reference.audio), seed=run.seed, **run.options))
        else:
            _warm_up(lambda: run.model.vc(str(p.input.audio), str(p.reference.audio), seed=run.seed, **run.options))
    # every model call first, then the judges (see run_asr)
    made = [_make(run, task, n, pair, rows[MODEL]) for n, pair in enumerate(run.bar(pairs, task))] \
        if run.model is not None else [None] * len(pairs)
    fn = _tts_item if task == "tts" else _vc_item
    items = [fn(run, n, pair, rows, made[n]) for n, pair in enumerate(pairs)]
    return _task_report(run, rows, len(pairs), skipped, items)


def _task_report(run: TaskRun, rows: dict[str, Row], count: int, skipped: dict[str, int],
                 items: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {"count": count, "skipped": skipped}
    if run.model is not None:
        out[MODEL] = rows[MODEL].summary(timed=True)
    out[TRUTH] = rows[TRUTH].summary(timed=False)
    out["items"] = items
    return out


def evaluate_test_set(model: Any, test_set: TestSet, spec: EvalSpec, scorer: Scorer,
                      references: TestSet | None = None, options: dict[str, Any] | None = None,
                      save_dir: Path | None = None, progress: bool = False) -> dict[str, Any]:
    """Run ``spec.tasks`` on one test set (``model`` None: the judges on the recordings only)."""
    inputs = select_inputs(test_set, spec)
    if not inputs:
        raise ValueError(f"test set {test_set.name} ({test_set.path}) has no item with a transcript")
    # Other-speaker voices come from the reference pool; same-speaker ones from the test set and the pool.
    pool = (references or test_set).items
    own = test_set.items + tuple(i for i in pool if i.audio not in {t.audio for t in test_set.items})
    run = TaskRun(model, scorer, dict(options or {}), spec.seed,
                  save_dir / test_set.name if save_dir else None, progress, spec.asr_beam_size)
    out: dict[str, Any] = {"manifest": str(test_set.path), "recordings": len(test_set.items), "inputs": len(inputs),
                           "speakers": len(test_set.speakers),
                           "references": str(references.path) if references else None}
    for task in spec.tasks:
        logger.info("%s: %s on %d inputs", test_set.name, task, len(inputs))
        if task == "asr":
            out[task] = run_asr(run, inputs, spec.warmup)
            continue
        same = task == "tts" and spec.tts_reference == "same-speaker"
        pairs, skipped = pair_references(inputs, own if same else pool, same, spec.rng(test_set.name, task))
        out[task] = run_pairs(run, task, pairs, skipped, spec.warmup)
    return out


def evaluate(model: Any, test_sets: Sequence[TestSet], spec: EvalSpec, judges: Judges,
             references: TestSet | None = None, options: dict[str, Any] | None = None,
             save_dir: Path | None = None, progress: bool = False,
             settings: dict[str, Any] | None = None) -> dict[str, Any]:
    """The report: ``{"settings": ..., "test_sets": {name: {task: {"model", "ground_truth", ...}}}}``.

    Args:
        model: a loaded :class:`gpa.GPA`, or None to score only the recordings.
        test_sets: the test sets (see :func:`gpa.evaluation.load_manifest`).
        spec: tasks, limit, seed and pairing.
        judges: the judges (e.g. :func:`gpa.evaluation.get_judges`).
        references: the pool of reference voices for TTS/VC (default: each test set itself).
        options: sampling options passed to every model call (``seed`` is set per item from ``spec.seed``).
        save_dir: keep the synthesised audio under ``save_dir/TEST_SET/TASK/NNNN.wav``.
        settings: extra entries for the report's settings (e.g. the model directory).
    """
    if options and "seed" in options:
        raise ValueError("the sampling seed comes from EvalSpec.seed (item n uses seed + n); "
                         "remove 'seed' from options")
    names = [t.name for t in test_sets]
    if len(set(names)) != len(names):
        raise ValueError(f"test set names must be unique, got {names}")
    scorer = Scorer(judges)
    report = {name: evaluate_test_set(model, ts, spec, scorer, references, options, save_dir, progress)
              for name, ts in zip(names, test_sets, strict=True)}
    meta = {**(settings or {}), "spec": asdict(spec), "sampling": dict(options or {}),
            "judges": judges.describe(spec.tasks), "sample_rate": SAMPLE_RATE}
    return {"settings": meta, "test_sets": report}
