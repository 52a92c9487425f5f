"""A GPA checkpoint directory for a model trained from scratch, before training: codecs, tokenizer and an
LLM at its initial weights. ``gpa prepare`` tokenizes data with it and ``gpa export`` takes its codecs."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer

from gpa.model import GPALM
from gpa.train.config import model_config
from gpa.train.export import hf_config
from gpa.train.loop import init_weights
from gpa.vocab import Vocab

logger = logging.getLogger(__name__)


def seed_checkpoint(out: str | Path, codec_dirs: list[Path], tokenizer: Tokenizer, model: str,
                    init_std: float = 0.02, seed: int = 0) -> Path:
    """Write ``out`` (must not exist): ``tokenizer.json``, ``config.json``, initial ``model.safetensors``
    and copies of ``codec_dirs`` (e.g. a ``nano-codec`` directory).

    Args:
        model: a preset name of :data:`gpa.train.config.MODEL_PRESETS` or a ModelConfig JSON file; its
            vocab_size is the tokenizer's size.
    """
    out = Path(out)
    if out.exists():
        raise FileExistsError(f"{out} already exists")
    vocab = Vocab(tokenizer, source="seed tokenizer")
    cfg = model_config(model, vocab.size)
    torch.manual_seed(seed)
    lm = GPALM(cfg)
    init_weights(lm, init_std)
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tokenizer.save(str(tmp / "tokenizer.json"))
    (tmp / "config.json").write_text(json.dumps(hf_config(cfg, vocab, "float32"), indent=2) + "\n")
    state = {k: v.contiguous() for k, v in lm.state_dict().items() if not (cfg.tie_word_embeddings
                                                                           and k.startswith("lm_head."))}
    save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    for d in codec_dirs:
        shutil.copytree(d, tmp / d.name)
    tmp.rename(out)
    logger.info("seed checkpoint %s: %s, vocab %d", out, model, vocab.size)
    return out
