r"""Chapter 6, the conclusion: a decision guide whose every number is read from chapters 2-5.

Each ``*_evidence`` function below reads one result of an earlier chapter from
where that chapter keeps it (the stored grids in ``chapters/data`` through the
chapter's own loaders, or the package's fast experiment functions) and returns
the numbers the guide cites, so the guide cannot drift from the chapters:
when a grid is recomputed, the conclusion changes with it.

:func:`guide_rows` turns them into the rows of the decision table (situation,
method and setting, an evidence sentence built from the numbers, a link to the
section that measured it), :func:`guide_table_html` renders them, and
:func:`flow_chart` draws the short decision tree as plain HTML (nested lists
styled with the theme's colours: no script, no network, readable at 390 px and
in dark mode).

Links are relative to ``chapters/`` (the conclusion sits beside the chapters)
and use the anchors Jupyter Book derives from the section titles
(:func:`slug`); :data:`SECTIONS` holds the titles.

Example:
    >>> from gradclip_book import conclusion
    >>> conclusion.link("cls-methods")
    'classification.html#a-first-illustration-a-deep-plain-mlp'
"""

from __future__ import annotations

import html
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from gradclip_book import bugzoo, grids, harness
from gradclip_book import classification_figures as cf
from gradclip_book import performance as perf
from gradclip_book.figures import table_html
from gradclip_book import scalability as sc

__all__ = ["SECTIONS", "FlowChart", "Row", "adam_evidence", "batch_evidence", "budget_evidence", "bug_zoo_evidence",
           "direction_evidence", "distributed_evidence", "flow_chart", "guide_rows", "guide_table_html",
           "hard_setting_evidence", "link", "lower_lr_evidence", "safety_rows", "slug", "stability_evidence",
           "usable_lr_evidence", "warmup_evidence"]

# --- where the evidence is: page and section title (the anchor is the title's slug) ----------------

SECTIONS: dict[str, tuple[str, str]] = {
    "clip-rule": ("principle", "The clipping rule"),
    "families": ("principle", "The families of clipping, side by side"),
    "when-not": ("principle", "When not to clip"),
    "bug-zoo": ("implementation", "A zoo of clipping bugs"),
    "placement": ("implementation", "Where the call goes"),
    "cls-methods": ("classification", "A first illustration: a deep plain MLP"),
    "cls-stable": ("classification", "The range of learning rates that train"),
    "cls-threshold": ("classification", "Choosing the threshold: a recipe, checked on every network"),
    "cls-fix": ("classification", "Fix the cause: normalisation, residual connections, warm-up"),
    "perf-usable": ("performance", "How far clipping widens the usable learning rates"),
    "perf-lower": ("performance", "Clipping, or a lower learning rate?"),
    "perf-warmup": ("performance", "Warm-up or clipping?"),
    "perf-adam": ("performance", "Clipping with Adam and with SGD"),
    "scal-dist": ("scalability", "Clipping under torch.distributed"),
    "scal-batch": ("scalability", "Large batches without normalisation layers"),
    "scal-structure": ("scalability", "Structure-aware clipping"),
    "safety-guards": ("safety", "What each guard survives"),
}
"""Key -> (page under ``chapters/``, section title as written in the notebook, without its number)."""


def slug(title: str) -> str:
    """The anchor Jupyter Book (docutils) gives a section title: lowercase, runs of other characters to ``-``.

    A leading section number ("4.4 ") is dropped, as docutils drops leading digits.

    Example:
        >>> slug("4.4 What clipping changed, and why")
        'what-clipping-changed-and-why'
        >>> slug("Mixed precision: after `scaler.unscale_(optimizer)`")
        'mixed-precision-after-scaler-unscale-optimizer'
    """
    text = re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-")
    return re.sub(r"^[0-9-]+", "", text)


def link(key: str) -> str:
    """Relative link from a page in ``chapters/`` to the section :data:`SECTIONS` names ``key``.

    Raises:
        KeyError: ``key`` is not in :data:`SECTIONS` (the message lists the keys).
    """
    if key not in SECTIONS:
        raise KeyError(f"no section {key!r}; known: {', '.join(SECTIONS)}")
    page, title = SECTIONS[key]
    return f"{page}.html#{slug(title)}"


