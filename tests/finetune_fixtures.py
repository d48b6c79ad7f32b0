"""A tiny model and data callables for the finetune tests (imported by name, as a user's module
would be: `--data finetune_fixtures:good`)."""

import numpy as np
from tiny_models import residual_cnn

BATCH = (4, 3, 8, 8)


def tiny_cnn(seed=0):
    """The shared residual CNN without BatchNorm: conv1/conv2 share a channel group (the Add)."""
    return residual_cnn(seed, batchnorm=False)


def _x(rng):
    return rng.standard_normal(BATCH).astype(np.float32)


def good():
    rng = np.random.default_rng(0)
    return [{"x": _x(rng)} for _ in range(4)]


def split():
    """(train, val); validation batches carry integer class labels (accuracy is reported)."""
    rng = np.random.default_rng(1)
    train = [{"x": _x(rng)} for _ in range(4)]
    val = [({"x": _x(rng)}, rng.integers(0, 10, BATCH[0])) for _ in range(2)]
    return train, val


def labeled():
    rng = np.random.default_rng(2)
    return [({"x": _x(rng)}, rng.integers(0, 10, BATCH[0])) for _ in range(4)]


def generator():
    rng = np.random.default_rng(3)
    for _ in range(4):
        yield {"x": _x(rng)}


def raises():
    raise RuntimeError("dataset server\nunreachable")


def empty():
    return []


def wrong_shape():
    return [{"x": np.zeros((4, 3, 5, 5), np.float32)}]


def wrong_name():
    return [{"image": np.zeros(BATCH, np.float32)}]


def wrong_dtype():
    return [{"x": np.zeros(BATCH, np.int64)}, {"x": np.zeros(BATCH, np.complex64)}]  # ints widen; complex not


def not_batches():
    return 42


def fails_midway():
    yield {"x": np.zeros(BATCH, np.float32)}
    raise OSError("shard 2 missing")
