"""The Qwen3 LM and generation: golden logits, cache invariants, constrained decoding, strict loading."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from gpa.checkpoint import Checkpoint, load_lm
from gpa.config import DEFAULT_SAMPLING, ModelConfig, SamplingParams, Task
from gpa.generation import GenerationRequest, SlotDecoder, generate
from gpa.kv_cache import KVCache
from gpa.logits import allowed_ids, stop_ids, task_filters
from gpa.sampling import repetition_penalty, top_k_filter, top_p_filter
from gpa.vocab import Vocab
from gpa.weights import CheckpointError, build_for_loading, load_strict
from tests.conftest import rel_err


@pytest.fixture(scope="module")
def lm(mini_dir):
    return load_lm(Checkpoint.open(mini_dir))


@pytest.fixture(scope="module")
def vocab(mini_dir):
    return Vocab.from_dir(mini_dir)


@pytest.mark.fidelity
def test_prompt_logits_match_reference(lm, golden, expected):
    for key in expected["prompts"]:
        ids = golden[f"prompt.{key}"][None]
        logits = lm(ids)[0, -8:]
        assert rel_err(logits, golden[f"logits.{key}"]) < 1e-4, key


@pytest.mark.fidelity
def test_greedy_matches_reference(lm, golden, expected):
    reqs = [GenerationRequest(golden[f"prompt.{k}"].tolist(), SamplingParams(temperature=0, max_new_tokens=16))
            for k in expected["prompts"]]
    for key, out in zip(expected["prompts"], generate(lm, reqs), strict=True):
        assert out == golden[f"greedy16.{key}"].tolist(), key


def _random_ids(n: int, vocab_size: int, seed: int) -> list[int]:
    return torch.randint(0, vocab_size, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_cached_decode_equals_uncached_forward(lm):
    cfg = lm.config
    seq = _random_ids(40, cfg.vocab_size, 0)
    full = lm(torch.tensor([seq]))[0]  # (40, V)
    cache = KVCache(cfg.num_hidden_layers, 1, cfg.num_key_value_heads, 64, cfg.head_dim)
    step_logits = [lm(torch.tensor([seq[:25]]), cache=cache)[0]]
    for pos in range(25, 40):
        step_logits.append(lm(torch.tensor([[seq[pos]]]), torch.tensor([[pos]]), cache=cache)[0])
    assert torch.allclose(torch.cat(step_logits), full, atol=1e-4, rtol=1e-4)


def test_padded_batch_forward_equals_single(lm):
    a, b = _random_ids(30, lm.config.vocab_size, 1), _random_ids(18, lm.config.vocab_size, 2)
    pad = [0] * 12
    ids = torch.tensor([a, b + pad])
    mask = torch.tensor([[True] * 30, [True] * 18 + [False] * 12])
    out = lm(ids, padding_mask=mask)
    assert torch.allclose(out[0], lm(torch.tensor([a]))[0], atol=1e-4)
    assert torch.allclose(out[1, :18], lm(torch.tensor([b]))[0], atol=1e-4)


def test_batched_generation_equals_single(lm, golden, expected):
    keys = expected["prompts"][2:5]  # an ASR, a TTS and a VC prompt of different lengths
    params = [SamplingParams(temperature=0, max_new_tokens=12),
              SamplingParams(temperature=0.9, top_k=40, top_p=0.9, repetition_penalty=1.3, seed=7, max_new_tokens=20)]
    for sp in params:
        reqs = [GenerationRequest(golden[f"prompt.{k}"].tolist(), sp) for k in keys]
        batched = generate(lm, reqs)
        singles = [generate(lm, [r])[0] for r in reqs]
        assert batched == singles


def test_seed_reproducible_and_seeds_differ(lm, golden):
    prompt = golden["prompt.tts.short_16k"].tolist()

    def run(seed: int) -> list[int]:
        sp = SamplingParams(temperature=1.0, seed=seed, max_new_tokens=24)
        return generate(lm, [GenerationRequest(prompt, sp)])[0]

    assert run(1) == run(1)
    assert run(1) != run(2)


@pytest.mark.parametrize("task", list(Task))
def test_constrained_decoding_stays_in_task_set(lm, vocab, golden, task):
    prompt = golden["prompt.stt.speech0_22k" if task is Task.ASR else "prompt.tts.short_16k"].tolist()
    allowed = allowed_ids(vocab, task, lm.config.vocab_size)
    sp = SamplingParams(temperature=1.5, max_new_tokens=60, seed=0)
    reqs = [GenerationRequest(prompt, sp.replace(seed=s), task_filters(vocab, task, lm.config.vocab_size),
                              stop_ids(vocab, task)) for s in range(4)]
    for out in generate(lm, reqs):
        assert out and all(allowed[t] for t in out)
        assert out[0] != vocab.end
        assert all(t not in stop_ids(vocab, task) for t in out[:-1])
    if task is Task.ASR:
        assert not allowed[vocab.semantic.offset] and allowed[vocab.end_content]
    else:
        assert allowed[vocab.semantic.offset] and not allowed[5] and allowed[vocab.end]


def test_sampling_filters():
    logits = torch.tensor([[3.0, 2.0, 1.0, -1.0]])
    assert torch.isinf(top_k_filter(logits, 2)[0, 2:]).all() and not torch.isinf(top_k_filter(logits, 2)[0, :2]).any()
    kept = ~torch.isinf(top_p_filter(logits, 0.7))[0]
    assert kept.tolist() == [True, True, False, False]  # p(3.0) = 0.66 < 0.7, so the second is needed
    assert (~torch.isinf(top_p_filter(logits, 0.01))).sum() == 1
    row = logits[0].clone()
    repetition_penalty(row, torch.tensor([0, 3]), 2.0)
    assert row.tolist() == [1.5, 2.0, 1.0, -2.0]


def test_sampled_tokens_follow_the_filtered_distribution():
    """sample_next draws from softmax(logits / T) after top-k and top-p, over the finite ids only: frequencies of
    4,000 draws match the distribution those filters give (computed here with the plain filters)."""
    from gpa.sampling import sample_next

    g = torch.Generator().manual_seed(0)
    row = torch.randn(300, generator=g) * 2
    row[::3] = float("-inf")  # outside the task's ids
    row[10] = row[13] = row[16] = row.max() + 1  # a tie
    params = SamplingParams(temperature=0.7, top_k=12, top_p=0.9)
    expected = top_p_filter(top_k_filter(row[None] / 0.7, 12), 0.9).softmax(-1)[0]
    torch.manual_seed(0)
    draws = sample_next(row.repeat(4000, 1), [params] * 4000, [None] * 4000)
    freq = torch.bincount(draws, minlength=300).float() / 4000
    assert set(draws.tolist()) <= set(torch.nonzero(expected).flatten().tolist())
    assert (freq - expected).abs().max() < 0.03


def test_batched_sampling_equals_each_row_alone():
    """sample_next runs rows sharing a top-k as one batch; every row's token equals sample_row's on that row alone
    with the same seed: mixed temperatures and top-p, a tie at the k-th value, a row with fewer than k finite
    logits, rows without top-k, greedy rows, and a restricted vocabulary (-inf outside it)."""
    from gpa.sampling import sample_next, sample_row

    g = torch.Generator().manual_seed(5)
    logits = torch.randn(9, 500, generator=g) * 3
    logits[:, ::4] = float("-inf")
    logits[2, :] = float("-inf")
    logits[2, :7] = torch.arange(7.0)  # 7 finite logits, top-k 20
    logits[3, 40] = logits[3, 44] = logits[3].topk(20).values[-1]  # the 20th value shared by two ids
    params = [SamplingParams(temperature=0.8, top_k=20, top_p=0.95)] * 4 + [
        SamplingParams(temperature=1.3, top_k=20, top_p=0.5), SamplingParams(temperature=0.8, top_k=20, top_p=1.0),
        SamplingParams(temperature=0.7, top_k=None, top_p=0.9), SamplingParams(temperature=0.0),
        SamplingParams(temperature=1.0, top_k=5, top_p=0.8)]
    for seed in range(25):
        gens = [torch.Generator().manual_seed(seed * 100 + b) for b in range(len(params))]
        alone = [torch.Generator().manual_seed(seed * 100 + b) for b in range(len(params))]
        got = sample_next(logits, params, gens).tolist()
        expected = [int(logits[b].argmax()) if sp.temperature == 0 else sample_row(logits[b], sp, alone[b])
                    for b, sp in enumerate(params)]
        assert got == expected, seed
        assert [x.get_state().tolist() for x in gens] == [x.get_state().tolist() for x in alone]


def test_sampling_params_validation_and_defaults():
    assert DEFAULT_SAMPLING[Task.ASR].temperature == 0
    assert DEFAULT_SAMPLING[Task.TTS].temperature == 0.2 and DEFAULT_SAMPLING[Task.TTS].repetition_penalty == 1.2
    with pytest.raises(ValueError, match="unknown sampling option.*'beam_size'"):
        DEFAULT_SAMPLING[Task.TTS].replace(beam_size=4)
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0)
    with pytest.raises(ValueError, match="unknown task 'translate'"):
        Task.parse("translate")
    assert Task.parse("stt") is Task.ASR and Task.parse("tts-a") is Task.TTS
    with pytest.raises(ValueError, match="unknown ModelConfig keys"):
        ModelConfig.from_dict({"vocab_size": 1, "bogus": 2})


def _copy_ckpt(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("BiCodec", "glm-4-voice-tokenizer"))
    return dst


def test_lm_strict_load_errors_name_the_problem(tmp_path, mini_dir):
    with pytest.raises(CheckpointError, match="missing: .*glm-4-voice-tokenizer/config.json"):
        Checkpoint.open(_copy_ckpt(mini_dir, tmp_path / "c"))
    ckpt = Checkpoint(_copy_ckpt(mini_dir, tmp_path / "d"))
    state = load_file(str(ckpt.llm_weights))
    del state["model.layers.1.mlp.up_proj.weight"]
    state["model.norm.weight"] = torch.ones(7)
    state["model.extra.weight"] = torch.ones(1)
    os.chmod(ckpt.llm_weights, 0o644)
    save_file(state, str(ckpt.llm_weights))
    with pytest.raises(CheckpointError) as err:
        load_lm(ckpt)
    msg = str(err.value)
    assert "model.layers.1.mlp.up_proj.weight" in msg and "model.extra.weight" in msg and "model.norm.weight" in msg
    ckpt.llm_weights.write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="cannot read .*model.safetensors"):
        load_lm(ckpt)
    with pytest.raises(CheckpointError, match="directory not found"):
        Checkpoint.open(tmp_path / "nowhere")


def test_output_heads_are_built_once_per_model(mini_dir, vocab):
    """Decoders of one model share its heads (the API makes a decoder per call; an int8 head of the 0.3B model
    takes ~0.4 s to build); moving or casting the model drops them."""
    lm = load_lm(Checkpoint.open(mini_dir), quantize="int8")
    allowed = allowed_ids(vocab, Task.TTS, lm.config.vocab_size)
    first, second = SlotDecoder(lm, 1, 8), SlotDecoder(lm, 2, 8)
    first.prepare_heads([allowed, None])
    assert second._full() is first._full() and second._head(allowed) is first._head(allowed)
    assert lm.head_cache
    lm.to(torch.float32)
    assert not lm.head_cache
    plain = load_lm(Checkpoint.open(mini_dir))
    head = SlotDecoder(plain, 1, 8)._head(allowed).module
    assert SlotDecoder(plain, 1, 8)._head(allowed).module is head
    with torch.no_grad():
        plain.head_weight().mul_(2)  # trained in place: the copied rows are stale
    assert SlotDecoder(plain, 1, 8)._head(allowed).module is not head


@pytest.mark.parametrize("task", [Task.TTS, Task.VC])
def test_restricted_head_equals_full_head(lm, vocab, golden, task):
    """Computing the head over the task's ids only gives the same logits there and the same tokens: decode steps
    then sample in the id set itself (penalties, suppression at the start, top-k/top-p), batched, and every
    row draws what the full-vocabulary path draws."""
    key = "prompt.tts.speech1_8k" if task is Task.TTS else "prompt.vc.speech0_22k.speech2_22k"
    allowed = allowed_ids(vocab, task, lm.config.vocab_size)
    filters, stops = task_filters(vocab, task, lm.config.vocab_size, allowed), stop_ids(vocab, task)
    params = [SamplingParams(temperature=0.8, seed=5, max_new_tokens=40),
              SamplingParams(temperature=1.0, seed=6, repetition_penalty=1.3, top_k=20, top_p=0.9, max_new_tokens=30),
              SamplingParams(temperature=0.0, repetition_penalty=1.2, max_new_tokens=25)]
    reqs = [GenerationRequest(golden[key].tolist(), p, filters, stops, allowed) for p in params]
    hidden = torch.randn(3, lm.config.hidden_size)
    full = torch.nn.functional.linear(hidden, lm.head_weight())
    outs = []
    for restrict in (False, True):
        dec = SlotDecoder(lm, 3, 512, restrict_head=restrict)
        states = [dec.prefill(r) for r in reqs]
        assert (dec._compact_head(states) is not None) == restrict  # the id-set path really runs
        while active := [s for s in states if not s.finished]:
            dec.step(active)
        outs.append([s.output for s in states])
        logits = dec._logits(hidden, states[:1] * 3)
        assert torch.allclose(logits[:, allowed], full[:, allowed], atol=1e-5)
        assert torch.isinf(logits[:, ~allowed]).all() == restrict
    assert outs[0] == outs[1]
    assert all(stops.isdisjoint(o[:1]) and set(o) <= set(torch.nonzero(allowed).flatten().tolist()) for o in outs[1])


def test_int8_weight_only_quantization(mini_dir, golden, expected):
    """int8 layers stay close to float32; the accuracy cost is measured here, not assumed."""
    from gpa.quant import Int8Linear

    w = torch.randn(96, 64)
    lin, q = torch.nn.Linear(64, 96, bias=False), Int8Linear(w)
    lin.weight.data = w
    for rows in (5, 40):  # the int8 kernel, and the dequantized path for many rows
        x = torch.randn(rows, 64)
        assert rel_err(q(x), lin(x)) < 0.02
    ckpt = Checkpoint.open(mini_dir)
    ref, quant = load_lm(ckpt), load_lm(ckpt, quantize="int8")
    assert quant.weight_quant == "int8" and isinstance(quant.model.layers[0].mlp.up_proj, Int8Linear)
    # the activations (and KV cache) keep the dtype asked for: float32 unless told otherwise
    assert quant.head_weight().dtype == torch.float32
    assert load_lm(ckpt, dtype=torch.bfloat16, quantize="int8").head_weight().dtype == torch.bfloat16
    for key in expected["prompts"]:
        ids = golden[f"prompt.{key}"][None]
        assert rel_err(quant(ids)[0, -8:], ref(ids)[0, -8:]) < 0.05, key
    with pytest.raises(ValueError, match="unknown quantization 'int3'"):
        load_lm(ckpt, quantize="int3")


def test_int4_weight_only_quantization(mini_dir, golden, expected):
    """int4 (groups of 64 inputs, torch's CPU kernel): the product's error is that of 4-bit rounding
    (measured: ~9 % on a random matrix, against 0.8 % for int8), and the model's logits stay near
    float32's; the accuracy cost of the mode is measured here, not assumed."""
    from gpa.quant import INT4_GROUP, Int4Linear, Int8Linear, quantize_weights

    g = torch.Generator().manual_seed(0)
    w = torch.randn(128, 2 * INT4_GROUP, generator=g)
    q = Int4Linear(w)
    assert q.weight.dtype == torch.uint8 and q.weight.numel() == w.numel() // 2  # half a byte per weight
    for rows in (1, 5, 40):
        x = torch.randn(rows, w.shape[1], generator=g)
        assert 0.02 < rel_err(q(x), x @ w.T) < 0.12  # really 4-bit, and no worse than 4-bit should be
        assert torch.equal(q(x), torch.cat([q(x[i : i + 1]) for i in range(rows)]))  # batched == single
    # an all-equal group (zero range) and exact group values survive
    flat = Int4Linear(torch.full((64, INT4_GROUP), 0.25))
    assert torch.allclose(flat(torch.ones(1, INT4_GROUP)), torch.full((1, 64), 0.25 * INT4_GROUP))
    with pytest.raises(ValueError, match="int4 needs out features divisible by 64"):
        Int4Linear(torch.randn(48, INT4_GROUP))
    # a module whose layers do not all fit the blocks keeps them together, in int8
    mixed = torch.nn.Module()
    mixed.q_proj, mixed.k_proj = torch.nn.Linear(64, 64, bias=False), torch.nn.Linear(64, 32, bias=False)
    assert quantize_weights(mixed, "int4") == 2 and isinstance(mixed.q_proj, Int8Linear)

    ckpt = Checkpoint.open(mini_dir)
    ref, quant = load_lm(ckpt), load_lm(ckpt, quantize="int4")
    assert quant.weight_quant == "int4" and isinstance(quant.model.layers[0].mlp.up_proj, Int4Linear)
    for key in expected["prompts"]:
        ids = golden[f"prompt.{key}"][None]
        assert rel_err(quant(ids)[0, -8:], ref(ids)[0, -8:]) < 0.25, key


@pytest.mark.parametrize("mask_kind", ["causal", "none", "tensor"])
def test_explicit_attention_matches_fused_kernel(mask_kind):
    from gpa.model import attend

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 5, 16, generator=g), torch.randn(2, 2, 9, 16, generator=g),
               torch.randn(2, 2, 9, 16, generator=g))
    if mask_kind == "causal":
        q, mask = torch.randn(2, 4, 9, 16, generator=g), True
    elif mask_kind == "none":
        mask = False
    else:
        mask = torch.rand(2, 1, 5, 9, generator=g) > 0.3
        mask[..., 0] = True
    ref = attend(q, k, v, mask)  # float32: the fused kernel
    low = attend(q.bfloat16(), k.bfloat16(), v.bfloat16(), mask).float()  # bfloat16: the explicit path
    assert rel_err(low, ref) < 2e-2


