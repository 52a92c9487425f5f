"""``gpa bench``: engine speed on a checkpoint, beside a plain transformers ``generate`` baseline.

Prints one JSON object. TTS runs at several concurrencies through the streaming engine (time to
first audio, real-time factor, aggregate times real time, LLM tokens/s); ASR runs the whole
pipeline (both tokenizers, prefill, decode). The baseline is what the authors' offline path does:
Hugging Face ``generate`` in float32, one request, then one BiCodec decode. Decode speed is also
set against the bound that the machine's measured memory bandwidth puts on it.
"""

from __future__ import annotations

import asyncio
import logging
import resource
import threading
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gpa import native
from gpa.api import GPA, LLM_DTYPES, Voice
from gpa.config import Task
from gpa.engine import AudioChunk, Engine, EngineConfig, EngineRequest, StreamConfig, TextDelta
from gpa.engine.backend import VLLMOptions
from gpa.threads import release_thread_pool

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class BenchConfig:
    """What to measure."""

    model: Path  # checkpoint directory (e.g. a random-weight one with the official shapes)
    concurrency: tuple[int, ...] = (1, 4, 8, 16)
    tts_tokens: int = 250  # semantic tokens per TTS request (5 s of audio)
    asr_seconds: float = 10.0  # length of the ASR input
    quantize: str | None = None  # "none", "int8" / "int4": weight-only quantized LLM (None: the checkpoint's choice)
    dtype: str | None = None  # LLM dtype: float32, bfloat16, or None (the loader's: bf16 with int8, else float32)
    lookahead: int | None = None  # codes awaited after a chunk; None: exact, below the decoder's lookahead: approximate
    approximate: str = "commit"  # how a lookahead below the decoder's is made up (StreamConfig.approximate)
    prefix_cache: int = 0  # voices whose prompt block keeps its keys and values (EngineConfig.prefix_cache)
    first_chunk: int = 5  # frames in the first audio chunk
    chunk: int = 10  # the largest chunk (chunks double from first_chunk up to it)
    vocoder_dtype: str | None = None  # BiCodec decoding dtype: None (the checkpoint's choice), float32 or bfloat16
    inline_vocoder: bool | None = None  # EngineConfig.inline_vocoder: audio on the decode loop's thread (None: auto)
    tokenizer_dtype: str | None = None  # audio tokenizers (gpa.config.TOKENIZER_DTYPES; None: the checkpoint's choice)
    native_decode: bool | None = None  # decode steps through gpa's C++ kernels (gpa.native; None: the checkpoint's)
    kv_cache_dtype: str | None = None  # KV cache storage (gpa.config.KV_CACHE_DTYPES); None: the checkpoint's, auto
    int8_prefill: bool | None = None  # prompts' linear layers in int8 (with int8/int4 weights; None: the checkpoint's)
    baseline_tokens: int = 100  # tokens the transformers baseline generates (0: skip it)
    repeat: int = 1  # rounds of every engine measurement (medians reported, the rounds kept under "repeats")
    threads: int | None = None  # torch intra-op threads (default: torch's choice)
    backend: str = "torch"  # what generates the tokens: "torch" (gpa's decode loop) or "vllm"
    vllm: VLLMOptions | None = None  # backend "vllm": how to start it (dtype "auto" takes `dtype` above)


