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