_pct = sc.percent  # one rounding rule for the percentages the book prints


_num = grids.number


# --- chapter 4: the hard setting and the stable region ------------------------------------------------


def hard_setting_evidence() -> dict[str, Any]:
    """Chapter 4's headline: each method at the hard setting (depth 16, lr 0.5), over the headline seeds.

    Returns ``{"seeds", "depth", "lr", "methods": {(method, threshold): row}, "rescue": [(method, threshold)],
    "fail": [...]}``; a row is :func:`classification_figures.headline_summary`'s, and a method *rescues*
    when every seed trains by the book's rule: no divergence and a test accuracy of at least 90%.
    """
    rows = cf.headline_summary()
    methods = {(r["method"], r["threshold"]): r for r in rows}
    rescue = [k for k, r in methods.items() if all(a is not None and a >= perf.TRAINS for a in r["accuracies"])]
    return {"seeds": len(grids.HEADLINE_SEEDS), "depth": grids.HARD.depth, "lr": grids.HARD.lr,
            "methods": methods, "rescue": rescue, "fail": [k for k in methods if k not in rescue]}


def stability_evidence() -> dict[str, Any]:
    """Chapter 4's range of learning rates that train, on its residual CNN without normalisation.

    Returns ``{"table": {depth: {"none": lrs, threshold: lrs}}, "seeds", "tight" (the smallest threshold),
    "trains" (the validation accuracy every seed must reach)}``, from :func:`gradclip_book.images_figures.stable_lrs`.
    """
    from dataclasses import replace

    from gradclip_book import images_figures as imf, images_grid as ig

    table = {}
    for depth in ig.DEPTHS:
        base = replace(ig.HEADLINE, depth=depth)
        table[depth] = {"none": imf.stable_lrs(base),
                        **{c: imf.stable_lrs(base, "norm", c) for c in ig.THRESHOLDS}}
    return {"table": table, "seeds": len(ig.SEEDS), "tight": min(ig.THRESHOLDS), "trains": imf.TRAINS}


def budget_evidence() -> dict[str, Any]:
    """Chapter 4's longer runs: does a lower learning rate catch up with clipping on every step given more steps?

    On the residual CNN without normalisation at depth 8: the best unclipped learning rate of the 200-step runs and
    every lower one, run for ``budget_steps`` steps, the best of them chosen on validation, against the best
    clipped setting of the 200-step runs run as long; test accuracy over the seeds and the book's verdict.

    Returns ``{"steps", "budget_steps", "plain_lr", "plain", "clipped" (test-accuracy Scores), "verdict"}``.
    """
    from dataclasses import replace

    from gradclip_book import harness, images_figures as imf, images_grid as ig

    h, longer = ig.HEADLINE, ig.BUDGET_STEPS
    top = imf.choose(imf.unclipped(h)).best.setting.lr
    clip = replace(imf.choose(imf.clipped(h)).best.setting, steps=longer)
    plain = imf.choose([replace(h, lr=lr, steps=longer) for lr in ig.LRS if lr <= top]).best.setting
    p, c = imf.scores(plain, "test_accuracy"), imf.scores(clip, "test_accuracy")
    verdict = ("clipping" if harness.beats(c, p) else "lower lr" if harness.beats(p, c) else "no difference")
    return {"steps": h.steps, "budget_steps": longer, "plain_lr": plain.lr, "plain": p, "clipped": c,
            "verdict": verdict}


# --- chapter 5.1: usable learning rates, lower lr, warm-up, Adam ------------------------------------------


