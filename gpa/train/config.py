"""Frozen configs for data preparation and training: a JSON/TOML file plus ``--set key=value`` overrides."""

from __future__ import annotations

import dataclasses
import json
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gpa.config import ModelConfig, Task, require_fields

ALL_TASKS = tuple(t.value for t in Task)
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# Architectures for training from scratch; vocab_size always comes from the prepared data's tokenizer.
MODEL_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
                 num_key_value_heads=1, head_dim=32, max_position_embeddings=4096),
    "small": dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=64, max_position_embeddings=4096),
    "medium": dict(hidden_size=320, intermediate_size=960, num_hidden_layers=6, num_attention_heads=5,
                   num_key_value_heads=1, head_dim=64, max_position_embeddings=4096),
}


@dataclass(frozen=True)
class PrepareConfig:
    """``gpa prepare``: manifests -> shards of codes plus an index."""

    checkpoint: str  # GPA checkpoint directory whose tokenizers (text, GLM, BiCodec) are used
    manifests: tuple[str, ...]  # authors' .jsonl manifests and/or plain "audio|text" lists
    out_dir: str  # where shards, index.jsonl, skipped.jsonl and meta.json go
    list_tasks: tuple[str, ...] = ("asr", "tts")  # tasks a plain "audio|text" line is used for
    shard_size: int = 256  # manifest lines per shard (a shard is the unit of resumption)
    batch_size: int = 8  # waveforms per codec call
    max_seconds: float = 60.0  # longer segments are skipped
    max_tokens: int = 2048  # records whose prompt + target is longer are skipped (never truncated)
    device: str = "cpu"  # where the codecs run
    workers: int = 1  # processes encoding shards at once (each loads the codecs and runs torch on one thread)

    def __post_init__(self) -> None:
        _check_tasks(self.list_tasks, "list_tasks")
        if "vc" in self.list_tasks:
            raise ValueError("list_tasks cannot include vc: an 'audio|text' line has no target speech")
        for name in ("shard_size", "batch_size", "max_tokens", "workers"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.manifests:
            raise ValueError("no manifests given")


@dataclass(frozen=True)
class TrainConfig:
    """``gpa train``: everything a run needs; saved into every checkpoint."""

    data: str = ""  # prepared data directory (output of gpa prepare)
    out_dir: str = ""  # run directory: checkpoints/, log.jsonl; a run there is resumed
    init_from: str = ""  # GPA checkpoint directory to fine-tune; empty: train from scratch
    model: str = "tiny"  # from scratch: a preset name (tiny, small) or a ModelConfig JSON file
    task_weights: dict[str, float] = field(default_factory=lambda: {t: 1.0 for t in ALL_TASKS})  # mixing ratios
    eval_fraction: float = 0.05  # share of records (per task, at least one) held out for the evaluation loss
    max_len: int = 2048  # samples longer than this many tokens are left out, never truncated
    batch_size: int = 8  # samples per micro-batch, over all processes together
    grad_accum: int = 1  # micro-batches per optimizer step
    bucket_batches: int = 32  # length bucketing: batches are cut from windows of this many, sorted by length
    max_steps: int = 1000  # optimizer steps
    max_minutes: float = 0.0  # > 0: also stop (and save) after the step that ends this wall-clock budget
    lr: float = 3e-4  # peak learning rate
    min_lr: float = 3e-5  # cosine floor
    warmup_steps: int = 100  # linear warm-up from 0
    weight_decay: float = 0.01  # AdamW, on matrices and embeddings only
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # max global gradient norm; 0 disables clipping
    dtype: str = "auto"  # auto (bf16 autocast where the GPU supports it, else fp32), float32 or bfloat16
    grad_checkpointing: bool = False  # recompute each block in the backward pass (less memory)
    parallel: str = "ddp"  # under torchrun: ddp (replicas) or fsdp (parameters, gradients, optimizer state sharded)
    device: str = "auto"  # auto: the local GPU under torchrun / cuda if available, else cpu
    threads: int = 0  # torch CPU threads in this process (0: torch's default)
    seed: int = 0  # weight init, data order, dropout
    init_std: float = 0.02  # normal init of a model trained from scratch
    lora_rank: int = 0  # > 0: LoRA fine-tuning at this rank, all other weights frozen
    lora_alpha: float = 16.0  # LoRA scale is alpha / rank
    lora_dropout: float = 0.0  # dropout on the LoRA input
    lora_targets: tuple[str, ...] = LORA_TARGETS  # linear layers (by attribute name) that get adapters
    log_every: int = 10  # steps between log lines
    eval_every: int = 200  # steps between held-out evaluations (0: only at the end)
    save_every: int = 200  # steps between checkpoints (the last step is always saved)
    keep_checkpoints: int = 2  # newest checkpoints kept on disk
    cache_prompts: bool = False  # keep every built prompt in memory (fast models, e.g. on a GPU; ~0.3 KB per token)

    def __post_init__(self) -> None:
        _check_tasks(tuple(self.task_weights), "task_weights")
        if not any(w > 0 for w in self.task_weights.values()) or any(w < 0 for w in self.task_weights.values()):
            raise ValueError(f"task_weights must be >= 0 with one > 0, got {self.task_weights}")
        for name in ("batch_size", "grad_accum", "max_steps", "max_len", "bucket_batches", "log_every",
                     "save_every", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.parallel not in ("ddp", "fsdp"):
            raise ValueError(f"parallel must be ddp or fsdp, got {self.parallel!r}")
        if self.threads < 0:
            raise ValueError(f"threads must be >= 0, got {self.threads}")
        if self.dtype not in ("auto", "float32", "bfloat16"):
            raise ValueError(f"dtype must be auto, float32 or bfloat16, got {self.dtype!r}")
        if not 0 <= self.eval_fraction < 1:
            raise ValueError(f"eval_fraction must be in [0, 1), got {self.eval_fraction}")
        unknown = set(self.lora_targets) - set(LORA_TARGETS)
        if unknown:
            raise ValueError(f"unknown lora_targets {sorted(unknown)}; expected some of {LORA_TARGETS}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        """Build from a dict of this dataclass's fields; unknown keys raise."""
        require_fields(cls, d, "TrainConfig keys")
        hints = typing.get_type_hints(cls)
        return cls(**{k: _coerce(v, hints[k], k) for k, v in d.items()})

    def replace(self, **overrides: Any) -> TrainConfig:
        return TrainConfig.from_dict({**self.to_dict(), **overrides})


def _check_tasks(tasks: tuple[str, ...], what: str) -> None:
    unknown = set(tasks) - set(ALL_TASKS)
    if unknown:
        raise ValueError(f"{what}: unknown task(s) {sorted(unknown)}; expected some of {ALL_TASKS}")


def _coerce(value: Any, hint: Any, name: str) -> Any:
    """Check a file or JSON value against the field's type (tuples from lists, ints as floats)."""
    origin = typing.get_origin(hint)
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            raise ValueError(f"{name} must be a list of strings, got {value!r}")
        return tuple(value)
    if origin is dict:
        if not isinstance(value, dict) or not all(isinstance(v, (int, float)) for v in value.values()):
            raise ValueError(f"{name} must be a mapping of names to numbers, got {value!r}")
        return {str(k): float(v) for k, v in value.items()}
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
        raise ValueError(f"{name} must be {hint.__name__}, got {value!r}")
    return value


def parse_override(text: str) -> tuple[str, Any]:
    """``key=value`` -> (key, typed value): strings as is, bools true/false, lists and dicts as JSON."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ValueError(f"override {text!r} is not key=value")
    hints = typing.get_type_hints(TrainConfig)
    if key not in hints:
        raise ValueError(f"unknown TrainConfig key {key!r}; known: {sorted(hints)}")
    hint = hints[key]
    if hint is str:
        return key, raw
    if hint is bool:
        if raw.lower() not in ("true", "false", "1", "0"):
            raise ValueError(f"{key} must be true or false, got {raw!r}")
        return key, raw.lower() in ("true", "1")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ValueError(f"cannot parse {key}={raw!r}: {e}") from e
    return key, _coerce(value, hint, key)


def load_train_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """A TrainConfig from an optional .json/.toml file, then ``key=value`` overrides on top."""
    values: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        try:
            text = path.read_text()
            values = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
        except OSError as e:
            raise ValueError(f"cannot read config file {path}: {e.strerror}") from e
        except (tomllib.TOMLDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"config file {path} is not valid {path.suffix.lstrip('.') or 'JSON'}: {e}") from e
    for item in overrides:
        key, value = parse_override(item)
        values[key] = value
    return TrainConfig.from_dict(values)


def model_config(spec: str, vocab_size: int) -> ModelConfig:
    """The ModelConfig of a preset name or a JSON file (its vocab_size, if any, must match the data's)."""
    if spec in MODEL_PRESETS:
        return ModelConfig(vocab_size=vocab_size, **MODEL_PRESETS[spec])
    path = Path(spec)
    if not path.is_file():
        raise ValueError(f"model {spec!r} is neither a preset ({sorted(MODEL_PRESETS)}) nor a JSON file")
    d = json.loads(path.read_text())
    d.setdefault("vocab_size", vocab_size)
    cfg = ModelConfig.from_hf(path) if "model_type" in d else ModelConfig.from_dict(d)  # HF config.json or ours
    if cfg.vocab_size != vocab_size:
        raise ValueError(f"{path}: vocab_size {cfg.vocab_size} differs from the data's {vocab_size}")
    return cfg
