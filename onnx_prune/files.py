"""Atomic writes of the files a user asked for: a model, a report, its summary and plots.

Each is written under a temporary name beside its target and renamed over it only once complete,
so an interrupted run never leaves a half-written file where a good one was. The temporary file
is created private (mkstemp's 0600); the published one gets the mode any new file would get
(0666 less the umask), like a plain `open(path, "w")`.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def publish(tmp: str, path: str):
    """Give `tmp` a new file's mode and rename it to `path`."""
    os.chmod(tmp, 0o666 & ~_umask())
    os.replace(tmp, path)


@contextmanager
def atomic_path(path, suffix: str = ".tmp"):
    """A temporary path beside `path` to write to; published on success, removed on failure."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=suffix, dir=folder)
    os.close(fd)
    try:
        yield tmp
        publish(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


@contextmanager
def atomic_folder(path):
    """A private folder beside `path` for a file and its companions (a model and its external
    data): the caller writes them under their final names there; on success each is published
    beside `path`, the companions first, so the model never points at data not yet in place."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    try:
        yield staging
        main = os.path.basename(path)
        names = sorted(os.listdir(staging), key=lambda n: n == main)
        for name in names:
            publish(os.path.join(staging, name), os.path.join(folder, name))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