def usable_lr_evidence(depth: int = grids.HARD.depth) -> dict[str, Any]:
    """Chapter 5.1's map at ``depth``: how many of the grid's lrs each method makes usable (>= 90% test accuracy).

    Returns ``{"n_lrs", "depth", "none": count without clipping, "clipped": {method: count at some threshold
    (each lr its own threshold)}, "top": {method: largest usable lr or None}, "fixed": {method: count at one
    threshold for every lr, chosen on validation}, "fixed_threshold": {method: that threshold}}``
    (:func:`gradclip_book.performance.fixed_threshold`).
    """
    cells = {m: perf.heatmap_cells(depth, m) for m in grids.GRID_METHODS}
    usable = {m: perf.usable_lrs(c) for m, c in cells.items()}
    fixed = {m: perf.fixed_threshold(c) for m, c in cells.items()}
    return {"n_lrs": len(grids.LRS), "depth": depth, "none": len(usable["norm"]["none"]),
            "clipped": {m: len(u["clipped"]) for m, u in usable.items()},
            "top": {m: max(u["clipped"]) if u["clipped"] else None for m, u in usable.items()},
            "fixed": {m: len(f["lrs"]) for m, f in fixed.items()},
            "fixed_threshold": {m: f["threshold"] for m, f in fixed.items()}}


def lower_lr_evidence(depth: int = grids.HARD.depth) -> dict[str, Any]:
    """Chapter 5.1's "clipping or a lower learning rate": the best clipped and best unclipped run at ``depth``.

    Returns ``{"clipped_lr", "clip_fraction", "plain_lr", "slowdown" (unclipped steps / clipped steps to the
    target loss), "clipped_acc", "plain_acc"}``.
    """
    row = perf.lower_lr_comparison()[depth]
    c, p = row["clipped"], row["plain"]
    return {"clipped_lr": c["lr"], "clip_fraction": c["clip_fraction"], "plain_lr": p["lr"],
            "slowdown": row["slowdown"], "clipped_acc": c["accuracy"], "plain_acc": p["accuracy"]}


def warmup_evidence(threshold: float = grids.HARD_THRESHOLD) -> dict[str, Any]:
    """Chapter 5.1's warm-up against clipping: per arm the learning rates at which every seed trains, and the best accuracy.

    "Trains" is chapter 4's rule (not diverged, test accuracy >= 90%); the set need not be contiguous.
    Returns ``{arm: {"lrs": sorted list, "words": the set in words, "best": mean accuracy}}`` for the arms of
    :data:`performance.WARMUP_ARMS`.
    """
    arms = perf.warmup_summary(threshold)
    return {arm: {"lrs": s["stable_lrs"], "words": perf.lrs_words(s["stable_lrs"], grids.SGD_LRS),
                  "best": s["best_accuracy"]} for arm, s in arms.items()}


def adam_evidence() -> dict[str, Any]:
    """Chapter 5.1's Adam against SGD: what clipping changes for each optimizer.

    Returns ``{opt: {"n_lrs", "plain_calm", "clip_calm", "plain_best", "clip_best"}}``: the learning rates
    scanned, how many of them no seed diverges at without clipping and with the better threshold, and the best
    mean test accuracy without and with clipping (any threshold).
    """
    summary = perf.optimizer_summary()
    out = {}
    for opt, by_t in summary.items():
        plain = by_t[None]
        clipped = [s for t, s in by_t.items() if t is not None]
        calm = [sum(d == 0 for d in s["diverged"].values()) for s in clipped]
        out[opt] = {"n_lrs": len(plain["diverged"]), "plain_calm": sum(d == 0 for d in plain["diverged"].values()),
                    "clip_calm": max(calm), "plain_best": plain["best_accuracy"],
                    "clip_best": max(s["best_accuracy"] for s in clipped)}
    return out


# --- chapter 5.2: batch size and distributed training ---------------------------------------------------


def _printed(fraction: float) -> float:
    """A fraction as chapter 5.2 prints it (``scalability.percent``), back as a fraction."""
    return float(sc.percent(fraction)[:-1]) / 100


