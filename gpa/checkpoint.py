"""One checkpoint directory in the official GPA layout -> every sub-path, checked before anything loads."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from gpa.config import ModelConfig
from gpa.model import GPALM
from gpa.quant import QUANT_MODES, quantize_int8
from gpa.weights import CheckpointError, load_strict, read_safetensors

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Checkpoint:
    """Paths of an official GPA checkpoint directory."""

    root: Path

    @property
    def llm_config(self) -> Path:
        return self.root / "config.json"

    @property
    def llm_weights(self) -> Path:
        return self.root / "model.safetensors"

    @property
    def tokenizer(self) -> Path:
        return self.root / "tokenizer.json"

    @property
    def bicodec(self) -> Path:
        return self.root / "BiCodec"

    @property
    def glm(self) -> Path:
        return self.root / "glm-4-voice-tokenizer"

    def required_files(self) -> list[Path]:
        return [
            self.llm_config, self.llm_weights, self.tokenizer,
            self.bicodec / "config.yaml", self.bicodec / "model.safetensors",
            self.bicodec / "wav2vec2-large-xlsr-53" / "config.json",
            self.bicodec / "wav2vec2-large-xlsr-53" / "model.safetensors",
            self.glm / "config.json", self.glm / "model.safetensors",
        ]

    @classmethod
    def open(cls, root: str | Path) -> Checkpoint:
        """Check that ``root`` has every file GPA needs; the error lists all that are missing."""
        root = Path(root).expanduser()
        if not root.is_dir():
            raise CheckpointError(f"checkpoint directory not found: {root}")
        ckpt = cls(root)
        missing = [str(p.relative_to(root)) for p in ckpt.required_files() if not p.is_file()]
        if missing:
            raise CheckpointError(f"{root} is not a complete GPA checkpoint; missing: {', '.join(missing)}")
        return ckpt


def load_lm(ckpt: Checkpoint, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
            quantize: str = "none") -> GPALM:
    """Build the LLM from ``config.json`` and load ``model.safetensors`` strictly.

    Args:
        quantize: "none", or "int8" for weight-only int8 linear layers (bf16 activations; ``dtype``
            is then bfloat16 whatever was asked).
    """
    if quantize not in QUANT_MODES:
        raise ValueError(f"unknown quantization {quantize!r}; expected one of {QUANT_MODES}")
    try:
        cfg = ModelConfig.from_hf(ckpt.llm_config)
    except (ValueError, KeyError) as e:
        raise CheckpointError(f"bad LLM config {ckpt.llm_config}: {e}") from e
    with torch.device("meta"):
        model = GPALM(cfg)
    model = model.to_empty(device="cpu")
    state = read_safetensors(ckpt.llm_weights)
    # HF saves tied models without lm_head; a copy of the embedding under lm_head is harmless.
    ignore = ("lm_head.",) if cfg.tie_word_embeddings else ()
    load_strict(model, state, str(ckpt.llm_weights), ignore_unexpected=ignore)
    logger.info("loaded LLM: %d layers, hidden %d, vocab %d", cfg.num_hidden_layers, cfg.hidden_size, cfg.vocab_size)
    if quantize == "int8":
        dtype = torch.bfloat16
    model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
    if quantize == "int8":
        quantize_int8(model)
        model.weight_quant = "int8"
    return model
