r"""Precomputed grids of runs: one command, a progress bar, parallel, resumable, a committed file, a re-run check.

A grid is a list of ``(section, config)`` points, where ``config`` is a frozen dataclass that determines one
run, and a top-level function ``run(config) -> dict`` (picklable, so that worker processes can call it).
:func:`run_grid` computes the points missing from a gzip file of JSON lines, appending one line per run as
it finishes (an interrupted command resumes where it stopped), and finally rewrites the file in grid order
(gzip without a timestamp, so equal lines give an equal file). Each line is::

    {"key": config_key(config), "code_version": ..., "section": ..., "config": asdict(config), **run(config)}

A stored line whose ``code_version`` differs from the current one was computed by other code and is
dropped (and recomputed) by the next :func:`run_grid`; the chapters' tests fail until then.
:func:`spot_check` re-runs a few stored points and compares them with the file, field by field.

Example:
    >>> import tempfile, pathlib
    >>> from dataclasses import dataclass
    >>> from gradclip_book.harness import grid
    >>> @dataclass(frozen=True)
    ... class Square:
    ...     x: int
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "g.jsonl.gz"
    >>> seconds = grid.run_grid([("s", Square(2)), ("s", Square(3))], path, grid._square, version="v1",
    ...                         jobs=1, progress=False)
    >>> [line["y"] for line in grid.load_lines(path)]
    [4, 9]
    >>> grid.spot_check(grid.load_lines(path), grid._square, lambda c: Square(**c), count=2)
    []
"""

from __future__ import annotations

import argparse
import ast
import gzip
import hashlib
import inspect
import json
import os
import random
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any

from ..reproducibility import IGNORED, rerun_differences

__all__ = ["code_version", "config_key", "load_lines", "run_grid", "spot_check", "write_lines"]


def config_key(config: Any) -> str:
    """A 16-hex-digit hash of a dataclass config (its JSON with sorted keys): the grid file's identity of a run.

    Example:
        >>> from dataclasses import dataclass
        >>> @dataclass(frozen=True)
        ... class C:
        ...     lr: float = 0.1
        >>> config_key(C()) == config_key(C(0.1)) != config_key(C(0.2))
        True
    """
    fields = asdict(config) if is_dataclass(config) else dict(config)
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


def _without_docstrings(source: str) -> str:
    """The source's syntax tree without docstrings, as text: comments, docstrings and layout do not count."""
    tree = ast.parse(source)
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant) \
                    and isinstance(body[0].value.value, str):
                node.body = body[1:] or [ast.Pass()]
    return ast.dump(tree)


def code_version(*objects: Any) -> str:
    """A 16-hex-digit hash of the code of ``objects`` (modules, classes, functions), docstrings and comments excluded.

    A grid's code version names everything that decides its numbers; editing prose in a docstring does not make a
    stored grid stale, changing a line of code does.

    Example:
        >>> import json as a, gzip as b
        >>> code_version(a) == code_version(a) != code_version(a, b)
        True
    """
    digest = hashlib.sha256()
    for obj in objects:
        digest.update(_without_docstrings(inspect.getsource(obj)).encode())
    return digest.hexdigest()[:16]


def load_lines(path: str | Path) -> list[dict[str, Any]]:
    """Every complete line of a grid file, parsed (``[]`` if there is no file; a cut-off end is ignored).

    Example:
        >>> load_lines("/nonexistent/grid.jsonl.gz")
        []
    """
    path = Path(path)
    if not path.exists():
        return []
    lines = []
    with gzip.open(path, "rt", encoding="utf-8") as f:
        try:
            for line in f:
                if line.endswith("\n"):  # a last line cut off by an interruption is dropped
                    lines.append(json.loads(line))
        except (EOFError, gzip.BadGzipFile):  # the writer was killed mid-member: keep what was read
            pass
    return lines


