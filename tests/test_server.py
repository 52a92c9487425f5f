"""The HTTP server end to end: a real uvicorn server on a loopback port, the official ``openai`` client and httpx."""

from __future__ import annotations

import base64
import io
import json
import socket
import time

import httpx
import numpy as np
import openai
import pytest
import soundfile as sf

import gpa
from gpa.engine import EngineConfig
from gpa.server import ServerSettings, create_app
from gpa.server.media import split_points
from gpa.server.runner import BackgroundServer
from gpa.text import split_text

MODEL = "gpa-mini"
TTS = {"seed": 1, "max_new_tokens": 100}  # this seed speaks 77 tokens (1.54 s) with the tiny model
ASR = {"max_new_tokens": 12}


@pytest.fixture(scope="module")
def model(mini_dir):
    return gpa.load(mini_dir, device="cpu")


@pytest.fixture(scope="module")
def voices_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("voices")


def settings(voices_dir, **overrides) -> ServerSettings:
    return ServerSettings(model_name=MODEL, voices_dir=voices_dir, **overrides)


@pytest.fixture(scope="module")
def server(model, voices_dir):
    with BackgroundServer(create_app(model, settings(voices_dir, engine=EngineConfig(max_slots=4)))) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def alice(client, golden_inputs):
    """A saved voice, created with the official client."""
    with open(golden_inputs["speech0_22k"], "rb") as f:
        voice = client.audio.voices.create(audio_sample=f, consent="consent-1", name="alice")
    assert (voice.id, voice.name, voice.object, voice.type) == ("alice", "alice", "audio.voice", "audio_sample")
    return voice.id


def pcm_samples(data: bytes) -> np.ndarray:
    return np.frombuffer(data, dtype="<i2")


def wav_samples(data: bytes) -> np.ndarray:
    samples, sr = sf.read(io.BytesIO(data), dtype="int16")
    assert sr == 16000
    return samples


def sse_events(lines) -> list[dict]:
    return [json.loads(line[len("data: "):]) for line in lines if line.startswith("data: ")]


# --- models, health, metrics ---------------------------------------------------------------------------


def test_models_health_and_metrics(client, http):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    health = http.get("/health").json()
    assert health["status"] == "ok" and health["slots"] == 4 and health["model"] == MODEL
    text = http.get("/metrics").text
    for name in ("gpa_requests_total", "gpa_request_duration_seconds_bucket", "gpa_engine_queue_depth",
                 "gpa_engine_active_slots", "gpa_generation_tokens_per_second", "gpa_generated_tokens_total"):
        assert f"# TYPE {name.removesuffix('_bucket')}" in text
    assert 'gpa_requests_total{method="GET",route="/health",status="200"}' in text
    assert "/v1/audio/speech" in http.get("/openapi.json").json()["paths"]


# --- speech ----------------------------------------------------------------------------------------------


def test_speech_every_format(client, alice):
    raw = client.audio.speech.with_raw_response.create(model=MODEL, voice=alice, input="Hello there.",
                                                      response_format="wav", extra_body=TTS)
    tokens = int(raw.headers["x-output-tokens"])
    assert raw.headers["content-type"] == "audio/wav" and tokens > 0
    wav = wav_samples(raw.content)
    assert len(wav) == tokens * 320
    pcm = client.audio.speech.create(model=MODEL, voice={"id": alice}, input="Hello there.", response_format="pcm",
                                     extra_body=TTS)
    assert np.array_equal(pcm_samples(pcm.content), wav)
    flac = client.audio.speech.create(model=MODEL, voice=alice, input="Hello there.", response_format="flac",
                                      extra_body=TTS)
    assert np.array_equal(wav_samples(flac.content), wav)
    for fmt in ("mp3", "opus"):  # lossy: same length within the codec's padding, same sample rate
        data = client.audio.speech.create(model=MODEL, voice=alice, input="Hello there.", response_format=fmt,
                                          extra_body=TTS).content
        decoded, sr = sf.read(io.BytesIO(data))
        assert sr == 16000 and abs(len(decoded) - len(wav)) < 0.1 * 16000, fmt


