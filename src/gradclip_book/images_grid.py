r"""Chapter 4's precomputed runs: which runs, and the one command that computes them.

``python -m gradclip_book.images_grid [--jobs 1]`` trains every run of :func:`grid_points` that is missing from
``chapters/data/images_grid.jsonl.gz`` with :func:`gradclip_book.images.record` (a progress bar; an interrupted
command resumes; stored runs of another code version are recomputed) and rewrites the file in grid order. The
runs come in two phases: :func:`phase_one` lists runs fixed in advance; :func:`phase_two` lists runs chosen on
seed 0's validation accuracy from phase one's stored runs (each network's and each method's best setting, run
for four more seeds).
Editing this module never makes a stored run stale: a run's numbers are decided by
:mod:`gradclip_book.images` and the harness alone (:func:`gradclip_book.images.code_version`).

Example:
    >>> from gradclip_book import images_grid
    >>> sections = {section for section, _ in images_grid.phase_one()}
    >>> sorted(sections)
    ['adamw', 'explore', 'fixes', 'methods', 'seeds', 'warmup']
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from . import harness
from .images import GRID_FILE, MODELS, ImageConfig, code_version, load, record

__all__ = [
    "ADAMW_LRS", "BUDGET_STEPS", "DEPTHS", "HARD", "HEADLINE", "LRS", "METHOD_LRS", "METHOD_THRESHOLDS", "RECIPE_NET",
    "RECIPE_SEEDS", "SECOND_REPLICATION_SEEDS", "SEEDS", "THRESHOLDS", "UNSEEN_SEED_GROUPS", "WARMUP", "budget_points",
    "grid_points", "main", "phase_one", "phase_two", "probe_norms", "recipe_points", "replication_points",
    "table_settings",
]

DEPTHS = (4, 8, 16)
"""Convolutions after the stem: the explorer's depth slider."""
LRS = harness.lr_range(0.003, 1.0)
"""SGD (momentum 0.9) learning rates, a stretch of the book's grid :data:`gradclip_book.harness.LR_GRID`."""
ADAMW_LRS = harness.lr_range(1e-4, 0.01)
"""AdamW learning rates (the same grid, around AdamW's usual 1e-3)."""
THRESHOLDS = (0.25, 1.0, 4.0)
"""Global-norm thresholds (``max_norm``), a factor 4 apart: the explorer's threshold slider."""
METHOD_THRESHOLDS: dict[str, tuple[float, ...]] = {
    "value": (0.003, 0.03, 0.3),
    "agc": (0.01, 0.04, 0.16),
    "autoclip": (10.0, 50.0, 90.0),
    "zclip": (2.0, 3.0, 6.0),
    "soft": (0.25, 1.0, 4.0),
    "spike-guard": (3.0, 6.0, 10.0),
}
"""The other methods' thresholds, each in its own knob's units (:data:`gradclip_book.harness.METHODS`)."""
METHOD_LRS = harness.lr_range(0.003, 0.1)
"""Learning rates over which the other methods are tuned."""
SEEDS = (0, 1, 2, 3, 4)
"""Seeds of every comparison of settings."""
HEADLINE = ImageConfig(model="residual", depth=8)
"""The main case: the residual CNN without normalisation at depth 8 (it trains, and explodes at large learning rates)."""
HARD = ImageConfig(model="residual", depth=16)
"""The hard case: the same network at depth 16."""
WARMUP = 20
"""Linear warm-up steps of the warm-up runs (a tenth of the run)."""
BUDGET_STEPS = 800
"""Steps of the longer runs that ask whether a lower learning rate catches up given more steps (4x the default)."""

def _norm_points(base: ImageConfig, lrs: Sequence[float], seeds: Sequence[int],
                 thresholds: Sequence[float] = THRESHOLDS) -> list[ImageConfig]:
    out = []
    for lr in lrs:
        for method, t in [("none", None)] + [("norm", c) for c in thresholds]:
            out += [replace(base, lr=lr, method=method, threshold=t, seed=s) for s in seeds]
    return out