def _speechlike(seconds: float, seed: int = 0) -> np.ndarray:
    """A deterministic voiced, syllable-modulated test signal (the benchmark needs no data files)."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * 16000)) / 16000
    f0 = 120 + 30 * np.sin(2 * np.pi * 0.5 * t)
    voiced = sum(np.sin(2 * np.pi * k * np.cumsum(f0) / 16000) / k for k in range(1, 12))
    envelope = 0.5 * (1 + np.sin(2 * np.pi * 4 * t))
    return (0.1 * voiced * envelope + 0.005 * rng.standard_normal(len(t))).astype(np.float32)


def memory_bandwidth_gbs(megabytes: int = 512) -> float:
    """Copy bandwidth (GB/s of bytes read) measured with a large tensor copy."""
    src = torch.empty(megabytes * 2**20 // 4, dtype=torch.float32).uniform_()
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - start)
    return src.numel() * 4 / best / 1e9


def decode_bytes_per_token(model: GPA, head_rows: int) -> int:
    """Weight bytes one decode step must read: every transformer layer plus the used head rows."""
    layers = sum(b.numel() * b.element_size() for b in model.lm.model.layers.state_dict().values())
    head = model.lm.head_weight()
    per_row = head.shape[1] * (1 if model.lm.weight_quant != "none" else head.element_size())  # int8 head
    return layers + head_rows * per_row


def _voice(model: GPA) -> Voice:
    """The benchmark voice; a random-weight checkpoint may yield NaN speaker codes, so fall back."""
    try:
        return model.voice((_speechlike(3.0, seed=1), 16000))
    except FloatingPointError:
        logger.warning("speaker codes are NaN (random BatchNorm statistics?); using fixed codes")
        return Voice(torch.arange(model.bicodec.num_global_tokens) * 97 % model.bicodec.global_codebook_size)


async def _tts_one(engine: Engine, request: EngineRequest) -> dict[str, float]:
    start = time.perf_counter()
    first = None
    samples = 0
    async for ev in await engine.submit(request):
        if isinstance(ev, AudioChunk):
            first = first or time.perf_counter() - start
            samples += len(ev.samples)
    return {"ttfa_s": first or float("nan"), "wall_s": time.perf_counter() - start,
            "audio_s": samples / engine.model.sample_rate}


async def _tts_round(engine: Engine, model: GPA, voice: Voice, n: int, tokens: int) -> dict[str, float]:
    params = model.sampling(Task.TTS, max_new_tokens=tokens, seed=0)
    prompts = model.tts_prompts([f"Benchmark sentence number {i}, spoken at full length." for i in range(n)], voice)
    release_thread_pool()  # this (client) thread's OpenMP pool would slow the decode loop (gpa.threads)
    start = time.perf_counter()
    runs = await asyncio.gather(*(_tts_one(engine, EngineRequest(Task.TTS, p.prompt_ids, params, voice.global_codes))
                                  for p in prompts))
    wall = time.perf_counter() - start
    audio = sum(r["audio_s"] for r in runs)
    return {"concurrency": n, "wall_s": wall, "audio_s": audio, "xrealtime": audio / wall,
            "rtf_mean": float(np.mean([r["wall_s"] / r["audio_s"] for r in runs])),
            "ttfa_ms_p50": 1000 * float(np.median([r["ttfa_s"] for r in runs])),
            "ttfa_ms_max": 1000 * float(max(r["ttfa_s"] for r in runs)),
            "llm_tokens_per_s": audio * model.bicodec.frame_rate / wall}


async def _asr_round(engine: Engine, model: GPA, seconds: float) -> dict[str, float]:
    audio = (_speechlike(seconds, seed=2), 16000)
    start = time.perf_counter()
    first = None
    async for ev in await engine.asr(audio, max_new_tokens=int(4 * seconds)):
        if isinstance(ev, TextDelta):
            first = first or time.perf_counter() - start
    wall = time.perf_counter() - start
    return {"seconds": seconds, "wall_s": wall, "rtf": wall / seconds,
            "ttft_ms": 1000 * (first if first is not None else float("nan"))}


def transformers_baseline(model_dir: Path, model: GPA, voice: Voice, tokens: int) -> dict[str, Any]:
    """The authors' offline TTS path: HF ``generate`` (float32, one request), then one BiCodec decode."""
    try:
        from transformers import AutoModelForCausalLM
    except ImportError as e:
        return {"skipped": f"transformers is not installed ({e})"}
    hf = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    prompt = model.tts_prompts(["Benchmark sentence number 0, spoken at full length."], voice)[0]
    ids = torch.tensor([prompt.prompt_ids])
    with torch.inference_mode():
        hf.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False)  # warm-up
        start = time.perf_counter()
        out = hf.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=True, temperature=0.2,
                          repetition_penalty=1.2, pad_token_id=model.vocab.pad)
        llm = time.perf_counter() - start
    codes = (out[0, ids.shape[1]:] % model.bicodec.semantic_codebook_size)[None]  # unconstrained: fold into range
    start = time.perf_counter()
    model.bicodec.decode(codes, voice.global_codes[None])
    vocoder = time.perf_counter() - start
    audio = tokens / model.bicodec.frame_rate
    return {"tokens": tokens, "llm_s": llm, "vocoder_s": vocoder, "llm_tokens_per_s": tokens / llm,
            "rtf": (llm + vocoder) / audio}