def batch_evidence() -> dict[str, Any]:
    """Chapter 5.2's AGC against global-norm clipping per batch size, by the book's protocol (5 seeds).

    Each method's knob is chosen on validation accuracy (``scalability.chosen_per_batch``); the means are the test
    accuracies of the chosen settings (over the seeds that finished).

    Returns ``{"batches", "seeds", "agc": {batch: (lambda, test mean)}, "norm": {batch: (c, test mean)},
    "none": {batch: test mean without clipping at the scaled learning rate, None if every seed diverged},
    "none_tuned": {batch: (learning rate chosen without clipping, test mean)}, "max_gap": largest |AGC - norm| over
    the batches, "wins": [(batch, method)] where one beats the other by the seed-spread rule
    (``harness.beats``)}``.
    """
    best = sc.chosen_per_batch(sc.load(), sc.load(sc.CONTROLS_FILE))
    batches = sorted(best)
    wins = []
    for b in batches:
        a, n = best[b]["agc"]["test"], best[b]["norm"]["test"]
        if harness.beats(a, n):
            wins.append((b, "agc"))
        elif harness.beats(n, a):
            wins.append((b, "norm"))
    return {"batches": batches, "seeds": len(sc.SEEDS),
            "agc": {b: (best[b]["agc"]["setting"], best[b]["agc"]["test"].mean) for b in batches},
            "norm": {b: (best[b]["norm"]["setting"], best[b]["norm"]["test"].mean) for b in batches},
            "none": {b: best[b]["none"]["test"].mean for b in batches},
            "none_tuned": {b: (best[b]["none_tuned"]["setting"], best[b]["none_tuned"]["test"].mean) for b in batches},
            # from the percentages chapter 5.2 prints (one rounding), so that both pages state the same gap
            "max_gap": max(abs(_printed(best[b]["agc"]["test"].mean) - _printed(best[b]["norm"]["test"].mean))
                           for b in batches),
            "wins": wins}


def distributed_evidence(timeout: float = 120.0) -> dict[str, Any]:
    """Chapter 5.2's distributed run, launched afresh (2 CPU processes, gloo; about 5 s).

    Returns ``{"world", "steps", "max_rel": largest relative difference of any rank's DDP or FSDP2 norm from
    the one-process norm, "naive_ratio": the naive local-norm clipped gradient's norm / the threshold}``.
    """
    from gradclip_book import dist_demo  # imported here: it is only needed when the run is launched

    with tempfile.TemporaryDirectory() as tmp:
        dist = dist_demo.launch(Path(tmp) / "dist.json", nproc=2, timeout=timeout)
    single = np.array(dist["single"]["norms"])
    rel = max(float(np.max(np.abs(np.array(r[mode]["norms"]) / single - 1)))
              for r in dist["ranks"] for mode in ("ddp", "fsdp"))
    naive = dist["ranks"][0]["naive"]
    return {"world": dist["world"], "steps": dist["steps"], "max_rel": rel,
            "naive_ratio": naive["naive_clipped_norm"] / dist["max_norm"]}


# --- chapter 2: direction; chapter 3: the bug zoo ---------------------------------------------------------


def direction_evidence() -> dict[str, Any]:
    """Chapter 2's families on one recorded gradient stream with a spike: how far each method turns the gradient.

    Returns ``{"steps", "angle": {method: mean angle in degrees}, "max_angle": {method: largest angle},
    "spike": {method: spike / typical output norm}}``.
    """
    from gradclip_book import principle_figures as pf  # its import builds nothing; family_traces is cached

    summaries = {m: pf.family_summary(m) for m in pf.FAMILY_NAMES}
    _, _, traces = pf.family_traces()
    return {"steps": len(traces["none"].angle),
            "angle": {m: s["mean_angle"] for m, s in summaries.items()},
            "max_angle": {m: float(max(traces[m].angle)) for m in summaries},
            "spike": {m: s["spike_ratio"] for m, s in summaries.items()}}


def bug_zoo_evidence() -> dict[str, Any]:
    """Chapter 3's bug zoo: what gradclip does about each reported bug by default and once the user opts in.

    Counted from the zoo's table (:func:`gradclip_book.bugzoo.response_counts`): by default gradclip raises,
    warns, or computes the right thing, or does nothing; opted in, a stateful clipper (or one given
    ``scaler=``) raises, an attached ``GradientMonitor`` shows the bug in its logs, or attaching a clipper
    prevents it. Returns ``{"total", "by_default": [names], "silent": [names], "raises_opt_in", "logs",
    "attach": [names], "uncaught": [names]}`` (``uncaught``: neither by default nor once opted in).
    """
    counts = bugzoo.response_counts()
    opted = set(counts["raises_opt_in"]) | set(counts["logs"]) | set(counts["attach"])
    return {"total": len(bugzoo.BUGS), "by_default": counts["caught_by_default"], "silent": counts["silent"],
            "raises_opt_in": counts["raises_opt_in"], "logs": counts["logs"], "attach": counts["attach"],
            "uncaught": [name for name in counts["silent"] if name not in opted]}


