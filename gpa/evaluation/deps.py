"""Importing the judges' optional packages with an error that names the extra to install."""

from __future__ import annotations

import importlib
from types import ModuleType

EXTRA_HINT = "pip install 'gpa[eval]'"


class JudgeUnavailable(ImportError):
    """A judge's package is missing or cannot be imported."""


def require(module: str, purpose: str) -> ModuleType:
    """Import ``module`` for ``purpose`` or raise :class:`JudgeUnavailable` saying how to install it."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name == "pkg_resources":
            # resemblyzer imports webrtcvad; the webrtcvad 2.0.10 sdist's module needs pkg_resources, gone
            # from setuptools >= 81. webrtcvad-wheels ships the same module without it.
            raise JudgeUnavailable(
                f"{purpose}: {module} imports a webrtcvad module that needs pkg_resources (the webrtcvad 2.0.10 "
                "sdist's); install the same module from webrtcvad-wheels over it: "
                "pip install --force-reinstall --no-deps webrtcvad-wheels") from e
        raise JudgeUnavailable(f"{purpose} needs the package providing {module!r} ({e}): {EXTRA_HINT}") from e
