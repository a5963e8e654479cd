r"""Chapter 4.8 at several seeds: how long the optimizer's steps are, with and without clipping.

Section 4.8 measures the update length :math:`\lVert\theta_{t+1}-\theta_t\rVert` of every step
(:func:`gradclip_book.images_figures.update_lengths`) in the main case (:data:`gradclip_book.images_grid.HEADLINE`):
clipped SGD with momentum at its best (lr, ``max_norm``) chosen on validation, and AdamW at its best unclipped
learning rate, without clipping and at ``max_norm`` = :data:`ADAM_THRESHOLD`. One seed of each takes several seconds,
too long for the page to train at every seed, so the runs of :data:`SEEDS` are computed once by

    python -m gradclip_book.update_runs

into ``chapters/data/update_runs.json`` (a progress bar; it rewrites the file and prints :func:`summary`). The
chapter trains seed 0's clipped SGD run itself and checks it against the file; a test re-runs the first steps of
another seed.

Example:
    >>> stored = load()
    >>> sorted(stored["runs"]) == ["adamw", "adamw_clip", "sgd_clip"] and stored["seeds"] == list(SEEDS)
    True
"""

from __future__ import annotations

import json
import statistics
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

__all__ = ["ADAM_THRESHOLD", "COMMAND", "FILE", "SEEDS", "compute", "configs", "load", "main", "measure", "summary"]

FILE = Path(__file__).resolve().parents[2] / "chapters" / "data" / "update_runs.json"
COMMAND = "python -m gradclip_book.update_runs"
SEEDS = (0, 1, 2, 3, 4)
"""Chapter 4's seeds (:data:`gradclip_book.images_grid.SEEDS`)."""
ADAM_THRESHOLD = 1.0
"""AdamW's ``max_norm`` in section 4.8 (the grid's ``adamw`` section)."""
DIGITS = 7
"""Significant digits stored per value (the file stays small; a re-run is compared to this precision)."""


def configs() -> dict[str, Any]:
    """The three settings of section 4.8 at seed 0, chosen from the stored grid as the chapter chooses them:
    ``"sgd_clip"`` (the best global-norm (lr, threshold) of the main case, over chapter 4's seeds), ``"adamw"``
    (AdamW's best unclipped learning rate) and ``"adamw_clip"`` (the same at ``max_norm`` = :data:`ADAM_THRESHOLD`)."""
    from . import images_figures as imf, images_grid as ig

    adamw = imf.choose(imf.unclipped(replace(ig.HEADLINE, optimizer="adamw"), ig.ADAMW_LRS)).best.setting
    return {"sgd_clip": imf.choose(imf.clipped(ig.HEADLINE)).best.setting, "adamw": adamw,
            "adamw_clip": replace(adamw, method="norm", threshold=ADAM_THRESHOLD)}


def _round(values: list[float]) -> list[float]:
    return [float(f"{v:.{DIGITS}g}") for v in values]


def measure(config: Any) -> dict[str, Any]:
    """One run of ``config`` with update statistics: ``{"update" (length per step), "grad_norm" (pre-clip norm per
    step), "lr", "params", "clip_fraction", "diverged_at"}``, values to :data:`DIGITS` significant digits."""
    from . import images_figures as imf

    got = imf.update_lengths(config)
    run = got["run"]
    return {"update": _round(got["update"]), "grad_norm": _round(run.grad_norm), "lr": got["lr"][0],
            "params": got["params"], "clip_fraction": run.clip_fraction, "diverged_at": run.diverged_at}


def compute(seeds: tuple[int, ...] = SEEDS, progress: bool = True) -> dict[str, Any]:
    """Every run of :func:`configs` at every seed of ``seeds``.

    Returns ``{"machine" (:func:`gradclip_book.reproducibility.machine`), "seeds", "configs" (each setting's
    fields at seed 0), "runs": {name: {str(seed): :func:`measure`}}}``.
    """
    import torch
    from tqdm import tqdm

    from .reproducibility import machine

    torch.set_num_threads(1)
    chosen = configs()
    todo = [(name, seed) for name in chosen for seed in seeds]
    runs: dict[str, dict[str, Any]] = {name: {} for name in chosen}
    for name, seed in tqdm(todo, desc=FILE.name, unit="run", disable=not progress):
        runs[name][str(seed)] = measure(replace(chosen[name], seed=seed))
    return {"machine": machine(), "seeds": list(seeds), "configs": {k: asdict(c) for k, c in chosen.items()},
            "runs": runs}


def load(path: str | Path = FILE) -> dict[str, Any]:
    """The stored runs; ``FileNotFoundError`` naming the command that writes them."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"no stored update lengths at {path}; compute them with `{COMMAND}`") from None


def summary(stored: dict[str, Any]) -> dict[int, dict[str, float]]:
    r"""Per seed, what section 4.8 reads off the runs.

    * SGD: the update in units of :math:`\eta c` (``sgd_median``, ``sgd_max``), the steps where it exceeds
      :math:`\eta c` (``sgd_above`` of ``sgd_steps``);
    * AdamW: the median update in units of :math:`\eta\sqrt{P}` without and with clipping (``adam_none``,
      ``adam_clip``), their ratio (``adam_ratio``), the largest update in those units over both runs
      (``adam_max``), the share of clipped steps (``adam_frac``) and the median factor clipping scaled the
      gradient by, over all steps (``adam_scale``: :math:`\min(1, c/\lVert g\rVert)`).
    """
    runs, cfg = stored["runs"], stored["configs"]
    c_sgd, c_adam = cfg["sgd_clip"]["threshold"], cfg["adamw_clip"]["threshold"]
    out = {}
    for seed in stored["seeds"]:
        sgd, plain, clip = (runs[name][str(seed)] for name in ("sgd_clip", "adamw", "adamw_clip"))
        ratios = [u / (sgd["lr"] * c_sgd) for u in sgd["update"]]
        scale = plain["lr"] * plain["params"] ** 0.5
        none_m, clip_m = statistics.median(plain["update"]) / scale, statistics.median(clip["update"]) / scale
        out[seed] = {"sgd_median": statistics.median(ratios), "sgd_max": max(ratios),
                     "sgd_above": sum(r > 1 for r in ratios), "sgd_steps": len(ratios),
                     "adam_none": none_m, "adam_clip": clip_m, "adam_ratio": clip_m / none_m,
                     "adam_max": max(plain["update"] + clip["update"]) / scale, "adam_frac": clip["clip_fraction"],
                     "adam_scale": statistics.median(min(1.0, c_adam / g) for g in clip["grad_norm"])}
    return out


def main(argv: list[str] | None = None) -> None:
    """``python -m gradclip_book.update_runs [--out PATH]``: compute and store (a few minutes on one core)."""
    from .harness.grid import store_json_command

    def report(result: dict[str, Any]) -> list[str]:
        return [f"seed {seed}: SGD update / (lr c) median {s['sgd_median']:.2f}, max {s['sgd_max']:.2f}, above 1 on "
                f"{s['sgd_above']} of {s['sgd_steps']} steps; AdamW median update / (lr sqrt P) {s['adam_none']:.3f} "
                f"without, {s['adam_clip']:.3f} with clipping (ratio {s['adam_ratio']:.2f}, max {s['adam_max']:.2f}, "
                f"clips {100 * s['adam_frac']:.0f}% of steps, median gradient scale {s['adam_scale']:.2f})"
                for seed, s in summary(result).items()]

    store_json_command(argv, COMMAND, __doc__.split("\n\n")[0], FILE, compute, report)


if __name__ == "__main__":
    main()
