"""Training manifests: the authors' jsonl format and plain ``audio|text`` lists, one record per line.

Authors' jsonl (§8.1 of the reference digest), one object per line::

    {"task": "stt" | "tts-a" | "vc", "audio": ..., "text": ..., "begin_time": s | -1, "end_time": s | -1,
     "ref_audio": ..., "vc_audio": ..., ...}

``audio`` is the ASR input, the TTS target or the VC source; ``ref_audio`` the speaker of TTS/VC (when
it is empty or the same file as ``audio``, the segment itself); ``vc_audio`` the VC target. Unlike the
authors' processor, the segment times are honoured (their bug B5). Relative paths are relative to the
manifest's folder. A plain list line is ``path|transcript`` and serves the tasks given to it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gpa.config import Task


@dataclass(frozen=True)
class SourceRecord:
    """One manifest line, validated but not yet read from disk."""

    source: str  # "manifest:line", kept for tracing
    tasks: tuple[Task, ...]
    audio: Path
    text: str | None = None
    begin: float | None = None  # segment start in seconds (None: start of file)
    end: float | None = None  # segment end in seconds (None: end of file)
    ref_audio: Path | None = None  # speaker reference file; None: the segment itself
    vc_audio: Path | None = None  # VC target speech


@dataclass(frozen=True)
class Skip:
    """A line that was left out, and why."""

    source: str
    reason: str
    audio: str | None = None


class ManifestError(ValueError):
    """A manifest line that cannot be used (reported as a skip)."""


def read_manifest(path: str | Path, list_tasks: tuple[Task, ...]) -> Iterator[SourceRecord | Skip]:
    """Every non-blank line of a manifest as a record or a skip; ``.jsonl``/``.json`` files are jsonl."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ManifestError(f"cannot read manifest {path}: {e}") from e
    is_jsonl = path.suffix in (".jsonl", ".json")
    for number, line in enumerate(lines, start=1):
        if not line.strip() or (not is_jsonl and line.lstrip().startswith("#")):
            continue
        source = f"{path}:{number}"
        try:
            yield _jsonl_record(line, source, path.parent) if is_jsonl else _list_record(line, source, path.parent,
                                                                                         list_tasks)
        except ManifestError as e:
            yield Skip(source, str(e))


def _path(value: Any, root: Path, field: str) -> Path:
    if not isinstance(value, str) or not value.strip():
        raise ManifestError(f"{field} is missing or not a string")
    p = Path(value.strip()).expanduser()
    return p if p.is_absolute() else root / p


def _time(value: Any, field: str) -> float | None:
    """A segment time in seconds; -1, null or absent mean 'not set'."""
    if value is None or value == "" or value == -1:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ManifestError(f"bad {field} {value!r}: expected seconds >= 0 or -1")
    return float(value)


def _times(d: dict[str, Any]) -> tuple[float | None, float | None]:
    begin, end = _time(d.get("begin_time"), "begin_time"), _time(d.get("end_time"), "end_time")
    if begin is not None and end is not None and end <= begin:
        raise ManifestError(f"bad segment times: end_time {end} <= begin_time {begin}")
    return begin, end


def _text(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ManifestError("text is empty")
    return value


def _jsonl_record(line: str, source: str, root: Path) -> SourceRecord:
    try:
        d = json.loads(line)
    except json.JSONDecodeError as e:
        raise ManifestError(f"not valid JSON: {e}") from e
    if not isinstance(d, dict):
        raise ManifestError("a jsonl line must be an object")
    try:
        task = Task.parse(d.get("task", ""))
    except ValueError as e:
        raise ManifestError(str(e)) from e
    audio = _path(d.get("audio"), root, "audio")
    begin, end = _times(d)
    has_ref = bool(str(d.get("ref_audio") or "").strip())
    ref = _path(d["ref_audio"], root, "ref_audio") if has_ref else None
    ref = None if ref == audio else ref  # the authors' self-reference: the segment itself
    if task is Task.ASR:
        return SourceRecord(source, (task,), audio, _text(d.get("text")), begin, end)
    if task is Task.TTS:
        return SourceRecord(source, (task,), audio, _text(d.get("text")), begin, end, ref_audio=ref)
    vc = _path(d.get("vc_audio"), root, "vc_audio")
    if not has_ref:
        raise ManifestError("a vc record needs ref_audio (the target speaker)")
    return SourceRecord(source, (task,), audio, None, begin, end, ref_audio=ref, vc_audio=vc)


def _list_record(line: str, source: str, root: Path, tasks: tuple[Task, ...]) -> SourceRecord:
    audio, sep, text = line.partition("|")
    if not sep:
        raise ManifestError("expected 'audio|text'")
    return SourceRecord(source, tasks, _path(audio, root, "audio"), _text(text.strip()))
