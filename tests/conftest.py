"""Shared fixtures: the golden fixture set (GPA_FIXTURES, default ../shared/fixtures)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import gpa.checkpoint

REPO = Path(__file__).resolve().parents[1]
BUNDLED_MODEL = gpa.checkpoint.BUNDLED_MODEL  # the real one; tests see a missing one (_no_bundled_model)


def fixtures_root() -> Path:
    """The fixture directory: $GPA_FIXTURES or ../shared/fixtures beside the repository."""
    root = Path(os.environ.get("GPA_FIXTURES", REPO.parent / "shared" / "fixtures"))
    if not (root / "golden" / "expected.json").is_file():
        raise FileNotFoundError(f"golden fixtures not found under {root}; set GPA_FIXTURES")
    return root


@pytest.fixture(scope="session")
def fixtures() -> Path:
    return fixtures_root()


@pytest.fixture(scope="session")
def mini_dir(fixtures: Path) -> Path:
    """The tiny GPA checkpoint directory in the official layout."""
    return fixtures / "gpa-mini"


@pytest.fixture(scope="session")
def expected(fixtures: Path) -> dict:
    """golden/expected.json: input files, offsets, special ids, prompt keys."""
    return json.loads((fixtures / "golden" / "expected.json").read_text())


@pytest.fixture(scope="session")
def golden(fixtures: Path) -> dict[str, torch.Tensor]:
    """golden/expected.safetensors: the reference implementation's outputs."""
    return load_file(str(fixtures / "golden" / "expected.safetensors"))


@pytest.fixture(scope="session")
def golden_inputs(fixtures: Path, expected: dict) -> dict[str, Path]:
    """Golden input name -> audio file path."""
    return {name: fixtures / "golden" / info["path"] for name, info in expected["files"].items()}


@pytest.fixture(scope="module")
def one_thread():
    """Torch on one thread for a whole module (``pytestmark = pytest.mark.usefixtures("one_thread")``): on a
    machine shared with other jobs two spinning threads can be far slower than one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative L2 error of a against reference b."""
    a, b = a.detach().double().flatten(), b.detach().double().flatten()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


@pytest.fixture(scope="session")
def official_dir(fixtures: Path) -> Path:
    """A random-weight checkpoint with every official file, name and shape (about 4.3 GB).

    Taken from $GPA_OFFICIAL_DIR when set, else built once by the fixtures' make_official_shaped.py
    into $XDG_CACHE_HOME/gpa/tests/official-shaped and reused by later runs.
    """
    if os.environ.get("GPA_OFFICIAL_DIR"):
        return Path(os.environ["GPA_OFFICIAL_DIR"])
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "gpa" / "tests" / "official-shaped"
    marker = cache / ".complete"
    if not marker.exists():
        tool = fixtures.parent / "tools" / "make_official_shaped.py"
        subprocess.run([sys.executable, str(tool), str(cache), str(fixtures)], check=True)
        marker.touch()
    return cache


NANO_TEXTS = ("How much was it.", "Does that look good.", "Shall I carry you.", "You were engaged.",
              "Author of the danger trail.", "Hello there.")


@pytest.fixture(scope="session")
def nano_config():
    """A tiny GPA-nano codec config (random weights build in well under a second)."""
    from gpa.codecs.hifigan import HiFiGANConfig
    from gpa.codecs.nano import NanoCodecConfig
    from gpa.codecs.whisper_encoder import WhisperEncoderConfig

    # decoder_dim 64 makes the ConvNeXt MLPs large enough (64 x 256) to be stored as int8 by save().
    return NanoCodecConfig(semantic_codebook_size=64, asr_codebook_size=32, fsq_levels=(4, 4, 4), speaker_dim=32,
                           speaker_vector=32, decoder_dim=64, semantic_layer=1,
                           whisper=WhisperEncoderConfig(d_model=64, n_heads=2, ffn_dim=128, n_layers=2),
                           vocoder=HiFiGANConfig(upsample_initial_channel=16))


