"""gpa: GPA (General-Purpose Audio) — ASR, zero-shot TTS and voice conversion with one transformer."""

__version__ = "0.1.0"
