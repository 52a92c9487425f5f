"""A gpa generation request in vLLM's terms, shared by the in-process and the HTTP vLLM backends.

Nothing here imports vLLM: the HTTP backend runs where vLLM is not installed.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
from abc import abstractmethod
from collections.abc import AsyncIterator
from concurrent.futures import Future
from typing import Any

import torch

from gpa.engine.backend import Backend, FinishReason, TokenSink, check_fits
from gpa.engine.request import EngineError
from gpa.generation import GenerationRequest
from gpa.logits import AllowedIds, SuppressAtStart

logger = logging.getLogger(__name__)

SUPPRESS_IDS = "gpa_suppress_ids"  # extra_args / vllm_xargs key: ids that may not come first
SUPPRESS_STEPS = "gpa_suppress_steps"  # ... for how many first tokens (default 1)
LOGITS_PROCESSOR = "gpa.engine.vllm_logits:SuppressAtStartProcessor"  # what applies them inside vLLM


class AllowedIdLists:
    """The id list of each allowed mask, built once per mask object (a task's mask is shared)."""

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size
        self._lists: dict[int, tuple[torch.Tensor, list[int]]] = {}

    def __call__(self, mask: torch.Tensor) -> list[int]:
        if mask.numel() != self.vocab_size:
            raise ValueError(f"allowed mask has {mask.numel()} entries; the vocabulary has {self.vocab_size}")
        cached = self._lists.get(id(mask))
        if cached is None or cached[0] is not mask:
            cached = (mask, torch.nonzero(mask).flatten().tolist())
            self._lists[id(mask)] = cached
        return cached[1]


def vllm_fields(request: GenerationRequest, allowed_ids: AllowedIdLists) -> dict[str, Any]:
    """vLLM SamplingParams fields for ``request`` (the same names in /v1/completions, but
    ``extra_args`` is ``vllm_xargs`` there). A filter vLLM cannot apply raises ValueError."""
    p = request.params
    allowed: list[int] | None = None
    suppress: dict[str, Any] = {}
    for f in request.filters:
        if isinstance(f, AllowedIds):
            allowed = allowed_ids(f.allowed)
        elif isinstance(f, SuppressAtStart):
            if suppress and suppress[SUPPRESS_STEPS] != f.steps:
                raise ValueError("the vLLM backend takes SuppressAtStart filters of one length only")
            ids = sorted({*suppress.get(SUPPRESS_IDS, []), *(int(i) for i in f.ids)})
            suppress = {SUPPRESS_IDS: ids, SUPPRESS_STEPS: f.steps}
        else:
            raise ValueError(f"the vLLM backend cannot apply the output filter {type(f).__name__}; "
                             "it supports AllowedIds and SuppressAtStart")
    if allowed is None and request.allowed is not None:
        allowed = allowed_ids(request.allowed)
    return {"n": 1, "temperature": p.temperature, "top_k": p.top_k or 0, "top_p": p.top_p,
            "repetition_penalty": p.repetition_penalty, "seed": p.seed, "max_tokens": p.max_new_tokens,
            "stop_token_ids": sorted(request.stop), "ignore_eos": True, "allowed_token_ids": allowed,
            "extra_args": suppress or None, "skip_special_tokens": False}


_REASONS: dict[str | None, FinishReason] = {"stop": "stop", "length": "length"}


class _Job:
    """One request inside a vLLM backend."""

    def __init__(self, request_id: str, request: GenerationRequest, sink: TokenSink) -> None:
        self.request_id, self.request, self.sink = request_id, request, sink
        self.future: Future[None] | None = None
        self.ended = False


class LoopBackend(Backend):
    """A backend whose requests are asyncio tasks on its own thread and event loop.

    The caller's event loop (e.g. the HTTP server's) never runs the backend's I/O; each request's
    ids reach its sink from the backend's thread. Subclasses open and close their client and turn
    one request into a stream of (new ids, vLLM's finish reason or None).
    """

    def __init__(self, vocab_size: int, slots: int, max_seq_len: int) -> None:
        self.slots = slots
        self.max_seq_len = max_seq_len
        self._allowed = AllowedIdLists(vocab_size)
        self._ids = itertools.count()
        self._jobs: set[_Job] = set()
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    @abstractmethod
    async def _open(self) -> None:
        """Connect or start (on the backend's loop); raise if that fails."""

    @abstractmethod
    async def _close(self) -> None:
        """Release what :meth:`_open` made (on the backend's loop, after every request was cancelled)."""

    @abstractmethod
    def _stream(self, job: _Job) -> AsyncIterator[tuple[list[int], str | None]]:
        """New ids of ``job`` as they come, each with vLLM's finish reason on the last (else None)."""

    def start(self) -> None:
        if self._loop is not None:
            return
        loop = asyncio.new_event_loop()
        thread = threading.Thread(target=loop.run_forever, name=f"gpa-{self.name}", daemon=True)
        thread.start()
        try:
            asyncio.run_coroutine_threadsafe(self._open(), loop).result()
        except Exception as e:
            loop.call_soon_threadsafe(loop.stop)
            thread.join()
            loop.close()
            raise EngineError(f"{self.name} backend failed to start: {e}") from e
        self._loop, self._thread = loop, thread

    def shutdown(self) -> None:
        if self._loop is not None:
            with self._lock:
                jobs = list(self._jobs)
            for job in jobs:
                self._end(job, EngineError("the engine was shut down"))
            asyncio.run_coroutine_threadsafe(self._stop_all(), self._loop).result()
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join()
            self._loop.close()
            self._loop = self._thread = None
        self._signal_stopped()

    async def _stop_all(self) -> None:
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=10)
        await self._close()

    @property
    def running(self) -> int:
        with self._lock:
            return min(len(self._jobs), self.slots)

    def check_fits(self, request: GenerationRequest) -> None:
        check_fits(request, self.max_seq_len)
        vllm_fields(request, self._allowed)  # a filter vLLM cannot apply is refused here

    def submit(self, request: GenerationRequest, sink: TokenSink) -> object:
        if self._loop is None:
            raise EngineError(f"the {self.name} backend is not running")
        job = _Job(f"gpa-{next(self._ids)}", request, sink)
        with self._lock:
            self._jobs.add(job)
        job.future = asyncio.run_coroutine_threadsafe(self._generate(job), self._loop)
        return job

    def cancel(self, handle: object) -> None:
        assert isinstance(handle, _Job), handle
        with self._lock:
            handle.ended = True
            self._jobs.discard(handle)
        if handle.future is not None:
            handle.future.cancel()  # cancels the task; vLLM aborts the request

    async def _generate(self, job: _Job) -> None:
        try:
            async for ids, finish in self._stream(job):
                reason = _REASONS.get(finish)
                if finish is not None and reason is None:
                    raise EngineError(f"vLLM ended the request: {finish}")
                if reason is not None:
                    with self._lock:
                        if job.ended:
                            return
                        job.ended = True
                        self._jobs.discard(job)
                job.sink.tokens(ids, reason)
        except asyncio.CancelledError:
            raise
        except ValueError as e:  # vLLM's validation errors (VLLMValidationError is one), HTTP 400s
            self._end(job, e)
        except Exception as e:  # noqa: BLE001 - reported to the request
            logger.exception("%s request %s failed", self.name, job.request_id)
            self._end(job, EngineError(f"vLLM failed: {e}"))

    def _end(self, job: _Job, error: BaseException) -> None:
        with self._lock:
            if job.ended:
                return
            job.ended = True
            self._jobs.discard(job)
        if job.future is not None:
            job.future.cancel()
        job.sink.fail(error)
