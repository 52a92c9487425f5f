"""The OpenAI-compatible HTTP server (``gpa serve``): needs the ``server`` extra (fastapi, uvicorn)."""

from gpa.server.app import create_app
from gpa.server.settings import ServerSettings, default_voices_dir

__all__ = ["ServerSettings", "create_app", "default_voices_dir"]
