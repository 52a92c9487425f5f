"""BiCodec and its wav2vec2 against the authors' implementation's golden outputs, plus loading errors.

The fidelity tests feed the golden 16 kHz waveforms (``NAME.wav16k``) so that they test the codec
alone, not the audio loader. On the golden set every semantic and global code matches exactly;
the closest call measured was a cosine gap of 5e-6 between the two best semantic codebook entries
(long_16k, about 100 float32 ulps) and a 2.8e-4 distance from an FSQ rounding boundary
(speech2_22k), so a mismatch here means a real discrepancy, not a tie.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from conftest import rel_err
from safetensors.torch import load_file, save_file

from gpa.codecs.bicodec import BiCodec, BiCodecConfig
from gpa.weights import CheckpointError

TOL = 1e-4  # relative L2 error allowed on float outputs (float32 vs the reference's float32)


@pytest.fixture(scope="session")
def codec(mini_dir: Path) -> BiCodec:
    return BiCodec.from_dir(mini_dir / "BiCodec")


@pytest.fixture(scope="session")
def wavs(golden: dict, expected: dict) -> dict[str, np.ndarray]:
    """The reference's loaded waveforms, by golden input name."""
    return {name: golden[f"{name}.wav16k"].numpy() for name in expected["files"]}


@pytest.fixture(scope="session")
def batched(codec: BiCodec, wavs: dict) -> dict[str, dict[str, torch.Tensor]]:
    """Every output for the whole golden set, computed in one batch per method."""
    names, batch = list(wavs), list(wavs.values())
    feats = codec.wav2vec2_features(batch)
    semantic = codec.encode_semantic(batch)
    glob = codec.encode_global(batch)
    return {n: {"w2v_mix": feats[i], "semantic": semantic[i], "global": glob[i]} for i, n in enumerate(names)}


@pytest.mark.fidelity
def test_reference_clip_and_mel(codec, wavs, golden):
    for name, wav in wavs.items():
        clip = codec.reference_clip(wav)
        assert np.array_equal(clip, golden[f"{name}.ref_clip"].numpy()), name
        mel = codec.reference_mel(torch.from_numpy(clip)[None])[0]
        err = rel_err(mel, golden[f"{name}.ref_mel"])
        assert mel.shape == (128, 301) and err <= TOL, f"{name}: ref_mel rel err {err:.2e}"


@pytest.mark.fidelity
def test_wav2vec2_features(batched, golden):
    for name, out in batched.items():
        ref = golden[f"{name}.w2v_mix"]
        assert out["w2v_mix"].shape == ref.shape, name
        assert rel_err(out["w2v_mix"], ref) <= TOL, f"{name}: w2v_mix rel err {rel_err(out['w2v_mix'], ref):.2e}"


@pytest.mark.fidelity
def test_semantic_codes_exact(batched, golden, expected):
    for name, out in batched.items():
        ref = golden[f"{name}.semantic"]
        assert len(ref) == expected["files"][name]["semantic_len"] == (len(golden[f"{name}.wav16k"]) - 400) // 320 + 1
        assert out["semantic"].dtype == torch.int64
        assert torch.equal(out["semantic"], ref), f"{name}: {(out['semantic'] != ref).sum()} codes differ"


@pytest.mark.fidelity
def test_global_codes_exact(batched, golden):
    for name, out in batched.items():
        ref = golden[f"{name}.global"].long()
        assert out["global"].dtype == torch.int64
        assert torch.equal(out["global"], ref), f"{name}: {(out['global'] != ref).sum()} codes differ"


@pytest.mark.fidelity
def test_decode_matches_reference(codec, golden, wavs):
    for name in wavs:
        semantic = golden[f"{name}.semantic"]
        wav = codec.decode(semantic[None], golden[f"{name}.global"][None])
        assert wav.dtype == torch.float32 and wav.shape == (1, codec.hop_length * len(semantic)), name
        err = rel_err(wav[0], golden[f"{name}.recon"])
        assert err <= TOL, f"{name}: recon rel err {err:.2e}"


