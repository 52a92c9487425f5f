"""Bad input gets a 4xx in OpenAI's error shape naming the problem, and the server stays healthy."""

from __future__ import annotations

import base64
import io

import httpx
import numpy as np
import pytest
import soundfile as sf

import gpa
from gpa.server import ServerSettings, create_app
from gpa.server.runner import BackgroundServer

LIMITS = {"max_upload_bytes": 300_000, "max_text_chars": 200, "max_clip_seconds": 5.0, "max_audio_seconds": 20.0}


@pytest.fixture(scope="module")
def voices_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("voices")


@pytest.fixture(scope="module")
def http(mini_dir, voices_dir, golden_inputs):
    model = gpa.load(mini_dir, device="cpu")
    app = create_app(model, ServerSettings(model_name="gpa-mini", voices_dir=voices_dir, **LIMITS))
    with BackgroundServer(app) as srv, httpx.Client(base_url=srv.url, timeout=60) as client:
        r = client.post("/v1/audio/voices", data={"name": "alice"},
                        files={"audio_sample": ("a.wav", golden_inputs["speech0_22k"].read_bytes())})
        assert r.status_code == 201
        yield client


def wav_bytes(samples: np.ndarray) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, samples, 16000, format="WAV")
    return buf.getvalue()


def flac_bytes(samples: np.ndarray) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, samples, 16000, format="FLAC")
    return buf.getvalue()


PART = b'--b\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\nContent-Type: audio/wav\r\n\r\n'


@pytest.fixture(scope="module")
def clips(golden_inputs):
    return {"speech": golden_inputs["speech1_8k"].read_bytes(), "long": golden_inputs["long_16k"].read_bytes(),
            "silent": wav_bytes(np.zeros(16000, np.float32)), "garbage": b"this is not audio" * 10,
            "minute": flac_bytes(0.1 * np.sin(np.arange(16000 * 25) / 9).astype(np.float32))}


SPEECH = "/v1/audio/speech"
ASR = "/v1/audio/transcriptions"
VC = "/v1/audio/conversions"
VOICES = "/v1/audio/voices"

