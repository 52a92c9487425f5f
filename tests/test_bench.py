"""The benchmark runs end to end and reports every tracked figure (its numbers are not judged here)."""

from __future__ import annotations

import pytest

from gpa.bench import BenchConfig, run


@pytest.mark.slow
def test_bench_report_has_tracked_figures(mini_dir):
    report = run(BenchConfig(mini_dir, concurrency=(1, 8), tts_tokens=12, asr_seconds=1.0, baseline_tokens=4))
    for key in ("tts_rtf_c1", "tts_ttfa_ms_c1", "tts_xrealtime_c8", "asr_rtf", "decode_bound_tokens_per_s"):
        assert report[key] > 0, key
    assert report["tts"][1]["concurrency"] == 8
    baseline = report["transformers_baseline"]
    assert "rtf" in baseline or "skipped" in baseline
