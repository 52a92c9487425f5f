"""Training samples from prepared shards: prompts from :mod:`gpa.prompts`, a held-out split, task mixing,
length-bucketed batches in an order fixed by (seed, epoch), and collation with the loss mask.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from gpa.config import Task
from gpa.prompts import IGNORE_INDEX, Prompt, asr_prompt, tts_prompt, vc_prompt
from gpa.train.shards import INDEX, META, TOKENIZER, ShardReader, read_jsonl
from gpa.vocab import Vocab

logger = logging.getLogger(__name__)

# The code streams each task's sample is built from.
TASK_STREAMS: dict[Task, tuple[str, ...]] = {
    Task.ASR: ("glm", "semantic"),
    Task.TTS: ("global", "semantic"),
    Task.VC: ("global", "semantic", "vc_semantic"),
}


def task_prompt(vocab: Vocab, task: Task, codes: Mapping[str, Tensor], text: str | None) -> Prompt:
    """A full training example (prompt + target) of ``task`` from a record's codes, by the inference layout."""
    if task is Task.ASR:
        return asr_prompt(vocab, codes["glm"], codes["semantic"], text)
    if task is Task.TTS:
        return tts_prompt(vocab, codes["global"], text, target_semantic=codes["semantic"])
    return vc_prompt(vocab, codes["global"], codes["semantic"], target_semantic=codes["vc_semantic"])


@dataclass(frozen=True)
class Sample:
    """One (record, task) pair and its sizes."""

    record: int  # index into PreparedData.records
    task: Task
    length: int  # tokens of prompt + target
    targets: int  # tokens that carry a loss


class PreparedData:
    """A prepared data directory: index, vocabulary and lazy access to codes.

    With ``cache_prompts`` each sample's prompt is built once and kept in memory (about 0.3 KB per token of
    the data), which takes the prompt building off every later epoch: worth it where the model is fast (GPU).
    """

    def __init__(self, root: str | Path, cache_prompts: bool = False) -> None:
        self.root = Path(root)
        if not (self.root / INDEX).is_file():
            raise FileNotFoundError(f"{self.root} has no {INDEX}; run gpa prepare first (or let it finish)")
        self.meta: dict[str, Any] = json.loads((self.root / META).read_text())
        self.records = read_jsonl(self.root / INDEX)
        self.vocab = Vocab.from_dir(self.root, glm_codebook_size=self.meta["glm_codebook_size"])
        self.reader = ShardReader(self.root)
        self.samples = [Sample(i, Task(t), *r["lengths"][t]) for i, r in enumerate(self.records) for t in r["tasks"]]
        self._prompts: dict[tuple[int, Task], Prompt] | None = {} if cache_prompts else None

    @property
    def lm_vocab_size(self) -> int:
        """The embedding rows a model for this data needs (the source checkpoint's)."""
        return int(self.meta["lm_vocab_size"])

    @property
    def tokenizer_file(self) -> Path:
        return self.root / TOKENIZER

    def prompt(self, sample: Sample) -> Prompt:
        """Build the sample's token ids with the inference prompt builders."""
        if self._prompts is not None:
            key = (sample.record, sample.task)
            if key not in self._prompts:
                self._prompts[key] = self._build(sample)
            return self._prompts[key]
        return self._build(sample)

    def _build(self, sample: Sample) -> Prompt:
        rec = self.records[sample.record]
        codes = {s: self.reader.codes(rec, s) for s in TASK_STREAMS[sample.task]}
        prompt = task_prompt(self.vocab, sample.task, codes, rec.get("text"))
        assert len(prompt.ids) == sample.length, f"{rec['source']}: {len(prompt.ids)} ids, index: {sample.length}"
        return prompt


def _rank(record_id: str, salt: str) -> str:
    return hashlib.sha1(f"{salt}:{record_id}".encode()).hexdigest()


def split_records(records: Sequence[Mapping[str, Any]], eval_fraction: float, seed: int = 0) -> set[int]:
    """Indices of held-out records: per task, the ceil(fraction * n) records of lowest hash (at most n - 1,
    so every task keeps a record to train on).

    The choice depends only on record content ids (not on order or on other data), so a record stays on
    its side of the split when data is added. No record is held out at fraction 0.
    """
    held: set[int] = set()
    if eval_fraction <= 0:
        return held
    for task in Task:
        pool = sorted((i for i, r in enumerate(records) if task.value in r["tasks"]),
                      key=lambda i: _rank(records[i]["id"], str(seed)))
        need = min(math.ceil(eval_fraction * len(pool)), len(pool) - 1) - sum(1 for i in pool if i in held)
        for i in pool:
            if need <= 0:
                break
            if i not in held:
                held.add(i)
                need -= 1
    return held


