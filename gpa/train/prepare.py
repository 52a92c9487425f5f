"""``gpa prepare``: tokenize manifests once into shards, resumably, skipping bad records with a reason.

Audio goes through the one loader, :func:`gpa.audio.load_audio`, as inference does: the GLM tokenizer
reads the raw 16 kHz segment and BiCodec the volume-normalised segment (see ``GPA.asr_prompts``).
Segments are cut after resampling the whole file, so a segment tokenizes exactly as the same samples
passed to ``gpa.load(...).asr((segment, 16000))``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing as mp
import shutil
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from gpa.audio import SAMPLE_RATE, AudioError, load_audio
from gpa.checkpoint import Checkpoint, load_codecs
from gpa.config import ModelConfig, Task
from gpa.train import shards
from gpa.train.config import PrepareConfig
from gpa.train.data import TASK_STREAMS, task_prompt
from gpa.train.manifest import Skip, SourceRecord, read_manifest
from gpa.train.shards import ShardRecord, read_jsonl, shard_name, write_jsonl
from gpa.vocab import Vocab

logger = logging.getLogger(__name__)

MIN_SAMPLES = 400  # 25 ms: the shortest input wav2vec2 (BiCodec's content encoder) accepts
CODE_CACHE = 200_000  # (stream, audio) code entries kept during one run
# A worker process is replaced after this many shards: its memory grew with every shard it encoded (to several
# GB per worker on a 117,000-line run, until a 24 GB machine swapped), whatever torch keeps per input shape.
WORKER_SHARDS = 8
END_TOLERANCE_S = 0.05  # an end_time this far past the end of the file is clamped, further is an error


@dataclass
class PrepareReport:
    """What ``prepare`` produced."""

    out_dir: Path
    records: int  # records in the index
    skipped: list[dict[str, Any]] = field(default_factory=list)  # {"source", "reason", "audio"} per skip
    shards_done_before: int = 0  # shards found complete (resumption)


class Codecs:
    """The checkpoint's text vocabulary, GLM tokenizer and BiCodec (the LLM is not loaded)."""

    def __init__(self, checkpoint: str | Path, device: str = "cpu") -> None:
        self.ckpt = Checkpoint.open(checkpoint)
        self.bicodec, self.glm = load_codecs(self.ckpt, device=device)
        self.vocab = Vocab.from_dir(self.ckpt.root, glm_codebook_size=self.glm.codebook_size)
        self.lm_vocab_size = ModelConfig.from_hf(self.ckpt.llm_config).vocab_size
        self.cache: OrderedDict[tuple[str, str], torch.Tensor] = OrderedDict()  # (stream, audio sha1) -> codes

    def remember(self, key: tuple[str, str], codes: torch.Tensor) -> None:
        self.cache[key] = codes
        while len(self.cache) > CODE_CACHE:
            self.cache.popitem(last=False)


@dataclass
class Loaded:
    """A record's audio, ready for the codecs."""

    record: SourceRecord
    raw: np.ndarray  # the segment at 16 kHz, as read (GLM input)
    normed: np.ndarray  # the segment volume-normalised (BiCodec input)
    reference: np.ndarray | None  # the speaker reference, normalised (TTS/VC), None: the segment
    vc_target: np.ndarray | None  # VC target speech, normalised


class AudioCache:
    """The last few decoded files, so segments of one long recording decode it once."""

    def __init__(self, size: int = 4) -> None:
        self.size, self._items = size, OrderedDict[Path, np.ndarray]()

    def raw(self, path: Path) -> np.ndarray:
        if path not in self._items:
            self._items[path] = load_audio(path, normalize=False)
            while len(self._items) > self.size:
                self._items.popitem(last=False)
        self._items.move_to_end(path)
        return self._items[path]


def cut(raw: np.ndarray, begin: float | None, end: float | None, name: str) -> np.ndarray:
    """The [begin, end) seconds of 16 kHz samples; raises on times outside the audio."""
    duration = len(raw) / SAMPLE_RATE
    if begin is not None and begin >= duration:
        raise AudioError(f"{name}: begin_time {begin} s is past the end of the audio ({duration:.2f} s)")
    if end is not None and end > duration + END_TOLERANCE_S:
        raise AudioError(f"{name}: end_time {end} s is past the end of the audio ({duration:.2f} s)")
    a = 0 if begin is None else round(begin * SAMPLE_RATE)
    b = len(raw) if end is None else min(len(raw), round(end * SAMPLE_RATE))
    return raw[a:b]


