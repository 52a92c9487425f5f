"""GPA-nano streaming benchmark: offline decode vs windowed re-decoding vs the exact incremental decoder.

Prints one JSON object. The codec has the bundled GPA-nano's sizes (its ``nano-codec/config.json``, read
without its weights) with PyTorch's random init: the decode cost depends only on shapes. Codes are pushed
``--push`` at a time; every case runs once per round, rounds interleave the cases (after a warm-up
round) and the medians are reported as real-time factors (decode seconds per audio second) and as
ratios to the offline decode, so that load from other processes hits all cases alike. Each stream's
largest deviation from the offline decode is reported too, beside the offline waveform's std
(PyTorch's init makes a nearly constant waveform).

    python bench/nano_stream.py [--seconds 10] [--push 10] [--rounds 3] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import replace

import torch

from gpa.checkpoint import BUNDLED_MODEL
from gpa.codecs.nano import NanoCodec, NanoCodecConfig, WindowedDecoder


def stream(decoder: object, semantic: torch.Tensor, push: int) -> torch.Tensor:
    """(1, T) codes pushed ``push`` at a time, then finish -> (1, T * hop) samples."""
    out = [decoder.push(semantic[:, i : i + push]) for i in range(0, semantic.shape[1], push)]
    return torch.cat([*out, decoder.finish()], dim=1)


def timed_rounds(cases: dict[str, Callable[[], torch.Tensor]], rounds: int) -> tuple[dict[str, float], dict]:
    """Median seconds per case over ``rounds`` interleaved rounds after a warm-up; each case's last output."""
    times: dict[str, list[float]] = {name: [] for name in cases}
    last: dict[str, torch.Tensor] = {}
    for r in range(rounds + 1):
        for name, fn in cases.items():
            t = time.perf_counter()
            last[name] = fn()
            if r:
                times[name].append(time.perf_counter() - t)
    return {name: statistics.median(ts) for name, ts in times.items()}, last


def run(seconds: float, push: int, rounds: int) -> dict:
    torch.manual_seed(0)
    config = NanoCodecConfig.from_dict(json.loads((BUNDLED_MODEL / "nano-codec" / "config.json").read_text()))
    codec = NanoCodec(replace(config, context=0)).eval().requires_grad_(False)
    n = round(seconds * codec.frame_rate)
    g = torch.Generator().manual_seed(0)
    semantic = torch.randint(0, codec.semantic_codebook_size, (1, n), generator=g)
    glob = torch.randint(0, codec.global_codebook_size, (1, codec.num_global_tokens), generator=g)
    incremental = codec.incremental_decoder(glob)
    cases: dict[str, Callable[[], torch.Tensor]] = {
        "offline": lambda: codec.decode(semantic, glob),
        "windowed": lambda: stream(WindowedDecoder(codec, glob), semantic, push),
        "incremental": lambda: stream(codec.incremental_decoder(glob), semantic, push),
    }
    med, last = timed_rounds(cases, rounds)
    audio_s = n * codec.hop_length / codec.sample_rate
    return {
        "codes": n, "audio_seconds": round(audio_s, 3), "push_codes": push,
        "context_codes": codec.context, "incremental_lookahead_codes": incremental.lookahead,
        "incremental_lag_samples": incremental.lag,
        "rtf": {name: round(t / audio_s, 4) for name, t in med.items()},
        "time_vs_offline": {name: round(t / med["offline"], 3) for name, t in med.items()},
        "offline_std": float(last["offline"].std()),  # random weights: judge the deviations against this
        "max_abs_vs_offline": {name: float((y - last["offline"]).abs().max()) for name, y in last.items()},
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=10.0, help="audio decoded per case")
    p.add_argument("--push", type=int, default=10, help="codes per push in the streaming cases")
    p.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds (medians reported)")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    result: dict = {"threads": torch.get_num_threads(), "cpus": os.cpu_count(), "load_before": os.getloadavg()}
    result.update(run(args.seconds, args.push, args.rounds))  # decode and push run in inference mode
    result["load_after"] = os.getloadavg()
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
