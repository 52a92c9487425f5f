"""``gpa recipe nano``: rebuild GPA-nano from nothing but packages (corpus, codec, tokenizer, LLM, bundle).

Every step writes its own folder under ``OUT`` and is skipped when that folder is complete, so an
interrupted run resumes where it stopped (the LLM run resumes from its newest checkpoint)::

    OUT/corpus/            gpa corpus (Debian/PyPI voices + shared/data recordings): 1,500 sentences x 12 voices
    OUT/corpus-extra/      10,000 further sentences, one voice each (text diversity for the LLM)
    OUT/corpus-extra-2/    20,000 more after those, one voice each
    OUT/codec/pretrained   Whisper tiny.en encoder + HiFi-GAN universal, converted to safetensors
    OUT/codec/features-*   encoder features on both code grids + vocoder log-mel targets
    OUT/codec/kmeans       semantic and ASR codebooks
    OUT/codec/speaker      token decoder + speaker encoder, jointly trained
    OUT/codec/compact-*    codes, global codes and 8-bit log-mel under that codec (train subset + held-out)
    OUT/codec/final        a larger token decoder trained on those, the speaker encoder frozen (GPU: minutes)
    OUT/seed               tokenizer + LLM config at initial weights + the codec (for gpa prepare)
    OUT/data               gpa prepare of both corpora's train_gpa.jsonl
    OUT/run                gpa train from scratch (on a GPU when there is one: minutes; days on 2 CPU cores)
    OUT/gpa-nano           the bundle: LLM (float16) + final codec (int8 matrices) + tokenizer
"""

from __future__ import annotations

import json
import logging
import multiprocessing as mp
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from gpa.checkpoint import INFERENCE_FILE
from gpa.codecs.nano import NanoCodec, NanoCodecConfig
from gpa.corpus.build import CorpusConfig, build_corpus
from gpa.corpus.manifests import SPLIT_FILES, UTTERANCES, read_jsonl
from gpa.train.config import PrepareConfig, TrainConfig
from gpa.train.export import export
from gpa.train.nano_codec import (
    DecoderTraining,
    Features,
    Utterance,
    extract,
    extract_compact,
    pretrained_codec,
    set_kmeans,
    train_decoder,
)
from gpa.train.prepare import prepare
from gpa.train.seed import seed_checkpoint
from gpa.train.tokenizer import build_tokenizer
from gpa.weights import load_strict

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class NanoRecipe:
    """Everything that shapes GPA-nano; the defaults are what the bundled model was built with."""

    corpus: CorpusConfig = field(default_factory=lambda: CorpusConfig(sentences=1500, workers=2))
    corpus_dir: str = ""  # an existing corpus folder to use instead of building OUT/corpus
    # Further sentences, one voice each (text diversity for the LLM), built in this order as OUT/corpus-extra,
    # OUT/corpus-extra-2, ...: each continues the seeded sentence choice where the one before stopped.
    extra_corpora: tuple[CorpusConfig, ...] = field(default_factory=lambda: (
        CorpusConfig(sentences=10000, skip_sentences=1500, heldout_sentences=0, voices_per_sentence=1, real=False,
                     workers=2),
        CorpusConfig(sentences=20000, skip_sentences=11500, heldout_sentences=0, voices_per_sentence=1,
                     real=False, workers=2)))
    extra_corpus_dirs: tuple[str, ...] = ()  # existing folders for extra_corpora (in order) instead of building them
    codec: NanoCodecConfig = field(default_factory=lambda: NanoCodecConfig(decoder_dim=192))
    codec_utterances_per_voice: int = 400  # synthetic utterances per seen voice for codec training (+ all real)
    workers: int = 2  # processes for feature extraction and gpa prepare
    speaker_minutes: float = 18.0  # joint decoder + speaker encoder training (2 threads: 1,356 steps for the bundle)
    # The final token decoder: a new, larger one, trained from the speaker stage's codes (encoder frozen) on
    # a subset of the codec utterances, with input-code noise, keeping its best state on held-out sentences.
    decoder: dict[str, int] = field(default_factory=lambda: dict(decoder_dim=320, token_blocks=4, mel_blocks=6))
    decoder_training: DecoderTraining = field(default_factory=lambda: DecoderTraining(
        minutes=4.0, batch_size=64, segment=64, lr=1.5e-3, warmup_steps=300, code_noise=0.2, eval_every=500,
        freeze_speaker=True))
    decoder_minutes_cpu: float = 300.0  # its budget where no GPU is found (2 cores: ~0.25 steps/s)
    decoder_utterances_per_voice: int = 300  # synthetic utterances per seen voice (the bundle's upload limit)
    decoder_real_utterances: int = 600  # of cathy's train recordings (+ every LibriSpeech excerpt)
    decoder_heldout: int = 240  # held-out-sentence utterances for choosing the best state (200 synthetic + 40 cathy)
    text_vocab: int = 1024  # byte-level BPE ids (including the 256 bytes)
    model: str = "medium"  # LLM preset (gpa.train.config.MODEL_PRESETS) or ModelConfig JSON
    train: dict[str, Any] = field(default_factory=lambda: dict(  # gpa.train.config.TrainConfig fields
        batch_size=128, lr=1.5e-3, min_lr=1e-4, warmup_steps=300, weight_decay=0.1, max_steps=6000,
        task_weights={"asr": 1.0, "tts": 1.0, "vc": 2.0},  # VC keeps learning after ASR/TTS have stopped
        eval_every=500, save_every=500, max_len=1024, cache_prompts=True, keep_checkpoints=2))
    seed: int = 0

    def __post_init__(self) -> None:
        if len(self.extra_corpus_dirs) > len(self.extra_corpora):
            raise ValueError(f"{len(self.extra_corpus_dirs)} extra corpus folders for {len(self.extra_corpora)} "
                             "extra corpora")