def mixed_epoch(samples: Sequence[Sample], weights: Mapping[str, float], rng: np.random.Generator) -> list[int]:
    """Sample indices of one epoch: each task gets its weight's share of the epoch, drawn without
    replacement (cycling when a task's share is larger than its pool)."""
    pools: dict[Task, list[int]] = {}
    for i, s in enumerate(samples):
        if weights.get(s.task.value, 0) > 0:
            pools.setdefault(s.task, []).append(i)
    total_weight = sum(weights[t.value] for t in pools)
    size = sum(len(p) for p in pools.values())
    chosen: list[int] = []
    for task, pool in sorted(pools.items()):
        count = round(weights[task.value] / total_weight * size)
        cycles = [rng.permutation(len(pool)) for _ in range(math.ceil(count / len(pool)))]
        chosen += [pool[j] for j in np.concatenate(cycles)[:count]] if cycles else []
    return chosen


def bucketed_batches(indices: list[int], lengths: Sequence[int], batch_size: int, window: int,
                     rng: np.random.Generator) -> list[list[int]]:
    """Shuffle, sort windows of ``window`` batches by length, cut full batches, shuffle the batch order."""
    order = [indices[j] for j in rng.permutation(len(indices))]
    batches = []
    span = batch_size * window
    for start in range(0, len(order), span):
        chunk = sorted(order[start : start + span], key=lambda i: lengths[i])
        batches += [chunk[k : k + batch_size] for k in range(0, len(chunk) - batch_size + 1, batch_size)]
    return [batches[j] for j in rng.permutation(len(batches))]


class BatchPlan:
    """The global sequence of micro-batches, a pure function of (seed, epoch, position).

    Every process computes the same plan and takes its own slice of each batch, so a resumed or a
    multi-process run sees exactly the batches of an uninterrupted single-process run.
    """

    def __init__(self, samples: Sequence[Sample], weights: Mapping[str, float], batch_size: int,
                 window: int, seed: int) -> None:
        self.samples, self.weights, self.batch_size, self.window, self.seed = samples, weights, batch_size, window, seed
        self._cache: tuple[int, list[list[int]]] | None = None

    def epoch(self, epoch: int) -> list[list[int]]:
        """The micro-batches (lists of sample indices) of ``epoch``."""
        if self._cache is None or self._cache[0] != epoch:
            rng = np.random.default_rng([self.seed, epoch])
            chosen = mixed_epoch(self.samples, self.weights, rng)
            batches = bucketed_batches(chosen, [s.length for s in self.samples], self.batch_size, self.window, rng)
            if not batches:
                raise ValueError(f"an epoch has {len(chosen)} samples, fewer than batch_size {self.batch_size}")
            self._cache = (epoch, batches)
        return self._cache[1]

    def take(self, position: tuple[int, int], n: int) -> tuple[list[list[int]], tuple[int, int]]:
        """``n`` micro-batches from ``position`` = (epoch, batch in epoch), and the position after them."""
        epoch, index = position
        out = []
        while len(out) < n:
            batches = self.epoch(epoch)
            if index >= len(batches):
                epoch, index = epoch + 1, 0
                continue
            out.append(batches[index])
            index += 1
        return out, (epoch, index)


def collate(prompts: Sequence[Prompt], pad_id: int) -> tuple[Tensor, Tensor]:
    """Right-pad a batch -> (ids, labels), both (B, T) int64; labels are IGNORE_INDEX on prompt and padding.

    Labels sit at the position of the token they name (``Prompt.labels``); the loss shifts them.
    """
    width = max(len(p.ids) for p in prompts)
    ids = np.full((len(prompts), width), pad_id, dtype=np.int64)
    labels = np.full((len(prompts), width), IGNORE_INDEX, dtype=np.int64)
    for b, p in enumerate(prompts):
        row = np.asarray(p.ids, dtype=np.int64)
        ids[b, : len(row)] = row
        labels[b, p.target_start : len(row)] = row[p.target_start :]
    return torch.from_numpy(ids), torch.from_numpy(labels)