def test_speech_streams_equal_the_plain_response(client, alice):
    plain = wav_samples(client.audio.speech.create(model=MODEL, voice=alice, input="Hello there.",
                                                   response_format="wav", extra_body=TTS).content)
    with client.audio.speech.with_streaming_response.create(model=MODEL, voice=alice, input="Hello there.",
                                                            response_format="pcm", stream_format="audio",
                                                            extra_body=TTS) as resp:
        assert resp.headers.get("transfer-encoding") == "chunked"
        streamed = pcm_samples(b"".join(resp.iter_bytes()))
    assert len(streamed) == len(plain)
    assert np.abs(streamed.astype(int) - plain).max() <= 1  # float rounding may flip one LSB
    with client.audio.speech.with_streaming_response.create(model=MODEL, voice=alice, input="Hello there.",
                                                            response_format="wav", extra_body={**TTS, "stream": True}
                                                            ) as resp:
        streamed_wav = wav_samples(resp.read())  # a WAV of unknown length (sizes 0xFFFFFFFF) still reads
    assert np.array_equal(streamed_wav, streamed)


def test_speech_sse_events(client, alice):
    with client.audio.speech.with_streaming_response.create(model=MODEL, voice=alice, input="Hello there.",
                                                            response_format="pcm", stream_format="sse",
                                                            extra_body=TTS) as resp:
        assert resp.headers["content-type"].startswith("text/event-stream")
        events = sse_events(resp.iter_lines())
    deltas = [e for e in events if e["type"] == "speech.audio.delta"]
    assert len(deltas) >= 2 and events[-1]["type"] == "speech.audio.done"
    audio = pcm_samples(b"".join(base64.b64decode(e["audio"]) for e in deltas))
    usage = events[-1]["usage"]
    assert len(audio) == usage["output_tokens"] * 320
    assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"]


def test_speech_clones_ref_audio_with_and_without_transcript(http, golden_inputs):
    ref = golden_inputs["speech1_8k"].read_bytes()
    for ref_audio in (base64.b64encode(ref).decode(), "data:audio/wav;base64," + base64.b64encode(ref).decode()):
        r = http.post("/v1/audio/speech", json={"input": "Hi.", "ref_audio": ref_audio, "response_format": "wav",
                                                **TTS})
        assert r.status_code == 200 and len(wav_samples(r.content)) > 0
    r = http.post("/v1/audio/speech", json={"input": "Hi.", "ref_audio": base64.b64encode(ref).decode(),
                                            "ref_text": "These days a chicken leg is a rare dish.", **TTS})
    assert r.status_code == 200 and r.headers["content-type"] == "audio/mpeg"  # OpenAI's default format
    assert int(r.headers["x-input-tokens"]) > 100  # the reference's semantic codes are in the prompt


def test_long_input_is_spoken_sentence_by_sentence(client, alice):
    sentences = ["The first sentence of a long input is here, and it goes on for a while.",
                 "A second sentence follows it, adding yet more words to say aloud.",
                 "The third and last sentence ends the text that is far too long for one piece."]
    options = {"seed": 1, "max_new_tokens": 30}

    def speak(text: str, **extra):
        return client.audio.speech.with_raw_response.create(model=MODEL, voice=alice, input=text,
                                                           response_format="pcm", extra_body={**options, **extra})

    pieces = split_text(" ".join(sentences))
    assert len(pieces) == 2  # the first two sentences fit one piece of at most 200 characters
    whole = speak(" ".join(sentences))
    parts = [speak(p) for p in pieces]
    assert pcm_samples(whole.content).tolist() == pcm_samples(b"".join(p.content for p in parts)).tolist()
    for header in ("x-output-tokens", "x-input-tokens"):
        assert int(whole.headers[header]) == sum(int(p.headers[header]) for p in parts)
    streamed = speak(" ".join(sentences), stream=True).content
    assert np.abs(pcm_samples(streamed).astype(int) - pcm_samples(whole.content)).max() <= 1