def _done(path: Path) -> bool:
    return (path / ".done").is_file()


def _mark(path: Path, info: dict[str, Any] | None = None) -> None:
    (path / ".done").write_text(json.dumps(info or {}, indent=1) + "\n")


def codec_utterances(corpus: Path, per_voice: int, seed: int, data_dir: Path | None) -> list[Utterance]:
    """Codec training set: ``per_voice`` train utterances of each synthetic voice, every real train
    recording, and the LibriSpeech train excerpts (one recording per speaker)."""
    rows = read_jsonl(corpus / UTTERANCES)
    by: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        if r["split"] == "train":
            by.setdefault(r["speaker"], []).append(r)
    rng, out = random.Random(seed), []
    for speaker, items in sorted(by.items()):
        items = sorted(items, key=lambda r: r["audio"])
        rng.shuffle(items)
        keep = items if items[0]["source"] == "real" else items[:per_voice]
        out += [Utterance(str(corpus / r["audio"]), speaker) for r in keep]
    libri = (data_dir or corpus / "real") / "librispeech-excerpts" / "train-clean-100"
    out += [Utterance(str(f), "libri-" + f.name.split("-")[0]) for f in sorted(libri.glob("*.flac"))]
    return out


# Built-in voices of the bundle: corpus speaker -> (voice name, licence, source, description).
BUNDLE_VOICES = {
    "cathy": ("cathy", "CC0-1.0", "real recording, CMU ARCTIC prompt (shared/data/cathy)",
              "US English female (real speech)"),
    "rhvoice_slt": ("slt", "LGPL-2.1+", "RHVoice slt (Debian rhvoice-english)", "US English female (synthetic)"),
    "rhvoice_bdl": ("bdl", "LGPL-2.1+", "RHVoice bdl (Debian rhvoice-english)", "US English male (synthetic)"),
    "rhvoice_alan": ("alan", "LGPL-2.1+", "RHVoice alan (Debian rhvoice-english)", "Scottish English male (synthetic)"),
    "pico_en-US": ("pico_us", "Apache-2.0", "SVOX pico en-US (Debian libttspico-utils)",
                   "US English female (synthetic)"),
}
DEFAULT_VOICE = "slt"
# The bundle's speed settings on CPU (its inference.json, see gpa.checkpoint.Checkpoint.inference_defaults):
# TTS real-time factor 0.49 -> 0.28 on 2 cores, 0.21 with gpa's C++ decode kernels (bench/nano_tts.py); the
# accuracy cost is in the model card.
INFERENCE = {"cpu": {"quantize": "int8", "vocoder_dtype": "bfloat16", "dtype": "float32", "native_decode": True}}


