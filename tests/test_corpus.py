"""The corpus builder with the real Debian voices: files, manifests, held-out splits, determinism, resumption."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from gpa.config import Task
from gpa.corpus import CorpusConfig, Summary, build_corpus, is_heldout, real, sentence_id, split_key, text
from gpa.corpus import cli as corpus_cli
from gpa.corpus.manifests import SPLIT_FILES, TRAIN_LIST, TRAIN_TASKS, UTTERANCES, read_jsonl
from gpa.corpus.synth import synthesize
from gpa.corpus.voices import HELDOUT_VOICES, REGISTRY, Perturbation, Speaker, missing_requirement, resolve
from gpa.train.manifest import SourceRecord, read_manifest

DATA = real.default_data_dir()
VOICES = ("rhvoice_bdl", "festival_kal", "flite_rms")  # seen: RHVoice, festival (batched); held out: flite
MISSING = {v: missing_requirement(REGISTRY[v]) for v in VOICES}
needs_voices = pytest.mark.skipif(any(MISSING.values()),
                                  reason=f"TTS voices missing (bash .ci/install-voices installs them): {MISSING}")
needs_data = pytest.mark.skipif(DATA is None or not (DATA / "cathy").is_dir(),
                                reason="real recordings not found: set GPA_DATA or put shared/data beside the repo")


def _config(**kw: object) -> CorpusConfig:
    base = dict(sentences=3, heldout_sentences=1, voices=VOICES, perturbations=("p+300",),
                sources=("arctic", "fortunes"), seed=7, workers=2,
                data_dir=None if DATA is None else str(DATA))
    return CorpusConfig(**{**base, **kw})  # type: ignore[arg-type]


# ---- the fixed text split -------------------------------------------------------------------------------


def test_split_is_pinned() -> None:
    # The held-out bucket is a published contract: these values must never change.
    assert sentence_id("Author of the danger trail, Philip Steels, etc.") == "sf2cad6cdef"
    assert is_heldout("Author of the danger trail, Philip Steels, etc.")
    assert sentence_id("Not at this particular case, Tom, apologized Whittemore.") == "s6cf0da4f92"
    assert not is_heldout("Not at this particular case, Tom, apologized Whittemore.")
    key = "author of the danger trail philip steels etc"
    assert split_key("Author of the danger trail, Philip Steels, etc.") == key
    assert int(hashlib.sha1(key.encode()).hexdigest(), 16) % 10 == 0


def test_split_ignores_case_punctuation_and_spacing() -> None:
    a, b = "That's Thorpe's, said the young engineer.", "  that's THORPE'S said the young engineer "
    assert split_key(a) == split_key(b) and sentence_id(a) == sentence_id(b) and is_heldout(a) == is_heldout(b)


def test_split_is_stable_as_the_pool_grows() -> None:
    small = list(text.pool(["I had been sad too long already.", "They ought to pass here some time today."],
                           "arctic", set()))
    grown = list(text.pool(["Many pages make a thick book.", "They ought to pass here some time today.",
                            "I had been sad too long already."], "arctic", set()))
    assert {s.id: s.heldout for s in small}.items() <= {s.id: s.heldout for s in grown}.items()
    # The seeded order is per sentence, so the earlier picks keep their relative order.
    picked = [s.id for s in text.select({"a": grown}, 3, seed=1) if s.id in {x.id for x in small}]
    assert picked == [s.id for s in text.select({"a": small}, 2, seed=1)]


def test_clean_rules() -> None:
    assert text.clean('"the oceans are teeming with life"') == "The oceans are teeming with life."
    assert text.clean("He was born in 1999 in a small town.") is None  # digits
    assert text.clean("The caf\u00e9 was closed for the whole day.") is None  # non-ASCII
    assert text.clean("The NASA probe reached the outer planets.") is None  # acronym
    assert text.clean("I was sick once -- typhoid, and nothing more.") is None  # formatting run
    assert text.clean("Too short.") is None and text.clean("word " * 50) is None
    assert text.clean("Too short but allowed.", min_chars=5) == "Too short but allowed."


def test_offline_sources_yield_sentences() -> None:
    for name in ("wordnet", "fortunes", "wordnet_glosses"):
        if not (text.WORDNET_DIR if name.startswith("wordnet") else text.FORTUNES_DIR).is_dir():
            pytest.skip(f"Debian {'wordnet-base' if name == 'wordnet' else 'fortunes'} not installed")
        sentences = list(text.pool(text.read_source(name, None), name, set()))
        share = sum(s.heldout for s in sentences) / len(sentences)
        assert len(sentences) > 1000 and 0.08 < share < 0.12, (name, len(sentences), share)
        assert all(text.clean(s.text) == s.text for s in sentences[:500])


def test_wordnet_glosses_are_the_definitions_not_the_examples(tmp_path) -> None:
    (tmp_path / "data.noun").write_text(
        "  1 This software and database is being provided to you, the LICENSEE, by Princeton University\n"
        "02121620 05 n 02 mouser 0 cat 0 001 @ 02121808 n 0000 | a cat proficient at mousing; "
        "an animal that hunts mice; \"our mouser caught three mice today\"\n")
    assert text.wordnet_glosses(tmp_path) == ["a cat proficient at mousing", "an animal that hunts mice"]
    assert text.wordnet_examples(tmp_path) == ["our mouser caught three mice today"]
    assert "wordnet_glosses" in text.SOURCES and "wordnet_glosses" not in text.DEFAULT_SOURCES  # opt-in


def test_select_refuses_more_than_the_pools_hold() -> None:
    pool = list(text.pool(["I had been sad too long already."], "arctic", set()))
    with pytest.raises(ValueError, match="only 1 usable"):
        text.select({"arctic": pool}, 2, seed=0)


# ---- voices ---------------------------------------------------------------------------------------------


def test_registry_and_heldout_voices() -> None:
    persons = [v.person for v in REGISTRY.values()]
    for name in HELDOUT_VOICES:  # a held-out voice's speaker is nowhere else in the registry
        assert persons.count(REGISTRY[name].person) == 1 and REGISTRY[name].quality == "good"
    assert all(not v.restricted and v.quality != "low" for v in resolve(("default",)))
    assert REGISTRY["rhvoice_lyubov"].restricted and REGISTRY["mbrola_us1"].restricted
    with pytest.raises(ValueError, match="unknown voice 'nope'"):
        resolve(("nope",))


def test_perturbation_specs() -> None:
    p = Perturbation.parse("p-200t1.1")
    assert (p.pitch_cents, p.tempo, p.suffix) == (-200, 1.1, "_p-200_t1.1")
    assert p.sox_effects() == ["pitch", "-200", "tempo", "-s", "1.1"]
    for bad in ("", "p300", "x", "t3", "p+0"):
        with pytest.raises(ValueError, match="perturbation"):
            Perturbation.parse(bad)


# ---- real recordings --------------------------------------------------------------------------------------


@needs_data
def test_cathy_split_follows_the_text_hash() -> None:
    utts = real.cathy(DATA)
    assert utts and all(u.split == ("heldout_text" if is_heldout(u.text) else "train") for u in utts)
    prompts = {u.text for u in utts}
    share = sum(is_heldout(t) for t in prompts) / len(prompts)
    assert 0.07 < share < 0.13, share


# ---- a real build -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Summary]:
    if any(MISSING.values()):
        pytest.skip(f"TTS voices missing (bash .ci/install-voices installs them): {MISSING}")
    out = tmp_path_factory.mktemp("corpus")
    return out, build_corpus(out, _config())


@needs_voices
@pytest.mark.slow
def test_build_writes_16k_mono_speech(built: tuple[Path, Summary]) -> None:
    out, summary = built
    assert summary.failed == [] and summary.synthesised == 2 * (2 * 4 + 1)  # (plain + p+300) x (2 voices x 4 + 1)
    entries = [e for e in read_jsonl(out / UTTERANCES) if e["source"] == "synthetic"]
    assert len(entries) == summary.synthesised
    for e in entries:
        info = sf.info(str(out / e["audio"]))
        assert (info.samplerate, info.channels, info.subtype) == (16000, 1, "PCM_16")
        x, _ = sf.read(str(out / e["audio"]))
        assert np.sqrt(np.mean(x**2)) > 0.01 and abs(info.duration - e["duration"]) < 1e-3
        words = len(e["text"].split())
        assert words / 5.0 < info.duration < words / 1.5 + 1.0, (e, info.duration)  # 1.5-5 words per second


@needs_voices
@pytest.mark.slow
def test_pitch_perturbation_shifts_pitch_not_length(built: tuple[Path, Summary]) -> None:
    out, _ = built
    for e in read_jsonl(out / UTTERANCES):
        if e["speaker"] == "rhvoice_bdl" and e["split"] == "train":
            plain, _ = sf.read(str(out / e["audio"]))
            shifted, _ = sf.read(str(out / e["audio"].replace("rhvoice_bdl", "rhvoice_bdl_p+300")))
            assert abs(len(plain) - len(shifted)) < 0.02 * len(plain)
            ratio = _median_f0(shifted) / _median_f0(plain)
            assert 1.12 < ratio < 1.26, ratio  # +300 cents is a factor 2 ** (3 / 12) = 1.189


def _median_f0(x: np.ndarray, sr: int = 16000) -> float:
    """Median autocorrelation pitch (60-400 Hz) over voiced 40 ms frames."""
    n, found = 640, []
    for i in range(0, len(x) - n, n // 2):
        f = x[i : i + n] - x[i : i + n].mean()
        if np.sqrt(np.mean(f**2)) < 0.02:
            continue
        ac = np.correlate(f, f, "full")[n - 1 :]
        lag = sr // 400 + int(np.argmax(ac[sr // 400 : sr // 60]))
        if ac[lag] > 0.5 * ac[0]:
            found.append(sr / lag)
    assert len(found) > 10, "too few voiced frames"
    return float(np.median(found))


@needs_voices
@pytest.mark.slow
def test_manifests_keep_heldout_sentences_and_voices_out_of_train(built: tuple[Path, Summary]) -> None:
    out, _ = built
    sentences = {s["id"]: s for s in read_jsonl(out / "sentences.jsonl")}
    utts = read_jsonl(out / UTTERANCES)
    synthetic = {split: [e for e in utts if e["source"] == "synthetic" and e["split"] == split]
                 for split in ("train", "heldout_text", "heldout_voice")}
    train = [e for e in utts if e["split"] == "train"]
    assert all(not is_heldout(e["text"]) and e["voice"] not in HELDOUT_VOICES for e in train)
    assert synthetic["heldout_text"] and all(is_heldout(e["text"]) and e["voice"] not in HELDOUT_VOICES
                                             for e in synthetic["heldout_text"])
    assert synthetic["heldout_voice"] and all(is_heldout(e["text"]) and e["voice"] in HELDOUT_VOICES
                                              for e in synthetic["heldout_voice"])
    assert {e["sentence"] for e in synthetic["train"]} == {i for i, s in sentences.items() if s["split"] == "train"}
    real_utts = [e for e in utts if e["source"] == "real"]
    groups = {"train": train, "heldout_text": synthetic["heldout_text"], "heldout_voice": synthetic["heldout_voice"],
              "cathy_test": [e for e in real_utts if e["split"] == "heldout_text"],
              "references": [e for e in real_utts if e["split"] == "reference"]}
    for name, entries in groups.items():  # each split file is its utterances in the eval harness's schema
        rows = read_jsonl(out / SPLIT_FILES[name])
        assert rows == [{"audio": e["audio"], **({"text": e["text"]} if e["text"] else {}), "speaker": e["speaker"]}
                        for e in entries], name
        assert all((out / r["audio"]).is_file() for r in rows)
    if DATA is not None:
        assert groups["cathy_test"] and all(is_heldout(e["text"]) and e["speaker"] == "cathy"
                                            for e in groups["cathy_test"])
        assert {e["speaker"] for e in train} >= {"cathy"}
        assert len({e["speaker"] for e in groups["references"]}) > 100


@needs_voices
@pytest.mark.slow
def test_split_manifests_load_in_the_eval_harness(built: tuple[Path, Summary]) -> None:
    evaluation = pytest.importorskip("gpa.evaluation.manifest", reason="the eval harness (gpa.evaluation) is absent")
    out, _ = built
    for name in SPLIT_FILES.values():
        if (out / name).read_text().strip():
            test_set = evaluation.load_manifest(out / name)
            assert all(item.audio.is_file() for item in test_set.items)


@needs_voices
@pytest.mark.slow
def test_train_manifests_are_read_by_gpa_prepare(built: tuple[Path, Summary]) -> None:
    out, _ = built
    train = [e for e in read_jsonl(out / UTTERANCES) if e["split"] == "train"]
    records = list(read_manifest(out / TRAIN_TASKS, (Task.ASR, Task.TTS)))
    assert records and all(isinstance(r, SourceRecord) and r.audio.is_file() for r in records)
    by_task = {t: [r for r in records if r.tasks == (t,)] for t in Task}
    assert len(by_task[Task.ASR]) == len(by_task[Task.TTS]) == len(train)
    speaker_of = {str(out / e["audio"]): e for e in train}
    for r in by_task[Task.VC]:  # a parallel pair: same sentence, another voice; the reference is another sentence
        src, tgt, ref = speaker_of[str(r.audio)], speaker_of[str(r.vc_audio)], speaker_of[str(r.ref_audio)]
        assert src["sentence"] == tgt["sentence"] != ref["sentence"]
        assert src["speaker"] != tgt["speaker"] == ref["speaker"]
    assert by_task[Task.VC]
    listed = list(read_manifest(out / TRAIN_LIST, (Task.ASR, Task.TTS)))
    assert len(listed) == len(train) and all(isinstance(r, SourceRecord) for r in listed)


@needs_voices
@pytest.mark.slow
def test_same_config_same_corpus_and_resume(built: tuple[Path, Summary], tmp_path: Path) -> None:
    out, first = built
    again = build_corpus(tmp_path, _config())
    assert (again.synthesised, again.reused) == (first.synthesised, 0)
    names = sorted(p.relative_to(out).as_posix() for p in (out / "wav").rglob("*.wav"))
    assert names == sorted(p.relative_to(tmp_path).as_posix() for p in (tmp_path / "wav").rglob("*.wav"))
    for name in ("sentences.jsonl", *SPLIT_FILES.values(), TRAIN_LIST, TRAIN_TASKS, UTTERANCES):
        assert (out / name).read_text() == (tmp_path / name).read_text(), name
    assert all((out / n).read_bytes() == (tmp_path / n).read_bytes() for n in names)  # the engines are deterministic
    resumed = build_corpus(out, _config())
    assert (resumed.synthesised, resumed.reused) == (0, first.synthesised)
    other_seed = build_corpus(tmp_path / "seed", _config(seed=8, perturbations=(), voices=("flite_slt",)))
    one = next(e for e in read_jsonl(out / UTTERANCES) if e["speaker"] == "festival_kal")
    synthesize(Speaker(REGISTRY["festival_kal"]), one["text"], tmp_path / "alone.wav")  # not in a batch
    assert (tmp_path / "alone.wav").read_bytes() == (out / one["audio"]).read_bytes()
    chosen = [[s["id"] for s in read_jsonl(d / "sentences.jsonl")] for d in (out, tmp_path / "seed")]
    assert other_seed.synthesised == 4 and chosen[0] != chosen[1]


@needs_voices
@pytest.mark.slow
def test_cli_resumes_and_reports(built: tuple[Path, Summary], capsys: pytest.CaptureFixture[str]) -> None:
    out, first = built
    argv = [str(out), "--sentences", "3", "--heldout-sentences", "1", "--voices", *VOICES, "--perturbations",
            "p+300", "--sources", "arctic", "fortunes", "--seed", "7", "--no-progress", "--log-level", "ERROR"]
    if DATA is not None:
        argv += ["--data-dir", str(DATA)]
    assert corpus_cli.main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["synthesised"], report["reused"]) == (0, first.synthesised)


def test_cli_lists_voices_and_rejects_bad_input(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert corpus_cli.main(["--list-voices"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert {r["name"] for r in rows} == set(REGISTRY) and sum(r["heldout"] for r in rows) == len(HELDOUT_VOICES)
    assert corpus_cli.main([str(tmp_path), "--voices", "nope"]) == 2
    assert "unknown voice 'nope'" in capsys.readouterr().err
    assert corpus_cli.main([str(tmp_path), "--perturbations", "p300"]) == 2
    assert corpus_cli.main([]) == 2


def test_an_interrupted_build_holds_a_smaller_builds_files() -> None:
    # Jobs run in chunks of sentences, train and held-out interleaved: a prefix of a big build's jobs, up to
    # one chunk longer, holds every job of a build with fewer sentences (same seed), which then synthesises
    # nothing new.
    from gpa.corpus.build import BATCH_SENTENCES, choose_sentences, plan

    speakers = [Speaker(REGISTRY[v]) for v in VOICES]
    big, small = ([j for batch in plan(speakers, choose_sentences(
        _config(sentences=n, heldout_sentences=None, sources=("fortunes",)), None)) for j in batch] for n in (100, 40))
    assert len(big) > 2 * len(small) and len({j.rel for j in big}) == len(big)
    last = max(i for i, j in enumerate(big) if j.rel in {s.rel for s in small})
    assert last < len(small) + BATCH_SENTENCES * len(speakers)


def test_voices_without_their_engine_are_skipped_with_the_reason(monkeypatch: pytest.MonkeyPatch,
                                                                 tmp_path: Path) -> None:
    from gpa.corpus.voices import available

    monkeypatch.setenv("PATH", str(tmp_path))  # no engine binaries on it
    ok, missing = available(resolve(("flite_slt", "festival_kal")))
    assert ok == [] and missing == {"flite_slt": "flite not found (Debian package flite)",
                                    "festival_kal": "festival not found (Debian package festival + festvox-*)"}
    with pytest.raises(ValueError, match="none of the voices .* can run here"):
        build_corpus(tmp_path / "c", _config(voices=("flite_slt",), sources=("fortunes",), real=False))


def test_a_corpus_grows_by_more_sentences_in_fewer_voices_each() -> None:
    # voices_per_sentence=k: each train sentence in exactly k seen voices, every seen voice an equal share,
    # held-out sentences in every voice; skip_sentences continues the seeded choice without overlap.
    from gpa.corpus.build import choose_sentences, plan

    speakers = [Speaker(REGISTRY[v]) for v in REGISTRY if v not in HELDOUT_VOICES][:6]
    first = choose_sentences(_config(sentences=30, heldout_sentences=0, sources=("fortunes",)), None)
    more = choose_sentences(_config(sentences=60, heldout_sentences=4, skip_sentences=30, sources=("fortunes",)), None)
    both = choose_sentences(_config(sentences=90, heldout_sentences=0, sources=("fortunes",)), None)
    train_more = [s for s in more if not s.heldout]
    assert [s.id for s in first + train_more] == [s.id for s in both]  # a continuation of the same choice
    jobs = [j for batch in plan(speakers, more, voices_per_sentence=2) for j in batch]
    per_sentence: dict[str, set[str]] = {}
    for j in jobs:
        per_sentence.setdefault(j.sentence.id, set()).add(j.speaker.name)
    assert all(len(per_sentence[s.id]) == 2 for s in train_more)
    assert all(per_sentence[s.id] == {sp.name for sp in speakers} for s in more if s.heldout)
    share = [sum(j.speaker.name == sp.name and j.split == "train" for j in jobs) for sp in speakers]
    assert share == [len(train_more) * 2 // len(speakers)] * len(speakers)
    everyone = [j for batch in plan(speakers, more) for j in batch]
    assert len(everyone) == len(more) * len(speakers)
    with pytest.raises(ValueError, match="voices_per_sentence"):
        _config(voices_per_sentence=0)
