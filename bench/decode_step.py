"""Decode-step speed of the LLM on the CPU: ms per step at several batch sizes, fp32 / bf16 / int8 / int4.

Runs :class:`gpa.generation.SlotDecoder` on a checkpoint with the official shapes (random weights are
fine: speed does not depend on values), each row a TTS-like request (output head over 8193 ids) at
``--prompt`` tokens of context. Optimisations that can be switched at run time are A/B-tested interleaved in
the same process (fused projections on/off; with --native, gpa's C++ kernels; decode loop on the main thread
vs a worker thread), and the weight-streaming bound is computed from the measured memory read bandwidth.
Prints one JSON object. Timings on a shared machine are noisy: medians of interleaved rounds are reported with
the load average, and per-step CPU time of the calling thread (``cpu_ms``) beside wall time.

    .venv/bin/python bench/decode_step.py --model ~/.cache/gpa/tests/official-shaped
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import statistics
import threading
import time
from pathlib import Path

import torch

from gpa import native as gpa_native
from gpa.checkpoint import Checkpoint, load_lm
from gpa.config import SamplingParams
from gpa.generation import GenerationRequest, SlotDecoder

MODES = {"fp32": (torch.float32, "none"), "bf16": (torch.bfloat16, "none"), "int8": (torch.bfloat16, "int8"),
         "int4": (torch.bfloat16, "int4"), "int8-fp32": (torch.float32, "int8"), "int4-fp32": (torch.float32, "int4")}
HEAD_ROWS = 8193  # BiCodec's semantic codebook + the end token: a TTS step's output head


def read_bandwidth_gbs(megabytes: int = 512) -> float:
    """Best-of-5 read bandwidth (GB/s) of summing a large, already touched float32 tensor."""
    x = torch.ones(megabytes * 2**20 // 4, dtype=torch.float32)
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - start)
    return x.numel() * 4 / best / 1e9


def step_bytes(lm: torch.nn.Module) -> int:
    """Weight bytes one decode step reads: every layer plus the TTS head rows."""
    layers = sum(t.numel() * t.element_size() for t in lm.model.layers.state_dict().values())
    per_row = lm.config.hidden_size * (1 if lm.weight_quant != "none" else lm.head_weight().element_size())
    return layers + HEAD_ROWS * per_row


def _decoder(lm: torch.nn.Module, batch: int, prompt: int, steps: int) -> tuple[SlotDecoder, list]:
    vocab = lm.config.vocab_size
    allowed = torch.zeros(vocab, dtype=torch.bool)
    allowed[vocab - HEAD_ROWS :] = True
    decoder = SlotDecoder(lm, batch, prompt + steps + 8)
    params = SamplingParams(temperature=0.8, top_k=50, top_p=0.95, repetition_penalty=1.2, max_new_tokens=steps + 4)
    ids = torch.randint(0, vocab, (prompt,), generator=torch.Generator().manual_seed(0)).tolist()
    states = [decoder.prefill(GenerationRequest(ids, params.replace(seed=b), allowed=allowed)) for b in range(batch)]
    return decoder, states


def _time_steps(decoder: SlotDecoder, states: list, steps: int) -> tuple[list[float], list[float]]:
    wall, cpu = [], []
    for _ in range(steps):
        w, c = time.perf_counter(), time.thread_time()
        decoder.step(states)
        wall.append(time.perf_counter() - w)
        cpu.append(time.thread_time() - c)
    return wall, cpu


def _on_worker(fn):  # noqa: ANN001, ANN202
    out = {}
    thread = threading.Thread(target=lambda: out.update(result=fn()))
    thread.start()
    thread.join()
    return out["result"]


def measure(lm: torch.nn.Module, batch: int, args: argparse.Namespace) -> dict:
    """Interleaved rounds of each variant over one decoder; medians in ms per step."""
    switchable = hasattr(lm, "unfuse")  # False on code from before fused projections existed
    variants = {"fused": (True, False), "unfused": (False, False)} if switchable else {"as_is": (True, False)}
    if args.worker_thread:
        variants["fused_worker_thread" if switchable else "as_is_worker_thread"] = (True, True)
    if args.native:
        variants["native"] = (True, False)
        if args.kv_bf16:
            variants["native_kv_bf16"] = (True, False)
    samples: dict[str, tuple[list[float], list[float]]] = {k: ([], []) for k in variants}
    for _ in range(args.rounds):
        decoder, states = _decoder(lm, batch, args.prompt, args.steps * len(variants) + 2)
        decoder.step(states)  # warm-up
        own = {}  # the native variants' own decoders: gpa's C++ kernels, with an int8 (or bf16) cache
        if args.native:
            lm.native_decode = True
            for name, kv in (("native", "auto"), ("native_kv_bf16", "bfloat16")):
                if name in variants:
                    lm.kv_cache_dtype = kv
                    own[name] = _decoder(lm, batch, args.prompt, args.steps + 2)
                    own[name][0].step(own[name][1])
            lm.native_decode, lm.kv_cache_dtype = False, "auto"
            if own["native"][0].ops is None:
                raise SystemExit(f"--native: the kernels are unavailable ({gpa_native.unavailable_reason()})")
        for name, (fused, worker) in variants.items():
            if switchable:
                lm.fuse() if fused else lm.unfuse()
            run = functools.partial(_time_steps, *own.get(name, (decoder, states)), args.steps)
            wall, cpu = _on_worker(run) if worker else run()
            samples[name][0].extend(wall)
            samples[name][1].extend(cpu)
    out = {}
    for name, (wall, cpu) in samples.items():
        out[name] = {"ms": round(statistics.median(wall) * 1e3, 2), "ms_min": round(min(wall) * 1e3, 2),
                     "cpu_ms": round(statistics.median(cpu) * 1e3, 2)}
    main = out["fused" if switchable else "as_is"]
    if switchable:
        out["fused_speedup"] = round(out["unfused"]["ms"] / main["ms"], 3)
        lm.fuse()
    if args.native:
        out["native_speedup"] = round(main["ms"] / out["native"]["ms"], 3)
    if "native_kv_bf16" in out:
        out["kv_int8_speedup_vs_bf16"] = round(out["native_kv_bf16"]["ms"] / out["native"]["ms"], 3)
    out["tokens_per_s"] = round(batch * 1e3 / main["ms"], 1)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    default = os.environ.get("GPA_OFFICIAL_DIR", str(Path.home() / ".cache/gpa/tests/official-shaped"))
    p.add_argument("--model", default=default, help="checkpoint directory with the official shapes")
    p.add_argument("--modes", default="fp32,bf16,int8",
                   help="comma-separated: " + ", ".join(MODES) + " (int8/int4: bf16 activations unless -fp32)")
    p.add_argument("--batches", default="1,4,8", help="comma-separated batch sizes")
    p.add_argument("--prompt", type=int, default=200, help="context tokens per row before timing")
    p.add_argument("--steps", type=int, default=10, help="timed steps per variant per round")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--worker-thread", action="store_true", help="also time the loop on a worker thread")
    p.add_argument("--native", action="store_true", help="also time gpa's C++ decode kernels (gpa.native)")
    p.add_argument("--kv-bf16", action="store_true",
                   help="with --native: also time them over a bfloat16 KV cache (int8 under quantized weights)")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    bandwidth = read_bandwidth_gbs()
    result: dict = {"threads": torch.get_num_threads(), "read_bandwidth_gbs": round(bandwidth, 1),
                    "prompt_tokens": args.prompt, "load_average_start": os.getloadavg()[0], "modes": {}}
    for mode in args.modes.split(","):
        dtype, quant = MODES[mode]
        lm = load_lm(Checkpoint.open(args.model), dtype=dtype, quantize=quant)
        entry = {"bound_ms_batch1": round(step_bytes(lm) / bandwidth / 1e6, 2)}
        for batch in (int(b) for b in args.batches.split(",")):
            entry[f"batch{batch}"] = measure(lm, batch, args)
        result["modes"][mode] = entry
        del lm
    result["load_average_end"] = os.getloadavg()[0]
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
