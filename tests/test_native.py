"""gpa's C++ decode kernels (gpa.native) against torch's decode path: the same hidden states and tokens.

The kernels are compiled on first use (~30 s); where a compiler or ninja is missing the tests skip with
the reason :func:`gpa.native.unavailable_reason` gives.
"""

from __future__ import annotations

import pytest
import torch

from gpa import native
from gpa.checkpoint import Checkpoint, load_lm
from gpa.config import SamplingParams
from gpa.generation import GenerationRequest, SlotDecoder, generate
from gpa.kv_cache import KVCache, dequantize_rows, quantize_rows
from gpa.model import GPALM, RopeTable, rope
from gpa.quant import gemm_weights
from tests.conftest import rel_err


@pytest.fixture(scope="module")
def ops():
    reason = native.unavailable_reason()
    if reason is None and native.load() is None:
        reason = native.unavailable_reason()
    if reason is not None:
        pytest.skip(f"native kernels unavailable: {reason}")
    return native.load()


def _lm(mini_dir, native_decode: bool, **kw) -> GPALM:
    lm = load_lm(Checkpoint.open(mini_dir), **kw).fuse()
    lm.native_decode = native_decode
    return lm


def _prompts(vocab: int, lengths: tuple[int, ...]) -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]


def _one_step_both_ways(lm: GPALM, ops, caches: list[KVCache]) -> tuple[torch.Tensor, ...]:
    """Prompts of 7, 19 and 3 tokens prefilled by torch into slots 2, 0, 3 of both caches, then one step per row:
    torch's forward over caches[0] and the kernels over caches[1] -> (torch's, the kernels' hidden states,
    slots, positions)."""
    prompts = _prompts(lm.config.vocab_size, (7, 19, 3))
    slots = torch.tensor([2, 0, 3])
    with torch.inference_mode():
        for cache in caches:
            for slot, prompt in zip(slots.tolist(), prompts, strict=True):
                lm(torch.tensor([prompt]), cache=cache, cache_rows=slice(slot, slot + 1))
        ids = torch.tensor([5, 11, 17])
        positions = torch.tensor([len(p) for p in prompts])
        ref = lm(ids[:, None], positions[:, None], cache=caches[0], cache_rows=slots, hidden_only=True)[:, -1]
        got = lm.decode_native(ops, ids, positions, slots, caches[1])
    return ref, got, slots, positions


def test_one_step_equals_torch_decode(mini_dir, ops):
    """float32: the kernels' hidden states equal torch's one-token forward, rows at different positions in
    scattered slots, with stale garbage beyond each row's position (which must not be read)."""
    lm = _lm(mini_dir, True)
    cfg = lm.config
    caches = [KVCache(cfg.num_hidden_layers, 4, cfg.num_key_value_heads, 48, cfg.head_dim) for _ in range(2)]
    for cache in caches:
        cache.k.normal_(generator=torch.Generator().manual_seed(1))  # stale entries everywhere
        cache.v.normal_(generator=torch.Generator().manual_seed(2))
    ref, got, slots, positions = _one_step_both_ways(lm, ops, caches)
    assert got.dtype == torch.float32
    assert rel_err(got, ref) < 1e-5
    for slot, n in zip(slots.tolist(), positions.tolist(), strict=True):  # the new k/v went where torch put them
        assert rel_err(caches[1].k[:, slot, :, : n + 1], caches[0].k[:, slot, :, : n + 1]) < 1e-5
        assert rel_err(caches[1].v[:, slot, :, : n + 1], caches[0].v[:, slot, :, : n + 1]) < 1e-5
    assert torch.equal(caches[1].k[:, 1], caches[0].k[:, 1])  # the unused slot is untouched


