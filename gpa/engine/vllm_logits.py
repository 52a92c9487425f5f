"""gpa's :class:`~gpa.logits.SuppressAtStart` as a vLLM (v1) logits processor.

vLLM's own constraints cover the rest of a task's filters (``allowed_token_ids``,
``stop_token_ids``); its ``min_tokens`` would also hold back every stop id, which is not the same
rule (ASR may end its text with ``<|end_content|>`` at once, only ``<|im_end|>`` is held back).
A request opts in with ``SamplingParams.extra_args = {SUPPRESS_IDS: [...], SUPPRESS_STEPS: n}``
(flat, so an OpenAI-compatible vLLM server takes the same thing as ``vllm_xargs``). Loaded by vLLM
by name: ``vllm serve DIR --logits-processors gpa.engine.vllm_logits:SuppressAtStartProcessor``.
"""

from __future__ import annotations

from typing import Any

import torch
from vllm import SamplingParams
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor
from vllm.v1.sample.logits_processor.builtin import process_dict_updates

from gpa.engine.vllm_common import SUPPRESS_IDS, SUPPRESS_STEPS

# (ids forbidden, for how many first tokens, the request's live output list)
_Row = tuple[list[int], int, list[int]]


class SuppressAtStartProcessor(LogitsProcessor):
    """Some ids are -inf while a request has generated fewer than ``steps`` tokens."""

    def __init__(self, vllm_config: Any, device: torch.device, is_pin_memory: bool) -> None:
        self._rows: dict[int, _Row] = {}  # batch index -> its rule

    @classmethod
    def validate_params(cls, sampling_params: SamplingParams) -> None:
        args = sampling_params.extra_args or {}
        ids, steps = args.get(SUPPRESS_IDS), args.get(SUPPRESS_STEPS, 1)
        if ids is not None and not (isinstance(ids, list) and all(isinstance(i, int) for i in ids)):
            raise ValueError(f"{SUPPRESS_IDS} must be a list of token ids, got {ids!r}")
        if not isinstance(steps, int) or steps < 0:
            raise ValueError(f"{SUPPRESS_STEPS} must be an integer >= 0, got {steps!r}")

    def is_argmax_invariant(self) -> bool:
        return False  # it changes which token is most likely

    @staticmethod
    def _new_row(params: SamplingParams, _prompt: list[int] | None, output: list[int]) -> _Row | None:
        args = params.extra_args or {}
        ids, steps = args.get(SUPPRESS_IDS), int(args.get(SUPPRESS_STEPS, 1))
        if not ids or len(output) >= steps:
            return None
        return [int(i) for i in ids], steps, output

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        process_dict_updates(self._rows, batch_update, self._new_row)
        for index in [i for i, (_, steps, output) in self._rows.items() if len(output) >= steps]:
            del self._rows[index]

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """(B, V) logits; the rows still inside their first ``steps`` tokens lose their ids."""
        for index, (ids, steps, output) in self._rows.items():
            if len(output) < steps:
                logits[index, ids] = float("-inf")
        return logits