# --- transcription ---------------------------------------------------------------------------------------


def test_transcriptions_every_format(client, golden_inputs):
    path = golden_inputs["speech1_22k"]

    def create(fmt: str):
        with open(path, "rb") as f:
            return client.audio.transcriptions.create(model=MODEL, file=f, response_format=fmt, extra_body=ASR)

    text = create("json").text
    assert text and create("text") == text + "\n"
    duration = sf.info(str(path)).duration
    srt = create("srt")
    assert srt.startswith("1\n00:00:00,000 --> 00:00:0") and text in srt
    vtt = create("vtt")
    assert vtt.startswith("WEBVTT\n\n00:00:00.000 --> ") and text in vtt
    verbose = create("verbose_json")
    assert verbose.text == text and abs(verbose.duration - duration) < 0.01
    assert [(s.start, s.text) for s in verbose.segments] == [(0.0, text)]
    assert abs(verbose.segments[0].end - duration) < 0.01


def test_transcription_stream_matches(client, golden_inputs):
    with open(golden_inputs["speech1_22k"], "rb") as f:
        plain = client.audio.transcriptions.create(model=MODEL, file=f, extra_body=ASR).text
    with open(golden_inputs["speech1_22k"], "rb") as f:
        events = list(client.audio.transcriptions.create(model=MODEL, file=f, stream=True, extra_body=ASR))
    assert events[-1].type == "transcript.text.done" and events[-1].text == plain
    assert "".join(e.delta for e in events[:-1]) == plain
    assert events[-1].usage.output_tokens == ASR["max_new_tokens"]


def long_audio(golden_inputs, seconds: float) -> bytes:
    """Speech clips separated by short near-silent gaps, ``seconds`` long."""
    clips = [sf.read(str(golden_inputs[k]), dtype="float32")[0] for k in ("long_16k", "short_16k")]
    gap = np.random.default_rng(0).normal(0, 1e-4, 8000).astype(np.float32)
    parts, n = [], 0
    while n < seconds * 16000:
        for c in clips:
            parts += [c, gap]
            n += len(c) + len(gap)
    buf = io.BytesIO()
    sf.write(buf, np.concatenate(parts)[: int(seconds * 16000)], 16000, format="FLAC")
    return buf.getvalue()


def test_long_audio_is_split_into_timed_segments(http, golden_inputs):
    data = long_audio(golden_inputs, 65.0)
    r = http.post("/v1/audio/transcriptions", data={"response_format": "verbose_json", **ASR},
                  files={"file": ("long.flac", data, "audio/flac")})
    assert r.status_code == 200, r.text
    body = r.json()
    segments = body["segments"]
    assert len(segments) == 3 and body["duration"] == 65.0
    assert segments[0]["start"] == 0.0 and segments[-1]["end"] == 65.0
    for a, b in zip(segments, segments[1:], strict=False):
        assert a["end"] == b["start"]  # contiguous, nothing dropped or repeated
    assert all(s["end"] - s["start"] <= 30.0 for s in segments)
    assert body["text"] == " ".join(s["text"] for s in segments if s["text"])
    srt = http.post("/v1/audio/transcriptions", data={"response_format": "srt", **ASR},
                    files={"file": ("long.flac", data)}).text
    assert srt.count(" --> ") == 3 and "\n3\n00:00:" in srt


def test_split_points_prefer_quiet_frames():
    rng = np.random.default_rng(0)
    x = rng.normal(0, 0.3, 16000 * 70).astype(np.float32)
    x[int(25.0 * 16000):int(25.3 * 16000)] = 0  # a pause inside the last third of the first 30 s
    spans = split_points(x, 30.0)
    assert spans[0] == (0, spans[1][0]) and spans[-1][1] == len(x)
    assert 25.0 <= spans[0][1] / 16000 <= 25.3
    assert all(b - a <= 30 * 16000 for a, b in spans)
    assert split_points(x[:16000], 30.0) == [(0, 16000)]


