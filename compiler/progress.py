"""Where a compile's time goes: a live status line on stderr and seconds per phase for the report."""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager

from onnx_prune import heap

# phases this long hand their freed memory back (heap.release: 0.1 s of garbage collection with
# torch loaded, noise next to a phase of seconds, not next to a small model's phases)
RELEASE_AFTER_S = 1.0


class Steps:
    def __init__(self, log=lambda msg: None, progress=False):
        self.log = log
        self.seconds: dict[str, float] = {}
        self.peak_mb: dict[str, float] = {}  # the process's resident peak when each phase ended
        self.start = time.time()
        self.bar = None
        if progress:
            from tqdm import tqdm

            # disable=None: a live line on terminals only; logs and pipes get the plain log lines
            self.bar = tqdm(file=sys.stderr, bar_format="{desc} [{elapsed}] {postfix}", dynamic_ncols=True, disable=None)

    @contextmanager
    def __call__(self, name: str):
        began = time.time()
        if self.bar is not None:
            self.bar.set_description_str(name)
            self.bar.set_postfix_str("", refresh=True)
        yield
        if time.time() - began > RELEASE_AFTER_S:
            heap.release()  # what the phase freed (copies of a large model) goes back to the system
        took = time.time() - began
        self.seconds[name] = round(took, 2)
        peak = heap.peak_mb()
        if peak is not None:
            self.peak_mb[name] = peak
        self.note(f"{name}: {took:.1f}s (total {self.total():.1f}s" + (f", peak memory {peak / 1024:.1f} GB)" if peak else ")"))

    def tick(self, message: str):
        """Progress inside a long phase (shown live, not logged)."""
        if self.bar is not None:
            self.bar.set_postfix_str(message, refresh=True)

    def note(self, message: str):
        self.log(message)

    def total(self) -> float:
        return round(time.time() - self.start, 2)

    def close(self):
        if self.bar is not None:
            self.bar.close()
            self.bar = None
