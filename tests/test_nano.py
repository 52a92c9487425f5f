"""GPA-nano: int8 weight packing, the nano codec's shapes and streaming, nano checkpoints through the API,
the engine and prepare -> train -> export, and the default-model resolution.

Everything runs on a tiny random-weight nano checkpoint built by the ``nano_dir`` fixture (conftest).
"""

from __future__ import annotations

import asyncio
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import gpa
import gpa.checkpoint
from gpa import native
from gpa.api import GPA
from gpa.audio import load_audio, volume_normalize
from gpa.checkpoint import BUNDLED_MODEL, Checkpoint, resolve_model
from gpa.cli import main
from gpa.codecs.nano import (
    NanoASRTokenizer,
    NanoCodec,
    NanoCodecConfig,
    fsq_quantize,
    fsq_quantize_v1,
    fsq_values,
)
from gpa.engine import AudioChunk, Engine, EngineConfig, StreamConfig
from gpa.generation import SlotDecoder
from gpa.prompts import asr_prompt
from gpa.train.nano_codec import (
    MEL_STEP,
    DecoderTraining,
    Features,
    Utterance,
    extract,
    extract_compact,
    heldout_l1,
    mel_target,
    train_decoder,
)
from gpa.weights import INT8_SCALE, CheckpointError, pack_int8, read_safetensors, unpack_int8

CLIPS = {  # CC0 clips of one speaker (../shared/data/cathy) with their transcripts
    "arctic_a0207_1592712443": "How much was it.",
    "arctic_a0158_1592713822": "Does that look good.",
    "arctic_a0098_1592746262": "Shall I carry you.",
}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="session")
def cathy(fixtures: Path) -> Path:
    return fixtures.parent / "data" / "cathy"


@pytest.fixture(scope="module")
def codec(nano_dir: Path) -> NanoCodec:
    return NanoCodec.from_dir(nano_dir / "nano-codec")


@pytest.fixture(scope="module")
def model(nano_dir: Path) -> GPA:
    return gpa.load(nano_dir, device="cpu")


def random_codes(codec: NanoCodec, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(0, codec.semantic_codebook_size, (1, n), generator=g),
            torch.randint(0, codec.global_codebook_size, (1, codec.num_global_tokens), generator=g))


# --- int8 weights ---------------------------------------------------------------------------------------


def test_int8_pack_round_trip_error_is_at_most_half_a_step():
    g = torch.Generator().manual_seed(0)
    rows = torch.logspace(-4, 2, 300)[:, None]  # rows of very different magnitudes: one scale per row
    state = {"linear": torch.randn(300, 80, generator=g) * rows, "conv": torch.randn(64, 32, 9, generator=g),
             "small": torch.randn(10, 10, generator=g), "vector": torch.randn(20000, generator=g),
             "ids": torch.arange(20000).reshape(200, 100)}
    packed = pack_int8(state)
    assert packed["linear"].dtype == packed["conv"].dtype == torch.int8
    assert packed["linear" + INT8_SCALE].shape == (300, 1) and packed["conv" + INT8_SCALE].shape == (64, 1, 1)
    assert {k for k, v in packed.items() if v.dtype == torch.int8} == {"linear", "conv"}  # small, 1-D, integer kept
    back = unpack_int8(packed, "test")
    assert set(back) == set(state)
    for name in ("linear", "conv"):
        x = state[name]
        bound = x.abs().amax(dim=tuple(range(1, x.dim())), keepdim=True) / 254
        assert ((back[name] - x).abs() <= bound * (1 + 1e-5)).all(), name
        assert back[name].dtype == torch.float32
    for name in ("small", "vector", "ids"):
        assert torch.equal(back[name], state[name])
    assert pack_int8(state, skip=("lin",))["linear"].dtype == torch.float32


