"""GLM-4-Voice tokenizer: golden fidelity, batching, 30 s chunking and strict loading."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import rel_err
from safetensors.torch import load_file, save_file

from gpa.codecs.glm import GLMConfig, GLMTokenizer
from gpa.weights import CheckpointError

GLM = "glm-4-voice-tokenizer"
FEATURE_TOL = 1e-4  # float32 STFT: measured ~2e-6 against the reference (different FFT backend)


@pytest.fixture(scope="module")
def tok(mini_dir: Path) -> GLMTokenizer:
    return GLMTokenizer.from_dir(mini_dir / GLM)


@pytest.fixture(scope="module")
def wavs(golden: dict, expected: dict) -> dict[str, np.ndarray]:
    """Golden 16 kHz inputs, the exact samples the reference tokenized."""
    return {name: golden[f"{name}.wav16k"].numpy() for name in expected["files"]}


@pytest.fixture(scope="module")
def speech(wavs: dict[str, np.ndarray]) -> np.ndarray:
    """All golden speech back to back (about 27 s), for building long inputs from real audio."""
    return np.concatenate(list(wavs.values()))


def _long(speech: np.ndarray, samples: int) -> np.ndarray:
    return np.resize(speech, samples)  # tiles real speech to the requested length


def test_rates(tok: GLMTokenizer) -> None:
    assert tok.sample_rate == 16000
    assert tok.frame_rate == 12.5
    assert tok.codebook_size == 128
    assert tok.samples_per_token == 1280
    assert tok.max_samples == 30 * 16000
    assert len(tok.encoder.layers) == 2  # quantize_position, not encoder_layers (4)


@pytest.mark.fidelity
def test_features_match_golden(tok: GLMTokenizer, wavs: dict, golden: dict) -> None:
    for name, wav in wavs.items():
        ref = golden[f"{name}.glm_features"]
        got = tok.features(wav)
        assert got.shape == ref.shape, name
        assert rel_err(got, ref) <= FEATURE_TOL, f"{name}: rel err {rel_err(got, ref):.2e}"


@pytest.mark.fidelity
def test_codes_match_golden(tok: GLMTokenizer, wavs: dict, golden: dict, expected: dict) -> None:
    for name, wav in wavs.items():
        codes = tok.encode([wav])[0]
        ref = golden[f"{name}.glm"]
        assert codes.dtype == torch.int64
        assert len(codes) == expected["files"][name]["glm_len"] == -(-len(wav) // tok.samples_per_token)
        # Exact match expected. Tightest margin measured: long_16k token 76, squared distances
        # 32.60085 (code 52) vs 32.60107 (code 103), a gap of 2.2e-4 (~7e-6 relative, ~50 float32
        # ulps of the distance sum); every other token has a relative gap above 3e-4. A failure there
        # alone would be a near tie, anywhere else a real discrepancy.
        assert torch.equal(codes, ref), f"{name}: {(codes != ref).sum()} of {len(ref)} codes differ"


def test_batched_equals_single(tok: GLMTokenizer, wavs: dict) -> None:
    items = list(wavs.values())
    single = [tok.encode([w])[0] for w in items]
    for batch_size in (8, 3):
        batched = tok.encode(items, batch_size=batch_size)
        for s, b in zip(single, batched, strict=True):
            assert torch.equal(s, b)


def test_long_audio_is_chunked_every_30s(tok: GLMTokenizer, speech: np.ndarray) -> None:
    wav = _long(speech, 75 * 16000)
    short, codes = tok.encode([speech[:16000], wav])  # the chunks of both inputs share batches
    assert len(codes) == 938  # ceil(75 s * 12.5)
    assert abs(len(codes) / 75 - 12.5) < 0.01
    step = tok.max_samples
    parts = [tok.encode([wav[s : s + step]])[0] for s in range(0, len(wav), step)]
    assert [len(p) for p in parts] == [375, 375, 188]
    assert torch.equal(codes, torch.cat(parts))
    assert torch.equal(short, tok.encode([speech[:16000]])[0]) and len(short) == 13


def test_exactly_30s_is_one_chunk(tok: GLMTokenizer, speech: np.ndarray) -> None:
    wav = _long(speech, tok.max_samples)
    codes = tok.encode([wav])[0]
    assert len(codes) == 375  # the whole positional table, no second chunk
    longer = tok.encode([_long(speech, tok.max_samples + 1)])[0]
    assert len(longer) == 376  # one sample over: a one-token second chunk, like the reference helper
    assert torch.equal(longer[:375], codes)


def test_half_precision_runs(mini_dir: Path, wavs: dict, golden: dict) -> None:
    codes = GLMTokenizer.from_dir(mini_dir / GLM, dtype=torch.bfloat16).encode([wavs["short_16k"]])[0]
    assert codes.shape == golden["short_16k.glm"].shape
    assert (codes == golden["short_16k.glm"]).float().mean() > 0.5  # bf16 moves some codes; most stay


def test_features_shape_and_input_checks(tok: GLMTokenizer, speech: np.ndarray) -> None:
    assert tok.features(speech[:1281]).shape == (128, 16)
    with pytest.raises(ValueError, match="mono"):
        tok.encode([np.zeros((100, 2), dtype=np.float32)])
    with pytest.raises(ValueError, match="empty"):
        tok.encode([np.zeros(0, dtype=np.float32)])
    with pytest.raises(ValueError, match="float"):
        tok.encode([np.zeros(100, dtype=np.int16)])
    assert tok.encode([]) == []


def _copy(mini_dir: Path, tmp_path: Path, edit=None) -> Path:
    """A copy of the mini tokenizer directory with ``edit(state)`` applied to its weights."""
    out = tmp_path / GLM
    shutil.copytree(mini_dir / GLM, out)
    if edit is not None:
        state = load_file(str(out / "model.safetensors"))
        edit(state)
        save_file(state, str(out / "model.safetensors"))
    return out


def test_missing_key_is_an_error(mini_dir: Path, tmp_path: Path) -> None:
    path = _copy(mini_dir, tmp_path, lambda s: s.pop("layers.1.self_attn.k_proj.weight"))
    match = r"model\.safetensors.*missing keys.*layers\.1\.self_attn\.k_proj"
    with pytest.raises(CheckpointError, match=match):
        GLMTokenizer.from_dir(path)


def test_wrong_shape_is_an_error(mini_dir: Path, tmp_path: Path) -> None:
    def edit(s: dict) -> None:
        s["codebook.weight"] = torch.zeros(64, 64)

    match = r"codebook\.weight: checkpoint \(64, 64\) vs model \(128, 64\)"
    with pytest.raises(CheckpointError, match=match):
        GLMTokenizer.from_dir(_copy(mini_dir, tmp_path, edit))


def test_unknown_key_is_an_error(mini_dir: Path, tmp_path: Path) -> None:
    path = _copy(mini_dir, tmp_path, lambda s: s.update({"decoder.proj.weight": torch.zeros(2)}))
    with pytest.raises(CheckpointError, match=r"unexpected keys.*decoder\.proj\.weight"):
        GLMTokenizer.from_dir(path)


def test_unused_keys_are_accepted(mini_dir: Path, tmp_path: Path, wavs: dict, golden: dict) -> None:
    """A full-encoder save (layers after the quantizer, final norm) loads and gives the same codes."""
    def edit(s: dict) -> None:
        layer1 = [k for k in s if k.startswith("layers.1.")]
        s.update({k.replace("layers.1.", "layers.3."): s[k].clone() for k in layer1})
        s["layer_norm.weight"], s["layer_norm.bias"] = torch.ones(64), torch.zeros(64)

    state = load_file(str(mini_dir / GLM / "model.safetensors"))
    assert {"embed_positions2.weight", "ema_count", "ema_weight"} <= set(state)
    tok = GLMTokenizer.from_dir(_copy(mini_dir, tmp_path, edit))
    assert torch.equal(tok.encode([wavs["short_16k"]])[0], golden["short_16k.glm"])


@pytest.mark.parametrize("name", ["config.json", "model.safetensors", "preprocessor_config.json"])
def test_missing_file_is_an_error(mini_dir: Path, tmp_path: Path, name: str) -> None:
    path = _copy(mini_dir, tmp_path)
    (path / name).unlink()
    with pytest.raises(CheckpointError, match=f"missing .*{name.replace('.', '[.]')}"):
        GLMTokenizer.from_dir(path)


def test_not_a_directory_and_bad_config(mini_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not found"):
        GLMTokenizer.from_dir(tmp_path / "nowhere")
    path = _copy(mini_dir, tmp_path)
    raw = json.loads((path / "config.json").read_text())
    del raw["quantize_position"]
    (path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match=r"config\.json.*quantize_position"):
        GLMTokenizer.from_dir(path)
    with pytest.raises(CheckpointError, match="pooling_position"):
        GLMConfig.from_dict({**raw, "quantize_position": 1, "pooling_position": 2})


@pytest.mark.slow
def test_official_shaped_checkpoint(speech: np.ndarray, official_dir: Path) -> None:
    tok = GLMTokenizer.from_dir(official_dir / GLM)  # strict: every parameter present with its shape
    assert len(tok.encoder.layers) == 16 and tok.codebook_size == 16384 and tok.frame_rate == 12.5
    codes = tok.encode([speech[: 2 * 16000]])[0]
    assert codes.shape == (25,) and codes.dtype == torch.int64
    assert 0 <= int(codes.min()) and int(codes.max()) < 16384