def test_batched_encoding_equals_one_at_a_time(codec, wavs, batched):
    for name in ("short_16k", "long_16k", "quiet_24k"):
        assert torch.equal(codec.encode_semantic([wavs[name]])[0], batched[name]["semantic"]), name
        assert torch.equal(codec.encode_global([wavs[name]])[0], batched[name]["global"]), name


def test_batched_decode_equals_one_at_a_time(codec, golden):
    semantic = torch.stack([golden[f"{n}.semantic"][:34] for n in ("short_16k", "speech1_8k")])
    glob = torch.stack([golden[f"{n}.global"] for n in ("short_16k", "speech1_8k")])
    both = codec.decode(semantic, glob)
    for i in range(2):
        assert torch.allclose(both[i], codec.decode(semantic[i : i + 1], glob[i : i + 1])[0], atol=1e-6)


def test_properties(codec):
    assert (codec.sample_rate, codec.hop_length, codec.frame_rate) == (16000, 320, 50.0)
    assert (codec.semantic_codebook_size, codec.global_codebook_size, codec.num_global_tokens) == (64, 4096, 32)
    assert codec.ref_clip_length == 96000


def test_bad_inputs_are_rejected(codec):
    with pytest.raises(ValueError, match="at least 400"):
        codec.encode_semantic([np.zeros(399, np.float32)])
    with pytest.raises(ValueError, match="non-empty list"):
        codec.encode_global([])
    with pytest.raises(ValueError, match=r"semantic codes must be in \[0, 64\)"):
        codec.decode(torch.full((1, 5), 64), torch.zeros(1, 32, dtype=torch.long))
    with pytest.raises(ValueError, match="global"):
        codec.decode(torch.zeros(1, 5, dtype=torch.long), torch.zeros(1, 31, dtype=torch.long))


def test_non_finite_latents_raise(mini_dir, wavs):
    codec = BiCodec.from_dir(mini_dir / "BiCodec", with_wav2vec2=False)
    codec.speaker_encoder.speaker_encoder.layer1.bn.running_var.fill_(-1.0)  # sqrt of a negative: NaN
    with pytest.raises(FloatingPointError, match="non-finite"):
        codec.encode_global([wavs["short_16k"]])
    with pytest.raises(RuntimeError, match="with_wav2vec2=False"):
        codec.encode_semantic([wavs["short_16k"]])


# --- loading -------------------------------------------------------------------------------------

def _copy_codec(src: Path, dst: Path, edit=None, w2v_edit=None) -> Path:
    """Copy a BiCodec dir, optionally editing the state dict of model.safetensors / wav2vec2."""
    shutil.copytree(src, dst)
    for sub, fn in (("model.safetensors", edit), ("wav2vec2-large-xlsr-53/model.safetensors", w2v_edit)):
        if fn is not None:
            path = dst / sub
            state = load_file(str(path))
            path.chmod(0o644)
            save_file(fn(state), str(path))
    return dst


def test_missing_key_is_named(mini_dir, tmp_path):
    key = "prenet.vocos_backbone.convnext.0.pwconv1.weight"
    d = _copy_codec(mini_dir / "BiCodec", tmp_path / "b", edit=lambda s: {k: v for k, v in s.items() if k != key})
    with pytest.raises(CheckpointError, match=r"missing keys \(1\).*" + key.replace(".", r"\.")):
        BiCodec.from_dir(d)


def test_mismatched_shape_is_named(mini_dir, tmp_path):
    key = "quantizer.codebook.weight"
    d = _copy_codec(mini_dir / "BiCodec", tmp_path / "b", edit=lambda s: {**s, key: torch.zeros(65, 8)})
    with pytest.raises(CheckpointError, match=r"shape mismatches.*quantizer\.codebook\.weight"):
        BiCodec.from_dir(d)