# --- the guide -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    """One recommendation: when, what to use, the measured evidence (a sentence with numbers), where."""

    situation: str
    method: str
    evidence: str
    section: str  # a key of SECTIONS, or a page name when ``url`` is given
    url: str = ""  # a link not in SECTIONS (chapter 5.3's page, whose sections are not fixed yet)

    @property
    def href(self) -> str:
        return self.url or link(self.section)


_NAMES = {"agc": "AGC", "norm": "global-norm clipping"}


def _label(method: str, threshold: float | None) -> str:
    name = cf.LABELS[method]
    return name if threshold is None else f"{name} {threshold:g}"


def _lr_words(lrs: list[float]) -> str:
    """Neighbouring learning rates of chapter 4's scan as "a to b", else a list."""
    from gradclip_book import images_figures as imf

    return imf.range_words(lrs)


def _degrees(angle: float) -> str:
    """An angle for a sentence: "0°" when it is (numerically) none, else one decimal."""
    return "0°" if angle < 0.05 else f"{angle:.1f}°"


def guide_rows(evidence: dict[str, dict[str, Any]]) -> list[Row]:
    """The decision table, each evidence sentence built from ``evidence`` (the ``*_evidence`` results).

    ``evidence`` maps ``"hard", "stability", "usable", "lower", "warmup", "adam", "batch", "distributed",
    "direction", "bugs"`` to the results of the functions of those names.
    """
    h, st, u, lo = evidence["hard"], evidence["stability"], evidence["usable"], evidence["lower"]
    w, ad, b, d = evidence["warmup"], evidence["adam"], evidence["batch"], evidence["distributed"]
    dr, bz = evidence["direction"], evidence["bugs"]
    norm = h["methods"]["norm", grids.HARD_THRESHOLD]
    tight = st["tight"]
    ranges = "; ".join(f"{_lr_words(r[tight])} at depth {depth}" for depth, r in st["table"].items() if r[tight])
    failed = ", ".join(_label(m, t) for m, t in h["fail"] if m != "none")
    also = ", ".join(_label(m, t) for m, t in h["rescue"] if (m, t) != ("norm", grids.HARD_THRESHOLD))
    rows = [
        Row("A deep network without normalisation diverges in the first steps (SGD, large learning rate)",
            f"Global-norm clipping, clip_grad_norm_(params, max_norm={grids.HARD_THRESHOLD:g})",
            f"At depth {h['depth']} and lr {h['lr']:g} all {h['seeds']} seeds diverge without clipping; "
            f"with it every seed trains, {_pct(norm['mean'])} mean test accuracy (worst "
            f"{_pct(min(norm['accuracies']))}). "
            + (f"Also training every seed: {also}; " if also else "No other method compared trains every seed; ")
            + f"not training every seed at the thresholds compared: {failed}.",
            "cls-methods"),
        Row("A network without normalisation trains for some seeds and not for others",
            "Add normalisation; without it, global-norm clipping at a small threshold and a larger learning rate",
            f"On chapter 4's residual CNN without normalisation, no learning rate trains every one of "
            f"{st['seeds']} seeds at any depth without clipping; with max_norm {tight:g} (clipping almost every "
            f"step) learning rates {ranges} do. In chapter 5.1's grid, at depth {u['depth']} of the MLP, clipping "
            f"makes {u['clipped']['norm']} of {u['n_lrs']} grid learning rates usable at some threshold, against "
            f"{u['none']} without.",
            "cls-stable"),
        Row("Early instability: is a warm-up enough?",
            "Clip; a warm-up alone does not do it, and on top of clipping it did not help here",
            f"At depth 16 every seed trains at lr {w['neither']['words']} with neither remedy, "
            f"{w['warm-up']['words']} with a warm-up alone, {w['clipping']['words']} with clipping and "
            f"{w['both']['words']} with both; best mean accuracy {_pct(w['clipping']['best'])} with clipping, "
            f"{_pct(w['both']['best'])} with both, {_pct(w['warm-up']['best'])} with the warm-up alone at its "
            f"one learning rate.",
            "perf-warmup"),
        Row("Clipping fires on most steps",
            "Lower the learning rate instead (gradclip.should_lower_lr)",
            f"At depth {u['depth']} the best clipped run (lr {lo['clipped_lr']:g}) clips "
            f"{_pct(lo['clip_fraction'], 0)} of its steps; the best unclipped run (lr {lo['plain_lr']:g}) needs "
            f"{lo['slowdown']:.2f}x its steps to the target loss and ends at {_pct(lo['plain_acc'])} test "
            f"accuracy, the clipped run at {_pct(lo['clipped_acc'])}.",
            "perf-lower"),
        Row("You train with Adam",
            "Clipping is optional; keep it as a guard",
            f"Of {ad['sgd']['n_lrs']} SGD learning rates, clipping makes {ad['sgd']['clip_calm']} free of "
            f"divergence against {ad['sgd']['plain_calm']}, and adds "
            f"{100 * (ad['sgd']['clip_best'] - ad['sgd']['plain_best']):.1f} points to the best accuracy; for "
            f"Adam {ad['adam']['clip_calm']} of {ad['adam']['n_lrs']} against {ad['adam']['plain_calm']}, and "
            f"{100 * (ad['adam']['clip_best'] - ad['adam']['plain_best']):.1f} points.",
            "perf-adam"),
        Row("Large batches, no normalisation layers",
            "A tuned global threshold or AGC (adaptive_clip_grad_), tuned again at each batch size; "
            "neither's best setting rises as the batch grows",
            f"Best AGC λ {', '.join(f'{b_[0]:g}' for b_ in b['agc'].values())} and best global c "
            f"{', '.join(f'{n_[0]:g}' for n_ in b['norm'].values())} at batches "
            f"{', '.join(map(str, b['batches']))}, with mean test accuracy "
            f"{', '.join(_pct(b_[1]) for b_ in b['agc'].values())} (AGC) and "
            f"{', '.join(_pct(n_[1]) for n_ in b['norm'].values())} (global). By the seed-spread rule "
            + ("neither is better at any batch size." if not b["wins"] else
               " and ".join(f"{_NAMES[m]} is better at batch {bb}" for bb, m in b["wins"]) + ", neither at the others."),
            "scal-batch"),
        Row("Several processes (DDP, FSDP2, tensor parallel)",
            "The same gradclip.clip_grad_norm_ call on every rank",
            f"On {d['world']} processes over {d['steps']} steps every rank's DDP and FSDP2 norm equals the "
            f"one-process norm to {d['max_rel']:.0e}; clipping each rank's shards by their own norm gave a "
            f"gradient {d['naive_ratio']:.2f}x the threshold.",
            "scal-dist"),
        Row("The gradient's direction matters (keep it)",
            "Norm clipping, not value clipping or signSGD",
            f"On the same {dr['steps']} recorded gradients norm clipping keeps the direction (largest turn "
            f"{_degrees(dr['max_angle']['norm'])}); value clipping turns them {dr['angle']['value']:.0f}° and signSGD "
            f"{dr['angle']['sign']:.0f}° on average; a spike {dr['spike']['none']:.0f}x the typical step "
            f"becomes {dr['spike']['norm']:.1f}x.",
            "families"),
        Row("Placing the call in real training code (AMP, accumulation, closures, FSDP)",
            "After the gradients are complete and unscaled; clipper.attach(optimizer) puts it there",
            f"Of {bz['total']} reported clipping bugs, gradclip handles {len(bz['by_default'])} by default; "
            f"once opted in, attaching a clipper prevents {len(bz['attach'])} and a GradientMonitor shows "
            f"{len(bz['logs'])} in its logs.",
            "bug-zoo"),
    ]
    return rows


