"""Wire types (OpenAI-shaped, plus the cloning and sampling extensions open TTS servers use).

Request models validate types and ranges; limits that come from :class:`ServerSettings` (text
length, durations, sizes) are checked by the serving layer. Every model forbids unknown fields:
an option GPA cannot honour is an error that names it, never silently dropped.
"""

from __future__ import annotations

from typing import Any, Literal

from fastapi import UploadFile
from pydantic import BaseModel, ConfigDict, Field

from gpa.config import DEFAULT_SAMPLING, SamplingParams, Task

AudioFormat = Literal["wav", "pcm", "flac", "mp3", "opus", "aac"]
TranscriptFormat = Literal["json", "text", "srt", "vtt", "verbose_json"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


# --- errors ------------------------------------------------------------------------------------------


class ErrorDetail(BaseModel):
    message: str
    type: str  # invalid_request_error, authentication_error, rate_limit_error, server_error, ...
    param: str | None = None  # the request field at fault
    code: str | None = None  # a machine-readable reason, e.g. voice_not_found


class ErrorResponse(BaseModel):
    """The one error body every route returns (OpenAI's shape)."""

    error: ErrorDetail


# --- sampling ----------------------------------------------------------------------------------------


class SamplingFields(_Strict):
    """Sampling options; anything left out takes the task's default from gpa.config.DEFAULT_SAMPLING."""

    temperature: float | None = Field(None, ge=0.0, le=5.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=1)
    repetition_penalty: float | None = Field(None, gt=0.0, le=10.0)
    max_new_tokens: int | None = Field(None, ge=1)
    seed: int | None = Field(None, ge=0, lt=2**63)

    def to_sampling_params(self, task: Task) -> SamplingParams:
        """The task's defaults with the fields this request set."""
        names = ("temperature", "top_p", "top_k", "repetition_penalty", "max_new_tokens", "seed")
        return DEFAULT_SAMPLING[task].replace(**{k: getattr(self, k) for k in names if getattr(self, k) is not None})


# --- speech ------------------------------------------------------------------------------------------


class VoiceRef(_Strict):
    """OpenAI's custom-voice object: ``{"id": "<saved voice name>"}``."""

    id: str


class SpeechRequest(SamplingFields):
    """``POST /v1/audio/speech`` (JSON)."""

    model: str | None = None  # the served model id (optional: there is one)
    input: str = Field(min_length=1)
    voice: str | VoiceRef | None = None  # a saved voice's name
    instructions: str | None = None  # not supported by GPA: must be empty
    response_format: AudioFormat = "mp3"
    speed: float = Field(1.0, ge=0.25, le=4.0)
    stream_format: Literal["audio", "sse"] | None = None  # audio: chunked bytes as generated; sse: events
    stream: bool | None = None  # True streams chunked audio (like stream_format="audio")
    ref_audio: str | None = None  # base64 or a data: URL of a reference clip (overrides voice)
    ref_text: str | None = None  # the reference clip's transcript: the model then continues it

    @property
    def voice_name(self) -> str | None:
        return self.voice.id if isinstance(self.voice, VoiceRef) else self.voice


class SpeechAudioDelta(BaseModel):
    type: Literal["speech.audio.delta"] = "speech.audio.delta"
    audio: str  # base64 of the next bytes of the response_format stream


class Usage(BaseModel):
    input_tokens: int
    output_tokens: int
    total_tokens: int


class SpeechAudioDone(BaseModel):
    type: Literal["speech.audio.done"] = "speech.audio.done"
    usage: Usage


class StreamError(BaseModel):
    """A failure after a stream started (the status line was already sent)."""

    type: str  # speech.audio.error or error
    error: ErrorDetail


# --- transcription, conversion and voices (multipart forms, file parts included) ----------------------


class TranscriptionForm(SamplingFields):
    """``POST /v1/audio/transcriptions`` (multipart)."""

    file: UploadFile  # the audio (any format libsndfile reads, any rate; long audio is split into segments)
    model: str | None = None
    language: str | None = None  # echoed in verbose_json; GPA's ASR takes no language hint
    prompt: str | None = None  # accepted for compatibility; GPA's ASR takes no text prompt
    response_format: TranscriptFormat = "json"
    stream: bool = False
    timestamp_granularities: list[Literal["segment", "word"]] | None = Field(None, alias="timestamp_granularities[]")


class ConversionForm(SamplingFields):
    """``POST /v1/audio/conversions`` (multipart): say what ``file`` says in another voice."""

    file: UploadFile  # the source speech
    ref_audio: UploadFile | None = None  # a clip of the target voice (or name a saved voice)
    model: str | None = None
    voice: str | None = None  # a saved voice's name (or upload ref_audio)
    response_format: AudioFormat = "wav"
    stream: bool = False  # chunked audio as generated (pcm or wav)
    stream_format: Literal["audio", "sse"] | None = None


class VoiceForm(_Strict):
    """``POST /v1/audio/voices`` (multipart): save a speaker under a name."""

    audio_sample: UploadFile  # a clip of the voice (at most max_clip_seconds)
    name: str = Field(min_length=1, max_length=64)
    ref_text: str | None = None  # the sample's transcript: TTS then continues it (keeps accent)
    consent: str | None = None  # stored as given (e.g. a consent recording id)
    type: Literal["audio_sample"] = "audio_sample"  # OpenAI's voice-creation discriminator


class TranscriptionSegment(BaseModel):
    id: int
    seek: int  # start in 10 ms frames
    start: float
    end: float
    text: str
    temperature: float
    compression_ratio: float


class Transcription(BaseModel):
    text: str
    usage: dict[str, Any] | None = None


class TranscriptionVerbose(BaseModel):
    task: Literal["transcribe"] = "transcribe"
    language: str
    duration: float
    text: str
    segments: list[TranscriptionSegment]
    usage: dict[str, Any] | None = None


# --- voices and models -------------------------------------------------------------------------------


class VoiceInfo(BaseModel):
    """A saved voice (OpenAI's voice object plus the fields vLLM-Omni lists)."""

    id: str
    object: Literal["audio.voice"] = "audio.voice"
    name: str
    type: Literal["audio_sample"] = "audio_sample"
    created_at: int  # Unix seconds
    ref_text: str | None = None
    consent: str | None = None
    file_size: int  # bytes of the uploaded sample
    mime_type: str | None = None
    duration: float  # seconds of the sample


class VoiceList(BaseModel):
    object: Literal["list"] = "list"
    voices: list[str]  # names usable as `voice`
    uploaded_voices: list[VoiceInfo]


class VoiceDeleted(BaseModel):
    id: str
    object: Literal["audio.voice.deleted"] = "audio.voice.deleted"
    deleted: bool = True


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "gpa"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
