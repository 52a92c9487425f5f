"""What goes into the engine (requests) and what comes out (events)."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch

from gpa.config import SamplingParams, Task

_ids = itertools.count()


def new_request_id() -> str:
    return f"req-{next(_ids)}"


@dataclass(frozen=True)
class EngineRequest:
    """A prompt to continue, with what its output means."""

    task: Task
    prompt: list[int]  # vocabulary ids (from gpa.prompts)
    params: SamplingParams
    global_codes: torch.Tensor | None = None  # (32,) the voice that decodes TTS/VC audio
    stream: bool = True  # audio in chunks as it is generated, or one chunk at the end
    request_id: str = field(default_factory=new_request_id)

    def __post_init__(self) -> None:
        if self.task is not Task.ASR and self.global_codes is None:
            raise ValueError(f"a {self.task.value} request needs the voice's global codes")


@dataclass(frozen=True)
class TextDelta:
    """New transcript text (ASR)."""

    request_id: str
    text: str


@dataclass(frozen=True)
class AudioChunk:
    """The next consecutive piece of the waveform (TTS, VC)."""

    request_id: str
    samples: np.ndarray  # (N,) float32
    sample_rate: int
    index: int  # 0, 1, 2, ... per request


@dataclass(frozen=True)
class Finished:
    """The request is done; no event follows."""

    request_id: str
    reason: Literal["stop", "length", "cancelled"]
    prompt_tokens: int
    output_tokens: int  # generated ids, the stop token excluded
    text: str | None = None  # the full transcript (ASR)


Event = TextDelta | AudioChunk | Finished


class EngineError(RuntimeError):
    """The engine could not run a request (it failed inside the decode loop or was shut down)."""


class EngineOverloaded(EngineError):
    """The waiting queue is full; try again later."""
