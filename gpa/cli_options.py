"""The speed and precision flags every model-loading command shares (``gpa asr|tts|vc|serve|eval``)."""

from __future__ import annotations

import argparse
from typing import Any

from gpa.config import KV_CACHE_DTYPES, QUANT_MODES, TOKENIZER_DTYPES

SPEED_DEFAULT = "default: the checkpoint's inference.json for the device, else "
SPEED_FLAGS = ("quantize", "vocoder_dtype", "tokenizer_dtype", "native_decode", "kv_cache_dtype", "int8_prefill")


def add_speed_flags(p: argparse.ArgumentParser) -> None:
    """--quantize, --vocoder-dtype, --tokenizer-dtype, --native-decode, --kv-cache-dtype and --int8-prefill, whose
    defaults come from the checkpoint (GPA-nano: int8, a bfloat16 decoder and the native kernels on CPU)."""
    p.add_argument("--quantize", default=None, choices=list(QUANT_MODES),
                   help=f"LLM weight quantization ({SPEED_DEFAULT}none)")
    p.add_argument("--vocoder-dtype", default=None, choices=["float32", "bfloat16"],
                   help=f"precision of the codec's decoder ({SPEED_DEFAULT}float32; bfloat16 ~1.7x faster on CPU)")
    p.add_argument("--tokenizer-dtype", default=None, choices=list(TOKENIZER_DTYPES),
                   help=f"precision of the audio tokenizers ({SPEED_DEFAULT}float32; bfloat16 ~2x faster on CPU, "
                        "a few codes differ; int8: bfloat16 with int8 linear layers, ~1.3x bfloat16's speed, needs "
                        "the native kernels)")
    p.add_argument("--native-decode", default=None, action=argparse.BooleanOptionalAction,
                   help=f"decode steps through gpa's C++ CPU kernels, compiled once (~30 s; needs a C++ compiler "
                        f"and ninja) ({SPEED_DEFAULT}off)")
    p.add_argument("--kv-cache-dtype", default=None, choices=list(KV_CACHE_DTYPES),
                   help=f"KV cache storage; int8 halves what a decode step reads from it against bfloat16 "
                        f"({SPEED_DEFAULT}auto: the model's dtype, int8 under --native-decode with quantized weights)")
    p.add_argument("--int8-prefill", default=None, action=argparse.BooleanOptionalAction,
                   help=f"with --quantize int8/int4: prompts' linear layers multiply in int8, activations quantized "
                        f"per token (~1.6x faster long prefills with VNNI; with int4 also more accurate: int8 "
                        f"weights; needs the native kernels) ({SPEED_DEFAULT}off)")


def speed_options(args: argparse.Namespace) -> dict[str, Any]:
    """The parsed speed flags as keyword arguments of :func:`gpa.api.load`."""
    return {name: getattr(args, name) for name in SPEED_FLAGS}