def guide_table_html(rows: list[Row]) -> str:
    """The decision table as HTML: situation, method and setting, evidence with a link to its section.

    On a phone each row becomes a card (:func:`gradclip_book.figures.table_html`).
    """
    cells = [[html.escape(r.situation), html.escape(r.method),
              f'{html.escape(r.evidence)} <a href="{r.href}">{html.escape(_section_name(r.section))}</a>']
             for r in rows]
    return table_html(["situation", "use", "measured evidence"], cells, widths=[24, 24, 52])


_CHAPTERS = {"principle": "2", "implementation": "3", "classification": "4", "performance": "5.1",
             "scalability": "5.2", "safety": "5.3"}


def _section_name(key: str) -> str:
    if key not in SECTIONS:
        return f"(chapter {_CHAPTERS.get(key, key)})"
    page, title = SECTIONS[key]
    return f"(chapter {_CHAPTERS[page]}: {title})"


# Short names for chapter 5.3's faults and guards (its tables hold the long descriptions).
FAULT_NAMES = {"outliers": "outlier inputs", "nan-grad": "a batch of NaN gradients", "scaled": "gradients x1000",
               "labels": "a corrupt shard of labels"}
GUARD_NAMES = {"softcap": "soft-capped logits", "activation": "activation check", "loss": "loss guard",
               "layerwise": "per-layer clipping in backward", "spike": "SpikeGuard", "rollback": "rollback",
               "clip": "global-norm clipping at the recipe's threshold", "skip": "skipping a non-finite step",
               "clip+skip": "clipping and skipping a non-finite step"}


