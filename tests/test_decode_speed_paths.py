"""The inference fast paths equal the plain ones: fused projections, RoPE table, one-query attention, cache writes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from gpa.checkpoint import Checkpoint, load_lm
from gpa.config import SamplingParams
from gpa.generation import GenerationRequest, SlotDecoder, generate
from gpa.kv_cache import KVCache
from gpa.model import GPALM, RopeTable, apply_rope, attend_one, rope, rope_tables
from gpa.quant import Int4Linear, Int8Linear
from tests.conftest import rel_err


def _load(mini_dir, **kw) -> GPALM:
    return load_lm(Checkpoint.open(mini_dir), **kw)


def _ids(n: int, vocab: int, seed: int) -> torch.Tensor:
    return torch.randint(0, vocab, (1, n), generator=torch.Generator().manual_seed(seed))


def _decode_logits(lm: GPALM, seq: torch.Tensor, prefix: int, dtype: torch.dtype) -> torch.Tensor:
    """Prefill ``prefix`` tokens, then feed the rest one at a time; (T, V) logits."""
    cfg = lm.config
    cache = KVCache(cfg.num_hidden_layers, 1, cfg.num_key_value_heads, 64, cfg.head_dim, dtype=dtype)
    with torch.inference_mode():
        out = [lm(seq[:, :prefix], cache=cache)[0]]
        for pos in range(prefix, seq.shape[1]):
            out.append(lm(seq[:, pos : pos + 1], torch.tensor([[pos]]), cache=cache)[0])
    return torch.cat(out)


@pytest.mark.parametrize("quantize", ["none", "int8", "int4"])
def test_fused_projections_equal_separate(mini_dir, quantize):
    """Fusing q/k/v and gate/up keeps state_dict and weights; outputs match the separate layers."""
    lm = _load(mini_dir, quantize=quantize)
    before = {k: v.clone() for k, v in lm.state_dict().items()}
    seq = _ids(30, lm.config.vocab_size, 0)
    with torch.inference_mode():
        ref = lm(seq)
        assert not lm.is_fused
        lm.fuse().fuse()  # idempotent
        assert lm.is_fused
        out = lm(seq)
    after = lm.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in before)
    attn, mlp = lm.model.layers[0].self_attn, lm.model.layers[0].mlp
    assert attn.q_proj.weight.data_ptr() == attn.fused.proj.weight.data_ptr()  # a view, not a copy
    assert mlp.up_proj.weight.data_ptr() > mlp.gate_proj.weight.data_ptr()
    tol = 1e-5 if quantize == "none" else 2e-2  # bf16 activations: rounding order differs
    assert rel_err(out, ref) < tol
    with torch.enable_grad():  # autograd takes the separate layers, so gradients reach every weight
        assert rel_err(lm(seq), ref) < tol


def test_int8_fused_layer_is_exact():
    """Per-row scales make the fused int8 product exactly the concatenation of the parts'."""
    g = torch.Generator().manual_seed(0)
    parts = [Int8Linear(torch.randn(n, 64, generator=g)) for n in (48, 16, 16)]
    fused = Int8Linear.fuse(parts)
    x = torch.randn(3, 64, generator=g)
    expected = torch.cat([p(x) for p in parts], dim=-1)
    assert torch.equal(fused(x), expected)
    assert parts[1].weight.data_ptr() == fused.weight.data_ptr() + 48 * 64


def test_int4_fused_layer_is_exact():
    """int4 rows are packed in whole blocks of 64, so the fused product is exactly the parts' concatenated."""
    g = torch.Generator().manual_seed(0)
    parts = [Int4Linear(torch.randn(n, 128, generator=g)) for n in (192, 64, 64)]
    fused = Int4Linear.fuse(parts)
    for rows in (1, 3):
        x = torch.randn(rows, 128, generator=g)
        assert torch.equal(fused(x), torch.cat([p(x) for p in parts], dim=-1))
    assert parts[1].weight.data_ptr() == fused.weight.data_ptr() + 192 * 64  # views: no extra memory


