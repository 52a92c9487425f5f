"""GPA's language model: a stock Qwen3 decoder (RMSNorm, RoPE, GQA with QK-norm, SwiGLU), gpt-fast style.

Weight names follow the Hugging Face checkpoint (``model.layers.N.self_attn.q_proj.weight`` ...) so the
official ``model.safetensors`` loads without a rename table.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gpa.config import ModelConfig
from gpa.kv_cache import KVCache


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        # Normalise in fp32 (as the HF reference does), then scale in the model dtype.
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def rope_tables(positions: Tensor, head_dim: int, theta: float) -> tuple[Tensor, Tensor]:
    """cos/sin for rotary embeddings at integer ``positions`` (B, T) -> two (B, T, head_dim) fp32."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=positions.device) / head_dim)
    angles = positions.float()[..., None] * inv_freq  # (B, T, D/2)
    angles = torch.cat([angles, angles], dim=-1)  # (B, T, D): the two halves share frequencies
    return angles.cos(), angles.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate (B, H, T, D) by the half-split convention (x1, x2) -> (x1 c - x2 s, x2 c + x1 s)."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x * cos[:, None] + rotated * sin[:, None]).to(x.dtype)


@dataclass(frozen=True)
class CacheView:
    """What one layer needs to read and write the KV cache in this forward pass."""

    kv: KVCache
    layer: int
    positions: Tensor  # (B, T) where the new keys go
    rows: Tensor | slice | None  # cache slots of the batch rows
    kv_len: int  # keys [0, kv_len) are attended to


def attend(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | bool) -> Tensor:
    """Grouped-query attention of q (B, H, T, D) over k, v (B, KV, S, D) -> (B, H, T, D).

    ``mask``: True for causal, False for none, or a (B, 1, T, S) bool tensor of allowed keys.
    torch's fused CPU kernel is fast in float32 but several times slower than two plain matmuls
    in bfloat16, so reduced precision takes the explicit path (softmax in float32).
    """
    if q.dtype == torch.float32 or q.device.type != "cpu":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=None if isinstance(mask, bool) else mask,
                                              is_causal=mask is True, enable_gqa=k.shape[1] != q.shape[1])
    B, H, T, D = q.shape
    KV, S = k.shape[1], k.shape[2]
    qg = q.view(B, KV, H // KV, T, D)  # heads sharing a K/V head sit together
    scores = torch.matmul(qg, k[:, :, None].transpose(-1, -2)).float() * D**-0.5  # (B, KV, G, T, S)
    if mask is True:
        mask = torch.ones(1, 1, T, S, dtype=torch.bool, device=q.device).tril(S - T)
    if not isinstance(mask, bool):
        scores = scores.masked_fill(~mask.view(mask.shape[0], 1, 1, T, S), float("-inf"))
    y = torch.matmul(scores.softmax(-1).to(q.dtype), v[:, :, None])  # (B, KV, G, T, D)
    return y.view(B, H, T, D)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        bias = cfg.attention_bias
        self.q_proj = nn.Linear(cfg.hidden_size, self.n_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, cfg.hidden_size, bias=bias)
        self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor], mask: Tensor | bool, cache: CacheView | None) -> Tensor:
        B, T, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(B, T, self.n_heads, self.head_dim)).transpose(1, 2)  # (B, H, T, D)
        k = self.k_norm(self.k_proj(x).view(B, T, self.n_kv, self.head_dim)).transpose(1, 2)  # (B, KV, T, D)
        v = self.v_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)  # (B, KV, T, D)
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if cache is not None:
            # Keys up to the furthest position any row has reached: (B, KV, S, D).
            k, v = cache.kv.update(cache.layer, cache.positions, k, v, cache.rows, cache.kv_len)
        y = attend(q, k, v, mask)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor], mask: Tensor | bool, cache: CacheView | None) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), rope, mask, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class Decoder(nn.Module):
    """The ``model.*`` trunk of the HF checkpoint."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class GPALM(nn.Module):
    """Qwen3ForCausalLM-compatible language model."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.weight_quant = "none"  # "int8" after gpa.quant.quantize_int8 (set by the loader)
        self.model = Decoder(cfg)
        self.lm_head = None if cfg.tie_word_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    def head_weight(self) -> Tensor:
        return self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    def forward(
        self,
        ids: Tensor,
        positions: Tensor | None = None,
        cache: KVCache | None = None,
        padding_mask: Tensor | None = None,
        last_only: bool = False,
        cache_rows: Tensor | slice | None = None,
        hidden_only: bool = False,
    ) -> Tensor:
        """Logits for ``ids``.

        Args:
            ids: (B, T) int64 token ids.
            positions: (B, T) int64 absolute positions; defaults to 0..T-1 for every row.
            cache: if given, K/V of these tokens are written at ``positions`` and attention covers
                every cached position <= the query's (so rows may sit at different lengths).
            padding_mask: (B, T) bool, False for padding tokens (uncached calls only); padding is
                never attended to.
            last_only: return only the last position's logits, (B, 1, V).
            cache_rows: the cache slots of the rows of ``ids``: (B,) int64, a slice, or None for slot b = row b.
            hidden_only: return the final-norm hidden states (B, T, C) instead, for a caller that
                applies the output head to only some vocabulary rows.

        Returns:
            (B, T, V) float logits (fp32).
        """
        B, T = ids.shape
        if positions is None:
            positions = torch.arange(T, device=ids.device).expand(B, T)
        mask = self._mask(positions, cache, padding_mask)
        kv_len = int(positions.max()) + 1 if cache is not None else 0
        rope = rope_tables(positions, self.config.head_dim, self.config.rope_theta)
        x = self.model.embed_tokens(ids)  # (B, T, C)
        for i, layer in enumerate(self.model.layers):
            view = None if cache is None else CacheView(cache, i, positions, cache_rows, kv_len)
            x = layer(x, rope, mask, view)
        if last_only:
            x = x[:, -1:]
        x = self.model.norm(x)
        return x if hidden_only else F.linear(x, self.head_weight()).float()

    @staticmethod
    def _mask(positions: Tensor, cache: KVCache | None, padding_mask: Tensor | None) -> Tensor | bool:
        """(B, 1, T, S) bool: a query at position p sees keys at positions <= p (and not padding).

        With a cache, S is the highest position in the batch + 1: later entries are stale or empty.
        Two common cases need no mask tensor: ``True`` means plain causal attention over the T
        tokens (an unpadded batch, or one row prefilled from position 0); ``False`` means attend
        to every key (one query, one row, at the last position).
        """
        B, T = positions.shape
        if padding_mask is None and (cache is None or (B == 1 and int(positions[0, 0]) == 0)):
            return True
        if cache is not None and B == 1 and T == 1:
            return False
        if cache is None:
            key_pos = positions  # (B, S=T)
        else:
            if padding_mask is not None:
                raise ValueError("padding_mask is for uncached forward passes only")
            kv_len = int(positions.max()) + 1
            if kv_len > cache.max_seq_len:
                raise ValueError(f"position {kv_len - 1} is beyond the KV cache's {cache.max_seq_len}")
            key_pos = torch.arange(kv_len, device=positions.device).expand(positions.shape[0], -1)
        mask = key_pos[:, None, :] <= positions[:, :, None]  # (B, T, S)
        if padding_mask is not None:
            mask = mask & padding_mask[:, None, :]
        return mask[:, None]
