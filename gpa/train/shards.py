"""The prepared-data format: shards of codes (safetensors, no pickle) plus a JSONL index.

A data directory holds::

    meta.json                 how it was prepared (checkpoint, tokenizer hash, settings)
    tokenizer.json            the text tokenizer the ids were laid out with (the data is self-contained)
    shard-00000.safetensors   per code stream (glm, semantic, global, vc_semantic) one flat int16/int32
                              tensor: every record's codes, concatenated
    shard-00000.jsonl         one line per manifest line of the shard: a record (with the offsets of its
                              codes, its text, per-task token counts and its source line) or a skip
    index.jsonl skipped.jsonl all records and all skips, gathered when preparation finishes

A shard's ``.jsonl`` is written last, atomically: a shard without one is redone on resumption.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

FORMAT = "gpa-shards/1"
STREAMS = ("glm", "semantic", "global", "vc_semantic")
META, INDEX, SKIPPED, TOKENIZER = "meta.json", "index.jsonl", "skipped.jsonl", "tokenizer.json"


def shard_name(i: int) -> str:
    return f"shard-{i:05d}"


def file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def record_id(parts: Iterable[Any]) -> str:
    """A stable id from a record's content (used for the held-out split)."""
    return hashlib.sha1("|".join(map(str, parts)).encode()).hexdigest()[:16]


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename: never half a file."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_jsonl(path: Path, rows: Iterable[Mapping[str, Any]]) -> None:
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


@dataclass
class ShardRecord:
    """A tokenized record on its way into a shard."""

    entry: dict[str, Any]  # index fields: id, source, tasks, audio, begin, end, text, lengths
    codes: dict[str, torch.Tensor]  # stream -> (N,) integer codes


def write_shard(root: Path, index: int, records: list[ShardRecord], skips: list[dict[str, Any]]) -> None:
    """Write one shard's codes, then its index lines (the commit point)."""
    name = shard_name(index)
    streams: dict[str, list[torch.Tensor]] = {s: [] for s in STREAMS}
    offsets = {s: 0 for s in STREAMS}
    rows = []
    for rec in records:
        spans = {}
        for stream, codes in rec.codes.items():
            spans[stream] = [offsets[stream], len(codes)]
            offsets[stream] += len(codes)
            streams[stream].append(codes.reshape(-1))
        rows.append({**rec.entry, "shard": f"{name}.safetensors", "codes": spans})
    tensors = {s: torch.cat(parts) for s, parts in streams.items() if parts}
    if tensors:
        top = max(int(t.max()) for t in tensors.values() if t.numel())
        dtype = torch.int16 if top < 2**15 else torch.int32
        tmp = root / f".{name}.safetensors.tmp{os.getpid()}"
        save_file({s: t.to(dtype).contiguous() for s, t in tensors.items()}, str(tmp))
        os.replace(tmp, root / f"{name}.safetensors")
    write_jsonl(root / f"{name}.jsonl", [*rows, *skips])


class ShardReader:
    """Reads a record's codes lazily (memory-mapped slices of the shard files)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self._files: dict[str, Any] = {}

    def codes(self, entry: Mapping[str, Any], stream: str) -> torch.Tensor:
        """(N,) int64 codes of ``stream`` for an index entry."""
        if stream not in entry["codes"]:
            raise KeyError(f"record {entry['source']} has no {stream} codes")
        start, length = entry["codes"][stream]
        shard = entry["shard"]
        if shard not in self._files:
            self._files[shard] = safe_open(str(self.root / shard), framework="pt")
        return self._files[shard].get_slice(stream)[start : start + length].long()
