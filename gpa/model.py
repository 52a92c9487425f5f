"""GPA's language model: a stock Qwen3 decoder (RMSNorm, RoPE, GQA with QK-norm, SwiGLU), gpt-fast style.

Weight names follow the Hugging Face checkpoint (``model.layers.N.self_attn.q_proj.weight`` ...) so the
official ``model.safetensors`` loads without a rename table.

Decoding one token on a CPU is bound by per-op overhead as much as by memory, so inference (no
autograd) runs a leaner path: :meth:`GPALM.fuse` concatenates the q/k/v and gate/up projections
into single matrices (the original parameters become views of them: no extra memory, the same
``state_dict``), both QK-norms run as one op, RoPE comes from a table indexed by position, and a
single-token step attends with two batched matmuls over the cache without copying it.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gpa import native
from gpa.config import ModelConfig
from gpa.kv_cache import KVCache
from gpa.quant import int8_products

_NO_SCALES = torch.empty(0)  # a dense linear's scales in GPALM.decode_native's lists


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype == self.weight.dtype:  # one fused op (computed in fp32 inside)
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        # Mixed dtypes (autocast): normalise in fp32 as the HF reference does, scale in x's dtype.
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


class RopeTable:
    """cos and sign-folded sin by position, so that rotating is ``x * cos + roll(x, D/2) * sin``.

    ``roll(x, D/2)`` is (x2, x1); with sin's first half negated that is rotate-half's (-x2, x1) * sin.
    The table grows in powers of two as positions demand and is kept per dtype and device.
    """

    def __init__(self, head_dim: int, theta: float) -> None:
        self.head_dim, self.theta = head_dim, theta
        self._tables: dict[tuple[torch.dtype, torch.device], tuple[Tensor, Tensor]] = {}

    def lookup(self, positions: Tensor, max_position: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """(B, T) positions (all <= ``max_position``) -> cos, sin each (B, T, 1, D) in ``dtype``."""
        cos, sin = self.table(max_position, dtype, positions.device)
        return cos[positions], sin[positions]

    def table(self, max_position: int, dtype: torch.dtype, device: torch.device) -> tuple[Tensor, Tensor]:
        """The whole cos and sign-folded sin tables, each (L, 1, D) with L > ``max_position``."""
        key = (dtype, device)
        table = self._tables.get(key)
        if table is None or table[0].shape[0] <= max_position:
            length = 1 << max(max_position, 255).bit_length()
            cos, sin = rope_tables(torch.arange(length, device=device)[None], self.head_dim, self.theta)
            half = self.head_dim // 2
            sin[..., :half] = -sin[..., :half]
            table = self._tables[key] = (cos[0, :, None].to(dtype), sin[0, :, None].to(dtype))  # (L, 1, D)
        return table


def rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate (B, T, heads, D) with a :class:`RopeTable` lookup (cos, sin: (B, T, 1, D))."""
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, -1), sin)


@dataclass(frozen=True)
class CacheView:
    """What one layer needs to read and write the KV cache in this forward pass."""

    kv: KVCache
    layer: int
    positions: Tensor  # (B, T) where the new keys go
    rows: Tensor | slice | None  # cache slots of the batch rows
    kv_len: int  # keys [0, kv_len) are attended to
    row_index: Tensor | None = None  # (B, 1) int64 slot of each row within ``rows``' view (write index)
    ops: ModuleType | None = None  # gpa.native's kernels when the model decodes through them (prefill attention)


def _causal(t: int, s: int, device: torch.device) -> Tensor:
    """(1, 1, T, S) bool: query i (the last T of S positions) may see keys 0 .. S - T + i."""
    return torch.ones(1, 1, t, s, dtype=torch.bool, device=device).tril(s - t)


