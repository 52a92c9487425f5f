"""gpa's C++ CPU kernels for one-token decode steps, compiled on first use (``decode.cpp``).

A decode step at one or a few rows is dominated on a CPU by per-op overhead and the KV-cache read,
not by arithmetic: torch runs ~40 small ops per layer. ``decode.cpp`` does a layer's work between its
matrix products in three calls (QK-norm + RoPE + cache write + attention; residual add + RMSNorm;
SwiGLU) and reads a bfloat16 cache directly. The matrix products stay torch's (dense, int8, int4).

The extension is built with torch's ``cpp_extension`` (a C++ compiler and ninja are needed; ~30 s
once, then cached under ``$GPA_NATIVE_DIR`` or torch's extensions directory). :func:`load` returns
None, with the reason logged once, where that fails; callers then keep torch's path.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
from pathlib import Path
from types import ModuleType

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("decode.cpp")
_lock = threading.Lock()
_state: dict[str, ModuleType | str] = {}  # "module" once built, or "error": why it cannot be


def unavailable_reason() -> str | None:
    """Why the kernels cannot be built here (None when they might be), without building them."""
    if os.environ.get("GPA_NATIVE", "1") == "0":
        return "disabled by GPA_NATIVE=0"
    if "error" in _state:
        return str(_state["error"])
    missing = [tool for tool in ("c++", "ninja") if shutil.which(tool) is None]
    if "ninja" in missing and _pip_ninja():
        missing.remove("ninja")
    if missing:
        return f"needs {' and '.join(missing)} on PATH to compile {SOURCE.name}"
    return None


def _pip_ninja() -> bool:
    """Put the ``ninja`` package's binary on PATH (a venv used without activation lacks it); False if absent."""
    try:
        import ninja
    except ImportError:
        return False
    os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")  # torch's build calls `ninja`
    return True


def load() -> ModuleType | None:
    """The compiled kernels (built on the first call of the process; ~30 s the first time on a machine),
    or None where they cannot be built (the reason is logged once)."""
    with _lock:
        if "module" in _state:
            return _state["module"]  # type: ignore[return-value]
        reason = unavailable_reason()
        if reason is None:
            try:
                _state["module"] = _build()
                return _state["module"]  # type: ignore[return-value]
            except Exception as e:  # noqa: BLE001 (a compiler failure can be anything; fall back, say why)
                reason = _state["error"] = f"building {SOURCE.name} failed: {e}"
        if not _state.get("logged"):
            _state["logged"] = "yes"
            logger.warning("native decode kernels unavailable (%s); using torch's decode path", reason)
        return None


def _build() -> ModuleType:
    from torch.utils import cpp_extension

    directory = os.environ.get("GPA_NATIVE_DIR")
    if directory:
        Path(directory).mkdir(parents=True, exist_ok=True)
    logger.info("loading gpa's native decode kernels (compiled once per machine, ~30 s)")
    # -march=native: the kernels are compiled on the machine that runs them. -fopenmp: at::parallel_for is
    # inlined from ATen's OpenMP header, so without it the loops would run on one thread.
    return cpp_extension.load(name="gpa_native_decode", sources=[str(SOURCE)], build_directory=directory or None,
                              extra_cflags=["-O3", "-march=native", "-fopenmp"], extra_ldflags=["-fopenmp"],
                              verbose=False)
