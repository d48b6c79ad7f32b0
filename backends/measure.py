"""Latency measurement on ONNX Runtime, honest enough to compare two models.

Models are timed side by side in interleaved blocks (A B, then B A, ...) after a warm-up, with a
short pause between blocks: slow drift (thermal, other processes) and idle ORT threads spinning
on the cores hit every model equally. The ratio is the median over blocks of the per-block ratio
of medians, which is robust to a block disturbed by something else.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from onnx_prune.backends.ort import make_session

STEADY = 1.25  # block medians of one model within this factor: the machine kept its speed


@dataclass
class Latency:
    median_ms: float
    p10_ms: float
    p90_ms: float
    runs: int
    samples_ms: list = field(default_factory=list, repr=False)

    def to_dict(self) -> dict:
        return {"median_ms": self.median_ms, "p10_ms": self.p10_ms, "p90_ms": self.p90_ms, "runs": self.runs}


@dataclass
class Comparison:
    latencies: list  # one Latency per model
    ratio: float | None  # latency of the first model / the second, measured side by side
    ratio_spread: tuple | None  # (p10, p90) of the per-block ratios
    provider: str
    threads: int | None
    speed_change: float = 1.0  # slowest / fastest block median of a model, the worst model

    @property
    def steady(self) -> bool:
        """False when a model's speed changed during the measurement (a slow spell of the
        machine, another process): then the models may not have been hit equally."""
        return self.speed_change <= STEADY


def _run_block(sess, feeds, n) -> list:
    out = []
    for _ in range(n):
        t = time.perf_counter()
        sess.run(None, feeds)
        out.append((time.perf_counter() - t) * 1e3)
    return out


def measure(models, feeds, provider="cpu", threads=None, warmup=5, blocks=12, min_block_s=0.15,
            max_runs_per_block=50, pause_s=0.05, sessions=None) -> Comparison:
    """Median latency of each model (ONNX protos, paths or bytes) on the same feeds.

    `feeds` is one dict, or a list with one dict per model (models may differ in inputs)."""
    sessions = sessions or [make_session(m, provider=provider, threads=threads) for m in models]
    feeds_list = feeds if isinstance(feeds, list) else [feeds] * len(sessions)
    for sess, f in zip(sessions, feeds_list):
        _run_block(sess, f, warmup)
    # runs per block sized so that one block of the slowest model lasts about min_block_s
    probe = max(float(np.median(_run_block(s, f, 3))) for s, f in zip(sessions, feeds_list))
    per_block = int(np.clip(min_block_s * 1e3 / max(probe, 1e-3), 3, max_runs_per_block))
    samples = [[] for _ in sessions]
    block_medians = [[] for _ in sessions]
    order = list(range(len(sessions)))
    for b in range(blocks):
        for i in order if b % 2 == 0 else order[::-1]:
            ts = _run_block(sessions[i], feeds_list[i], per_block)
            samples[i].extend(ts)
            block_medians[i].append(float(np.median(ts)))
            time.sleep(pause_s)
    lat = [Latency(float(np.median(s)), float(np.percentile(s, 10)), float(np.percentile(s, 90)), len(s), s)
           for s in samples]
    ratio = spread = None
    if len(sessions) >= 2:
        per_block_ratio = np.array(block_medians[0]) / np.array(block_medians[1])
        ratio = float(np.median(per_block_ratio))
        spread = (float(np.percentile(per_block_ratio, 10)), float(np.percentile(per_block_ratio, 90)))
    change = max(max(m) / max(min(m), 1e-9) for m in block_medians)
    return Comparison(lat, ratio, spread, provider, threads, change)