def _median_round(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One figure per key from ``repeat`` rounds of the same measurement: the median of each (the rounds are
    kept under ``repeats``); a single round as it is."""
    if len(runs) == 1:
        return runs[0]
    out: dict[str, Any] = {k: float(np.median([r[k] for r in runs])) for k in runs[0] if k != "concurrency"}
    if "concurrency" in runs[0]:
        out = {"concurrency": runs[0]["concurrency"], **out}
    return {**out, "repeats": runs}


async def _stream_fidelity(engine: Engine, model: GPA, voice: Voice, tokens: int) -> dict[str, Any]:
    """The streamed audio of one TTS request against the offline decode of the same codes (the request run
    again unstreamed: same seed, same tokens), as the streamed samples' SNR and largest error."""
    params = model.sampling(Task.TTS, max_new_tokens=tokens, seed=0)
    prompt = model.tts_prompts(["Benchmark sentence number 0, spoken at full length."], voice)[0].prompt_ids
    audio = {}
    for stream in (True, False):
        request = EngineRequest(Task.TTS, prompt, params, voice.global_codes, stream=stream)
        chunks = [ev.samples async for ev in await engine.submit(request) if isinstance(ev, AudioChunk)]
        audio[stream] = np.concatenate(chunks).astype(np.float64)
    streamed, offline = audio[True], audio[False]
    if len(streamed) != len(offline):
        return {"samples_streamed": len(streamed), "samples_offline": len(offline)}  # other tokens: not comparable
    err = streamed - offline
    centred = offline - offline.mean()  # the signal without its DC offset (random weights give mostly DC)
    signal, noise = float(np.sum(centred**2)), float(np.sum(err**2))
    return {"snr_db": 10 * np.log10(signal / noise) if noise and signal else None,  # None: identical, or no signal
            "identical": not noise, "max_abs_err": float(np.abs(err).max()),
            "signal_std": float(np.sqrt(np.mean(centred**2)))}


async def _engine_rounds(engine: Engine, model: GPA, cfg: BenchConfig,
                         voice: Voice) -> tuple[list[dict], dict, dict]:
    """TTS at each concurrency, then ASR; with ``cfg.repeat`` > 1 the whole sequence again, so that each
    measurement's repeats are spread over the run (this machine's speed drifts), and medians reported."""
    await _tts_round(engine, model, voice, 1, 20)  # warm-up
    levels: dict[int, list[dict]] = {n: [] for n in cfg.concurrency}
    asr = []
    for _ in range(cfg.repeat):
        for n, runs in levels.items():
            runs.append(await _tts_round(engine, model, voice, n, cfg.tts_tokens))
            logger.info("TTS concurrency %d: %s", n, runs[-1])
        asr.append(await _asr_round(engine, model, cfg.asr_seconds))
    fidelity = await _stream_fidelity(engine, model, voice, cfg.tts_tokens)
    return [_median_round(runs) for runs in levels.values()], _median_round(asr), fidelity


def _vllm_options(cfg: BenchConfig, model: GPA) -> VLLMOptions | None:
    """The vLLM options as run: dtype "auto" becomes the dtype the torch backend's model was loaded in."""
    if cfg.vllm is not None and cfg.vllm.dtype == "auto" and cfg.vllm.url is None:
        return replace(cfg.vllm, dtype=str(model.lm.head_weight().dtype).removeprefix("torch."))
    return cfg.vllm


def _run_engine(model: GPA, cfg: BenchConfig, voice: Voice) -> tuple[list[dict], dict, dict]:
    """The rounds, with the decode loop on this (main) thread and the clients on an asyncio thread."""
    stream = StreamConfig(first_chunk=cfg.first_chunk, chunk=cfg.chunk, lookahead=cfg.lookahead,
                          approximate=cfg.approximate)
    seq = 512 + cfg.tts_tokens + int(70 * cfg.asr_seconds)
    engine = Engine(model, EngineConfig(max_slots=max(cfg.concurrency), max_seq_len=seq, stream=stream,
                                        prefix_cache=cfg.prefix_cache,
                                        inline_vocoder=cfg.inline_vocoder,
                                        backend=cfg.backend,
                                        vllm=_vllm_options(cfg, model)))
    result: dict[str, Any] = {}

    async def clients() -> None:
        try:
            result["rounds"] = await _engine_rounds(engine, model, cfg, voice)
        except BaseException as e:  # noqa: BLE001 - re-raised on the main thread
            result["error"] = e
        finally:
            engine.shutdown()

    worker = threading.Thread(target=lambda: asyncio.run(clients()), name="gpa-bench-clients")
    engine.run_here(on_ready=worker.start)
    worker.join()
    if "error" in result:
        raise result["error"]
    return result["rounds"]


def run(cfg: BenchConfig) -> dict[str, Any]:
    """Run every measurement; returns the JSON-ready report."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    dtype = None if cfg.dtype is None else LLM_DTYPES[cfg.dtype]
    model = GPA.from_dir(cfg.model, device="cpu", dtype=dtype, quantize=cfg.quantize, vocoder_dtype=cfg.vocoder_dtype,
                         tokenizer_dtype=cfg.tokenizer_dtype, native_decode=cfg.native_decode,
                         kv_cache_dtype=cfg.kv_cache_dtype, int8_prefill=cfg.int8_prefill)
    voice = _voice(model)
    tts, asr, fidelity = _run_engine(model, cfg, voice)
    by_c = {r["concurrency"]: r for r in tts}
    bandwidth = memory_bandwidth_gbs()
    bound = bandwidth * 1e9 / decode_bytes_per_token(model, model.bicodec.semantic_codebook_size + 1)
    baseline = transformers_baseline(cfg.model, model, voice, cfg.baseline_tokens) if cfg.baseline_tokens else {}
    c1 = by_c.get(1, {})  # the c=1 figures are None when concurrency 1 was not run
    vllm = _vllm_options(cfg, model)
    report = {
        "tts_rtf_c1": c1.get("rtf_mean"),
        "tts_ttfa_ms_c1": c1.get("ttfa_ms_p50"),
        "tts_xrealtime_c8": by_c[8]["xrealtime"] if 8 in by_c else None,
        "asr_rtf": asr["rtf"],
        "tts_speedup_vs_transformers": baseline["rtf"] / c1["rtf_mean"] if "rtf" in baseline and c1 else None,
        # streamed vs offline audio of one request (exact streams: float rounding, or identical)
        "tts_stream_snr_db": fidelity.get("snr_db"),
        "decode_tokens_per_s_c1": c1.get("llm_tokens_per_s"),
        "decode_bound_tokens_per_s": bound,
        "memory_bandwidth_gbs": bandwidth,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "peak_rss_children_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,  # largest vLLM process
        "backend": cfg.backend,
        "native_kernels_used": native.loaded() is not None,  # native_decode asked for them; False: not buildable
        "settings": model.speed_settings(),  # as loaded (the config's None take the checkpoint's choices)
        "inline_vocoder_used": EngineConfig(inline_vocoder=cfg.inline_vocoder).resolved_inline_vocoder(),
        "stream": {"lookahead": cfg.lookahead, "approximate": cfg.approximate, **fidelity},
        "tts": tts,
        "asr": asr,
        "transformers_baseline": baseline,
        "config": {**asdict(cfg), "model": str(cfg.model), "threads_used": torch.get_num_threads(),
                   "vllm": None if vllm is None else {**asdict(vllm), "model": str(vllm.model), "api_key": None,
                                                      "args": dict(vllm.args)}},
    }
    return report
