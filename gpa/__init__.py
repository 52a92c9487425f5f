"""gpa: GPA (General-Purpose Audio) — ASR, zero-shot TTS and voice conversion with one transformer.

    import gpa
    model = gpa.load()  # $GPA_MODEL, else the bundled GPA-nano; or gpa.load("path/to/GPA-0.3B-preview")
    text = model.asr("speech.wav")
    wav, sr = model.tts("Hello there.", reference="voice.wav")
    wav, sr = model.vc("source.wav", reference="voice.wav")
"""

from gpa.api import GPA, Voice, load
from gpa.config import DEFAULT_SAMPLING, SamplingParams, Task

__version__ = "0.1.0"
__all__ = ["GPA", "DEFAULT_SAMPLING", "SamplingParams", "Task", "Voice", "load", "__version__"]