def load_record(rec: SourceRecord, cache: AudioCache, cfg: PrepareConfig) -> Loaded:
    """Read, cut and check a record's audio; raises AudioError/ValueError with the reason."""
    raw = cut(cache.raw(rec.audio), rec.begin, rec.end, str(rec.audio))
    seconds = len(raw) / SAMPLE_RATE
    if seconds > cfg.max_seconds:
        raise ValueError(f"over-length: {seconds:.1f} s of audio > max_seconds {cfg.max_seconds}")
    if len(raw) < MIN_SAMPLES:
        raise AudioError(f"{rec.audio}: the segment is empty or shorter than {MIN_SAMPLES / SAMPLE_RATE * 1e3:.0f} ms")
    normed = load_audio(raw, SAMPLE_RATE, name=f"{rec.audio} segment")
    reference = None if rec.ref_audio is None else load_audio(cache.raw(rec.ref_audio), SAMPLE_RATE,
                                                              name=str(rec.ref_audio))
    target = None
    if rec.vc_audio is not None:
        target = load_audio(cache.raw(rec.vc_audio), SAMPLE_RATE, name=str(rec.vc_audio))
        if len(target) < MIN_SAMPLES:
            raise AudioError(f"{rec.vc_audio}: shorter than {MIN_SAMPLES / SAMPLE_RATE * 1e3:.0f} ms")
    return Loaded(rec, raw, normed, reference, target)


def encode_batch(items: list[Loaded], codecs: Codecs, batch_size: int) -> list[dict[str, torch.Tensor]]:
    """The code streams each item's tasks need, one codec call per stream for the whole batch."""
    out: list[dict[str, torch.Tensor]] = [{} for _ in items]
    need = [set().union(*(TASK_STREAMS[t] for t in it.record.tasks)) for it in items]

    def run(stream: str, encode: Any, inputs: list[np.ndarray]) -> None:
        rows = [i for i, n in enumerate(need) if stream in n]
        # The same audio recurs across records (an utterance is an ASR input, a TTS target, a VC
        # target and another record's reference): each is encoded once per stream and run.
        keys = {i: (stream, hashlib.sha1(np.ascontiguousarray(inputs[i]).tobytes()).hexdigest()) for i in rows}
        todo = [i for i in rows if keys[i] not in codecs.cache]
        if todo:
            for i, codes in zip(todo, encode([inputs[i] for i in todo]), strict=True):
                codecs.remember(keys[i], torch.as_tensor(codes).reshape(-1).cpu())
        for i in rows:
            out[i][stream] = codecs.cache[keys[i]]

    run("glm", lambda w: codecs.glm.encode(w, batch_size=batch_size), [it.raw for it in items])
    run("semantic", codecs.bicodec.encode_semantic, [it.normed for it in items])
    run("vc_semantic", codecs.bicodec.encode_semantic, [it.vc_target for it in items])
    run("global", codecs.bicodec.encode_global,
        [it.normed if it.reference is None else it.reference for it in items])
    return out


def index_entry(it: Loaded, codes: dict[str, torch.Tensor], vocab: Vocab, max_tokens: int) -> dict[str, Any]:
    """The record's index fields; raises ValueError when a task's sample is over ``max_tokens``."""
    rec = it.record
    lengths = {}
    for task in rec.tasks:
        prompt = task_prompt(vocab, task, codes, rec.text)
        if len(prompt.ids) > max_tokens:
            raise ValueError(f"over-length: the {task.value} sample has {len(prompt.ids)} tokens > "
                             f"max_tokens {max_tokens}")
        lengths[task.value] = [len(prompt.ids), len(prompt.target_ids)]
    ref = None if rec.ref_audio is None else str(rec.ref_audio)
    vc = None if rec.vc_audio is None else str(rec.vc_audio)
    return {"id": shards.record_id([rec.audio, rec.begin, rec.end, rec.text, ref, vc]), "source": rec.source,
            "tasks": [t.value for t in rec.tasks], "audio": str(rec.audio), "begin": rec.begin, "end": rec.end,
            "text": rec.text, "ref_audio": ref, "vc_audio": vc, "lengths": lengths}