def test_int8_without_its_scale_or_scale_without_int8_is_an_error():
    packed = pack_int8({"w": torch.randn(200, 100)})
    with pytest.raises(CheckpointError, match="int8 tensors without a scale: w"):
        unpack_int8({"w": packed["w"]}, "file.safetensors")
    with pytest.raises(CheckpointError, match=f"w{INT8_SCALE} has no int8 tensor w"):
        unpack_int8({"w" + INT8_SCALE: packed["w" + INT8_SCALE]}, "file.safetensors")


def test_int8_codec_decodes_close_to_the_float_codec(nano_config, tmp_path):
    torch.manual_seed(1)
    codec = NanoCodec(nano_config)
    codec.save(tmp_path / "float", int8=False)
    codec.save(tmp_path / "int8", int8=True)
    stored = read_safetensors(tmp_path / "int8" / "model.safetensors")
    int8 = sorted(k for k, v in stored.items() if v.dtype == torch.int8)
    assert any(k.startswith("decoder.") for k in int8), int8  # the comparison below exercises int8 weights
    assert not any(k.startswith(("semantic_kmeans.", "asr_kmeans.", "decoder.mel_table")) for k in int8)
    assert stored["semantic_kmeans.centroids"].dtype == torch.float32  # code choice: full precision
    assert stored["decoder.mel_table.weight"].dtype == torch.float16
    size = {d: (tmp_path / d / "model.safetensors").stat().st_size for d in ("float", "int8")}
    assert size["int8"] < size["float"]
    a, b = NanoCodec.from_dir(tmp_path / "float"), NanoCodec.from_dir(tmp_path / "int8")
    semantic, glob = random_codes(a, 30, 0)
    ref, got = a.decode(semantic, glob), b.decode(semantic, glob)
    assert torch.equal(ref, codec.decode(semantic, glob))  # the float file is exact
    assert 0 < float((got - ref).norm() / ref.norm()) < 0.05


# --- checkpoint layout ----------------------------------------------------------------------------------


def test_nano_checkpoint_kind_and_missing_files(nano_dir, mini_dir, tmp_path):
    ckpt = Checkpoint.open(nano_dir)
    assert ckpt.kind == "nano" and ckpt.codec_dirs() == [nano_dir / "nano-codec"]
    assert Checkpoint.open(mini_dir).kind == "official"
    broken = tmp_path / "broken"
    shutil.copytree(nano_dir, broken)
    (broken / "nano-codec" / "model.safetensors").unlink()
    (broken / "tokenizer.json").unlink()
    with pytest.raises(CheckpointError, match=r"missing: tokenizer.json, nano-codec/model.safetensors"):
        Checkpoint.open(broken)


def test_nano_codec_weight_files_hold_only_their_parts(nano_dir, tmp_path):
    from safetensors.torch import save_file

    from gpa.weights import read_safetensors

    files = sorted(p.name for p in (nano_dir / "nano-codec").glob("*.safetensors"))
    assert files == ["encoder.safetensors", "model.safetensors", "vocoder.safetensors"]
    assert all(k.startswith("whisper.") for k in read_safetensors(nano_dir / "nano-codec" / "encoder.safetensors"))
    bad = tmp_path / "nano-codec"
    shutil.copytree(nano_dir / "nano-codec", bad)
    state = read_safetensors(bad / "model.safetensors")
    state.update({k: v for k, v in read_safetensors(bad / "vocoder.safetensors").items()
                  if k.startswith("vocoder.conv_post")})  # a vocoder tensor in the trained-parts file
    save_file(state, str(bad / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"model.safetensors holds tensors that belong in another file: "
                                              r"\['vocoder.conv_post"):
        NanoCodec.from_dir(bad)
    (bad / "encoder.safetensors").unlink()
    with pytest.raises(CheckpointError, match="encoder.safetensors"):
        NanoCodec.from_dir(bad)


def test_nano_codec_config_rejects_unknown_keys(nano_dir, tmp_path):
    bad = tmp_path / "nano-codec"
    shutil.copytree(nano_dir / "nano-codec", bad)
    raw = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**raw, "decoder_width": 3}))
    with pytest.raises(CheckpointError, match="decoder_width"):
        NanoCodec.from_dir(bad)


# --- the codec ------------------------------------------------------------------------------------------


