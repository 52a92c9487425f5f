"""Pure next-token selection: repetition penalty, temperature, top-k, top-p, seeded sampling.

The order matches Hugging Face ``generate`` (penalty, then temperature, top-k, top-p), which is what
the authors' offline inference ran.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from gpa.config import SamplingParams


def repetition_penalty(logits: Tensor, seen: Tensor, penalty: float) -> None:
    """Penalise tokens already seen (prompt or output), in place.

    Args:
        logits: (V,) float, one row.
        seen: (S,) int64 ids that occurred (each once); only these entries are touched.
        penalty: 1 leaves the row unchanged.

    Positive logits are divided by the penalty, negative ones multiplied (HF's rule).
    """
    if penalty == 1.0 or seen.numel() == 0:
        return
    values = logits[seen]
    logits[seen] = torch.where(values > 0, values / penalty, values * penalty)


def top_k_filter(logits: Tensor, k: int) -> Tensor:
    """Keep the k largest logits of each row of (B, V); the rest become -inf."""
    if k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: Tensor, p: float) -> Tensor:
    """Keep the smallest set of most likely tokens whose probability reaches ``p`` (always >= 1)."""
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
    probs = sorted_logits.softmax(-1)
    mass_before = probs.cumsum(-1) - probs  # probability of strictly more likely tokens
    drop_sorted = mass_before >= p
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def sample_next(
    logits: Tensor, params: Sequence[SamplingParams], generators: Sequence[torch.Generator | None]
) -> Tensor:
    """Choose one token per row.

    Args:
        logits: (B, V) float, already masked and penalised.
        params: one SamplingParams per row (temperature 0 -> argmax).
        generators: one RNG per row (None -> torch's global RNG).

    Returns:
        (B,) int64 token ids.
    """
    out = torch.empty(logits.shape[0], dtype=torch.long, device=logits.device)
    for b, (row, sp, gen) in enumerate(zip(logits, params, generators, strict=True)):
        if sp.temperature == 0:
            out[b] = row.argmax()
            continue
        # Sample among the finite logits only: a task's constraint leaves a few thousand of the
        # 180k ids, and drawing over the full vocabulary would cost more than the step's matmuls.
        candidates = torch.nonzero(row > float("-inf")).flatten()
        sub = row[candidates][None] / sp.temperature
        if sp.top_k is not None and sp.top_k < sub.shape[-1]:
            # Keep only top_k_filter's survivors: top-p then sorts and the draw runs over k values, not the
            # task's thousands (8193 for TTS).
            keep = torch.nonzero(top_k_filter(sub, sp.top_k)[0] > float("-inf")).flatten()
            candidates, sub = candidates[keep], sub[:, keep]
        sub = top_p_filter(sub, sp.top_p)
        probs = sub.float().softmax(-1)
        out[b] = candidates[torch.multinomial(probs, 1, generator=gen)[0, 0]]
    return out