def test_one_step_over_int8_cache_equals_torch(mini_dir, ops):
    """An int8 cache: the kernels' step equals torch's one-token forward over the same cache (which reads the
    codes back as bf16), and writes the codes and scales gpa.kv_cache.quantize_rows gives torch's path."""
    lm = _lm(mini_dir, True)
    cfg = lm.config
    caches = [KVCache(cfg.num_hidden_layers, 4, cfg.num_key_value_heads, 48, cfg.head_dim, dtype=torch.int8)
              for _ in range(2)]
    ref, got, slots, positions = _one_step_both_ways(lm, ops, caches)
    assert rel_err(got, ref) < 5e-3  # torch's path reads the codes times scales rounded to bf16
    # the new rows: layer 0's from the same inputs, later layers' from inputs as close as the two attentions are
    for slot, n in zip(slots.tolist(), positions.tolist(), strict=True):
        assert rel_err(caches[1].k_scale[:, slot, :, n], caches[0].k_scale[:, slot, :, n]) < 1e-3
        assert rel_err(caches[1].v_scale[:, slot, :, n], caches[0].v_scale[:, slot, :, n]) < 1e-3
        assert torch.equal(caches[1].v[0, slot, :, n], caches[0].v[0, slot, :, n])
        step = (caches[1].k[:, slot, :, n].int() - caches[0].k[:, slot, :, n].int()).abs()
        assert step.max() <= 1 and step.float().mean() < 0.05  # rounding ties aside, the same codes
        assert torch.equal(caches[1].k[:, slot, :, :n], caches[0].k[:, slot, :, :n])


def test_greedy_generation_equals_torch(mini_dir, golden, expected, ops):
    """float32: greedy tokens through the kernels equal the reference's (and torch's path), batched."""
    lm = _lm(mini_dir, True)
    assert SlotDecoder(lm, 1, 8).ops is ops
    keys = list(expected["prompts"])
    reqs = [GenerationRequest(golden[f"prompt.{k}"].tolist(), SamplingParams(temperature=0, max_new_tokens=16))
            for k in keys]
    for key, out in zip(keys, generate(lm, reqs), strict=True):
        assert out == golden[f"greedy16.{key}"].tolist(), key


@pytest.mark.parametrize(("quantize", "kv"), [("int8", "auto"), ("int4", "auto"), ("int8", "bfloat16"),
                                         ("int4", "bfloat16")])
def test_quantized_cache_batched_equals_single(mini_dir, quantize, kv, ops):
    """With int8/int4 weights the cache is int8 (or bfloat16 when asked); sampled tokens batched (rows at different
    lengths) equal each request alone, and stay close to torch's float32-cache path (logits)."""
    lm = _lm(mini_dir, True, quantize=quantize)
    lm.kv_cache_dtype = kv
    decoder = SlotDecoder(lm, 3, 64)
    assert decoder.ops is ops and decoder.cache.k.dtype == (torch.int8 if kv == "auto" else torch.bfloat16)
    params = SamplingParams(temperature=0.8, top_k=20, max_new_tokens=12)
    reqs = [GenerationRequest(p, params.replace(seed=i)) for i, p in enumerate(_prompts(lm.config.vocab_size,
                                                                                         (9, 30, 4)))]
    batched = generate(lm, reqs)
    assert batched == [generate(lm, [r])[0] for r in reqs]
    plain = _lm(mini_dir, False, quantize=quantize)
    assert SlotDecoder(plain, 1, 8).cache.k.dtype == torch.float32
    seq = reqs[1].prompt + batched[1]
    logits = []
    for model in (lm, plain):
        dec = SlotDecoder(model, 1, 64)
        state, first = dec.prefill_logits(GenerationRequest(seq[:30], params))
        steps = [first]
        for token in seq[30:]:
            state.output.append(token)
            steps.append(dec.step_logits([state]))
        logits.append(torch.cat(steps))
    assert rel_err(logits[0], logits[1]) < 2e-2


def test_kernel_rejects_positions_beyond_the_cache(mini_dir, ops):
    lm = _lm(mini_dir, True)
    cfg = lm.config
    cache = KVCache(cfg.num_hidden_layers, 1, cfg.num_key_value_heads, 8, cfg.head_dim)
    with torch.inference_mode(), pytest.raises(RuntimeError, match="position 8 outside the KV cache's 8"):
        lm.decode_native(ops, torch.tensor([1]), torch.tensor([8]), torch.tensor([0]), cache)
    with torch.inference_mode(), pytest.raises(RuntimeError, match="slot 1 outside the KV cache's 1"):
        lm.decode_native(ops, torch.tensor([1]), torch.tensor([3]), torch.tensor([1]), cache)


