"""Prototype step 1: Whisper tiny.en hidden states (50 Hz) and HiFi-GAN log-mels (86.13 Hz) for the real data.

Splits: cathy by the corpus builder's text hash (``gpa.corpus.text.is_heldout``: train / heldout_text);
LibriSpeech train-clean-100 speakers = train, test-other speakers = test (unseen speakers).
Writes OUT/<split>.npz with, per layer, all frames concatenated plus per-utterance offsets.

Usage: python recipes/nano/extract.py DATA_DIR WEIGHTS_DIR OUT_DIR [--layers 2 3 4 5]
(layer 5 = the encoder's output after the final LayerNorm, what CTranslate2 returns)
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr
import torch

from gpa.codecs.hifigan import HiFiGANConfig, MelSpectrogram
from gpa.codecs.whisper_encoder import WhisperEncoder, log_mel
from gpa.corpus.text import is_heldout

log = logging.getLogger("extract")


def utterances(data: Path) -> dict[str, list[tuple[Path, str | None]]]:
    out: dict[str, list[tuple[Path, str | None]]] = {"cathy_train": [], "cathy_test": [], "libri_train": [],
                                                     "libri_test": []}
    for f in sorted((data / "cathy").glob("*.flac")):
        text = " ".join(f.with_suffix(".txt").read_text().split())
        out["cathy_test" if is_heldout(text) else "cathy_train"].append((f, text))
    out["libri_train"] = [(f, None) for f in sorted((data / "librispeech-excerpts/train-clean-100").glob("*.flac"))]
    out["libri_test"] = [(f, None) for f in sorted((data / "librispeech-excerpts/test-other").glob("*/*.flac"))]
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("data", type=Path)
    ap.add_argument("weights", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--layers", type=int, nargs="+", default=[2, 3, 4, 5])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--splits", nargs="+", default=["cathy_train", "cathy_test", "libri_train", "libri_test"])
    a = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(a.threads)
    a.out.mkdir(parents=True, exist_ok=True)
    enc = WhisperEncoder.from_safetensors(a.weights / "whisper_tiny_en_encoder.f32.safetensors")
    mel_fn = MelSpectrogram(HiFiGANConfig())
    for split, items in utterances(a.data).items():
        if split not in a.splits:
            continue
        t0, feats, mels, meta = time.time(), {k: [] for k in a.layers}, [], []
        for f, text in items:
            wav, sr = sf.read(f, dtype="float32")
            assert sr == 16000 and wav.ndim == 1, f
            with torch.inference_mode():
                hs = enc.hidden_states(log_mel(wav, pad_to_window=False)[None], n_layers=4)  # emb, l1..l4
                hs.append(enc.layer_norm(hs[4]))  # "layer 5": the encoder output CTranslate2 returns
                n = int(np.ceil(len(wav) / 320))
                for k in a.layers:
                    feats[k].append(hs[k][0, :n].numpy().astype(np.float16))
                w22 = soxr.resample(wav, 16000, 22050)
                mels.append(mel_fn(torch.from_numpy(w22)).numpy().astype(np.float16).T)  # (T, 80)
            meta.append({"path": str(f), "text": text, "frames": n, "mel_frames": mels[-1].shape[0],
                         "seconds": len(wav) / 16000})
        arrays = {f"layer{k}": np.concatenate(v) for k, v in feats.items()}
        arrays["mel"] = np.concatenate(mels)
        np.savez(a.out / f"{split}.npz", **arrays)
        (a.out / f"{split}.json").write_text(json.dumps(meta))
        secs = sum(m["seconds"] for m in meta)
        log.info("%s: %d utts, %.1f min audio, %.1f s (RTF %.3f)", split, len(meta), secs / 60,
                 time.time() - t0, (time.time() - t0) / secs)


if __name__ == "__main__":
    main()