def test_unexpected_key_is_named(mini_dir, tmp_path):
    d = _copy_codec(mini_dir / "BiCodec", tmp_path / "b", edit=lambda s: {**s, "encoder.extra": torch.zeros(1)})
    with pytest.raises(CheckpointError, match=r"unexpected keys.*encoder\.extra"):
        BiCodec.from_dir(d)


def test_wav2vec2_missing_key_is_named(mini_dir, tmp_path):
    key = "encoder.layers.15.attention.k_proj.bias"
    d = _copy_codec(mini_dir / "BiCodec", tmp_path / "b", w2v_edit=lambda s: {k: v for k, v in s.items() if k != key})
    with pytest.raises(CheckpointError, match=key.replace(".", r"\.")):
        BiCodec.from_dir(d)


@pytest.mark.parametrize("name", ["config.yaml", "model.safetensors", "wav2vec2-large-xlsr-53/config.json",
                                  "wav2vec2-large-xlsr-53/model.safetensors"])
def test_missing_file_is_named(mini_dir, tmp_path, name):
    d = _copy_codec(mini_dir / "BiCodec", tmp_path / "b")
    (d / name).unlink()
    with pytest.raises(CheckpointError, match=f"missing .*{name}"):
        BiCodec.from_dir(d)


@pytest.mark.fidelity
def test_other_weight_norm_spellings_load_the_same(codec, mini_dir, tmp_path, golden):
    """BiCodec saved with parametrizations.weight.original0/1 and wav2vec2 with weight_g/weight_v."""

    def respell(state, old, new):
        return {k.replace(old[0], new[0]).replace(old[1], new[1]): v for k, v in state.items()}

    gv = (".weight_g", ".weight_v")
    par = (".parametrizations.weight.original0", ".parametrizations.weight.original1")
    d = _copy_codec(mini_dir / "BiCodec", tmp_path / "b", edit=lambda s: respell(s, gv, par),
                    w2v_edit=lambda s: respell(s, par, gv))
    other = BiCodec.from_dir(d)
    wav = golden["short_16k.wav16k"].numpy()
    assert torch.equal(other.encode_semantic([wav])[0], codec.encode_semantic([wav])[0])
    sem, glob = golden["short_16k.semantic"][None], golden["short_16k.global"][None]
    assert torch.equal(other.decode(sem, glob), codec.decode(sem, glob))


def test_config_sections_at_top_level_and_defaults(mini_dir):
    raw = yaml.safe_load((mini_dir / "BiCodec" / "config.yaml").read_text())
    nested = BiCodecConfig.from_dict(raw)
    flat = BiCodecConfig.from_dict({**{k: v for k, v in raw.items() if k != "audio_tokenizer"},
                                    **raw["audio_tokenizer"]})
    assert flat == nested and nested.encoder.vocos_dim == 48 and nested.quantizer.codebook_size == 64
    assert BiCodecConfig.from_dict({}) == BiCodecConfig()  # Spark-TTS-0.5B defaults
    assert BiCodecConfig().quantizer.codebook_size == 8192 and BiCodecConfig().ref_segment_duration == 6
    with pytest.raises(ValueError, match="unknown keys.*'encoder'.*vocos_depth"):
        BiCodecConfig.from_dict({"audio_tokenizer": {"encoder": {"vocos_depth": 3}}})
    with pytest.warns(UserWarning, match="ignoring unknown keys.*'mel_params'.*center"):  # the reference ignores it
        assert BiCodecConfig.from_dict({"mel_params": {"center": True}}) == BiCodecConfig()


# --- full size -----------------------------------------------------------------------------------