def attend(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | bool) -> Tensor:
    """Grouped-query attention of q (B, H, T, D) over k, v (B, KV, S, D) -> (B, H, T, D).

    ``mask``: True for causal (the queries being the last T of the S positions), False for none, or a
    (B, 1, T, S) bool tensor of allowed keys.
    torch's fused CPU kernel is fast in float32 but several times slower than two plain matmuls
    in bfloat16, so reduced precision takes the explicit path (softmax in float32).
    """
    B, H, T, D = q.shape
    KV, S = k.shape[1], k.shape[2]
    if q.dtype == torch.float32 or q.device.type != "cpu":
        if mask is True and S != T:  # the queries are the last T of S positions (torch aligns is_causal top-left)
            mask = _causal(T, S, q.device)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=None if isinstance(mask, bool) else mask,
                                              is_causal=mask is True, enable_gqa=k.shape[1] != q.shape[1])
    qg = q.view(B, KV, H // KV, T, D)  # heads sharing a K/V head sit together
    scores = torch.matmul(qg, k[:, :, None].transpose(-1, -2)).float() * D**-0.5  # (B, KV, G, T, S)
    if mask is True:
        mask = _causal(T, S, q.device)
    if not isinstance(mask, bool):
        scores = scores.masked_fill(~mask.view(mask.shape[0], 1, 1, T, S), float("-inf"))
    y = torch.matmul(scores.softmax(-1).to(q.dtype), v[:, :, None])  # (B, KV, G, T, D)
    return y.view(B, H, T, D)


def attend_one(q: Tensor, k: Tensor, v: Tensor, bias: Tensor) -> Tensor:
    """Attention of one query per row: q (B, H, D) over k, v (B, KV, S, D) -> (B, H * D).

    ``bias``: (B * KV, S) additive mask (0 or -inf) in q's dtype. The G query heads sharing a K/V
    head form one small matmul per (row, K/V head), batched over B * KV. CPU kernels differ a lot on
    this shape (measured here): in float32, keys-times-queries over the strided cache view is the
    fast form; in bfloat16, copying the keys and values contiguous first and multiplying
    queries-times-keys is several times faster than any strided form.
    """
    B, H, D = q.shape
    KV, S = k.shape[1], k.shape[2]
    qg = q.reshape(B * KV, H // KV, D)
    if q.dtype == torch.float32:
        k3, v3 = k.reshape(B * KV, S, D), v.reshape(B * KV, S, D)  # views: (B, KV) fold into one stride
        scores = torch.baddbmm(bias[:, :, None], k3, qg.transpose(1, 2), alpha=D**-0.5)  # (B*KV, S, G)
        return torch.bmm(scores.softmax(1).transpose(1, 2), v3).view(B, H * D)
    k3, v3 = k.contiguous().view(B * KV, S, D), v.contiguous().view(B * KV, S, D)
    scores = torch.baddbmm(bias[:, None], qg, k3.transpose(1, 2), alpha=D**-0.5)  # (B*KV, G, S)
    probs = scores.float().softmax(-1).to(q.dtype)
    return torch.bmm(probs, v3).view(B, H * D)


@dataclass(frozen=True)
class Fused:
    """Inference-only concatenated projections of one layer (a plain object: not in ``state_dict``)."""

    proj: nn.Module  # computes the concatenated outputs
    norm: Tensor | None = None  # (H + KV, D): q_norm's weight per query head, then k_norm's per K/V head


def _fused_linear(parts: list[nn.Module]) -> nn.Module:
    """One module computing the concatenated outputs of ``parts``; their weights become views of its own."""
    first = parts[0]
    if isinstance(first, nn.Linear):
        assert all(p.bias is None for p in parts), "fusing needs bias-free projections"
        weight = torch.cat([p.weight.detach() for p in parts])
        fused = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device=weight.device, dtype=weight.dtype)
        fused.weight = nn.Parameter(weight, requires_grad=False)
        start = 0
        for p in parts:
            n = p.weight.shape[0]
            p.weight.data = weight[start : start + n]
            start += n
        return fused
    return type(first).fuse(parts)  # gpa.quant.Int8Linear or Int4Linear


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
        self.fused: Fused | None = None  # q/k/v in one projection

    def fuse(self) -> None:
        """Build the fused q/k/v projection (see :meth:`GPALM.fuse`)."""
        if self.fused is None and getattr(self.q_proj, "bias", None) is None:
            qk_norm = torch.cat([self.q_norm.weight.detach().expand(self.n_heads, -1),
                                 self.k_norm.weight.detach().expand(self.n_kv, -1)])
            self.fused = Fused(_fused_linear([self.q_proj, self.k_proj, self.v_proj]), qk_norm)

    def forward(self, x: Tensor, rope_cs: tuple[Tensor, Tensor], mask: Tensor | bool, cache: CacheView | None
                ) -> Tensor:
        B, T, _ = x.shape
        H, KV, D = self.n_heads, self.n_kv, self.head_dim
        if self.fused is not None and not torch.is_grad_enabled():
            qkv = self.fused.proj(x).view(B, T, H + 2 * KV, D)
            qk = F.rms_norm(qkv[:, :, : H + KV], (D,), None, self.q_norm.eps) * self.fused.norm
            qk = rope(qk, *rope_cs)  # (B, T, H + KV, D)
            q, k, v = qk[:, :, :H], qk[:, :, H:], qkv[:, :, H + KV :]
        else:
            q = self.q_norm(self.q_proj(x).view(B, T, H, D))  # (B, T, H, D)
            k = self.k_norm(self.k_proj(x).view(B, T, KV, D))  # (B, T, KV, D)
            v = self.v_proj(x).view(B, T, KV, D)
            q, k = rope(q, *rope_cs).to(q.dtype), rope(k, *rope_cs).to(k.dtype)
        if cache is None:
            y = attend(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), mask).transpose(1, 2)
            return self.o_proj(y.reshape(B, T, H * D))
        # Keys up to the furthest position any row has reached: (B, KV, S, D).
        k, v = cache.kv.write_read(cache.layer, cache.positions, k, v, cache.rows, cache.kv_len, cache.row_index)
        if T == 1 and isinstance(mask, Tensor) and mask.is_floating_point():
            if k.dtype != q.dtype:  # a cache kept in another dtype than the activations (bf16 or int8 beside fp32)
                k, v = k.to(q.dtype), v.to(q.dtype)
            return self.o_proj(attend_one(q.reshape(B, H, D), k, v, mask).view(B, 1, H * D))
        flash = getattr(cache.ops, "prefill_attention", None)  # None without the kernels or AVX512-BF16
        if flash is not None and mask is True and k.dtype == torch.bfloat16 and D in native.FLASH_HEAD_SIZES and (
                k.stride(-2) == v.stride(-2) == D):  # the kernel reads each row's positions D apart (a cache view)
            # a causal prefill over native decoding's cache (bf16, or int8 read back as bf16): gpa.native's flash
            # kernel (bf16 products, float32 softmax) instead of converting the keys for torch's float32 one
            return self.o_proj(flash(q, k, v).view(B, T, H * D))
        if k.dtype != q.dtype:  # a bfloat16 (or int8) cache under float32 activations (native decoding's cache)
            k, v = k.to(q.dtype), v.to(q.dtype)
        y = attend(q.transpose(1, 2), k, v, mask).transpose(1, 2)
        return self.o_proj(y.reshape(B, T, H * D))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)
        self.fused: Fused | None = None  # gate and up in one projection

    def fuse(self) -> None:
        """Build the fused gate/up projection (see :meth:`GPALM.fuse`)."""
        if self.fused is None:
            self.fused = Fused(_fused_linear([self.gate_proj, self.up_proj]))

    def forward(self, x: Tensor) -> Tensor:
        if self.fused is not None and not torch.is_grad_enabled():
            gate, up = self.fused.proj(x).chunk(2, dim=-1)
            return self.down_proj(F.silu(gate).mul_(up))
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: Tensor, rope_cs: tuple[Tensor, Tensor], mask: Tensor | bool, cache: CacheView | None
                ) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), rope_cs, mask, cache)
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
        self.weight_quant = "none"  # "int8" or "int4" after gpa.quant.quantize_weights (set by the loader)
        self.native_decode = False  # decode steps through gpa's C++ kernels (gpa.native; set by the loader)
        self.kv_cache_dtype = "auto"  # the decoders' KV cache storage (gpa.config.KV_CACHE_DTYPES; set by the loader)
        self.int8_prefill = False  # passes over several tokens per row multiply in int8 (gpa.quant.int8_products;
        # needs quantized layers built with int8_gemm: set by the loader)
        self.head_cache: dict[object, object] = {}  # output heads built for decoding (gpa.generation.SlotDecoder)
        self._native_args: tuple[list, ...] | None = None  # decode_native's per-layer lists (while fused)
        self.model = Decoder(cfg)
        self.lm_head = None if cfg.tie_word_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.rope = RopeTable(cfg.head_dim, cfg.rope_theta)

    def head_weight(self) -> Tensor:
        return self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    def fuse(self) -> GPALM:
        """Concatenate each layer's q/k/v and gate/up projections for inference (idempotent).

        The original weights become views of the fused matrices, so memory, ``state_dict`` and
        in-place updates are unchanged; the fused path runs only without autograd. Moving or casting
        the model (``.to``) drops the fused matrices; call again afterwards.
        """
        for layer in self.model.layers:
            layer.self_attn.fuse()
            layer.mlp.fuse()
        return self

    def unfuse(self) -> GPALM:
        """Go back to the separate projections (their weights stay views of the fused storage)."""
        for layer in self.model.layers:
            layer.self_attn.fused = None
            layer.mlp.fused = None
        self._native_args = None  # they hold the fused projections
        return self

    @property
    def is_fused(self) -> bool:
        """True once :meth:`fuse` has run (and no ``.to`` since)."""
        return all(layer.mlp.fused is not None for layer in self.model.layers)

    def _apply(self, fn, recurse=True):  # noqa: ANN001, ANN202 (nn.Module's signature)
        self.unfuse()  # fused matrices would keep the old device/dtype
        self.head_cache = {}  # and so would the heads built from the weights
        self.rope = RopeTable(self.config.head_dim, self.config.rope_theta)
        return super()._apply(fn, recurse)

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
        max_pos = int(positions.max())
        mask = self._mask(positions, cache, padding_mask, max_pos)
        x = self.model.embed_tokens(ids)  # (B, T, C)
        rope_cs = self.rope.lookup(positions, max_pos, x.dtype)
        views = [None] * len(self.model.layers)
        if cache is not None:
            row_index = torch.arange(B, device=ids.device)[:, None] if cache_rows is None or isinstance(
                cache_rows, slice) else cache_rows[:, None]
            ops = native.loaded() if self.native_decode else None
            views = [CacheView(cache, i, positions, cache_rows, max_pos + 1, row_index, ops)
                     for i in range(len(self.model.layers))]
        with int8_products(self.int8_prefill and T > 1):
            for layer, view in zip(self.model.layers, views, strict=True):
                x = layer(x, rope_cs, mask, view)
        if last_only:
            x = x[:, -1:]
        x = self.model.norm(x)
        return x if hidden_only else F.linear(x, self.head_weight()).float()

    def supports_native_decode(self) -> bool:
        """Whether :meth:`decode_native` can run: fused, bias-free projections (after :meth:`fuse`)."""
        return self.is_fused and all(layer.self_attn.fused is not None for layer in self.model.layers)

    def linear_input_dtype(self) -> torch.dtype:
        """The dtype the linear layers take: bfloat16 for int8/int4 weights, else the weights' own."""
        return torch.bfloat16 if self.weight_quant != "none" else self.model.norm.weight.dtype

    def decode_native(self, ops: ModuleType, ids: Tensor, positions: Tensor, slots: Tensor, cache: KVCache
                      ) -> Tensor:
        """One token per row through gpa's C++ kernels (``ops``: :func:`gpa.native.load`'s module).

        The same computation as :meth:`forward` on one token per row with ``cache``, with the residual
        stream in float32 and the linear layers fed in :meth:`linear_input_dtype`; the cache may be
        float32, bfloat16 or int8. Needs :meth:`supports_native_decode`.

        Args:
            ids, positions, slots: (B,) int64: each row's token, its position, and its cache slot.

        Returns:
            (B, C) final-norm hidden states (float32, or bfloat16 with quantized weights).
        """
        if self._native_args is None:
            self._native_args = self._trunk_args()
        cos, sin = self.rope.table(int(positions.max()), torch.float32, ids.device)
        x = self.model.embed_tokens(ids).float()  # (B, C): the residual stream
        attn = self.model.layers[0].self_attn
        return ops.decode_trunk(x, *self._native_args, self.config.rms_norm_eps, cos[:, 0], sin[:, 0], positions,
                                slots, cache.k, cache.v, cache.k_scale, cache.v_scale, attn.n_heads, attn.n_kv,
                                self.linear_input_dtype())

    def _trunk_args(self) -> tuple[list, ...]:
        """decode_trunk's per-layer lists (weights, scales, kinds, params, norms, QK-norms), built once per fusing."""
        weights, scales, kinds, params, norms = [], [], [], [], []
        for layer in self.model.layers:
            for linear in (layer.self_attn.fused.proj, layer.self_attn.o_proj, layer.mlp.fused.proj,
                           layer.mlp.down_proj):
                # gpa.quant's layers describe themselves (kind, weight, scales, param); nn.Linear is kind 0
                spec = linear.native_spec() if hasattr(linear, "native_spec") else (0, linear.weight, _NO_SCALES, 0)
                for out, value in zip((kinds, weights, scales, params), spec, strict=True):
                    out.append(value)
            norms += [layer.input_layernorm.weight.float(), layer.post_attention_layernorm.weight.float()]
        norms.append(self.model.norm.weight.float())
        qk_norms = [layer.self_attn.fused.norm.float() for layer in self.model.layers]
        return weights, scales, kinds, params, norms, qk_norms

    def _mask(self, positions: Tensor, cache: KVCache | None, padding_mask: Tensor | None, max_pos: int
              ) -> Tensor | bool:
        """Which keys each query sees: a query at position p sees keys at positions <= p (and not padding).

        With a cache, S is the highest position in the batch + 1: later entries are stale or empty.
        Two common cases need no mask tensor: ``True`` means plain causal attention over the T
        tokens (an unpadded batch, or one row prefilled from position 0), or over the S cached keys of
        which the T queries are the last (one row prefilled after a cached prefix); ``False`` means attend
        to every key (one query, one row, at the last position). Otherwise a (B, 1, T, S) bool
        tensor, or for one query per row with a cache, a (B * KV, S) additive float bias (0 or
        -inf, in the model's dtype) for :func:`attend_one`.
        """
        B, T = positions.shape
        if padding_mask is None and (cache is None or (B == 1 and int(positions[0, 0]) == 0)):
            return True
        if padding_mask is None and B == 1 and T > 1 and int(positions[0, 0]) + T == max_pos + 1:
            return True  # one row prefilled after a cached prefix: causal over the prefix and these T tokens
        if cache is None:
            key_pos = positions  # (B, S=T)
        else:
            if padding_mask is not None:
                raise ValueError("padding_mask is for uncached forward passes only")
            if max_pos >= cache.max_seq_len:
                raise ValueError(f"position {max_pos} is beyond the KV cache's {cache.max_seq_len}")
            key_pos = torch.arange(max_pos + 1, device=positions.device).expand(positions.shape[0], -1)
        mask = key_pos[:, None, :] <= positions[:, :, None]  # (B, T, S)
        if padding_mask is not None:
            mask = mask & padding_mask[:, None, :]
        if cache is not None and T == 1:
            bias = torch.zeros(B, mask.shape[-1], dtype=self.model.norm.weight.dtype, device=mask.device)
            bias.masked_fill_(~mask[:, 0], float("-inf"))
            return bias.repeat_interleave(self.config.num_key_value_heads, dim=0)  # (B * KV, S)
        return mask[:, None]
