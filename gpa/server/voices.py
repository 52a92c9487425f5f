"""Saved voices on disk: ``NAME.json`` (metadata) beside ``NAME.safetensors`` (the speaker's codes).

A voice is what :meth:`gpa.GPA.voice` returns for a reference clip: its 32 BiCodec global codes and,
when a transcript was given, the clip's semantic codes and text (TTS then continues the reference).
Files are written to a temporary name and renamed, so a crash never leaves half a voice; names are
restricted to a safe character set, so a name can never point outside the directory.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from gpa.api import Voice
from gpa.server.errors import APIError, bad_request
from gpa.server.protocol import VoiceInfo

logger = logging.getLogger(__name__)

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def check_name(name: str, param: str = "name") -> str:
    """A voice name: 1-64 of letters, digits, '_', '-', '.', starting with a letter or digit, no '..'."""
    if not NAME_RE.match(name) or ".." in name:
        raise bad_request(f"invalid voice name {name!r}: use 1-64 letters, digits, '_', '-' or '.', starting with "
                          "a letter or digit (no paths)", param, "invalid_voice_name")
    return name


class VoiceStore:
    """Voices persisted under one directory, cached in memory once read."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._cache: dict[str, tuple[tuple[int, int], Voice]] = {}  # name -> (file mtimes, voice)

    def _paths(self, name: str) -> tuple[Path, Path]:
        check_name(name)
        return self.root / f"{name}.json", self.root / f"{name}.safetensors"

    def list(self) -> list[VoiceInfo]:
        """Every complete saved voice, oldest first."""
        infos = []
        for meta in sorted(self.root.glob("*.json")):
            try:
                info = VoiceInfo.model_validate_json(meta.read_text(encoding="utf-8"))
            except (OSError, ValueError) as e:
                logger.warning("ignoring unreadable voice file %s: %s", meta, e)
                continue
            if (self.root / f"{info.name}.safetensors").is_file():
                infos.append(info)
        return sorted(infos, key=lambda v: (v.created_at, v.name))

    def info(self, name: str, param: str = "voice") -> VoiceInfo:
        meta, codes = self._paths(check_name(name, param))
        if not meta.is_file() or not codes.is_file():
            raise self._missing(name, param)
        return VoiceInfo.model_validate_json(meta.read_text(encoding="utf-8"))

    def get(self, name: str, param: str = "voice") -> Voice:
        """The voice called ``name`` (APIError 400 naming the saved voices when there is none).

        The files are checked on every call, so a voice deleted or replaced by another server sharing
        the directory is never served from the cache.
        """
        meta, codes = self._paths(check_name(name, param))
        try:
            stamp = (meta.stat().st_mtime_ns, codes.stat().st_mtime_ns)
        except FileNotFoundError:
            raise self._missing(name, param) from None
        with self._lock:
            cached = self._cache.get(name)
        if cached is not None and cached[0] == stamp:
            return cached[1]
        info = VoiceInfo.model_validate_json(meta.read_text(encoding="utf-8"))
        tensors = load_file(str(codes))
        voice = Voice(tensors["global_codes"], tensors.get("semantic_codes"), info.ref_text)
        with self._lock:
            self._cache[name] = (stamp, voice)
        return voice

    def add(self, voice: Voice, name: str, *, file_size: int, duration: float, mime_type: str | None,
            consent: str | None) -> VoiceInfo:
        """Save a new voice; APIError 409 when the name is taken."""
        meta, codes = self._paths(check_name(name))
        info = VoiceInfo(id=name, name=name, created_at=int(time.time()), ref_text=voice.text, consent=consent,
                         file_size=file_size, mime_type=mime_type, duration=round(duration, 3))
        tensors = {"global_codes": voice.global_codes.to(torch.int64).contiguous()}
        if voice.semantic_codes is not None:
            tensors["semantic_codes"] = voice.semantic_codes.to(torch.int64).contiguous()
        with self._lock:
            if meta.exists():
                raise APIError(409, f"a voice named {name!r} already exists; delete it first or pick another name",
                               param="name", code="voice_exists")
            _atomic(codes, lambda p: save_file(tensors, str(p)))
            _atomic(meta, lambda p: p.write_text(info.model_dump_json(indent=1), encoding="utf-8"))
        return info

    def delete(self, name: str) -> None:
        """Remove a voice; APIError 404 when there is none."""
        meta, codes = self._paths(check_name(name, "voice_id"))
        with self._lock:
            if not meta.exists():
                raise APIError(404, f"no saved voice named {name!r}", type="not_found_error", param="voice_id",
                               code="voice_not_found")
            meta.unlink()  # the JSON first: without it the voice no longer exists, even if the next unlink fails
            codes.unlink(missing_ok=True)
            self._cache.pop(name, None)

    def _missing(self, name: str, param: str) -> APIError:
        names = [v.name for v in self.list()]
        known = f"saved voices: {', '.join(names)}" if names else "no voices are saved (POST /v1/audio/voices)"
        return bad_request(f"unknown voice {name!r}; {known}; or send ref_audio", param, "voice_not_found")


def _atomic(path: Path, write) -> None:  # noqa: ANN001 - a callable taking the temporary path
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