def pick_voices(corpus: Path, out: Path) -> Path:
    """Write the bundle's ``voices/`` (see :mod:`gpa.voices`): per voice of :data:`BUNDLE_VOICES`, the middle
    (by path) of its 4-7 s train utterances, as 16 kHz PCM16, with its transcript."""
    import soundfile as sf

    from gpa.audio import load_audio

    rows = read_jsonl(corpus / UTTERANCES)
    out.mkdir(parents=True, exist_ok=True)
    meta: dict[str, Any] = {"default": DEFAULT_VOICE}
    for speaker, (name, licence, source, description) in BUNDLE_VOICES.items():
        cands = sorted((r for r in rows if r["speaker"] == speaker and r["split"] == "train"
                        and 4.0 <= r["duration"] <= 7.0), key=lambda r: r["audio"])
        if not cands:
            raise ValueError(f"{corpus} has no 4-7 s train utterance of {speaker} for the built-in voice {name}")
        r = cands[len(cands) // 2]
        sf.write(out / f"{name}.wav", load_audio(str(corpus / r["audio"]), normalize=False), 16000, subtype="PCM_16")
        (out / f"{name}.txt").write_text(r["text"] + "\n")
        meta[name] = {"description": description, "licence": licence, "source": source}
    (out / "voices.json").write_text(json.dumps(meta, indent=1) + "\n")
    return out


def _extract_part(args: tuple[str, list[Utterance], str]) -> None:
    torch.set_num_threads(1)
    codec_dir, utts, out = args
    extract(NanoCodec.from_dir(codec_dir), utts, Path(out))


def _extract_compact_part(args: tuple[str, list[Utterance], str]) -> None:
    torch.set_num_threads(1)
    codec_dir, utts, out = args
    extract_compact(NanoCodec.from_dir(codec_dir), utts, Path(out))


def decoder_utterances(corpus: Path, recipe: NanoRecipe, data_dir: Path | None = None
                       ) -> tuple[list[Utterance], list[Utterance]]:
    """The final decoder's (train, held-out) utterances: a seeded subset of :func:`codec_utterances` (at most
    ``decoder_utterances_per_voice`` per synthetic voice, ``decoder_real_utterances`` of cathy, every
    LibriSpeech excerpt), and held-out-sentence clips of the seen voices plus cathy's held-out prompts."""
    rng = random.Random(recipe.seed)
    train: list[Utterance] = []
    by: dict[str, list[Utterance]] = {}
    for u in codec_utterances(corpus, recipe.codec_utterances_per_voice, recipe.seed, data_dir):
        by.setdefault(u.speaker, []).append(u)
    for speaker, items in sorted(by.items()):
        cap = recipe.decoder_real_utterances if speaker == "cathy" else recipe.decoder_utterances_per_voice
        train += items if speaker.startswith("libri-") else rng.sample(items, min(cap, len(items)))
    text, cathy = (read_jsonl(corpus / SPLIT_FILES[split]) for split in ("heldout_text", "cathy_test"))
    n_cathy = recipe.decoder_heldout // 6
    held = rng.sample(text, min(recipe.decoder_heldout - n_cathy, len(text))) + cathy[:n_cathy]
    return train, [Utterance(str(corpus / r["audio"]), r["speaker"]) for r in held]


def train_final_decoder(corpus: Path, codec_dir: Path, recipe: NanoRecipe, step: Callable[[str], None],
                        progress: bool) -> None:
    """``OUT/codec/final``: the speaker stage's codec with a new token decoder of shape ``recipe.decoder``,
    trained on compact features (on the GPU when there is one)."""
    train_utts, held_utts = decoder_utterances(corpus, recipe)
    parts = [codec_dir / f"compact-{i}" for i in range(recipe.workers)]
    held = codec_dir / "compact-heldout"
    if not all(p.with_suffix(".npz").is_file() for p in [*parts, held]):
        step(f"compact features of {len(train_utts)} + {len(held_utts)} held-out utterances")
        src = str(codec_dir / "speaker")
        jobs = [(src, train_utts[i :: recipe.workers], str(p)) for i, p in enumerate(parts)]
        jobs.append((src, held_utts, str(held)))
        with mp.get_context("spawn").Pool(recipe.workers) as pool:
            pool.map(_extract_compact_part, jobs)
    cuda = torch.cuda.is_available()
    settings = replace(recipe.decoder_training, device="cuda" if cuda else "cpu", threads=recipe.workers,
                       minutes=recipe.decoder_training.minutes if cuda else recipe.decoder_minutes_cpu,
                       seed=recipe.seed + 1)
    step(f"codec training: final decoder {recipe.decoder} ({settings.minutes:.0f} min on {settings.device})")
    old = NanoCodec.from_dir(codec_dir / "speaker")
    codec = NanoCodec(replace(old.config, context=0, **recipe.decoder))
    load_strict(codec, {**{k: v for k, v in old.state_dict().items() if not k.startswith("decoder.")},
                        **{f"decoder.{k}": v for k, v in codec.decoder.state_dict().items()}}, "final decoder")
    res = train_decoder(codec, Features(parts), settings, progress=progress, heldout=Features([held]))
    codec.save(codec_dir / "final", int8=False)
    _mark(codec_dir / "final", res)


def run_recipe(out: str | Path, recipe: NanoRecipe = NanoRecipe(), progress: bool = True,
               report: Callable[[str], None] = logger.info) -> Path:
    """Run (or resume) every step; returns the bundle directory ``OUT/gpa-nano``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "recipe.json").write_text(json.dumps(asdict(recipe), indent=1) + "\n")
    t0 = time.time()

    def step(name: str) -> None:
        report(f"[{time.time() - t0:7.0f} s] {name}")

    corpus = Path(recipe.corpus_dir) if recipe.corpus_dir else out / "corpus"
    if not recipe.corpus_dir:
        step("corpus")
        build_corpus(corpus, recipe.corpus, progress=progress)
    manifests = [corpus / "train_gpa.jsonl"]
    for i, cfg in enumerate(recipe.extra_corpora):
        if i < len(recipe.extra_corpus_dirs):
            extra = Path(recipe.extra_corpus_dirs[i])
        else:
            extra = out / ("corpus-extra" if i == 0 else f"corpus-extra-{i + 1}")
            step(f"extra corpus {i + 1}: {cfg.sentences} sentences after {cfg.skip_sentences}")
            build_corpus(extra, cfg, progress=progress)
        manifests.append(extra / "train_gpa.jsonl")
    codec_dir = out / "codec"
    codec_dir.mkdir(exist_ok=True)
    if not _done(codec_dir / "pretrained"):
        step("pretrained parts")
        pretrained_codec(recipe.codec).save(codec_dir / "pretrained", int8=False)
        _mark(codec_dir / "pretrained")
    parts = [codec_dir / f"features-{i}" for i in range(recipe.workers)]
    if not all(p.with_suffix(".npz").is_file() for p in parts):
        utts = codec_utterances(corpus, recipe.codec_utterances_per_voice, recipe.seed, None)
        step(f"features of {len(utts)} utterances")
        jobs = [(str(codec_dir / "pretrained"), utts[i :: recipe.workers], str(p)) for i, p in enumerate(parts)]
        with mp.get_context("spawn").Pool(recipe.workers) as pool:
            pool.map(_extract_part, jobs)
    feats = None
    if not _done(codec_dir / "kmeans"):
        step("k-means")
        feats = Features(parts)
        codec = NanoCodec.from_dir(codec_dir / "pretrained")
        used = set_kmeans(codec, feats)
        codec.save(codec_dir / "kmeans", int8=False)
        _mark(codec_dir / "kmeans", used)
    if not _done(codec_dir / "speaker"):
        step(f"codec training: speaker ({recipe.speaker_minutes:.0f} min)")
        feats = feats or Features(parts)
        codec = NanoCodec.from_dir(codec_dir / "kmeans")
        res = train_decoder(codec, feats, DecoderTraining(minutes=recipe.speaker_minutes, threads=recipe.workers,
                                                          seed=recipe.seed), progress=progress)
        codec.save(codec_dir / "speaker", int8=False)
        _mark(codec_dir / "speaker", res)
    if not _done(codec_dir / "final"):
        train_final_decoder(corpus, codec_dir, recipe, step, progress)
    seed_dir = out / "seed"
    if not seed_dir.is_dir():
        step("tokenizer and seed checkpoint")
        texts = [r["text"] for r in read_jsonl(corpus / SPLIT_FILES["train"])]
        c = recipe.codec
        tok = build_tokenizer(texts, recipe.text_vocab, c.asr_codebook_size, c.global_codebook_size,
                              c.semantic_codebook_size)
        codec_copy = codec_dir / "speaker" / "nano-codec"
        if not codec_copy.is_dir():
            shutil.copytree(codec_dir / "speaker", codec_copy, ignore=shutil.ignore_patterns(".done", "nano-codec"))
        seed_checkpoint(seed_dir, [codec_copy], tok, recipe.model, seed=recipe.seed)
    data = out / "data"
    if not (data / "index.jsonl").is_file():
        step("prepare")
        prepare(PrepareConfig(checkpoint=str(seed_dir), manifests=tuple(map(str, manifests)), out_dir=str(data),
                              workers=recipe.workers), progress=progress)
    run = out / "run"
    step("LLM training")
    from gpa.train.loop import train

    train(TrainConfig(data=str(data), out_dir=str(run), model=recipe.model, seed=recipe.seed,
                      **recipe.train), progress=progress)
    bundle = out / "gpa-nano"
    step("bundle")
    make_bundle(run, seed_dir, codec_dir / "final", bundle, voices=pick_voices(corpus, out / "voices"))
    step("done")
    return bundle


def make_bundle(run: Path, seed_dir: Path, codec: Path, bundle: Path, voices: Path | None = None) -> Path:
    """The shipped checkpoint: the run's LLM in float16, ``codec`` with int8 matrices, the seed's tokenizer
    and ``voices`` (a built-in voice folder, see :mod:`gpa.voices`) if given."""
    tmp = bundle.with_name(bundle.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    export(run, tmp, source=seed_dir, dtype="float16")
    shutil.rmtree(tmp / "nano-codec")
    NanoCodec.from_dir(codec).save(tmp / "nano-codec", int8=True)
    if voices is not None:
        shutil.copytree(voices, tmp / "voices")
    (tmp / INFERENCE_FILE).write_text(json.dumps(INFERENCE) + "\n")
    if bundle.exists():
        shutil.rmtree(bundle)
    tmp.rename(bundle)
    return bundle

