"""Prototype check: how often do 50 Hz k-means codes change when the encoder input or weights change?

Compares, on held-out cathy and LibriSpeech test-other utterances, the codes of the short (unpadded)
input we tokenize with against (a) Whisper's stock 30 s padded input and (b) int8 per-channel weights.

Usage: python recipes/nano/code_stability.py FEATS_DIR WEIGHTS_DIR --layer 5 --k 1024 --n 20
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

from gpa.codecs.whisper_encoder import WhisperEncoder, log_mel


def fake_int8(w: torch.Tensor) -> torch.Tensor:
    if w.ndim < 2:
        return w
    scale = w.abs().amax(dim=tuple(range(1, w.ndim)), keepdim=True).clamp_min(1e-12) / 127
    return torch.round(w / scale).clamp(-127, 127) * scale


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("feats", type=Path)
    ap.add_argument("weights", type=Path)
    ap.add_argument("--layer", type=int, default=5)
    ap.add_argument("--k", type=int, default=1024)
    ap.add_argument("--n", type=int, default=20)
    a = ap.parse_args()
    torch.set_num_threads(1)
    km = np.load(a.feats / f"km_layer{a.layer}_k{a.k}.npz")
    c = torch.from_numpy(km["centroids"])
    enc = WhisperEncoder.from_safetensors(a.weights / "whisper_tiny_en_encoder.f32.safetensors")
    q = WhisperEncoder.from_safetensors(a.weights / "whisper_tiny_en_encoder.f32.safetensors")
    with torch.no_grad():
        for name, p in q.named_parameters():
            if "embed_positions" not in name:
                p.copy_(fake_int8(p))

    def codes(model: WhisperEncoder, mel: torch.Tensor, n: int) -> torch.Tensor:
        hs = model.hidden_states(mel[None], n_layers=4)
        h = model.layer_norm(hs[4]) if a.layer == 5 else hs[a.layer]
        x = (h[0, :n] - torch.from_numpy(km["mean"])) / torch.from_numpy(km["std"])
        return torch.addmm(c.pow(2).sum(1), x, c.t(), alpha=-2.0).argmin(1)

    out = {}
    for split in ("cathy_test", "libri_test"):
        meta = json.loads((a.feats / f"{split}.json").read_text())[: a.n]
        same_pad, same_int8, total = 0, 0, 0
        with torch.inference_mode():
            for m in meta:
                wav = sf.read(m["path"], dtype="float32")[0]
                n = m["frames"]
                short = codes(enc, log_mel(wav, pad_to_window=False), n)
                same_pad += int((short == codes(enc, log_mel(wav), n)).sum())
                same_int8 += int((short == codes(q, log_mel(wav, pad_to_window=False), n)).sum())
                total += n
        out[split] = {"frames": total, "agree_short_vs_30s_padded": round(same_pad / total, 4),
                      "agree_f32_vs_int8_weights": round(same_int8 / total, 4)}
    print(json.dumps({"layer": a.layer, "k": a.k, **out}, indent=1))


if __name__ == "__main__":
    main()
