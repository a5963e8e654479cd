r"""Precomputed grids of training runs for the book's interactive figures.

``python -m gradclip_book.grids classification [--jobs 2] [--out PATH]`` computes chapter 4's grid
(:func:`classification_configs`) with :func:`gradclip_book.classification.train`, in parallel processes,
and appends one JSON line per run to ``chapters/data/classification_grid.jsonl.gz`` (a gzip file of
JSON lines; appending adds a gzip member, which every gzip reader reads as one stream). An interrupted
run resumes: configs whose key is already in the file (computed by the same code version) are skipped;
lines from another code version are dropped first. When every run is done the file is rewritten sorted.
``python -m gradclip_book.grids optimization`` does the same for chapter 5.1's grid
(:func:`optimization_configs`: warm-up against clipping, Adam against SGD) in
``chapters/data/optimization_grid.jsonl.gz``.

Each line: ``{"key": config_key, "code_version": ..., "section": ..., **compact(record)}`` (see
:func:`gradclip_book.classification.compact`), where ``config`` holds every field of the run's
:class:`~gradclip_book.classification.RunConfig`.

Example:
    >>> configs = classification_configs()
    >>> len(configs) > 700, configs[0][1].model
    (True, 'mlp')
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import replace
from pathlib import Path
from typing import Any

from tqdm import tqdm

from . import classification as cls, harness

__all__ = [
    "ADAM_LRS",
    "CLASSIFICATION_FILE",
    "OPTIMIZATION_FILE",
    "OPT_SEEDS",
    "OPT_THRESHOLDS",
    "SGD_LRS",
    "WARMUP_STEPS",
    "DEPTHS",
    "GRID_METHODS",
    "HARD",
    "HARD_THRESHOLD",
    "LRS",
    "STABILITY_LRS",
    "THRESHOLDS",
    "classification_configs",
    "optimization_configs",
    "load",
    "main",
    "number",
    "run_grid",
    "stable_lrs",
    "write_lines",
]

ROOT = Path(__file__).resolve().parents[2]
CLASSIFICATION_FILE = ROOT / "chapters" / "data" / "classification_grid.jsonl.gz"
COMMAND = "python -m gradclip_book.grids classification"
OPTIMIZATION_FILE = ROOT / "chapters" / "data" / "optimization_grid.jsonl.gz"
OPTIMIZATION_COMMAND = "python -m gradclip_book.grids optimization"

DEPTHS = (4, 8, 12, 16)
"""Hidden layers of the ReLU MLP (width 64, He init), the grid's first axis."""
LRS = (0.03, 0.1, 0.2, 0.5, 1.0, 2.0)
"""SGD (momentum 0.9) learning rates, the grid's second axis."""
THRESHOLDS: dict[str, tuple[float, ...]] = {
    "value": (0.001, 0.003, 0.01, 0.03),
    "norm": (0.1, 0.3, 1.0, 3.0),
    "agc": (0.01, 0.03, 0.1, 0.3),
    "autoclip": (10.0, 25.0, 50.0, 90.0),
    "zclip": (1.5, 2.0, 2.5, 3.0),
    "soft": (0.1, 0.3, 1.0, 3.0),
    "spike-guard": (2.0, 3.0, 6.0, 10.0),
}
"""Each method's four thresholds (in its own knob's units, see ``classification.METHODS``); "off" is method ``none``."""

HARD = cls.RunConfig(depth=16, lr=0.5)
"""The chapter's hard setting: depth 16 at lr 0.5, where unclipped SGD diverges for every seed."""
HARD_THRESHOLD = 0.1
"""The global-norm threshold that trains the hard setting."""
HEADLINE_SEEDS = (0, 1, 2, 3, 4)
STABILITY_LRS = tuple(0.025 * 2 ** k for k in range(7))
"""lrs 0.025 .. 1.6 (factor 2), for the largest stable lr per depth with and without clipping."""
STABILITY_SEEDS = (0, 1, 2)


GRID_METHODS = ("value", "norm", "agc", "autoclip", "zclip")
"""The methods swept over the full depth x lr x threshold grid (soft and spike-guard are in the headline runs only)."""


def _method_points() -> Iterator[tuple[str, float | None]]:
    yield "none", None
    for method in GRID_METHODS:
        for t in THRESHOLDS[method]:
            yield method, t


