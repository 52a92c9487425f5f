"""Where the engine's tokens come from: a small backend interface and the built-in torch backend.

A backend takes a prompt (vocabulary ids) with its sampling options, allowed ids and stop ids, and
delivers the generated ids of each request, in order, to that request's :class:`TokenSink`; it
can cancel a request at any time. Prompt preparation, streaming text and audio decoding stay in
the :class:`~gpa.engine.Engine`, whatever the backend. Two implementations:

- :class:`TorchBackend`: gpa's own continuous-batching decode loop over :class:`SlotDecoder`;
- ``gpa.engine.vllm_backend.VLLMBackend``: vLLM's async engine in-process (multi-GPU, multi-node).
"""

from __future__ import annotations

import logging
import queue
import threading
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import torch
from torch import Tensor

from gpa.engine.request import EngineError
from gpa.generation import GenerationRequest, SequenceState, SlotDecoder
from gpa.model import GPALM

logger = logging.getLogger(__name__)

FinishReason = Literal["stop", "length"]
BACKENDS = ("torch", "vllm")


class TokenSink(Protocol):
    """Receives one request's output, on the backend's thread, in generation order."""

    def tokens(self, ids: list[int], finish_reason: FinishReason | None) -> None:
        """New generated ids (a stop id, when one ended the request, is the last of them).

        ``finish_reason`` is set on the last call: "stop" (a stop id came) or "length" (the
        max_new_tokens limit). No call follows it.
        """

    def fail(self, error: BaseException) -> None:
        """The request cannot go on (bad request, backend failure or shutdown); no call follows."""


@dataclass(frozen=True)
class VLLMOptions:
    """How the vLLM backend starts vLLM (its own names; see docs/vllm.md)."""

    model: Path  # the GPA checkpoint directory (vLLM reads its root config.json + model.safetensors)
    tensor_parallel_size: int = 1  # GPUs each layer is split over
    pipeline_parallel_size: int = 1  # groups of layers on successive GPUs / nodes
    gpu_memory_utilization: float | None = None  # GPU memory fraction for weights + KV cache (vLLM: 0.9)
    max_num_seqs: int | None = None  # sequences per step (default: EngineConfig.max_slots)
    dtype: str = "auto"  # "auto" (the checkpoint's), "float32", "bfloat16", "float16"
    enforce_eager: bool | None = None  # no CUDA graphs / torch.compile (default: True on CPU only)
    args: Mapping[str, Any] = field(default_factory=dict)  # any other vLLM engine argument, by its name
    url: str | None = None  # an OpenAI-compatible `vllm serve` to use instead of starting vLLM here
    api_key: str | None = None  # that server's --api-key

    def __post_init__(self) -> None:
        object.__setattr__(self, "model", Path(self.model))
        if self.url is not None:
            started = {"tensor_parallel_size": 1, "pipeline_parallel_size": 1, "gpu_memory_utilization": None,
                       "max_num_seqs": None, "dtype": "auto", "enforce_eager": None}
            given = [k for k, default in started.items() if getattr(self, k) != default] + (["args"] if self.args
                                                                                            else [])
            if given:
                raise ValueError(f"{given} start vLLM here; with url= they belong to the `vllm serve` command")
            if not self.url.startswith(("http://", "https://")):
                raise ValueError(f"url must start with http:// or https://, got {self.url!r}")
        if self.tensor_parallel_size < 1 or self.pipeline_parallel_size < 1:
            raise ValueError(f"parallel sizes must be >= 1, got tensor {self.tensor_parallel_size}, "
                             f"pipeline {self.pipeline_parallel_size}")
        if self.gpu_memory_utilization is not None and not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.max_num_seqs is not None and self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")


def check_fits(request: GenerationRequest, max_seq_len: int) -> None:
    """Raise ValueError if the prompt is empty or prompt + max_new_tokens exceeds ``max_seq_len``."""
    if not request.prompt:
        raise ValueError("empty prompt")
    needed = len(request.prompt) + request.params.max_new_tokens
    if needed > max_seq_len:
        new = request.params.max_new_tokens
        raise ValueError(f"prompt ({len(request.prompt)} tokens) plus max_new_tokens ({new}) needs {needed} "
                         f"positions; the limit is {max_seq_len}")


class Backend(ABC):
    """Generates token ids for many requests at once (continuous batching)."""

    name: str
    slots: int  # sequences decoded together

    @abstractmethod
    def check_fits(self, request: GenerationRequest) -> None:
        """Raise ValueError for a request this backend can never run (too long, empty, ...)."""

    @abstractmethod
    def start(self) -> None:
        """Start generating on the backend's own thread(s); returns once requests are accepted."""

    def run_here(self, on_ready: Callable[[], None] | None = None) -> None:
        """Serve on the calling thread until :meth:`shutdown` (default: start, then wait for it)."""
        self._stopped = threading.Event()
        self.start()
        if on_ready is not None:
            on_ready()
        self._stopped.wait()

    @abstractmethod
    def submit(self, request: GenerationRequest, sink: TokenSink) -> object:
        """Queue ``request``; its ids go to ``sink``. Returns a handle for :meth:`cancel`. Thread-safe."""

    @abstractmethod
    def cancel(self, handle: object) -> None:
        """Stop a request and free its resources; idempotent and thread-safe."""

    @abstractmethod
    def shutdown(self) -> None:
        """Stop; requests still running get ``sink.fail(EngineError)``. Idempotent."""

    @property
    @abstractmethod
    def running(self) -> int:
        """Requests being decoded now (the rest wait)."""

    def _signal_stopped(self) -> None:
        stopped = getattr(self, "_stopped", None)
        if stopped is not None:
            stopped.set()