def test_filters_on_an_id_subset_equal_the_full_vocabulary():
    """apply_ids on logits over some ids gives the columns apply gives on the full vocabulary."""
    from gpa.logits import AllowedIds, SuppressAtStart

    g = torch.Generator().manual_seed(0)
    allowed = torch.zeros(50, dtype=torch.bool)
    allowed[[3, 7, 8, 20, 41]] = True
    ids = torch.tensor([2, 3, 7, 20, 41, 49])  # a subset with disallowed ids in it too
    for f in (AllowedIds(allowed), SuppressAtStart([7, 41], steps=2), SuppressAtStart([0], steps=1)):
        assert f.supports_ids
        for generated in (0, 1, 2):
            full = torch.randn(2, 50, generator=g)
            sub = full[:, ids].clone()
            f.apply(full, generated)
            f.apply_ids(sub, ids, generated)
            assert torch.equal(sub, full[:, ids]), (f, generated)


def test_build_for_loading_skips_init_and_keeps_computed_buffers():
    """build_for_loading: parameters and persistent buffers get (uninitialised) CPU storage that load_strict then
    fills, buffers the constructor computed on an explicit device are kept as computed, and a non-persistent
    buffer that would be left on the meta device is refused."""

    class Part(torch.nn.Module):
        def __init__(self, stray: bool = False) -> None:
            super().__init__()
            self.proj = torch.nn.Linear(4, 3)
            self.register_buffer("stats", torch.zeros(3))
            self.register_buffer("window", torch.hann_window(8, device="cpu"), persistent=False)
            if stray:
                self.register_buffer("lost", torch.ones(2), persistent=False)

    part = build_for_loading(Part)
    assert all(t.device.type == "cpu" for t in [*part.parameters(), *part.buffers()])
    assert torch.equal(part.window, torch.hann_window(8))
    state = {"proj.weight": torch.randn(3, 4), "proj.bias": torch.randn(3), "stats": torch.randn(3)}
    load_strict(part, state, "test")
    assert all(torch.equal(part.state_dict()[k], v) for k, v in state.items())
    with pytest.raises(RuntimeError, match="lost: a non-persistent buffer built on the meta device"):
        build_for_loading(lambda: Part(stray=True))


