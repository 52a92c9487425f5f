"""A multi-speaker speech corpus from offline voices and text: parallel by construction, with fixed held-out splits.

``build_corpus(out_dir, CorpusConfig(...))`` synthesises every chosen sentence in every voice (Debian
espeak-ng, mbrola, flite, festival, pico, RHVoice, plus sox pitch/tempo pseudo-speakers), adds the real
recordings (cathy, LibriSpeech excerpts) and writes one manifest per split. See docs/corpus.md.
"""

from gpa.corpus.build import CorpusConfig, Summary, build_corpus
from gpa.corpus.text import is_heldout, sentence_id, split_key
from gpa.corpus.voices import DEFAULT_VOICES, HELDOUT_VOICES, REGISTRY, Perturbation, Voice

__all__ = ["CorpusConfig", "Summary", "build_corpus", "is_heldout", "sentence_id", "split_key", "DEFAULT_VOICES",
           "HELDOUT_VOICES", "REGISTRY", "Perturbation", "Voice"]