def test_semantic_and_asr_code_counts(codec, cathy):
    speech = load_audio(cathy / "arctic_a0207_1592712443.flac")
    rng = np.random.default_rng(0)
    for n in (400, 1600, 1601, 12345, 16000, len(speech)):  # down to 25 ms
        wav = speech[:n] if n <= len(speech) else rng.standard_normal(n).astype(np.float32) * 0.1
        t = codec.num_codes(n)
        assert t == max(1, round(n / 16000 * codec.frame_rate))
        semantic, asr = codec.encode_semantic([wav])[0], codec.encode_asr([wav])[0]
        assert semantic.shape == (t,) and semantic.dtype == torch.int64
        assert asr.shape == (math.ceil(t / codec.config.asr_stride),)
        assert 0 <= semantic.min() and semantic.max() < codec.semantic_codebook_size
        assert 0 <= asr.min() and asr.max() < codec.config.asr_codebook_size
    assert codec.num_codes(1600) == 2 and codec.frame_rate == 22050 / codec.hop_length


def test_encoding_is_per_item_and_asr_tokenizer_reads_normalised_audio(codec, cathy):
    a = load_audio(cathy / "arctic_a0207_1592712443.flac")
    b = load_audio(cathy / "arctic_a0158_1592713822.flac")
    both = codec.encode_semantic([a, b])
    assert [x.tolist() for x in both] == [codec.encode_semantic([w])[0].tolist() for w in (a, b)]
    assert [(s.tolist(), r.tolist()) for s, r in codec.encode_both([a, b])] == [
        (s.tolist(), r.tolist()) for s, r in zip(both, codec.encode_asr([a, b]), strict=True)]
    asr = NanoASRTokenizer(codec)
    assert asr.codebook_size == 32 and asr.sample_rate == 16000
    assert asr.encode([a * 0.1])[0].tolist() == codec.encode_asr([volume_normalize(a * 0.1)])[0].tolist()


def test_global_codes(codec, cathy):
    wavs = [load_audio(cathy / f"{name}.flac") for name in CLIPS]
    codes = codec.encode_global(wavs)
    assert codes.shape == (3, codec.num_global_tokens) == (3, 32) and codes.dtype == torch.int64
    assert 0 <= codes.min() and codes.max() < codec.global_codebook_size == 64
    assert torch.equal(codes[1], codec.encode_global([wavs[1]])[0])
    assert codes.unique().numel() > 1  # not one code for everything (GPA-nano 0.2's codec gave 816 for all)
    long = np.tile(wavs[0], 6)  # over ref_max_seconds: its middle part is used
    assert codec.encode_global([long]).shape == (1, 32)


def test_decode_length_and_bad_codes(codec):
    for t in (1, 7, 40):
        semantic, glob = random_codes(codec, t, t)
        wav = codec.decode(semantic, glob)
        assert wav.shape == (1, codec.hop_length * t) and wav.dtype == torch.float32
    assert codec.decode(torch.zeros(1, 0, dtype=torch.long), glob).shape == (1, 0)
    semantic, glob = random_codes(codec, 5, 0)
    bad = [(semantic + codec.semantic_codebook_size, glob, r"semantic codes must be in \[0, 64\)"),
           (semantic - 100, glob, "semantic codes must be in"),
           (semantic.float(), glob, "semantic codes must be integers"),
           (semantic, glob + 64, r"global codes must be in \[0, 64\)"),
           (semantic, glob[:, :10], r"global \(B, 32\) codes"),
           (semantic[0], glob, r"semantic \(B, T\)")]
    for s, g, message in bad:
        with pytest.raises(ValueError, match=message):
            codec.decode(s, g)


def test_bad_waveforms_are_rejected(codec):
    with pytest.raises(ValueError, match="non-empty list"):
        codec.encode_semantic([])
    with pytest.raises(ValueError, match="waveform 1 must be a non-empty"):
        codec.encode_semantic([np.zeros(1600, np.float32), np.zeros((2, 1600), np.float32)])
    with pytest.raises(ValueError, match="exceeds the nano encoder's 30 s window"):
        codec.encode_semantic([np.zeros(31 * 16000, np.float32)])


