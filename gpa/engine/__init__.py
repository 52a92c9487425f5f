"""Continuous-batching inference with streaming audio and text."""

from gpa.engine.backend import Backend, VLLMOptions
from gpa.engine.engine import Engine, EngineConfig
from gpa.engine.request import AudioChunk, EngineError, EngineOverloaded, EngineRequest, Event, Finished, TextDelta
from gpa.engine.streaming import StreamConfig

__all__ = ["AudioChunk", "Backend", "Engine", "EngineConfig", "EngineError", "EngineOverloaded", "EngineRequest",
           "Event", "Finished", "StreamConfig", "TextDelta", "VLLMOptions"]
