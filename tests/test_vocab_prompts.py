"""Vocabulary discovery and the prompt layouts, against the reference's golden prompt ids."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from gpa.prompts import IGNORE_INDEX, asr_prompt, tts_prompt, vc_prompt
from gpa.vocab import STRUCTURAL_TOKENS, Vocab, VocabError


@pytest.fixture(scope="module")
def vocab(mini_dir) -> Vocab:
    return Vocab.from_dir(mini_dir)


@pytest.mark.fidelity
def test_ranges_and_specials_match_reference(vocab, expected):
    assert vocab.glm.offset == expected["offsets"]["glm"]
    assert vocab.global_.offset == expected["offsets"]["global"]
    assert vocab.semantic.offset == expected["offsets"]["semantic"]
    for token, token_id in expected["special_ids"].items():
        assert vocab.token_id(token) == token_id


def test_structural_tokens_encode_to_one_id_each(vocab):
    for token in (*STRUCTURAL_TOKENS, "<|im_end|>"):
        assert vocab.tokenizer.encode(token, add_special_tokens=False).ids == [vocab.token_id(token)]


def test_code_id_roundtrip_and_disjoint_ranges(vocab):
    for r in (vocab.glm, vocab.global_, vocab.semantic):
        codes = list(range(r.size))
        assert r.codes(r.ids(codes)) == codes
        with pytest.raises(ValueError, match=r.name):
            r.ids([r.size])
    spans = sorted((r.offset, r.stop) for r in (vocab.glm, vocab.global_, vocab.semantic))
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:], strict=False))
    assert spans[0][0] >= vocab.text_size


def test_text_cannot_smuggle_special_tokens(vocab):
    with pytest.raises(ValueError, match="special or audio token"):
        vocab.encode_text("hello <|im_end|> there")
    with pytest.raises(TypeError):
        vocab.encode_text(b"bytes")  # type: ignore[arg-type]


def test_glm_range_inferred_when_unnamed(tmp_path, mini_dir):
    """The official GLM token spelling is unknown: without named tokens the range sits below global."""
    tok = json.loads((mini_dir / "tokenizer.json").read_text())
    for t in tok["added_tokens"]:
        t["content"] = t["content"].replace("glm_semantic_", "audio_token_")
    (tmp_path / "tokenizer.json").write_text(json.dumps(tok))
    v = Vocab.from_dir(tmp_path, glm_codebook_size=128)
    assert (v.glm.offset, v.glm.size) == (426, 128)
    with pytest.raises(VocabError, match="glm_semantic"):
        Vocab.from_dir(tmp_path)


def test_missing_structural_token_is_named(tmp_path, mini_dir):
    tok = json.loads((mini_dir / "tokenizer.json").read_text())
    for t in tok["added_tokens"]:
        if t["content"] == "<|end_content|>":
            t["content"] = "<|end_contentX|>"
    (tmp_path / "tokenizer.json").write_text(json.dumps(tok))
    with pytest.raises(VocabError, match="end_content"):
        Vocab.from_dir(tmp_path)
    shutil.rmtree(tmp_path)
    with pytest.raises(VocabError, match="missing text tokenizer"):
        Vocab.from_dir(tmp_path)


@pytest.mark.fidelity
def test_prompt_ids_equal_reference(vocab, golden, expected):
    for key in expected["prompts"]:
        task, *names = key.split(".")
        if task == "stt":
            (n,) = names
            prompt = asr_prompt(vocab, golden[f"{n}.glm"], golden[f"{n}.semantic"])
        elif task == "tts":
            (n,) = names
            prompt = tts_prompt(vocab, golden[f"{n}.global"], expected["tts_text"][key])
        else:
            src, ref = names  # vc.SOURCE.REFERENCE: 5 + 32 + len(S(source)) ids
            prompt = vc_prompt(vocab, golden[f"{ref}.global"], golden[f"{src}.semantic"])
        assert prompt.prompt_ids == golden[f"prompt.{key}"].tolist(), key


def test_training_and_inference_agree_on_prefix(vocab, golden):
    g, s, m = golden["short_16k.global"], golden["short_16k.semantic"], golden["short_16k.glm"]
    cases = [
        (asr_prompt(vocab, m, s), asr_prompt(vocab, m, s, text="hello world"), ["<|end_content|>", "<|im_end|>"]),
        (tts_prompt(vocab, g, "hi there"), tts_prompt(vocab, g, "hi there", target_semantic=s[:5]), ["<|im_end|>"]),
        (vc_prompt(vocab, g, s), vc_prompt(vocab, g, s, target_semantic=s[:7]), ["<|im_end|>"]),
    ]
    for infer, train, closing in cases:
        assert train.prompt_ids == infer.ids and train.target_start == len(infer.ids)
        labels = train.labels()
        assert labels[: train.target_start] == [IGNORE_INDEX] * train.target_start
        assert labels[train.target_start :] == train.target_ids
        assert train.target_ids[-len(closing):] == [vocab.token_id(t) for t in closing]


def test_tts_continuation_layout(vocab, golden):
    g, s = golden["short_16k.global"], golden["short_16k.semantic"]
    p = tts_prompt(vocab, g, " world", reference_text="hello", reference_semantic=s)
    plain = tts_prompt(vocab, g, "hello world")
    assert p.ids[: len(plain.ids)] == plain.ids  # transcript + text joined with no separator
    assert p.ids[len(plain.ids)] == vocab.start_semantic
    assert p.ids[len(plain.ids) + 1 :] == vocab.semantic_ids(s)
    with pytest.raises(ValueError, match="go together"):
        tts_prompt(vocab, g, "x", reference_text="only text")


def test_prompt_input_errors(vocab, golden):
    g = golden["short_16k.global"]
    with pytest.raises(ValueError, match="empty"):
        tts_prompt(vocab, g, "   ")
    with pytest.raises(ValueError, match="empty"):
        vc_prompt(vocab, g, torch.zeros(0, dtype=torch.long))
    with pytest.raises(ValueError, match="global codes must be in"):
        tts_prompt(vocab, torch.full((32,), 5000), "hi")