@pytest.mark.parametrize(("heads", "kv", "dim", "cache_dtype", "length"), [
    (16, 8, 128, torch.bfloat16, 40),  # the 0.3B model's shapes
    (5, 1, 64, torch.bfloat16, 40),  # GPA-nano's: 5 query heads per K/V head
    (4, 2, 48, torch.bfloat16, 40),  # a head size the vector paths do not take
    (16, 8, 128, torch.float32, 40),
    (16, 8, 128, torch.int8, 40),
    (16, 8, 128, torch.int8, 1100),  # past the int8 kernel's 512-row flush of its integer sums
    (5, 1, 64, torch.int8, 40),
    (4, 2, 48, torch.int8, 40),
])
def test_attention_kernel_equals_reference(ops, heads, kv, dim, cache_dtype, length):
    """attend_decode against plain torch: RMS-normed, rotated q/k, attention over each row's positions 0..pos
    (odd and even lengths), reading the row's own slot only; an int8 cache's rows are written as
    gpa.kv_cache.quantize_rows writes them and read through their scales."""
    g = torch.Generator().manual_seed(0)
    batch, slots, eps = 3, 4, 1e-6
    qkv = torch.randn(batch, (heads + 2 * kv) * dim, generator=g).bfloat16()
    norm = torch.rand(heads + kv, dim, generator=g) + 0.5
    k_cache = torch.randn(slots, kv, length, dim, generator=g)
    v_cache = torch.randn(slots, kv, length, dim, generator=g)
    scales: list[torch.Tensor | None] = [None, None]
    if cache_dtype == torch.int8:
        (k_cache, k_scale), (v_cache, v_scale) = quantize_rows(k_cache), quantize_rows(v_cache)
        scales = [k_scale.clone(), v_scale.clone()]
    k_cache, v_cache = k_cache.to(cache_dtype), v_cache.to(cache_dtype)
    positions, row_slots = torch.tensor([0, 17, length - 10]), torch.tensor([3, 0, 2])
    cos, sin = RopeTable(dim, 10000.0).table(length, torch.float32, torch.device("cpu"))
    k_new, v_new = k_cache.clone(), v_cache.clone()
    out = ops.attend_decode(qkv, norm, eps, cos[:, 0].contiguous(), sin[:, 0].contiguous(), positions, row_slots,
                            k_new, v_new, *scales, heads, kv)

    def read(cache: torch.Tensor, scale: torch.Tensor | None, slot: int) -> torch.Tensor:
        return cache[slot].float() if scale is None else dequantize_rows(cache[slot], scale[slot], torch.float32)

    x = qkv.float().view(batch, heads + 2 * kv, dim)
    qk = torch.nn.functional.rms_norm(x[:, : heads + kv], (dim,), eps=eps) * norm
    qk = rope(qk[:, None], cos[positions][:, None], sin[positions][:, None])[:, 0]
    for b, (pos, slot) in enumerate(zip(positions.tolist(), row_slots.tolist(), strict=True)):
        keys, values = read(k_new, scales[0], slot), read(v_new, scales[1], slot)
        for stored, exact in ((keys, qk[b, heads:]), (values, x[b, heads + kv :])):
            if cache_dtype == torch.int8:  # code = round(x / scale), scale = max |x| / 127: within half a step
                step = exact.abs().amax(-1, keepdim=True) / 127
                assert ((stored[:, pos] - exact).abs() <= step * 0.501).all()
            else:
                assert rel_err(stored[:, pos], exact.to(cache_dtype).float()) < 1e-6
        q = qk[b, :heads].view(kv, heads // kv, dim)
        probs = (q @ keys[:, : pos + 1].transpose(1, 2) / dim**0.5).softmax(-1)
        expected = (probs @ values[:, : pos + 1]).reshape(heads * dim)
        assert rel_err(out[b].float(), expected) < 6e-3, b  # measured <= 0.3 % (bf16 output and bf16 products)
    untouched = torch.ones(slots, dtype=torch.bool)
    untouched[row_slots] = False
    assert torch.equal(k_new[untouched], k_cache[untouched])
    if cache_dtype == torch.int8:
        assert torch.equal(scales[0][untouched], k_scale[untouched])


def test_int4_dequantize_equals_torch_unpacking(ops):
    """The C++ unpacking of torch's int4 layout (used for prefills over INT4_KERNEL_MAX_ROWS rows) gives torch's
    unpacked weights, to bf16 rounding (it computes in float32, torch in bf16), fused layers included."""
    from gpa.quant import Int4Linear

    g = torch.Generator().manual_seed(0)
    parts = [Int4Linear(torch.randn(n, 192, generator=g)) for n in (128, 64)]
    for layer in (*parts, Int4Linear.fuse(parts)):
        fast, plain = layer.dequantized(), layer.unpacked()
        assert fast.dtype == torch.bfloat16 and fast.shape == plain.shape
        assert rel_err(fast.float(), plain.float()) < 4e-3


def _int4_weights_float(layer) -> torch.Tensor:
    """An int4 layer's (out, in) weights (q - 8) * scale + zero in float32 (torch's packing: per block of 64 rows,
    input k's 32 bytes hold rows j (low nibble) and j + 32 (high))."""
    from gpa.quant import INT4_GROUP

    n, k = layer.out_features, layer.in_features
    packed = layer.weight.view(n // 64, k, 32)
    q = torch.cat([packed & 0xF, packed >> 4], dim=2).transpose(1, 2).reshape(n, k // INT4_GROUP, INT4_GROUP)
    scale, zero = layer.scale_zero.float().permute(2, 1, 0)  # each (out, in / INT4_GROUP)
    return ((q.float() - 8) * scale[..., None] + zero[..., None]).reshape(n, k)


def _int4_matmul_rule(x: torch.Tensor, layer) -> torch.Tensor:
    """int4_matmul's rule in float64: each row of x rounded to int8 per group of INT4_GROUP inputs (scale = max |x|
    / 127), times the layer's unpacked weights (float32 from the bf16 scales and offsets), rounded to bf16."""
    from gpa.quant import INT4_GROUP

    groups = x.float().view(x.shape[0], -1, INT4_GROUP)
    scale = groups.abs().amax(-1, keepdim=True) / 127
    codes = torch.where(scale > 0, groups / scale, 0.0).round().clamp(-127, 127)
    weights = _int4_weights_float(layer).double()
    return ((codes * scale).view_as(x).double() @ weights.T).to(torch.bfloat16)


def test_int4_matmul_follows_its_rule(ops):
    """int4_matmul (AVX512-VNNI: rows rounded to int8 per group of 64 inputs, exact integer products, scales per
    group afterwards) against its rule computed in float64, at row counts that exercise every remainder of its
    4-row tiles, fused layers included; within int8's rounding of the exact product; each row computed alone
    gives the same bits; its errors name the problem."""
    if not hasattr(ops, "int4_matmul"):
        pytest.skip("int4_matmul needs AVX512-VNNI and AVX512-VBMI (torch's int4 kernel runs instead)")
    from gpa.quant import Int4Linear

    g = torch.Generator().manual_seed(0)
    parts = [Int4Linear(torch.randn(n, 3 * 64, generator=g)) for n in (128, 64)]
    for layer in (*parts, Int4Linear.fuse(parts)):
        for rows in (1, 2, 3, 4, 5, 7, 8, 9, 13, 16, 21):
            x = torch.randn(rows, layer.in_features, generator=g).bfloat16()
            x[0, :64] = 0.0  # a group of zeros (scale 0)
            got = ops.int4_matmul(x, layer.weight, layer.scale_zero)
            assert got.dtype == torch.bfloat16 and got.shape == (rows, layer.out_features)
            assert rel_err(got.float(), _int4_matmul_rule(x, layer).float()) < 3e-3, rows  # bf16 rounding
            assert rel_err(got.float(), x.float() @ _int4_weights_float(layer).T) < 1.2e-2, rows
            for r in {0, rows - 1}:
                assert torch.equal(got[r : r + 1], ops.int4_matmul(x[r : r + 1], layer.weight, layer.scale_zero))
    layer = parts[0]
    with pytest.raises(RuntimeError, match="x: \\(rows, in\\) bfloat16"):
        ops.int4_matmul(torch.randn(2, layer.in_features), layer.weight, layer.scale_zero)
    with pytest.raises(RuntimeError, match="int4_matmul: x is \\(rows, 128\\), weight \\(128, 96\\)"):
        ops.int4_matmul(torch.randn(2, 128).bfloat16(), layer.weight, layer.scale_zero)


def test_snake_kernel_and_bf16_decoding(ops, mini_dir, golden):
    """The fused bf16 Snake is within bf16 rounding of the float32 formula (closer than torch's chain of bf16 ops),
    keeps NaN and huge arguments right; with it loaded, bf16 BiCodec decoding stays close to float32 and its
    stream equals its offline decode."""
    from gpa.codecs.bicodec import BiCodec

    g = torch.Generator().manual_seed(0)
    x = (torch.randn(2, 48, 301, generator=g) * 3).bfloat16()
    alpha = (torch.rand(1, 48, 1, generator=g) * 3 + 0.05).bfloat16()
    a, v = alpha.float(), x.float()
    exact = v + (a + 1e-9).reciprocal() * torch.sin(a * v).pow(2)
    chained = x + (alpha + 1e-9).reciprocal() * torch.sin(alpha * x).pow(2)
    got = ops.snake(x, alpha)
    assert got.dtype == torch.bfloat16 and got.shape == x.shape
    assert ((got.float() - exact).abs() <= exact.abs() * 2**-8 + 1e-6).all()  # one bf16 rounding
    assert rel_err(got.float(), exact) < rel_err(chained.float(), exact)
    assert torch.equal(ops.snake(x[:, :, ::2], alpha), ops.snake(x[:, :, ::2].contiguous(), alpha))
    odd = torch.tensor([[[3e5, float("nan"), -0.5]]]).bfloat16()
    want = odd.float() + torch.sin(odd.float()) ** 2
    out = ops.snake(odd, torch.ones(1, 1, 1)).float()
    assert torch.isnan(out[0, 0, 1]) and torch.allclose(out[0, 0, [0, 2]], want[0, 0, [0, 2]], rtol=2**-8)
    with pytest.raises(RuntimeError, match="snake: x must be \\(B, C, T\\) bfloat16"):
        ops.snake(x.float(), alpha)
    with pytest.raises(RuntimeError, match="snake: 3 alphas for 48 channels"):
        ops.snake(x, torch.ones(3))

    fp32 = BiCodec.from_dir(mini_dir / "BiCodec", with_wav2vec2=False)
    fast = BiCodec.from_dir(mini_dir / "BiCodec", with_wav2vec2=False, decode_dtype=torch.bfloat16)
    sem, glob = golden["long_16k.semantic"][None], golden["long_16k.global"][None]
    with torch.inference_mode():
        ref, wav = fp32.decode(sem, glob)[0], fast.decode(sem, glob)[0]
        snr = 10 * torch.log10((ref - ref.mean()).pow(2).sum() / (wav - ref).pow(2).sum())
        assert 25 < snr < 60, f"bf16 SNR {snr:.1f} dB"
        dec = fast.incremental_decoder(glob)
        streamed = torch.cat([dec.push(sem[:, i : i + 7]) for i in range(0, sem.shape[1], 7)] + [dec.finish()], 1)
    assert rel_err(streamed[0], wav) < 5e-3  # 1.3e-3 measured: bf16 GEMMs block the sums by chunk length


@pytest.mark.parametrize(("heads", "kv", "dim", "length", "offset", "q_dtype", "cache_dtype", "block"), [
    (16, 8, 128, 70, 0, torch.float32, torch.bfloat16, 0),  # the 0.3B model's heads, a prefill from position 0
    (5, 1, 64, 33, 9, torch.bfloat16, torch.bfloat16, 0),  # GPA-nano's, queries after 9 cached positions
    (2, 2, 32, 16, 0, torch.float32, torch.float32, 0),
    (16, 8, 128, 301, 37, torch.float32, torch.bfloat16, 0),  # spans of 64 keys every query sees, then the frontier
    (5, 1, 64, 150, 0, torch.bfloat16, torch.bfloat16, 0),
    (20, 20, 64, 450, 0, torch.bfloat16, torch.bfloat16, 200),  # GLM's tokenizer: block-causal, blocks of 200
    (4, 4, 64, 77, 0, torch.float32, torch.bfloat16, 30),
    (16, 16, 64, 299, 0, torch.float32, torch.bfloat16, -1),  # wav2vec2's: every key
])
def test_prefill_attention_equals_reference(ops, heads, kv, dim, length, offset, q_dtype, cache_dtype, block):
    """The flash prefill kernel against torch's attention in float32: query t (at position offset + t) sees keys
    [0, offset + t] (block 0), those or any of its own block of positions (block > 0), or all (block < 0); bf16
    products and probabilities, float32 softmax; strided q as the model passes it; clear shape errors."""
    if not hasattr(ops, "prefill_attention"):
        pytest.skip("prefill_attention needs AVX512-BF16")
    g = torch.Generator().manual_seed(dim)
    qkv = torch.randn(2, length, heads + 2 * kv, dim, generator=g).to(q_dtype)
    q = qkv[:, :, :heads]  # (B, T, H, D), strided like the fused projection's slice
    k = torch.randn(2, kv, offset + length, dim, generator=g).to(cache_dtype)
    v = torch.randn(2, kv, offset + length, dim, generator=g).to(cache_dtype)
    got = ops.prefill_attention(q, k, v, block)
    allowed = torch.ones(length, offset + length, dtype=torch.bool).tril(offset)
    if block:
        position, key = torch.arange(offset, offset + length)[:, None], torch.arange(offset + length)[None]
        allowed = (allowed | (position // block == key // block)) if block > 0 else torch.ones_like(allowed)
    ref = torch.nn.functional.scaled_dot_product_attention(q.float().transpose(1, 2), k.float(), v.float(),
                                                           attn_mask=allowed, enable_gqa=True).transpose(1, 2)
    assert got.dtype == q_dtype and got.shape == q.shape
    assert rel_err(got.float(), ref) < 5e-3
    assert torch.equal(got[1:], ops.prefill_attention(q[1:], k[1:], v[1:], block))  # rows independent
    with pytest.raises(RuntimeError, match="prefill_attention: shapes"):
        ops.prefill_attention(q, k[:, :, :length - 1], v[:, :, :length - 1])


def _count_flash_calls(ops, monkeypatch) -> list[tuple]:
    """Make native.loaded() the real kernels with prefill_attention's calls recorded (their arguments) here."""
    calls: list[tuple] = []

    class Counting:
        def __getattr__(self, name):
            fn = getattr(ops, name)
            return (lambda *args: calls.append(args) or fn(*args)) if name == "prefill_attention" else fn

    monkeypatch.setattr(native, "loaded", lambda: Counting())
    return calls


def test_prefill_over_the_bf16_cache_runs_the_flash_kernel(mini_dir, ops, monkeypatch):
    """A prefill of a model decoding natively (bf16 cache) calls prefill_attention once per layer, and its
    first-token logits stay close to torch's path (float32 attention over a float32 cache)."""
    if not hasattr(ops, "prefill_attention"):
        pytest.skip("prefill_attention needs AVX512-BF16")
    calls = _count_flash_calls(ops, monkeypatch)
    lm, plain = _lm(mini_dir, True, quantize="int8"), _lm(mini_dir, False, quantize="int8")
    prompt = _prompts(lm.config.vocab_size, (23,))[0]
    params = SamplingParams(temperature=0, max_new_tokens=4)
    first = [SlotDecoder(m, 1, 64).prefill_logits(GenerationRequest(prompt, params))[1] for m in (lm, plain)]
    assert len(calls) == lm.config.num_hidden_layers and calls[0][0].shape[1] == len(prompt)
    assert rel_err(first[0], first[1]) < 2e-2


def test_tokenizer_attention_takes_the_flash_kernel_in_bf16(ops, monkeypatch):
    """In the tokenizers' bfloat16 mode GLM's block-causal attention (no padding) and wav2vec2's full attention run
    gpa.native's flash kernel, close to torch's kernels on the same bf16 inputs; with padding, in float32, or
    without the kernels they keep torch's."""
    if not hasattr(ops, "prefill_attention"):
        pytest.skip("prefill_attention needs AVX512-BF16")
    from gpa.codecs import glm, wav2vec2

    calls = _count_flash_calls(ops, monkeypatch)
    torch.manual_seed(0)
    glm_attn = glm.Attention(128, 2).eval()  # head size 64, as GLM's (1280 / 20)
    w2v_attn = wav2vec2.Attention(wav2vec2.Wav2Vec2Config(hidden_size=128, num_attention_heads=2)).eval()
    x = torch.randn(1, 450, 128)
    valid = torch.ones(1, 450, dtype=torch.bool)
    mask = glm.attention_mask(valid, 200)
    encoder = glm.VQEncoder(glm.GLMConfig(d_model=64, n_heads=1, ffn_dim=64, pooling_position=1, quantize_position=1,
                                          codebook_size=4, max_positions=8))
    assert encoder._mask(valid, 200)[1] == 200 and encoder._mask(valid, None)[1] == -1
    assert encoder._mask(torch.tensor([[True, False]]), 200)[1] is None  # padding: the mask tensor only
    with torch.inference_mode():
        counting = native.loaded()
        for fast in (False, True):
            monkeypatch.setattr(native, "loaded", (lambda: counting) if fast else (lambda: None))
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = (glm_attn(x, mask, True, 200), w2v_attn(x))
            if not fast:
                ref = out
        assert [args[3] for args in calls] == [200, -1]
        for got, expected in zip(out, ref, strict=True):
            assert got.dtype == torch.bfloat16 and rel_err(got.float(), expected.float()) < 1e-2
        glm_attn(x, mask, True, 200), w2v_attn(x)  # float32: torch's kernels
        assert len(calls) == 2


def test_int8_cache_conversions_equal_torchs(ops, monkeypatch):
    """gpa.native's quantize_rows / dequantize_rows (used by an int8 cache's prefill writes and reads) give torch's
    numbers bit for bit: float32 and bfloat16 rows, an all-zero row, a strided view of the cache."""
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        x = (torch.randn(2, 8, 300, 64, generator=g) * 3).to(dtype)
        x[0, 1, 2] = 0
        fast = quantize_rows(x), dequantize_rows(*(t[:, :, :250] for t in quantize_rows(x)))
        monkeypatch.setattr(native, "loaded", lambda: None)
        plain = quantize_rows(x), dequantize_rows(*(t[:, :, :250] for t in quantize_rows(x)))
        monkeypatch.undo()
        assert torch.equal(fast[0][0], plain[0][0]) and torch.equal(fast[0][1], plain[0][1])
        assert torch.equal(fast[1], plain[1]) and fast[1].dtype == torch.bfloat16
        assert not fast[0][0][0, 1, 2].any() and fast[0][1][0, 1, 2] == 0


def _int8_linear_reference(x: torch.Tensor, wt: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None):
    """int8_linear's rule in torch ops: per-row int8 codes (the KV cache's rule), exact int32 products, then
    sum * (row scale * column scale) (+ bias) in float32, rounded once to x's dtype."""
    codes, scales = quantize_rows(x)
    y = torch._int_mm(codes, wt).float() * (scales[:, None] * w_scale[None, :])
    return (y if bias is None else y + bias).to(x.dtype)


@pytest.mark.parametrize("rows,k,n", [(1, 64, 96), (37, 200, 130), (64, 512, 256)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_bias", [False, True])
def test_int8_linear_equals_its_rule_and_rows_are_independent(ops, rows, k, n, dtype, with_bias):
    """gpa.native.int8_linear: bit for bit the torch statement of its rule (a zero row included), each row's
    result the same when computed alone (exact integer sums: batching cannot change a prompt's products), and
    within int8's error of the float product."""
    g = torch.Generator().manual_seed(rows * k + n)
    x = torch.randn(rows, k, generator=g).to(dtype)
    x[rows // 2] = 0.0
    weight = torch.randn(n, k, generator=g)
    wt, w_scale = gemm_weights(weight)
    bias = torch.randn(n, generator=g) if with_bias else None
    got = ops.int8_linear(x, wt, w_scale, bias)
    assert got.dtype == dtype and got.shape == (rows, n)
    assert torch.equal(got, _int8_linear_reference(x, wt, w_scale, bias))
    for r in {0, rows // 2, rows - 1}:
        assert torch.equal(ops.int8_linear(x[r : r + 1], wt, w_scale, bias), got[r : r + 1])
    exact = torch.nn.functional.linear(x.float(), weight, bias)
    assert rel_err(got.float(), exact) < 0.02
    with pytest.raises(RuntimeError, match="wt must be int8"):
        ops.int8_linear(x, wt.float(), w_scale, bias)


@pytest.mark.parametrize("quantize", ["int8", "int4"])
def test_int8_prefill_multiplies_prompts_in_int8_and_leaves_steps(mini_dir, ops, quantize):
    """int8_prefill: passes over several tokens per row run the int8 GEMM (their hidden states move: within 5 % of
    float32's with int8 weights, closer than int4's own with int4, whose prompts then take int8 weights), batched
    prompts equal single ones exactly, one-token steps are the same computation as without it, and the fused
    projections' GEMM operands are views (no memory added)."""
    exact = _lm(mini_dir, False)
    plain = _lm(mini_dir, False, quantize=quantize)
    fast = _lm(mini_dir, False, quantize=quantize, int8_prefill=True)
    assert fast.int8_prefill and not plain.int8_prefill
    attn = fast.model.layers[0].self_attn
    assert attn.q_proj.gemm_codes.data_ptr() == attn.fused.proj.gemm_codes.data_ptr()
    prompts = torch.tensor(_prompts(fast.config.vocab_size, (12, 12)))
    with torch.inference_mode():
        ref, before, got = (lm(prompts, hidden_only=True) for lm in (exact, plain, fast))
        assert not torch.equal(before, got)
        assert rel_err(got, ref) < (0.05 if quantize == "int8" else rel_err(before, ref))
        for row in range(2):
            assert torch.equal(fast(prompts[row : row + 1], hidden_only=True), got[row : row + 1])
        cfg = fast.config
        cache = KVCache(cfg.num_hidden_layers, 1, cfg.num_key_value_heads, 16, cfg.head_dim)
        fast(prompts[:1], cache=cache)
        twin = KVCache(cfg.num_hidden_layers, 1, cfg.num_key_value_heads, 16, cfg.head_dim)
        twin.k.copy_(cache.k)
        twin.v.copy_(cache.v)
        step = torch.tensor([[7]]), torch.tensor([[12]])
        assert torch.equal(fast(*step, cache=cache), plain(*step, cache=twin))


def test_int8_prefill_needs_quantized_weights(mini_dir):
    with pytest.raises(ValueError, match="int8_prefill needs quantized"):
        load_lm(Checkpoint.open(mini_dir), int8_prefill=True)


def test_load_with_int8_products_and_without_the_kernels(mini_dir, golden_inputs, ops, monkeypatch, caplog):
    """gpa.load(int8_prefill=True, tokenizer_dtype="int8"): the LLM's layers keep GEMM operands and every linear
    layer of the three encoders multiplies in int8; ASR runs. Where the kernels cannot load, both fall back
    (prompts as without int8_prefill, tokenizers in bfloat16) with a warning naming them."""
    import gpa
    from gpa.quant import Int8GemmLinear

    model = gpa.load(mini_dir, device="cpu", quantize="int8", int8_prefill=True, tokenizer_dtype="int8")
    assert model.speed_settings()["int8_prefill"] and model.speed_settings()["tokenizer_dtype"] == "int8"
    for part in (model.glm.encoder, model.bicodec.wav2vec2, model.bicodec.encoder):
        assert not any(isinstance(m, torch.nn.Linear) for m in part.modules())
        assert any(isinstance(m, Int8GemmLinear) for m in part.modules())
    assert isinstance(model.asr(golden_inputs["speech0_22k"]), str)
    monkeypatch.setattr(native, "load", lambda: None)
    with caplog.at_level("WARNING"):
        slow = gpa.load(mini_dir, device="cpu", quantize="int8", int8_prefill=True, tokenizer_dtype="int8")
    assert not slow.lm.int8_prefill and slow.speed_settings()["tokenizer_dtype"] == "bfloat16"
    assert "int8 products need gpa.native" in caplog.text
