"""Built-in voices (``voices/`` in a checkpoint): the catalogue and its errors, names as references in the
Python API, the CLI (``gpa tts`` without --reference, ``gpa voices``) and the server (a real uvicorn on loopback).

Everything runs on the tiny random-weight nano checkpoint of conftest (``nano_dir``), whose two built-in
voices are real recordings of two speakers (conftest.NANO_VOICES).
"""

from __future__ import annotations

import io
import json
import logging
import shutil
from pathlib import Path

import httpx
import numpy as np
import pytest
import soundfile as sf
import torch
from conftest import NANO_VOICES

import gpa
from gpa.api import GPA
from gpa.audio import AudioError
from gpa.cli import main
from gpa.server import ServerSettings, create_app
from gpa.server.runner import BackgroundServer
from gpa.server.voices import VoiceStore
from gpa.voices import UnknownVoiceError, VoiceError, builtin_voices, default_voice

TTS = {"seed": 0, "max_new_tokens": 12}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model(nano_dir: Path) -> GPA:
    return gpa.load(nano_dir, device="cpu")


@pytest.fixture
def ckpt(nano_dir: Path, tmp_path: Path) -> Path:
    """A checkpoint directory whose voices/ a test may break (the rest of it is not needed to read voices)."""
    shutil.copytree(nano_dir / "voices", tmp_path / "voices")
    return tmp_path


def write_wav(path: Path, samples: np.ndarray, sr: int = 16000, subtype: str = "PCM_16") -> None:
    sf.write(str(path), samples, sr, subtype=subtype)


def speech(seconds: float, sr: int = 16000) -> np.ndarray:
    t = np.arange(int(seconds * sr)) / sr
    return (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)


# --- the catalogue --------------------------------------------------------------------------------------


def test_catalogue_reads_audio_transcripts_and_metadata(nano_dir, fixtures):
    voices = builtin_voices(nano_dir)
    assert list(voices) == sorted(NANO_VOICES) == ["cathy", "ls1688"]
    data = fixtures.parent / "data"
    for name, (clip, licence, with_text) in NANO_VOICES.items():
        v = voices[name]
        assert v.audio_path == nano_dir / "voices" / f"{name}.wav" and v.licence == licence and v.source == clip
        assert v.text == ((data / clip).with_suffix(".txt").read_text().strip() if with_text else None)
        assert v.seconds == pytest.approx(sf.info(str(data / clip)).duration, abs=1e-3)
    assert [v.default for v in voices.values()] == [True, False] and default_voice(voices) == "cathy"


def test_default_voice_is_named_in_voices_json_else_default_else_first(ckpt, tmp_path):
    catalog = ckpt / "voices" / "voices.json"
    entries = json.loads(catalog.read_text())
    catalog.write_text(json.dumps({**entries, "default": "ls1688"}))
    assert default_voice(builtin_voices(ckpt)) == "ls1688" and list(builtin_voices(ckpt)) == ["cathy", "ls1688"]
    catalog.write_text(json.dumps(entries))
    shutil.copy(ckpt / "voices" / "ls1688.wav", ckpt / "voices" / "default.wav")
    assert default_voice(builtin_voices(ckpt)) == "default"
    (ckpt / "voices" / "default.wav").unlink()
    catalog.unlink()  # voices.json is optional: the wavs are the voices
    voices = builtin_voices(ckpt)
    assert default_voice(voices) == "cathy" and voices["ls1688"].licence is None
    (ckpt / "voices" / "README.md").write_text("where these recordings come from")  # documentation is allowed
    assert list(builtin_voices(ckpt)) == ["cathy", "ls1688"]
    assert builtin_voices(tmp_path / "elsewhere") == {} and default_voice({}) is None


def _listed_without_wav(v: Path) -> str:
    (v / "ls1688.wav").unlink()
    return "lists voice 'ls1688' but .*ls1688.wav is missing"


def _transcript_without_wav(v: Path) -> str:
    (v / "anna.txt").write_text("Hello.")
    return "anna.txt: a transcript without its audio"


