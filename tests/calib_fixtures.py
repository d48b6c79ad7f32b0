"""Calibration callables for tests (imported by name, as a user's module would be)."""

import numpy as np


def good_batches():
    rng = np.random.default_rng(0)
    return [{"x": rng.standard_normal((2, 3, 8, 8)).astype(np.float32)} for _ in range(3)]


def raises():
    raise RuntimeError("dataset server unreachable")


def empty():
    return []


def wrong_shape():
    return {"x": np.zeros((4, 3, 5, 5), np.float32)}


def returns_a_path():
    return "/data/calib"


def generator_that_fails():
    yield {"x": np.zeros((2, 3, 8, 8), np.float32)}
    raise OSError("lost the connection after one batch")
