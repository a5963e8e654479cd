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
import torch

from gradclip_book import bugzoo, grids, harness, relu_norms
from gradclip_book import classification_figures as cf
from gradclip_book import performance as perf
from gradclip_book.figures import and_list, seed_range, soft_breaks, table_html
from gradclip_book import scalability as sc

__all__ = ["SECTIONS", "FlowChart", "Row", "adam_evidence", "batch_evidence", "budget_evidence", "bug_zoo_evidence",
           "adamw_cnn_evidence", "direction_evidence", "distributed_evidence", "flow_chart", "guide_rows",
           "guide_table_html",
           "hard_setting_evidence", "link", "lower_lr_evidence", "safety_rows", "slug", "stability_evidence",
           "usable_lr_evidence", "warmup_evidence"]

# --- where the evidence is: page and section title (the anchor is the title's slug) ----------------

SECTIONS: dict[str, tuple[str, str]] = {
    "depth": ("principle", "Depth: which quantity grows by the gain per layer"),
    "rnn-time": ("principle", "Recurrent networks are deep in time"),
    "clip-rule": ("principle", "The clipping rule"),
    "families": ("principle", "The families of clipping, side by side"),
    "when-not": ("principle", "When not to clip"),
    "bug-zoo": ("implementation", "A zoo of clipping bugs"),
    "placement": ("implementation", "Where the call goes"),
    "cls-methods": ("classification", "A first illustration: a deep plain MLP"),
    "cls-lower": ("classification", "Clip, or lower the learning rate?"),
    "cls-stable": ("classification", "The range of learning rates that train"),
    "cls-threshold": ("classification", "Choosing the threshold: a recipe, checked on every network"),
    "cls-fix": ("classification", "Fix the cause: normalisation, residual connections, warm-up"),
    "cls-caps": ("classification", "What clipping caps: the gradient, not the step"),
    "text-rnn": ("text", "Clipping or a lower learning rate?"),
    "text-transformer": ("text", "Best against best, five seeds"),
    "text-adam": ("text", "What this says about Adam and clipping"),
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


# --- chapter 2 and 4: fix the cause; chapter 4: clip or lower, the threshold recipe --------------------------


def fix_cause_evidence(depths: tuple[int, ...] = (8, 16)) -> dict[str, Any]:
    """Chapter 4.6's remedies on the CNNs at ``depths`` (stored runs), and chapter 2.2's initialisation law.

    Per depth, each remedy at its best setting chosen on validation accuracy over the five seeds (the same
    candidates as chapter 4.6's figure), as test-accuracy Scores: ``"bn"`` (residual CNN + BatchNorm, no
    clipping), ``"plain_bn"`` (plain CNN + BatchNorm), ``"clipped"`` (residual CNN without normalisation, global
    norm at its best lr and threshold), ``"none"`` (the same, no remedy) and ``"warmup"``. ``"bn_beats_clip"``: BatchNorm beats the clipped network by the seed-spread rule
    at every depth; ``"residual_vs_plain"``: chapter 4.6's residual against plain CNN, per normalisation (``"bn"``
    or ``"none"``) and depth, judged like chapter 4.4's table: the settings chosen on validation at chapter 4's
    seeds, then compared at each group of ``"seed_groups"`` (chapter 4's seeds, then each of
    :data:`images_grid.UNSEEN_SEED_GROUPS`, as ``"a-b"``) on its own, as ``{"lrs": (residual, plain), "residual",
    "plain" (test-accuracy Scores, one per group), "verdicts"}`` with each verdict ``"residual"``, ``"plain"`` or
    ``"no difference"``; ``"residual_beats_plain"``: whether, with BatchNorm at the deepest of ``depths``, the
    residual CNN beats the plain one at every group (the verdict stands); ``"clip_on_bn"``: per (network with
    BatchNorm, depth of chapter 4), the verdict of the best clipped against the best unclipped setting that stands
    at chapter 4's seeds and at each group of its unseen seeds (chapter 4.4's table, clipped setting chosen on seed
    0; :data:`images_grid.UNSEEN_SEED_GROUPS`, :func:`images_figures.standing`), and ``"table_seeds"``: the number
    of seeds in each of those groups, chapter 4's first; ``"bn_beats_clip_unseen"``: per depth, for each of those
    unseen groups (``"unseen_groups"``, as ``"a-b"``), whether BatchNorm beats the clipped network there (the
    settings of 4.4's table, as chapter 4.6 compares them).
    ``"relu_xavier"``: chapter 2.2's per-layer factor of a ReLU network initialised with Xavier's scale
    (He's is 1), and ``"depth"``: the deepest of ``depths``.
    """
    from dataclasses import replace

    from gradclip_book import depth as dp, harness, images, images_figures as imf, images_grid as ig

    def best(configs: list) -> Any:
        return imf.scores(imf.choose(configs).best.setting, "test_accuracy")

    # the one choice step of the unclipped networks: each CNN's setting chosen on validation at chapter 4's seeds
    chosen = {(model, depth): imf.choose(imf.unclipped(replace(ig.HEADLINE, depth=depth, model=model))).best.setting
              for depth in depths for model in ("residual+bn", "plain+bn", "residual", "plain")}
    out: dict[str, Any] = {"seeds": len(ig.SEEDS), "steps": ig.HEADLINE.steps, "warmup_steps": ig.WARMUP,
                           "depths": list(depths), "by_depth": {}}
    for depth in depths:
        base = replace(ig.HEADLINE, depth=depth)
        out["by_depth"][depth] = {
            "bn": imf.scores(chosen["residual+bn", depth], "test_accuracy"),
            "plain_bn": imf.scores(chosen["plain+bn", depth], "test_accuracy"),
            "clipped": best(imf.clipped(base)),
            "none": imf.scores(chosen["residual", depth], "test_accuracy"),
            "warmup": best([replace(c, warmup=ig.WARMUP) for c in imf.unclipped(base)])}
    out["bn_beats_clip"] = all(harness.beats(r["bn"], r["clipped"]) for r in out["by_depth"].values())
    groups = (tuple(ig.SEEDS), *(tuple(seeds) for seeds in ig.UNSEEN_SEED_GROUPS))
    out["seed_groups"] = [seed_range(seeds) for seeds in groups]
    out["residual_vs_plain"] = _residual_vs_plain(chosen, depths, groups)
    out["residual_beats_plain"] = all(v == "residual" for v in out["residual_vs_plain"]["bn", max(depths)]["verdicts"])
    out["clip_on_bn"] = {}   # chapter 4.4's table: clipped setting chosen on seed 0, unclipped lr on all seeds at depths
    for model in ("residual+bn", "plain+bn"):   # 8 and 16; the verdict that stands at seeds 0-4 and every unseen group
        for depth in ig.DEPTHS:
            case = imf.clip_or_lower(replace(ig.HEADLINE, model=model, depth=depth), ig.SEEDS, (0,),
                                     plain_choice_seeds=ig.SEEDS if depth in depths else (0,))
            again = [imf.replicated(case, seeds) for seeds in ig.UNSEEN_SEED_GROUPS]
            out["clip_on_bn"][model, depth] = imf.standing(case, *again)["verdict"]
    out["table_seeds"] = (len(ig.SEEDS), *(len(seeds) for seeds in ig.UNSEEN_SEED_GROUPS))
    out["unseen_groups"] = out["seed_groups"][1:]
    out["bn_beats_clip_unseen"] = {}   # per depth and unseen group: BatchNorm against the clipped rows of 4.4's table
    table = ig.table_settings(images.load())
    for depth in depths:
        bn, clipped = table["residual+bn", depth][0], table["residual", depth][1]
        out["bn_beats_clip_unseen"][depth] = [
            harness.beats(imf.summary_of(bn, seeds)["test"], imf.summary_of(clipped, seeds)["test"])
            for seeds in ig.UNSEEN_SEED_GROUPS]
    out["relu_xavier"] = dp.predicted_layer_factor(1.0, "relu", "xavier", 64)
    out["depth"] = max(depths)
    return out


def _residual_vs_plain(chosen: dict[tuple[str, int], Any], depths: tuple[int, ...],
                       groups: tuple[tuple[int, ...], ...]) -> dict[tuple[str, int], dict[str, Any]]:
    """Chapter 4.6's residual against plain CNN per (normalisation, depth), judged at each of ``groups`` on its own.

    ``chosen`` maps (model, depth) to the unclipped setting chosen on validation at chapter 4's seeds (the one
    choice step of :func:`fix_cause_evidence`). Each entry is ``{"lrs": (residual, plain), "residual", "plain"
    (test-accuracy Scores, one per group), "verdicts"}``, each verdict ``"residual"``, ``"plain"`` or
    ``"no difference"`` by the seed-spread rule.
    """
    from gradclip_book import harness, images_figures as imf

    out = {}
    for norm, (res_model, plain_model) in (("bn", ("residual+bn", "plain+bn")), ("none", ("residual", "plain"))):
        for depth in depths:
            res, plain = chosen[res_model, depth], chosen[plain_model, depth]
            r = [imf.summary_of(res, seeds)["test"] for seeds in groups]
            p = [imf.summary_of(plain, seeds)["test"] for seeds in groups]
            verdicts = ["residual" if harness.beats(a, b) else "plain" if harness.beats(b, a) else "no difference"
                        for a, b in zip(r, p)]
            out[norm, depth] = {"lrs": (res.lr, plain.lr), "residual": r, "plain": p, "verdicts": verdicts}
    return out


def image_clip_or_lower_evidence() -> dict[str, Any]:
    """Chapter 4.4 on the residual CNN without normalisation: the best clipped run against the best lower
    learning rate within the 200-step budget, at the headline depth (five seeds, chosen on validation).

    Returns ``{"depth", "steps", "verdict", "clip_fraction", "clipped_lr", "threshold", "plain", "clipped"
    (test-accuracy Scores)}``; :func:`budget_evidence` has the same comparison with four times the steps.
    """
    from gradclip_book import images_figures as imf, images_grid as ig

    case = imf.clip_or_lower(ig.HEADLINE)
    k = case["clipped"]
    return {"depth": ig.HEADLINE.depth, "steps": ig.HEADLINE.steps, "verdict": case["verdict"],
            "clip_fraction": k["clip_fraction"], "clipped_lr": k["config"].lr, "threshold": k["config"].threshold,
            "plain": case["plain"]["test"], "clipped": k["test"]}


def recipe_evidence() -> dict[str, Any]:
    """Chapter 4.7's threshold recipe against the best of the grid's thresholds, on every network and depth.

    The recipe's threshold comes from the first :data:`~gradclip_book.harness.recipe.PROBE_STEPS` unclipped norms
    (their 90th percentile), its learning rate is the best of its runs on validation; the grid's best (lr,
    threshold) is chosen on validation too; both at seed 0, by chapter 4.7's
    :func:`~gradclip_book.images_figures.recipe_check` (a diverged choice counts as 0). Returns ``{"probe_steps",
    "quantile", "lower_above" (the share of clipped steps above which the recipe says to lower the lr),
    "networks", "gaps" (grid minus recipe, validation accuracy, one per network and depth), "median_gap",
    "max_gap", "runs" (the recipe's runs, one per learning rate), "grid_runs" (the runs of the grid's thresholds),
    "most" (networks on which the recipe's choice clips more than half of its steps)}``.
    """
    from gradclip_book import images, images_figures as imf, images_grid as ig
    from gradclip_book.harness import recipe

    points = ig.recipe_points(images.load())
    gaps, most, grid_runs = [], 0, 0
    for model in images.MODELS:
        for depth in ig.DEPTHS:
            base = images.ImageConfig(model=model, depth=depth)
            # chapter 4.7's own comparison, so that the two cannot disagree
            check = imf.recipe_check(base, [c for _, c in points if c.model == model and c.depth == depth])
            grid_runs += len(imf.clipped(base))
            most += check["clip_fraction"] > 0.5
            gaps.append(check["gap"])
    return {"probe_steps": recipe.PROBE_STEPS, "quantile": recipe.QUANTILE, "lower_above": recipe.LOWER_LR_ABOVE,
            "networks": len(gaps), "gaps": gaps, "median_gap": float(np.median(gaps)), "max_gap": max(gaps),
            "runs": len(points), "grid_runs": grid_runs, "most": most}


# --- chapter 4.11: text ---------------------------------------------------------------------------------------


def text_evidence(hot_lr: float = 3.0) -> dict[str, Any]:
    """Chapter 4.11's stored text runs: the recurrent networks (SGD) and the small transformer (AdamW).

    ``"recurrent"`` and ``"transformer"`` are :func:`gradclip_book.text_figures.guide_evidence`'s (learning
    rates chosen on validation loss over five seeds, verdicts on test loss). Added: ``"seq_len"``, ``"seeds"``,
    ``"clip"`` (the threshold), ``"hot"``: the tanh RNN at ``hot_lr`` (one step of the scan above its best)
    without and with clipping (test losses per seed of ``"hot_seeds"``, every seed group of
    :data:`gradclip_book.text_figures.SEED_GROUPS`, nats), ``"hot_verdicts"``: the two judged in each group and
    the verdict that stands (:func:`gradclip_book.text_figures.clip_verdicts`), ``"unigram"`` (the test loss of
    guessing each character by its frequency in the training text), ``"rnn_clip_fraction"`` (share of steps
    clipped at the clipped run's chosen lr, mean over seeds), ``"transformer_top"``: at the scan's largest lr
    (seed 0) the plain, clipped and qk-layernorm runs' test losses, and ``"transformer_best_worst"``: the worst arm's
    test loss at the best lr (seed 0).
    """
    from gradclip_book import text, text_figures as tf, text_grid as tg

    ev = tf.guide_evidence()
    parts, vocab = text.split(), len(text.encoded()[0])
    counts = torch.bincount(parts["train"], minlength=vocab).double()
    unigram = float(-(torch.bincount(parts["test"], minlength=vocab).double()
                      * (counts / counts.sum()).log()).sum() / len(parts["test"]))
    seq, clip = tg.HEADLINE_SEQ_LEN, tg.RNN_CLIP
    verdicts = tf.clip_verdicts("rnn", hot_lr, seq_len=seq, threshold=clip)   # the runs of every seed group
    hot_seeds = [s for g in verdicts["groups"] for s in g["seeds"]]
    hot = {arm: [v for g in verdicts["groups"] for v in g[arm].values] for arm in ("plain", "clipped")}
    chosen = ev["recurrent"]["rnn"]["clip_lr"]
    fraction = float(np.mean([float(tf.recurrent_run("rnn", seq, chosen, clip, s)["clip_fraction"])
                              for s in tg.SEEDS]))
    best, top = ev["transformer"]["lr"], max(tg.TRANSFORMER_LRS)
    v0 = lambda arm, lr: tf.test_loss(tf.transformer_run(arm, lr))  # noqa: E731 (seed 0)
    ev.update({"seq_len": seq, "seeds": len(tg.SEEDS), "clip": clip, "hot_lr": hot_lr,
               "hot": hot, "hot_seeds": hot_seeds, "hot_verdicts": verdicts,
               "unigram": unigram, "rnn_clip_fraction": fraction,
               "transformer_top": {"lr": top, **{arm: v0(arm, top) for arm in ("none", "norm", "qk-norm")}},
               "transformer_best_worst": max(v0(arm, best) for arm in tg.ARMS),
               "transformer_lrs": len(tg.TRANSFORMER_LRS)})
    return ev


def _trained(tx: dict[str, Any], arm: str) -> int:
    """How many seeds of :func:`text_evidence`'s hot ``arm`` train: end below the loss of guessing by character
    frequency (a diverged seed does not)."""
    return sum(v is not None and v < tx["unigram"] for v in tx["hot"][arm])


def _trained_words(tx: dict[str, Any]) -> str:
    """How many seeds train (:func:`_trained`) one step above the tanh RNN's best learning rate, clipped and not:
    what "widened the range of learning rates that train" rests on."""
    n = len(tx["hot_seeds"])
    return (f"at lr {tx['hot_lr']:g}, {_trained(tx, 'clipped')} of {n} seeds clipped and "
            f"{_trained(tx, 'plain')} of {n} unclipped ended below the loss of guessing by character frequency")


def _hot_words(tx: dict[str, Any]) -> str:
    """:func:`text_evidence`'s tanh RNN one step above its best learning rate, clipped and not, in words."""
    from gradclip_book import text_figures as tf

    plain = [v for v in tx["hot"]["plain"] if v is not None]
    clipped = [v for v in tx["hot"]["clipped"] if v is not None]
    wrecked = len(tx["hot"]["plain"]) - _trained(tx, "plain")
    v = tx["hot_verdicts"]
    standing = {"clipping": "clipped lower stands", "no clipping": "unclipped lower stands"}
    stands = standing.get(v["standing"], "clipped lower does not stand"
                          if any(g["verdict"] == "clipping" for g in v["groups"]) else "no verdict stands")
    return (f"At lr {tx['hot_lr']:g} (seeds {seed_range(tx['hot_seeds'])}) the unclipped seeds end between "
            f"{min(plain):.2f} and {max(plain):.2f} nats ({wrecked} of {len(tx['hot_seeds'])} worse than guessing by "
            f"character frequency, {tx['unigram']:.2f}), the clipped ones between {min(clipped):.2f} and "
            f"{max(clipped):.2f}; judged by the seed-spread rule per group of seeds ({tf.groups_short(v)}), {stands} "
            f"(a verdict stands only where every group gives it).")


# --- d2l's classic exercises: train the RNN without clipping; ReLU instead of tanh -----------------------


def rnn_norms(nonlinearity: str = "tanh", seq_len: int = 32, lr: float = 1.0, steps: int = 30, seed: int = 0,
              threshold: float | None = None) -> list[float]:
    """The pre-clip gradient norms of the first ``steps`` steps of chapter 4.11's recurrent network, trained afresh.

    The same model, data stream, loss and loop as :func:`gradclip_book.text_runs.train` for
    ``TextConfig(model="rnn", seq_len=seq_len, lr=lr, seed=seed, ...)`` (plain SGD, the hidden state carried
    between windows), except that with ``nonlinearity="relu"`` the recurrent layer computes
    :math:`h_t = \\max(0, W_{ih} x_t + W_{hh} h_{t-1} + b)` with the same initial weights. With ``"tanh"`` it
    reproduces the stored run's norms. About 0.7 s for 30 steps on one CPU thread.

    Raises:
        ValueError: ``nonlinearity`` is not ``"tanh"`` or ``"relu"``.
    """
    from torch import nn

    from gradclip_book import harness, text, text_runs as tr

    if nonlinearity not in ("tanh", "relu"):
        raise ValueError(f"nonlinearity must be 'tanh' or 'relu', got {nonlinearity!r}")
    config = tr.TextConfig(model="rnn", seq_len=seq_len, lr=lr, steps=steps, seed=seed,
                           method="none" if threshold is None else "norm", threshold=threshold)
    model = tr.build(config)
    if nonlinearity == "relu":
        tanh = model.rnn
        model.rnn = nn.RNN(tanh.input_size, tanh.hidden_size, batch_first=True, nonlinearity="relu")
        model.rnn.load_state_dict(tanh.state_dict())
    optimizer = tr.OPTIMIZERS[config.optimizer](list(model.parameters()), config.lr)
    generator = torch.Generator().manual_seed(config.seed)   # the stream's offset, as text_runs draws it
    offset = int(torch.randint(0, config.seq_len, (1,), generator=generator))
    batches = text.stream_batches(text.split()["train"], config.batch, config.seq_len, offset)
    run = harness.train(model, optimizer, batches, steps, loss_fn=tr.CarriedState(), method=config.method,
                        threshold=config.threshold)
    return [float(n) for n in run.grad_norm]


def exercise_evidence(seq_len: int = 32, lr: float = 1.0, steps: int = 30) -> dict[str, Any]:
    """The answers of chapter 6's exercises, from chapter 4.11's stored runs and the stored ReLU norms.

    ``"no_clip"``: the tanh RNN with d2l's learning rate ``lr`` on windows of ``seq_len`` characters, 500 steps:
    validation loss without clipping minus with ``max_norm`` = 1 (nats), the share of steps clipping fired on,
    and the same validation losses at three times the learning rate (an exercise's answer read on validation:
    the text it would tune on). ``"relu"``: the largest pre-clip gradient norm of the first ``steps`` steps with
    tanh and with ReLU per seed of :data:`gradclip_book.relu_norms.SEEDS` (``"per_seed"``: ``{seed: {"tanh_max",
    "relu_max", "ratio"}}``, from ``chapters/data/relu_norms.json``), the smallest ratio over the seeds
    (``"min_ratio"``, at ``"min_seed"``: the answer, which holds at every seed) and seed 0's numbers
    (``"tanh_max"``, ``"relu_max"``, ``"ratio"``; ``"tanh_first"``, ``"relu_first"``: the first step's norms).
    ``"relu_fresh"``: seed 0's ReLU norms trained afresh here (:func:`rnn_norms`), to check the file against;
    ``"tanh_stored"``: seed 0's tanh norms from chapter 4.11's stored run.
    """
    from gradclip_book import text_figures as tf, text_grid as tg

    plain, clipped = (tf.recurrent_run("rnn", seq_len, lr, t) for t in (None, tg.RNN_CLIP))
    hot = {t: tf.val_loss(tf.recurrent_run("rnn", seq_len, 3 * lr, t)) for t in (None, tg.RNN_CLIP)}
    curve = plain["curve"]
    tanh = [float(n) for s, n in zip(curve["step"], curve["grad_norm"]) if int(s) < steps]
    if len(tanh) != steps:
        raise ValueError(f"the stored curve does not hold the first {steps} steps one by one")
    relu = rnn_norms("relu", seq_len, lr, steps)
    stored = relu_norms.load()
    if (stored["seq_len"], stored["lr"]) != (seq_len, lr) or stored["steps"] < steps:
        raise ValueError(f"the stored ReLU norms are of another setting; recompute them with `{relu_norms.COMMAND}`")
    per_seed = {int(seed): {"tanh_max": max(r["tanh"][:steps]), "relu_max": max(r["relu"][:steps])}
                for seed, r in stored["seeds"].items()}
    for row in per_seed.values():
        row["ratio"] = row["relu_max"] / row["tanh_max"]
    min_seed = min(per_seed, key=lambda seed: per_seed[seed]["ratio"])
    zero = stored["seeds"]["0"]
    return {"seq_len": seq_len, "lr": lr, "steps": steps, "train_steps": int(plain["steps_run"]),
            "clip": tg.RNN_CLIP,
            "no_clip": {"plain": tf.val_loss(plain), "clipped": tf.val_loss(clipped),
                        "change": tf.val_loss(plain) - tf.val_loss(clipped),
                        "clip_fraction": float(clipped["clip_fraction"]),
                        "hot_lr": 3 * lr, "hot_plain": hot[None], "hot_clipped": hot[tg.RNN_CLIP]},
            "relu": {"tanh_max": max(zero["tanh"][:steps]), "relu_max": max(zero["relu"][:steps]),
                     "ratio": per_seed[0]["ratio"], "tanh_first": zero["tanh"][0], "relu_first": zero["relu"][0],
                     "per_seed": per_seed, "min_ratio": per_seed[min_seed]["ratio"], "min_seed": min_seed,
                     "relu_fresh": relu, "tanh_stored": tanh, "relu_stored": zero["relu"][:steps],
                     "tanh_stored_file": zero["tanh"][:steps]}}


def exercises(ev: dict[str, Any]) -> list[Any]:
    """Chapter 6's two exercises (d2l's, section 9.5) as static :class:`gradclip_book.exercise.Exercise` widgets,
    every answer and number in them from ``ev`` (:func:`exercise_evidence`)."""
    from gradclip_book.exercise import Exercise

    nc, re_ = ev["no_clip"], ev["relu"]
    setting = (f"chapter 4.11's tanh RNN with d2l's settings: plain SGD at learning rate {ev['lr']:g}, windows of "
               f"{ev['seq_len']} characters (d2l uses 35), {ev['train_steps']} steps, seed 0")
    no_clip = Exercise(
        "ch6-no-clip",
        prompt=(f"**1. Train the RNN without clipping.** Take {setting}, clipped at `max_norm` = {ev['clip']:g}. "
                f"Remove the clipping. By how many nats per character does the final validation loss change "
                f"(positive: worse without clipping)? Within 0.02 counts."),
        answer=nc["change"], tolerance=0.02, relative=False, unit="nats",
        hint="Before predicting a blow-up, ask how often a gradient norm exceeds 1 at this learning rate "
             "(the threshold slider of chapter 4.11's figure of the training runs shows it).",
        solution_md=(f"Clipped, the run ends at {nc['clipped']:.4f} nats and clips only "
                     f"{100 * nc['clip_fraction']:.1f}% of its steps; without clipping it ends at {nc['plain']:.4f}: "
                     f"a change of {nc['change']:+.4f} nats, nothing. At d2l's learning rate clipping is a guard that "
                     f"hardly engages. At {nc['hot_lr']:g} it decides the run: {nc['hot_plain']:.2f} nats without "
                     f"clipping, {nc['hot_clipped']:.2f} with it (same windows and seed)."))
    seeds = sorted(re_["per_seed"])
    rows = [re_["per_seed"][seed] for seed in seeds]
    ratios = [f"{r['ratio']:.1f}" for r in rows]
    relu_maxima = ", ".join(f"{r['relu_max']:.1f}" for r in rows)
    relu_setting = (f"chapter 4.11's tanh RNN with d2l's settings (plain SGD at learning rate {ev['lr']:g}, windows of "
                    f"{ev['seq_len']} characters)")
    relu = Exercise(
        "ch6-relu",
        prompt=(f"**2. ReLU instead of tanh.** Take {relu_setting} without clipping, and replace tanh by ReLU in "
                f"the recurrent layer (same initial weights). At each of seeds {seeds[0]} to {seeds[-1]}, divide the "
                f"ReLU network's largest gradient norm over the first {ev['steps']} steps by the tanh network's "
                f"(the tanh networks' largest norms are {min(r['tanh_max'] for r in rows):.2f} to "
                f"{max(r['tanh_max'] for r in rows):.2f}). The {len(seeds)} ratios differ a lot from seed to seed: "
                f"what is the smallest of them? Within 50% counts."),
        answer=re_["min_ratio"], tolerance=0.5, relative=True,
        hint="tanh saturates: its slope is at most 1 and falls towards 0 for large inputs, and its state stays in "
             "(-1, 1). What bounds ReLU's state, and its slope where a unit is active?",
        solution_md=(f"At seeds {seeds[0]} to {seeds[-1]} the ratios are "
                     f"{', '.join(ratios[:-1])} and {ratios[-1]} (ReLU's largest norms {relu_maxima}); the smallest is "
                     f"{re_['min_ratio']:.1f}, at seed {re_['min_seed']}. ReLU passes the gradient with slope 1 "
                     f"wherever a unit is active and does not bound the state, so nothing damps a growing product of "
                     f"Jacobians (chapter 2.3), and how far a spike grows depends on the seed: one seed's ratio is "
                     f"no answer, the smallest is what holds at every seed. So yes, a ReLU RNN needs clipping at "
                     f"least as much: at every seed the spikes that `max_norm` = {ev['clip']:g} would cap are at "
                     f"least {re_['min_ratio']:.1f} times larger. This is {len(seeds)} seeds and {ev['steps']} steps; "
                     f"whether the clipped ReLU network then trains as well as the tanh one is not measured here."))
    return [no_clip, relu]


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
    target loss), "clipped_acc", "plain_acc", "clipped_seeds" (seeds of chapter 4's stability scan behind the
    clipped run)}``.
    """
    row = perf.lower_lr_comparison()[depth]
    c, p = row["clipped"], row["plain"]
    return {"clipped_lr": c["lr"], "clip_fraction": c["clip_fraction"], "plain_lr": p["lr"],
            "slowdown": row["slowdown"], "clipped_acc": c["accuracy"], "plain_acc": p["accuracy"],
            "clipped_seeds": len(c["runs"])}


def warmup_evidence(threshold: float = grids.HARD_THRESHOLD) -> dict[str, Any]:
    """Chapter 5.1's warm-up against clipping: per arm the learning rates at which every seed trains, and the best accuracy.

    "Trains" is chapter 4's rule (not diverged, test accuracy >= 90%); the set need not be contiguous.
    Returns ``{arm: {"lrs": sorted list, "words": the set in words, "chosen_lr": the lr with the best mean
    validation accuracy, "best": the mean test accuracy at that lr, "score": its test accuracies
    (:func:`performance.arm_score`)}}`` for the arms of :data:`performance.WARMUP_ARMS`, and ``"verdicts"``: the
    pairs of arms ``(a, b)`` where ``a`` beats ``b`` at those lrs (:func:`performance.verdict`, the seed-spread rule);
    ``"warmup_on_clipping"``: per clipping threshold of :data:`grids.OPT_THRESHOLDS`, ``{"verdict": whether adding
    the warm-up to clipping "helps", "hurts" or makes "no difference" by that rule, "both", "clipping": the two
    Scores}``, each at its own lr chosen on validation.
    """
    arms = perf.warmup_summary(threshold)
    out: dict[str, Any] = {arm: {"lrs": s["stable_lrs"], "words": perf.lrs_words(s["stable_lrs"], grids.SGD_LRS),
                                 "chosen_lr": s["chosen_lr"], "best": s["chosen_accuracy"],
                                 "score": perf.arm_score(arm, threshold, s["chosen_lr"])} for arm, s in arms.items()}
    out["verdicts"] = perf.verdict({arm: out[arm]["score"] for arm in arms})
    on_clipping = {}
    for t in (t for t in grids.OPT_THRESHOLDS if t is not None):
        by_arm = perf.warmup_summary(t)
        pair = {arm: perf.arm_score(arm, t, by_arm[arm]["chosen_lr"]) for arm in ("both", "clipping")}
        won = perf.verdict(pair)
        on_clipping[t] = {"verdict": "helps" if ("both", "clipping") in won else "hurts" if won else "no difference",
                          **pair}
    out["warmup_on_clipping"] = on_clipping
    return out


def adamw_cnn_evidence() -> dict[str, Any]:
    """Chapter 4.8's AdamW on the residual CNN without normalisation (stored runs), as that section computes it.

    AdamW at its best unclipped learning rate (chosen on validation over chapter 4's seeds), without and with
    ``max_norm`` = 1, over chapter 4's five seeds and its two unseen groups of five (chapter 4.8's three groups),
    and clipped AdamW against clipped SGD at its best setting. Returns ``{"lr", "seeds" (fifteen), "first_seeds",
    "plain_low", "clip_low" (worst seed's test accuracy over the fifteen), "lead_first" (clipped AdamW beats clipped
    SGD at the first seeds), "unseen_groups" (the unseen groups' seeds), "lead_unseen" (whether it beats it, one
    bool per unseen group), "unseen_group_size" (the size of each unseen group; ``None`` if their sizes differ)}``.
    """
    from dataclasses import replace

    from gradclip_book import harness, images_figures as imf, images_grid as ig

    plain = imf.choose(imf.unclipped(replace(ig.HEADLINE, optimizer="adamw"), ig.ADAMW_LRS)).best.setting
    clip = replace(plain, method="norm", threshold=1.0)
    sgd = imf.clip_or_lower(ig.HEADLINE)["clipped"]["config"]
    first, unseen = tuple(ig.SEEDS), [tuple(group) for group in ig.UNSEEN_SEED_GROUPS]
    every = first + tuple(seed for group in unseen for seed in group)
    sizes = {len(group) for group in unseen}

    def test(config: Any, seeds: tuple) -> Any:
        return imf.summary_of(config, seeds)["test"]

    return {"lr": plain.lr, "seeds": len(every), "first_seeds": len(first),
            "plain_low": test(plain, every).low, "clip_low": test(clip, every).low,
            "lead_first": harness.beats(test(clip, first), test(sgd, first)), "unseen_groups": unseen,
            "lead_unseen": [harness.beats(test(clip, group), test(sgd, group)) for group in unseen],
            "unseen_group_size": sizes.pop() if len(sizes) == 1 else None}


def _adamw_lead_words(aw: dict[str, Any]) -> str:
    """Where clipped AdamW led clipped SGD (:func:`adamw_cnn_evidence`), in words that follow "led clipped SGD".

    Example:
        >>> aw = {"first_seeds": 5, "lead_first": True, "unseen_groups": [(5, 6), (7, 8)],
        ...       "lead_unseen": [False, True], "unseen_group_size": 2}
        >>> _adamw_lead_words(aw)
        'at the first 5 seeds and at seeds 7-8, not at seeds 5-6'
    """
    if aw["lead_first"] and not any(aw["lead_unseen"]) and aw["unseen_group_size"] is not None:
        return (f"at the first {aw['first_seeds']} seeds only, not at either group of "
                f"{aw['unseen_group_size']} unseen ones")
    led = [seed_range(g) for g, lead in zip(aw["unseen_groups"], aw["lead_unseen"]) if lead]
    missed = [seed_range(g) for g, lead in zip(aw["unseen_groups"], aw["lead_unseen"]) if not lead]
    first = f"at the first {aw['first_seeds']} seeds" if aw["lead_first"] else ""
    where = " and ".join(part for part in (first, f"at seeds {and_list(led)}" if led else "") if part)
    return (where or "at no group of seeds") + (f", not at seeds {and_list(missed, 'or')}" if missed and where else "")


def adam_evidence() -> dict[str, Any]:
    """Chapter 5.1's Adam against SGD: what clipping changes for each optimizer.

    Returns ``{opt: {"n_lrs", "plain_calm", "clip_calm", "plain_best", "clip_best", "clip_threshold",
    "verdict"}}``: the learning rates scanned, how many of them no seed diverges at without clipping and with the
    better threshold, the mean test accuracy without and with clipping at the settings chosen on validation (the lr,
    and for clipping the threshold too, ``clip_threshold``), and whether clipping ``"helps"``, ``"hurts"`` or makes
    ``"no difference"`` there by the seed-spread rule (:func:`performance.verdict`).
    """
    summary = perf.optimizer_summary()
    out = {}
    for opt, by_t in summary.items():
        plain = by_t[None]
        clipped = {t: s for t, s in by_t.items() if t is not None}
        calm = [sum(d == 0 for d in s["diverged"].values()) for s in clipped.values()]
        chosen_t = max(clipped, key=lambda t: clipped[t]["chosen_val_accuracy"])
        pair = {side: harness.score(side, [None if r["diverged_at"] is not None else float(r["test_accuracy"])
                                           for r in perf.opt_runs(s["chosen_lr"], t, 0, opt)])
                for side, t, s in (("clipped", chosen_t, clipped[chosen_t]), ("plain", None, plain))}
        won = perf.verdict(pair)
        out[opt] = {"n_lrs": len(plain["diverged"]), "plain_calm": sum(d == 0 for d in plain["diverged"].values()),
                    "clip_calm": max(calm), "plain_best": plain["chosen_accuracy"],
                    "clip_best": clipped[chosen_t]["chosen_accuracy"], "clip_threshold": chosen_t,
                    "verdict": "helps" if ("clipped", "plain") in won else "hurts" if won else "no difference"}
    return out


# --- chapter 5.2: batch size and distributed training ---------------------------------------------------


def _printed(fraction: float) -> float:
    """A fraction as chapter 5.2 prints it (``scalability.percent``), back as a fraction."""
    return float(sc.percent(fraction)[:-1]) / 100


def batch_evidence() -> dict[str, Any]:
    """Chapter 5.2's AGC against global-norm clipping per batch size, by the book's protocol (``scalability.SEEDS``).

    Each method's knob is chosen on validation accuracy (``scalability.chosen_per_batch``); the means are the test
    accuracies of the chosen settings (over the seeds that finished).

    Returns ``{"batches", "seeds", "agc": {batch: (lambda, test mean)}, "norm": {batch: (c, test mean)},
    "none": {batch: test mean without clipping at the scaled learning rate, None if every seed diverged},
    "none_tuned": {batch: (learning rate chosen without clipping, test mean)}, "max_gap": largest |AGC - norm| over
    the batches, "wins": [(batch, method)] where one beats the other by the seed-spread rule
    (``harness.beats``), "lower_lr_beaten": [(batch, method)] where a clipping method beats the unclipped run at
    its chosen learning rate by that rule, and what of these survives leaving out any one seed
    (``scalability.leave_one_seed_out``): "robust_wins" [(batch, method)] of AGC against global clipping,
    "fragile" [batch] where that verdict flips with one seed left out, "robust_lower_lr_beaten" /
    "robust_lower_lr_wins" [(batch, method)] where the clipping method robustly beats / is beaten by the lower
    learning rate, "fragile_lower" [(batch, method)] where that verdict flips}``.
    """
    grid, controls = sc.load(), sc.load(sc.CONTROLS_FILE)
    best = sc.chosen_per_batch(grid, controls)
    batches = sorted(best)
    loso = sc.leave_one_seed_out(grid, controls)   # which of these verdicts survive leaving out any one seed
    versus = sc.robust_verdicts(loso, ("agc", "norm"))
    lower = {m: sc.robust_verdicts(loso, ("none_tuned", m)) for m in ("agc", "norm")}
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
            "wins": wins,
            "lower_lr_beaten": [(b, m) for b in batches for m in ("agc", "norm")
                                if harness.beats(best[b][m]["test"], best[b]["none_tuned"]["test"])],
            "robust_wins": sorted(versus["wins"].items()),
            "fragile": sorted(versus["fragile"]),
            "robust_lower_lr_beaten": sorted((b, m) for m in ("agc", "norm") for b, w in lower[m]["wins"].items()
                                             if w == m),
            "robust_lower_lr_wins": sorted((b, m) for m in ("agc", "norm") for b, w in lower[m]["wins"].items()
                                           if w == "none_tuned"),
            "fragile_lower": sorted((b, m) for m in ("agc", "norm") for b in lower[m]["fragile"])}


def _at(batches: list[int]) -> str:
    """"batch 16" or "batches 16, 64 and 1024"."""
    return f"batch {batches[0]}" if len(batches) == 1 else f"batches {and_list([str(b) for b in batches])}"


def _batches(pairs: list[tuple[int, str]], method: str) -> list[int]:
    return [b for b, m in pairs if m == method]


def _batch_advice(b: dict[str, Any]) -> str:
    """The large-batch row's recommendation, from the verdicts that survive leaving out any one seed."""
    if b["robust_lower_lr_beaten"]:
        return ("Clip: " + " and ".join(f"{_NAMES[m]} beat the lower learning rate at {_at(_batches(b['robust_lower_lr_beaten'], m))}"
                                        for m in ("agc", "norm") if _batches(b["robust_lower_lr_beaten"], m))
                + " with any one seed left out")
    first = "Lower the learning rate first (no clipping method robustly beat it)"
    agc, norm = _batches(b["robust_wins"], "agc"), _batches(b["robust_wins"], "norm")
    if norm and not agc:
        return (first + f"; to keep the linearly scaled rate, clip by a global threshold tuned at each batch size "
                f"(AGC, adaptive_clip_grad_, was robustly worse at {_at(norm)})")
    if agc and not norm:
        return (first + f"; to keep the linearly scaled rate, clip with AGC (adaptive_clip_grad_) tuned at each batch "
                f"size (robustly ahead of a global threshold at {_at(agc)})")
    return (first + "; to keep the linearly scaled rate, clip by a global threshold or AGC (adaptive_clip_grad_), "
            "tuned at each batch size: no difference between them survived leaving out one seed")