@pytest.mark.slow
def test_official_shaped_checkpoint_loads_and_runs(official_dir):
    path = official_dir / "BiCodec"
    codec = BiCodec.from_dir(path)  # strict: raises on any missing, unexpected or mis-shaped tensor
    assert (codec.semantic_codebook_size, codec.global_codebook_size, codec.num_global_tokens) == (8192, 4096, 32)
    assert len(codec.wav2vec2.encoder.layers) == 16 and codec.wav2vec2.config.hidden_size == 1024
    # The random checkpoint draws BatchNorm running variances from N(0, 0.02^2); negative ones give NaN.
    for m in codec.modules():
        if isinstance(m, torch.nn.BatchNorm1d):
            m.running_var.abs_()
    wav = (0.1 * np.random.default_rng(0).standard_normal(16000)).astype(np.float32)
    glob = codec.encode_global([wav])
    semantic = codec.encode_semantic([wav])[0]
    assert glob.shape == (1, 32) and 0 <= glob.min() and glob.max() < 4096
    assert semantic.shape == (49,) and 0 <= semantic.min() and semantic.max() < 8192
    out = codec.decode(semantic[None], glob)
    assert out.shape == (1, 49 * 320) and torch.isfinite(out).all() and out.abs().max() <= 1


def test_bfloat16_decoding_is_close_to_float32(mini_dir, codec, golden):
    # Measured on the golden codes with these random weights: SNR 30.3-30.7 dB against float32.
    fast = BiCodec.from_dir(mini_dir / "BiCodec", with_wav2vec2=False, decode_dtype=torch.bfloat16)
    assert (fast.decode_dtype, codec.decode_dtype) == (torch.bfloat16, torch.float32)
    assert fast.quantizer.codebook.weight.dtype == torch.float32  # tokenisation stays float32
    for name in ("short_16k", "long_16k"):
        sem, glob = golden[f"{name}.semantic"][None], golden[f"{name}.global"][None]
        ref, wav = codec.decode(sem, glob)[0], fast.decode(sem, glob)[0]
        assert wav.dtype == torch.float32 and wav.shape == ref.shape
        signal = (ref - ref.mean()).pow(2).sum()
        snr = 10 * torch.log10(signal / (wav - ref).pow(2).sum())
        assert 25 < snr < 60, f"{name}: bf16 SNR {snr:.1f} dB"  # close, and really bf16
    with pytest.raises(ValueError, match="floating point"):
        fast.set_decode_dtype(torch.int8)


@pytest.mark.parametrize(("kernel", "stride", "frames"), [(16, 8, 5), (11, 5, 7), (4, 2, 1), (3, 2, 9)])
def test_transposed_conv_equals_torch_and_tracks_weight_changes(kernel, stride, frames):
    """The overlap-add of whole tap blocks equals torch's conv_transpose1d (float64), whole and partial last
    blocks (k not a multiple of the stride); the cached tap matrix follows in-place updates and dtype moves,
    and gradients flow while training."""
    from gpa.codecs.bicodec_layers import tap_matrix, transposed_conv

    g = torch.Generator().manual_seed(kernel)
    x = torch.randn(2, 6, frames, generator=g, dtype=torch.float64)
    w = torch.randn(6, 4, kernel, generator=g, dtype=torch.float64)
    b = torch.randn(4, generator=g, dtype=torch.float64)
    assert torch.allclose(transposed_conv(x, w, b, stride), F.conv_transpose1d(x, w, b, stride=stride), atol=1e-12)
    assert tap_matrix(w) is tap_matrix(w)  # built once
    w.mul_(-2)  # in place: the cache is rebuilt
    assert torch.allclose(transposed_conv(x, w, None, stride), F.conv_transpose1d(x, w, stride=stride), atol=1e-12)
    conv = torch.nn.ConvTranspose1d(6, 4, kernel, stride=stride).double()
    with torch.no_grad():
        first = transposed_conv(x, conv.weight, conv.bias, stride)
    conv.float()
    with torch.no_grad():
        moved = transposed_conv(x.float(), conv.weight, conv.bias, stride)
    assert moved.dtype == torch.float32 and torch.allclose(moved.double(), first, atol=1e-5)
    conv.double()
    transposed_conv(x, conv.weight, conv.bias, stride).square().sum().backward()
    assert conv.weight.grad is not None and conv.weight.grad.abs().sum() > 0