def safety_rows(summary: dict[str, Any]) -> list[Row]:
    """Chapter 5.3's rows, one per fault, from ``gradclip_book.safety.summary()``.

    Per fault: the guards that recover the run (every seed finishes and the mean test accuracy is not below the
    lowest clean seed's: ``gradclip_book.safety.recovers``), best first, and what happens without a guard.
    """
    rows = []
    clean = summary["clean"]
    for fault, by_guard in summary["faults"].items():
        plain = by_guard["none"]
        good = sorted((g for g, r in by_guard.items() if g != "none" and r["recovers"]),
                      key=lambda g: -by_guard[g]["accuracy"])
        lost = sum(o != "finished" for o in plain["outcomes"])
        without = (f"without a guard {lost} of {len(plain['outcomes'])} seeds {'is' if lost == 1 else 'are'} lost"
                   if plain["lost"] else
                   f"without a guard the run ends at {_pct(plain['accuracy'])}")
        names = [GUARD_NAMES.get(g, g) for g in good]
        if good:
            best = by_guard[good[0]]
            evidence = (f"With the fault {without}; with the {names[0]} every seed finishes, at "
                        f"{_pct(best['accuracy'])} mean test accuracy (clean run {_pct(clean)}).")
        else:
            evidence = (f"With the fault {without}; no guard brings its mean within the clean seeds' range "
                        f"(clean run {_pct(clean)}).")
        rows.append(Row(f"A fault in training: {FAULT_NAMES.get(fault, fault)}",
                        ", ".join(names) or "none of the guards recovers it", evidence, "safety-guards"))
    return rows


# --- the flow chart ---------------------------------------------------------------------------------------

_FLOW_STYLE = (
    "<style>"
    ".gc-flow ul{list-style:none;margin:0;padding-left:1.1em;border-left:2px solid var(--pst-color-border,#ccc)}"
    ".gc-flow>ul{padding-left:0;border-left:0}"
    ".gc-flow li{margin:.35em 0;overflow-wrap:anywhere}"
    ".gc-flow .gc-q{font-weight:600}"
    ".gc-flow .gc-a{display:inline-block;font-size:.85em;padding:0 .45em;margin-right:.35em;border-radius:.3em;"
    "border:1px solid var(--pst-color-border,#ccc)}"
    ".gc-flow .gc-leaf{display:inline-block;padding:.1em .5em;border-radius:.3em;"
    "border:1px solid var(--pst-color-primary,#0a6273)}"
    "</style>")


