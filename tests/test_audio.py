"""The audio front end against the reference loader's golden waveforms, plus bad-input errors."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf
import torch

from gpa.audio import SAMPLE_RATE, AudioError, encode_audio, load_audio, resample, save_audio


@pytest.mark.fidelity
def test_loaded_waveform_matches_reference(golden_inputs, golden):
    for name, path in golden_inputs.items():
        ours = torch.from_numpy(load_audio(path))
        ref = golden[f"{name}.wav16k"]
        assert ours.shape == ref.shape, name
        assert torch.allclose(ours, ref, atol=1e-6, rtol=0), (name, (ours - ref).abs().max())


def test_array_input_matches_file_input(golden_inputs):
    path = golden_inputs["speech1_8k"]
    data, sr = sf.read(str(path), dtype="float64")
    assert np.array_equal(load_audio(data, sr), load_audio(path))
    assert np.array_equal(load_audio(path.read_bytes()), load_audio(path))


@pytest.mark.parametrize("name, fmt, subtype, rate", [
    ("x.flac", "FLAC", "PCM_16", 16000),
    ("x.ogg", "OGG", "VORBIS", 16000),
    ("x.opus", "OGG", "OPUS", 48000),
    ("x.mp3", "MP3", "MPEG_LAYER_III", 44100),
])
def test_compressed_inputs_decode_and_resample(tmp_path, golden_inputs, name, fmt, subtype, rate):
    ref = load_audio(golden_inputs["long_16k"], normalize=False)
    out = tmp_path / name
    sf.write(str(out), resample(ref.astype(np.float64), SAMPLE_RATE, rate), rate, format=fmt, subtype=subtype)
    got = load_audio(out, normalize=False)
    assert abs(len(got) - len(ref)) <= 0.05 * len(ref)  # lossy codecs pad a little
    n = min(len(got), len(ref))
    if fmt == "FLAC":  # lossless at 16 bit
        assert np.abs(got - ref).max() < 1e-3
    else:  # lossy: judge the spectrum-level agreement, allowing an encoder delay of a few ms
        lag = max(range(-800, 801, 8), key=lambda d: float(np.dot(np.roll(got[:n], -d), ref[:n])))
        corr = np.corrcoef(np.roll(got[:n], -lag)[2000:-2000], ref[:n][2000:-2000])[0, 1]
        assert corr > 0.8, (name, lag, corr)


def test_roundtrip_wav_and_flac(tmp_path):
    x = (0.5 * np.sin(np.arange(16000) / 10)).astype(np.float32)
    for ext in ("wav", "flac"):
        save_audio(tmp_path / f"o.{ext}", x)
        back, sr = sf.read(str(tmp_path / f"o.{ext}"), dtype="float32")
        assert sr == SAMPLE_RATE and np.abs(back - x).max() < 1e-4
    assert encode_audio(x)[:4] == b"RIFF"


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda p: p / "nope.wav", "not found"),
        (lambda p: (p / "bad.wav").write_bytes(b"not audio at all" * 10) and p / "bad.wav", "cannot decode"),
        (lambda p: p, "not a file"),
    ],
)
def test_bad_files_are_named(tmp_path, make, match):
    with pytest.raises(AudioError, match=match):
        load_audio(make(tmp_path))


def test_empty_and_silent_audio(tmp_path):
    sf.write(str(tmp_path / "empty.wav"), np.zeros(0, dtype=np.float32), 16000)
    with pytest.raises(AudioError, match="empty"):
        load_audio(tmp_path / "empty.wav")
    with pytest.raises(AudioError, match="silent"):
        load_audio(np.zeros(1600, dtype=np.float32), 16000)
    with pytest.raises(AudioError, match="sample_rate"):
        load_audio(np.ones(10, dtype=np.float32))
    with pytest.raises(AudioError, match="floating point"):
        load_audio(np.ones(10, dtype=np.int16), 16000)
    with pytest.raises(AudioError, match="path, bytes or numpy"):
        load_audio(3.5)  # type: ignore[arg-type]