def _skip(source: str, reason: str, audio: Any = None) -> dict[str, Any]:
    return {"source": source, "skipped": reason, "audio": None if audio is None else str(audio)}


def tokenize_chunk(items: list[SourceRecord | Skip], codecs: Codecs, cfg: PrepareConfig,
                   cache: AudioCache) -> tuple[list[ShardRecord], list[dict[str, Any]]]:
    """Records of one shard -> (tokenized records, skips). Nothing in here may stop the run."""
    skips = [_skip(it.source, it.reason, it.audio) for it in items if isinstance(it, Skip)]
    loaded: list[Loaded] = []
    for rec in (it for it in items if isinstance(it, SourceRecord)):
        try:
            if rec.text is not None:
                codecs.vocab.encode_text(rec.text)  # refuses special-token strings early
            loaded.append(load_record(rec, cache, cfg))
        except (AudioError, ValueError) as e:
            skips.append(_skip(rec.source, str(e), rec.audio))
    done: list[ShardRecord] = []
    for start in range(0, len(loaded), cfg.batch_size):
        batch = loaded[start : start + cfg.batch_size]
        for it, codes in zip(batch, _encode_or_isolate(batch, codecs, cfg, skips), strict=True):
            if codes is None:
                continue
            try:
                done.append(ShardRecord(index_entry(it, codes, codecs.vocab, cfg.max_tokens), codes))
            except ValueError as e:
                skips.append(_skip(it.record.source, str(e), it.record.audio))
    position = {it.source: i for i, it in enumerate(items)}
    return done, sorted(skips, key=lambda s: position[s["source"]])


def _encode_or_isolate(batch: list[Loaded], codecs: Codecs, cfg: PrepareConfig,
                       skips: list[dict[str, Any]]) -> list[dict[str, torch.Tensor] | None]:
    """Encode a batch; if it fails, encode item by item so only the bad ones are skipped."""
    try:
        return list(encode_batch(batch, codecs, cfg.batch_size))
    except (ValueError, RuntimeError) as e:
        logger.debug("batch failed (%s); encoding its items one by one", e)
    out: list[dict[str, torch.Tensor] | None] = []
    for it in batch:
        try:
            out.append(encode_batch([it], codecs, cfg.batch_size)[0])
        except (ValueError, RuntimeError) as e:
            skips.append(_skip(it.record.source, f"tokenizer failed: {e}", it.record.audio))
            out.append(None)
    return out


def _meta(cfg: PrepareConfig, codecs: Codecs) -> dict[str, Any]:
    return {"format": shards.FORMAT, "checkpoint": str(codecs.ckpt.root.resolve()),
            "tokenizer_sha256": shards.file_sha256(codecs.ckpt.tokenizer), "lm_vocab_size": codecs.lm_vocab_size,
            "glm_codebook_size": codecs.glm.codebook_size, "manifests": [str(m) for m in cfg.manifests],
            "list_tasks": list(cfg.list_tasks), "shard_size": cfg.shard_size, "max_seconds": cfg.max_seconds,
            "max_tokens": cfg.max_tokens}


def _start(out: Path, meta: dict[str, Any], tokenizer: Path) -> None:
    """Create ``out`` or check that the data already there was prepared the same way."""
    out.mkdir(parents=True, exist_ok=True)
    if (out / shards.META).is_file():
        old = json.loads((out / shards.META).read_text())
        changed = sorted(k for k in meta if k != "checkpoint" and old.get(k) != meta[k])
        if changed:
            raise ValueError(f"{out} holds data prepared with other settings ({', '.join(changed)}); "
                             "use a new out_dir or remove it")
        if old.get("checkpoint") != meta["checkpoint"]:
            logger.warning("%s was started with the codecs of %s; going on with %s (same text tokenizer)", out,
                           old.get("checkpoint"), meta["checkpoint"])
        return
    shutil.copyfile(tokenizer, out / shards.TOKENIZER)
    shards.atomic_write_text(out / shards.META, json.dumps(meta, indent=2))


