"""``create_app(model, settings)``: the FastAPI application (no globals, nothing parsed at import)."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from gpa import __version__
from gpa.api import GPA
from gpa.engine import Engine
from gpa.server.errors import install_error_handlers
from gpa.server.metrics import Metrics
from gpa.server.middleware import AdmissionMiddleware, ApiKeyMiddleware, BodyLimitMiddleware
from gpa.server.routes import router
from gpa.server.serving import Serving
from gpa.server.settings import ServerSettings
from gpa.server.voices import VoiceStore

logger = logging.getLogger(__name__)


def create_app(model: GPA, settings: ServerSettings | None = None) -> FastAPI:
    """The OpenAI-compatible GPA server for a loaded ``model``.

    The engine is created and started in the app's lifespan (and shut down with it), so one app can
    be started, stopped and started again (e.g. by tests) with the same loaded model.
    """
    settings = settings or ServerSettings()
    voices = VoiceStore(settings.voices_dir)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with Engine(model, settings.engine) as engine:
            app.state.serving = serving = Serving(engine, settings, voices, metrics)
            logger.info("serving %s (%d slots, queue %d); voices in %s", settings.model_name,
                        settings.engine.max_slots, settings.engine.max_queue, settings.voices_dir)
            try:
                yield
            finally:
                serving.engine_running = False
                serving.close()

    app = FastAPI(title="gpa", version=__version__, lifespan=lifespan,
                  description="GPA speech recognition, zero-shot TTS and voice conversion (OpenAI-compatible).")
    metrics = Metrics(lambda: app.state.serving.engine.load)
    install_error_handlers(app)
    app.include_router(router)
    app.add_middleware(BodyLimitMiddleware, limit=settings.max_upload_bytes)
    if settings.api_key:
        app.add_middleware(ApiKeyMiddleware, api_key=settings.api_key)
    app.add_middleware(AdmissionMiddleware, limit=settings.max_concurrent, metrics=metrics)  # outermost
    return app
