"""GPA-nano TTS speed on this machine: the bundle's CPU settings (int8 LLM, bfloat16 decoder) beside exact
float32 (and, with ``--modes exact,fast,int4,native``, an int4 LLM; gpa's C++ decode kernels on and off), on
the same sentences, seeds and voice.

Prints one JSON object: per mode the real-time factor (wall seconds over audio seconds) of the whole
``GPA.tts`` call and of its two parts (LLM generation, codec decoding), LLM tokens per second, and the
fast mode's speed-up as a ratio. Modes alternate sentence by sentence after one warm-up call each, so that
load from other processes hits both alike. The voice is a built-in one (its codes are computed once), as
in ``gpa tts``; ``--reference`` times a reference clip given as a file instead (encoded on every call).

    python bench/nano_tts.py [--model DIR] [--threads 2] [--sentences 6] [--reference FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

import gpa
from gpa.config import Task

SENTENCES = [  # held-out-bucket sentences of the corpus (never trained on)
    "That's Thorpe's, said the young engineer.",
    "Don't worry so loud, your roommate can't think.",
    "Give a decision for the plaintiff.",
    "The quick brown fox jumped over the sleeping dog near the river bank.",
    "She said that the weather would be fine for the whole of next week.",
    "Nobody knew where the old captain had hidden the golden key.",
    "A good book is the best of friends, the same today and forever.",
    "He turned the corner and saw the lights of the little town below.",
]
# fast: the bundle's int8 / bf16 settings on torch's decode path; native: the same through gpa's C++ kernels (the
# bundle's default since its inference.json asks for them); int4: fast with an int4 LLM.
MODES = {"exact": dict(quantize="none", vocoder_dtype="float32", native_decode=False),
         "fast": dict(quantize=None, vocoder_dtype=None, native_decode=False),
         "int4": dict(quantize="int4", vocoder_dtype=None, native_decode=False),
         "native": dict(quantize=None, vocoder_dtype=None, native_decode=True)}


def one(model: gpa.GPA, text: str, reference: str, seed: int) -> dict[str, float]:
    """Time one TTS call split into generation and decoding (the same work ``GPA.tts`` does)."""
    params = model.sampling(Task.TTS, seed=seed)
    start = time.perf_counter()
    voice = model._as_voice(reference, None)
    ids = model._generate(Task.TTS, model.tts_prompts([text], voice), params)[0]
    mid = time.perf_counter()
    wav, sr = model._decode(ids, voice.global_codes)
    end = time.perf_counter()
    return {"llm_s": mid - start, "decode_s": end - mid, "audio_s": len(wav) / sr, "tokens": len(ids)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="checkpoint directory (default: the bundled GPA-nano)")
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.add_argument("--sentences", type=int, default=6, help=f"sentences per mode (at most {len(SENTENCES)})")
    p.add_argument("--reference", default=None, help="a reference audio file (default: the default built-in voice)")
    p.add_argument("--modes", default="exact,fast", help="comma-separated, from " + ", ".join(MODES) +
                   " (exact and fast are always run)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    names = ["exact", "fast"] + [m for m in args.modes.split(",") if m not in ("exact", "fast")]
    models = {name: gpa.load(args.model, device="cpu", **MODES[name]) for name in names}
    reference = args.reference or models["fast"].default_voice()
    for m in models.values():
        one(m, SENTENCES[0], reference, 0)  # warm-up
    sums = {name: {"llm_s": 0.0, "decode_s": 0.0, "audio_s": 0.0, "tokens": 0} for name in models}
    for i, text in enumerate(SENTENCES[: args.sentences]):
        for name, m in models.items():
            for k, v in one(m, text, reference, i).items():
                sums[name][k] += v
    out: dict[str, object] = {"threads": args.threads, "cpu_count": os.cpu_count(), "reference": reference,
                              "sentences": args.sentences}
    for name, s in sums.items():
        m = models[name]
        out[name] = {"quantize": m.lm.weight_quant, "vocoder_dtype": str(m.bicodec.decode_dtype).removeprefix("torch."),
                     "rtf": round((s["llm_s"] + s["decode_s"]) / s["audio_s"], 3),
                     "llm_rtf": round(s["llm_s"] / s["audio_s"], 3),
                     "decode_rtf": round(s["decode_s"] / s["audio_s"], 3),
                     "llm_tokens_per_s": round(s["tokens"] / s["llm_s"], 1), "audio_s": round(s["audio_s"], 2)}
    for name in names[1:]:
        out[f"{name}_speedup"] = round(out["exact"]["rtf"] / out[name]["rtf"], 2)  # type: ignore[index]
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
