"""A GPA vocabulary for a model trained from scratch: byte-level BPE text plus GPA's special and audio tokens.

The layout follows the official one (text, chat specials, the eight structural tokens, then the three
audio ranges in the order GLM, global, semantic) with every audio token named, so
:class:`gpa.vocab.Vocab` discovers all of it by name.
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from gpa.vocab import END_TOKEN, STRUCTURAL_TOKENS, Vocab

CHAT_SPECIALS = ("<|endoftext|>", "<|im_start|>", END_TOKEN)


def audio_tokens(glm: int, global_: int, semantic: int) -> list[str]:
    """Names of the audio tokens, in vocabulary order."""
    return ([f"<|glm_semantic_{k}|>" for k in range(glm)] + [f"<|bicodec_global_{k}|>" for k in range(global_)]
            + [f"<|bicodec_semantic_{k}|>" for k in range(semantic)])


def build_tokenizer(texts: Iterable[str], text_vocab: int, glm_codes: int, global_codes: int,
                    semantic_codes: int) -> Tokenizer:
    """Train byte-level BPE on ``texts`` (``text_vocab`` ids including the 256 bytes), then add GPA's tokens.

    Returns:
        a tokenizer whose :class:`~gpa.vocab.Vocab` has ranges of the given sizes.
    """
    if text_vocab < 257:
        raise ValueError(f"text_vocab must exceed the 256 byte tokens, got {text_vocab}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=text_vocab, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False, special_tokens=[])
    tok.train_from_iterator(texts, trainer)
    tok.add_special_tokens([*CHAT_SPECIALS, *STRUCTURAL_TOKENS])
    tok.add_special_tokens(audio_tokens(glm_codes, global_codes, semantic_codes))
    vocab = Vocab(tok, source="built tokenizer")  # checks every token GPA needs is there, ranges contiguous
    sizes = (vocab.glm.size, vocab.global_.size, vocab.semantic.size)
    if sizes != (glm_codes, global_codes, semantic_codes):
        raise AssertionError(f"built ranges {sizes} != asked {(glm_codes, global_codes, semantic_codes)}")
    return tok
