"""Thin HTTP handlers: check the content type, hand the validated request to :class:`Serving`."""

from __future__ import annotations

import time
from importlib import resources
from typing import Annotated

from fastapi import APIRouter, Depends, Form, Request
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response

from gpa.server.errors import APIError
from gpa.server.protocol import (
    ConversionForm,
    ErrorResponse,
    ModelCard,
    ModelList,
    SpeechRequest,
    TranscriptionForm,
    VoiceDeleted,
    VoiceForm,
    VoiceInfo,
)
from gpa.server.serving import Serving
from gpa.server.voices import BuiltinVoiceInfo, VoiceListing

router = APIRouter()
ERRORS = {code: {"model": ErrorResponse} for code in (400, 401, 403, 404, 409, 413, 415, 422, 429, 503, 504)}


def serving(request: Request) -> Serving:
    return request.app.state.serving


def _content_type(*allowed: str):  # noqa: ANN202 - a FastAPI dependency factory
    def check(request: Request) -> None:
        given = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if given not in allowed:
            raise APIError(415, f"Content-Type must be {' or '.join(allowed)}, got {given or 'none'!r}",
                           code="unsupported_media_type")
    return Depends(check)


JSON = _content_type("application/json")
MULTIPART = _content_type("multipart/form-data", "application/x-www-form-urlencoded")
Service = Annotated[Serving, Depends(serving)]


@router.post("/v1/audio/speech", dependencies=[JSON], responses=ERRORS,
             response_class=Response, summary="Text to speech in a saved or uploaded voice")
async def speech(body: SpeechRequest, request: Request, svc: Service) -> Response:
    return await svc.speech(body, request)


@router.post("/v1/audio/transcriptions", dependencies=[MULTIPART], responses=ERRORS, summary="Speech to text")
async def transcriptions(form: Annotated[TranscriptionForm, Form()], request: Request, svc: Service) -> Response:
    return await svc.transcription(form, request)


@router.post("/v1/audio/conversions", dependencies=[MULTIPART], responses=ERRORS, response_class=Response,
             summary="Voice conversion: the source's words in another voice")
async def conversions(form: Annotated[ConversionForm, Form()], request: Request, svc: Service) -> Response:
    return await svc.conversion(form, request)


@router.get("/v1/audio/voices", responses=ERRORS)
async def list_voices(svc: Service) -> VoiceListing:
    return await svc.blocking(svc.voices.listing)


@router.post("/v1/audio/voices", dependencies=[MULTIPART], responses=ERRORS, status_code=201)
async def create_voice(form: Annotated[VoiceForm, Form()], svc: Service) -> VoiceInfo:
    return await svc.create_voice(form)


@router.get("/v1/audio/voices/{voice_id:path}", responses=ERRORS)
async def get_voice(voice_id: str, svc: Service) -> VoiceInfo | BuiltinVoiceInfo:
    info = await svc.blocking(svc.voices.info, voice_id, "voice_id")
    return info


@router.delete("/v1/audio/voices/{voice_id:path}", responses=ERRORS)
async def delete_voice(voice_id: str, svc: Service) -> VoiceDeleted:
    await svc.blocking(svc.voices.delete, voice_id)
    return VoiceDeleted(id=voice_id)


@router.get("/v1/models")
async def models(svc: Service) -> ModelList:
    return ModelList(data=[ModelCard(id=svc.settings.model_name, created=svc.started)])


@router.get("/v1/models/{model_id}", responses=ERRORS)
async def model(model_id: str, svc: Service) -> ModelCard:
    svc.check_model(model_id)
    return ModelCard(id=model_id, created=svc.started)


@router.get("/health")
async def health(svc: Service) -> JSONResponse:
    load = svc.engine.load
    ok = svc.engine_running
    body = {"status": "ok" if ok else "unavailable", "model": svc.settings.model_name, **load,
            "uptime_s": round(time.time() - svc.started, 1)}
    return JSONResponse(body, status_code=200 if ok else 503)


@router.get("/metrics", response_class=PlainTextResponse)
async def metrics(svc: Service) -> PlainTextResponse:
    return PlainTextResponse(svc.metrics.render(), media_type="text/plain; version=0.0.4")


@router.get("/", response_class=HTMLResponse, include_in_schema=False)
async def page() -> HTMLResponse:
    return HTMLResponse(resources.files("gpa.server").joinpath("static/index.html").read_text(encoding="utf-8"))
