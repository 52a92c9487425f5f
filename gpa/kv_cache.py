"""A static KV cache indexed by absolute position, one slot per batch row (gpt-fast + per-row positions)."""

from __future__ import annotations

import torch
from torch import Tensor

from gpa import native

INT8_READ_DTYPE = torch.bfloat16  # what an int8 cache's entries are read back as (torch's attention path)
KV_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "int8": torch.int8}  # KV_CACHE_DTYPES but "auto"


def quantize_rows(x: Tensor) -> tuple[Tensor, Tensor]:
    """x (..., D) -> int8 codes (..., D) and float32 scales (...): code = round(x / scale), scale = max |x| / 127.

    The rule gpa.native's decode kernel applies to the rows it writes (one scale per position and head); its
    ``quantize_rows`` computes the same in one pass where loaded (CPU; ~10x faster than these torch ops).
    """
    ops = native.loaded()
    if ops is not None and x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16) and x.shape[-1]:
        codes, scale = ops.quantize_rows(x)  # a list from C++
        return codes, scale
    x = x.float()
    scale = x.abs().amax(-1) / 127
    codes = torch.where(scale[..., None] > 0, x / scale[..., None], 0.0).round_().clamp_(-127, 127)
    return codes.to(torch.int8), scale


def dequantize_rows(codes: Tensor, scale: Tensor, dtype: torch.dtype = INT8_READ_DTYPE) -> Tensor:
    """The inverse of :func:`quantize_rows` (up to its rounding): codes * scale, in ``dtype`` (gpa.native's
    ``dequantize_rows`` where loaded, for bfloat16 from a cache view (B, KV, S, D): the same numbers, one pass)."""
    ops = native.loaded()
    if (ops is not None and dtype == torch.bfloat16 and codes.device.type == "cpu" and codes.dim() == 4
            and codes.stride(-1) == 1):
        return ops.dequantize_rows(codes, scale)
    return (codes.float() * scale[..., None]).to(dtype)


class KVCache:
    """Preallocated keys/values for every layer: (layers, B, KV heads, max_seq_len, head_dim).

    Each row writes at its own positions, so rows of different lengths share one batch; a row's
    stale entries beyond its current position are masked out by position, so a finished row can be
    reused for a new request without clearing.

    ``dtype=torch.int8`` stores each position's key and value per head as int8 codes with one float32
    scale (``k_scale``, ``v_scale``: (layers, B, KV heads, max_seq_len)), 132 bytes per 128 values
    instead of 256 in bfloat16: half the bytes a decode step reads. Reads dequantize to bfloat16.
    """

    def __init__(self, layers: int, batch: int, kv_heads: int, max_seq_len: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> None:
        shape = (layers, batch, kv_heads, max_seq_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.k_scale: Tensor | None = None
        self.v_scale: Tensor | None = None
        if dtype == torch.int8:
            self.k_scale = torch.zeros(shape[:-1], dtype=torch.float32, device=device)
            self.v_scale = torch.zeros(shape[:-1], dtype=torch.float32, device=device)
        elif dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"KV cache dtype {dtype} is not supported; expected float32, bfloat16, float16 or int8")
        self.max_seq_len = max_seq_len
        self.batch = batch

    @property
    def quantized(self) -> bool:
        return self.k_scale is not None

    def tensors(self) -> list[Tensor]:
        """Every stored tensor, slot on dim 1 and position on dim 3 (keys, values, and an int8 cache's scales)."""
        return [self.k, self.v] + ([self.k_scale, self.v_scale] if self.quantized else [])

    def write_read(self, layer: int, positions: Tensor, k: Tensor, v: Tensor, rows: Tensor | slice | None,
                   kv_len: int, row_index: Tensor) -> tuple[Tensor, Tensor]:
        """Write k, v (B, T, KV, D) at ``positions`` (B, T) of cache ``rows`` and read back positions [0, kv_len).

        Args:
            rows: the cache slots of the B rows: None for all slots in order, a slice (a view, no
                copy), or a (B,) int64 tensor of slot indices (gathered: a copy).
            row_index: (B, 1) int64: ``rows`` as a tensor, or 0..B-1 when ``rows`` is None or a slice.

        Returns:
            keys and values of those rows over positions [0, kv_len), each (B, KV, kv_len, D); a
            view of the cache unless ``rows`` is a tensor or the cache is int8 (then dequantized to bfloat16).
        """
        stored = [t[layer] for t in self.tensors()]
        if isinstance(rows, slice):
            stored = [t[rows] for t in stored]
        if self.quantized:
            (k, k_scale), (v, v_scale) = quantize_rows(k), quantize_rows(v)
            new = [k, v, k_scale, v_scale]
        else:
            new = [k.to(stored[0].dtype), v.to(stored[1].dtype)]
        for target, value in zip(stored, new, strict=True):
            # Advanced indexing on (row, :, pos) puts the indexed dims first: the target is (B, T, KV[, D]).
            target[row_index, :, positions] = value
        stored = [t[:, :, :kv_len] for t in stored]
        if isinstance(rows, Tensor):
            stored = [t.index_select(0, rows) for t in stored]
        if self.quantized:
            return dequantize_rows(stored[0], stored[2]), dequantize_rows(stored[1], stored[3])
        return stored[0], stored[1]