def test_int4_unpacked_weights_and_prefill_path():
    """Unpacking the kernel's layout gives the quantized weights ((q - 8) * scale + zero per group, recomputed here
    from the float weights in float32); the bf16 product on them (the path of long prefills) agrees with torch's
    int4 kernel up to bf16 rounding, and so does the layer's own product, fused layers included."""
    from gpa.quant import INT4_GROUP, INT4_KERNEL_MAX_ROWS

    g = torch.Generator().manual_seed(0)
    w = torch.randn(192, 256, generator=g)
    groups = w.view(192, -1, INT4_GROUP)
    low, high = groups.amin(-1, keepdim=True), groups.amax(-1, keepdim=True)
    scale = (high - low) / 15
    expected = (torch.round((groups - low) / scale) * scale + low).view_as(w)
    layer = Int4Linear(w)
    assert rel_err(layer.dequantized().float(), expected) < 4e-3
    parts = [Int4Linear(torch.randn(n, 128, generator=g)) for n in (128, 64)]
    fused = Int4Linear.fuse(parts)
    assert torch.equal(fused.dequantized(), torch.cat([p.dequantized() for p in parts]))
    x = torch.randn(INT4_KERNEL_MAX_ROWS + 1, 128, generator=g).bfloat16()
    kernel = torch.ops.aten._weight_int4pack_mm_for_cpu(x, fused.weight, INT4_GROUP, fused.scale_zero)
    unpacked = torch.nn.functional.linear(x, fused.dequantized())
    assert rel_err(unpacked, kernel) < 1e-2
    assert rel_err(fused(x), kernel) < 1e-2  # whichever path the layer takes at this many rows


def test_moving_the_model_drops_fusion(mini_dir):
    lm = _load(mini_dir).fuse()
    seq = _ids(12, lm.config.vocab_size, 1)
    with torch.inference_mode():
        ref = lm(seq)
        lm = lm.to(torch.float64)
        assert not lm.is_fused
        assert rel_err(lm.fuse()(seq).float(), ref) < 1e-5


def test_rope_table_equals_direct_rotation():
    head_dim, theta = 32, 1_000_000.0
    positions = torch.tensor([[0, 1, 7, 300], [5, 2000, 9, 3]])
    x = torch.randn(2, 4, 3, head_dim)  # (B, T, heads, D)
    cos, sin = rope_tables(positions, head_dim, theta)
    ref = apply_rope(x.transpose(1, 2), cos, sin).transpose(1, 2)
    table = RopeTable(head_dim, theta)
    got = rope(x, *table.lookup(positions, int(positions.max()), torch.float32))
    assert torch.allclose(got, ref, atol=1e-6)
    assert table.lookup(positions[:, :1], 5, torch.float32)[0].shape == (2, 1, 1, head_dim)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_query_attention_equals_fused_kernel(dtype):
    B, H, KV, S, D, S_max = 3, 8, 2, 11, 16, 20
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, H, D, generator=g)
    cache_k, cache_v = torch.randn(B, KV, S_max, D, generator=g), torch.randn(B, KV, S_max, D, generator=g)
    lengths = torch.tensor([11, 4, 7])
    allowed = torch.arange(S)[None] < lengths[:, None]  # (B, S)
    ref = F.scaled_dot_product_attention(q[:, :, None], cache_k[:, :, :S], cache_v[:, :, :S],
                                         attn_mask=allowed[:, None, None], enable_gqa=True)  # (B, H, 1, D)
    bias = torch.zeros(B, S).masked_fill(~allowed, float("-inf")).repeat_interleave(KV, dim=0).to(dtype)
    k, v = cache_k.to(dtype)[:, :, :S], cache_v.to(dtype)[:, :, :S]  # strided views, as from the cache
    got = attend_one(q.to(dtype), k, v, bias).float()
    assert rel_err(got, ref.reshape(B, H * D)) < (1e-5 if dtype == torch.float32 else 2e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int8])
def test_cache_write_read(dtype):
    """write_read puts each row's (T, KV, D) at its slot and positions and reads back positions [0, kv_len) of
    those slots; an int8 cache stores code = round(x / scale), scale = max |x| / 127 per position and head, and
    reads code * scale (as bf16): within half a step of the written value."""
    g = torch.Generator().manual_seed(0)
    k, v = torch.randn(2, 3, 2, 8, generator=g), torch.randn(2, 3, 2, 8, generator=g)  # (B, T, KV, D)
    k[1, 2, 1] = 0.0  # an all-zero row: scale 0, codes 0
    positions = torch.tensor([[3, 4, 5], [0, 1, 2]])
    for rows, slots in ((slice(1, 3), [1, 2]), (torch.tensor([3, 0]), [3, 0]), (None, [0, 1])):
        cache = KVCache(2, 4, 2, 16, 8, dtype=dtype)
        index = torch.arange(2)[:, None] if not isinstance(rows, torch.Tensor) else rows[:, None]
        ka, va = cache.write_read(1, positions, k, v, rows, 6, index)
        assert ka.shape == va.shape == (4 if rows is None else 2, 2, 6, 8)  # None: every slot in order
        for b, slot in enumerate(slots):
            for t, pos in enumerate(positions[b].tolist()):
                for new, exact, stored, scale in ((ka, k, cache.k, cache.k_scale), (va, v, cache.v, cache.v_scale)):
                    x = exact[b, t]  # (KV, D)
                    if dtype == torch.int8:
                        step = x.abs().amax(-1) / 127
                        assert torch.equal(scale[1, slot, :, pos], step)
                        value = stored[1, slot, :, pos].float() * step[:, None]
                        assert ((value - x).abs() <= step[:, None] / 2 + 1e-7).all()
                        assert new.dtype == torch.bfloat16 and torch.equal(new[b, :, pos], value.bfloat16())
                    else:
                        assert torch.equal(stored[1, slot, :, pos], x.to(dtype))
                        assert torch.equal(new[b, :, pos], x.to(dtype))
        assert not cache.k[0].any() and not cache.k[1, [s for s in range(4) if s not in slots]].any()


