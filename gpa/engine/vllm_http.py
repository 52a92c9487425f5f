"""The vLLM HTTP backend: GPA's LLM in a separate OpenAI-compatible ``vllm serve``, reached over HTTP.

Requests go to ``POST /v1/completions`` with the prompt as a list of token ids and
``return_token_ids``; the streamed chunks' ``token_ids`` are read, never their text. The task
constraints travel as in the in-process backend (``allowed_token_ids``, ``stop_token_ids``,
``vllm_xargs`` for gpa's logits processor, which the server must load: see docs/vllm.md). Needs
only httpx here; vLLM runs wherever the server is.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from typing import Any

import httpx

from gpa.engine.vllm_common import LoopBackend, _Job, vllm_fields

logger = logging.getLogger(__name__)


class VLLMHTTPBackend(LoopBackend):
    """Token ids from an OpenAI-compatible vLLM server at ``url`` (e.g. http://127.0.0.1:8100)."""

    name = "vllm-http"

    def __init__(self, vocab_size: int, url: str, slots: int, max_seq_len: int, api_key: str | None = None,
                 served_model: str | None = None) -> None:
        super().__init__(vocab_size, slots, max_seq_len)
        self.url = url.rstrip("/")
        self.served_model = served_model
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._client: httpx.AsyncClient | None = None

    async def _open(self) -> None:
        self._client = httpx.AsyncClient(base_url=self.url, headers=self._headers,
                                         timeout=httpx.Timeout(None, connect=10.0),
                                         limits=httpx.Limits(max_connections=None, max_keepalive_connections=64))
        try:
            r = await self._client.get("/v1/models")
            r.raise_for_status()
            models = r.json()["data"]
        except (httpx.HTTPError, KeyError, ValueError) as e:
            await self._client.aclose()
            raise ConnectionError(f"no OpenAI-compatible vLLM server answers at {self.url}/v1/models: {e}") from e
        served = {m["id"]: m for m in models}
        self.served_model = self.served_model or next(iter(served), None)
        if self.served_model not in served:
            await self._client.aclose()
            raise ValueError(f"{self.url} serves {sorted(served)}, not {self.served_model!r}")
        limit = served[self.served_model].get("max_model_len")
        if limit is not None and limit < self.max_seq_len:
            logger.warning("the vLLM server's max_model_len %d is below max_seq_len %d; requests are limited to it",
                           limit, self.max_seq_len)
            self.max_seq_len = limit
        logger.info("vLLM HTTP backend: %s at %s", self.served_model, self.url)

    async def _close(self) -> None:
        await self._client.aclose()
        self._client = None

    def body(self, job: _Job) -> dict[str, Any]:
        """The /v1/completions request for ``job``: token ids in, token ids out."""
        fields = vllm_fields(job.request, self._allowed)
        fields["vllm_xargs"] = fields.pop("extra_args")
        body = {"model": self.served_model, "prompt": list(job.request.prompt), "stream": True,
                "return_token_ids": True, "request_id": job.request_id, **fields}
        return {k: v for k, v in body.items() if v is not None}

    async def _stream(self, job: _Job) -> AsyncIterator[tuple[list[int], str | None]]:
        async with self._client.stream("POST", "/v1/completions", json=self.body(job)) as r:
            if r.status_code != 200:
                detail = (await r.aread()).decode(errors="replace")
                if 400 <= r.status_code < 500:
                    raise ValueError(f"the vLLM server refused the request ({r.status_code}): {detail}")
                raise ConnectionError(f"the vLLM server failed ({r.status_code}): {detail}")
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[len("data: "):]
                if data == "[DONE]":
                    return
                chunk = json.loads(data)
                if "error" in chunk:
                    raise ConnectionError(f"the vLLM server failed mid-stream: {chunk['error']}")
                choice = chunk["choices"][0]
                yield list(choice.get("token_ids") or []), choice.get("finish_reason")
