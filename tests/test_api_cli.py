"""End to end on the tiny checkpoint: the Python API and the ``gpa`` command line."""

from __future__ import annotations

import json

import numpy as np
import pytest
import soundfile as sf
import torch

import gpa
from gpa.audio import AudioError, load_audio
from gpa.cli import main
from gpa.prompts import asr_prompt


@pytest.fixture(scope="module")
def model(mini_dir):
    return gpa.load(mini_dir, device="cpu")


FAST = {"max_new_tokens": 24}


def test_asr_pipeline_feeds_raw_audio_to_glm_and_normalised_audio_to_bicodec(model, golden_inputs):
    path = golden_inputs["quiet_24k"]  # quiet: normalisation changes the level a lot
    raw, normed = load_audio(path, normalize=False), load_audio(path)
    prompt = asr_prompt(model.vocab, model.glm.encode([raw])[0], model.bicodec.encode_semantic([normed])[0])
    assert model.asr_prompts([path])[0].prompt_ids == prompt.prompt_ids
    assert model.glm.encode([raw])[0].tolist() != model.glm.encode([normed])[0].tolist()
    assert isinstance(model.asr(path, **FAST), str)


def test_bf16_tokenizers_store_their_matrices_in_bf16_with_the_same_codes(mini_dir, golden_inputs):
    """tokenizer_dtype="bfloat16" stores the matrices of the parts that only run under its autocast in bf16 (autocast
    would cast them on every call): the prompts equal those of autocast over float32 weights."""
    fast = gpa.load(mini_dir, device="cpu", tokenizer_dtype="bfloat16")
    autocast_only = gpa.load(mini_dir, device="cpu")
    autocast_only.tokenizer_dtype = torch.bfloat16
    for part in (fast.glm.encoder, fast.bicodec.wav2vec2, fast.bicodec.encoder):
        linears = [m for m in part.modules() if isinstance(m, torch.nn.Linear)]
        assert linears and all(m.weight.dtype == torch.bfloat16 for m in linears)
    assert all(p.dtype == torch.float32 for p in fast.bicodec.decoder.parameters())  # decoding: its own dtype
    audio = [golden_inputs["long_16k"], golden_inputs["speech0_22k"]]
    assert [p.prompt_ids for p in fast.asr_prompts(audio)] == [p.prompt_ids for p in autocast_only.asr_prompts(audio)]


def test_asr_batch_equals_single(model, golden_inputs):
    files = [golden_inputs[n] for n in ("speech1_8k", "short_16k", "long_16k")]
    # seeded: the tiny random model's transcripts loop, so the loop guard samples again
    assert model.asr_batch(files, **FAST, seed=0) == [model.asr(f, **FAST, seed=0) for f in files]
    assert model.asr_batch(files, None, **FAST) == [model.asr(f, None, **FAST) for f in files]


def _reference_beam_search(model, request, beam_size: int) -> list[int]:
    """Beam search the plain way: every hypothesis re-run from the prompt without a cache (the same rules
    as gpa.generation.beam_search: top beam+1 per hypothesis, finished ones set aside, length-normalised pick)."""
    beams, finished = [(0.0, [])], []
    while True:
        candidates = []
        for score, out in beams:
            with torch.inference_mode():
                logits = model.lm(torch.tensor([request.prompt + out]))[0, -1:].float()
            logits = logits.clone()  # a normal tensor, for the in-place masks
            if request.allowed is not None:
                logits[:, ~request.allowed[: logits.shape[1]]] = float("-inf")
            for f in request.filters:
                f.apply(logits, len(out))
            logp = logits.log_softmax(-1)[0]
            top = logp.topk(min(beam_size + 1, int(torch.isfinite(logp).sum())))
            candidates += [(score + v, out + [t]) for v, t in zip(top.values.tolist(), top.indices.tolist(),
                                                                   strict=True)]
        candidates.sort(key=lambda c: -c[0])
        kept = []
        for score, out in candidates:
            if out[-1] in request.stop or len(out) >= request.params.max_new_tokens:
                finished.append((score, out))
            else:
                kept.append((score, out))
            if len(kept) == beam_size:
                break
        if len(finished) >= beam_size or not kept:
            return max(finished, key=lambda f: f[0] / len(f[1]))[1]
        beams = kept


