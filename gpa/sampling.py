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

    Rows that sample with the same top-k run their filters as one batch (a TTS step's rows: ~0.5 ms per row
    alone, mostly per-op overhead); each row's draw is the one :func:`sample_row` makes, bit for bit.
    """
    out = torch.empty(logits.shape[0], dtype=torch.long, device=logits.device)
    single = []
    groups: dict[int, list[int]] = {}
    for b, sp in enumerate(params):
        if sp.temperature == 0:
            out[b] = logits[b].argmax()
        elif sp.top_k is not None and sp.top_k < logits.shape[-1]:
            groups.setdefault(sp.top_k, []).append(b)
        else:
            single.append(b)
    for k, rows in groups.items():
        single += _sample_top_k(logits, rows, k, params, generators, out)
    for b in single:
        out[b] = sample_row(logits[b], params[b], generators[b])
    return out


def sample_row(row: Tensor, sp: SamplingParams, generator: torch.Generator | None) -> int:
    """One row's draw (temperature > 0): among its finite logits, after temperature, top-k and top-p."""
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
    return int(candidates[torch.multinomial(probs, 1, generator=generator)[0, 0]])


def _sample_top_k(logits: Tensor, rows: list[int], k: int, params: Sequence[SamplingParams],
                  generators: Sequence[torch.Generator | None], out: Tensor) -> list[int]:
    """:func:`sample_row` for ``rows`` (all with top-k ``k``) as one batch, writing ``out``; returns the rows it
    leaves to sample_row: fewer than k finite logits, or a tie at the k-th value (more than k survivors).

    The same numbers in the same order as sample_row's: the k survivors in ascending id order (as its
    candidates are), the same division by the temperature, and each row's draw from its own (1, k) row.
    """
    index = torch.tensor(rows, device=logits.device)
    temperatures = [params[b].temperature for b in rows]
    if len(set(temperatures)) == 1:
        scaled = logits[index] / temperatures[0]
    else:
        scaled = torch.stack([logits[b] / t for b, t in zip(rows, temperatures, strict=True)])
    values, ids = torch.topk(scaled, k, dim=-1)
    kth = values[:, -1:]
    exact = (kth[:, 0] > float("-inf")) & ((scaled >= kth).sum(-1) == k)
    ids = ids.sort(-1).values  # ascending ids: sample_row's candidate order
    sub = scaled.gather(-1, ids)
    top_p = {params[b].top_p for b in rows}
    if len(top_p) == 1:
        sub = top_p_filter(sub, top_p.pop())
    else:
        sub = torch.cat([top_p_filter(sub[i : i + 1], params[b].top_p) for i, b in enumerate(rows)])
    probs = sub.float().softmax(-1)
    left = []
    for i, (b, ok) in enumerate(zip(rows, exact.tolist(), strict=True)):
        if not ok:
            left.append(b)
            continue
        out[b] = ids[i, torch.multinomial(probs[i : i + 1], 1, generator=generators[b])[0, 0]]
    return left
