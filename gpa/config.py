"""Frozen configuration: the LLM's architecture, the tasks, and per-task sampling defaults (one table)."""

from __future__ import annotations

import dataclasses
import enum
import json
from collections.abc import Iterable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any


def require_fields(cls: type, keys: Iterable[str], what: str) -> None:
    """Raise ValueError naming every key that is not a field of the dataclass ``cls``."""
    names = {f.name for f in fields(cls)}
    unknown = set(keys) - names
    if unknown:
        raise ValueError(f"unknown {what} {sorted(unknown)}; allowed: {sorted(names)}")


class Task(enum.StrEnum):
    """What the prompt layout asks the model to do."""

    ASR = "asr"  # speech -> text (the reference calls it "stt")
    TTS = "tts"  # text + reference voice -> speech (reference "tts-a")
    VC = "vc"  # source speech + reference voice -> speech

    @classmethod
    def parse(cls, value: str | Task) -> Task:
        """Accept a Task, its value, or the reference's names ("stt", "tts-a")."""
        if isinstance(value, Task):
            return value
        aliases = {"stt": "asr", "tts-a": "tts"}
        try:
            return cls(aliases.get(str(value).lower(), str(value).lower()))
        except ValueError:
            raise ValueError(f"unknown task {value!r}; expected one of {[t.value for t in cls]}") from None


@dataclass(frozen=True)
class ModelConfig:
    """The Qwen3 decoder-only LM that GPA uses (read from the checkpoint's config.json)."""

    vocab_size: int  # rows of the embedding / LM head (may exceed the tokenizer's size)
    hidden_size: int  # model width
    intermediate_size: int  # SwiGLU hidden width
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int  # grouped-query attention: heads sharing one K/V
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    max_position_embeddings: int = 32768
    tie_word_embeddings: bool = True  # LM head shares the embedding matrix
    attention_bias: bool = False

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        """Build from a dict with exactly this dataclass's keys (raises on unknown keys)."""
        require_fields(cls, d, "ModelConfig keys")
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_hf(cls, path: str | Path) -> ModelConfig:
        """Read a Hugging Face Qwen3 ``config.json``; only the fields the architecture uses are kept."""
        path = Path(path)
        try:
            d = json.loads(path.read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"missing LLM config: {path}") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON: {e}") from e
        model_type = d.get("model_type")
        if model_type != "qwen3":
            raise ValueError(f"{path}: model_type {model_type!r} is not supported; GPA's LLM is 'qwen3'")
        if d.get("use_sliding_window") or any(t != "full_attention" for t in d.get("layer_types") or []):
            raise ValueError(f"{path}: sliding-window layers are not supported; GPA uses full attention")
        if (d.get("rope_scaling") or {}).get("rope_type", "default") not in ("default", None):
            raise ValueError(f"{path}: rope_scaling {d['rope_scaling']} is not supported")
        d.setdefault("head_dim", d["hidden_size"] // d["num_attention_heads"])
        return cls.from_dict({f.name: d[f.name] for f in fields(cls) if f.name in d})


QUANT_MODES = ("none", "int8", "int4")  # LLM weight-only quantization (gpa.quant)
# The KV cache's storage: "auto" is the model's dtype, int8 under native decoding with bf16 linears (int8/int4
# weights); "int8" keeps int8 codes with a float32 scale per position and head (gpa.kv_cache.KVCache).
KV_CACHE_DTYPES = ("auto", "float32", "bfloat16", "int8")
# The audio tokenizers' precision: exact float32; bfloat16 autocast; int8: bfloat16 with every linear layer of the
# encoders multiplying in int8 (gpa.quant.Int8GemmLinear; needs gpa.native, else bfloat16).
TOKENIZER_DTYPES = ("float32", "bfloat16", "int8")
# How a streaming lookahead below the decoder's is made up (gpa.engine.streaming.StreamConfig.approximate)
STREAM_APPROXIMATIONS = ("commit", "preview")


@dataclass(frozen=True)
class SamplingParams:
    """How to pick each next token. ``temperature == 0`` means greedy."""

    temperature: float = 1.0
    top_k: int | None = None  # keep the k most likely tokens (None: all)
    top_p: float = 1.0  # nucleus: keep the smallest set with this much probability
    repetition_penalty: float = 1.0  # >1 discourages any token already in prompt or output (HF rule)
    max_new_tokens: int = 512  # generation stops here if the end token has not come
    seed: int | None = None  # per-request RNG seed; None draws from torch's global RNG

    def __post_init__(self) -> None:
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be >= 1 or None, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not self.repetition_penalty > 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")

    def replace(self, **overrides: Any) -> SamplingParams:
        """A copy with ``overrides``; unknown names raise (nothing is silently dropped)."""
        require_fields(type(self), overrides, "sampling option(s)")
        return dataclasses.replace(self, **overrides)


# The authors' offline defaults (gpa_inference.py): greedy ASR; TTS/VC sample at T=0.2 with a 1.2
# repetition penalty. We keep their values but lift the 512-token (10.24 s) audio cap: 1500 semantic
# tokens are 30 s of speech.
DEFAULT_SAMPLING: dict[Task, SamplingParams] = {
    Task.ASR: SamplingParams(temperature=0.0, repetition_penalty=1.0, max_new_tokens=512),
    Task.TTS: SamplingParams(temperature=0.2, repetition_penalty=1.2, max_new_tokens=1500),
    Task.VC: SamplingParams(temperature=0.2, repetition_penalty=1.2, max_new_tokens=1500),
}


@dataclass(frozen=True)
class ASRFallback:
    """Whisper's guard against a transcript stuck in a loop: when the text compresses too well (zlib
    ratio above ``compression_ratio_threshold``), decode again at each of ``temperatures`` in turn
    (those above the request's own) until one does not; the last attempt is kept if none passes.
    ``compression_ratio_threshold=None`` turns the guard off."""

    compression_ratio_threshold: float | None = 2.4
    temperatures: tuple[float, ...] = (0.2, 0.4, 0.6, 0.8, 1.0)

    def __post_init__(self) -> None:
        if self.compression_ratio_threshold is not None and not self.compression_ratio_threshold > 1:
            raise ValueError(f"compression_ratio_threshold must be > 1 or None, got {self.compression_ratio_threshold}")
        if any(not t > 0 for t in self.temperatures) or list(self.temperatures) != sorted(self.temperatures):
            raise ValueError(f"fallback temperatures must be increasing and > 0, got {self.temperatures}")

    def needs_retry(self, ratio: float) -> bool:
        """True when a transcript with this compression ratio should be decoded again."""
        return self.compression_ratio_threshold is not None and ratio > self.compression_ratio_threshold

    def retries(self, params: SamplingParams) -> list[SamplingParams]:
        """The sampling settings to try, in order, after ``params`` gave a looping transcript."""
        return [params.replace(temperature=t) for t in self.temperatures if t > params.temperature]


ASR_FALLBACK = ASRFallback()  # whisper's defaults
