"""One checkpoint directory in the official GPA layout -> every sub-path, checked before anything loads."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from gpa.codecs.bicodec import BiCodec
from gpa.codecs.glm import GLMTokenizer
from gpa.codecs.nano import WEIGHT_FILES as NANO_WEIGHT_FILES
from gpa.codecs.nano import NanoASRTokenizer, NanoCodec
from gpa.config import QUANT_MODES, ModelConfig
from gpa.model import GPALM
from gpa.quant import quantize_weights
from gpa.weights import CheckpointError, load_strict, read_safetensors

logger = logging.getLogger(__name__)

BUNDLED_MODEL = Path(__file__).parent / "models" / "gpa-nano"  # the default model, shipped in the package


def resolve_model(path: str | Path | None) -> Path:
    """The checkpoint directory to load: ``path`` when given, else ``$GPA_MODEL``, else the bundled GPA-nano.

    Only the choice is made here; :meth:`Checkpoint.open` checks that the directory is complete.
    """
    if path is not None and str(path).strip():
        return Path(path).expanduser()
    env = os.environ.get("GPA_MODEL", "").strip()
    if env:
        return Path(env).expanduser()
    if BUNDLED_MODEL.is_dir():
        return BUNDLED_MODEL
    raise CheckpointError(f"no model given, and the bundled GPA-nano is not installed at {BUNDLED_MODEL}: "
                          f"pass --model DIR (a GPA checkpoint directory) or set GPA_MODEL")


INFERENCE_FILE = "inference.json"  # optional: per device type, the speed settings used when none are given
INFERENCE_KEYS = ("quantize", "vocoder_dtype", "dtype", "tokenizer_dtype", "native_decode", "kv_cache_dtype",
                  "int8_prefill")
_SWITCHES = ("native_decode", "int8_prefill")  # inference.json's true/false settings


@dataclass(frozen=True)
class Checkpoint:
    """Paths of a GPA checkpoint directory: the official layout, or GPA-nano's (``nano-codec/`` instead of
    ``BiCodec/`` and ``glm-4-voice-tokenizer/``)."""

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

    @property
    def nano_codec(self) -> Path:
        return self.root / "nano-codec"

    @property
    def kind(self) -> str:
        """"nano" when the directory holds a GPA-nano codec (``nano-codec/``), else "official"."""
        return "nano" if (self.nano_codec / "config.json").is_file() else "official"

    @property
    def inference_file(self) -> Path:
        return self.root / INFERENCE_FILE

    def inference_defaults(self, device: torch.device) -> dict[str, str | bool]:
        """The speed settings the checkpoint asks for on ``device``'s type when the caller gives none, from its
        optional ``inference.json`` ({"cpu": {"quantize": "int8", "vocoder_dtype": "bfloat16", "dtype": "float32",
        "native_decode": true}}); {} without."""
        if not self.inference_file.is_file():
            return {}
        try:
            table = json.loads(self.inference_file.read_text())
        except ValueError as e:
            raise CheckpointError(f"{self.inference_file} is not valid JSON: {e}") from e
        chosen = table.get(device.type, {}) if isinstance(table, dict) else None
        if not isinstance(chosen, dict) or set(chosen) - set(INFERENCE_KEYS):
            raise CheckpointError(f"{self.inference_file}: expected {{device type: {{setting: value}}}} with "
                                  f"settings among {INFERENCE_KEYS}, got {table!r}")
        wrong = {k: v for k, v in chosen.items() if not isinstance(v, bool if k in _SWITCHES else str)}
        if wrong:
            raise CheckpointError(f"{self.inference_file}: {' and '.join(_SWITCHES)} take true or false, the others "
                                  f"a string; got {wrong}")
        return dict(chosen)

    def codec_dirs(self) -> list[Path]:
        """The codec directories a copy of this checkpoint needs."""
        return [self.nano_codec] if self.kind == "nano" else [self.bicodec, self.glm]

    def required_files(self) -> list[Path]:
        common = [self.llm_config, self.llm_weights, self.tokenizer]
        if self.kind == "nano":
            return [*common, self.nano_codec / "config.json",
                    *(self.nano_codec / name for name in NANO_WEIGHT_FILES)]
        return [
            *common,
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


def load_codecs(ckpt: Checkpoint, device: str | torch.device = "cpu") -> tuple[Any, Any]:
    """The checkpoint's speech codec (BiCodec's role) and ASR tokenizer (GLM-4-Voice's role).

    Official checkpoints give (:class:`~gpa.codecs.bicodec.BiCodec`, :class:`~gpa.codecs.glm.GLMTokenizer`);
    GPA-nano gives (:class:`~gpa.codecs.nano.NanoCodec`, :class:`~gpa.codecs.nano.NanoASRTokenizer`),
    which offer the same methods.
    """
    if ckpt.kind == "nano":
        codec = NanoCodec.from_dir(ckpt.nano_codec, device=device)
        return codec, NanoASRTokenizer(codec)
    glm = GLMTokenizer.from_dir(ckpt.glm, device=device)
    return BiCodec.from_dir(ckpt.bicodec, device=device), glm


def load_lm(ckpt: Checkpoint, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
            quantize: str = "none", int8_prefill: bool = False) -> GPALM:
    """Build the LLM from ``config.json`` and load ``model.safetensors`` strictly.

    Args:
        quantize: "none", or "int8" / "int4" (CPU) for weight-only quantized linear layers; ``dtype`` stays the dtype of
            the activations, the embedding and the KV cache (see :meth:`gpa.api.GPA.from_dir` for the
            default).
        int8_prefill: with int8 / int4, passes over several tokens per row (prefills) multiply in int8, activations
            quantized per token (:func:`gpa.quant.int8_products`; the layers keep int8 GEMM weights too).
    """
    if quantize not in QUANT_MODES:
        raise ValueError(f"unknown quantization {quantize!r}; expected one of {QUANT_MODES}")
    if int8_prefill and quantize == "none":
        raise ValueError("int8_prefill needs quantized weights (quantize int8 or int4)")
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
    model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
    if quantize != "none":
        quantize_weights(model, quantize, int8_gemm=int8_prefill)
        model.weight_quant, model.int8_prefill = quantize, int8_prefill
    return model
