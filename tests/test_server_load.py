"""A bounded load test on loopback: 32 concurrent clients mixing TTS, ASR and VC for a fixed number of requests.

Every request must be answered correctly or rejected with 429/503 (never an error or a hang), the
server must be idle and healthy afterwards, and its memory must stay flat after warm-up.
"""

from __future__ import annotations

import io
import json
import resource
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import soundfile as sf

import gpa
from gpa.engine import EngineConfig
from gpa.server import ServerSettings, create_app
from gpa.server.runner import BackgroundServer

CLIENTS = 32
WARMUP = 2  # rounds of one request per client before memory is measured
ROUNDS = 4  # measured rounds
TIMEOUT_S = 120  # per request; the whole test is bounded by CLIENTS * (WARMUP + ROUNDS) requests
RSS_SLACK_MB = 64  # allocator arenas still settle after warm-up (seen: +50 MB over 12 rounds, then flat)


def rss_mb() -> float:
    """Resident memory of this process (server and clients) in MB."""
    return int(Path("/proc/self/statm").read_text().split()[1]) * resource.getpagesize() / 2**20


def one_request(url: str, i: int, clips: dict[str, bytes]) -> tuple[str, int, float, str]:
    """Request number ``i`` (the task cycles with i); returns (task, status, seconds, problem or '')."""
    task = ("tts", "asr", "vc", "tts-stream")[i % 4]
    start = time.perf_counter()
    with httpx.Client(base_url=url, timeout=TIMEOUT_S) as http:
        if task.startswith("tts"):
            body = {"input": f"Request {i}.", "voice": "alice", "response_format": "pcm" if task == "tts-stream"
                    else "wav", "seed": i, "max_new_tokens": 40, "stream": task == "tts-stream"}
            r = http.post("/v1/audio/speech", json=body)
        elif task == "asr":
            r = http.post("/v1/audio/transcriptions", data={"max_new_tokens": "8", "response_format": "json"},
                          files={"file": ("a.wav", clips["asr"])})
        else:
            r = http.post("/v1/audio/conversions", data={"voice": "alice", "seed": str(i), "max_new_tokens": "40"},
                          files={"file": ("s.wav", clips["vc"])})
    seconds = time.perf_counter() - start
    return task, r.status_code, seconds, check(task, r)


def check(task: str, r: httpx.Response) -> str:
    if r.status_code in (429, 503):
        return "" if r.headers.get("retry-after") and r.json()["error"]["code"] else "rejection without Retry-After"
    if r.status_code != 200:
        return f"status {r.status_code}: {r.text[:200]}"
    if task == "asr":
        return "" if isinstance(r.json().get("text"), str) else "no text"
    if task == "tts-stream":
        return "" if len(r.content) > 0 and len(r.content) % 640 == 0 else f"{len(r.content)} pcm bytes"
    audio, sr = sf.read(io.BytesIO(r.content))
    return "" if sr == 16000 and len(audio) == int(r.headers["x-output-tokens"]) * 320 else "audio length"


@pytest.mark.slow
def test_32_concurrent_clients_mixed_tasks(mini_dir, golden_inputs, tmp_path):
    model = gpa.load(mini_dir, device="cpu")
    settings = ServerSettings(model_name="gpa-mini", voices_dir=tmp_path, max_concurrent=24,
                              engine=EngineConfig(max_slots=8, max_queue=8))
    clips = {"asr": golden_inputs["short_16k"].read_bytes(), "vc": golden_inputs["short_16k"].read_bytes()}
    with BackgroundServer(create_app(model, settings)) as srv, ThreadPoolExecutor(CLIENTS) as pool:
        with httpx.Client(base_url=srv.url, timeout=60) as http:
            assert http.post("/v1/audio/voices", data={"name": "alice"}, files={
                "audio_sample": ("a.wav", golden_inputs["speech0_22k"].read_bytes())}).status_code == 201

            def round_(first: int) -> list[tuple[str, int, float, str]]:
                return list(pool.map(lambda i: one_request(srv.url, i, clips), range(first, first + CLIENTS)))

            warm = [r for k in range(WARMUP) for r in round_(k * CLIENTS)]
            before = rss_mb()
            start = time.perf_counter()
            results = [r for k in range(WARMUP, WARMUP + ROUNDS) for r in round_(k * CLIENTS)]
            wall = time.perf_counter() - start
            after = rss_mb()
            health = http.get("/health").json()
            metrics = http.get("/metrics").text

    problems = [r for r in warm + results if r[3]]
    assert not problems, problems[:5]
    ok = [r for r in results if r[1] == 200]
    latencies = np.array([r[2] for r in ok])
    report = {"requests": len(results), "ok": len(ok), "rejected_429": sum(r[1] == 429 for r in results),
              "rejected_503": sum(r[1] == 503 for r in results), "wall_s": round(wall, 1),
              "ok_per_s": round(len(ok) / wall, 2), "p50_s": round(float(np.percentile(latencies, 50)), 2),
              "p95_s": round(float(np.percentile(latencies, 95)), 2), "rss_after_warmup_mb": round(before),
              "rss_growth_mb": round(after - before, 1)}
    print("load:", json.dumps(report))
    assert len(ok) >= len(results) // 2  # most requests are served, the rest rejected cleanly
    assert health["running"] == 0 and health["waiting"] == 0 and health["status"] == "ok"
    assert 'status="500"' not in metrics
    assert after - before < RSS_SLACK_MB, report  # memory flat after warm-up
