"""The GPA-nano codec alone: how intelligible and how like the speaker its resynthesis is, per codec directory.

Each clip of a manifest is encoded to semantic codes and decoded with the global codes of another clip of the
same speaker (the next one in the manifest), as TTS and VC use a reference; the independent judges score the
result (Whisper WER/CER after Whisper's normaliser, Resemblyzer similarity to the original clip) beside the
same judge on the originals. This is the bound the codec sets on TTS and VC: an LLM that predicted the codes
perfectly would score this. Codecs are compared on the same clips and references, decoding interleaved clip by
clip; decoding seconds per second of audio are reported too. Prints one JSON object.

    python bench/nano_codec.py --codec gpa/models/gpa-nano/nano-codec --codec OTHER/nano-codec \\
        --manifest ~/.cache/gpa/corpus/v1/heldout_text.jsonl --limit 24 [--judge-asr base] [--dtype bfloat16]
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import time
from pathlib import Path

import numpy as np
import torch

from gpa.audio import load_audio
from gpa.codecs.nano import NanoCodec
from gpa.evaluation.judges import ASR_MODELS, JudgeConfig, get_judges
from gpa.evaluation.manifest import Item, load_manifest
from gpa.evaluation.metrics import corpus, cosine, errors, mean


def pick(manifest: Path, limit: int, seed: int) -> list[tuple[Item, Item]]:
    """``limit`` (clip, reference) pairs: the reference is the next clip of the same speaker in the manifest."""
    items = [i for i in load_manifest(manifest).items if i.text is not None]
    by: dict[str, list[Item]] = {}
    for i in items:
        by.setdefault(i.speaker, []).append(i)
    usable = [i for i in items if len(by[i.speaker]) > 1]
    out = []
    for i in random.Random(seed).sample(usable, min(limit, len(usable))):
        same = by[i.speaker]
        out.append((i, same[(same.index(i) + 1) % len(same)]))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--codec", action="append", required=True, help="nano-codec directory (repeat to compare)")
    p.add_argument("--manifest", action="append", required=True, help="corpus manifest (jsonl: audio, text, speaker)")
    p.add_argument("--limit", type=int, default=24, help="clips per manifest")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--judge-asr", default="base", choices=ASR_MODELS)
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"], help="decoder + vocoder dtype")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    judges = get_judges(JudgeConfig(asr_model=args.judge_asr, asr_threads=args.threads))
    codecs = {c: NanoCodec.from_dir(c).set_decode_dtype(getattr(torch, args.dtype)) for c in args.codec}
    report: dict = {"settings": vars(args), "manifests": {}}
    for m in args.manifest:
        pairs = pick(Path(m).expanduser(), args.limit, args.seed)
        orig_err, per = [], {c: {"err": [], "sim": [], "decode_s": 0.0, "audio_s": 0.0} for c in codecs}
        for clip, ref in pairs:
            wav, ref_wav = load_audio(clip.audio), load_audio(ref.audio)
            orig_err.append(errors(clip.text, judges.asr.transcribe(wav)))
            orig_emb = judges.speaker.embed(wav)
            for c, codec in codecs.items():
                semantic = codec.encode_semantic([wav])[0][None]
                global_codes = codec.encode_global([ref_wav])
                t0 = time.perf_counter()
                out = codec.decode(semantic, global_codes)[0].float().numpy()
                per[c]["decode_s"] += time.perf_counter() - t0
                out16 = load_audio(out, codec.sample_rate, normalize=False)
                per[c]["audio_s"] += len(out16) / 16000
                per[c]["err"].append(errors(clip.text, judges.asr.transcribe(out16)))
                emb = judges.speaker.embed(out16)
                per[c]["sim"].append(None if emb is None or orig_emb is None else cosine(emb, orig_emb))
        o = corpus(orig_err)
        entry: dict = {"clips": len(pairs), "originals": {"wer": o.wer, "cer": o.cer}, "codecs": {}}
        for c, d in per.items():
            e = corpus(d["err"])
            entry["codecs"][c] = {"wer": e.wer, "cer": e.cer, "similarity_to_original": mean(d["sim"]),
                                  "decode_rtf": d["decode_s"] / max(d["audio_s"], 1e-9)}
        report["manifests"][m] = entry
    print(json.dumps(report, indent=1, default=lambda x: float(x) if isinstance(x, np.floating) else str(x)))


if __name__ == "__main__":
    main()