def _batch_facts(b: dict[str, Any]) -> str:
    """The large-batch row's evidence: chapter 5.2's chosen settings, accuracies and verdicts, robust or not."""
    def listed(pairs: list[tuple[int, str]]) -> str:
        return " and ".join(f"{_NAMES[m]} at batch {bb}" for bb, m in pairs)

    text = (f"On chapter 5.2's MLP ({b['seeds']} seeds, knobs chosen on validation): AGC λ "
            f"{', '.join(f'{a[0]:g}' for a in b['agc'].values())} and global c "
            f"{', '.join(f'{n[0]:g}' for n in b['norm'].values())} at batches {', '.join(map(str, b['batches']))}, "
            f"with mean test accuracy {', '.join(_pct(a[1]) for a in b['agc'].values())} (AGC) and "
            f"{', '.join(_pct(n[1]) for n in b['norm'].values())} (global). By the seed-spread rule "
            + ("neither is better at any batch size" if not b["wins"] else
               " and ".join(f"{_NAMES[m]} is better at batch {bb}" for bb, m in b["wins"]) + ", neither at the others")
            + f". Without clipping at the lr chosen on validation "
            f"({', '.join(f'{t[0]:g}' for t in b['none_tuned'].values())}): "
            f"{', '.join(_pct(t[1]) for t in b['none_tuned'].values())}, "
            + ("beaten by neither clipping method at any batch size" if not b["lower_lr_beaten"] else
               "beaten by " + listed(b["lower_lr_beaten"])) + ". ")
    robust = [f"{_NAMES[m]} ahead at batch {bb}" for bb, m in b["robust_wins"]]
    robust += [f"{_NAMES[m]} ahead of the lower lr at batch {bb}" for bb, m in b["robust_lower_lr_beaten"]]
    robust += [f"the lower lr ahead of {_NAMES[m]} at batch {bb}" for bb, m in b["robust_lower_lr_wins"]]
    text += ("Leaving out any one seed, " + ("no win survives" if not robust else "only these wins survive: "
                                              + "; ".join(robust)))
    flips = [f"AGC against global clipping at {_at(b['fragile'])}"] if b["fragile"] else []
    flips += [f"{_NAMES[m]} against the lower lr at {_at(_batches(b['fragile_lower'], m))}" for m in ("agc", "norm")
              if _batches(b["fragile_lower"], m)]
    return text + ("; the verdict flips with one seed left out for " + "; ".join(flips) if flips else "") + "."


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
    ``scaler=``) raises, ``process_group=`` gives plain shards their global norm, an attached
    ``GradientMonitor`` records the norm the step used, or an attached adaptive clipper clips in the right
    place. Returns ``{"total", "by_default": [names], "silent": [names], "raises_opt_in", "process_group",
    "logs", "attach": [names], "uncaught": [names]}`` (``uncaught``: neither by default nor once opted in).
    """
    counts = bugzoo.response_counts()
    opted = set(counts["raises_opt_in"]) | set(counts["process_group"]) | set(counts["logs"]) | set(counts["attach"])
    return {"total": len(bugzoo.BUGS), "by_default": counts["caught_by_default"], "silent": counts["silent"],
            "raises_opt_in": counts["raises_opt_in"], "process_group": counts["process_group"],
            "logs": counts["logs"], "attach": counts["attach"],
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
    also: tuple[str, ...] = ()  # further keys of SECTIONS whose measurements the evidence also cites

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


def _ms(score: Any, digits: int = 1) -> str:
    """A test-accuracy Score as "mean ± std" in percent (chapter 4's format)."""
    return f"{100 * score.mean:.{digits}f} ± {100 * score.std:.{digits}f}%"


def _nats(pair: tuple[float, float]) -> str:
    return f"{pair[0]:.3f} ± {pair[1]:.3f} nats"


_VERDICT = {"helps": "helps", "hurts": "hurts", "no difference": "makes no difference"}
_SPREAD = {"helps": "a gain beyond the seed spread", "hurts": "a loss beyond the seed spread",
           "no difference": "no difference"}


def _accuracy_words(by_threshold: dict[float, dict[str, Any]]) -> str:
    """", and raised the accuracy at max_norm 1 only"-style words for :func:`warmup_evidence`'s verdicts."""
    def at(kind: str) -> str:
        return " and ".join(f"max_norm {t:g}" for t, v in by_threshold.items() if v["verdict"] == kind)
    helps, hurts = at("helps"), at("hurts")
    if not helps and not hurts:
        return ", and did not change the accuracy"
    return (f", and raised the accuracy at {helps} only" if helps else "") + (f", lowered it at {hurts}" if hurts else "")


def _bn_against_clip(fx: dict[str, Any]) -> str:
    """BatchNorm against the clipped network: at chapter 4's seeds, then at each unseen group, per depth."""
    if not fx["bn_beats_clip"]:
        return ""
    groups = fx["unseen_groups"]
    held = [str(d) for d, wins in fx["bn_beats_clip_unseen"].items() if all(wins)]
    text = f": better by the seed-spread rule at both depths at these {fx['seeds']} seeds"
    if held:
        text += f", and again at seeds {' and '.join(groups)} at depth {' and '.join(held)}"
    for depth, wins in fx["bn_beats_clip_unseen"].items():
        if not all(wins):
            text += (f"; at depth {depth} not at seeds "
                     + " or ".join(g for g, won in zip(groups, wins) if not won))
    return text


def _residual_record(r: dict[str, Any]) -> dict[str, Any]:
    """One (normalisation, depth) of ``residual_vs_plain`` as the sentence needs it: the indices of the seed groups
    where the residual CNN won (``"won"``), where it did not (``"not_won"``) and where the plain one won
    (``"lost_to_plain"``), the (residual, plain) Score per group (``"pairs"``) and the verdict that stands at every
    group (``"standing"``, ``None`` if none does)."""
    v = r["verdicts"]
    return {"won": [i for i, x in enumerate(v) if x == "residual"],
            "not_won": [i for i, x in enumerate(v) if x != "residual"],
            "lost_to_plain": [i for i, x in enumerate(v) if x == "plain"],
            "pairs": list(zip(r["residual"], r["plain"])),
            "standing": None if harness.standing_verdict(v) == "no difference" else v[0]}


def _named_seeds(groups: list[str], indices: Any, word: str = "and") -> str:
    """The seed groups at ``indices`` as prose, e.g. "seeds 0-4 and 10-14"."""
    return "seeds " + and_list([groups[i] for i in indices], word)


def _residual_clause(words: str, records: dict[int, dict[str, Any]], groups: list[str]) -> str:
    """One normalisation's half of the sentence: the depths where the residual CNN won first (every group's numbers
    quoted), then where the plain one was the better one. ``records`` maps depth to :func:`_residual_record`."""
    depths = list(records)
    won_at = [d for d in depths if records[d]["won"]]
    if not won_at:
        text = f"{words} the residual CNN beat the plain one at no depth or group"
    else:
        parts = []
        for d in won_at + [d for d in depths if d not in won_at]:
            rec = records[d]
            if not rec["won"]:
                parts.append(f"at depth {d} at no group")
                continue
            part = f"at depth {d} at {_named_seeds(groups, rec['won'])}"
            if rec["not_won"]:
                part += f" but not at {_named_seeds(groups, rec['not_won'], 'or')}"
            quoted = ", ".join(f"{name}: {_ms(a)} against {_ms(b)}" for name, (a, b) in zip(groups, rec["pairs"]))
            parts.append(f"{part} (residual against plain, {quoted})")
        text = f"{words} the residual CNN beat the plain one " + " and ".join(parts)
    for d in depths:
        lost = records[d]["lost_to_plain"]
        if lost:
            pairs = records[d]["pairs"]
            quoted = ", ".join(f"{_ms(pairs[i][1])} against {_ms(pairs[i][0])}" for i in lost)
            text += f", and the plain CNN was the better one at depth {d} at {_named_seeds(groups, lost)} ({quoted})"
    return text


def _residual_against_plain(fx: dict[str, Any]) -> str:
    """Chapter 4.6's residual against plain CNN at each group of seeds, with and without BatchNorm (4.4's rule)."""
    groups = fx["seed_groups"]
    records = {key: _residual_record(r) for key, r in fx["residual_vs_plain"].items()}
    named = {"bn": "with BatchNorm", "none": "without normalisation"}

    clauses = {norm: _residual_clause(words, {d: records[norm, d] for d in fx["depths"]}, groups)
               for norm, words in named.items()}
    stands = [f"{named[norm]} at depth {d} (the {rec['standing']} CNN)"
              for (norm, d), rec in records.items() if rec["standing"]]
    if stands:
        verdict = "a verdict stands only " + " and ".join(stands)
    else:
        verdict = "no verdict on residual connections stands"
    count = {2: "two", 3: "three", 4: "four"}.get(len(groups), str(len(groups)))
    return (f"Residual connections, judged at {_named_seeds(groups, range(len(groups)))} (settings chosen on "
            f"validation at {_named_seeds(groups, [0])}; a verdict stands only if all {count} groups give it): "
            f"{clauses['bn']}; {clauses['none']}: {verdict}")


def _separation(by_depth: dict[int, dict[str, Any]], seeds: int) -> str:
    """Where every BatchNorm seed beat every clipped seed, and where the seeds overlap (a lead that rests on them)."""
    apart = [d for d, r in by_depth.items() if min(r["bn"].finished) > max(r["clipped"].finished)]
    overlap = [d for d in by_depth if d not in apart]
    text = "".join(f"; at depth {d} every BatchNorm seed beat every clipped one" for d in apart)
    return text + "".join(f"; at depth {d} the seeds overlap, so the lead rests on these {seeds} seeds"
                          for d in overlap)


def guide_rows(evidence: dict[str, dict[str, Any]]) -> list[Row]:
    """The decision guide, in the order to ask its questions, each evidence sentence built from ``evidence``.

    ``evidence`` maps ``"fix"``, ``"hard"``, ``"recipe"``, ``"lower"``, ``"image"``
    (:func:`image_clip_or_lower_evidence`),
    ``"budget"``, ``"text"``, ``"warmup"``, ``"adam"``, ``"adamw_cnn"``, ``"batch"``, ``"distributed"``,
    ``"direction"`` and ``"bugs"``
    to the results of the ``*_evidence`` functions of those names. The rows do not contradict each other: where
    clipping fires on most steps the guide says to compare it with a lower learning rate given the same and more
    steps and keep whichever wins, and the one row that recommends clipping where it fires on most steps (the
    diverging MLP rescued at max_norm 0.1) says to try a lower learning rate too.
    """
    fx, h, rc, lo = evidence["fix"], evidence["hard"], evidence["recipe"], evidence["lower"]
    im, bu, tx, w = evidence["image"], evidence["budget"], evidence["text"], evidence["warmup"]
    ad, aw, b, d = evidence["adam"], evidence["adamw_cnn"], evidence["batch"], evidence["distributed"]
    dr, bz = evidence["direction"], evidence["bugs"]
    by = fx["by_depth"]
    d1, d2 = fx["depths"][0], fx["depths"][-1]
    norm = h["methods"]["norm", grids.HARD_THRESHOLD]
    failed = ", ".join(_label(m, t) for m, t in h["fail"] if m != "none")
    rnn, lstm, tr = tx["recurrent"]["rnn"], tx["recurrent"]["lstm"], tx["transformer"]
    top = tx["transformer_top"]
    same_t = all(v == "no difference" for v in tr["verdicts"].values())
    n_bn = len(fx["clip_on_bn"])
    bn_same = sum(v == "no difference" for v in fx["clip_on_bn"].values())
    sizes = fx["table_seeds"][1:]   # chapter 4.4's unseen seed groups
    unseen_seeds = (f"{sizes[0]} seeds" if len(sizes) == 1 else f"each of {len(sizes)} groups of {sizes[0]} seeds"
                    if len(set(sizes)) == 1 else " and ".join(f"{n} seeds" for n in sizes))
    rows = [
        Row("Any network whose gradients explode or whose seeds scatter: start here",
            "Fix the cause first: normalisation (BatchNorm) and an initialisation matched to the activation (He's "
            "for ReLU); then clipping is a guard, not a cure",
            f"On chapter 4's CNNs ({fx['seeds']} seeds, {fx['steps']} steps, each remedy at its best setting chosen "
            f"on validation), the residual CNN with BatchNorm and no clipping reaches {_ms(by[d1]['bn'])} test "
            f"accuracy at depth {d1} and {_ms(by[d2]['bn'])} at depth {d2}, against {_ms(by[d1]['clipped'])} and "
            f"{_ms(by[d2]['clipped'])} for the best clipped network without normalisation"
            + _bn_against_clip(fx)
            + _separation(by, fx["seeds"])
            + f". A {fx['warmup_steps']}-step warm-up reaches {_ms(by[d1]['warmup'])} and {_ms(by[d2]['warmup'])}, "
            f"no remedy {_ms(by[d1]['none'])} and {_ms(by[d2]['none'])}. " + _residual_against_plain(fx)
            + f". With BatchNorm, clipping made no "
            f"difference in {bn_same} of {n_bn} network-depth pairs (at {fx['table_seeds'][0]} seeds and again at "
            f"{unseen_seeds} no choice saw). By chapter 2.2's law, Xavier's scale on a "
            f"ReLU network multiplies the gradient by about {fx['relu_xavier']:.3f} per layer (a factor "
            f"{fx['relu_xavier'] ** fx['depth']:.4f} "
            f"over {fx['depth']} layers); He's keeps it at 1.",
            "cls-fix", also=("depth",)),
        Row("Image network or MLP without normalisation, SGD: the first steps diverge at the learning rate you want",
            "Global-norm clipping from the first step rescues the run; where it then clips most steps, also try "
            "a lower learning rate without clipping (the row after next)",
            f"At depth {h['depth']} and lr {h['lr']:g} all {h['seeds']} seeds of the plain MLP diverge without "
            f"clipping; with max_norm = {grids.HARD_THRESHOLD:g} every seed trains, {_pct(norm['mean'])} mean test "
            f"accuracy (worst {_pct(min(norm['accuracies']))}), clipping {_pct(norm['clip_fraction'], 0)} of the "
            f"steps. In the same stored runs (not shown in a chapter), not training every seed at the thresholds "
            f"compared: {failed}.",
            "cls-methods"),
        Row("Choosing the threshold (any network)",
            f"The recipe: train {rc['probe_steps']} steps unclipped at your learning rate, set max_norm at the "
            f"{100 * rc['quantile']:.0f}th percentile of their gradient norms (gradclip.suggest_threshold), "
            f"then watch the share of clipped steps; if the probe diverges at your learning rate, clip it at the "
            f"threshold of the largest lower learning rate whose probe finished",
            f"On all {rc['networks']} networks and depths of chapter 4, the recipe's choice came within "
            f"{100 * rc['median_gap']:.1f} points of validation accuracy of the best of the grid's thresholds "
            f"(median; at most {100 * rc['max_gap']:.1f} points worse, and up to {100 * -min(rc['gaps']):.1f} points "
            f"better), from one run per learning rate ({rc['runs']} runs, against {rc['grid_runs']} for the grid's "
            f"thresholds). Its choice clips more than half of the steps on {rc['most']} of {rc['networks']} networks, "
            f"so there step 3 asks for a lower-learning-rate comparison (the next row). Single runs at seed 0: a "
            f"start, not a tuned value.",
            "cls-threshold"),
        Row(f"Clipping fires on more than {100 * rc['lower_above']:.0f}% of the steps",
            "Clipping has become a normalised smaller step: compare it on validation with a lower learning rate "
            "without clipping (gradclip.should_lower_lr flags it), given the same and more steps, and keep "
            "whichever wins",
            f"On the MLP at depth {grids.HARD.depth} the best clipped run of chapter 4's stability scan (lr "
            f"{lo['clipped_lr']:g}, {lo['clipped_seeds']} seeds; the second row's run at lr {h['lr']:g} is the "
            f"validation choice at {h['seeds']} seeds) clips "
            f"{_pct(lo['clip_fraction'], 0)} of its steps; the best unclipped run (lr {lo['plain_lr']:g}) needs "
            f"{lo['slowdown']:.2f}x its steps to the target loss and ends at {_pct(lo['plain_acc'])} test accuracy, "
            f"the clipped run at {_pct(lo['clipped_acc'])}. On chapter 4's residual CNN without normalisation at "
            f"depth {im['depth']}, clipping {_pct(im['clip_fraction'], 0)} of the steps beat every lower lr within "
            f"{im['steps']} steps ({_ms(im['clipped'])} against {_ms(im['plain'])}); with {bu['budget_steps']} "
            f"steps lr {bu['plain_lr']:g} without clipping reached {_ms(bu['plain'])}, the clipped setting "
            f"{_ms(bu['clipped'])}: {'no difference' if bu['verdict'] == 'no difference' else bu['verdict']}.",
            "perf-lower", also=("cls-lower",)),
        Row("Recurrent language model (tanh RNN, LSTM) trained with SGD",
            f"Tune the learning rate on validation; keep global-norm clipping at max_norm = {tx['clip']:g} "
            f"(d2l's setting) as a guard: it widened the range of learning rates that train ({_trained_words(tx)}); "
            "it did not improve the best run",
            f"On chapter 4.11's character models ({tx['seeds']} seeds, windows of {tx['seq_len']}), best against "
            f"best (lr chosen on validation, test loss): tanh RNN {_nats(rnn['plain_test'])} at lr "
            f"{rnn['plain_lr']:g} without clipping, {_nats(rnn['clip_test'])} at lr {rnn['clip_lr']:g} clipped "
            f"({rnn['verdict']}); LSTM {_nats(lstm['plain_test'])} against {_nats(lstm['clip_test'])} "
            f"({lstm['verdict']}). At the tanh RNN's chosen lr clipping fires on "
            f"{100 * tx['rnn_clip_fraction']:.1f}% of the steps. " + _hot_words(tx),
            "text-rnn", also=("rnn-time",)),
        Row("Transformer trained with AdamW",
            "Tune the learning rate first; global-norm clipping at 1 as cheap insurance; above the best rate, "
            "qk-layernorm is the remedy that helped most",
            f"On chapter 4.11's small character transformer ({tx['seeds']} seeds at the lr chosen on validation, "
            f"{tx['transformer_lrs']} lrs at seed 0), the plain run ends at {_nats(tr['plain_test'])} test loss at "
            f"lr {tr['lr']:g}; "
            + ("no remedy (clipping, ZClip, a spike guard, warm-up, qk-layernorm, z-loss) beats it by the "
               "seed-spread rule" if same_t else
               "; ".join(f"{a}: {v}" for a, v in tr["verdicts"].items()))
            + f", and clipping at 1 fires on {100 * tr['norm_clip_fraction']:.1f}% of the steps. At lr "
            f"{top['lr']:g} (seed 0) the plain run ends at {top['none']:.2f} nats, clipped {top['norm']:.2f}, with "
            f"qk-layernorm {top['qk-norm']:.2f}; at the best lr every arm ends at {tx['transformer_best_worst']:.2f} "
            f"or below.",
            "text-transformer", also=("text-adam",)),
        Row("You train with Adam or AdamW (evidence: the small models of chapters 4 and 5.1)",
            "Clipping is optional; keep it as a guard, and tune the learning rate",
            f"On chapter 5.1's MLP (depth {grids.HARD.depth}, {len(grids.OPT_SEEDS)} seeds, {grids.HARD.steps} "
            f"steps, {ad['adam']['n_lrs']} Adam and {ad['sgd']['n_lrs']} SGD learning rates, thresholds "
            f"{' and '.join(f'{t:g}' for t in grids.OPT_THRESHOLDS if t is not None)}): with Adam, clipping leaves "
            f"{ad['adam']['clip_calm']} of {ad['adam']['n_lrs']} lrs free of divergence against "
            f"{ad['adam']['plain_calm']} without and changes the test accuracy at the settings chosen on "
            f"validation by "
            f"{100 * (ad['adam']['clip_best'] - ad['adam']['plain_best']):+.1f} points; with SGD "
            f"{ad['sgd']['clip_calm']} against {ad['sgd']['plain_calm']}, "
            f"{100 * (ad['sgd']['clip_best'] - ad['sgd']['plain_best']):+.1f} points ("
            + ("neither change is beyond the seed spread" if ad["adam"]["verdict"] == ad["sgd"]["verdict"] ==
               "no difference" else f"by the seed-spread rule clipping {_VERDICT[ad['adam']['verdict']]} with Adam "
               f"and {_VERDICT[ad['sgd']['verdict']]} with SGD")
            + f"). On chapter 4's residual CNN without normalisation (AdamW at lr {aw['lr']:g}, {aw['seeds']} seeds), "
            f"clipping at 1 lifted the worst seed from {_pct(aw['plain_low'])} to {_pct(aw['clip_low'])}; clipped "
            f"AdamW led clipped SGD "
            + _adamw_lead_words(aw) + ". The transformer row above is another model. Larger models and longer runs were not measured.",
            "perf-adam", also=("cls-caps",)),
        Row("Early instability: is a warm-up enough?",
            "A warm-up alone did not change the learning rates that train; for SGD clipping moves them up rather "
            "than adding to them; on top of clipping a warm-up widened nothing"
            + _accuracy_words(w["warmup_on_clipping"]),
            f"On the MLP at depth {grids.HARD.depth} every seed trains at lr {w['neither']['words']} with neither "
            f"remedy, {w['warm-up']['words']} with a warm-up alone, {w['clipping']['words']} with clipping and "
            f"{w['both']['words']} with both; at the lr chosen on validation, mean test accuracy over "
            f"{len(grids.OPT_SEEDS)} seeds "
            f"{_pct(w['clipping']['best'])} with clipping, {_pct(w['both']['best'])} with both, "
            f"{_pct(w['warm-up']['best'])} with the warm-up alone, {_pct(w['neither']['best'])} with neither: "
            + ("by the seed-spread rule none beats another" if not w["verdicts"] else
               "; ".join(f"{a} beats {b}" for a, b in w["verdicts"]) + " by the seed-spread rule")
            + f" (max_norm {grids.HARD_THRESHOLD:g}). The warm-up added to clipping, each at its lr chosen on "
            "validation: "
            + "; ".join(f"max_norm {t:g}: {_pct(v['both'].mean)} against {_pct(v['clipping'].mean)}, "
                        f"{_SPREAD[v['verdict']]}" for t, v in w["warmup_on_clipping"].items())
            + ". On the CNN (first row) a warm-up was no better than no remedy.",
            "perf-warmup", also=("cls-fix",)),
        Row("Large batches, no normalisation layers", _batch_advice(b), _batch_facts(b), "scal-batch"),
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
            f"once opted in, an attached adaptive clipper (AutoClip, ZClip, SpikeGuard) clips in the right place "
            f"for {len(bz['attach'])} and an attached GradientMonitor records a used norm above max_norm for "
            f"{len(bz['logs'])}.",
            "bug-zoo"),
    ]
    return rows


