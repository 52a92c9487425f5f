"""The cheap steps of ``gpa recipe nano`` on a small corpus folder built from real recordings."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import soundfile as sf
import torch

from gpa.train.nano_recipe import (
    BUNDLE_VOICES,
    DEFAULT_VOICE,
    NanoRecipe,
    codec_utterances,
    decoder_utterances,
    pick_voices,
    train_final_decoder,
)
from gpa.voices import builtin_voices, default_voice


def small_corpus(root: Path, fixtures: Path) -> Path:
    """utterances.jsonl naming real cathy clips under every bundle voice's speaker, plus a held-out row."""
    cathy = [f for f in sorted((fixtures.parent / "data" / "cathy").glob("*.flac"))[:400]
             if 4.0 <= sf.info(f).duration <= 7.0][:36]
    rows = []
    for k, speaker in enumerate([*BUNDLE_VOICES, "flite_awb"]):
        for f in cathy[k * 6 : k * 6 + 6]:
            seconds = sf.info(f).duration
            rows.append({"audio": str(f), "text": f.with_suffix(".txt").read_text().strip(), "speaker": speaker,
                         "split": "train", "source": "real" if speaker == "cathy" else "synthetic",
                         "duration": seconds})
    rows.append({**rows[0], "split": "heldout_text"})
    (root / "utterances.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def test_pick_voices_writes_a_valid_builtin_catalogue(tmp_path, fixtures):
    corpus = small_corpus(tmp_path, fixtures)
    pick_voices(corpus, tmp_path / "ckpt" / "voices")
    voices = builtin_voices(tmp_path / "ckpt")  # reads and checks every clip (16 kHz PCM16 mono, 3-8 s)
    assert sorted(voices) == sorted(name for name, *_ in BUNDLE_VOICES.values())
    assert default_voice(voices) == DEFAULT_VOICE and all(v.licence and v.text for v in voices.values())
    for name, info in voices.items():
        assert 4.0 <= info.seconds <= 7.0, name


def test_codec_utterances_cap_synthetic_voices_keep_real_and_libri(tmp_path, fixtures):
    corpus = small_corpus(tmp_path, fixtures)
    utts = codec_utterances(corpus, per_voice=2, seed=0, data_dir=fixtures.parent / "data")
    by: dict[str, int] = {}
    for u in utts:
        by[u.speaker] = by.get(u.speaker, 0) + 1
    assert by["cathy"] == 6  # every real train recording (the held-out row is not train)
    assert all(n == 2 for s, n in by.items() if not s.startswith(("cathy", "libri-")))
    libri = [s for s in by if s.startswith("libri-")]
    assert len(libri) > 100 and all(by[s] == 1 for s in libri)  # one excerpt per LibriSpeech speaker
    assert utts == codec_utterances(corpus, per_voice=2, seed=0, data_dir=fixtures.parent / "data")  # seeded


def test_extra_corpora_continue_the_sentence_choice_without_overlap():
    recipe = NanoRecipe()
    start = recipe.corpus.sentences
    for cfg in recipe.extra_corpora:  # each picks up where the corpus before it stopped
        assert cfg.skip_sentences == start and cfg.heldout_sentences == 0 and not cfg.real
        assert cfg.seed == recipe.corpus.seed and cfg.sources == recipe.corpus.sources
        start += cfg.sentences


def test_more_extra_corpus_folders_than_extra_corpora_is_an_error():
    with pytest.raises(ValueError, match="3 extra corpus folders for 2 extra corpora"):
        replace(NanoRecipe(), extra_corpus_dirs=("a", "b", "c"))  # refused before any step runs


def test_decoder_utterances_cap_the_train_subset_and_hold_out_other_sentences(tmp_path, fixtures):
    corpus = small_corpus(tmp_path, fixtures)
    rows = [json.loads(line) for line in (corpus / "utterances.jsonl").read_text().splitlines()]
    held = [{**r, "text": f"held out {i}"} for i, r in enumerate(rows[:12])]
    (corpus / "heldout_text.jsonl").write_text("".join(json.dumps(r) + "\n" for r in held[:10]))
    (corpus / "cathy_test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in held[10:]))
    recipe = replace(NanoRecipe(), decoder_utterances_per_voice=3, decoder_real_utterances=4, decoder_heldout=6)
    data = fixtures.parent / "data"
    train, heldout = decoder_utterances(corpus, recipe, data)
    by: dict[str, int] = {}
    for u in train:
        by[u.speaker] = by.get(u.speaker, 0) + 1
    assert by["cathy"] == 4 and all(n == 3 for s, n in by.items() if not s.startswith(("cathy", "libri-")))
    assert sum(s.startswith("libri-") for s in by) > 100  # every LibriSpeech excerpt
    assert len(heldout) == 6 and {u.audio for u in heldout[-1:]} == {str(corpus / held[10]["audio"])}
    assert (train, heldout) == decoder_utterances(corpus, recipe, data)  # seeded


def test_final_decoder_step_trains_a_new_decoder_on_compact_features_and_keeps_the_rest(tmp_path, fixtures,
                                                                                        nano_config):
    from gpa.codecs.nano import NanoCodec

    corpus = small_corpus(tmp_path, fixtures)
    rows = [json.loads(line) for line in (corpus / "utterances.jsonl").read_text().splitlines()]
    (corpus / "heldout_text.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[6:10]))
    (corpus / "cathy_test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:2]))
    codec_dir = tmp_path / "codec"
    torch.manual_seed(0)
    NanoCodec(nano_config).save(codec_dir / "speaker", int8=False)  # the speaker stage's output
    d = NanoRecipe()
    recipe = replace(d, workers=1, decoder=dict(decoder_dim=48, token_blocks=1, mel_blocks=2),
                     decoder_training=replace(d.decoder_training, max_steps=3, eval_every=1, batch_size=2, segment=8),
                     decoder_utterances_per_voice=1, decoder_real_utterances=2, decoder_heldout=6)
    steps: list[str] = []
    train_final_decoder(corpus, codec_dir, recipe, steps.append, progress=False)
    # 5 synthetic voices x 1 + 2 of cathy; 4 held-out sentences (all there are) + 6 // 6 of cathy
    assert any("compact features of 7 + 5 held-out utterances" in m for m in steps), steps
    final, speaker = NanoCodec.from_dir(codec_dir / "final"), NanoCodec.from_dir(codec_dir / "speaker")
    assert (final.config.decoder_dim, final.config.token_blocks, final.config.mel_blocks) == (48, 1, 2)
    kept = {k: v for k, v in speaker.state_dict().items() if not k.startswith("decoder.")}
    assert all(torch.equal(v, final.state_dict()[k]) for k, v in kept.items())  # codebooks, speaker, vocoder
    done = json.loads((codec_dir / "final" / ".done").read_text())
    assert done["steps"] == 3 and [h["step"] for h in done["history"]] == [1, 2, 3]