class _Job:
    """One request inside the torch backend."""

    def __init__(self, request: GenerationRequest, sink: TokenSink) -> None:
        self.request, self.sink = request, sink
        self.state: SequenceState | None = None


class TorchBackend(Backend):
    """gpa's decode loop: fixed KV-cache slots, requests admitted between decode steps.

    One thread runs the loop: between steps it admits waiting requests into free slots (prefill),
    then advances every live sequence by one token in a single forward pass.
    """

    name = "torch"

    def __init__(self, lm: GPALM, slots: int, max_seq_len: int, heads: Sequence[Tensor | None] = (),
                 prefix_cache: int = 0) -> None:
        """``heads``: the id sets (allowed masks) whose output heads are built now rather than at first use;
        ``prefix_cache``: voice blocks whose keys and values are kept for reuse (SlotDecoder)."""
        self.slots = slots
        # torch's thread count for the loop's thread, taken here: a new thread otherwise takes whatever count the
        # last thread to set one chose when it first runs a parallel op (the engine's helpers set theirs to 1)
        self.threads = torch.get_num_threads()
        self.decoder = SlotDecoder(lm, slots, max_seq_len, prefix_cache=prefix_cache)
        self.decoder.prepare_heads(heads)
        self._inbox: queue.Queue[tuple[str, Any]] = queue.Queue()
        self._waiting: deque[_Job] = deque()
        self._active: list[_Job] = []
        self._thread: threading.Thread | None = None
        self._running = False
        self._here = threading.Event()  # set when a run_here() loop has returned

    def check_fits(self, request: GenerationRequest) -> None:
        self.decoder.check_fits(request)

    @property
    def running(self) -> int:
        return len(self._active)

    def start(self) -> None:
        if not self._running:
            self._running = True
            self._thread = threading.Thread(target=self._run, name="gpa-decode", daemon=True)
            self._thread.start()

    def run_here(self, on_ready: Callable[[], None] | None = None) -> None:
        """Run the decode loop on the calling thread (faster CPU kernels on the main thread)."""
        if self._running:
            raise EngineError("the engine is already running")
        self._running = True
        self._here.clear()
        try:
            if on_ready is not None:
                on_ready()
            self._run()
        finally:
            self._here.set()

    def shutdown(self) -> None:
        if self._running:
            self._inbox.put(("stop", None))
            if self._thread is not None:
                self._thread.join()
                self._thread = None
            else:
                self._here.wait()
            self._running = False

    def submit(self, request: GenerationRequest, sink: TokenSink) -> object:
        job = _Job(request, sink)
        self._inbox.put(("add", job))
        return job

    def cancel(self, handle: object) -> None:
        self._inbox.put(("cancel", handle))

    # --- the decode loop (its own thread, or the caller's in run_here) ------------------------------

    def _run(self) -> None:
        torch.set_num_threads(self.threads)
        try:
            while self._drain(block=not self._active and not self._waiting):
                self._admit()
                if self._active:
                    self.decoder.step([job.state for job in self._active])
                    for job in list(self._active):
                        self._deliver(job)
        except BaseException as e:  # noqa: BLE001 - every request must hear about a dead loop
            logger.exception("decode loop failed")
            self._fail_all(EngineError(f"decode loop failed: {e}"))
            return
        self._fail_all(EngineError("the engine was shut down"))

    def _drain(self, block: bool) -> bool:
        """Apply queued commands; False when asked to stop."""
        while True:
            try:
                cmd, job = self._inbox.get(block=block)
            except queue.Empty:
                return True
            block = False
            if cmd == "stop":
                return False
            if cmd == "add":
                self._waiting.append(job)
            elif cmd == "cancel":
                self._cancel(job)

    def _admit(self) -> None:
        while self._waiting and self.decoder.free:
            job = self._waiting.popleft()
            try:
                job.state = self.decoder.prefill(job.request)
            except ValueError as e:
                job.sink.fail(e)
                continue
            self._active.append(job)
            self._deliver(job)

    def _deliver(self, job: _Job) -> None:
        """Hand the newest token of ``job`` to its sink; release its slot when it is done."""
        state = job.state
        token = state.output[-1]
        reason: FinishReason | None = None
        if state.finished:
            reason = "stop" if token in job.request.stop else "length"
            self._release(job)
        job.sink.tokens([token], reason)

    def _cancel(self, job: _Job) -> None:
        if job in self._waiting:
            self._waiting.remove(job)
        elif job in self._active:
            self._release(job)

    def _release(self, job: _Job) -> None:
        self._active.remove(job)
        self.decoder.release(job.state)

    def _fail_all(self, error: EngineError) -> None:
        for job in [*self._active, *self._waiting]:
            job.sink.fail(error)
        self._active.clear()
        self._waiting.clear()