def _bad_file_name(v: Path) -> str:
    write_wav(v / "my voice.wav", speech(3.5))
    return "my voice.wav: invalid voice file name"


def _unexpected_file(v: Path) -> str:
    sf.write(str(v / "anna.flac"), speech(3.5), 16000)
    return "anna.flac: unexpected entry .* expected NAME.wav, NAME.txt, voices.json"


def _stereo(v: Path) -> str:
    write_wav(v / "cathy.wav", np.stack([speech(4), speech(4)], axis=1))
    return "'cathy': .*cathy.wav is WAV PCM_16, 2 channel.*expected mono PCM16 WAV at 16000 Hz, 3-8 s"


def _wrong_rate(v: Path) -> str:
    write_wav(v / "cathy.wav", speech(4, 22050), 22050)
    return "cathy.wav is WAV PCM_16, 1 channel\\(s\\), 22050 Hz"


def _float_wav(v: Path) -> str:
    write_wav(v / "cathy.wav", speech(4), subtype="FLOAT")
    return "cathy.wav is WAV FLOAT"


def _too_short(v: Path) -> str:
    write_wav(v / "cathy.wav", speech(2.5))
    return "cathy.wav is .* 2.50 s; expected .* 3-8 s"


def _too_long(v: Path) -> str:
    write_wav(v / "cathy.wav", speech(8.5))
    return "8.50 s; expected"


def _silent(v: Path) -> str:
    write_wav(v / "cathy.wav", np.zeros(16000 * 4, np.float32))
    return "'cathy': .*cathy.wav is silent"


def _not_audio(v: Path) -> str:
    (v / "cathy.wav").write_bytes(b"RIFF not really a wav file" * 40)
    return "'cathy': cannot read .*cathy.wav"


def _empty_transcript(v: Path) -> str:
    (v / "cathy.txt").write_text("  \n")
    return "cathy.txt: the transcript is empty"


def _bad_json(v: Path) -> str:
    (v / "voices.json").write_text("{\"cathy\": ")
    return "cannot read .*voices.json"


def _unknown_key(v: Path) -> str:
    (v / "voices.json").write_text(json.dumps({"cathy": {"license": "CC0-1.0"}}))
    return "voice 'cathy' has unknown keys \\['license'\\]; allowed: description, licence, source"


def _path_as_name(v: Path) -> str:
    (v / "voices.json").write_text(json.dumps({"../cathy": {"licence": "CC0-1.0"}}))
    return "invalid voice name '../cathy'"


def _missing_default(v: Path) -> str:
    (v / "voices.json").write_text(json.dumps({"default": "anna"}))
    return "the default voice 'anna' is not one of the voices \\(cathy, ls1688\\)"


@pytest.mark.parametrize("breakage", [
    _listed_without_wav, _transcript_without_wav, _bad_file_name, _unexpected_file, _stereo, _wrong_rate,
    _float_wav, _too_short, _too_long, _silent, _not_audio, _empty_transcript, _bad_json, _unknown_key,
    _path_as_name, _missing_default], ids=lambda f: f.__name__.strip("_"))
def test_a_broken_voices_directory_is_an_error_naming_the_file(ckpt, breakage):
    expected = breakage(ckpt / "voices")
    with pytest.raises(VoiceError, match=expected):
        builtin_voices(ckpt)


# --- the Python API ---------------------------------------------------------------------------------------


