"""The benchmark runs end to end and reports every tracked figure (its numbers are not judged here)."""

from __future__ import annotations

import pytest

from gpa import native
from gpa.bench import BenchConfig, run


@pytest.mark.slow
def test_bench_report_has_tracked_figures(mini_dir):
    report = run(BenchConfig(mini_dir, concurrency=(1, 8), tts_tokens=12, asr_seconds=1.0, baseline_tokens=4))
    for key in ("tts_rtf_c1", "tts_ttfa_ms_c1", "tts_xrealtime_c8", "asr_rtf", "decode_bound_tokens_per_s"):
        assert report[key] > 0, key
    assert report["tts"][1]["concurrency"] == 8
    stream = report["stream"]  # the exact stream: float rounding at most from the offline decode
    assert stream["identical"] or report["tts_stream_snr_db"] > 80, stream
    assert stream["max_abs_err"] < 1e-4
    baseline = report["transformers_baseline"]
    assert "rtf" in baseline or "skipped" in baseline


def test_bench_cli_passes_the_speed_settings(mini_dir, capsys):
    """`gpa bench` with every speed flag: they reach the run (its config echoes them) and it completes."""
    import json

    from gpa.cli import main

    assert main(["bench", "--model", str(mini_dir), "--concurrency", "1,2", "--tts-tokens", "12", "--asr-seconds",
                 "1", "--baseline-tokens", "0", "--quantize", "int4", "--tokenizer-dtype", "bfloat16",
                 "--inline-vocoder", "--native-decode", "--lookahead", "2", "--approximate", "preview", "--chunk", "4",
                 "--first-chunk", "2"]) == 0
    report = json.loads(capsys.readouterr().out)
    config = report["config"]
    assert (config["quantize"], config["tokenizer_dtype"], config["inline_vocoder"]) == ("int4", "bfloat16", True)
    assert config["native_decode"] is True and report["inline_vocoder_used"] is True
    assert report["native_kernels_used"] is (native.unavailable_reason() is None)
    assert (config["lookahead"], config["chunk"], config["first_chunk"]) == (2, 4, 2)
    assert config["approximate"] == report["stream"]["approximate"] == "preview"
    assert report["tts_rtf_c1"] > 0 and report["asr_rtf"] > 0


def test_bench_without_concurrency_one_reports_no_c1_figures(mini_dir):
    """The c=1 figures belong to concurrency 1: without it they are None, not another concurrency's numbers."""
    report = run(BenchConfig(mini_dir, concurrency=(2,), tts_tokens=8, asr_seconds=1.0, baseline_tokens=0))
    assert [r["concurrency"] for r in report["tts"]] == [2] and report["tts"][0]["rtf_mean"] > 0
    for key in ("tts_rtf_c1", "tts_ttfa_ms_c1", "decode_tokens_per_s_c1", "tts_speedup_vs_transformers",
                "tts_xrealtime_c8"):
        assert report[key] is None, key


def test_bench_repeat_reports_medians_of_interleaved_rounds(mini_dir, capsys):
    """--repeat 3: every concurrency and the ASR round run three times, each figure the median of its rounds (kept
    under "repeats"); nonsense counts are refused."""
    import json

    import numpy as np

    from gpa.cli import main

    assert main(["bench", "--model", str(mini_dir), "--concurrency", "1,2", "--tts-tokens", "8", "--asr-seconds", "1",
                 "--baseline-tokens", "0", "--repeat", "3"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["config"]["repeat"] == 3 and [r["concurrency"] for r in report["tts"]] == [1, 2]
    for level in (*report["tts"], report["asr"]):
        assert len(level["repeats"]) == 3
        for key in ("wall_s", "rtf_mean" if "rtf_mean" in level else "rtf"):
            assert level[key] == np.median([r[key] for r in level["repeats"]])
    assert report["tts_rtf_c1"] == report["tts"][0]["rtf_mean"] and report["asr_rtf"] == report["asr"]["rtf"]
    assert main(["bench", "--model", str(mini_dir), "--repeat", "0"]) == 2
    assert "--repeat and --concurrency take positive integers" in capsys.readouterr().err
