"""Reuse of a slow, deterministic result within one test session or book build.

The test suite executes each notebook twice (the book build and nbval) and
some tests repeat a notebook's experiment. Two results are slow and identical
every time for the same code: launching chapter 5.2's two-process demo, and
counting the collected tests for the API page. When the environment variable
``GRADCLIP_BOOK_CACHE`` names a folder (``tests/conftest.py`` sets a fresh one
for each test session, so nothing outlives a session), such a result is stored
there under a key hashed from its arguments and from the bytes of every source
file it depends on, and later calls with the same key read it back. Without
the variable, as in a reader's notebook, every call computes afresh.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

__all__ = ["ENV", "cached_json", "package_files", "source_digest"]

ENV = "GRADCLIP_BOOK_CACHE"


def source_digest(files: Iterable[str | Path]) -> str:
    """SHA-256 over the names and bytes of ``files`` (sorted), plus the Python and torch versions.

    Example:
        >>> import gradclip_book.session_cache as sc
        >>> len(source_digest([sc.__file__]))
        64
    """
    import torch

    digest = hashlib.sha256(f"{sys.version}|{torch.__version__}".encode())
    for path in sorted(Path(f).resolve() for f in files):
        digest.update(str(path).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def package_files(*packages: str) -> list[Path]:
    """Every ``.py`` file of the named installed packages (their code decides the cached result)."""
    import importlib

    files: list[Path] = []
    for name in packages:
        root = Path(importlib.import_module(name).__file__).parent
        files += sorted(root.rglob("*.py"))
    return files


def cached_json(name: str, key: dict[str, Any], files: Iterable[str | Path],
                compute: Callable[[], Any], folder: str | Path | None = None) -> Any:
    """``compute()``, or its stored result when the cache folder holds the same key.

    Args:
        name: what is computed (part of the file name).
        key: the arguments that decide the result (JSON-serialisable).
        files: the source files whose bytes decide the result.
        compute: returns a JSON-serialisable result.
        folder: the cache folder; None reads ``GRADCLIP_BOOK_CACHE``, and without it nothing is cached.

    Example:
        >>> import tempfile
        >>> folder, calls = tempfile.mkdtemp(), []
        >>> def slow():
        ...     calls.append(1)
        ...     return {"n": len(calls)}
        >>> [cached_json("demo", {"a": 1}, [__file__], slow, folder) for _ in range(2)], len(calls)
        ([{'n': 1}, {'n': 1}], 1)
        >>> cached_json("demo", {"a": 2}, [__file__], slow, folder), len(calls)   # another key computes
        ({'n': 2}, 2)
    """
    folder = folder if folder is not None else os.environ.get(ENV)
    if not folder:
        return compute()
    ident = hashlib.sha256((json.dumps(key, sort_keys=True) + source_digest(files)).encode()).hexdigest()[:20]
    path = Path(folder) / f"{name}-{ident}.json"
    if path.exists():
        return json.loads(path.read_text(encoding="utf-8"))
    result = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(f".{os.getpid()}.part")  # two processes may compute at once: last rename wins
    partial.write_text(json.dumps(result), encoding="utf-8")
    partial.replace(path)
    return result