def test_a_builtin_name_is_accepted_wherever_a_reference_is(model, nano_dir, fixtures):
    assert {n: v.licence for n, v in model.builtin_voices().items()} == {"cathy": "CC0-1.0", "ls1688": "CC-BY-4.0"}
    assert model.default_voice() == "cathy"
    wavs = {name: nano_dir / "voices" / f"{name}.wav" for name in NANO_VOICES}
    cathy = model.voice("cathy")
    # Voices are cached by audio content, so the name gave exactly that clip's samples (the random-weight
    # speaker encoder maps every clip to the same codes: comparing codes or audio could not tell these apart).
    assert model.voice(wavs["cathy"]) is cathy and model.voice("ls1688") is model.voice(wavs["ls1688"])
    assert model.voice("ls1688") is not cathy
    # the audio only: no prompt continuation unless the caller gives a transcript
    assert cathy.text is None and cathy.semantic_codes is None
    assert model.voice("cathy", "He turned sharply.").text == "He turned sharply."
    for name in NANO_VOICES:
        wav, sr = model.tts("Hello there.", reference=name, **TTS)
        assert sr == 22050 and np.array_equal(wav, model.tts("Hello there.", reference=str(wavs[name]), **TTS)[0])
    source = fixtures.parent / "data" / "cathy" / "arctic_a0009_1592748391.flac"
    assert np.array_equal(model.vc(source, "ls1688", **TTS)[0], model.vc(source, wavs["ls1688"], **TTS)[0])
    assert len(model.tts_batch(["One.", "Two."], "ls1688", **TTS)) == 2


def test_no_reference_means_the_default_voice(model, fixtures):
    assert np.array_equal(model.tts("Hello there.", **TTS)[0], model.tts("Hello there.", reference="cathy", **TTS)[0])
    source = fixtures.parent / "data" / "cathy" / "arctic_a0009_1592748391.flac"
    assert np.array_equal(model.vc(source, **TTS)[0], model.vc(source, "cathy", **TTS)[0])
    bare = GPA(model.lm, model.vocab, model.bicodec, model.glm)  # no checkpoint, so no built-in voices
    with pytest.raises(ValueError, match="no reference voice given, and this model has no built-in voices"):
        bare.tts("Hello there.", **TTS)