def guide_table_html(rows: list[Row]) -> str:
    """The decision table as HTML: situation, method and setting, evidence with a link to its section.

    On a phone each row becomes a card (:func:`gradclip_book.figures.table_html`).
    """
    def links(r: Row) -> str:
        first = f'<a href="{r.href}">{html.escape(_section_name(r.section))}</a>'
        return " ".join([first] + [f'<a href="{link(k)}">{html.escape(_section_name(k))}</a>' for k in r.also])

    cells = [[soft_breaks(r.situation), soft_breaks(r.method), f"{soft_breaks(r.evidence)} {links(r)}"]
             for r in rows]
    return table_html(["situation", "use", "measured evidence"], cells, widths=[24, 24, 52])


_CHAPTERS = {"principle": "2", "implementation": "3", "classification": "4", "text": "4.11", "performance": "5.1",
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
    lowest clean seed's: ``gradclip_book.safety.recovers``, with any one seed left out too: ``verdict``
    "recovers"), best first, and what happens without a guard. A guard whose recovery flips when one seed is left
    out (``verdict`` "fragile", chapter 5.3's *) is not listed as a recovery; the evidence names it as fragile,
    with the seeds it needs.
    """
    rows = []
    clean = summary["clean"]
    seeds = summary["seeds"]
    for fault, by_guard in summary["faults"].items():
        plain = by_guard["none"]
        good = sorted((g for g, r in by_guard.items() if g != "none" and r["verdict"] == "recovers"),
                      key=lambda g: -by_guard[g]["accuracy"])
        fragile = [g for g, r in by_guard.items() if g != "none" and r["verdict"] == "fragile" and r["recovers"]]
        lost = sum(o != "finished" for o in plain["outcomes"])
        without = (f"without a guard {lost} of {len(plain['outcomes'])} seeds {'is' if lost == 1 else 'are'} lost"
                   if plain["lost"] else
                   f"without a guard the run ends at {_pct(plain['accuracy'])}")
        names = [GUARD_NAMES.get(g, g) for g in good]
        if good:
            best = by_guard[good[0]]
            evidence = (f"With the fault {without}; with the {GUARD_NAMES.get(good[0], good[0])} every seed finishes, at "
                        f"{_pct(best['accuracy'])} mean test accuracy (clean run {_pct(clean)}).")
        else:
            evidence = (f"With the fault {without}; no guard brings its mean within the clean seeds' range "
                        f"(clean run {_pct(clean)}).")
        evidence += "".join(f" {_fragile_note(GUARD_NAMES.get(g, g), seeds, by_guard[g]['hinges_on'])}"
                            for g in fragile)
        rows.append(Row(f"A fault in training: {FAULT_NAMES.get(fault, fault)}",
                        ", ".join(names) or "none of the guards recovers it", evidence, "safety-guards"))
    return rows


def _fragile_note(name: str, seeds: list[int], hinges_on: list[int]) -> str:
    """``Per-layer clipping is fragile: a recovery at seeds 0-9 only with seeds 5 and 9 both in.``"""
    needed = (f"seed {hinges_on[0]}" if len(hinges_on) == 1 else
              f"seeds {and_list([str(s) for s in hinges_on])} " + ("all" if len(hinges_on) > 2 else "both"))
    return (f"{name[0].upper()}{name[1:]} is fragile: a recovery at seeds {seed_range(seeds)} only with "
            f"{needed} in.")


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
    """The decision tree of the guide, in the guide's order (each leaf links to the section that measured it)."""
    tree = (
        "Does the network lack normalisation or an initialisation matched to its activation?", [
            ("yes", ("Fix the cause first: normalisation, He or Xavier initialisation",
                     "cls-fix")),
            ("no, or it cannot change", (
                "Does clipping (at the recipe's threshold) fire on more than half of the steps?", [
                    ("yes", ("Compare it on validation with a lower learning rate given the same and more steps; "
                             "keep whichever wins", "perf-lower")),
                    ("no, or not clipping yet", (
                        "Which network and optimizer?", [
                            ("image network or MLP, SGD", ("Global-norm clipping at the recipe's threshold",
                                                           "cls-threshold")),
                            ("recurrent network, SGD", ("Tune the learning rate; clip at 1 as a guard", "text-rnn")),
                            ("transformer, or any network with Adam", (
                                "Tune the learning rate; clipping only as insurance", "text-transformer")),
                            ("several processes", ("The same clip_grad_norm_ call on every rank", "scal-dist")),
                        ])),
                ])),
        ])
    return FlowChart(tree, caption="The guide as a decision tree: answer the questions from the top; each leaf "
                                   "links to the measurement behind it, and the table above has the numbers.")


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