def phase_one() -> list[tuple[str, ImageConfig]]:
    """The runs that do not depend on other runs (``(section, config)`` pairs):

    * ``explore``: every model x :data:`DEPTHS` x :data:`LRS` x (no clipping, global norm at :data:`THRESHOLDS`),
      seed 0: the interactive figure, and seed 0 of everything below;
    * ``seeds``: the residual CNN without normalisation, the same, seeds 1-4;
    * ``fixes``: the other three models at depths 8 and 16 without clipping, seeds 1-4;
    * ``warmup``: the main and the hard case with a linear warm-up of :data:`WARMUP` steps, no clipping, all seeds;
    * ``methods``: the main case with every other method at its three thresholds over :data:`METHOD_LRS`, seed 0;
    * ``adamw``: the main case with AdamW over :data:`ADAMW_LRS`, without clipping and at max_norm 1, all seeds.
    """
    points: list[tuple[str, ImageConfig]] = []
    for model in MODELS:
        for depth in DEPTHS:
            points += [("explore", c) for c in _norm_points(ImageConfig(model=model, depth=depth), LRS, (0,))]
    for depth in DEPTHS:
        points += [("seeds", c) for c in _norm_points(ImageConfig(model="residual", depth=depth), LRS, SEEDS[1:])]
    for base in (HEADLINE, HARD):
        for model in ("residual+bn", "plain", "plain+bn"):
            points += [("fixes", c) for c in _norm_points(replace(base, model=model), LRS, SEEDS[1:], ())]
    for base in (HEADLINE, HARD):
        points += [("warmup", c) for c in _norm_points(replace(base, warmup=WARMUP), LRS, SEEDS, ())]
    for method, thresholds in METHOD_THRESHOLDS.items():
        for lr in METHOD_LRS:
            points += [("methods", replace(HEADLINE, lr=lr, method=method, threshold=t)) for t in thresholds]
    points += [("adamw", c) for c in _norm_points(replace(HEADLINE, optimizer="adamw"), ADAMW_LRS, SEEDS, (1.0,))]
    return points


def _best_on_seed_zero(by_key: dict[str, dict[str, Any]], candidates: Sequence[ImageConfig]) -> ImageConfig | None:
    """The candidate with the best validation accuracy at seed 0 (the book's rule), or ``None`` if one is missing."""
    found = [by_key.get(harness.config_key(c)) for c in candidates]
    if any(line is None for line in found):
        return None
    return harness.select_best([(c, harness.values_of([line], "val_accuracy"))
                                for c, line in zip(candidates, found)]).best.setting


def _best_over_seeds(by_key: dict[str, dict[str, Any]], candidates: Sequence[ImageConfig],
                     seeds: Sequence[int] = SEEDS) -> ImageConfig | None:
    """The candidate with the best validation accuracy over ``seeds`` (the book's rule), or ``None`` if a run is
    missing."""
    found = [[by_key.get(harness.config_key(replace(c, seed=s))) for s in seeds] for c in candidates]
    if any(line is None for lines in found for line in lines):
        return None
    return harness.select_best([(c, harness.values_of(lines, "val_accuracy"))
                                for c, lines in zip(candidates, found)]).best.setting


def budget_points(lines: Sequence[dict[str, Any]]) -> list[tuple[str, ImageConfig]]:
    """Does a lower learning rate catch up with clipping when it gets more steps? (``budget``)

    In the main case (:data:`HEADLINE`), the best unclipped learning rate and every lower one of :data:`LRS`, and
    the best global-norm (lr, threshold), each chosen on validation over all :data:`SEEDS` from the stored
    200-step runs, are run for :data:`BUDGET_STEPS` steps, every seed. Empty until those runs are stored.
    """
    by_key = {line["key"]: line for line in lines}
    plain = _best_over_seeds(by_key, [replace(HEADLINE, lr=lr) for lr in LRS])
    clip = _best_over_seeds(by_key, [replace(HEADLINE, lr=lr, method="norm", threshold=c)
                                     for lr in LRS for c in sorted(THRESHOLDS, reverse=True)])
    if plain is None or clip is None:
        return []
    chosen = [replace(HEADLINE, lr=lr) for lr in LRS if lr <= plain.lr] + [clip]
    return [("budget", replace(c, steps=BUDGET_STEPS, seed=s)) for c in chosen for s in SEEDS]