# --- streaming decode -----------------------------------------------------------------------------------


def stream(codec: NanoCodec, semantic: torch.Tensor, glob: torch.Tensor, sizes: list[int]) -> np.ndarray:
    """Push ``semantic`` in pieces of ``sizes``; each push returns exactly the samples now final."""
    dec = codec.incremental_decoder(glob[0])
    out, pushed = [], 0
    for size in sizes:
        piece = semantic[:, pushed : pushed + size]
        pushed += piece.shape[1]
        out.append(dec.push(piece))
        assert sum(o.shape[1] for o in out) == max(0, pushed - dec.lookahead) * codec.hop_length
    assert pushed == semantic.shape[1]
    preview = dec.preview()
    out.append(dec.finish())
    assert torch.equal(preview, out[-1])
    with pytest.raises(RuntimeError, match="push\\(\\) after finish"):
        dec.push(semantic[:, :1])
    return torch.cat(out, dim=1)[0].numpy()


def test_incremental_stream_equals_offline_decode(codec):
    semantic, glob = random_codes(codec, 70, 3)
    offline = codec.decode(semantic, glob)[0].numpy()
    assert offline.std() > 0.01, "the fixture's waveform is near constant: the tolerance would test nothing"
    rng = np.random.default_rng(0)
    chunkings = [[1] * 70, [70], [3] * 23 + [1], list(rng.integers(1, 12, 30))]
    for sizes in chunkings:
        sizes = sizes[: int(np.searchsorted(np.cumsum(sizes), 70)) + 1]
        y = stream(codec, semantic, glob, [int(s) for s in sizes])
        assert y.shape == offline.shape  # never a duplicated or missing sample
        assert np.abs(y - offline).max() <= 1e-5, sizes[:5]


def test_context_is_the_decoders_true_reach(codec):
    n, mid, hop = 90, 45, codec.hop_length
    semantic, glob = random_codes(codec, n, 5)
    base = codec.decode(semantic, glob)[0].view(n, hop)
    reach = []
    for delta in (1, 17, 40):
        bumped = semantic.clone()
        bumped[0, mid] = (bumped[0, mid] + delta) % codec.semantic_codebook_size
        diff = (codec.decode(bumped, glob)[0].view(n, hop) - base).abs().amax(1)  # per code's samples
        changed = torch.nonzero(diff > 0).flatten()
        assert changed.min() >= mid - codec.context and changed.max() <= mid + codec.context  # nothing beyond
        reach.append(int(max(mid - changed.min(), changed.max() - mid)))
    # Not an over-estimate either. With random weights a code's influence falls about 100x per code of
    # distance (the structural reach, 13 codes here, carries ~1e-16 of it), so the last code or two
    # round away in float32: the measured reach is context or just under it.
    assert codec.context - 2 <= max(reach) <= codec.context, (reach, codec.context)


# --- the model ------------------------------------------------------------------------------------------


def test_nano_model_runs_every_task(model, nano_dir, cathy):
    assert isinstance(model.bicodec, NanoCodec) and isinstance(model.glm, NanoASRTokenizer)
    assert model.sample_rate == 22050
    clip = cathy / "arctic_a0207_1592712443.flac"
    assert isinstance(model.asr(clip, max_new_tokens=5), str)
    hop = model.bicodec.hop_length
    ref = cathy / "arctic_a0158_1592713822.flac"
    for wav, sr in (model.tts("Hello there.", ref, seed=0, max_new_tokens=12),
                    model.tts("Hello.", model.voice(ref, CLIPS[ref.stem]), seed=0, max_new_tokens=12),
                    model.vc(clip, ref, seed=0, max_new_tokens=12)):
        assert sr == 22050 and wav.dtype == np.float32 and wav.ndim == 1
        assert len(wav) % hop == 0 and len(wav) <= 12 * hop
    voice = model.voice(ref)
    assert voice.global_codes.shape == (32,) and int(voice.global_codes.max()) < 64


