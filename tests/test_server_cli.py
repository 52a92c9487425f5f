"""``gpa serve``: the command starts a real server, answers HTTP and stops cleanly on SIGINT."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_gpa_serve_runs_and_stops(mini_dir, tmp_path):
    port = free_port()
    cmd = [sys.executable, "-m", "gpa", "serve", "--model", str(mini_dir), "--device", "cpu", "--host", "127.0.0.1",
           "--port", str(port), "--voices-dir", str(tmp_path / "voices"), "--api-key", "k", "--max-slots", "2",
           "--log-level", "WARNING"]
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