def classification_configs() -> list[tuple[str, cls.RunConfig]]:
    """The grid of chapter 4 as ``(section, config)`` pairs.

    * ``"grid"``: :data:`DEPTHS` x :data:`LRS` x (off + 4 thresholds of each of :data:`GRID_METHODS`), seed 0;
    * ``"headline"``: the hard setting :data:`HARD` with every method (its middle-of-the-range thresholds and
      norm at :data:`HARD_THRESHOLD`), seeds 0..4;
    * ``"stability"``: :data:`DEPTHS` x :data:`STABILITY_LRS` x {none, norm at :data:`HARD_THRESHOLD`}, seeds 0..2.
    """
    out: list[tuple[str, cls.RunConfig]] = []
    for depth in DEPTHS:
        for lr in LRS:
            for method, t in _method_points():
                out.append(("grid", replace(HARD, depth=depth, lr=lr, method=method, threshold=t)))
    headline = [("none", None), ("norm", HARD_THRESHOLD)] + [(m, ts[1]) for m, ts in THRESHOLDS.items()]
    for method, t in dict.fromkeys(headline):
        for seed in HEADLINE_SEEDS:
            out.append(("headline", replace(HARD, method=method, threshold=t, seed=seed)))
    for depth in DEPTHS:
        for lr in STABILITY_LRS:
            for method, t in (("none", None), ("norm", HARD_THRESHOLD)):
                for seed in STABILITY_SEEDS:
                    out.append(("stability", replace(HARD, depth=depth, lr=lr, method=method, threshold=t,
                                                     seed=seed)))
    return out


# --- chapter 5.1: warm-up, clipping, Adam, all at the hard depth --------------------------------------

SGD_LRS = (0.0125, 0.025, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0)
"""SGD (momentum 0.9) learning rates of the warm-up section: from one at which unclipped SGD trains depth 16 (chapter 4's
stability scan starts at 0.025, where it does not for every seed) up to 2."""
ADAM_LRS = (0.0003, 0.001, 0.003, 0.01, 0.03, 0.1)
"""Adam learning rates (about a factor 3 apart), around Adam's usual 0.001."""
WARMUP_STEPS = 50
"""Linear warm-up length of the warm-up runs (a sixth of the 300 steps)."""
OPT_THRESHOLDS = (None, HARD_THRESHOLD, 1.0)
"""Global-norm thresholds of chapter 5.1's runs: none, chapter 4's hard-setting threshold, and a looser one."""
OPT_SEEDS = (0, 1, 2, 3, 4)
"""Seeds of chapter 5.1's grid (0-2 first, 3-4 added later: a run never depends on which other runs the grid
holds, so the command appended the new seeds' runs and recomputed none)."""


def _norm_or_none(threshold: float | None) -> dict[str, Any]:
    return {"method": "none" if threshold is None else "norm", "threshold": threshold}


def optimization_configs() -> list[tuple[str, cls.RunConfig]]:
    """Chapter 5.1's grid as ``(section, config)`` pairs, every run at the hard depth (:data:`HARD`, depth 16).

    * ``"warmup"``: SGD at :data:`SGD_LRS` x warm-up {0, :data:`WARMUP_STEPS`} x global-norm threshold
      :data:`OPT_THRESHOLDS`, seeds :data:`OPT_SEEDS`;
    * ``"adam"``: Adam at :data:`ADAM_LRS` x :data:`OPT_THRESHOLDS`, no warm-up, seeds :data:`OPT_SEEDS`.
    """
    out: list[tuple[str, cls.RunConfig]] = []
    for lr in SGD_LRS:
        for warmup in (0, WARMUP_STEPS):
            for t in OPT_THRESHOLDS:
                for seed in OPT_SEEDS:
                    out.append(("warmup", replace(HARD, lr=lr, warmup=warmup, seed=seed, **_norm_or_none(t))))
    for lr in ADAM_LRS:
        for t in OPT_THRESHOLDS:
            for seed in OPT_SEEDS:
                out.append(("adam", replace(HARD, optimizer="adam", lr=lr, seed=seed, **_norm_or_none(t))))
    return out


GRIDS = {
    "classification": (classification_configs, CLASSIFICATION_FILE),
    "optimization": (optimization_configs, OPTIMIZATION_FILE),
}
"""Grid name (the command's argument) -> (its configs, its default file)."""


def number(value: Any) -> float | None:
    """A stored float as a float (the files write non-finite values as ``"nan"``/``"inf"`` strings); ``None`` stays."""
    return None if value is None else float(value)


