"""Autoregressive generation with a static KV cache: prefill each prompt, then decode all rows together."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from gpa.config import SamplingParams
from gpa.kv_cache import KVCache
from gpa.logits import LogitFilter
from gpa.model import GPALM
from gpa.sampling import repetition_penalty, sample_next


@dataclass
class GenerationRequest:
    """One sequence to continue."""

    prompt: list[int]  # vocabulary ids
    params: SamplingParams
    filters: list[LogitFilter] = field(default_factory=list)  # output constraints
    stop: frozenset[int] = frozenset()  # ids that end the sequence (kept in the output)


@dataclass(frozen=True)
class TokenEvent:
    """Row ``row`` produced ``token``; ``finished`` when it was a stop token or the length limit."""

    row: int
    token: int
    finished: bool


def _generator(seed: int | None, device: torch.device) -> torch.Generator | None:
    if seed is None:
        return None
    return torch.Generator(device=device).manual_seed(seed)


class _Rows:
    """Per-row decoding state for a batch of requests."""

    def __init__(self, requests: Sequence[GenerationRequest], vocab_size: int, device: torch.device) -> None:
        self.requests = requests
        self.generators = [_generator(r.params.seed, device) for r in requests]
        self.seen = torch.zeros(len(requests), vocab_size, dtype=torch.bool, device=device)
        for b, r in enumerate(requests):
            self.seen[b, torch.tensor(r.prompt, device=device)] = True
        self.penalty = torch.tensor([r.params.repetition_penalty for r in requests], device=device)
        self.lengths = [len(r.prompt) for r in requests]
        self.generated = [0] * len(requests)

    def choose(self, rows: list[int], logits: Tensor) -> Tensor:
        """Constrain, penalise and sample (n, V) logits of ``rows`` -> (n,) token ids."""
        for i, b in enumerate(rows):
            for f in self.requests[b].filters:
                f.apply(logits[i : i + 1], self.generated[b])
        idx = torch.tensor(rows, device=logits.device)
        logits = repetition_penalty(logits, self.seen[idx], self.penalty[idx])
        params = [self.requests[b].params for b in rows]
        return sample_next(logits, params, [self.generators[b] for b in rows])

    def record(self, b: int, token: int) -> bool:
        """Account for ``token`` in row ``b``; True if the row is finished."""
        self.seen[b, token] = True
        self.generated[b] += 1
        self.lengths[b] += 1
        r = self.requests[b]
        return token in r.stop or self.generated[b] >= r.params.max_new_tokens


@torch.inference_mode()
def iter_generate(model: GPALM, requests: Sequence[GenerationRequest], max_seq_len: int | None = None
                  ) -> Iterator[TokenEvent]:
    """Generate for every request, yielding each token as soon as it is chosen.

    Rows are prefilled one at a time (so no padding ever enters attention) and then decoded as
    one batch; each row keeps its own position, sampling options and RNG.
    """
    if not requests:
        return
    for r in requests:
        if not r.prompt:
            raise ValueError("empty prompt")
    device = model.head_weight().device
    cfg = model.config
    needed = max(len(r.prompt) + r.params.max_new_tokens for r in requests)
    max_seq_len = max_seq_len or needed
    if needed > max_seq_len:
        raise ValueError(f"prompt plus max_new_tokens needs {needed} positions, more than {max_seq_len}")
    cache = KVCache(cfg.num_hidden_layers, len(requests), cfg.num_key_value_heads, max_seq_len, cfg.head_dim,
                    dtype=model.head_weight().dtype, device=device)
    state = _Rows(requests, cfg.vocab_size, device)
    last = []
    for b, r in enumerate(requests):
        ids = torch.tensor([r.prompt], device=device)
        logits = model(ids, cache=cache, cache_rows=slice(b, b + 1), last_only=True)
        last.append(logits[0, -1])
    active = list(range(len(requests)))
    logits = torch.stack(last)  # (n, V)
    while active:
        tokens = state.choose(active, logits).tolist()
        still = []
        for b, token in zip(active, tokens, strict=True):
            done = state.record(b, token)
            yield TokenEvent(b, token, done)
            if not done:
                still.append((b, token))
        active = [b for b, _ in still]
        if not active:
            break
        ids = torch.tensor([[t] for _, t in still], device=device)  # (n, 1)
        positions = torch.tensor([[state.lengths[b] - 1] for b in active], device=device)
        rows = None if len(active) == len(requests) else torch.tensor(active, device=device)
        logits = model(ids, positions, cache=cache, cache_rows=rows)[:, -1]


def generate(model: GPALM, requests: Sequence[GenerationRequest], max_seq_len: int | None = None) -> list[list[int]]:
    """Generated ids per request (stop token included when one was produced)."""
    out: list[list[int]] = [[] for _ in requests]
    for event in iter_generate(model, requests, max_seq_len):
        out[event.row].append(event.token)
    return out
