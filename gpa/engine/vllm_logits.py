"""gpa's :class:`~gpa.logits.SuppressAtStart` as a vLLM (v1) logits processor.

vLLM's own constraints cover the rest of a task's filters (``allowed_token_ids``,
``stop_token_ids``); its ``min_tokens`` would also hold back every stop id, which is not the same
rule (ASR may end its text with ``<|end_content|>`` at once, only ``<|im_end|>`` is held back).
A request opts in with ``SamplingParams.extra_args[SUPPRESS_KEY] = [{"ids": [...], "steps": n}]``.
Loaded by vLLM by name, so an OpenAI-compatible vLLM server can use it too:
``vllm serve DIR --logits-processors gpa.engine.vllm_logits:SuppressAtStartProcessor``.
"""

from __future__ import annotations

from typing import Any

import torch
from vllm import SamplingParams
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor
from vllm.v1.sample.logits_processor.builtin import process_dict_updates

SUPPRESS_KEY = "gpa_suppress_at_start"

# ([(ids forbidden, for how many first tokens), ...], the request's live output list)
_Row = tuple[list[tuple[list[int], int]], list[int]]


class SuppressAtStartProcessor(LogitsProcessor):
    """Some ids are -inf while a request has generated fewer than ``steps`` tokens."""

    def __init__(self, vllm_config: Any, device: torch.device, is_pin_memory: bool) -> None:
        self._rows: dict[int, _Row] = {}  # batch index -> its rule

    @classmethod
    def validate_params(cls, sampling_params: SamplingParams) -> None:
        for rule in (sampling_params.extra_args or {}).get(SUPPRESS_KEY, []):
            if not isinstance(rule, dict) or set(rule) != {"ids", "steps"}:
                raise ValueError(f"{SUPPRESS_KEY} takes a list of {{'ids': [...], 'steps': n}}, got {rule!r}")

    def is_argmax_invariant(self) -> bool:
        return False  # it changes which token is most likely

    @staticmethod
    def _new_row(params: SamplingParams, _prompt: list[int] | None, output: list[int]) -> _Row | None:
        rules = (params.extra_args or {}).get(SUPPRESS_KEY)
        if not rules:
            return None
        return [([int(i) for i in rule["ids"]], int(rule["steps"])) for rule in rules], output

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        process_dict_updates(self._rows, batch_update, self._new_row)
        for index in [i for i, (rules, output) in self._rows.items() if len(output) >= max(s for _, s in rules)]:
            del self._rows[index]

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """(B, V) logits; the rows still inside their first ``steps`` tokens lose their ids."""
        for index, (rules, output) in self._rows.items():
            for ids, steps in rules:
                if len(output) < steps:
                    logits[index, ids] = float("-inf")
        return logits
