"""Prototype step 2: k-means over Whisper hidden states; per layer and K, cheap proxies of token quality.

Proxies (no decoder needed): (1) ``lookup_l1``: mean |log-mel error| when each 86 Hz mel frame is
predicted by the train-set mean mel of its 50 Hz token (lower = tokens carry more of the spectrum);
(2) ``speaker_nmi``: normalised mutual information between tokens and the 200 LibriSpeech train
speakers (lower = more speaker-independent). Writes OUT/km_layer{L}_k{K}.npz (mean, std, centroids).

Usage: python recipes/nano/kmeans.py FEATS_DIR --layers 2 3 4 5 --ks 256 1024 4096
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import normalized_mutual_info_score

log = logging.getLogger("kmeans")


def assign(x: torch.Tensor, c: torch.Tensor, chunk: int = 65536) -> torch.Tensor:
    """Nearest centroid (squared L2) for each row of x (N, D) -> (N,) int64."""
    cn = c.pow(2).sum(1)
    return torch.cat([torch.addmm(cn, x[i : i + chunk], c.t(), alpha=-2.0).argmin(1)
                      for i in range(0, len(x), chunk)])


def fit(x: torch.Tensor, k: int, iters: int, seed: int = 0) -> torch.Tensor:
    """Lloyd's k-means from k random data rows; empty clusters are re-seeded from random rows."""
    g = torch.Generator().manual_seed(seed)
    c = x[torch.randperm(len(x), generator=g)[:k]].clone()
    for it in range(iters):
        a = assign(x, c)
        sums = torch.zeros_like(c).index_add_(0, a, x)
        counts = torch.bincount(a, minlength=k).float()
        empty = counts == 0
        c = sums / counts.clamp_min(1)[:, None]
        c[empty] = x[torch.randint(len(x), (int(empty.sum()),), generator=g)]
        if it == iters - 1:
            log.info("k=%d iter %d: %d empty clusters", k, it, int(empty.sum()))
    return c


def mel_index(meta: list[dict]) -> np.ndarray:
    """For each mel frame of each utterance, the global index of its 50 Hz token frame."""
    out, base = [], 0
    for m in meta:
        j = np.arange(m["mel_frames"])
        out.append(base + np.minimum((j * 256 / 22050 * 50).astype(np.int64), m["frames"] - 1))
        base += m["frames"]
    return np.concatenate(out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("feats", type=Path)
    ap.add_argument("--layers", type=int, nargs="+", default=[2, 3, 4, 5])
    ap.add_argument("--ks", type=int, nargs="+", default=[256, 1024, 4096])
    ap.add_argument("--fit-frames", type=int, default=100_000)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(a.threads)
    splits = {s: (np.load(a.feats / f"{s}.npz"), json.loads((a.feats / f"{s}.json").read_text()))
              for s in ("cathy_train", "libri_train", "cathy_test", "libri_test")}
    spk = np.concatenate([[m["path"].split("/")[-1].split("-")[0]] * m["frames"] for m in splits["libri_train"][1]])
    results = []
    for layer in a.layers:
        key = f"layer{layer}"
        train = np.concatenate([splits["cathy_train"][0][key], splits["libri_train"][0][key]]).astype(np.float32)
        mean, std = train.mean(0), train.std(0) + 1e-5
        sub = torch.from_numpy((train[np.random.default_rng(0).permutation(len(train))[: a.fit_frames]] - mean) / std)
        for k in a.ks:
            t0 = time.time()
            c = fit(sub, k, a.iters)
            fit_s = time.time() - t0
            np.savez(a.feats / f"km_layer{layer}_k{k}.npz", mean=mean, std=std, centroids=c.numpy())
            codes = {s: assign(torch.from_numpy((d[key].astype(np.float32) - mean) / std), c).numpy()
                     for s, (d, _) in splits.items()}
            # per-token mean mel from the train splits, then lookup error on every split
            sums, counts = np.zeros((k, 80)), np.zeros(k)
            for s in ("cathy_train", "libri_train"):
                d, meta = splits[s]
                tok = codes[s][mel_index(meta)]
                np.add.at(sums, tok, d["mel"].astype(np.float64))
                counts += np.bincount(tok, minlength=k)
            table = sums / np.maximum(counts, 1)[:, None]
            row = {"layer": layer, "k": k, "fit_s": round(fit_s, 1), "used_codes": int((counts > 0).sum()),
                   "speaker_nmi": round(float(normalized_mutual_info_score(spk, codes["libri_train"])), 4)}
            for s, (d, meta) in splits.items():
                row[f"lookup_l1_{s}"] = round(float(np.abs(table[codes[s][mel_index(meta)]] - d["mel"]).mean()), 4)
            log.info("%s", row)
            results.append(row)
    (a.feats / "kmeans_results.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
