"""``gpa export``: a training checkpoint -> a checkpoint directory in the official layout.

The result loads with :func:`gpa.load` and with ``transformers.AutoModelForCausalLM`` (a Qwen3
``config.json`` and HF tensor names, which are the model's own). The tokenizer files come from the
prepared data's source checkpoint (checked to be the tokenizer the data was laid out with), and the
codec directories are copied (or symlinked) from it.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from gpa.checkpoint import Checkpoint
from gpa.codecs.glm import GLMConfig
from gpa.codecs.nano import NanoCodecConfig
from gpa.config import ModelConfig
from gpa.train.config import TrainConfig
from gpa.train.lora import merge_lora
from gpa.train.shards import file_sha256
from gpa.train.state import latest_checkpoint, read_meta
from gpa.vocab import Vocab
from gpa.weights import read_safetensors

logger = logging.getLogger(__name__)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def hf_config(cfg: ModelConfig, vocab: Vocab, dtype: str) -> dict[str, Any]:
    """A Hugging Face Qwen3 ``config.json`` for ``cfg``."""
    n = cfg.num_hidden_layers
    return {
        "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3",
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": n, "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads, "head_dim": cfg.head_dim, "hidden_act": "silu",
        "rms_norm_eps": cfg.rms_norm_eps, "rope_theta": cfg.rope_theta, "rope_scaling": None,
        "max_position_embeddings": cfg.max_position_embeddings, "tie_word_embeddings": cfg.tie_word_embeddings,
        "attention_bias": cfg.attention_bias, "attention_dropout": 0.0, "use_sliding_window": False,
        "sliding_window": None, "max_window_layers": n, "layer_types": ["full_attention"] * n,
        "eos_token_id": vocab.end, "pad_token_id": vocab.pad, "use_cache": True, "dtype": dtype,
    }


def _resolve(checkpoint: str | Path) -> Path:
    """A run directory means its newest checkpoint."""
    path = Path(checkpoint)
    if (path / "trainer.json").is_file():
        return path
    found = latest_checkpoint(path)
    if found is None:
        raise FileNotFoundError(f"{path} is neither a training checkpoint nor a run directory with one")
    return found


def _weights(ckpt: Path, meta: dict[str, Any], model_cfg: ModelConfig, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    cfg = TrainConfig.from_dict(meta["config"])
    state = read_safetensors(ckpt / "model.safetensors")
    if cfg.lora_rank:
        state = merge_lora(state, cfg.lora_alpha / cfg.lora_rank)
    if model_cfg.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # HF stores a tied head once, as the embedding
    return {k: v.to(dtype).contiguous() for k, v in state.items()}


def _copy_dir(src: Path, dst: Path, link: bool) -> None:
    if link:
        os.symlink(src.resolve(), dst, target_is_directory=True)
    else:
        shutil.copytree(src, dst)


def export(checkpoint: str | Path, out_dir: str | Path, source: str | Path | None = None, link: bool = False,
           dtype: str = "float32") -> Path:
    """Write ``out_dir`` in the official layout from a training checkpoint (or a run's newest one).

    Args:
        checkpoint: a ``step-N`` checkpoint directory or a run directory.
        out_dir: the new checkpoint directory (must not exist).
        source: the GPA checkpoint to take tokenizer files and codecs from; default: the one the
            training data was prepared with.
        link: symlink the codec directories instead of copying them.
        dtype: float32, bfloat16 or float16 for the LLM weights.
    """
    ckpt = _resolve(checkpoint)
    out = Path(out_dir)
    if out.exists():
        raise FileExistsError(f"{out} already exists")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    meta = read_meta(ckpt)
    src = Checkpoint.open(source or meta["source_checkpoint"])
    if file_sha256(src.tokenizer) != meta["data_tokenizer_sha256"]:
        raise ValueError(f"{src.tokenizer} is not the tokenizer the training data was prepared with")
    model_cfg = ModelConfig.from_dict(meta["model_config"])
    vocab = Vocab.from_dir(src.root, glm_codebook_size=_glm_codebook_size(src))
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    (tmp / "config.json").write_text(json.dumps(hf_config(model_cfg, vocab, dtype), indent=2) + "\n")
    save_file(_weights(ckpt, meta, model_cfg, DTYPES[dtype]), str(tmp / "model.safetensors"), metadata={"format": "pt"})
    for name in TOKENIZER_FILES:
        if (src.root / name).is_file():
            shutil.copyfile(src.root / name, tmp / name)
    for codec_dir in src.codec_dirs():
        _copy_dir(codec_dir, tmp / codec_dir.name, link)
    if (src.root / "voices").is_dir():  # built-in reference voices (gpa.voices)
        _copy_dir(src.root / "voices", tmp / "voices", link)
    os.replace(tmp, out)
    logger.info("exported %s (step %d) to %s", ckpt, meta["step"], out)
    return out


def _glm_codebook_size(ckpt: Checkpoint) -> int:
    if ckpt.kind == "nano":
        return NanoCodecConfig.from_dict(json.loads((ckpt.nano_codec / "config.json").read_text())).asr_codebook_size
    path = ckpt.glm / "config.json"
    return GLMConfig.from_dict(json.loads(path.read_text()), str(path)).codebook_size