def write_lines(path: str | Path, lines: Iterable[dict[str, Any]]) -> None:
    """Rewrite a grid file with ``lines`` (gzip without a timestamp, so equal lines give an equal file).

    Example:
        >>> import tempfile, pathlib
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "x.jsonl.gz"
        >>> write_lines(p, [{"a": 1}]); load_lines(p)
        [{'a': 1}]
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with gzip.GzipFile(tmp, "wb", mtime=0) as f:
        f.write("".join(json.dumps(line, separators=(",", ":")) + "\n" for line in lines).encode())
    os.replace(tmp, path)


def _line(section: str, config: Any, run: Callable[[Any], dict], version: str) -> str:
    result = run(config)
    line = {"key": config_key(config), "code_version": version, "section": section, "config": asdict(config),
            **result}
    return json.dumps(line, separators=(",", ":"))


def run_grid(points: Sequence[tuple[str, Any]], path: str | Path, run: Callable[[Any], dict], *, version: str,
             jobs: int = 1, progress: bool = True) -> float:
    """Compute the points missing from ``path`` with ``run`` in ``jobs`` processes; return the wall seconds.

    Args:
        points: ``(section, config)`` pairs; a config that appears twice is run once (its first section).
        path: the gzip JSON-lines file (created if missing).
        run: a top-level function ``run(config) -> dict`` of JSON-ready values.
        version: the grid's :func:`code_version`; stored lines of another version are dropped first.
        jobs: worker processes (1: in this process).
        progress: show a tqdm progress bar.

    Raises:
        ValueError: ``jobs`` < 1.
    """
    if jobs < 1:
        raise ValueError(f"jobs must be >= 1, got {jobs}")
    path = Path(path)
    unique = list({config_key(c): (s, c) for s, c in reversed(list(points))}.values())[::-1]
    kept = [line for line in load_lines(path) if line.get("code_version") == version]
    write_lines(path, kept)  # drops other versions and repairs a file cut off by an interruption
    done = {line["key"] for line in kept}
    todo = [(s, c) for s, c in unique if config_key(c) not in done]
    start = time.perf_counter()
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(todo), desc=path.name, unit="run")
    with gzip.open(path, "at", encoding="utf-8") as out:
        def write(text: str) -> None:
            out.write(text + "\n")
            out.flush()
            if bar is not None:
                bar.update(1)

        if jobs == 1:
            for s, c in todo:
                write(_line(s, c, run, version))
        else:
            with ProcessPoolExecutor(max_workers=jobs) as pool:
                futures = [pool.submit(_line, s, c, run, version) for s, c in todo]
                for future in as_completed(futures):
                    write(future.result())
    if bar is not None:
        bar.close()
    seconds = time.perf_counter() - start
    by_key = {line["key"]: line for line in load_lines(path)}
    write_lines(path, [by_key[config_key(c)] for _, c in unique if config_key(c) in by_key])
    return seconds


def spot_check(lines: Sequence[dict[str, Any]], run: Callable[[Any], dict], config_of: Callable[[dict], Any],
               count: int = 3, seed: int | None = None) -> list[str]:
    """Re-run ``count`` stored lines drawn at random and list every field that differs from the stored one.

    ``config_of(line["config"])`` rebuilds a config; fields in :data:`IGNORED` (wall time) are not compared.
    An empty list means the stored runs were reproduced: exactly on the grids' kind of machine, in their first
    steps elsewhere (:func:`gradclip_book.reproducibility.rerun_differences`, which compares).

    Example (a run that reproduces its stored line, on any machine):
        >>> stored = [{"config": {"x": 3}, "loss": [9.0, 3.0]}]
        >>> spot_check(stored, lambda c: {"config": c, "loss": [c["x"] ** 2, c["x"] * 1.0]}, dict)
        []
    """
    chosen = random.Random(seed).sample(list(lines), min(count, len(lines)))
    problems = []
    for line in chosen:
        fresh = json.loads(json.dumps(run(config_of(line["config"]))))
        problems += [f"config {line['config']}: {problem}" for problem in rerun_differences(fresh, line)]
    return problems


def _square(config: Any) -> dict[str, Any]:
    """The doctest's run: ``{"y": x ** 2}`` and a loss curve (what a re-run is compared by off the grids' kind of
    machine)."""
    return {"y": config.x ** 2, "loss": [float(config.x), 1.0]}


def store_json_command(argv: list[str] | None, prog: str, description: str, default_out: Path,
                       compute: Callable[[], dict[str, Any]],
                       report: Callable[[dict[str, Any]], Iterable[str]]) -> Path:
    """The command line of the book's small precomputes (``python -m gradclip_book.<module> [--out PATH]``): run
    ``compute()``, write its result to ``--out`` (default ``default_out``) as indented JSON, print the lines of
    ``report(result)`` and where it was written; returns that path.

    Example:
        >>> import tempfile, pathlib
        >>> out = pathlib.Path(tempfile.mkdtemp()) / "x.json"
        >>> _ = store_json_command(["--out", str(out)], "demo", "", out, lambda: {"a": 1},
        ...                        lambda r: [f"a = {r['a']}"])  # doctest: +ELLIPSIS
        a = 1
        written to ...x.json
        >>> out.read_text()
        '{\\n "a": 1\\n}\\n'
    """
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--out", type=Path, default=default_out, help=f"the file to write (default {default_out})")
    args = parser.parse_args(argv)
    result = compute()
    args.out.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    for line in report(result):
        print(line)
    print(f"written to {args.out}")
    return args.out
