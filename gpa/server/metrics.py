"""Prometheus metrics in the text exposition format, kept by hand (no client library needed)."""

from __future__ import annotations

import threading
import time
from collections import defaultdict, deque
from collections.abc import Callable

BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
RATE_WINDOW_S = 10.0  # tokens/s is averaged over this many seconds


class Metrics:
    """Request counts and latencies per route, generated tokens per task, and the engine's load."""

    def __init__(self, load: Callable[[], dict[str, int]]) -> None:
        self._load = load
        self._lock = threading.Lock()
        self._requests: dict[tuple[str, str, int], int] = defaultdict(int)
        self._latency: dict[str, list[float]] = {}  # route -> bucket counts, then sum, then count
        self._tokens: dict[str, int] = defaultdict(int)
        self._recent: deque[tuple[float, int]] = deque()
        self.in_progress = 0

    def observe_request(self, method: str, route: str, status: int, seconds: float) -> None:
        with self._lock:
            self._requests[(method, route, status)] += 1
            hist = self._latency.setdefault(route, [0.0] * (len(BUCKETS) + 2))
            for i, bound in enumerate(BUCKETS):
                if seconds <= bound:
                    hist[i] += 1
            hist[-2] += seconds
            hist[-1] += 1

    def observe_tokens(self, task: str, n: int) -> None:
        now = time.monotonic()
        with self._lock:
            self._tokens[task] += n
            self._recent.append((now, n))
            while self._recent and self._recent[0][0] < now - RATE_WINDOW_S:
                self._recent.popleft()

    def tokens_per_second(self) -> float:
        now = time.monotonic()
        with self._lock:
            return sum(n for t, n in self._recent if t >= now - RATE_WINDOW_S) / RATE_WINDOW_S

    def render(self) -> str:
        """The exposition text for ``GET /metrics``."""
        load = self._load()
        out: list[str] = []

        def family(name: str, kind: str, help_: str) -> None:
            out.extend([f"# HELP {name} {help_}", f"# TYPE {name} {kind}"])

        with self._lock:
            family("gpa_requests_total", "counter", "HTTP requests by method, route and status")
            for (method, route, status), n in sorted(self._requests.items()):
                out.append(f'gpa_requests_total{{method="{method}",route="{route}",status="{status}"}} {n}')
            family("gpa_request_duration_seconds", "histogram", "time from request to the last response byte")
            for route, hist in sorted(self._latency.items()):
                for bound, n in zip(BUCKETS, hist, strict=False):
                    out.append(f'gpa_request_duration_seconds_bucket{{route="{route}",le="{bound}"}} {n:g}')
                out.append(f'gpa_request_duration_seconds_bucket{{route="{route}",le="+Inf"}} {hist[-1]:g}')
                out.append(f'gpa_request_duration_seconds_sum{{route="{route}"}} {hist[-2]:.6f}')
                out.append(f'gpa_request_duration_seconds_count{{route="{route}"}} {hist[-1]:g}')
            family("gpa_generated_tokens_total", "counter", "tokens generated: asr (text) or audio (TTS and VC)")
            for task, n in sorted(self._tokens.items()):
                out.append(f'gpa_generated_tokens_total{{task="{task}"}} {n}')
            family("gpa_requests_in_progress", "gauge", "HTTP requests being handled")
            out.append(f"gpa_requests_in_progress {self.in_progress}")
        family("gpa_generation_tokens_per_second", "gauge", f"tokens generated per second over {RATE_WINDOW_S:g} s")
        out.append(f"gpa_generation_tokens_per_second {self.tokens_per_second():.3f}")
        family("gpa_engine_queue_depth", "gauge", "requests waiting for a decode slot")
        out.append(f"gpa_engine_queue_depth {load['waiting']}")
        family("gpa_engine_active_slots", "gauge", "decode slots in use")
        out.append(f"gpa_engine_active_slots {load['running']}")
        family("gpa_engine_slots", "gauge", "decode slots in all")
        out.append(f"gpa_engine_slots {load['slots']}")
        return "\n".join(out) + "\n"