def phase_two(lines: Sequence[dict[str, Any]]) -> list[tuple[str, ImageConfig]]:
    """The runs chosen on seed 0's validation accuracy from the stored phase-one runs, run for seeds 1-4:

    * ``methods-seeds``: each other method at its best (lr, threshold) in the main case;
    * ``clip-seeds``: for the three other networks at every depth, the best global-norm (lr, threshold) and, at
      depth 4 (where phase one has no seeds 1-4 without clipping), the best unclipped learning rate.

    A part whose seed-0 runs are not all stored yet is left out (the command computes it on its next call).
    """
    by_key = {line["key"]: line for line in lines}
    chosen: list[tuple[str, ImageConfig]] = []
    for method, thresholds in METHOD_THRESHOLDS.items():
        best = _best_on_seed_zero(by_key, [replace(HEADLINE, lr=lr, method=method, threshold=t)
                                           for lr in METHOD_LRS for t in sorted(thresholds, reverse=True)])
        if best is not None:
            chosen.append(("methods-seeds", best))
    for model in ("plain", "plain+bn", "residual+bn"):
        for depth in DEPTHS:
            base = ImageConfig(model=model, depth=depth)
            best = _best_on_seed_zero(by_key, [replace(base, lr=lr, method="norm", threshold=c)
                                               for lr in LRS for c in sorted(THRESHOLDS, reverse=True)])
            if best is not None:
                chosen.append(("clip-seeds", best))
            if depth not in (HEADLINE.depth, HARD.depth):
                best = _best_on_seed_zero(by_key, [replace(base, lr=lr) for lr in LRS])
                if best is not None:
                    chosen.append(("clip-seeds", best))
    return [(section, replace(c, seed=s)) for section, c in chosen for s in SEEDS[1:]]


def recipe_points(lines: Sequence[dict[str, Any]], seeds: Sequence[int] = (0,),
                  nets: Sequence[tuple[str, int]] | None = None) -> list[tuple[str, ImageConfig]]:
    """The threshold recipe (:mod:`gradclip_book.harness.recipe`) applied at every learning rate of the explorer
    (``recipe``), for every network and depth (``nets``: ``(model, depth)`` pairs, default all) at each of ``seeds``
    (default seed 0): the probe is the first :data:`~gradclip_book.harness.recipe.PROBE_STEPS` steps of the stored
    unclipped run (stored step by step), the threshold is :func:`gradclip_book.harness.recipe.thresholds_by_lr` of
    the probes (a learning rate whose probe diverged is clipped at the threshold of the largest lower one whose probe
    did not), and each learning rate is run with its threshold. A network whose unclipped runs are not all stored at a
    seed gets no runs there."""
    from .harness import recipe

    nets = [(m, d) for m in MODELS for d in DEPTHS] if nets is None else nets
    by_key = {line["key"]: line for line in lines}
    points = []
    for seed in seeds:
        for model, depth in nets:
            base = ImageConfig(model=model, depth=depth, seed=seed)
            found = {lr: by_key.get(harness.config_key(replace(base, lr=lr))) for lr in LRS}
            if None in found.values():
                continue
            thresholds = recipe.thresholds_by_lr({lr: probe_norms(line) for lr, line in found.items()})
            points += [("recipe", replace(base, lr=lr, method="norm", threshold=t)) for lr, t in thresholds.items()]
    return points


RECIPE_SEEDS = (3, 1, 2, 4)
"""The other seeds at which the recipe runs on :data:`RECIPE_NET` (the grid has all its thresholds there too), so
that chapter 4.7 measures it over :data:`SEEDS` on the network whose unclipped probes diverge (seed 3 first: there
the probe diverges from the third learning rate of the scan up)."""
RECIPE_NET = ("residual", 16)
"""The network of :data:`RECIPE_SEEDS`: the residual CNN without normalisation at depth 16."""