@pytest.mark.parametrize("kv", ["auto", "int8"])
def test_copy_slots_copies_every_cache_tensor(mini_dir, kv):
    """SlotDecoder.copy_slots (beam search's KV copy) moves keys, values and an int8 cache's scales over the
    position range, leaving other positions and slots alone."""
    lm = _load(mini_dir)
    lm.kv_cache_dtype = kv
    decoder = SlotDecoder(lm, 4, 16)
    tensors = decoder.cache.tensors()
    assert len(tensors) == (4 if kv == "int8" else 2)
    g = torch.Generator().manual_seed(0)
    for t in tensors:
        t.copy_(torch.randint(-100, 100, t.shape, generator=g).to(t.dtype))
    before = [t.clone() for t in tensors]
    decoder.copy_slots([2, 0], [1, 3], length=9, start=4)
    for t, old in zip(tensors, before, strict=True):
        assert torch.equal(t[:, [1, 3], :, 4:9], old[:, [2, 0], :, 4:9])
        assert torch.equal(t[:, [1, 3], :, :4], old[:, [1, 3], :, :4])
        assert torch.equal(t[:, [1, 3], :, 9:], old[:, [1, 3], :, 9:])
        assert torch.equal(t[:, [0, 2]], old[:, [0, 2]])


def test_int8_cache_decode_close_to_bf16_cache(mini_dir):
    """Decoding over an int8 cache (torch's path: prefill and steps) stays near decoding over a bf16 one."""
    lm = _load(mini_dir, quantize="int8").fuse()
    seq = _ids(40, lm.config.vocab_size, 2)
    with torch.inference_mode():
        full = lm(seq)[0]
    bf16, int8 = _decode_logits(lm, seq, 25, torch.bfloat16), _decode_logits(lm, seq, 25, torch.int8)
    assert rel_err(int8, full) < 3e-2 and rel_err(int8, bf16) < 3e-2
    assert rel_err(int8, bf16) > 0  # it really ran over int8 values


@pytest.mark.parametrize("quantize,dtype,tol", [("none", torch.float32, 1e-5), ("none", torch.bfloat16, 3e-2),
                                                ("int8", torch.float32, 3e-2), ("int8", torch.bfloat16, 3e-2),
                                                ("int4", torch.float32, 3e-2), ("int4", torch.bfloat16, 3e-2)])
def test_cached_fast_decode_equals_uncached(mini_dir, quantize, dtype, tol):
    """Step-by-step decoding on the fast path (fused, one-query attention) matches a full forward."""
    lm = _load(mini_dir, quantize=quantize, dtype=dtype).fuse()
    seq = _ids(40, lm.config.vocab_size, 2)
    with torch.inference_mode():
        full = lm(seq)[0]
    assert rel_err(_decode_logits(lm, seq, 25, dtype), full) < tol


@pytest.mark.parametrize("quantize", ["none", "int8", "int4"])
def test_batched_rows_at_different_positions_equal_single(mini_dir, quantize):
    """Rows at different lengths share a step (the additive mask hides each row's stale keys); the
    quantized kernels compute each row on its own, so batching changes nothing there either."""
    lm = _load(mini_dir, quantize=quantize)
    prompts = [_ids(n, lm.config.vocab_size, n)[0].tolist() for n in (9, 31, 17)]
    reqs = [GenerationRequest(p, SamplingParams(temperature=0, max_new_tokens=10)) for p in prompts]
    assert generate(lm, reqs) == [generate(lm, [r])[0] for r in reqs]
