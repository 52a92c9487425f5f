"""OpenMP thread pools and the threads that own them.

torch's CPU kernels (and gpa.native's) run parallel regions through OpenMP, and libgomp gives every thread that
runs one its own pool of worker threads, kept until that thread exits. When more OpenMP threads are alive than
the process has CPUs, libgomp stops spinning at its barriers (its "throttled" mode) and every parallel region
waits on kernel wake-ups instead: with one idle pool left on the main thread by model loading, the 0.3B int4
decode step on the engine's thread took ~14 ms instead of ~6 (2 cores). :func:`release_thread_pool` ends the
calling thread's pool; the engine calls it for the thread that starts it, and threads that do occasional torch
work beside a decode loop call it after each job (or run with one thread, or on a short-lived thread).
"""

from __future__ import annotations

import ctypes
import logging
import sys
from functools import cache

logger = logging.getLogger(__name__)

_OMP_PAUSE_SOFT = 1  # omp_pause_soft: end the pool's threads, keep the runtime's state


@cache
def _pause_function() -> ctypes._CFuncPtr | None:  # type: ignore[name-defined]
    """``omp_pause_resource_all`` (OpenMP 5.0) of the OpenMP runtime torch loaded, or None (not Linux, no
    runtime found, or one without it)."""
    if not sys.platform.startswith("linux"):
        return None
    import torch  # noqa: F401 (loads the OpenMP runtime torch was built with)

    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if "/" in line}
    except OSError:
        return None
    for path in sorted(paths):
        name = path.rsplit("/", 1)[-1]
        if name.startswith(("libgomp", "libomp", "libiomp")):
            try:
                fn = ctypes.CDLL(path).omp_pause_resource_all
            except (OSError, AttributeError):
                continue
            fn.argtypes, fn.restype = [ctypes.c_int], ctypes.c_int
            return fn
    logger.debug("no OpenMP runtime with omp_pause_resource_all found")
    return None


def release_thread_pool() -> bool:
    """End the OpenMP worker threads of the calling thread's pool (a later parallel region on this thread starts
    a new one). Returns False where that is not possible here (see :func:`_pause_function`)."""
    fn = _pause_function()
    return fn is not None and fn(_OMP_PAUSE_SOFT) == 0
