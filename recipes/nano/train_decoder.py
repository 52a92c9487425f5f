"""Prototype step 3: train TokenDecoder + SpeakerEncoder on L1 log-mel reconstruction, for a time budget.

The speaker reference is always a DIFFERENT segment than the target: another cathy utterance, or the
other half of a LibriSpeech utterance, so the global tokens cannot carry the target's content.

Usage: python recipes/nano/train_decoder.py FEATS_DIR --layer 5 --k 1024 --minutes 20
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).parent))  # prototype: sibling module, moved into gpa/ later
from decoder import SpeakerEncoder, TokenDecoder, mel_frames_for  # noqa: E402

log = logging.getLogger("train")
SEG = 100  # target tokens per example (2 s)
REF = 172  # reference mel frames (2 s)


class Data:
    """Codes, mels and utterance boundaries of one split."""

    def __init__(self, feats: Path, split: str, km: dict) -> None:
        d = np.load(feats / f"{split}.npz")
        self.meta = json.loads((feats / f"{split}.json").read_text())
        x = (d[f"layer{km['layer']}"].astype(np.float32) - km["mean"]) / km["std"]
        c = torch.from_numpy(km["centroids"])
        xt = torch.from_numpy(x)
        self.codes = torch.cat([torch.addmm(c.pow(2).sum(1), xt[i : i + 65536], c.t(), alpha=-2.0).argmin(1)
                                for i in range(0, len(xt), 65536)])
        self.mel = torch.from_numpy(d["mel"].astype(np.float32))  # (T, 80)
        self.tok_off = np.concatenate([[0], np.cumsum([m["frames"] for m in self.meta])])
        self.mel_off = np.concatenate([[0], np.cumsum([m["mel_frames"] for m in self.meta])])

    def target(self, i: int, start: int, n: int = SEG) -> tuple[torch.Tensor, torch.Tensor]:
        """Codes [start, start+n) of utterance i and the mel frames covering them."""
        t0, m0 = self.tok_off[i] + start, self.mel_off[i] + mel_frames_for(start)
        return self.codes[t0 : t0 + n], self.mel[m0 : m0 + mel_frames_for(n)]

    def mel_seg(self, i: int, start: int, n: int = REF) -> torch.Tensor:
        return self.mel[self.mel_off[i] + start : self.mel_off[i] + start + n]


def mel_table(k: int, *splits: Data) -> torch.Tensor:
    """(K, 80) mean log-mel of the mel frames each code covers, over the training splits."""
    sums, counts = torch.zeros(k, 80, dtype=torch.float64), torch.zeros(k, dtype=torch.float64)
    for d in splits:
        for i, m in enumerate(d.meta):
            j = np.arange(m["mel_frames"])
            tok = d.codes[d.tok_off[i] + np.minimum((j * 256 / 22050 * 50).astype(np.int64), m["frames"] - 1)]
            sums.index_add_(0, tok, d.mel[d.mel_off[i] : d.mel_off[i + 1]].double())
            counts += torch.bincount(tok, minlength=k).double()
    mean_mel = sums.sum(0) / counts.sum()
    return torch.where(counts[:, None] > 0, sums / counts.clamp_min(1)[:, None], mean_mel).float()


def batch(cathy: Data, libri: Data, bs: int, rng: np.random.Generator):
    codes, mels, refs = [], [], []
    for b in range(bs):
        if b % 2 == 0:  # cathy: target from one utterance, reference from another
            ok = [i for i, m in enumerate(cathy.meta) if m["frames"] > SEG]
            i, j = rng.choice(ok, 2, replace=False)
            s = rng.integers(0, cathy.meta[i]["frames"] - SEG)
            c, m = cathy.target(i, s)
            r = cathy.mel_seg(j, rng.integers(0, max(1, cathy.meta[j]["mel_frames"] - REF)))
        else:  # LibriSpeech: target in one half, reference in the other half of the same utterance
            ok = [i for i, mm in enumerate(libri.meta) if mm["frames"] > 2 * SEG + 10]
            i = rng.choice(ok)
            half = libri.meta[i]["frames"] // 2
            first = rng.random() < 0.5
            s = rng.integers(0, half - SEG) if first else rng.integers(half, libri.meta[i]["frames"] - SEG)
            c, m = libri.target(i, s)
            mh = mel_frames_for(half)
            rs = rng.integers(mh, libri.meta[i]["mel_frames"] - REF) if first else rng.integers(0, mh - REF)
            r = libri.mel_seg(i, rs)
        codes.append(c)
        mels.append(m)
        refs.append(r)
    return torch.stack(codes), torch.stack(mels).transpose(1, 2), torch.stack(refs).transpose(1, 2)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("feats", type=Path)
    ap.add_argument("--layer", type=int, default=5)
    ap.add_argument("--k", type=int, default=1024)
    ap.add_argument("--minutes", type=float, default=20)
    ap.add_argument("--bs", type=int, default=16)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    km = dict(np.load(a.feats / f"km_layer{a.layer}_k{a.k}.npz"))
    km["layer"] = a.layer
    cathy, libri = Data(a.feats, "cathy_train", km), Data(a.feats, "libri_train", km)
    dec, spk = TokenDecoder(a.k), SpeakerEncoder()
    table = mel_table(a.k, cathy, libri)
    np.save(a.feats / f"table_layer{a.layer}_k{a.k}.npy", table.numpy())
    with torch.no_grad():
        dec.mel_table.weight.copy_(table)
    params = list(dec.parameters()) + list(spk.parameters())
    log.info("decoder %.2fM params, speaker encoder %.2fM", sum(p.numel() for p in dec.parameters()) / 1e6,
             sum(p.numel() for p in spk.parameters()) / 1e6)
    opt = torch.optim.AdamW(params, lr=a.lr, weight_decay=0.01)
    rng = np.random.default_rng(0)
    t0, step, budget, ema = time.time(), 0, a.minutes * 60, None
    while time.time() - t0 < budget:
        frac = (time.time() - t0) / budget
        for g in opt.param_groups:  # warmup 200 steps, then cosine to 10 % by the end of the time budget
            g["lr"] = a.lr * min(1.0, (step + 1) / 200) * (0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * frac)))
        codes, mel, ref = batch(cathy, libri, a.bs, rng)
        _, v = spk.codes_and_vector(ref)
        loss = (dec(codes, v, mel.shape[-1]) - mel).abs().mean()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        ema = loss.item() if ema is None else 0.98 * ema + 0.02 * loss.item()
        if step % 100 == 0:
            log.info("step %d  l1 %.4f  %.2f steps/s", step, ema, step / (time.time() - t0))
    state = {f"dec.{k}": v for k, v in dec.state_dict().items()} | {f"spk.{k}": v for k, v in spk.state_dict().items()}
    save_file({k: v.contiguous() for k, v in state.items()}, str(a.feats / f"dec_layer{a.layer}_k{a.k}.safetensors"),
              metadata={"steps": str(step), "seconds": str(round(time.time() - t0)), "final_l1": str(ema)})
    log.info("done: %d steps in %.0f s, l1 %.4f", step, time.time() - t0, ema)


if __name__ == "__main__":
    main()
