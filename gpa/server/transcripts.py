"""Transcript response formats: json, text, srt, vtt and verbose_json (segment timestamps)."""

from __future__ import annotations

from dataclasses import dataclass

from fastapi.responses import JSONResponse, PlainTextResponse, Response

from gpa.server.protocol import Transcription, TranscriptionSegment, TranscriptionVerbose
from gpa.text import compression_ratio


@dataclass(frozen=True)
class Segment:
    """One transcribed span of the input."""

    start: float  # seconds from the start of the upload
    end: float
    text: str
    temperature: float  # the decode that produced ``text`` (above the request's after a fallback)


def join(segments: list[Segment]) -> str:
    return " ".join(s.text for s in segments if s.text)


def _clock(seconds: float, sep: str) -> str:
    ms = round(seconds * 1000)
    h, rest = divmod(ms, 3_600_000)
    m, rest = divmod(rest, 60_000)
    s, ms = divmod(rest, 1000)
    return f"{h:02d}:{m:02d}:{s:02d}{sep}{ms:03d}"


def srt(segments: list[Segment]) -> str:
    cues = [s for s in segments if s.text]
    return "".join(f"{i}\n{_clock(s.start, ',')} --> {_clock(s.end, ',')}\n{s.text}\n\n"
                   for i, s in enumerate(cues, 1))


def vtt(segments: list[Segment]) -> str:
    return "WEBVTT\n\n" + "".join(f"{_clock(s.start, '.')} --> {_clock(s.end, '.')}\n{s.text}\n\n"
                                  for s in segments if s.text)


def verbose(segments: list[Segment], duration: float, language: str | None) -> TranscriptionVerbose:
    items = [TranscriptionSegment(id=i, seek=round(s.start * 100), start=round(s.start, 3), end=round(s.end, 3),
                                  text=s.text, temperature=s.temperature,
                                  compression_ratio=round(compression_ratio(s.text), 3))
             for i, s in enumerate(segments)]
    return TranscriptionVerbose(language=language or "unknown", duration=round(duration, 3), text=join(segments),
                                segments=items, usage={"type": "duration", "seconds": round(duration, 3)})


def render(fmt: str, segments: list[Segment], duration: float, language: str | None) -> Response:
    """The response for ``response_format`` ``fmt``."""
    if fmt == "text":
        return PlainTextResponse(join(segments) + "\n")
    if fmt == "srt":
        return PlainTextResponse(srt(segments), media_type="application/x-subrip")
    if fmt == "vtt":
        return PlainTextResponse(vtt(segments), media_type="text/vtt")
    if fmt == "verbose_json":
        return JSONResponse(verbose(segments, duration, language).model_dump())
    body = Transcription(text=join(segments), usage={"type": "duration", "seconds": round(duration, 3)})
    return JSONResponse(body.model_dump())