def test_an_existing_file_wins_over_a_voice_name(model, nano_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shutil.copy(nano_dir / "voices" / "ls1688.wav", tmp_path / "cathy")  # a file called like a built-in voice
    assert torch.equal(model.voice("cathy").global_codes, model.voice("ls1688").global_codes)
    with pytest.raises(AudioError, match="audio file not found: ls1688"):
        model.voice(Path("ls1688"))  # a Path is always a file, never a name


def test_an_unknown_name_lists_the_builtin_voices(model):
    with pytest.raises(UnknownVoiceError, match="reference 'anna': audio file not found, and not a built-in voice "
                                                "name; the model's built-in voices are: cathy, ls1688; otherwise "
                                                "give the path of an audio file"):
        model.tts("Hello.", reference="anna", **TTS)
    bare = GPA(model.lm, model.vocab, model.bicodec, model.glm)  # built from parts: no checkpoint, no voices
    assert bare.builtin_voices() == {} and bare.default_voice() is None
    with pytest.raises(AudioError, match="this model has no built-in voices; otherwise give the path"):
        bare.voice("cathy")


# --- the command line -------------------------------------------------------------------------------------


def written_as(path: Path, expected: tuple[np.ndarray, int]) -> bool:
    """Whether the file holds ``expected`` as PCM16 at its rate (libsndfile truncates: at most one step off)."""
    data, sr = sf.read(str(path), dtype="float32")
    wav, rate = expected
    return sr == rate == 22050 and len(data) == len(wav) > 0 and np.abs(data - np.clip(wav, -1, 1)).max() < 1.5 / 32768


def test_cli_tts_and_vc_use_builtin_voices(model, nano_dir, fixtures, tmp_path, capsys):
    common = ["--model", str(nano_dir), "--device", "cpu", "--seed", "0", "--max-new-tokens", "12", "--no-progress"]
    assert main(["tts", "Hello there.", "-o", str(tmp_path / "a.wav"), *common]) == 0  # the default voice
    assert written_as(tmp_path / "a.wav", model.tts("Hello there.", "cathy", **TTS))
    assert main(["tts", "Hello there.", "--reference", "ls1688", "-o", str(tmp_path / "b.wav"), *common]) == 0
    assert written_as(tmp_path / "b.wav", model.tts("Hello there.", "ls1688", **TTS))
    source = fixtures.parent / "data" / "cathy" / "arctic_a0009_1592748391.flac"
    assert main(["vc", str(source), "--reference", "ls1688", "-o", str(tmp_path / "vc.wav"), *common]) == 0
    assert written_as(tmp_path / "vc.wav", model.vc(source, "ls1688", **TTS))
    capsys.readouterr()
    assert main(["tts", "Hi.", "--reference", "anna", "-o", str(tmp_path / "x.wav"), *common]) == 1
    assert "the model's built-in voices are: cathy, ls1688" in capsys.readouterr().err
    assert main(["tts", "Hi.", "--reference-text", "Hello.", "-o", str(tmp_path / "x.wav"), *common]) == 2
    assert "--reference-text is the transcript of --reference: give both" in capsys.readouterr().err


def test_cli_without_reference_on_a_model_without_voices(mini_dir, tmp_path, capsys):
    assert main(["tts", "Hi.", "-o", str(tmp_path / "x.wav"), "--model", str(mini_dir), "--device", "cpu"]) == 2
    assert f"no --reference given, and the model ({mini_dir}) has no built-in voices" in capsys.readouterr().err


def test_cli_voices_prints_one_json_line_per_voice(nano_dir, mini_dir, ckpt, capsys, monkeypatch):
    assert main(["voices", "--model", str(nano_dir)]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(v["name"], v["default"], v["licence"]) for v in lines] == [("cathy", True, "CC0-1.0"),
                                                                      ("ls1688", False, "CC-BY-4.0")]
    assert lines[0]["audio"] == str(nano_dir / "voices" / "cathy.wav") and lines[1]["text"] is None
    monkeypatch.setenv("GPA_MODEL", str(nano_dir))  # the default model
    assert main(["voices"]) == 0 and len(capsys.readouterr().out.splitlines()) == 2
    assert main(["voices", "--model", str(mini_dir)]) == 0
    out = capsys.readouterr()
    assert out.out == "" and "has no built-in voices" in out.err
    broken = ckpt / "model"  # a complete checkpoint with a broken voice
    shutil.copytree(nano_dir, broken)
    (broken / "voices" / "ls1688.wav").unlink()
    assert main(["voices", "--model", str(broken)]) == 1
    assert "lists voice 'ls1688' but" in capsys.readouterr().err


# --- the server -------------------------------------------------------------------------------------------


def pcm(data: bytes) -> np.ndarray:
    return np.frombuffer(data, dtype="<i2").astype(np.float32) / 32768


@pytest.fixture(scope="module")
def http(model, tmp_path_factory):
    voices_dir = tmp_path_factory.mktemp("saved-voices")
    app = create_app(model, ServerSettings(model_name="gpa-nano", voices_dir=voices_dir))
    with BackgroundServer(app) as srv, httpx.Client(base_url=srv.url, timeout=120) as client:
        yield client


def test_server_speaks_and_converts_with_builtin_voices(model, http, fixtures):
    body = {"input": "Hello there.", "response_format": "pcm", **TTS}
    for voice in ("cathy", {"id": "ls1688"}):
        r = http.post("/v1/audio/speech", json={**body, "voice": voice})
        assert r.status_code == 200 and r.headers["x-sample-rate"] == "22050"
        name = voice if isinstance(voice, str) else voice["id"]
        got = pcm(r.content)
        expected, _ = model.tts("Hello there.", name, **TTS)  # offline: DC removed; the server keeps it
        assert len(got) == len(expected) > 0 and np.abs(got - got.mean() - expected).max() < 5e-5
    source = fixtures.parent / "data" / "cathy" / "arctic_a0009_1592748391.flac"
    r = http.post("/v1/audio/conversions", data={"voice": "ls1688", "response_format": "wav", **TTS},
                  files={"file": ("s.flac", source.read_bytes())})
    assert r.status_code == 200
    got, sr = sf.read(io.BytesIO(r.content), dtype="float32")
    expected, _ = model.vc(source, "ls1688", **TTS)
    assert sr == 22050 and len(got) == len(expected) and np.abs(got - got.mean() - expected).max() < 5e-5


def test_server_lists_builtin_voices_and_protects_them(http, nano_dir):
    listed = http.get("/v1/audio/voices").json()
    assert listed["voices"][:2] == ["cathy", "ls1688"]
    builtin = {v["name"]: v for v in listed["builtin_voices"]}
    assert set(builtin) == {"cathy", "ls1688"} and {v["type"] for v in builtin.values()} == {"builtin"}
    assert builtin["cathy"]["default"] and builtin["cathy"]["licence"] == "CC0-1.0"
    assert builtin["cathy"]["ref_text"] == (nano_dir / "voices" / "cathy.txt").read_text().strip()
    assert http.get("/v1/audio/voices/ls1688").json() == builtin["ls1688"]
    r = http.delete("/v1/audio/voices/cathy")
    assert r.status_code == 403 and r.json()["error"]["code"] == "builtin_voice"
    assert "built-in voice of the model and cannot be deleted" in r.json()["error"]["message"]
    sample = (nano_dir / "voices" / "ls1688.wav").read_bytes()
    r = http.post("/v1/audio/voices", data={"name": "cathy"}, files={"audio_sample": ("a.wav", sample)})
    assert r.status_code == 409 and r.json()["error"]["code"] == "builtin_voice"
    assert (nano_dir / "voices" / "cathy.wav").is_file()
    assert http.post("/v1/audio/voices", data={"name": "mine"},
                     files={"audio_sample": ("a.wav", sample)}).status_code == 201
    listed = http.get("/v1/audio/voices").json()
    assert listed["voices"] == ["cathy", "ls1688", "mine"] and [v["name"] for v in listed["uploaded_voices"]] == [
        "mine"]
    r = http.post("/v1/audio/speech", json={"input": "Hi.", "voice": "anna"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "voice_not_found"
    assert "unknown voice 'anna'; voices: cathy, ls1688, mine; or send ref_audio" in r.json()["error"]["message"]
    assert http.delete("/v1/audio/voices/mine").status_code == 200


def test_a_saved_voice_with_a_builtin_name_is_hidden_with_a_warning(model, nano_dir, tmp_path, caplog):
    store = VoiceStore(tmp_path)  # left by a server of a model without built-in voices
    # with a transcript: its prompt continues the clip, so a request using it has a longer prompt
    hidden = model.voice(nano_dir / "voices" / "ls1688.wav", "A transcript of the clip.")
    store.add(hidden, "cathy", file_size=1, duration=5.0, mime_type=None, consent=None)
    body = {"input": "Hello there.", "voice": "cathy", "response_format": "pcm", **TTS}
    with caplog.at_level(logging.WARNING, logger="gpa.server.voices"), \
            BackgroundServer(create_app(model, ServerSettings(model_name="gpa-nano", voices_dir=tmp_path))) as srv, \
            httpx.Client(base_url=srv.url, timeout=120) as client:
        listed = client.get("/v1/audio/voices").json()
        r = client.post("/v1/audio/speech", json=body)
    assert listed["voices"] == ["cathy", "ls1688"] and listed["uploaded_voices"] == []
    builtin = model.tts_prompts(["Hello there."], model.voice("cathy"))[0].prompt_ids
    assert len(model.tts_prompts(["Hello there."], hidden)[0].prompt_ids) > len(builtin)
    assert r.status_code == 200 and int(r.headers["x-input-tokens"]) == len(builtin)  # the built-in voice
    expected, got = model.tts("Hello there.", "cathy", **TTS)[0], pcm(r.content)
    assert len(got) == len(expected) and np.abs(got - got.mean() - expected).max() < 5e-5
    assert "the saved voice 'cathy' (cathy.json and cathy.safetensors" in caplog.text
