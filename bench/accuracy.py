"""Accuracy cost of the LLM's faster modes: next-token logits against float32 weights and a float32 KV cache.

Each mode (weight quantization x decoding path x KV cache storage x prefill products) prefills the same prompt
and then takes the same tokens teacher-forced for ``--steps`` decode steps, so every mode is scored on identical
inputs: the relative L2 error of its logits against the float32 reference's, per position and over all, and the
share of positions where its most likely token is the reference's. Works on any checkpoint: the official shapes with
random weights (``make_official_shaped.py``; random Gaussian weights are int4's worst case) or trained ones
(the bundled GPA-nano, the default). Prints one JSON object.

    .venv/bin/python bench/accuracy.py [--model DIR] [--prompt 300] [--steps 16]
"""

from __future__ import annotations

import argparse
import json
import logging

import torch

from gpa.checkpoint import Checkpoint, load_lm, resolve_model
from gpa.config import SamplingParams
from gpa.generation import GenerationRequest, SlotDecoder

# name -> (weight quantization, gpa.native's decode kernels, KV cache storage, int8 prefill products)
MODES = {
    "int8": ("int8", False, "auto", False),
    "int4": ("int4", False, "auto", False),
    "int8_native": ("int8", True, "auto", False),
    "int8_native_kv_int8": ("int8", True, "int8", False),
    "int8_native_kv_int8_prefill_int8": ("int8", True, "int8", True),
    "int4_native": ("int4", True, "auto", False),
    "int4_native_kv_int8": ("int4", True, "int8", False),
    "int4_native_kv_int8_prefill_int8": ("int4", True, "int8", True),
}


def logits_along(lm: torch.nn.Module, prompt: list[int], forced: list[int]) -> torch.Tensor:
    """(1 + len(forced), V) float32: the logits after the prompt, then after each forced token."""
    decoder = SlotDecoder(lm, 1, len(prompt) + len(forced) + 2, restrict_head=False)
    params = SamplingParams(temperature=0, max_new_tokens=len(forced) + 1)
    state, first = decoder.prefill_logits(GenerationRequest(prompt, params))
    rows = [first]
    for token in forced:
        state.output.append(token)
        rows.append(decoder.step_logits([state]))
    return torch.cat(rows).float()


def score(got: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    per_position = ((got - ref).norm(dim=-1) / ref.norm(dim=-1)).tolist()
    return {"rel_err": round(float((got - ref).norm() / ref.norm()), 5),
            "rel_err_prefill": round(per_position[0], 5), "rel_err_steps_max": round(max(per_position[1:]), 5),
            "top1_agreement": round(float((got.argmax(-1) == ref.argmax(-1)).float().mean()), 3)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default=None, help="checkpoint directory (default: the bundled GPA-nano)")
    p.add_argument("--modes", default=",".join(MODES), help="comma-separated: " + ", ".join(MODES))
    p.add_argument("--prompt", type=int, default=300, help="prompt tokens (random ids, seeded)")
    p.add_argument("--steps", type=int, default=16, help="teacher-forced decode steps after the prompt")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="activations of the quantized modes (the reference is float32 either way)")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    ckpt = Checkpoint.open(resolve_model(args.model))
    torch.manual_seed(0)
    ref_lm = load_lm(ckpt, dtype=torch.float32, quantize="none")
    vocab = ref_lm.config.vocab_size
    ids = torch.randint(0, vocab, (args.prompt + args.steps,), generator=torch.Generator().manual_seed(0)).tolist()
    prompt, forced = ids[: args.prompt], ids[args.prompt :]
    with torch.inference_mode():
        ref = logits_along(ref_lm, prompt, forced)
    del ref_lm
    out: dict[str, object] = {"model": str(ckpt.root), "prompt_tokens": args.prompt, "steps": args.steps,
                              "dtype": args.dtype, "modes": {}}
    dtype = getattr(torch, args.dtype)
    for name in args.modes.split(","):
        quantize, native, kv, int8_prefill = MODES[name]
        lm = load_lm(ckpt, dtype=dtype, quantize=quantize, int8_prefill=int8_prefill)
        lm.native_decode, lm.kv_cache_dtype = native, kv
        with torch.inference_mode():
            got = logits_along(lm, prompt, forced)
        out["modes"][name] = score(got, ref)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
