"""The serving engine: continuous batching over a fixed set of KV-cache slots, streaming out.

One thread runs the decode loop: between steps it admits waiting requests into free slots
(prefill), then advances every live sequence by one token in a single forward pass. Audio
decoding runs on a separate vocoder thread and prompt preparation (codec encoders) on a third,
so neither stalls the decode loop. Each request's events reach its ``async for`` through an
asyncio queue.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from gpa.api import GPA, Audio, Voice
from gpa.config import Task
from gpa.engine.request import AudioChunk, EngineError, EngineOverloaded, EngineRequest, Event, Finished, TextDelta
from gpa.engine.streaming import AudioStreamer, StreamConfig, TextStreamer, receptive_field
from gpa.generation import GenerationRequest, SequenceState, SlotDecoder

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineConfig:
    """Capacity and streaming settings."""

    max_slots: int = 8  # sequences sharing each decode step (KV-cache rows)
    max_seq_len: int = 4096  # positions per slot: prompt + generated tokens
    max_queue: int = 64  # requests waiting for a slot beyond this are rejected
    stream: StreamConfig = field(default_factory=StreamConfig)

    def __post_init__(self) -> None:
        if self.max_slots < 1 or self.max_seq_len < 2 or self.max_queue < 0:
            raise ValueError(f"invalid engine capacity: {self}")


class _Live:
    """Engine-side state of one request."""

    def __init__(self, request: EngineRequest, emit: Callable[[Event | BaseException], None], generation:
                 GenerationRequest) -> None:
        self.request = request
        self.emit = emit
        self.generation = generation
        self.state: SequenceState | None = None
        self.cancelled = False
        self.text: TextStreamer | None = None
        self.audio: AudioStreamer | None = None
        self.codes: list[int] = []
        self.chunks = 0


class RequestStream:
    """The events of one request, as an async iterator; closing it cancels the request."""

    def __init__(self, request_id: str, events: asyncio.Queue[Event | BaseException],
                 cancel: Callable[[], None]) -> None:
        self.request_id = request_id
        self._events = events
        self._cancel = cancel
        self._done = False

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> Event:
        if self._done:
            raise StopAsyncIteration
        try:
            ev = await self._events.get()
        except BaseException:  # the consumer was cancelled while waiting
            self.close()
            raise
        if isinstance(ev, BaseException):
            self._done = True
            raise ev
        if isinstance(ev, Finished):
            self._done = True
        return ev

    def close(self) -> None:
        """Cancel the request unless it already ended (idempotent, callable from any thread)."""
        if not self._done:
            self._done = True
            self._cancel()

    async def aclose(self) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()


class Engine:
    """Continuous-batching GPA inference with streaming results.

    Use as ``async with Engine(model) as engine:`` and ``async for event in engine.submit(request)``
    (or the task helpers :meth:`tts`, :meth:`vc`, :meth:`asr`).
    """

    def __init__(self, model: GPA, config: EngineConfig | None = None) -> None:
        self.model = model
        self.config = config or EngineConfig()
        self.decoder = SlotDecoder(model.lm, self.config.max_slots, self.config.max_seq_len)
        self._field: int | None = None
        self._inbox: queue.Queue[tuple[str, Any]] = queue.Queue()
        self._waiting: deque[_Live] = deque()
        self._active: list[_Live] = []
        self._pending = 0  # submitted but not yet finished (admission control)
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._running = False
        self._here = threading.Event()  # set when a run_here() loop has returned
        self._vocoder = ThreadPoolExecutor(1, thread_name_prefix="gpa-vocoder")
        self._prep = ThreadPoolExecutor(1, thread_name_prefix="gpa-prep")

    # --- lifecycle ----------------------------------------------------------------------------------

    async def __aenter__(self) -> Engine:
        self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await asyncio.get_running_loop().run_in_executor(None, self.shutdown)

    def start(self) -> None:
        """Start the decode loop on its own thread (idempotent)."""
        if not self._running:
            self._prepare_streaming()
            self._running = True
            self._thread = threading.Thread(target=self._run, name="gpa-decode", daemon=True)
            self._thread.start()

    def run_here(self, on_ready: Callable[[], None] | None = None) -> None:
        """Run the decode loop on the calling thread until :meth:`shutdown` (from another thread).

        ``on_ready`` is called once the engine accepts requests (e.g. to start the asyncio thread).

        On CPU, torch's kernels run markedly faster on a process's main thread than on a worker
        thread (measured 30 vs 56 ms per decode step here), so a program that can give the main
        thread to the engine, with its asyncio loop on another thread, should call this there.
        """
        if self._running:
            raise EngineError("the engine is already running")
        self._prepare_streaming()
        self._running = True
        self._here.clear()
        try:
            if on_ready is not None:
                on_ready()
            self._run()
        finally:
            self._here.set()

    def _prepare_streaming(self) -> None:
        stream = self.config.stream
        if self._field is None and (stream.left is None or stream.lookahead is None):
            self._field = receptive_field(self.model.bicodec)  # measured once, before any request

    def shutdown(self) -> None:
        """Stop the decode loop; requests still running end with an EngineError."""
        if self._running:
            self._inbox.put(("stop", None))
            if self._thread is not None:
                self._thread.join()
                self._thread = None
            else:
                self._here.wait()
            self._running = False
        self._vocoder.shutdown(wait=True)
        self._prep.shutdown(wait=True)

    @property
    def load(self) -> dict[str, int]:
        """Requests running and waiting (for health checks and admission)."""
        with self._lock:
            return {"running": len(self._active), "waiting": self._pending - len(self._active),
                    "slots": self.config.max_slots}

    # --- submission ---------------------------------------------------------------------------------

    async def submit(self, request: EngineRequest) -> RequestStream:
        """Run ``request``; iterate the returned stream for its events, ending with :class:`Finished`.

        Closing the stream (``aclose()``, or dropping it, e.g. by leaving the loop early or a task
        cancellation) cancels the request and frees its slot, even before its first event. Raises
        ValueError for a request that can never fit, EngineOverloaded when the queue is full.
        """
        if not self._running:
            raise EngineError("the engine is not running; use 'async with Engine(...)', start() or run_here()")
        generation = self.model.generation_request(request.task, request.prompt, request.params)
        self.decoder.check_fits(generation)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Event | BaseException] = asyncio.Queue()
        live = _Live(request, lambda ev: loop.call_soon_threadsafe(events.put_nowait, ev), generation)
        if request.task is Task.ASR:
            live.text = TextStreamer(self.model.vocab)
        elif request.stream:
            live.audio = AudioStreamer(self.model.bicodec, request.global_codes, self.config.stream,
                                       self._field or 0)
        self._admit_or_reject(live)
        return RequestStream(request.request_id, events, lambda: self._inbox.put(("cancel", live)))

    def _admit_or_reject(self, live: _Live) -> None:
        with self._lock:
            if self._pending >= self.config.max_slots + self.config.max_queue:
                raise EngineOverloaded(f"engine is full: {self._pending} requests running or waiting "
                                       f"(limit {self.config.max_slots + self.config.max_queue})")
            self._pending += 1
        self._inbox.put(("add", live))

    # --- task helpers -------------------------------------------------------------------------------

    async def _prepare(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._prep, fn, *args)

    async def tts(self, text: str, reference: Audio | Voice, reference_text: str | None = None,
                  stream: bool = True, **options: Any) -> RequestStream:
        """Speak ``text`` in the reference's voice; audio events as they are decoded."""
        params = self.model.sampling(Task.TTS, **options)
        voice = await self._prepare(self.model._as_voice, reference, reference_text)
        prompt = (await self._prepare(self.model.tts_prompts, [text], voice))[0]
        return await self.submit(EngineRequest(Task.TTS, prompt.prompt_ids, params, voice.global_codes, stream))

    async def vc(self, source: Audio, reference: Audio | Voice, stream: bool = True,
                 **options: Any) -> RequestStream:
        """Convert ``source`` to the reference's voice."""
        params = self.model.sampling(Task.VC, **options)
        voice = await self._prepare(self.model._as_voice, reference, None)
        prompt = (await self._prepare(self.model.vc_prompts, [source], voice))[0]
        return await self.submit(EngineRequest(Task.VC, prompt.prompt_ids, params, voice.global_codes, stream))

    async def asr(self, audio: Audio, **options: Any) -> RequestStream:
        """Transcribe ``audio``; text deltas as tokens arrive."""
        params = self.model.sampling(Task.ASR, **options)
        prompt = (await self._prepare(self.model.asr_prompts, [audio]))[0]
        return await self.submit(EngineRequest(Task.ASR, prompt.prompt_ids, params))

    # --- the decode loop (engine thread) ------------------------------------------------------------

    def _run(self) -> None:
        try:
            while self._drain(block=not self._active and not self._waiting):
                self._admit()
                if self._active:
                    self.decoder.step([live.state for live in self._active])
                    for live in list(self._active):
                        self._dispatch(live)
        except BaseException as e:  # noqa: BLE001 - every request must hear about a dead loop
            logger.exception("decode loop failed")
            self._fail_all(EngineError(f"decode loop failed: {e}"))
            return
        self._fail_all(EngineError("the engine was shut down"))

    def _drain(self, block: bool) -> bool:
        """Apply queued commands; False when asked to stop."""
        while True:
            try:
                cmd, live = self._inbox.get(block=block)
            except queue.Empty:
                return True
            block = False
            if cmd == "stop":
                return False
            if cmd == "add":
                self._waiting.append(live)
            elif cmd == "cancel":
                self._cancel(live)

    def _admit(self) -> None:
        while self._waiting and self.decoder.free:
            live = self._waiting.popleft()
            try:
                live.state = self.decoder.prefill(live.generation)
            except ValueError as e:
                self._finish_error(live, e)
                continue
            with self._lock:
                self._active.append(live)
            self._dispatch(live)

    def _dispatch(self, live: _Live) -> None:
        """Route the newest token of ``live`` and finish it if it is done."""
        state = live.state
        token = state.output[-1]
        is_stop = token in live.generation.stop
        if not is_stop:
            if live.text is not None:
                delta = live.text.push([token])
                if delta:
                    live.emit(TextDelta(live.request.request_id, delta))
            else:
                live.codes.append(token)
                if live.audio is not None:
                    self._vocoder.submit(self._push_audio, live, [token])
        if state.finished:
            self._complete(live, "stop" if is_stop else "length")

    def _complete(self, live: _Live, reason: str) -> None:
        self._release(live)
        if live.text is not None:
            rest = live.text.finish()
            if rest:
                live.emit(TextDelta(live.request.request_id, rest))
            text = self.model.vocab.decode_text(live.text.ids).strip()
            live.emit(self._finished(live, reason, text))
        else:
            self._vocoder.submit(self._finish_audio, live, reason)

    def _finished(self, live: _Live, reason: str, text: str | None = None) -> Finished:
        return Finished(live.request.request_id, reason, len(live.generation.prompt), len(live.codes)
                        if live.text is None else len(live.text.ids), text)

    def _cancel(self, live: _Live) -> None:
        live.cancelled = True
        if live in self._waiting:
            self._waiting.remove(live)
            self._forget(live)
        elif live.state is not None and live in self._active:
            self._release(live)

    def _release(self, live: _Live) -> None:
        with self._lock:
            if live in self._active:
                self._active.remove(live)
        self.decoder.release(live.state)
        self._forget(live)

    def _forget(self, live: _Live) -> None:
        with self._lock:
            self._pending -= 1

    def _finish_error(self, live: _Live, error: BaseException) -> None:
        self._forget(live)
        live.emit(error)

    def _fail_all(self, error: EngineError) -> None:
        for live in [*self._active, *self._waiting]:
            live.emit(error)
        self._active.clear()
        self._waiting.clear()

    # --- audio (vocoder thread) ---------------------------------------------------------------------

    def _push_audio(self, live: _Live, codes: list[int]) -> None:
        if live.cancelled:
            return
        semantic = self.model.vocab.semantic_codes(codes)
        for samples in live.audio.push(semantic):
            self._emit_chunk(live, samples)

    def _finish_audio(self, live: _Live, reason: str) -> None:
        if live.cancelled:
            return
        try:
            if live.audio is not None:
                chunks = live.audio.finish()
            elif live.codes:
                chunks = [self.model._decode(live.codes, live.request.global_codes, remove_dc=False)[0]]
            else:
                chunks = []
        except Exception as e:  # noqa: BLE001 - reported to the request, the engine goes on
            live.emit(EngineError(f"audio decoding failed: {e}"))
            return
        for samples in chunks:
            self._emit_chunk(live, samples)
        live.emit(self._finished(live, reason))

    def _emit_chunk(self, live: _Live, samples: Any) -> None:
        live.emit(AudioChunk(live.request.request_id, samples, self.model.sample_rate, live.chunks))
        live.chunks += 1
