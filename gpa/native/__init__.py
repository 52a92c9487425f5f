"""gpa's C++ CPU kernels for one-token decode steps, compiled on first use (``decode.cpp``).

A decode step at one or a few rows is dominated on a CPU by per-op overhead and the KV-cache read,
not by arithmetic: torch runs ~40 small ops per layer. ``decode.cpp`` runs every decoder layer in one
call (QK-norm + RoPE + cache write + attention over a bfloat16 or float32 cache; residual add +
RMSNorm; SwiGLU; the linear layers through torch's dense and int8 kernels and its own int4 product in
integer arithmetic on AVX512-VNNI, which :class:`gpa.quant.Int4Linear` also uses once the kernels are loaded).
BiCodec's bf16 decoder takes its fused Snake activation from here too; prompts and the audio tokenizers take
the flash attention and the int8 products (``int8_linear``).

The extension is compiled once per machine and source version with torch's ``cpp_extension`` (a C++
compiler and ninja are needed, ~30 s) in a private temporary directory, then moved into the cache
(``$GPA_NATIVE_DIR``, default ``~/.cache/gpa/native``) under a name that hashes the source, torch,
Python and the CPU's features (it is built with ``-march=native``). So an interrupted build leaves no
lock behind, and concurrent first uses each build and keep an identical file. :func:`load` returns None,
with the reason logged once, where the kernels cannot be built; callers then keep torch's path.
``GPA_NATIVE=0`` turns them off.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import platform
import shutil
import sys
import tempfile
import threading
from pathlib import Path
from types import ModuleType

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("decode.cpp")
NAME = "gpa_native_decode"
# -march=native: the kernels run where they are compiled (the CPU's features are part of the cache key).
# -fopenmp: at::parallel_for is inlined from ATen's OpenMP header; without it the loops run on one thread.
CFLAGS = ("-O3", "-march=native", "-fopenmp")
FLASH_HEAD_SIZES = (32, 64, 128)  # head sizes prefill_attention (decode.cpp's flash kernel) is built for
_lock = threading.Lock()
_state: dict[str, ModuleType | str] = {}  # "module" once loaded, or "error": why it cannot be


def cache_dir() -> Path:
    return Path(os.environ.get("GPA_NATIVE_DIR") or Path.home() / ".cache" / "gpa" / "native")


def unavailable_reason() -> str | None:
    """Why the kernels cannot be loaded here (None when they might be), without building them."""
    if os.environ.get("GPA_NATIVE", "1") == "0":
        return "disabled by GPA_NATIVE=0"
    if "error" in _state:
        return str(_state["error"])
    if "module" in _state or _cached_path().is_file():
        return None
    missing = [tool for tool in ("c++", "ninja") if shutil.which(tool) is None]
    if "ninja" in missing and _pip_ninja():
        missing.remove("ninja")
    if missing:
        return f"needs {' and '.join(missing)} on PATH to compile {SOURCE.name}"
    return None


def load() -> ModuleType | None:
    """The compiled kernels (built on first use on a machine, ~30 s), or None where they cannot be built or
    loaded (the reason is logged once)."""
    with _lock:
        if "module" in _state:
            return _state["module"]  # type: ignore[return-value]
        reason = unavailable_reason()
        if reason is None:
            try:
                path = _cached_path()
                if not path.is_file():
                    _build(path)
                _state["module"] = _import(path)
                return _state["module"]  # type: ignore[return-value]
            except Exception as e:  # noqa: BLE001 (a compiler or loader failure can be anything: fall back, say why)
                reason = _state["error"] = f"building or loading {SOURCE.name} failed: {e}"
        if not _state.get("logged"):
            _state["logged"] = "yes"
            logger.warning("native decode kernels unavailable (%s); using torch's decode path", reason)
        return None


def loaded() -> ModuleType | None:
    """The kernels if this process has already loaded them (never builds)."""
    module = _state.get("module")
    return module if isinstance(module, ModuleType) else None


def _cached_path() -> Path:
    import torch

    key = hashlib.sha256()
    for part in (SOURCE.read_bytes(), torch.__version__.encode(), sys.version.encode(), " ".join(CFLAGS).encode(),
                 platform.machine().encode(), _cpu_features().encode()):
        key.update(part)
        key.update(b"\0")
    return cache_dir() / f"{NAME}-{key.hexdigest()[:16]}.so"


def _cpu_features() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()


def _pip_ninja() -> bool:
    """Put the ``ninja`` package's binary on PATH (a venv used without activation lacks it); False if absent."""
    try:
        import ninja
    except ImportError:
        return False
    os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")  # torch's build calls `ninja`
    return True


def _build(target: Path) -> None:
    from torch.utils import cpp_extension

    logger.warning("compiling gpa's native decode kernels (once per machine, ~30 s)")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="gpa-native-") as tmp:
        cpp_extension.load(name=NAME, sources=[str(SOURCE)], build_directory=tmp, extra_cflags=list(CFLAGS),
                           extra_ldflags=["-fopenmp"], verbose=False)
        built = Path(tmp) / f"{NAME}.so"
        staged = target.with_name(f".{target.name}.{os.getpid()}")
        shutil.copyfile(built, staged)
        os.replace(staged, target)  # atomic: a reader sees the whole file or none


def _import(path: Path) -> ModuleType:
    import torch  # noqa: F401 (the extension links against libtorch, loaded by importing torch)

    if NAME in sys.modules:  # cpp_extension.load already imported the module it built
        return sys.modules[NAME]
    spec = importlib.util.spec_from_file_location(NAME, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.modules[NAME] = module
    return module


def flash_attention(q, k, v, block: int):  # noqa: ANN001, ANN201 (torch is imported lazily here)
    """q (B, T, H, D), k and v (B, H, S, D) -> (B, T, H, D) through the flash kernel (``prefill_attention``), or
    None where it does not apply: kernels not loaded or without AVX512-BF16, inputs not bfloat16 (the exact
    float32 modes keep torch's kernel), autograd on, or a head size it lacks (32, 64, 128).

    ``block``: which keys the query at position p sees: 0 causal, > 0 causal plus all of its own block of
    ``block`` positions, < 0 all. The audio tokenizers use it in their bfloat16 mode (GLM's block-causal
    encoder, wav2vec2's full attention).
    """
    import torch

    ops = loaded()
    fn = getattr(ops, "prefill_attention", None)
    if (fn is None or q.dtype != torch.bfloat16 or q.device.type != "cpu" or torch.is_grad_enabled()
            or q.shape[-1] not in FLASH_HEAD_SIZES):
        return None
    return fn(q, k.contiguous(), v.contiguous(), block)
