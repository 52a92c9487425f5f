"""Saved voices on disk: ``NAME.json`` (metadata) beside ``NAME.safetensors`` (the speaker's codes),
and :class:`Voices`, the names a request may use: the model's built-in voices, then the saved ones.

A voice is what :meth:`gpa.GPA.voice` returns for a reference clip: its 32 BiCodec global codes and,
when a transcript was given, the clip's semantic codes and text (TTS then continues the reference).
Files are written to a temporary name and renamed, so a crash never leaves half a voice; names are
restricted to a safe character set, so a name can never point outside the directory.

Built-in voices (``voices/`` in the checkpoint, :mod:`gpa.voices`) belong to the model: they cannot
be deleted, and a saved voice cannot take a built-in name.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel
from safetensors.torch import load_file, save_file

from gpa.api import Voice
from gpa.server.errors import APIError, bad_request
from gpa.server.protocol import VoiceInfo, VoiceList
from gpa.voices import BuiltinVoice, valid_name

logger = logging.getLogger(__name__)


def check_name(name: str, param: str = "name") -> str:
    """A voice name: 1-64 of letters, digits, '_', '-', '.', starting with a letter or digit, no '..'
    (the rule of :func:`gpa.voices.valid_name`, so every built-in name is a valid voice name)."""
    if not valid_name(name):
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

    def exists(self, name: str) -> bool:
        """Whether a voice is saved under ``name`` (a valid name: see :func:`check_name`)."""
        return self._paths(name)[0].is_file()

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


# --- built-in voices ----------------------------------------------------------------------------------


class BuiltinVoiceInfo(BaseModel):
    """A built-in voice of the served model (listed beside the saved voices; read-only)."""

    id: str
    object: Literal["audio.voice"] = "audio.voice"
    name: str
    type: Literal["builtin"] = "builtin"
    default: bool  # the model's default voice
    description: str | None = None
    licence: str | None = None
    source: str | None = None
    ref_text: str | None = None  # the clip's transcript (informative: requests use the audio only)
    duration: float  # seconds of the clip

    @classmethod
    def of(cls, voice: BuiltinVoice) -> BuiltinVoiceInfo:
        return cls(id=voice.name, name=voice.name, default=voice.default, description=voice.description,
                   licence=voice.licence, source=voice.source, ref_text=voice.text, duration=voice.seconds)


class VoiceListing(VoiceList):
    """``GET /v1/audio/voices``: every usable name (built-in first), the saved voices and the built-in ones."""

    builtin_voices: list[BuiltinVoiceInfo]


class Voices:
    """The names a request may use: the model's built-in voices, then the voices saved in ``store``.

    A built-in name always means the built-in voice; a saved voice of that name (left by a server
    of another model sharing the directory) is hidden, and a warning at start names its files.
    """

    def __init__(self, store: VoiceStore, builtin: dict[str, BuiltinVoice],
                 tokenize: Callable[[Path], Voice]) -> None:
        self.store, self.builtin, self._tokenize = store, builtin, tokenize
        for info in store.list():
            if info.name in builtin:
                logger.warning("the saved voice %r (%s.json and %s.safetensors in %s) is hidden by the model's "
                               "built-in voice of that name; rename or remove those files", info.name, info.name,
                               info.name, store.root)

    def get(self, name: str, param: str = "voice") -> Voice:
        """The voice called ``name`` (APIError 400 naming every usable voice when there is none)."""
        if name in self.builtin:  # the file, never a path from the request: names are not paths
            return self._tokenize(self.builtin[name].audio_path)
        try:
            return self.store.get(name, param)
        except APIError as e:
            raise self._missing(name, param) if e.code == "voice_not_found" else e from None

    def listing(self) -> VoiceListing:
        saved = [v for v in self.store.list() if v.name not in self.builtin]
        return VoiceListing(voices=[*self.builtin, *(v.name for v in saved)], uploaded_voices=saved,
                            builtin_voices=[BuiltinVoiceInfo.of(v) for v in self.builtin.values()])

    def info(self, name: str, param: str = "voice_id") -> VoiceInfo | BuiltinVoiceInfo:
        if name in self.builtin:
            return BuiltinVoiceInfo.of(self.builtin[name])
        return self.store.info(name, param)

    def check_free(self, name: str) -> None:
        """Fail before the expensive tokenization when ``name`` is invalid, built-in or taken."""
        check_name(name, "name")
        if name in self.builtin:
            raise APIError(409, f"{name!r} is a built-in voice of the model; pick another name for a saved voice",
                           param="name", code="builtin_voice")
        if self.store.exists(name):
            raise APIError(409, f"a voice named {name!r} already exists; delete it first or pick another name",
                           param="name", code="voice_exists")

    def add(self, voice: Voice, name: str, *, file_size: int, duration: float, mime_type: str | None,
            consent: str | None) -> VoiceInfo:
        """Save a new voice (see :meth:`VoiceStore.add`); a built-in name is refused (409)."""
        self.check_free(name)
        return self.store.add(voice, name, file_size=file_size, duration=duration, mime_type=mime_type,
                              consent=consent)

    def delete(self, name: str) -> None:
        if name in self.builtin:
            raise APIError(403, f"{name!r} is a built-in voice of the model and cannot be deleted (only saved "
                           "voices can)", type="permission_error", param="voice_id", code="builtin_voice")
        self.store.delete(name)

    def _missing(self, name: str, param: str) -> APIError:
        names = [*self.builtin, *(v.name for v in self.store.list() if v.name not in self.builtin)]
        known = f"voices: {', '.join(names)}" if names else "no voices are saved (POST /v1/audio/voices)"
        return bad_request(f"unknown voice {name!r}; {known}; or send ref_audio", param, "voice_not_found")
