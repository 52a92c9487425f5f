"""A static KV cache indexed by absolute position, one slot per batch row (gpt-fast + per-row positions)."""

from __future__ import annotations

import torch
from torch import Tensor


class KVCache:
    """Preallocated keys/values for every layer: (layers, B, KV heads, max_seq_len, head_dim).

    Each row writes at its own positions, so rows of different lengths share one batch; a row's
    stale entries beyond its current position are masked out by position, so a finished row can be
    reused for a new request without clearing.
    """

    def __init__(self, layers: int, batch: int, kv_heads: int, max_seq_len: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> None:
        shape = (layers, batch, kv_heads, max_seq_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.max_seq_len = max_seq_len
        self.batch = batch

    def update(self, layer: int, positions: Tensor, k: Tensor, v: Tensor,
               rows: Tensor | slice | None = None, kv_len: int | None = None) -> tuple[Tensor, Tensor]:
        """Write k, v (B, KV, T, D) at ``positions`` (B, T) of cache ``rows``.

        Args:
            rows: the cache slots of the B rows: None for all slots in order, a slice (a view, no
                copy), or a (B,) int64 tensor of slot indices (gathered: a copy).
            kv_len: how many leading positions to return (default all); only those are copied.

        Returns:
            keys and values of those rows over positions [0, kv_len), each (B, KV, kv_len, D).
        """
        kc, vc = self.k[layer], self.v[layer]
        if isinstance(rows, slice):
            kc, vc, rows = kc[rows], vc[rows], None
        idx = torch.arange(k.shape[0], device=k.device) if rows is None else rows
        # Advanced indexing on (row, :, pos) puts the indexed dims first: the target is (B, T, KV, D).
        kc[idx[:, None], :, positions] = k.transpose(1, 2).to(kc.dtype)
        vc[idx[:, None], :, positions] = v.transpose(1, 2).to(vc.dtype)
        kc, vc = kc[:, :, :kv_len], vc[:, :, :kv_len]
        if rows is None:
            return kc, vc
        return kc.index_select(0, rows), vc.index_select(0, rows)

    def write_read(self, layer: int, positions: Tensor, k: Tensor, v: Tensor, rows: Tensor | slice | None,
                   kv_len: int, row_index: Tensor) -> tuple[Tensor, Tensor]:
        """Like :meth:`update` for k, v laid out (B, T, KV, D), with the write index given.

        Args:
            row_index: (B, 1) int64: ``rows`` as a tensor, or 0..B-1 when ``rows`` is None or a slice.

        Returns:
            keys and values of those rows over positions [0, kv_len), each (B, KV, kv_len, D); a
            view of the cache unless ``rows`` is a tensor.
        """
        kc, vc = self.k[layer], self.v[layer]
        if isinstance(rows, slice):
            kc, vc = kc[rows], vc[rows]
        if k.dtype != kc.dtype:
            k, v = k.to(kc.dtype), v.to(vc.dtype)
        # Advanced indexing on (row, :, pos) puts the indexed dims first: the target is (B, T, KV, D).
        kc[row_index, :, positions] = k
        vc[row_index, :, positions] = v
        kc, vc = kc[:, :, :kv_len], vc[:, :, :kv_len]
        if isinstance(rows, Tensor):
            return kc.index_select(0, rows), vc.index_select(0, rows)
        return kc, vc