def test_nano_asr_prompt_is_the_training_prompt(model, cathy):
    clip = cathy / "arctic_a0207_1592712443.flac"
    raw = load_audio(clip, normalize=False)
    expected = asr_prompt(model.vocab, model.glm.encode([raw])[0], model.bicodec.encode_semantic([load_audio(clip)])[0])
    assert model.asr_prompts([clip])[0].prompt_ids == expected.prompt_ids


@pytest.mark.parametrize("config", [StreamConfig(), StreamConfig(first_chunk=1, chunk=7)])
def test_engine_streams_nano_tts_equal_to_offline_decode(model, cathy, config):
    voice = model.voice(cathy / "arctic_a0158_1592713822.flac")
    options = {"seed": 1, "max_new_tokens": 40, "temperature": 0.9}

    async def run():
        async with Engine(model, EngineConfig(stream=config, max_slots=2)) as eng:
            return [e async for e in await eng.tts("Hello there.", voice, **options)]

    events = asyncio.run(run())
    chunks = [e for e in events if isinstance(e, AudioChunk)]
    assert [c.index for c in chunks] == list(range(len(chunks))) and {c.sample_rate for c in chunks} == {22050}
    hop, n = model.bicodec.hop_length, events[-1].output_tokens
    assert n > config.first_chunk + model.bicodec.context  # so audio really was streamed, in several chunks
    sizes = [len(c.samples) // hop for c in chunks]
    policy = [min(config.first_chunk * 2**i, max(config.chunk, config.first_chunk)) for i in range(len(sizes))]
    assert len(sizes) > 1 and sizes[:-1] == policy[: len(sizes) - 1]
    streamed = np.concatenate([c.samples for c in chunks])
    wav, _ = model.tts("Hello there.", voice, **options)  # offline: one decode of all codes, DC removed
    assert len(streamed) == len(wav) == n * hop
    assert np.allclose(streamed - streamed.mean(), wav, atol=1e-5)


# --- prepare -> train -> export ---------------------------------------------------------------------------


def test_cli_prepare_train_export_on_a_nano_checkpoint(nano_dir, cathy, tmp_path, capsys, monkeypatch):
    lines = [f"{cathy / (name + '.flac')}|{text}" for name, text in CLIPS.items()]
    (tmp_path / "list.txt").write_text("\n".join(lines) + "\n")
    monkeypatch.setenv("GPA_MODEL", str(nano_dir))  # prepare's --checkpoint defaults to it
    assert main(["prepare", str(tmp_path / "list.txt"), "-o", str(tmp_path / "data"), "--no-progress"]) == 0
    assert json.loads(capsys.readouterr().out) == {"out_dir": str(tmp_path / "data"), "records": 3, "skipped": 0}
    assert json.loads((tmp_path / "data" / "meta.json").read_text())["checkpoint"] == str(nano_dir.resolve())
    sets = [f"data={tmp_path / 'data'}", f"out_dir={tmp_path / 'run'}", "max_steps=3", "batch_size=2",
            "eval_fraction=0", "threads=1", "device=cpu", "model=tiny"]
    assert main(["train", "--no-progress", *[a for s in sets for a in ("--set", s)]]) == 0
    assert main(["export", str(tmp_path / "run"), str(tmp_path / "model")]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "model")
    exported = Checkpoint.open(tmp_path / "model")
    assert exported.kind == "nano"
    for name in ("config.json", "model.safetensors"):
        assert (exported.nano_codec / name).read_bytes() == (nano_dir / "nano-codec" / name).read_bytes()
    loaded = GPA.from_dir(tmp_path / "model", device="cpu")
    assert isinstance(loaded.bicodec, NanoCodec)
    assert isinstance(loaded.asr(cathy / "arctic_a0207_1592712443.flac", max_new_tokens=4), str)


# --- the default model ----------------------------------------------------------------------------------


def test_resolve_model_explicit_then_env_then_bundled(tmp_path, monkeypatch):
    assert BUNDLED_MODEL == Path(gpa.checkpoint.__file__).parent / "models" / "gpa-nano"
    bundled, env, explicit = tmp_path / "bundled", tmp_path / "env", tmp_path / "explicit"
    bundled.mkdir()
    monkeypatch.setattr(gpa.checkpoint, "BUNDLED_MODEL", bundled)
    monkeypatch.setenv("GPA_MODEL", str(env))
    assert resolve_model(explicit) == explicit and resolve_model(str(explicit)) == explicit
    assert resolve_model(None) == env  # the variable is taken as given; Checkpoint.open checks it
    monkeypatch.setenv("GPA_MODEL", "")
    assert resolve_model(None) == bundled
    monkeypatch.delenv("GPA_MODEL")
    assert resolve_model(None) == bundled
    missing = tmp_path / "not-installed"
    monkeypatch.setattr(gpa.checkpoint, "BUNDLED_MODEL", missing)
    with pytest.raises(CheckpointError, match=f"no model given, and the bundled GPA-nano is not installed at "
                                              f"{missing}: pass --model DIR .* or set GPA_MODEL"):
        resolve_model(None)
    assert resolve_model(explicit) == explicit


def test_default_model_reaches_the_api_and_cli(nano_dir, cathy, tmp_path, capsys, monkeypatch):
    clip = str(cathy / "arctic_a0207_1592712443.flac")
    monkeypatch.delenv("GPA_MODEL", raising=False)
    monkeypatch.setattr(gpa.checkpoint, "BUNDLED_MODEL", tmp_path / "not-installed")
    for argv in (["asr", clip], ["bench"], ["prepare", clip, "-o", str(tmp_path / "p")]):
        assert main(argv) == 2
        assert f"the bundled GPA-nano is not installed at {tmp_path / 'not-installed'}" in capsys.readouterr().err
    with pytest.raises(CheckpointError, match="no model given"):
        gpa.load()
    monkeypatch.setattr(gpa.checkpoint, "BUNDLED_MODEL", nano_dir)  # as if installed with the package
    loaded = gpa.load(device="cpu")
    assert isinstance(loaded.bicodec, NanoCodec)
    assert torch.equal(loaded.lm.model.embed_tokens.weight, read_safetensors(nano_dir / "model.safetensors")[
        "model.embed_tokens.weight"])
    assert main(["asr", clip, "--max-new-tokens", "3", "--no-progress", "--device", "cpu"]) == 0
    capsys.readouterr()
    assert main(["asr", clip, "--model", str(tmp_path), "--no-progress"]) == 1  # an explicit path wins
    assert "missing: config.json" in capsys.readouterr().err


def test_inference_json_sets_speed_defaults_and_is_checked(nano_dir, tmp_path):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    for item in nano_dir.iterdir():
        (ckpt / item.name).symlink_to(item)
    plain = gpa.load(ckpt, device="cpu")
    assert plain.lm.weight_quant == "none" and plain.bicodec.decode_dtype == torch.float32
    (ckpt / "inference.json").write_text(json.dumps({"cpu": {"quantize": "int8", "vocoder_dtype": "bfloat16"},
                                                     "cuda": {"vocoder_dtype": "float32"}}))
    fast = gpa.load(ckpt, device="cpu")
    assert fast.lm.weight_quant == "int8" and fast.bicodec.decode_dtype == torch.bfloat16
    assert fast.lm.head_weight().dtype == torch.bfloat16  # int8's default activations without a "dtype" setting
    wav, sr = fast.tts("Hello there.", seed=0, max_new_tokens=20)
    assert wav.dtype == np.float32 and np.isfinite(wav).all()
    mixed = gpa.load(ckpt, device="cpu", vocoder_dtype="float32")  # the caller's choice wins
    assert mixed.lm.weight_quant == "int8" and mixed.bicodec.decode_dtype == torch.float32
    (ckpt / "inference.json").write_text(json.dumps({"cpu": {"quantize": "int8", "dtype": "float32"}}))
    assert gpa.load(ckpt, device="cpu").lm.head_weight().dtype == torch.float32
    assert gpa.load(ckpt, device="cpu", dtype=torch.bfloat16).lm.head_weight().dtype == torch.bfloat16
    for bad in ("{not json", json.dumps({"cpu": {"threads": 4}}), json.dumps(["int8"])):
        (ckpt / "inference.json").write_text(bad)
        with pytest.raises(CheckpointError, match="inference.json"):
            gpa.load(ckpt, device="cpu")
    (ckpt / "inference.json").write_text(json.dumps({"cpu": {"vocoder_dtype": "float16"}}))
    with pytest.raises(ValueError, match="vocoder_dtype"):
        gpa.load(ckpt, device="cpu")
    (ckpt / "inference.json").write_text(json.dumps({"cpu": {"dtype": "int4"}}))
    with pytest.raises(ValueError, match="unknown dtype 'int4'"):
        gpa.load(ckpt, device="cpu")
    (ckpt / "inference.json").write_text(json.dumps({"cpu": {"tokenizer_dtype": "bfloat16"}}))
    assert gpa.load(ckpt, device="cpu").tokenizer_dtype == torch.bfloat16
    assert gpa.load(ckpt, device="cpu", tokenizer_dtype="float32").tokenizer_dtype == torch.float32
    (ckpt / "inference.json").write_text(json.dumps({"cpu": {"tokenizer_dtype": "int16"}}))
    with pytest.raises(ValueError, match="unknown tokenizer_dtype 'int16'"):
        gpa.load(ckpt, device="cpu")
    (ckpt / "inference.json").write_text(json.dumps({"cpu": {"native_decode": True}}))
    assert gpa.load(ckpt, device="cpu").lm.native_decode
    assert not gpa.load(ckpt, device="cpu", native_decode=False).lm.native_decode
    assert not plain.lm.native_decode
    (ckpt / "inference.json").write_text(json.dumps({"cpu": {"native_decode": "yes"}}))
    with pytest.raises(CheckpointError, match="native_decode and int8_prefill take true or false"):
        gpa.load(ckpt, device="cpu")
    (ckpt / "inference.json").write_text(json.dumps({"cpu": {"quantize": "int8", "int8_prefill": True}}))
    assert gpa.load(ckpt, device="cpu").lm.int8_prefill == (native.load() is not None)  # off without the kernels
    assert not gpa.load(ckpt, device="cpu", int8_prefill=False).lm.int8_prefill and not plain.lm.int8_prefill
    with pytest.raises(ValueError, match="int8_prefill needs quantized LLM weights"):
        gpa.load(ckpt, device="cpu", quantize="none")
    assert plain.lm.kv_cache_dtype == "auto"
    (ckpt / "inference.json").write_text(json.dumps({"cpu": {"kv_cache_dtype": "int8"}}))
    model = gpa.load(ckpt, device="cpu")
    assert model.lm.kv_cache_dtype == "int8" and SlotDecoder(model.lm, 1, 8).cache.k.dtype == torch.int8
    assert gpa.load(ckpt, device="cpu", kv_cache_dtype="bfloat16").lm.kv_cache_dtype == "bfloat16"
    with pytest.raises(ValueError, match="unknown kv_cache_dtype 'fp8'; expected one of"):
        gpa.load(ckpt, device="cpu", kv_cache_dtype="fp8")


@pytest.mark.parametrize("levels", [(4, 4, 4, 4, 4), (3, 5, 8, 2)])
def test_fsq_gives_every_level_and_codes_decode_to_the_trained_values(levels):
    z = torch.randn(4000, len(levels), generator=torch.Generator().manual_seed(0)) * 3
    z.requires_grad_(True)
    q, codes = fsq_quantize(z, levels)
    assert torch.equal(q.detach(), fsq_values(codes, levels))  # the decoder sees what it was trained with
    assert 0 <= codes.min() and codes.max() < math.prod(levels)
    for d, n in enumerate(levels):  # every one of the L levels is used, and no more
        assert q[:, d].unique().numel() == n
    q.sum().backward()
    assert (z.grad != 0).float().mean() > 0.5  # straight-through: gradient reaches the latents


def test_fsq_version_1_is_kept_for_the_codecs_trained_with_it(nano_dir, tmp_path):
    # configs written before fsq_version existed are version 1 (GPA-nano 0.x): no LayerNorm, the old bound
    raw = json.loads((nano_dir / "nano-codec" / "config.json").read_text())
    assert raw["fsq_version"] == 2
    del raw["fsq_version"]
    old = NanoCodecConfig.from_dict(raw)
    assert old.fsq_version == 1 and NanoCodec(old).speaker.fsq_norm is None
    raw["fsq_version"] = 3
    with pytest.raises(CheckpointError, match="fsq_version"):
        NanoCodecConfig.from_dict(raw)
    z = torch.tensor([[-50.0, -0.2, 0.0, 0.6, 50.0]])  # saturated at both ends, as in the shipped codec
    q, codes = fsq_quantize_v1(z, (4,) * 5)
    assert torch.allclose(q, torch.tensor([[-4 / 3, 0, 0, 2 / 3, 4 / 3]]))  # 5 values for 4 levels: the flaw


def test_decoder_training_reports_speaker_code_diversity(nano_dir, cathy, tmp_path):
    codec = NanoCodec.from_dir(nano_dir / "nano-codec")
    utts = [Utterance(str(cathy / f"{name}.flac"), speaker) for name, speaker in zip(CLIPS, "aab", strict=True)]
    extract(codec, utts, tmp_path / "features")
    feats = Features([tmp_path / "features"])
    res = train_decoder(codec, feats, DecoderTraining(minutes=5, max_steps=6, batch_size=2, segment=4,
                                                      ref_min_frames=20, ref_max_frames=40))
    assert res["steps"] == 6 and math.isfinite(res["l1"])
    assert res["global_codes_distinct"] > 1  # a collapsed speaker path gives 1


def test_compact_features_hold_the_codes_inference_makes_and_train_the_decoder(nano_dir, cathy, tmp_path):
    codec = NanoCodec.from_dir(nano_dir / "nano-codec")
    names = list(CLIPS)[:3]
    utts = [Utterance(str(cathy / f"{name}.flac"), speaker) for name, speaker in zip(names, "aab", strict=True)]
    extract_compact(codec, utts, tmp_path / "compact")
    feats = Features([tmp_path / "compact"])
    assert feats.semantic is None and feats.speakers == ["a", "b"]
    for i, name in enumerate(names):  # what the decoder trains on is what inference encodes
        wav = load_audio(cathy / f"{name}.flac")
        lo, hi = int(feats.code_off[i]), int(feats.code_off[i + 1])
        sem = codec.encode_semantic([wav])[0]
        assert torch.equal(feats.codes[lo:hi], sem)
        assert torch.equal(feats.global_codes[i], codec.encode_global([wav])[0])
        mel = torch.from_numpy(mel_target(codec, wav, len(sem)).T)
        r = codec.config.mel_per_token
        assert (feats.mel[lo * r : hi * r] - mel).abs().max() <= MEL_STEP / 2 + 1e-5  # 8 bits, rounded
    with pytest.raises(ValueError, match="freeze_speaker"):
        train_decoder(codec, feats, DecoderTraining(max_steps=1, batch_size=2, segment=4))
    extract(codec, utts[:1], tmp_path / "full")
    with pytest.raises(ValueError, match="both kinds"):
        Features([tmp_path / "compact", tmp_path / "full"])
    res = train_decoder(codec, feats, DecoderTraining(max_steps=6, batch_size=2, segment=4, lr=3e-2, code_noise=0.1,
                                                      freeze_speaker=True, eval_every=2), heldout=feats)
    assert [h["step"] for h in res["history"]] == [2, 4, 6]
    best = min(h["heldout_l1"] for h in res["history"])
    assert res["best_heldout_l1"] == best
    assert heldout_l1(codec, feats) == pytest.approx(best, abs=1e-4)  # the best state is the one kept