@pytest.mark.parametrize("beam_size", [2, 3])
def test_asr_beam_search_equals_an_uncached_beam_search(model, golden_inputs, beam_size):
    """The cached beam search (KV rows copied from parent to child hypotheses) finds exactly what re-running
    every hypothesis from scratch finds; beam 1 is greedy."""
    from gpa.config import Task
    from gpa.generation import beam_search, generate

    for name in ("speech1_8k", "short_16k"):
        prompt = model.asr_prompts([golden_inputs[name]])[0].prompt_ids
        request = model.generation_request(Task.ASR, prompt, model.sampling(Task.ASR, max_new_tokens=12))
        assert beam_search(model.lm, request, 1) == generate(model.lm, [request])[0]
        assert beam_search(model.lm, request, beam_size) == _reference_beam_search(model, request, beam_size)
    text = model.asr(golden_inputs["speech1_8k"], None, beam_size, max_new_tokens=12)
    assert isinstance(text, str) and text == model.asr(golden_inputs["speech1_8k"], None, beam_size, max_new_tokens=12)
    with pytest.raises(ValueError, match="beam_size must be >= 1"):
        model.asr(golden_inputs["speech1_8k"], beam_size=0)


def test_tts_output_is_320_samples_per_token_and_seeded(model, golden_inputs):
    ref = golden_inputs["speech0_22k"]
    wav, sr = model.tts("Hello there.", ref, seed=3, temperature=0.8, max_new_tokens=20)
    again, _ = model.tts("Hello there.", ref, seed=3, temperature=0.8, max_new_tokens=20)
    assert sr == 16000 and wav.dtype == np.float32
    assert len(wav) % 320 == 0 and 0 < len(wav) <= 20 * 320
    assert np.array_equal(wav, again)
    assert abs(float(wav.mean())) < 1e-4  # DC removed


def test_tts_with_reference_transcript_and_voice_reuse(model, golden_inputs):
    ref = golden_inputs["short_16k"]
    voice = model.voice(ref, text="Rice is often served in round bowls.")
    assert voice.global_codes.shape == (32,) and voice.semantic_codes is not None
    wav, _ = model.tts(" And soup too.", voice, seed=0, **FAST)
    assert len(wav) % 320 == 0
    plain = model.voice(ref)
    assert torch.equal(plain.global_codes, voice.global_codes)


def test_vc_output(model, golden_inputs):
    wav, sr = model.vc(golden_inputs["speech1_8k"], golden_inputs["speech2_22k"], seed=0, **FAST)
    assert sr == 16000 and len(wav) % 320 == 0 and len(wav) > 0


def test_array_input_equals_file_input(model, golden_inputs):
    path = golden_inputs["speech1_8k"]
    data, sr = sf.read(str(path), dtype="float32")
    assert model.asr((data, sr), **FAST) == model.asr(path, **FAST)


def test_api_bad_input(model, golden_inputs, tmp_path):
    ref = golden_inputs["short_16k"]
    with pytest.raises(ValueError, match="unknown sampling option.*'beam_size'"):
        model.tts("hi", ref, beam_size=2)
    with pytest.raises(ValueError, match="text to synthesise is empty"):
        model.tts("  ", ref)
    with pytest.raises(AudioError, match="not found"):
        model.asr(tmp_path / "missing.wav")
    with pytest.raises(AudioError, match="silent"):
        model.vc((np.zeros(16000, dtype=np.float32), 16000), ref)
    with pytest.raises(ValueError, match="input too long"):
        model.tts("hi", ref, max_new_tokens=10**6)


