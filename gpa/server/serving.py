"""The serving layer: turns validated requests into engine calls and engine events into responses.

Codec work on uploads (decoding, speaker tokenization) runs on the server's own worker thread and
prompt preparation on the engine's, so the event loop only moves bytes. Every engine stream is
consumed under the request timeout and closed on every path (done, error, timeout, client gone):
closing it cancels the request in the engine and frees its KV-cache slot.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
from fastapi import Request, UploadFile
from fastapi.responses import Response, StreamingResponse

from gpa.api import Voice
from gpa.audio import SAMPLE_RATE
from gpa.config import ASR_FALLBACK, Task
from gpa.engine import AudioChunk, Engine, Event, Finished, TextDelta
from gpa.server import media, transcripts
from gpa.server.errors import APIError, ClientGone, bad_request, to_api_error
from gpa.server.metrics import Metrics
from gpa.server.protocol import (
    ConversionForm,
    SpeechAudioDelta,
    SpeechAudioDone,
    SpeechRequest,
    StreamError,
    TranscriptionForm,
    Usage,
    VoiceForm,
    VoiceInfo,
)
from gpa.server.settings import ServerSettings
from gpa.server.voices import Voices, VoiceStore
from gpa.text import compression_ratio, split_text
from gpa.threads import release_thread_pool

logger = logging.getLogger(__name__)

DISCONNECT_POLL_S = 0.25  # how often a non-streamed request checks that its client is still there


class Stream(StreamingResponse):
    """A streamed response that always closes its body iterator (the engine request) when sending ends."""

    async def stream_response(self, send: Any) -> None:
        try:
            await super().stream_response(send)
        finally:
            await self.body_iterator.aclose()  # type: ignore[union-attr]


def _sse(payload: Any) -> str:
    data = payload.model_dump_json() if hasattr(payload, "model_dump_json") else json.dumps(payload)
    return f"data: {data}\n\n"


def _then_release(fn: Callable[..., Any], args: tuple[Any, ...]) -> Any:
    try:
        return fn(*args)
    finally:
        release_thread_pool()


class Serving:
    """Request handling shared by the routes: one per app, created in its lifespan."""

    def __init__(self, engine: Engine, settings: ServerSettings, voices: VoiceStore, metrics: Metrics) -> None:
        self.engine, self.settings, self.metrics = engine, settings, metrics
        self.model = engine.model
        self.voices = Voices(voices, self.model.builtin_voices(), self.model.voice)  # built-in, then saved
        self.started = int(time.time())
        self.engine_running = True
        self._worker = ThreadPoolExecutor(1, thread_name_prefix="gpa-server-audio")

    def close(self) -> None:
        self._worker.shutdown(wait=True)

    async def blocking(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run codec work off the event loop, on a thread that then ends its OpenMP pool (alive beside the
        engine's decode thread, it would slow every decode step ~2x: :mod:`gpa.threads`)."""
        return await asyncio.get_running_loop().run_in_executor(self._worker, _then_release, fn, args)

    # --- checks ------------------------------------------------------------------------------------

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.settings.model_name:
            raise APIError(404, f"model {model!r} does not exist; this server serves {self.settings.model_name!r}",
                           type="not_found_error", param="model", code="model_not_found")

    async def read_audio(self, upload: UploadFile, what: str, max_seconds: float) -> tuple[np.ndarray, bytes]:
        data = await upload.read()
        return await self.blocking(media.decode_upload, data, what, max_seconds), data

    async def _voice(self, name: str | None, ref_audio: bytes | None, ref_text: str | None) -> Voice:
        """The speaker: an uploaded clip (tokenized now) or a saved voice."""
        if ref_audio is not None:
            wav = await self.blocking(media.decode_upload, ref_audio, "ref_audio", self.settings.max_clip_seconds)
            if ref_text is not None and not ref_text.strip():
                raise bad_request("ref_text is empty; leave it out to clone the voice only", "ref_text")
            return await self.blocking(self.model.voice, (wav, SAMPLE_RATE), ref_text)
        if ref_text is not None:
            raise bad_request("ref_text needs ref_audio (a saved voice keeps the transcript it was saved with)",
                              "ref_text")
        if name is None:
            raise bad_request("no voice: set 'voice' to a built-in or saved voice (GET /v1/audio/voices) or send "
                              "'ref_audio'", "voice", "voice_required")
        return await self.blocking(self.voices.get, name, "voice")

    @staticmethod
    def _stream_mode(stream: bool | None, stream_format: str | None, fmt: str) -> str:
        mode = "sse" if stream_format == "sse" else "audio" if stream_format == "audio" or stream else "file"
        if mode != "file" and fmt not in media.STREAMABLE:
            raise bad_request(f"streaming sends {list(media.STREAMABLE)}; response_format {fmt!r} needs "
                              "a non-streamed request", "response_format", "unsupported_format")
        return mode

    # --- engine streams ----------------------------------------------------------------------------

    async def _until_deadline(self, events: AsyncIterator[Event]) -> AsyncIterator[Event]:
        """``events`` under the request timeout; always closed at the end."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.request_timeout_s
        try:
            while True:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    raise TimeoutError
                try:
                    event = await asyncio.wait_for(events.__anext__(), remaining)
                except StopAsyncIteration:
                    return
                if isinstance(event, Finished):
                    self.metrics.observe_tokens(self._task_of(event), event.output_tokens)
                yield event
        finally:
            await events.aclose()  # type: ignore[attr-defined]

    async def _started(self, events: AsyncIterator[Event]) -> AsyncIterator[Event]:
        """``events`` under the deadline, with the first event already received.

        Waiting for it before the response starts turns an early failure into a proper HTTP error,
        and a started engine stream is cancelled even if the body is never sent (closing or
        collecting a started generator runs its cleanup; an unstarted one has none to run).
        """
        guarded = self._until_deadline(events)
        try:
            first = await guarded.__anext__()
        except StopAsyncIteration:
            return guarded
        except BaseException:
            await guarded.aclose()  # type: ignore[attr-defined]
            raise

        async def replay() -> AsyncIterator[Event]:
            try:
                yield first
                async for event in guarded:
                    yield event
            finally:
                await guarded.aclose()  # type: ignore[attr-defined]

        return replay()

    @staticmethod
    def _task_of(event: Finished) -> str:
        return "asr" if event.text is not None else "audio"

    async def _collect(self, events: AsyncIterator[Event], request: Request) -> list[Event]:
        """All events of a non-streamed request; stops (and frees the slot) if the client goes away."""

        async def gather() -> list[Event]:
            return [e async for e in self._until_deadline(events)]

        task = asyncio.ensure_future(gather())
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
                if done:
                    return task.result()
                if await request.is_disconnected():
                    raise ClientGone
        finally:
            if not task.done():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)

    async def _audio_response(self, events: AsyncIterator[Event], fmt: str, mode: str, request: Request) -> Response:
        media_type = media.MEDIA_TYPES[fmt]
        if mode == "file":
            collected = await self._collect(events, request)
            chunks = [e.samples for e in collected if isinstance(e, AudioChunk)]
            wav = np.concatenate(chunks) if chunks else np.zeros(0, np.float32)
            body = await self.blocking(media.encode, wav, fmt, self.model.sample_rate)
            done = collected[-1]
            headers = {"X-Input-Tokens": str(done.prompt_tokens), "X-Output-Tokens": str(done.output_tokens),
                       "X-Sample-Rate": str(self.model.sample_rate)}
            return Response(body, media_type=media_type, headers=headers)
        headers = {"X-Sample-Rate": str(self.model.sample_rate), "Cache-Control": "no-cache"}
        started = await self._started(events)
        if mode == "sse":
            return Stream(self._sse_audio(started, fmt), media_type="text/event-stream", headers=headers)
        return Stream(self._raw_audio(started, fmt), media_type=media_type, headers=headers)

    async def _raw_audio(self, events: AsyncIterator[Event], fmt: str) -> AsyncIterator[bytes]:
        try:
            if fmt == "wav":
                yield media.wav_header(None, self.model.sample_rate)
            async for event in events:
                if isinstance(event, AudioChunk):
                    yield media.pcm16(event.samples)
            # an error ends the body early: the status line is already sent
        finally:
            await events.aclose()  # type: ignore[attr-defined]

    async def _sse_audio(self, events: AsyncIterator[Event], fmt: str) -> AsyncIterator[str]:
        def delta(data: bytes) -> str:
            return _sse(SpeechAudioDelta(audio=base64.b64encode(data).decode("ascii")))

        try:
            if fmt == "wav":
                yield delta(media.wav_header(None, self.model.sample_rate))
            async for event in events:
                if isinstance(event, AudioChunk):
                    yield delta(media.pcm16(event.samples))
                elif isinstance(event, Finished):
                    usage = Usage(input_tokens=event.prompt_tokens, output_tokens=event.output_tokens,
                                  total_tokens=event.prompt_tokens + event.output_tokens)
                    yield _sse(SpeechAudioDone(usage=usage))
        except Exception as e:  # noqa: BLE001 - reported in-band, the headers are gone
            yield _sse(StreamError(type="speech.audio.error", error=to_api_error(e).detail()))
        finally:
            await events.aclose()  # type: ignore[attr-defined]

    # --- speech ------------------------------------------------------------------------------------

    async def speech(self, req: SpeechRequest, request: Request) -> Response:
        self.check_model(req.model)
        fmt = media.check_format(req.response_format)
        if not req.input.strip():
            raise bad_request("input is empty", "input", "empty_input")
        if len(req.input) > self.settings.max_text_chars:
            raise bad_request(f"input has {len(req.input)} characters; the limit is {self.settings.max_text_chars}",
                              "input", "text_too_long")
        if req.speed != 1.0:
            raise bad_request(f"speed {req.speed} is not supported: GPA speaks at its natural rate (speed 1.0)",
                              "speed", "unsupported_value")
        if req.instructions and req.instructions.strip():
            raise bad_request("instructions are not supported by GPA; describe the voice with voice or ref_audio",
                              "instructions", "unsupported_value")
        mode = self._stream_mode(req.stream, req.stream_format, fmt)
        params = req.to_sampling_params(Task.TTS)
        ref = media.decode_base64_audio(req.ref_audio) if req.ref_audio is not None else None
        voice = await self._voice(req.voice_name, ref, req.ref_text)
        pieces = split_text(req.input) or [req.input]
        options = {"stream": mode != "file", **dataclasses.asdict(params)}
        events = (await self.engine.tts(pieces[0], voice, **options) if len(pieces) == 1
                  else self._tts_pieces(pieces, voice, options))
        return await self._audio_response(events, fmt, mode, request)

    async def _tts_pieces(self, pieces: list[str], voice: Voice, options: dict[str, Any]) -> AsyncIterator[Event]:
        """A long input as one event stream: its sentences generated one after another (one slot, in order)."""
        index, prompt_tokens, output_tokens, events = 0, 0, 0, None
        try:
            for piece in pieces:
                events = await self.engine.tts(piece, voice, **options)
                async for event in events:
                    if isinstance(event, AudioChunk):
                        yield dataclasses.replace(event, index=index)
                        index += 1
                    elif isinstance(event, Finished):
                        prompt_tokens += event.prompt_tokens
                        output_tokens += event.output_tokens
                        last = event
            yield dataclasses.replace(last, prompt_tokens=prompt_tokens, output_tokens=output_tokens)
        finally:
            if events is not None:
                await events.aclose()  # type: ignore[attr-defined]

    # --- conversion --------------------------------------------------------------------------------

    async def conversion(self, form: ConversionForm, request: Request) -> Response:
        self.check_model(form.model)
        fmt = media.check_format(form.response_format)
        mode = self._stream_mode(form.stream, form.stream_format, fmt)
        params = form.to_sampling_params(Task.VC)
        source, _ = await self.read_audio(form.file, "file", self.settings.max_clip_seconds)
        ref = await form.ref_audio.read() if form.ref_audio is not None else None
        voice = await self._voice(form.voice, ref, None)
        events = await self.engine.vc((source, SAMPLE_RATE), voice, stream=mode != "file",
                                      **dataclasses.asdict(params))
        return await self._audio_response(events, fmt, mode, request)

    # --- transcription -----------------------------------------------------------------------------

    async def transcription(self, form: TranscriptionForm, request: Request) -> Response:
        self.check_model(form.model)
        if form.timestamp_granularities and "word" in form.timestamp_granularities:
            raise bad_request("word timestamps are not supported; use timestamp_granularities[]=segment",
                              "timestamp_granularities", "unsupported_value")
        params = form.to_sampling_params(Task.ASR)
        wav, _ = await self.read_audio(form.file, "file", self.settings.max_audio_seconds)
        spans = media.split_points(wav, self.settings.segment_seconds)
        options = dataclasses.asdict(params)
        first = await self.engine.asr((wav[spans[0][0]:spans[0][1]], SAMPLE_RATE), **options)  # errors before 200
        duration = len(wav) / SAMPLE_RATE
        if form.stream:
            return Stream(self._sse_transcript(await self._started(first), wav, spans, options),
                          media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        segments = []
        for i, (a, b) in enumerate(spans):
            events = first if i == 0 else await self.engine.asr((wav[a:b], SAMPLE_RATE), **options)
            text, temperature = (await self._collect(events, request))[-1].text or "", params.temperature
            for retry in ASR_FALLBACK.retries(params):  # a looping transcript: decode again, as whisper does
                if not ASR_FALLBACK.needs_retry(compression_ratio(text)):
                    break
                events = await self.engine.asr((wav[a:b], SAMPLE_RATE), **dataclasses.asdict(retry))
                text, temperature = (await self._collect(events, request))[-1].text or "", retry.temperature
            segments.append(transcripts.Segment(a / SAMPLE_RATE, b / SAMPLE_RATE, text, temperature))
        return transcripts.render(form.response_format, segments, duration, form.language)

    async def _sse_transcript(self, first: AsyncIterator[Event], wav: np.ndarray, spans: list[tuple[int, int]],
                              options: dict[str, Any]) -> AsyncIterator[str]:
        texts: list[str] = []
        tokens = [0, 0]
        events = first
        try:
            for i, (a, b) in enumerate(spans):
                if i > 0:
                    events = self._until_deadline(await self.engine.asr((wav[a:b], SAMPLE_RATE), **options))
                sep, started = (" " if any(texts) else ""), False
                async for event in events:
                    if isinstance(event, TextDelta):
                        delta = event.text if started else event.text.lstrip()
                        if delta:
                            yield _sse({"type": "transcript.text.delta", "delta": delta if started else sep + delta})
                            started = True
                    elif isinstance(event, Finished):
                        texts.append(event.text or "")
                        tokens[0] += event.prompt_tokens
                        tokens[1] += event.output_tokens
            usage = {"type": "tokens", "input_tokens": tokens[0], "output_tokens": tokens[1],
                     "total_tokens": sum(tokens)}
            yield _sse({"type": "transcript.text.done", "text": " ".join(t for t in texts if t), "usage": usage})
        except Exception as e:  # noqa: BLE001 - reported in-band
            yield _sse(StreamError(type="error", error=to_api_error(e).detail()))
        finally:
            await events.aclose()  # type: ignore[attr-defined]
            await first.aclose()  # type: ignore[attr-defined]

    # --- voices ------------------------------------------------------------------------------------

    async def create_voice(self, form: VoiceForm) -> VoiceInfo:
        sample = form.audio_sample
        wav, data = await self.read_audio(sample, "audio_sample", self.settings.max_clip_seconds)
        if form.ref_text is not None and not form.ref_text.strip():
            raise bad_request("ref_text is empty; leave it out to save the voice only", "ref_text")
        self.voices.check_free(form.name)
        voice = await self.blocking(self.model.voice, (wav, SAMPLE_RATE), form.ref_text)
        return await self.blocking(lambda: self.voices.add(voice, form.name, file_size=len(data),
                                                           duration=len(wav) / SAMPLE_RATE,
                                                           mime_type=sample.content_type, consent=form.consent))