def probe_norms(line: dict[str, Any]) -> list[float] | None:
    """The recipe's probe read off a stored unclipped run: its first
    :data:`~gradclip_book.harness.recipe.PROBE_STEPS` gradient norms, or ``None`` if it diverged within them."""
    from .harness import recipe

    probe = recipe.PROBE_STEPS
    if line["diverged_at"] is not None and line["diverged_at"] < probe:
        return None
    steps = line["curve"]["step"][:probe]
    if steps != list(range(len(steps))):
        raise ValueError("the stored curve does not hold the probe's steps one by one")
    return [float(n) for n in line["curve"]["grad_norm"][:probe]]


REPLICATION_SEEDS, SECOND_REPLICATION_SEEDS = harness.UNSEEN_SEED_GROUPS
"""Seeds no choice of the chapter saw: the headline settings are re-run at the first group (``replicate``), every
row of chapter 4.4's table at the second too (``replicate``)."""
UNSEEN_SEED_GROUPS = harness.UNSEEN_SEED_GROUPS
"""The groups of seeds at which chapter 4.4's table judges every row again (a verdict stands only if all give it;
defined once, in :data:`gradclip_book.harness.UNSEEN_SEED_GROUPS`)."""


def replication_points(lines: Sequence[dict[str, Any]]) -> list[tuple[str, ImageConfig]]:
    """The settings behind the chapter's verdicts, chosen on validation over :data:`SEEDS` from the stored runs, re-run
    at :data:`REPLICATION_SEEDS` (``replicate``): in the main and the hard case (:data:`HEADLINE`, :data:`HARD`) the
    best unclipped learning rate and the best global-norm (lr, threshold); in the hard case also the best threshold
    that clips on rare steps (some, but at most 10% of the steps, averaged over :data:`SEEDS`); in the main case
    AdamW at its best learning rate, without clipping and at max_norm 1; and both settings of every row of chapter
    4.4's table (:func:`table_settings`: every network and depth, those of the residual CNN included above). The
    table's settings are then re-run at :data:`SECOND_REPLICATION_SEEDS` as well (listed last: the runs stored before
    this group was added keep their order), and then AdamW's two settings at :data:`SECOND_REPLICATION_SEEDS` (so that
    section 4.8 judges AdamW on the same three groups of seeds as 4.4's table). Empty until the runs they are chosen
    from are stored."""
    by_key = {line["key"]: line for line in lines}

    def clip_fraction(config: ImageConfig) -> float | None:
        found = [by_key.get(harness.config_key(replace(config, seed=s))) for s in SEEDS]
        return None if None in found else sum(line["clip_fraction"] for line in found) / len(found)

    chosen: list[ImageConfig | None] = []
    for base in (HEADLINE, HARD):
        clipped = [replace(base, lr=lr, method="norm", threshold=c) for lr in LRS for c in sorted(THRESHOLDS, reverse=True)]
        chosen += [_best_over_seeds(by_key, [replace(base, lr=lr) for lr in LRS]), _best_over_seeds(by_key, clipped)]
    fractions = {c: clip_fraction(c) for c in [replace(HARD, lr=lr, method="norm", threshold=t) for lr in LRS
                                               for t in sorted(THRESHOLDS, reverse=True)]}
    if None in fractions.values():
        return []
    chosen.append(_best_over_seeds(by_key, [c for c, f in fractions.items() if 0 < f <= 0.1]))
    adamw = replace(HEADLINE, optimizer="adamw")   # section 4.8: without clipping and at max_norm 1
    adamw_settings = [_best_over_seeds(by_key, [replace(adamw, lr=lr) for lr in ADAMW_LRS]),
                      _best_over_seeds(by_key, [replace(adamw, lr=lr, method="norm", threshold=1.0)
                                                for lr in ADAMW_LRS])]
    chosen += adamw_settings
    if None in chosen:
        return []
    table = table_settings(lines)
    if table is None:
        return []
    # the verdicts' settings first, then the table's rows: the order of the runs stored before the rows were added
    rows = list(dict.fromkeys(c for pair in table.values() for c in pair))
    unique = list(dict.fromkeys(chosen + rows))
    return ([("replicate", replace(c, seed=s)) for c in unique for s in REPLICATION_SEEDS]
            + [("replicate", replace(c, seed=s)) for c in rows for s in SECOND_REPLICATION_SEEDS]
            + [("replicate", replace(c, seed=s)) for c in adamw_settings for s in SECOND_REPLICATION_SEEDS])