def test_cli_asr_text_and_json(mini_dir, golden_inputs, capsys):
    files = [str(golden_inputs["speech1_8k"]), str(golden_inputs["short_16k"])]
    assert main(["asr", *files, "--model", str(mini_dir), "--max-new-tokens", "8", "--no-progress"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2
    assert main(["asr", *files, "--model", str(mini_dir), "--max-new-tokens", "8", "--format", "json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["file"] for r in rows] == files and [r["text"] for r in rows] == lines
    # beam search and the loop guard's threshold from the command line give what the API gives
    assert main(["asr", files[0], "--model", str(mini_dir), "--max-new-tokens", "8", "--beam-size", "3",
                 "--compression-ratio-threshold", "0", "--no-progress"]) == 0
    model = gpa.load(mini_dir, device="cpu")
    assert capsys.readouterr().out.strip() == model.asr(files[0], None, 3, max_new_tokens=8)


def test_cli_tts_and_vc_write_audio(mini_dir, golden_inputs, tmp_path):
    ref = str(golden_inputs["speech0_22k"])
    out = tmp_path / "out.wav"
    assert main(["tts", "Hello.", "--reference", ref, "-o", str(out), "--model", str(mini_dir),
                 "--max-new-tokens", "10", "--seed", "1"]) == 0
    data, sr = sf.read(str(out))
    assert sr == 16000 and 0 < len(data) <= 3200
    lst = tmp_path / "sources.txt"
    lst.write_text(f"{golden_inputs['speech1_8k']}\n{golden_inputs['short_16k']}\n")
    outdir = tmp_path / "vc"
    assert main(["vc", "--list", str(lst), "--reference", ref, "-o", str(outdir), "--model", str(mini_dir),
                 "--max-new-tokens", "10", "--no-progress"]) == 0
    assert sorted(p.name for p in outdir.iterdir()) == ["short_16k.wav", "speech1_8k.wav"]


def test_cli_errors(mini_dir, golden_inputs, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("GPA_MODEL", raising=False)
    assert main(["asr", str(golden_inputs["short_16k"])]) == 2
    assert "no model given" in capsys.readouterr().err
    assert main(["asr", str(tmp_path / "nope.wav"), "--model", str(mini_dir)]) == 1
    assert "Skipping" in capsys.readouterr().err and True
    assert main(["asr", str(golden_inputs["short_16k"]), "--model", str(tmp_path)]) == 1
    assert "missing: config.json" in capsys.readouterr().err
    assert main(["tts", "hi", "--reference", str(tmp_path / "r.wav"), "-o", str(tmp_path / "o.wav"),
                 "--model", str(mini_dir)]) == 1
    assert "not found" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["asr", "x.wav", "--best-of", "3"])
    assert "unrecognized arguments: --best-of" in capsys.readouterr().err


def test_reference_voices_are_cached_by_content(model, golden_inputs, tmp_path):
    path = golden_inputs["speech2_22k"]
    first = model.voice(path)
    copy = tmp_path / "same_audio_other_name.wav"
    copy.write_bytes(path.read_bytes())
    assert model.voice(copy) is first  # same samples, another file: no second tokenization
    assert model.voice(path, text="with a transcript") is not first
    assert model.voice(golden_inputs["speech1_22k"]) is not first


def test_long_text_is_split_not_truncated(model, golden_inputs):
    from gpa.text import split_text

    voice = model.voice(golden_inputs["speech0_22k"])
    text = "This is a fairly long sentence that keeps going for a while. " * 6
    pieces = split_text(text)
    assert len(pieces) > 1
    options = {"seed": 4, "temperature": 0.7, "max_new_tokens": 12}
    whole, _ = model.tts(text, voice, **options)
    parts = [model.tts(p, voice, **options)[0] for p in pieces]
    assert np.array_equal(whole, np.concatenate(parts))