@dataclass
class FlowChart:
    """A decision tree as nested HTML lists: questions, answers and leaves that link to their evidence.

    ``tree`` is ``(question, [(answer, subtree-or-leaf), ...])``; a leaf is ``(method, section key)``.
    Numbered with :class:`gradclip_book.figures.Figures` like any figure (``label``, ``number``).
    """

    tree: tuple
    caption: str
    label: str = "fig-guide-flow"
    number: str = ""

    def _node(self, node: tuple) -> str:
        if isinstance(node[1], str):  # a leaf: (method, section key)
            method, key = node
            return (f'<span class="gc-leaf">{html.escape(method)}</span> '
                    f'<a href="{link(key)}">evidence</a>')
        question, branches = node
        items = "".join(f'<li><span class="gc-a">{html.escape(answer)}</span>{self._node(sub)}</li>'
                        for answer, sub in branches)
        return f'<span class="gc-q">{html.escape(question)}</span><ul>{items}</ul>'

    def _repr_html_(self) -> str:
        text = f"{self.number}. {self.caption}" if self.number else self.caption
        number, rest = (text.split(". ", 1) if self.number else ("", text))
        caption = (f'<figcaption><span class="gc-number">{html.escape(number)}.</span> {html.escape(rest)}'
                   if number else f"<figcaption>{html.escape(rest)}") + "</figcaption>"
        return (f'<figure class="gc-box gc-flow" id="{self.label}">{_FLOW_STYLE}'
                f"<ul><li>{self._node(self.tree)}</li></ul>{caption}</figure>")

    def leaves(self) -> list[tuple[str, str]]:
        """Every (method, section key) leaf, depth first."""
        found: list[tuple[str, str]] = []

        def walk(node: tuple) -> None:
            if isinstance(node[1], str):
                found.append(node)
            else:
                for _, sub in node[1]:
                    walk(sub)

        walk(self.tree)
        return found


def flow_chart() -> FlowChart:
    """The decision tree of the guide (each leaf links to the section that measured it)."""
    tree = (
        "Does clipping fire on most steps already?", [
            ("yes", ("Lower the learning rate", "perf-lower")),
            ("no, or not clipping yet", (
                "Are the gradients sharded or spread over processes?", [
                    ("yes", ("gradclip.clip_grad_norm_ on every rank", "scal-dist")),
                    ("no", (
                        "Does each example's influence need a bound (DP-SGD)?", [
                            ("yes", ("Per-sample clipping", "scal-structure")),
                            ("no", (
                                "Large batch, no normalisation layers?", [
                                    ("yes", ("AGC or a tuned global threshold", "scal-batch")),
                                    ("no", (
                                        "Optimizer?", [
                                            ("SGD", ("Global-norm clipping, threshold tied to the lr",
                                                     "cls-methods")),
                                            ("Adam", ("Clipping as a guard only", "perf-adam")),
                                        ])),
                                ])),
                        ])),
                ])),
        ])
    return FlowChart(tree, caption="Which clipping to use: follow the questions from the top; each leaf links to "
                                   "the measurement behind it.")


# --- how to cite ------------------------------------------------------------------------------------------


def citation(start: str | Path | None = None) -> dict[str, str] | None:
    """How to cite the book: title, author, year and repository URL, read from the book's ``_config.yml``.

    Returns ``{"title", "author", "year", "url", "bibtex"}``, or None outside a clone that has a
    ``_config.yml`` naming a repository (:func:`gradclip_book.figures.book_repository`).
    """
    import yaml  # the book extra installs PyYAML

    from gradclip_book.figures import CONFIG_FILE, book_repository, book_root

    repository, root = book_repository(start), book_root(start)
    if repository is None or root is None:
        return None
    settings = yaml.safe_load((root / CONFIG_FILE).read_text(encoding="utf-8")) or {}
    title, author = str(settings.get("title", "")), str(settings.get("author", ""))
    year = str(settings.get("copyright", ""))
    bibtex = (f"@misc{{gradclip_book,\n  title = {{{title}}},\n  author = {{{author}}},\n"
              f"  year = {{{year}}},\n  howpublished = {{\\url{{{repository['url']}}}}}\n}}")
    return {"title": title, "author": author, "year": year, "url": repository["url"], "bibtex": bibtex}
