"""Hand the memory a phase freed back to the operating system.

glibc keeps freed heap pages for reuse: after canonicalizing BERT-base (435 MB of weights) the
process held 1.64 GB, of which 0.73 GB were copies already freed (a model being folded, a
serialized copy for shape inference). Other processes on the machine, and the next phase's
ONNX Runtime sessions, need that memory more than this heap does.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc
import sys


@functools.lru_cache(maxsize=1)
def _malloc_trim():
    """glibc's malloc_trim, or None (macOS, Windows, musl)."""
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):
        return None


def release() -> None:
    gc.collect()
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def peak_mb() -> float | None:
    """The process's peak resident memory so far, in MB (None where the OS does not say)."""
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (2**20 if sys.platform == "darwin" else 2**10), 1)  # bytes on macOS, KB on Linux


# a compile's peak resident memory per byte of weights, measured on BERT-base (2.96 GB for 435 MB)
# and BERT-large (10.4 GB for 1.3 GB): the canonical and pruned models, and two ONNX Runtime
# sessions at once while a speedup is measured
COMPILE_PEAK_PER_WEIGHT_BYTE = 8
# with calibration data the error database's Gram matrices stay for the recovery: a 2.24 GB BERT
# (42 layers of hidden 1024) with 32 sequences peaked at 21.4 GB, data-free at 12.1 GB
CALIBRATED_PEAK_PER_WEIGHT_BYTE = 10


def available_mb() -> float | None:
    """Memory the system can give without swapping (Linux's MemAvailable), in MB; None elsewhere."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 1024
    except (OSError, ValueError):
        pass
    return None


def shortfall_warning(weight_bytes: int, available: float | None = None, calibrated=False) -> str | None:
    """A warning when a compile of a model with `weight_bytes` of weights is likely to need more
    memory than is available (the system's out-of-memory killer ends a process without a word)."""
    available = available_mb() if available is None else available
    factor = CALIBRATED_PEAK_PER_WEIGHT_BYTE if calibrated else COMPILE_PEAK_PER_WEIGHT_BYTE
    need = factor * weight_bytes / 2**20
    if available is None or need <= available:
        return None
    return (f"this compile may need about {need / 1024:.1f} GB of memory ({factor}x the "
            f"model's {weight_bytes / 2**30:.2f} GB of weights) and {available / 1024:.1f} GB is available: "
            "close other programs, or expect the system to stop it")
