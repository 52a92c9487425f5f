"""Server settings: limits, authentication and where saved voices live (one frozen dataclass)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from gpa.engine import EngineConfig


def default_voices_dir() -> Path:
    """``$XDG_DATA_HOME/gpa/voices`` (``~/.local/share/gpa/voices`` when XDG_DATA_HOME is unset)."""
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "gpa" / "voices"


@dataclass(frozen=True)
class ServerSettings:
    """Everything the HTTP layer needs besides the model."""

    model_name: str = "gpa"  # the id served by /v1/models and accepted in `model` fields
    api_key: str | None = None  # when set, /v1/* needs "Authorization: Bearer <api_key>"
    voices_dir: Path = field(default_factory=default_voices_dir)  # saved voices (JSON + safetensors)
    max_upload_bytes: int = 25 * 1024 * 1024  # request body limit (uploads, base64 ref_audio)
    max_audio_seconds: float = 600.0  # longest audio to transcribe (split into segments)
    max_clip_seconds: float = 30.0  # longest reference clip, saved voice sample or VC source
    max_text_chars: int = 4096  # longest TTS input
    max_concurrent: int = 64  # requests handled at once (engine slots + queue + preparation); more get 429
    request_timeout_s: float = 300.0  # a generation (or transcript segment) running longer: 504 or an error event
    segment_seconds: float = 30.0  # transcription segment length (long audio is split near silences)
    engine: EngineConfig = field(default_factory=EngineConfig)

    def __post_init__(self) -> None:
        for name in ("max_upload_bytes", "max_audio_seconds", "max_clip_seconds", "max_text_chars",
                     "max_concurrent", "request_timeout_s", "segment_seconds"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if not self.model_name.strip():
            raise ValueError("model_name must not be empty")
        object.__setattr__(self, "voices_dir", Path(self.voices_dir))