def table_settings(lines: Sequence[dict[str, Any]]) -> dict[tuple[str, int], tuple[ImageConfig, ImageConfig]] | None:
    """Every row of chapter 4.4's table: per (network, depth), the best unclipped learning rate and the best
    global-norm (lr, threshold), chosen on validation the chapter's way (``(plain, clipped)``, seed 0).

    For the residual CNN without normalisation both are chosen over :data:`SEEDS`; for the three other networks the
    clipped setting is chosen on seed 0 (phase one has seeds 1-4 only for the chosen one, ``clip-seeds``), and so is
    the unclipped learning rate at depth 4; at the depths of :data:`HEADLINE` and :data:`HARD` it is chosen over
    :data:`SEEDS` (``fixes``). ``None`` until the runs they are chosen from are stored.
    """
    by_key = {line["key"]: line for line in lines}
    rows = {}
    for model in MODELS:
        for depth in DEPTHS:
            base = ImageConfig(model=model, depth=depth)
            unclipped = [replace(base, lr=lr) for lr in LRS]
            clipped = [replace(base, lr=lr, method="norm", threshold=c) for lr in LRS for c in sorted(THRESHOLDS, reverse=True)]
            if model == "residual":
                pair = (_best_over_seeds(by_key, unclipped), _best_over_seeds(by_key, clipped))
            else:
                plain = (_best_over_seeds(by_key, unclipped) if depth in (HEADLINE.depth, HARD.depth)
                         else _best_on_seed_zero(by_key, unclipped))
                pair = (plain, _best_on_seed_zero(by_key, clipped))
            if None in pair:
                return None
            rows[model, depth] = pair
    return rows


def grid_points(lines: Sequence[dict[str, Any]] | None = None) -> list[tuple[str, ImageConfig]]:
    """The chapter's precomputed runs as ``(section, config)`` pairs: :func:`phase_one`, then :func:`phase_two`,
    :func:`recipe_points` (seed 0), :func:`budget_points`, :func:`replication_points` and :func:`recipe_points` of
    :data:`RECIPE_NET` at :data:`RECIPE_SEEDS`, chosen from the stored runs (``lines``, default: the grid file)."""
    lines = load() if lines is None else lines
    return (phase_one() + phase_two(lines) + recipe_points(lines) + budget_points(lines)
            + replication_points(lines) + recipe_points(lines, RECIPE_SEEDS, [RECIPE_NET]))



def main(argv: list[str] | None = None) -> None:
    """``python -m gradclip_book.images_grid [--jobs N] [--out PATH]``: compute the missing runs of the grid."""
    parser = argparse.ArgumentParser(prog="python -m gradclip_book.images_grid",
                                     description="Compute chapter 4's precomputed runs (resumable).")
    parser.add_argument("--jobs", type=int, default=1, help="worker processes (default 1)")
    parser.add_argument("--out", type=Path, default=GRID_FILE)
    args = parser.parse_args(argv)
    version = code_version()
    seconds = 0.0
    # twice: the second pass adds the runs chosen on validation from the first pass's stored runs. Each pass
    # lists every run derivable so far (run_grid keeps only the runs it is given).
    for _ in range(2):
        current = [line for line in harness.load_lines(args.out) if line.get("code_version") == version]
        seconds += harness.run_grid(grid_points(current), args.out, record, version=version, jobs=args.jobs)
    lines = harness.load_lines(args.out)
    total = sum(line["seconds"] for line in lines)
    print(f"{len(lines)} runs in {args.out} ({args.out.stat().st_size / 1e6:.2f} MB); this invocation took "
          f"{seconds:.0f} s with {args.jobs} process(es); the runs' own wall times add up to {total / 60:.1f} min")


if __name__ == "__main__":
    main()
