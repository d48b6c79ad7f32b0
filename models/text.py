"""English text that ships with every Python 3.11: the standard library's docstrings.

Calibration and evaluation sentences for text encoders, available offline and the same on every
machine with the same Python (no model hub, no dataset download).
"""

from __future__ import annotations

import hashlib
import importlib
import re
import warnings
from functools import lru_cache

# Modules with plain-English docstrings that import quickly and without side effects.
MODULES = (
    "argparse", "json", "csv", "email", "http.client", "logging", "unittest", "collections", "itertools",
    "functools", "pathlib", "subprocess", "threading", "asyncio", "datetime", "decimal", "fractions",
    "statistics", "random", "string", "textwrap", "tarfile", "zipfile", "urllib.request", "xml.dom.minidom",
    "sqlite3", "shutil", "tempfile", "typing", "dataclasses", "enum", "heapq", "bisect", "calendar", "difflib",
    "pprint", "inspect", "ast", "pickle", "copy", "socket", "ssl", "selectors", "signal", "io", "os", "time",
    "math", "operator", "contextlib", "abc", "weakref", "hashlib", "hmac", "secrets", "base64", "struct",
    "codecs", "locale", "gettext", "glob", "fnmatch", "linecache", "tokenize", "traceback", "warnings", "queue",
    "sched", "smtplib", "imaplib", "ftplib", "poplib", "mailbox", "mimetypes", "html.parser", "wave", "colorsys",
    "cmd", "shlex", "configparser", "netrc", "plistlib", "uuid", "ipaddress", "zlib", "gzip", "bz2", "lzma",
)
_CODE = re.compile(r"[>{}\[\]=_()]|::|\bdef\b|\\")


def _docstrings(module) -> list[str]:
    docs = [module.__doc__ or ""]
    for name in sorted(dir(module)):
        obj = getattr(module, name, None) if not name.startswith("_") else None
        doc = getattr(obj, "__doc__", None)
        if isinstance(doc, str) and getattr(obj, "__module__", None) == module.__name__:
            docs.append(doc)
    return docs


def _is_prose(sentence: str) -> bool:
    words = sentence.split()
    letters = sum(c.isalpha() for c in sentence)
    return (6 <= len(words) <= 40 and sentence[-1] in ".!?" and not _CODE.search(sentence)
            and letters > 0.75 * len(sentence.replace(" ", "")))


@lru_cache(maxsize=1)
def _sentences() -> tuple[str, ...]:
    found = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in MODULES:
            try:
                module = importlib.import_module(name)
            except ImportError:
                continue
            for doc in _docstrings(module):
                for s in re.split(r"(?<=[.!?])\s+(?=[A-Z])", re.sub(r"\s+", " ", doc)):
                    if _is_prose(s.strip()):
                        found.append(s.strip())
    # distinct, in an order fixed by content (not by module) so that any slice mixes topics
    return tuple(sorted(dict.fromkeys(found), key=lambda s: hashlib.sha1(s.encode()).hexdigest()))


def shipped_sentences(n: int | None = None, offset: int = 0) -> list[str]:
    """Distinct English sentences from the standard library's docstrings (about 1,700 on
    Python 3.11), in a fixed, topic-mixed order; `offset`/`n` select disjoint calibration and test sets."""
    out = list(_sentences())
    return out[offset:] if n is None else out[offset:offset + n]