NANO_VOICES = {  # built-in voices of the nano fixture: name -> (clip under ../shared/data, licence, has a transcript)
    "cathy": ("cathy/arctic_a0009_1592748391.flac", "CC0-1.0", True),
    "ls1688": ("librispeech-excerpts/test-other/1688/1688-142285-0003.flac", "CC-BY-4.0", False),
}


def write_voices(checkpoint: Path, data: Path) -> None:
    """Built-in voices (voices/NAME.wav, NAME.txt, voices.json) from real 16 kHz recordings of two speakers."""
    import soundfile as sf

    root = checkpoint / "voices"
    root.mkdir()
    catalog = {}
    for name, (clip, licence, with_text) in NANO_VOICES.items():
        samples, sr = sf.read(str(data / clip), dtype="int16")
        assert sr == 16000 and samples.ndim == 1, (clip, sr, samples.shape)
        sf.write(str(root / f"{name}.wav"), samples, sr, subtype="PCM_16")
        if with_text:
            (root / f"{name}.txt").write_text((data / clip).with_suffix(".txt").read_text(encoding="utf-8"))
        catalog[name] = {"description": f"test voice from {clip}", "licence": licence, "source": clip}
    (root / "voices.json").write_text(json.dumps(catalog, indent=1))


@pytest.fixture(scope="session")
def nano_dir(tmp_path_factory, nano_config, fixtures) -> Path:
    """A complete GPA-nano checkpoint with random weights: tiny nano codec, BPE tokenizer, "tiny" LLM, and
    two built-in voices (NANO_VOICES)."""
    from gpa.codecs.nano import NanoCodec
    from gpa.train.seed import seed_checkpoint
    from gpa.train.tokenizer import build_tokenizer

    root = tmp_path_factory.mktemp("nano")
    torch.manual_seed(0)
    codec = NanoCodec(nano_config)
    with torch.no_grad():
        for km in (codec.semantic_kmeans, codec.asr_kmeans):
            km.centroids.copy_(torch.randn_like(km.centroids))
        # PyTorch's random init shrinks the signal through HiFi-GAN's ~40 convolutions to a DC offset with
        # a std of ~2e-5, against which float tolerances test nothing: doubled conv weights and biases cut
        # to a tenth give a waveform with a std of ~0.07, unclipped.
        for m in codec.vocoder.modules():
            if isinstance(m, torch.nn.Conv1d | torch.nn.ConvTranspose1d):
                m.weight.mul_(2.0)
                m.bias.mul_(0.1)
    codec.save(root / "nano-codec")
    tok = build_tokenizer(NANO_TEXTS * 4, 300, nano_config.asr_codebook_size, nano_config.global_codebook_size,
                          nano_config.semantic_codebook_size)
    ckpt = seed_checkpoint(root / "gpa-nano-tiny", [root / "nano-codec"], tok, "tiny")
    write_voices(ckpt, fixtures.parent / "data")
    return ckpt


@pytest.fixture(autouse=True)
def _no_bundled_model(monkeypatch, tmp_path_factory):
    """Every test runs as if GPA-nano were not bundled, so a test without --model / GPA_MODEL gets the
    usage error whether or not gpa/models/gpa-nano is installed (and never loads, or serves, it by
    accident). A test of the bundled model itself takes the ``bundled_model`` fixture."""
    monkeypatch.setattr(gpa.checkpoint, "BUNDLED_MODEL", tmp_path_factory.getbasetemp() / "no-bundled-model")


@pytest.fixture
def bundled_model(_no_bundled_model, monkeypatch) -> Path:
    """The GPA-nano shipped in the package (gpa/models/gpa-nano), restored as the default model."""
    if not BUNDLED_MODEL.is_dir():
        pytest.fail(f"the bundled model is missing: {BUNDLED_MODEL}")
    monkeypatch.setattr(gpa.checkpoint, "BUNDLED_MODEL", BUNDLED_MODEL)
    return BUNDLED_MODEL