# (name, method, path, request kwargs builder, status, words the message must contain, param)
CASES = [
    ("speech: missing input", "POST", SPEECH, lambda c: {"json": {"voice": "alice"}}, 400, ["input", "required"],
     "input"),
    ("speech: blank input", "POST", SPEECH, lambda c: {"json": {"input": "  ", "voice": "alice"}}, 400,
     ["input is empty"], "input"),
    ("speech: input is a number", "POST", SPEECH, lambda c: {"json": {"input": 3, "voice": "alice"}}, 400,
     ["input", "string"], "input"),
    ("speech: temperature is text", "POST", SPEECH,
     lambda c: {"json": {"input": "Hi", "voice": "alice", "temperature": "hot"}}, 400, ["temperature"],
     "temperature"),
    ("speech: negative seed", "POST", SPEECH, lambda c: {"json": {"input": "Hi", "voice": "alice", "seed": -1}},
     400, ["seed"], "seed"),
    ("speech: unknown field", "POST", SPEECH, lambda c: {"json": {"input": "Hi", "voice": "alice", "pitch": 2}},
     400, ["pitch", "not permitted"], "pitch"),
    ("speech: bad JSON", "POST", SPEECH,
     lambda c: {"content": b'{"input": ', "headers": {"content-type": "application/json"}}, 400, ["JSON"], None),
    ("speech: form instead of JSON", "POST", SPEECH, lambda c: {"data": {"input": "Hi"}}, 415,
     ["application/json"], None),
    ("speech: text too long", "POST", SPEECH, lambda c: {"json": {"input": "word " * 50, "voice": "alice"}}, 400,
     ["250 characters", "limit is 200"], "input"),
    ("speech: unknown voice", "POST", SPEECH, lambda c: {"json": {"input": "Hi", "voice": "nova"}}, 400,
     ["unknown voice 'nova'", "alice"], "voice"),
    ("speech: no voice", "POST", SPEECH, lambda c: {"json": {"input": "Hi"}}, 400, ["no voice", "ref_audio"],
     "voice"),
    ("speech: path-like voice", "POST", SPEECH, lambda c: {"json": {"input": "Hi", "voice": "../alice"}}, 400,
     ["invalid voice name", "no paths"], "voice"),
    ("speech: absolute-path voice", "POST", SPEECH, lambda c: {"json": {"input": "Hi", "voice": {"id": "/etc/x"}}},
     400, ["invalid voice name"], "voice"),
    ("speech: unknown model", "POST", SPEECH, lambda c: {"json": {"input": "Hi", "voice": "alice", "model": "tts-1"}},
     404, ["model 'tts-1' does not exist", "gpa-mini"], "model"),
    ("speech: aac", "POST", SPEECH, lambda c: {"json": {"input": "Hi", "voice": "alice", "response_format": "aac"}},
     400, ["aac", "wav"], "response_format"),
    ("speech: unknown format", "POST", SPEECH,
     lambda c: {"json": {"input": "Hi", "voice": "alice", "response_format": "ogg"}}, 400, ["response_format"],
     "response_format"),
    ("speech: streaming mp3", "POST", SPEECH,
     lambda c: {"json": {"input": "Hi", "voice": "alice", "response_format": "mp3", "stream_format": "sse"}}, 400,
     ["streaming", "pcm"], "response_format"),
    ("speech: speed", "POST", SPEECH, lambda c: {"json": {"input": "Hi", "voice": "alice", "speed": 1.5}}, 400,
     ["speed 1.5"], "speed"),
    ("speech: instructions", "POST", SPEECH,
     lambda c: {"json": {"input": "Hi", "voice": "alice", "instructions": "whisper"}}, 400, ["instructions"],
     "instructions"),
    ("speech: ref_text without ref_audio", "POST", SPEECH,
     lambda c: {"json": {"input": "Hi", "voice": "alice", "ref_text": "hello"}}, 400, ["ref_text needs ref_audio"],
     "ref_text"),
    ("speech: ref_audio not base64", "POST", SPEECH, lambda c: {"json": {"input": "Hi", "ref_audio": "%%%"}}, 400,
     ["base64"], "ref_audio"),
    ("speech: ref_audio URL", "POST", SPEECH,
     lambda c: {"json": {"input": "Hi", "ref_audio": "http://example.invalid/a.wav"}}, 400, ["URLs are not fetched"],
     "ref_audio"),
    ("speech: ref_audio not audio", "POST", SPEECH,
     lambda c: {"json": {"input": "Hi", "ref_audio": base64.b64encode(c["garbage"]).decode()}}, 415,
     ["cannot decode"], "ref_audio"),
    ("speech: ref_audio too long", "POST", SPEECH,
     lambda c: {"json": {"input": "Hi", "ref_audio": base64.b64encode(c["long"]).decode()}}, 413,
     ["6.9 s", "limit of 5 s"], "ref_audio"),
    ("speech: max_new_tokens beyond the context", "POST", SPEECH,
     lambda c: {"json": {"input": "Hi", "voice": "alice", "max_new_tokens": 100000}}, 400, ["limit is"], None),
    ("asr: missing file", "POST", ASR, lambda c: {"data": {"model": "gpa-mini"}, "files": {"x": ("x", b"1")}}, 400,
     ["file", "required"], "file"),
    ("asr: file is a string", "POST", ASR, lambda c: {"data": {"file": "speech.wav"}, "files": {"x": ("x", b"1")}},
     400, ["file"], "file"),
    ("asr: undecodable", "POST", ASR, lambda c: {"files": {"file": ("a.wav", c["garbage"])}}, 415,
     ["cannot decode"], "file"),
    ("asr: silent", "POST", ASR, lambda c: {"files": {"file": ("a.wav", c["silent"])}}, 422, ["silent"], "file"),
    ("asr: empty", "POST", ASR, lambda c: {"files": {"file": ("a.wav", b"")}}, 422, ["empty"], "file"),
    ("asr: too long", "POST", ASR, lambda c: {"files": {"file": ("a.wav", c["minute"])}}, 413,
     ["25.0 s", "limit of 20 s"], "file"),
    ("asr: oversized upload", "POST", ASR, lambda c: {"files": {"file": ("a.wav", b"\0" * 400_000)}}, 413,
     ["limit of 300000 bytes"], None),
    ("asr: oversized chunked upload", "POST", ASR,
     lambda c: {"content": iter([PART] + [b"x" * 100_000] * 4),
                "headers": {"content-type": "multipart/form-data; boundary=b"}},
     413, ["limit of 300000 bytes"], None),
    ("asr: JSON instead of a form", "POST", ASR, lambda c: {"json": {"file": "x"}}, 415, ["multipart/form-data"],
     None),
    ("asr: temperature is text", "POST", ASR,
     lambda c: {"data": {"temperature": "warm"}, "files": {"file": ("a.wav", c["speech"])}}, 400, ["temperature"],
     "temperature"),
    ("asr: unknown format", "POST", ASR,
     lambda c: {"data": {"response_format": "docx"}, "files": {"file": ("a.wav", c["speech"])}}, 400,
     ["response_format"], "response_format"),
    ("asr: word timestamps", "POST", ASR,
     lambda c: {"data": {"timestamp_granularities[]": "word"}, "files": {"file": ("a.wav", c["speech"])}}, 400,
     ["word timestamps"], "timestamp_granularities"),
    ("asr: unknown model", "POST", ASR,
     lambda c: {"data": {"model": "whisper-1"}, "files": {"file": ("a.wav", c["speech"])}}, 404, ["whisper-1"],
     "model"),
    ("vc: no voice", "POST", VC, lambda c: {"files": {"file": ("a.wav", c["speech"])}}, 400, ["no voice"], "voice"),
    ("vc: unknown voice", "POST", VC, lambda c: {"data": {"voice": "bob"}, "files": {"file": ("a.wav", c["speech"])}},
     400, ["unknown voice 'bob'"], "voice"),
    ("vc: source too long", "POST", VC, lambda c: {"data": {"voice": "alice"}, "files": {"file": ("a.wav", c["long"])}},
     413, ["limit of 5 s"], "file"),
    ("vc: undecodable reference", "POST", VC,
     lambda c: {"files": {"file": ("a.wav", c["speech"]), "ref_audio": ("r.wav", c["garbage"])}}, 415,
     ["cannot decode"], "ref_audio"),
    ("voices: missing name", "POST", VOICES, lambda c: {"files": {"audio_sample": ("a.wav", c["speech"])}}, 400,
     ["name", "required"], "name"),
    ("voices: missing sample", "POST", VOICES, lambda c: {"data": {"name": "x"}, "files": {"x": ("x", b"1")}}, 400,
     ["audio_sample", "required"], "audio_sample"),
    ("voices: path-like name", "POST", VOICES,
     lambda c: {"data": {"name": "../../escape"}, "files": {"audio_sample": ("a.wav", c["speech"])}}, 400,
     ["invalid voice name"], "name"),
    ("voices: name with a slash", "POST", VOICES,
     lambda c: {"data": {"name": "a/b"}, "files": {"audio_sample": ("a.wav", c["speech"])}}, 400,
     ["invalid voice name"], "name"),
    ("voices: taken name", "POST", VOICES,
     lambda c: {"data": {"name": "alice"}, "files": {"audio_sample": ("a.wav", c["speech"])}}, 409,
     ["already exists"], "name"),
    ("voices: delete unknown", "DELETE", f"{VOICES}/nobody", lambda c: {}, 404, ["nobody"], "voice_id"),
    ("voices: delete path-like", "DELETE", f"{VOICES}/..%2F..%2Fetc", lambda c: {}, 400, ["invalid voice name"],
     "voice_id"),
    ("voices: get dot-dot", "GET", f"{VOICES}/%2E%2E", lambda c: {}, 400, ["invalid voice name"], "voice_id"),
    ("models: unknown", "GET", "/v1/models/tts-1", lambda c: {}, 404, ["tts-1"], "model"),
    ("no such route", "GET", "/v1/audio/nothing", lambda c: {}, 404, ["Not Found"], None),
    ("wrong method", "GET", SPEECH, lambda c: {}, 405, ["Method Not Allowed"], None),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_a_clear_4xx(http, clips, case, caplog):
    _, method, path, kwargs, status, words, param = case
    r = http.request(method, path, **kwargs(clips))
    assert r.status_code == status, r.text
    # handled, not a crash: uvicorn would log it and drop the connection (the client's next request reset)
    assert not [rec for rec in caplog.records if "Exception in ASGI application" in rec.getMessage()]
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    for word in words:
        assert word in error["message"], (word, error)
    assert error["param"] == param


def test_server_still_healthy_with_no_500s_and_no_stray_files(http, voices_dir, golden_inputs):
    assert http.get("/health").json()["status"] == "ok"
    r = http.post(SPEECH, json={"input": "Still fine.", "voice": "alice", "response_format": "wav",
                                "max_new_tokens": 20})
    assert r.status_code == 200
    metrics = http.get("/metrics").text
    assert 'status="500"' not in metrics
    assert sorted(p.name for p in voices_dir.iterdir()) == ["alice.json", "alice.safetensors"]
    assert not (voices_dir.parent / "escape.json").exists()
