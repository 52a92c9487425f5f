"""``gpa serve``: the command starts a real server, answers HTTP and stops cleanly on SIGINT."""

from __future__ import annotations

import base64
import io
import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import numpy as np
import soundfile as sf


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_gpa_serve_runs_and_stops(mini_dir, tmp_path):
    port = free_port()
    cmd = [sys.executable, "-m", "gpa", "serve", "--model", str(mini_dir), "--device", "cpu", "--host", "127.0.0.1",
           "--port", str(port), "--voices-dir", str(tmp_path / "voices"), "--api-key", "k", "--max-slots", "2",
           "--log-level", "WARNING", "--quantize", "int4", "--tokenizer-dtype", "bfloat16", "--inline-vocoder",
           "--native-decode", "--lookahead", "12", "--prefix-cache", "4"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "GPA_MODEL": ""})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "gpa serve did not come up"
            time.sleep(0.2)
        models = httpx.get(f"{url}/v1/models", headers={"Authorization": "Bearer k"}).json()
        assert [m["id"] for m in models["data"]] == ["gpa-mini"]  # the checkpoint directory's name
        assert httpx.get(f"{url}/v1/models").status_code == 401
        assert httpx.get(f"{url}/health").json()["slots"] == 2
        # the speed flags reach the model and the engine: a request runs through them
        speech = (0.1 * np.sin(np.arange(16000) / 7.0)).astype(np.float32)
        buf = io.BytesIO()
        sf.write(buf, speech, 16000, format="WAV")
        r = httpx.post(f"{url}/v1/audio/transcriptions", headers={"Authorization": "Bearer k"}, timeout=120,
                       files={"file": ("a.wav", buf.getvalue())}, data={"max_new_tokens": "4", "seed": "0"})
        assert r.status_code == 200 and isinstance(r.json()["text"], str), r.text
        # and the streaming flags: a TTS request streams through an approximate lookahead and the prefix cache
        for _ in range(2):  # the second in the same voice reuses its prompt block
            r = httpx.post(f"{url}/v1/audio/speech", headers={"Authorization": "Bearer k"}, timeout=120,
                           json={"input": "Hi.", "ref_audio": base64.b64encode(buf.getvalue()).decode(),
                                 "response_format": "pcm", "max_new_tokens": 40, "seed": 0})
            assert r.status_code == 200 and len(r.content) > 0, r.text
    finally:
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    assert (tmp_path / "voices").is_dir()


def test_gpa_serve_without_model_is_a_usage_error(capsys, monkeypatch):
    from gpa.cli import main

    monkeypatch.delenv("GPA_MODEL", raising=False)
    assert main(["serve", "--port", "1"]) == 2
    assert "no model given" in capsys.readouterr().err


def test_gpa_serve_refuses_a_lookahead_the_codec_cannot_give(mini_dir, capsys):
    from gpa.cli import main

    assert main(["serve", "--model", str(mini_dir), "--device", "cpu", "--lookahead", "3"]) == 2
    err = capsys.readouterr().err
    assert "--lookahead: lookahead 3 is below what approximate='commit' allows" in err and "10 to 37" in err