# --- conversion ------------------------------------------------------------------------------------------


def test_conversion_with_saved_voice_upload_and_stream(http, alice, golden_inputs):
    source = golden_inputs["speech1_8k"].read_bytes()
    options = {"seed": "3", "max_new_tokens": "80"}
    plain = http.post("/v1/audio/conversions", data={"voice": alice, "model": MODEL, **options},
                      files={"file": ("src.wav", source, "audio/wav")})
    assert plain.status_code == 200 and plain.headers["content-type"] == "audio/wav"
    expected = wav_samples(plain.content)
    assert len(expected) == int(plain.headers["x-output-tokens"]) * 320 > 0
    with http.stream("POST", "/v1/audio/conversions", data={"voice": alice, "stream": "true",
                                                           "response_format": "pcm", **options},
                     files={"file": ("src.wav", source)}) as r:
        assert r.status_code == 200
        streamed = pcm_samples(b"".join(r.iter_bytes()))
    assert len(streamed) == len(expected) and np.abs(streamed.astype(int) - expected).max() <= 1
    with http.stream("POST", "/v1/audio/conversions", data={"voice": alice, "stream_format": "sse",
                                                           "response_format": "pcm", **options},
                     files={"file": ("src.wav", source)}) as r:
        events = sse_events(r.iter_lines())
    assert events[-1]["type"] == "speech.audio.done"
    sse_audio = b"".join(base64.b64decode(e["audio"]) for e in events if e["type"] == "speech.audio.delta")
    assert np.array_equal(pcm_samples(sse_audio), streamed)
    ref = golden_inputs["speech0_22k"].read_bytes()
    uploaded = http.post("/v1/audio/conversions", data={"response_format": "flac", **options},
                         files={"file": ("src.wav", source), "ref_audio": ("ref.wav", ref)})
    assert uploaded.status_code == 200 and np.array_equal(wav_samples(uploaded.content), expected)


# --- voices ----------------------------------------------------------------------------------------------