def load(path: Path = CLASSIFICATION_FILE) -> list[dict[str, Any]]:
    """Every complete line of a grid file, parsed (``[]`` if there is no file; a truncated end is ignored)."""
    return harness.load_lines(path)


def _one(section: str, config: cls.RunConfig, version: str) -> str:
    record = cls.train(config)
    line = {"key": cls.config_key(config), "code_version": version, "section": section, **record.to_json()}
    return json.dumps(line, separators=(",", ":"))


def run_grid(configs: Iterable[tuple[str, cls.RunConfig]], path: Path, jobs: int = 2) -> float:
    """Compute the runs of ``configs`` missing from ``path`` in ``jobs`` processes; return the wall seconds.

    Resumable: lines are appended as runs finish. Lines of another code version are dropped first.
    At the end the file is rewritten with the lines in ``configs`` order (so reruns give the same file).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    version = cls.code_version()
    configs = list(configs)
    lines = load(path)
    kept = [line for line in lines if line.get("code_version") == version]
    write_lines(path, kept)  # drops other versions and repairs a file cut off by an interruption
    done = {line["key"] for line in kept}
    todo = [(s, c) for s, c in configs if cls.config_key(c) not in done]
    start = time.perf_counter()
    with ProcessPoolExecutor(max_workers=jobs) as pool, gzip.open(path, "at", encoding="utf-8") as out:
        futures = [pool.submit(_one, s, c, version) for s, c in todo]
        for future in tqdm(as_completed(futures), total=len(todo), desc="runs", unit="run"):
            out.write(future.result() + "\n")
            out.flush()
    seconds = time.perf_counter() - start
    by_key = {line["key"]: line for line in load(path)}
    write_lines(path, [by_key[cls.config_key(c)] for s, c in dict.fromkeys(configs) if cls.config_key(c) in by_key])
    return seconds


def write_lines(path: Path, lines: list[dict[str, Any]]) -> None:
    """Rewrite a grid file with ``lines`` (gzip without a timestamp, so equal lines give an equal file)."""
    tmp = path.with_suffix(".tmp")
    with gzip.GzipFile(tmp, "wb", mtime=0) as f:
        f.write("".join(json.dumps(line, separators=(",", ":")) + "\n" for line in lines).encode())
    os.replace(tmp, path)


def stable_lrs(lines: list[dict[str, Any]], accuracy: float = 0.9) -> dict[int, dict[str, float | None]]:
    """From the ``"stability"`` section: per depth, the largest lr at which every seed trains, with and without clipping.

    "Trains": not diverged and test accuracy >= ``accuracy``. Scanning lrs upwards, the first failing
    lr after a passing one ends the scan. Returns ``{depth: {"none": lr, "norm": lr, "factor": norm/none}}``.
    """
    runs: dict[tuple[int, str, float], list[bool]] = {}
    for line in lines:
        if line["section"] != "stability":
            continue
        c = line["config"]
        ok = line["diverged_at"] is None and (line["test_accuracy"] or 0) >= accuracy
        runs.setdefault((c["depth"], c["method"], c["lr"]), []).append(ok)
    table: dict[int, dict[str, float | None]] = {}
    for depth in sorted({d for d, _, _ in runs}):
        row: dict[str, float | None] = {}
        for method in ("none", "norm"):
            best = None
            for lr in sorted(lr for d, m, lr in runs if d == depth and m == method):
                if all(runs[depth, method, lr]):
                    best = lr
                elif best is not None:
                    break
            row[method] = best
        row["factor"] = row["norm"] / row["none"] if row["none"] and row["norm"] else None
        table[depth] = row
    return table


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m gradclip_book.grids", description=__doc__.split("\n")[0])
    parser.add_argument("grid", choices=sorted(GRIDS))
    parser.add_argument("--jobs", type=int, default=2, help="worker processes (default 2)")
    parser.add_argument("--out", type=Path, default=None, help="the grid file (default: the grid's own in chapters/data)")
    args = parser.parse_args(argv)
    make_configs, default_file = GRIDS[args.grid]
    out = args.out or default_file
    configs = make_configs()
    seconds = run_grid(configs, out, args.jobs)
    print(f"{len(configs)} runs in {out} ({out.stat().st_size / 1e6:.2f} MB); "
          f"this invocation took {seconds:.0f} s with {args.jobs} processes")
    if args.grid == "classification":
        for depth, row in stable_lrs(load(out)).items():
            print(f"depth {depth}: largest stable lr {row}")


if __name__ == "__main__":
    main()
