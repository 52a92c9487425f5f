"""Vocoder benchmark: BiCodec decoding speed (offline and streaming) and the accuracy of the faster modes.

Prints one JSON object. Speed is measured at the official BiCodec shapes with PyTorch's default
random init (the decoder's cost depends only on shapes); every case runs once per round, rounds
interleave the cases, and the medians and their ratios are reported, so that load from other
processes hits all cases alike. Real-time factor = decoding seconds / audio seconds.

Accuracy (random weights, so only indicative of trained ones): bfloat16 decoding against float32
on the golden fixture codes (gpa-mini codec, also against the reference waveforms) and at the
official shapes; the approximate streaming modes (``lookahead`` below the decoder's: "commit" and
"preview", see gpa.engine.streaming) against the offline decode, at both sizes, with their decoding
cost. SNR is against the reference signal without its DC offset.

    python bench/vocoder.py [--seconds 4] [--rounds 3] [--threads N] [--fixtures DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from gpa import native
from gpa.codecs.bicodec import BiCodec, BiCodecConfig
from gpa.engine.streaming import AudioStreamer, StreamConfig, receptive_field

REPO = Path(__file__).resolve().parents[1]


def random_codes(codec: BiCodec, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    semantic = torch.randint(0, codec.semantic_codebook_size, (1, n), generator=g)
    return semantic, torch.randint(0, codec.global_codebook_size, (1, codec.num_global_tokens), generator=g)


def stream(codec: BiCodec, semantic: torch.Tensor, glob: torch.Tensor, config: StreamConfig,
           field: int | None = None) -> np.ndarray:
    """Push the codes one at a time, as the engine does after each decode step."""
    s = AudioStreamer(codec, glob[0], config, field)
    chunks = [c for code in semantic[0].tolist() for c in s.push([code])] + s.finish()
    return np.concatenate(chunks)


def snr_db(y: np.ndarray | torch.Tensor, ref: np.ndarray | torch.Tensor) -> float:
    y, ref = np.asarray(y, np.float64), np.asarray(ref, np.float64)
    sig = ref - ref.mean()
    return round(float(10 * np.log10((sig**2).sum() / max(((y - ref) ** 2).sum(), 1e-300))), 2)


def errors(y: np.ndarray | torch.Tensor, ref: np.ndarray | torch.Tensor) -> dict[str, float]:
    y, ref = np.asarray(y, np.float64).ravel(), np.asarray(ref, np.float64).ravel()
    return {"snr_db": snr_db(y, ref), "max_abs": float(np.abs(y - ref).max())}


def timed_rounds(cases: dict[str, Callable[[], object]], rounds: int) -> dict[str, float]:
    """Median seconds per case over ``rounds`` interleaved rounds (after one warm-up round)."""
    times: dict[str, list[float]] = {name: [] for name in cases}
    for r in range(rounds + 1):
        for name, fn in cases.items():
            t = time.perf_counter()
            fn()
            if r:
                times[name].append(time.perf_counter() - t)
    return {name: statistics.median(ts) for name, ts in times.items()}


def speed(seconds: float, rounds: int, chunkings: list[tuple[int, int]]) -> dict:
    torch.manual_seed(0)
    fp32 = BiCodec(BiCodecConfig()).eval()
    torch.manual_seed(0)
    bf16 = BiCodec(BiCodecConfig()).eval().set_decode_dtype(torch.bfloat16)
    n = int(seconds * fp32.frame_rate)
    semantic, glob = random_codes(fp32, n, 0)
    field = receptive_field(fp32)  # what the re-decode method used as its context
    cases: dict[str, Callable[[], object]] = {
        "offline_fp32": lambda: fp32.decode(semantic, glob),
        "offline_bf16": lambda: bf16.decode(semantic, glob),
    }
    for first, chunk in chunkings:
        redecode = StreamConfig(first_chunk=first, chunk=chunk, left=field, lookahead=field)
        incremental = StreamConfig(first_chunk=first, chunk=chunk)
        cases[f"stream_redecode_{first}_{chunk}"] = lambda c=redecode: stream(fp32, semantic, glob, c, field)
        cases[f"stream_incremental_{first}_{chunk}"] = lambda c=incremental: stream(fp32, semantic, glob, c)
        cases[f"stream_incremental_bf16_{first}_{chunk}"] = lambda c=incremental: stream(bf16, semantic, glob, c)
    med = timed_rounds(cases, rounds)
    audio_s = n / fp32.frame_rate
    out = {"audio_seconds": audio_s, "measured_field_frames": field,
           "rtf": {name: round(t / audio_s, 3) for name, t in med.items()}}
    ratios = {"offline_bf16_speedup": med["offline_fp32"] / med["offline_bf16"]}
    for first, chunk in chunkings:
        key = f"{first}_{chunk}"
        ratios[f"incremental_vs_redecode_{key}"] = med[f"stream_redecode_{key}"] / med[f"stream_incremental_{key}"]
        ratios[f"incremental_vs_offline_{key}"] = med["offline_fp32"] / med[f"stream_incremental_{key}"]
        ratios[f"incremental_bf16_vs_redecode_{key}"] = (med[f"stream_redecode_{key}"]
                                                         / med[f"stream_incremental_bf16_{key}"])
    out["speedups"] = {k: round(v, 2) for k, v in ratios.items()}
    out["bf16_vs_fp32_official_random"] = errors(bf16.decode(semantic, glob), fp32.decode(semantic, glob))
    return out


def golden_bf16(fixtures: Path) -> dict:
    """bf16 vs fp32 decoding of the golden codes with the gpa-mini codec, and both vs the reference."""
    codec = BiCodec.from_dir(fixtures / "gpa-mini" / "BiCodec", with_wav2vec2=False)
    golden = load_file(str(fixtures / "golden" / "expected.safetensors"))
    names = json.loads((fixtures / "golden" / "expected.json").read_text())["files"]
    fp32 = {n: codec.decode(golden[f"{n}.semantic"][None], golden[f"{n}.global"][None])[0] for n in names}
    codec.set_decode_dtype(torch.bfloat16)
    out = {}
    for n in names:
        bf = codec.decode(golden[f"{n}.semantic"][None], golden[f"{n}.global"][None])[0]
        out[n] = {"bf16_vs_fp32": errors(bf, fp32[n]), "bf16_vs_reference": errors(bf, golden[f"{n}.recon"]),
                  "fp32_vs_reference": errors(fp32[n], golden[f"{n}.recon"])}
    return out


def approximate(codec: BiCodec, n: int, lookaheads: list[int], config: StreamConfig) -> dict:
    """Error of streams emitted with less than the decoder's lookahead, codes pushed one at a time, in each
    approximate mode that can give the lookahead ("commit" needs at least the decoder's min_lookahead), with
    the stream's decoding seconds per second of audio beside the exact stream's."""
    semantic, glob = random_codes(codec, n, 1)
    offline = codec.decode(semantic, glob)[0].numpy()
    dec = codec.incremental_decoder(glob)
    audio_s = n / codec.frame_rate
    t = time.perf_counter()
    stream(codec, semantic, glob, StreamConfig(first_chunk=config.first_chunk, chunk=config.chunk))
    out = {"exact_lookahead_frames": dec.lookahead, "min_commit_lookahead_frames": dec.min_lookahead, "frames": n,
           "exact_rtf": round((time.perf_counter() - t) / audio_s, 3)}
    for la in lookaheads:
        for mode in ("commit", "preview"):
            if mode == "commit" and not dec.min_lookahead <= la < dec.lookahead:
                continue
            t = time.perf_counter()
            y = stream(codec, semantic, glob, StreamConfig(first_chunk=config.first_chunk, chunk=config.chunk,
                                                           lookahead=la, approximate=mode))
            out[f"{mode}_{la}"] = {**errors(y, offline), "rtf": round((time.perf_counter() - t) / audio_s, 3)}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=4.0, help="audio per speed case")
    p.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds (medians reported)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--fixtures", type=Path, default=Path(os.environ.get("GPA_FIXTURES", REPO.parent / "shared"
                                                                          / "fixtures")), help="fixture dir")
    p.add_argument("--lookaheads", default="0,2,4,8,12,16,20,26,32",
                   help="approximate-mode lookaheads to measure")
    p.add_argument("--skip", default="", help="comma list of parts to skip: speed,golden,approx")
    p.add_argument("--native", action="store_true",
                   help="load gpa's C++ kernels first: bf16 decoding then takes their fused Snake (gpa.native.snake)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.native and native.load() is None:
        raise SystemExit(f"gpa's kernels cannot be loaded here: {native.unavailable_reason()}")
    skip = set(filter(None, args.skip.split(",")))
    lookaheads = [int(x) for x in args.lookaheads.split(",")]
    result: dict = {"threads": torch.get_num_threads(), "cpus": os.cpu_count(),
                    "native_kernels": native.loaded() is not None, "load_before": os.getloadavg()}
    with torch.inference_mode():
        if "speed" not in skip:
            result["official_shape"] = speed(args.seconds, args.rounds, [(10, 100), (5, 10)])
        if "golden" not in skip:
            result["golden_bf16_mini"] = golden_bf16(args.fixtures)
        if "approx" not in skip:
            mini = BiCodec.from_dir(args.fixtures / "gpa-mini" / "BiCodec", with_wav2vec2=False)
            torch.manual_seed(0)
            official = BiCodec(BiCodecConfig()).eval()
            result["approximate_mini_random"] = approximate(mini, 200, lookaheads, StreamConfig())
            result["approximate_official_random"] = approximate(official, 120, lookaheads, StreamConfig())
    result["load_after"] = os.getloadavg()
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