def test_voices_saved_listed_used_deleted_and_persisted(model, voices_dir, http, alice, golden_inputs):
    sample = golden_inputs["speech2_22k"].read_bytes()
    r = http.post("/v1/audio/voices", data={"name": "bob", "ref_text": "The reference transcript."},
                  files={"audio_sample": ("bob.wav", sample, "audio/wav")})
    assert r.status_code == 201, r.text
    assert r.json()["ref_text"] == "The reference transcript." and r.json()["file_size"] == len(sample)
    assert http.post("/v1/audio/voices", data={"name": "bob"}, files={"audio_sample": ("b.wav", sample)}
                     ).status_code == 409
    listed = http.get("/v1/audio/voices").json()
    assert {"alice", "bob"} <= set(listed["voices"])
    assert http.get("/v1/audio/voices/bob").json()["name"] == "bob"
    before = http.post("/v1/audio/speech", json={"input": "Hi.", "voice": "bob", "response_format": "wav", **TTS})
    assert before.status_code == 200
    assert sorted(p.name for p in voices_dir.iterdir() if p.name.startswith("bob")) == ["bob.json",
                                                                                       "bob.safetensors"]

    with BackgroundServer(create_app(model, settings(voices_dir))) as again:  # a restarted server
        c = openai.OpenAI(base_url=f"{again.url}/v1", api_key="unused", max_retries=0)
        with httpx.Client(base_url=again.url, timeout=60) as h:
            assert {"alice", "bob"} <= set(h.get("/v1/audio/voices").json()["voices"])
            after = c.audio.speech.create(model=MODEL, voice="bob", input="Hi.", response_format="wav",
                                          extra_body=TTS)
            assert after.content == before.content  # same codes and transcript came back from disk
            assert c.audio.voices.delete("bob").deleted
            assert h.delete("/v1/audio/voices/bob").status_code == 404
            assert "bob" not in h.get("/v1/audio/voices").json()["voices"]

    assert "bob" not in http.get("/v1/audio/voices").json()["voices"]  # the first server sees the same disk
    r = http.post("/v1/audio/speech", json={"input": "Hi.", "voice": "bob"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "voice_not_found"


# --- authentication, overload, timeouts, disconnects -----------------------------------------------------


def test_api_key(model, voices_dir):
    with BackgroundServer(create_app(model, settings(voices_dir, api_key="sekrit"))) as srv:
        with pytest.raises(openai.AuthenticationError) as e:
            openai.OpenAI(base_url=f"{srv.url}/v1", api_key="wrong", max_retries=0).models.list()
        assert e.value.status_code == 401 and e.value.body["code"] == "invalid_api_key"
        assert httpx.get(f"{srv.url}/v1/models").status_code == 401
        ok = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="sekrit", max_retries=0)
        assert [m.id for m in ok.models.list().data] == [MODEL]
        assert httpx.get(f"{srv.url}/health").status_code == 200  # probes need no key


def wait_idle(http: httpx.Client, timeout: float = 10.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        health = http.get("/health").json()
        if health["running"] == 0 and health["waiting"] == 0:
            return health
        time.sleep(0.05)
    raise AssertionError(f"the engine did not go idle: {health}")


LONG = {"input": "Keep talking for a long while.", "ref_audio": None, "temperature": 0.0, "repetition_penalty": 1.0,
        "max_new_tokens": 1500, "response_format": "pcm"}  # greedy never stops early with the tiny model


def test_full_queue_is_429_or_503_and_disconnects_free_slots(model, voices_dir, golden_inputs):
    tight = settings(voices_dir, engine=EngineConfig(max_slots=1, max_queue=0), max_concurrent=2,
                     request_timeout_s=1.5)
    body = {**LONG, "ref_audio": base64.b64encode(golden_inputs["short_16k"].read_bytes()).decode()}
    with BackgroundServer(create_app(model, tight)) as srv, httpx.Client(base_url=srv.url, timeout=60) as h:
        with h.stream("POST", "/v1/audio/speech", json={**body, "stream": True}) as first:  # holds the one slot
            audio = first.iter_bytes()  # kept: dropping the iterator would close the connection
            next(audio)
            assert h.get("/health").json()["running"] == 1
            busy = h.post("/v1/audio/speech", json={**body, "max_new_tokens": 5})
            assert busy.status_code == 503 and busy.headers["retry-after"] == "1"
            assert busy.json()["error"]["code"] == "overloaded"
            with h.stream("POST", "/v1/audio/speech", json={**body, "stream": True}) as second:
                assert second.status_code == 503  # the engine is full
            with socket.create_connection((srv.host, srv.port)) as slow:  # a second request, still uploading
                slow.sendall(b"POST /v1/audio/speech HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                             b"Content-Length: 100\r\n\r\n{")
                time.sleep(0.2)
                limited = h.post("/v1/audio/speech", json={**body, "max_new_tokens": 5})
                assert limited.status_code == 429 and limited.headers["retry-after"] == "1"
                assert limited.json()["error"]["type"] == "rate_limit_error"
        wait_idle(h)  # closing the stream cancelled the request

        # a non-streamed request whose client gives up also frees its slot
        with pytest.raises(httpx.ReadTimeout):
            h.post("/v1/audio/speech", json=body, timeout=0.5)
        wait_idle(h)

        # the request timeout ends a generation that runs too long (3500 tokens: the decode fast path
        # can finish 1500 tiny-model tokens within the 1.5 s timeout)
        r = h.post("/v1/audio/speech", json={**body, "max_new_tokens": 3500})
        assert r.status_code == 504 and r.json()["error"]["type"] == "timeout_error"
        wait_idle(h)
        assert h.post("/v1/audio/speech", json={**body, "max_new_tokens": 5}).status_code == 200