def read_all(cfg: PrepareConfig) -> list[SourceRecord | Skip]:
    """Every line of every manifest, in order."""
    tasks = tuple(Task(t) for t in cfg.list_tasks)
    return [item for m in cfg.manifests for item in read_manifest(m, tasks)]


def prepare(cfg: PrepareConfig, progress: bool = False) -> PrepareReport:
    """Tokenize ``cfg.manifests`` into ``cfg.out_dir``; finished shards of an earlier run are kept.

    With ``cfg.workers`` > 1 the unfinished shards are shared among that many processes (one torch thread
    each); the files are the same as one process writes.
    """
    out = Path(cfg.out_dir)
    items = read_all(cfg)
    codecs = Codecs(cfg.checkpoint, cfg.device)
    _start(out, _meta(cfg, codecs), codecs.ckpt.tokenizer)
    chunks = [items[i : i + cfg.shard_size] for i in range(0, len(items), cfg.shard_size)]
    todo = [i for i, chunk in enumerate(chunks) if not _complete(out, i, len(chunk))]
    finished = set(range(len(chunks))) - set(todo)
    with tqdm(total=len(items), disable=not progress, unit="rec", desc="prepare") as bar:
        bar.update(sum(len(chunks[i]) for i in finished))
        if cfg.workers > 1 and len(todo) > 1:
            del codecs  # each worker loads its own
            with mp.get_context("spawn").Pool(min(cfg.workers, len(todo)), _init_worker, (cfg,),
                                              maxtasksperchild=WORKER_SHARDS) as pool:
                for n in pool.imap_unordered(_work, todo):
                    bar.update(n)
        else:
            cache = AudioCache()
            for i in todo:
                shards.write_shard(out, i, *tokenize_chunk(chunks[i], codecs, cfg, cache))
                bar.update(len(chunks[i]))
    return _finish(out, len(chunks), len(chunks) - len(todo))


_WORKER: dict[str, Any] = {}  # a prepare worker process's config, codecs, audio cache and manifest lines


def _init_worker(cfg: PrepareConfig) -> None:
    torch.set_num_threads(1)
    _WORKER.update(cfg=cfg, codecs=Codecs(cfg.checkpoint, cfg.device), cache=AudioCache(), items=read_all(cfg))


def _work(i: int) -> int:
    """Write shard ``i`` (in a worker process); returns its number of lines."""
    cfg, size = _WORKER["cfg"], _WORKER["cfg"].shard_size
    chunk = _WORKER["items"][i * size : (i + 1) * size]
    shards.write_shard(Path(cfg.out_dir), i, *tokenize_chunk(chunk, _WORKER["codecs"], cfg, _WORKER["cache"]))
    return len(chunk)


def _complete(out: Path, i: int, n_items: int) -> bool:
    """Whether shard ``i`` was finished by an earlier run, for as many lines as it has now."""
    path = out / f"{shard_name(i)}.jsonl"
    return path.is_file() and len(read_jsonl(path)) == n_items


def _finish(out: Path, n_shards: int, reused: int) -> PrepareReport:
    rows = [r for i in range(n_shards) for r in read_jsonl(out / f"{shard_name(i)}.jsonl")]
    records = [r for r in rows if "skipped" not in r]
    skipped = [r for r in rows if "skipped" in r]
    write_jsonl(out / shards.INDEX, records)
    write_jsonl(out / shards.SKIPPED, skipped)
    for s in skipped:
        logger.warning("skipped %s: %s", s["source"], s["skipped"])
    logger.info("prepared %d records in %d shards (%d reused), %d skipped -> %s", len(records), n_shards, reused,
                len(skipped), out)
    return PrepareReport(out, len(records), skipped, reused)


def report_dict(report: PrepareReport) -> dict[str, Any]:
    """A JSON-ready summary."""
    d = asdict(report)
    d["out_dir"] = str(report.out_dir)
    return d