def _spy_prefill_lengths(decoder: SlotDecoder, monkeypatch) -> list[int]:
    """The number of prompt tokens each forward pass of ``decoder``'s model runs."""
    lengths: list[int] = []
    model = decoder.model
    forward = type(model).forward

    def spy(self, ids, *args, **kwargs):
        lengths.append(ids.shape[1])
        return forward(self, ids, *args, **kwargs)

    monkeypatch.setattr(type(model), "forward", spy)
    return lengths


@pytest.mark.parametrize("quantize", ["none", "int8"])
def test_prefix_cache_prefills_only_the_rest_and_gives_the_same_tokens(mini_dir, quantize, monkeypatch):
    """Requests sharing a prefix (a voice block): with a prefix cache the second prefill runs only the tokens after
    it, its logits agree with a full prefill to float rounding, and greedy generation gives the same tokens."""
    lm = load_lm(Checkpoint.open(mini_dir), quantize=quantize)
    voice = _random_ids(20, lm.config.vocab_size, 1)
    prompts = [voice + _random_ids(n, lm.config.vocab_size, 2 + n) for n in (9, 14, 9)]
    params = SamplingParams(temperature=0, max_new_tokens=6)
    requests = [GenerationRequest(p, params, prefix=len(voice)) for p in prompts]
    plain = SlotDecoder(lm, 1, 64)
    cached = SlotDecoder(lm, 1, 64, prefix_cache=2)
    lengths = _spy_prefill_lengths(cached, monkeypatch)
    for i, request in enumerate(requests):
        state, logits = cached.prefill_logits(request)
        cached.release(state)
        ref_state, ref = plain.prefill_logits(request)
        plain.release(ref_state)
        assert lengths[-2] == (len(request.prompt) if i == 0 else len(request.prompt) - len(voice))
        if quantize == "none":
            assert torch.allclose(logits, ref, atol=1e-4, rtol=1e-4), i
        else:  # bfloat16 activations: rounding at bfloat16's precision
            assert rel_err(logits, ref) < 1e-2, i
    assert [generate(lm, [r])[0] for r in requests] == [
        _generate_with(cached, r) for r in requests]


def _generate_with(decoder: SlotDecoder, request: GenerationRequest) -> list[int]:
    state = decoder.prefill(request)
    while not state.finished:
        decoder.step([state])
    decoder.release(state)
    return state.output


def test_prefix_cache_keeps_the_most_recent_prefixes(lm):
    params = SamplingParams(temperature=0, max_new_tokens=2)
    voices = [_random_ids(12, lm.config.vocab_size, 10 + v) for v in range(3)]
    decoder = SlotDecoder(lm, 1, 64, prefix_cache=2)
    for v in (0, 1, 0, 2):  # voice 1 is the least recently used when voice 2 comes
        state = decoder.prefill(GenerationRequest(voices[v] + [5, 6, 7], params, prefix=12))
        decoder.release(state)
    assert list(decoder._prefixes) == [tuple(voices[0]), tuple(voices[2])]
    state = decoder.prefill(GenerationRequest(voices[0][:5], params, prefix=12))  # prefix not shorter: not cached
    decoder.release(state)
    assert len(decoder._prefixes) == 2
    with pytest.raises(ValueError, match="prefix_cache must be >= 0"):
        SlotDecoder(lm, 1, 8, prefix_cache=-1)
