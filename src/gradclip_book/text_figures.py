r"""Chapter 4's text page: summaries and figures read from the stored runs (:mod:`gradclip_book.text_grid`).

Everything here reads ``chapters/data/text_grid.jsonl.gz`` and returns plain numbers, HTML tables,
:class:`~gradclip_book.figures.PlotlyFigure` or :class:`~gradclip_book.figures.Explorer` objects; the ``live_*``
functions train afresh (:func:`gradclip_book.text_runs.run`) for the live notebook. This module is not part of
the grid's code version, so editing it never makes the stored runs stale.

Selection and comparison follow the book's rules (:mod:`gradclip_book.harness.select`): a setting is chosen on
the validation loss (fewest diverged seeds, then the lowest mean); the verdict between chosen settings is judged on
the test loss of the same runs, and one setting beats another only by more than the larger of the two seed
standard deviations.

Example:
    >>> from gradclip_book import text_figures as tf
    >>> choice = tf.recurrent_choice("rnn", None)
    >>> choice.best.setting in tf.text_grid.RNN_LRS
    True
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import numpy as np

from . import harness, text_grid
from .figures import PALETTE, RUN_STYLES, Explorer, Param, PlotlyFigure, and_list, pm, run_style, seed_range, table_html
from .harness.curves import rebin
from .text_grid import (ARMS, HEADLINE_LR, HEADLINE_SEQ_LEN, RNN_CLIP, RNN_LRS, RNN_THRESHOLDS, SEEDS, SEQ_LENS,
                        SWEEP_SEEDS, TRANSFORMER_LRS, arm_config, run_of)
from .text_runs import RNN, TRANSFORMER, TextConfig

__all__ = [
    "ARM_LABELS",
    "ARM_STYLES",
    "MODEL_LABELS",
    "arm_choices",
    "arm_scores",
    "arm_verdicts",
    "attention_explorer",
    "cliff_figure",
    "cliff_slice",
    "clip_verdicts",
    "clip_verdicts_table_html",
    "fresh_run",
    "groups_short",
    "guide_evidence",
    "live_recurrent_frame",
    "live_through_time_frame",
    "live_transformer_frame",
    "power_text",
    "recurrent_choice",
    "recurrent_explorer",
    "recurrent_lr_figure",
    "recurrent_run",
    "recurrent_scores",
    "sensitivity_explorer",
    "sensitivity_figure",
    "spikes",
    "through_time_explorer",
    "transformer_run",
    "verdict_words",
]

MODEL_LABELS = {"rnn": "tanh RNN", "lstm": "LSTM", "transformer": "transformer"}

ARM_LABELS = {"none": "no remedy", "norm": "global norm 1.0", "zclip": "ZClip z = 2.5", "spike-guard": "spike guard 6σ",
              "warmup": f"warm-up {text_grid.WARMUP} steps", "qk-norm": "qk-layernorm",
              "z-loss": f"z-loss {text_grid.Z_WEIGHT:g}"}
"""Each transformer arm's name in figures and tables."""

# One style per arm, on this page and in the book's conventions: no remedy is chapter 4's unclipped run
# (vermillion, dashed), global-norm clipping its clipped run (blue, solid), a warm-up chapter 5.1's dotted line
# with open diamonds (in the unclipped colour: it has no clipping); the other arms take the Okabe-Ito colours
# left (never black or yellow, which vanish on the dark or the light page), each with its own dash and marker.
ARM_STYLES: dict[str, dict[str, Any]] = {
    "none": {"line": dict(RUN_STYLES["plain"]["line"]), "marker": {"color": "#D55E00", "symbol": "square"}},
    "norm": {"line": dict(RUN_STYLES["clipped"]["line"]), "marker": {"color": "#0072B2", "symbol": "circle"}},
    "zclip": {"line": {"color": PALETTE[2], "dash": "dashdot", "width": 2},
              "marker": {"color": PALETTE[2], "symbol": "triangle-up"}},
    "spike-guard": {"line": {"color": PALETTE[1], "dash": "longdash", "width": 2},
                    "marker": {"color": PALETTE[1], "symbol": "triangle-down"}},
    "warmup": {"line": {"color": "#D55E00", "dash": "dot", "width": 2},
               "marker": {"color": "#D55E00", "symbol": "diamond-open", "line": {"width": 2}}},
    "qk-norm": {"line": {"color": PALETTE[3], "dash": "solid", "width": 2.5},
                "marker": {"color": PALETTE[3], "symbol": "star"}},
    "z-loss": {"line": {"color": PALETTE[4], "dash": "dash", "width": 2},
               "marker": {"color": PALETTE[4], "symbol": "hexagon"}},
}
"""Arm -> plotly ``line`` and ``marker`` style."""

PLOT_POINTS = 60
"""Points per drawn curve (the stored curves have up to 150)."""
LOG_SHIFT = 1
"""Step s is drawn at s + 1 on a logarithmic step axis (step 0 has no logarithm)."""


def _f(value: Any) -> float | None:
    """A stored number as a float; ``None`` for ``None`` and for non-finite values (the files write them as strings)."""
    if value is None:
        return None
    x = float(value)
    return x if math.isfinite(x) else None


def _r4(value: float | None) -> float | None:
    return None if value is None or not math.isfinite(value) else float(f"{value:.4g}")


SUPERSCRIPT = str.maketrans("0123456789-", "⁰¹²³⁴⁵⁶⁷⁸⁹⁻")


def power_text(x: float, digits: int = 1) -> str:
    """``x`` as text in the book's power notation: ``power_text(4.2e-6) == '4×10⁻⁶'``.

    Example:
        >>> power_text(4.2e-6), power_text(0.05)
        ('4×10⁻⁶', '5×10⁻²')
    """
    mantissa, exponent = f"{x:.{digits - 1}e}".split("e")
    return f"{mantissa}×10{str(int(exponent)).translate(SUPERSCRIPT)}"


# --- the stored runs ---------------------------------------------------------------------------------


def recurrent_run(model: str, seq_len: int, lr: float, threshold: float | None, seed: int = 0) -> dict[str, Any]:
    """The stored recurrent run (``model`` ``"rnn"`` or ``"lstm"``) of these settings."""
    method = {"method": "none" if threshold is None else "norm", "threshold": threshold}
    return run_of(replace(RNN, model=model, seq_len=seq_len, lr=lr, seed=seed, **method))


def transformer_run(arm: str, lr: float, seed: int = 0, threshold: float | None = None) -> dict[str, Any]:
    """The stored transformer run of ``arm`` at ``lr`` (``threshold``: a global-norm threshold of the scan instead)."""
    if threshold is not None:
        return run_of(replace(TRANSFORMER, lr=lr, seed=seed, method="norm", threshold=threshold))
    return run_of(arm_config(arm, lr, seed))


def val_loss(run: dict[str, Any]) -> float | None:
    """A stored run's validation loss (nats per character); ``None`` if it diverged."""
    return None if run["diverged_at"] is not None else _f(run["metrics"]["val_loss"])


def test_loss(run: dict[str, Any]) -> float | None:
    """A stored run's test loss (nats per character); ``None`` if it diverged."""
    return None if run["diverged_at"] is not None else _f(run["metrics"]["test_loss"])


# --- selection: best against best ---------------------------------------------------------------------


LOSSES = {"validation": val_loss, "test": test_loss}
"""Split name -> the function that reads that split's loss from a stored run."""


def recurrent_scores(model: str, threshold: float | None, seq_len: int = HEADLINE_SEQ_LEN,
                     split: str = "validation") -> dict[float, harness.Score]:
    """Per learning rate, the ``split`` (``"validation"`` or ``"test"``) losses of
    :data:`~gradclip_book.text_grid.SEEDS` (``None`` = diverged)."""
    loss = LOSSES[split]
    return {lr: harness.score(lr, [loss(recurrent_run(model, seq_len, lr, threshold, s)) for s in SEEDS])
            for lr in RNN_LRS}


def recurrent_choice(model: str, threshold: float | None, seq_len: int = HEADLINE_SEQ_LEN) -> harness.Selection:
    """The learning rate chosen on validation loss for ``model`` without clipping (``None``) or clipped at
    ``threshold``, over :data:`~gradclip_book.text_grid.SEEDS` (lowest learning rate first: ties go to it)."""
    return harness.select_best({lr: s.values for lr, s in recurrent_scores(model, threshold, seq_len).items()},
                               mode="min")


def arm_scores(arm: str, seeds: Sequence[int] = SWEEP_SEEDS) -> dict[float, harness.Score]:
    """Per learning rate, the transformer arm's validation losses over ``seeds``."""
    return {lr: harness.score(lr, [val_loss(transformer_run(arm, lr, s)) for s in seeds]) for lr in TRANSFORMER_LRS}


def arm_choices() -> dict[str, dict[str, Any]]:
    """Per transformer arm: the learning rate chosen on validation loss over the sweep seeds, and the headline score.

    ``{arm: {"selection": Selection over SWEEP_SEEDS, "lr": chosen lr, "score": Score of the chosen lr over all
    SEEDS, "test": Score of the test losses of the same runs, "clip_fraction": mean share of steps the method
    fired}}``. The grid runs every seed only at :data:`~gradclip_book.text_grid.HEADLINE_LR`; a choice elsewhere
    raises ``KeyError`` (the grid's points are stale).
    """
    out = {}
    for arm in ARMS:
        selection = harness.select_best({lr: s.values for lr, s in arm_scores(arm).items()}, mode="min")
        lr = selection.best.setting
        runs = [transformer_run(arm, lr, s) for s in SEEDS]
        out[arm] = {"selection": selection, "lr": lr, "score": harness.score(lr, [val_loss(r) for r in runs]),
                    "test": harness.score(lr, [test_loss(r) for r in runs]),
                    "clip_fraction": float(np.mean([_f(r["clip_fraction"]) or 0.0 for r in runs]))}
    return out


def arm_verdicts(choices: dict[str, dict[str, Any]] | None = None, on: str = "test") -> dict[str, str]:
    """Per arm other than ``"none"``, best against best over :data:`~gradclip_book.text_grid.SEEDS`: ``"better"``,
    ``"worse"`` or ``"no difference"`` against no remedy at its own learning rate chosen on validation
    (:func:`harness.beats`), judged on the test loss (``on="test"``, the book's verdict) or on the validation loss
    that made the choice (``on="score"``)."""
    choices = arm_choices() if choices is None else choices
    base = choices["none"][on]
    return {arm: _verdict(c[on], base) for arm, c in choices.items() if arm != "none"}


def spikes(runs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The loss rises of stored runs that finished, largest first: ``{"config", "step", "rise"}`` where ``rise`` is
    the largest rise (nats) of the 10-step mean training loss above its best earlier value from step 50 on."""
    out = [{"config": r["config"], "step": r["rise"]["step"], "rise": _f(r["rise"]["rise"])}
           for r in runs if r["diverged_at"] is None and r.get("rise")]
    return sorted(out, key=lambda x: -(x["rise"] or 0.0))


def _verdict(a: harness.Score, b: harness.Score) -> str:
    """``"better"``, ``"worse"`` or ``"no difference"`` for ``a`` against ``b`` (losses: lower is better)."""
    return "better" if harness.beats(a, b, mode="min") else "worse" if harness.beats(b, a, mode="min") else \
        "no difference"


SEED_GROUPS: tuple[tuple[int, ...], ...] = (tuple(SEEDS), *text_grid.UNSEEN_SEED_GROUPS)
"""The seed groups on which a clipped-against-unclipped verdict of the recurrent networks is judged: the seeds of
every choice (:data:`~gradclip_book.text_grid.SEEDS`), then the groups no choice saw
(:data:`~gradclip_book.text_grid.UNSEEN_SEED_GROUPS`), as in chapter 4.4."""

CLIP_VERDICTS = {"clipping": "clipped lower", "no clipping": "unclipped lower", "no difference": "no difference"}
"""The verdicts of :func:`clip_verdicts` (which arm's mean test loss is lower by more than the seed spread), and
their words."""


def clip_verdicts(model: str, lr: float, clip_lr: float | None = None, seq_len: int = HEADLINE_SEQ_LEN,
                  threshold: float = RNN_CLIP, groups: Sequence[Sequence[int]] = SEED_GROUPS) -> dict[str, Any]:
    """Clipped at ``threshold`` (learning rate ``clip_lr``, by default ``lr``) against unclipped at ``lr``, judged
    on the test loss in each seed group of ``groups``, and the verdict that stands over all of them.

    Returns ``{"groups": [{"seeds", "plain", "clipped", "verdict"}, ...], "standing"}``: per group the two
    :class:`~gradclip_book.harness.Score` of test losses (nats; a diverged seed counts as diverged) and the verdict,
    ``"clipping"`` (clipped lower by more than the larger of the two seed standard deviations,
    :func:`harness.beats`), ``"no clipping"`` or ``"no difference"``; ``"standing"``: the verdict that every group
    gives, else ``"no difference"`` (chapter 4.4's rule, :func:`gradclip_book.harness.standing_verdict`).

    Raises:
        KeyError: the grid stores no run of a seed of ``groups`` at these settings (the command to compute it).

    Example:
        >>> v = clip_verdicts("rnn", 3.0)
        >>> [g["seeds"] for g in v["groups"]][0], v["standing"] in CLIP_VERDICTS
        ((0, 1, 2, 3, 4), True)
    """
    clip_lr = lr if clip_lr is None else clip_lr
    judged = []
    for seeds in groups:
        plain = harness.score(lr, [test_loss(recurrent_run(model, seq_len, lr, None, s)) for s in seeds])
        clipped = harness.score(clip_lr, [test_loss(recurrent_run(model, seq_len, clip_lr, threshold, s))
                                          for s in seeds])
        verdict = ("clipping" if harness.beats(clipped, plain, mode="min") else
                   "no clipping" if harness.beats(plain, clipped, mode="min") else "no difference")
        judged.append({"seeds": tuple(seeds), "plain": plain, "clipped": clipped, "verdict": verdict})
    return {"groups": judged, "standing": harness.standing_verdict([g["verdict"] for g in judged])}


def verdict_words(verdicts: dict[str, Any], digits: int = 3) -> str:
    """:func:`clip_verdicts`'s groups in words, the groups with the same verdict together, in the order of the
    groups, each with its clipped and unclipped mean test loss ± standard deviation (see the example).

    Example:
        >>> from gradclip_book.harness import score
        >>> g = lambda seeds, v: {"seeds": seeds, "plain": score(1, [2.0, 2.2]), "clipped": score(1, [1.5, 1.5]),
        ...                       "verdict": v}
        >>> verdict_words({"groups": [g((0, 1), "clipping"), g((2, 3), "no difference")]}, digits=1)
        ... # doctest: +NORMALIZE_WHITESPACE
        'clipped lower at seeds 0-1 (1.5 ± 0.0 against 2.1 ± 0.1 nats unclipped);
         no difference at seeds 2-3 (1.5 ± 0.0 against 2.1 ± 0.1)'
    """
    out, unit = [], " nats unclipped"
    for verdict in dict.fromkeys(g["verdict"] for g in verdicts["groups"]):
        groups = [g for g in verdicts["groups"] if g["verdict"] == verdict]
        parts = []
        for g in groups:
            parts.append(f"{seed_range(g['seeds'])} ({pm(g['clipped'], digits)} against "
                         f"{pm(g['plain'], digits)}{unit})")
            unit = ""
        out.append(f"{CLIP_VERDICTS[verdict]} at seeds " + and_list(parts))
    return "; ".join(out)


def groups_short(verdicts: dict[str, Any]) -> str:
    """:func:`clip_verdicts`'s verdict per seed group, briefly.

    Example:
        >>> groups_short({"groups": [{"seeds": (0, 1), "verdict": "clipping"},
        ...                          {"seeds": (2, 3), "verdict": "no difference"}]})
        'seeds 0-1: clipped lower; 2-3: no difference'
    """
    return "seeds " + "; ".join(f"{seed_range(g['seeds'])}: {CLIP_VERDICTS[g['verdict']]}" for g in verdicts["groups"])


def clip_verdicts_table_html(rows: dict[str, dict[str, Any]], caption: str) -> str:
    """A table of :func:`clip_verdicts` results: per row (its name, a key of ``rows``) and seed group, the clipped
    and the unclipped test loss (mean &plusmn; std), the group's verdict, and the verdict that stands."""
    head = ["setting", "seeds", "test loss, clipped", "test loss, unclipped", "verdict", "stands"]
    body = []
    for name, v in rows.items():
        for i, g in enumerate(v["groups"]):
            body.append([name if i == 0 else "", seed_range(g["seeds"]), pm(g["clipped"], html=True),
                         pm(g["plain"], html=True), CLIP_VERDICTS[g["verdict"]],
                         CLIP_VERDICTS[v["standing"]] if i == 0 else ""])
    return table_html(head, body, caption)


def guide_evidence() -> dict[str, Any]:
    """This page's evidence for chapter 6's guide, as plain numbers (losses in nats, best against best).

    ``{"recurrent": {model: {"plain_lr", "plain", "plain_test", "clip_lr", "clip", "clip_test", "verdict"}},
    "transformer": {"lr", "plain", "plain_test", "verdicts", "norm_clip_fraction"}}`` where ``plain`` / ``clip``
    are the validation losses ``(mean, std)`` over :data:`~gradclip_book.text_grid.SEEDS` at the learning rate chosen
    on them, ``*_test`` the test losses ``(mean, std)`` of the same runs, ``verdict`` is clipping at ``max_norm`` =
    :data:`~gradclip_book.text_grid.RNN_CLIP` against no clipping by the seed-spread rule on the test losses, and
    ``verdicts`` maps each transformer arm to its verdict against no remedy on the test losses
    (:func:`arm_verdicts`). The transformer's learning rate was chosen on seed 0's validation loss alone.

    Example:
        >>> ev = guide_evidence()
        >>> sorted(ev["recurrent"]), ev["transformer"]["lr"] in TRANSFORMER_LRS
        (['lstm', 'rnn'], True)
    """
    recurrent = {}
    for model in ("rnn", "lstm"):
        plain, clipped = recurrent_choice(model, None).best, recurrent_choice(model, RNN_CLIP).best
        plain_test = recurrent_scores(model, None, split="test")[plain.setting]
        clip_test = recurrent_scores(model, RNN_CLIP, split="test")[clipped.setting]
        recurrent[model] = {"plain_lr": plain.setting, "plain": (plain.mean, plain.std),
                            "plain_test": (plain_test.mean, plain_test.std), "clip_lr": clipped.setting,
                            "clip": (clipped.mean, clipped.std), "clip_test": (clip_test.mean, clip_test.std),
                            "verdict": _verdict(clip_test, plain_test)}
    choices = arm_choices()
    base, base_test = choices["none"]["score"], choices["none"]["test"]
    return {"recurrent": recurrent,
            "transformer": {"lr": choices["none"]["lr"], "plain": (base.mean, base.std),
                            "plain_test": (base_test.mean, base_test.std), "verdicts": arm_verdicts(choices),
                            "norm_clip_fraction": choices["norm"]["clip_fraction"]}}


def _over_seeds_words(seeds: Sequence[int] = SWEEP_SEEDS) -> str:
    """What a point of the sweep's figures is: ``"seed 0"`` or ``"mean over seeds 0-4"``."""
    return f"seed {seeds[0]}" if len(seeds) == 1 else f"mean over seeds {seed_range(seeds)}"


def choice_table_html(rows: Sequence[tuple[str, harness.Score, harness.Score, float, str]], caption: str) -> str:
    """A table of chosen settings: name, chosen learning rate, validation and test loss (mean &plusmn; std), seeds
    diverged, share of steps clipped. ``rows``: ``(name, validation Score, test Score, clip fraction, note)``."""
    head = ["setting", "chosen lr", "validation loss", "test loss", "seeds (diverged)", "steps clipped"]
    body = [[name, f"{val.setting:g}", pm(val, html=True), pm(test, html=True), f"{val.seeds} ({val.diverged})",
             f"{100 * frac:.0f}%"] for name, val, test, frac, _ in rows]
    return table_html(head, body, caption)


# --- curves ---------------------------------------------------------------------------------------------


def _xs(steps: list[int]) -> dict[str, Any]:
    return {"x": [s + LOG_SHIFT for s in steps]}


def curves(run: dict[str, Any], points: int = PLOT_POINTS) -> dict[str, Any]:
    """Plot-ready curves of a stored run, merged to at most ``points`` log bins: ``x`` (step + 1), ``loss``,
    ``norm`` (bin maximum of the pre-clip norm) and ``fired`` (the norm where the method fired in the bin)."""
    c = rebin(run["curve"], run["steps"], points, run["steps_run"])
    norm = [_f(v) for v in c["grad_norm"]]
    fired = [n if (_f(f) or 0) > 0 else None for n, f in zip(norm, c["clipped"])]
    return {"x": [s + LOG_SHIFT for s in c["step"]], "loss": [_r4(_f(v)) for v in c["loss"]],
            "norm": [_r4(v) for v in norm], "fired": [_r4(v) for v in fired]}


def _log_step_axis(last: int, title: str = "step (logarithmic)") -> dict[str, Any]:
    ticks = [s for s in (0, 1, 3, 10, 30, 100, 300, 1000) if s <= last]
    return {"type": "log", "title": {"text": title}, "tickangle": 0,
            "range": [math.log10(0.9 * LOG_SHIFT), math.log10((last + LOG_SHIFT) * 1.05)],
            "tickvals": [s + LOG_SHIFT for s in ticks], "ticktext": [str(s) for s in ticks]}


def _two_panels(last: int, left: str = "training loss (nats/char)",  # short: it fits a stacked phone panel
                right: str = "gradient norm before clipping", height: int = 440) -> dict[str, Any]:
    axis = _log_step_axis(last)
    return {"height": height,
            "xaxis": {"domain": [0, 0.46], "anchor": "y", **axis},
            "yaxis": {"type": "log", "title": {"text": left}, "anchor": "x"},
            "xaxis2": {"domain": [0.56, 1], "anchor": "y2", **axis},
            "yaxis2": {"type": "log", "title": {"text": right}, "anchor": "x2"}}


def _divergence(run: dict[str, Any]) -> dict[str, Any]:
    if run["diverged_at"] is None:
        return {"x": [], "y": []}
    loss = _f(run["diverged_loss"])
    return {"x": [run["diverged_at"] + LOG_SHIFT], "y": [_r4(loss if loss is not None else harness.DIVERGED_LOSS)]}


FIRED = {"mode": "markers", "name": "clipping fired", "xaxis": "x2", "yaxis": "y2",
         "marker": {"symbol": "circle-open", "size": 7, "color": "#009E73", "line": {"width": 1.5}}}


def describe(run: dict[str, Any]) -> str:
    """One sentence about a stored run: its validation loss and how often clipping fired, or where it diverged."""
    if run["diverged_at"] is not None:
        loss = _f(run["diverged_loss"])
        shown = "not a number" if loss is None else f"{loss:.3g}"
        return f"diverged at step {run['diverged_at']} (training loss {shown})."
    fired = _f(run["clip_fraction"]) or 0.0
    clipped = "" if run["config"]["method"] == "none" else f"; the method fired at {100 * fired:.1f}% of the steps"
    return f"validation loss {_f(run['metrics']['val_loss']):.3f} nats per character{clipped}."


# --- the recurrent networks ---------------------------------------------------------------------------


THRESHOLD_LEVELS = (None, *RNN_THRESHOLDS)


def recurrent_frame(run: dict[str, Any], plain: dict[str, Any]) -> dict:
    """The :func:`recurrent_explorer` frame of a run and the unclipped run of the same settings."""
    c, p = curves(run), curves(plain)
    cfg = run["config"]
    t = cfg["threshold"]
    what = "No clipping" if t is None else f"Global-norm clipping at max_norm {t:g}"
    note = [f"{what}, windows of {cfg['seq_len']} characters, learning rate {cfg['lr']:g}: {describe(run)}"]
    if t is not None:
        note.append(f"Without clipping: {describe(plain)}")
        if c["loss"] == p["loss"] and c["norm"] == p["norm"]:
            note.append("The two runs coincide: the dashed line lies on the solid one.")
    return {"traces": [{"y": c["loss"], "x": c["x"]}, {"y": p["loss"], "x": p["x"]}, _divergence(run),
                       _divergence(plain), {"y": c["norm"], "x": c["x"]}, {"y": p["norm"], "x": p["x"]},
                       {"y": c["fired"], "x": c["x"]}], "note": note}


def _recurrent_traces() -> list[dict]:
    return [
        run_style("clipped", name="run shown", mode="lines"),
        run_style("plain", name="no clipping", mode="lines"),
        {"mode": "markers", "name": "diverged", "marker": {"symbol": "x", "size": 15, "color": "#0072B2"}},
        {"mode": "markers", "name": "diverged (no clipping)", "showlegend": False,
         "marker": {"symbol": "x-open", "size": 11, "color": "#D55E00", "line": {"width": 2}}},
        run_style("clipped", name="run shown", mode="lines", xaxis="x2", yaxis="y2", showlegend=False),
        run_style("plain", name="no clipping", mode="lines", xaxis="x2", yaxis="y2", showlegend=False),
        dict(FIRED),
    ]


def _recurrent_params() -> list[Param]:
    return [Param("seq_len", list(SEQ_LENS), label="window (characters)", default=HEADLINE_SEQ_LEN, fmt="d"),
            Param("lr", list(RNN_LRS), label="learning rate", default=3.0, fmt="g"),
            Param("threshold", list(THRESHOLD_LEVELS), label="max_norm", default=RNN_CLIP, fmt="g", kind="slider")]


def recurrent_explorer() -> Explorer:
    """The tanh RNN's stored runs (seed 0): window length, learning rate and threshold sliders."""

    def compute(seq_len: int, lr: float, threshold: float | None) -> dict:
        return recurrent_frame(recurrent_run("rnn", seq_len, lr, threshold), recurrent_run("rnn", seq_len, lr, None))

    return Explorer(
        "text-rnn", _recurrent_params(), compute=compute, traces=_recurrent_traces(),
        layout=_two_panels(RNN.steps), share_traces=True, label="fig-text-rnn",
        caption=f"The vanilla tanh RNN ({RNN.width} units) trained by plain SGD on {RNN.chars:,} characters per step "
                f"for {RNN.steps} steps (seed 0), by truncated backpropagation through windows of the chosen length. "
                "Solid blue: the run at the chosen threshold (at 'off', the unclipped run itself); dashed "
                "vermillion: the same settings without clipping. First panel (left, or top on a phone): training "
                "loss, the mean over each plotted bin of steps; second panel: the largest gradient norm before "
                "clipping in each bin, with open circles where clipping fired. A cross marks a divergence. Both axes "
                "are logarithmic.")


def fresh_run(config: TextConfig) -> dict[str, Any]:
    """A fresh run of ``config`` as a stored line looks (:func:`gradclip_book.text_runs.run` plus its ``config``)."""
    from dataclasses import asdict

    from .text_runs import run

    return {**run(config), "config": asdict(config)}


def _rnn_config(seq_len: int, lr: float, threshold: float | None, model: str = "rnn") -> TextConfig:
    method = {"method": "none" if threshold is None else "norm", "threshold": threshold}
    return replace(RNN, model=model, seq_len=int(seq_len), lr=float(lr), **method)


def live_recurrent_frame(seq_len: int, lr: float, threshold: float | None) -> dict:
    """Fresh tanh-RNN runs (the chosen one and its unclipped twin) for one state of :func:`recurrent_explorer`."""
    run = fresh_run(_rnn_config(seq_len, lr, threshold))
    plain = run if threshold is None else fresh_run(_rnn_config(seq_len, lr, None))
    return recurrent_frame(run, plain)


def live_through_time_frame(seq_len: int, lr: float, threshold: float | None) -> dict:
    """A fresh tanh-RNN run for one state of :func:`through_time_explorer`."""
    return through_time_frame(fresh_run(_rnn_config(seq_len, lr, threshold)))


CHECKPOINT_STYLES = {"start": {"color": "#999999", "dash": "dot", "width": 2},
                     "peak": {"color": PALETTE[2], "dash": "dashdot", "width": 2},
                     "end": {"color": "#0072B2", "dash": "solid", "width": 3}}
"""The through-time profiles: at initialisation (grey, dotted), at the checkpoint whose gradient reaches furthest
back (green), and at the end of the run (blue)."""


def _profile(run: dict[str, Any]) -> dict[str, Any]:
    """The stored through-time profiles of a run: at the start, at the checkpoint with the largest far-back norm,
    at the last checkpoint; lags drawn at k + 1."""
    profiles = run["through_time"]
    seq = run["config"]["seq_len"]
    lags = [k for k in (0, 1, 2, 4, 8, 16, 32, 64, 127)][:len(profiles[0][1])]

    def far(values: list) -> float:
        reach = [v for k, v in zip(lags, values) if k >= seq // 2]
        return max((_f(v) or 0.0) for v in reach) if reach else 0.0

    start, end = profiles[0], profiles[-1]
    peak = max(profiles, key=lambda p: far(p[1]))
    return {"lags": lags, "start": start, "peak": peak, "end": end,
            "y": {name: [_r4(_f(v)) if (_f(v) or 0) > 0 else None for v in p[1]]
                  for name, p in (("start", start), ("peak", peak), ("end", end))}}


def through_time_frame(run: dict[str, Any]) -> dict:
    """The :func:`through_time_explorer` frame of a stored recurrent run."""
    prof = _profile(run)
    xs = [k + 1 for k in prof["lags"]]
    cfg = run["config"]
    start, end = prof["start"][1], prof["end"][1]
    seq = cfg["seq_len"]
    k_last = max(k for k in prof["lags"] if k < seq)
    shown = [p[1] for p in (prof["start"], prof["peak"], prof["end"])]
    # the furthest lag inside the window at which no profile shown has underflowed to 0
    measurable = [k for k in prof["lags"] if k < seq and all(_f(v[prof["lags"].index(k)]) for v in shown)]
    k_note = max(measurable) if measurable else k_last
    index = prof["lags"].index(k_note)

    def ratio(values: list) -> str:
        v0, vk = _f(values[0]), _f(values[index])
        if not v0 or not vk:
            return "0 (underflow)"
        r = vk / v0
        return (power_text(r, 2) if r < 0.01 else f"{r:.2g}") + " times"

    # each checkpoint once: the furthest-reaching one only when it is neither initialisation nor the end
    said = [f"{ratio(start)} the last step's at initialisation".replace("(underflow) the last step's", "(underflow)")]
    if prof["peak"][0] not in (prof["start"][0], prof["end"][0]):
        said.append(f"{ratio(prof['peak'][1])} at step {prof['peak'][0]} (the checkpoint that reaches furthest back)")
    said.append(f"{ratio(end)} at step {prof['end'][0]} (the end)")
    note = [f"{MODEL_LABELS[cfg['model']]}, windows of {seq}, learning rate {cfg['lr']:g}, "
            + ("no clipping" if cfg["threshold"] is None else f"max_norm {cfg['threshold']:g}") + ": "
            f"the gradient {k_note} steps back is " + ", ".join(said[:-1]) + " and " + said[-1] + "."
            + (f" Further back, up to {k_last} steps, it underflows to 0 at some of these checkpoints."
               if k_note < k_last else ""),
            f"The run: {describe(run)}"]
    return {"traces": [{"x": xs, "y": prof["y"]["start"]},
                       {"x": xs, "y": prof["y"]["peak"], "name": f"step {prof['peak'][0]} (reaches furthest back)"},
                       {"x": xs, "y": prof["y"]["end"], "name": f"step {prof['end'][0]} (end)"},
                       {"x": [seq, seq], "y": [1e-12, 1e3]}],
            "note": note}


def through_time_explorer() -> Explorer:
    """The gradient through time of the stored RNN runs (seed 0): window, learning rate and threshold sliders."""

    def compute(seq_len: int, lr: float, threshold: float | None) -> dict:
        return through_time_frame(recurrent_run("rnn", seq_len, lr, threshold))

    traces = [{"mode": "lines+markers", "name": "initialisation", "line": CHECKPOINT_STYLES["start"],
               "marker": {"color": "#999999", "size": 6}},
              {"mode": "lines+markers", "line": CHECKPOINT_STYLES["peak"], "marker": {"color": PALETTE[2], "size": 6}},
              {"mode": "lines+markers", "line": CHECKPOINT_STYLES["end"], "marker": {"color": "#0072B2", "size": 7}},
              {"mode": "lines", "name": "window length", "line": {"color": "#777777", "dash": "dash", "width": 1},
               "hoverinfo": "skip"}]
    layout = {"height": 430,
              "xaxis": {"type": "log", "title": {"text": "steps back, k (drawn at k + 1)"}, "tickangle": 0,
                        "tickvals": [1, 2, 3, 5, 9, 17, 33, 65, 128], "ticktext": ["0", "1", "2", "4", "8", "16", "32",
                                                                                   "64", "127"]},
              "yaxis": {"type": "log", "title": {"text": "gradient norm at h(T-k)"}, "range": [-12, 3]}}
    return Explorer(
        "text-through-time", _recurrent_params(), compute=compute, traces=traces, layout=layout,
        label="fig-text-through-time",
        caption="The gradient through time of the tanh RNN: the norm of the derivative of the last character's loss "
                "with respect to the hidden state k steps earlier, on 128-character windows of validation text "
                "(mean over 16 windows), at initialisation, at the checkpoint (steps 10, 30, 100, 300) whose "
                "gradient reaches furthest back, and at the end of the run (seed 0). Training truncates "
                "backpropagation at the window length (dashed line): gradients from further back never reach the "
                "weights. Norms below 10⁻¹² (down to 0, underflow) are not drawn. Both axes are logarithmic.")


class _CliffHook(harness.Hook):
    """At every step, the loss of the step's own batch after the unclipped step; at the first step where that loss
    rose by more than ``rise`` nats, the loss along the gradient's direction (see :func:`cliff_slice`)."""

    def __init__(self, loss_fn: Any, points: int, rise: float) -> None:
        self.loss_fn, self.points, self.rise = loss_fn, points, rise
        self.jumps: list[float] = []
        self.record: dict[str, Any] | None = None

    def _loss_at(self, step: harness.Step, params: list, saved: list, direction: list, s: float) -> float:
        import torch

        inputs, targets, _ = step.batch
        with torch.no_grad():
            for p, w, d in zip(params, saved, direction):
                p.copy_(w - s * d)
            logits, _ = step.model(inputs, self.loss_fn.previous)
            return float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)))

    def after_backward(self, step: harness.Step) -> None:
        import torch

        params = [p for p in step.model.parameters() if p.grad is not None]
        norm = float(torch.linalg.vector_norm(torch.cat([p.grad.reshape(-1) for p in params])))
        lr = float(step.optimizer.param_groups[0]["lr"])
        saved = [p.detach().clone() for p in params]
        direction = [p.grad.detach() / norm for p in params]
        after = self._loss_at(step, params, saved, direction, lr * norm)
        jump = after - step.value
        if self.record is None and jump > self.rise:
            distances = [lr * norm * 10 ** (-3 + 3 * i / (self.points - 1)) for i in range(self.points)]
            losses = [self._loss_at(step, params, saved, direction, d) for d in distances]
            self.record = {"step": step.index, "norm": norm, "lr": lr, "loss": step.value, "after": after,
                           "distance": distances, "along": losses}
        self.jumps.append(jump)
        with torch.no_grad():
            for p, w in zip(params, saved):
                p.copy_(w)


def cliff_slice(config: TextConfig, steps: int = 30, points: int = 40, rise: float = 1.0) -> dict[str, Any]:
    r"""Re-run the first ``steps`` steps of a recurrent config and find its cliff: the first step whose unclipped
    update raises the loss of its own batch by more than ``rise`` nats.

    At every step, before the update, the loss of the step's batch is evaluated after the full unclipped step
    :math:`\theta - \eta g`; at the first step where it rose by more than ``rise``, also at ``points`` distances s along
    :math:`-g/\lVert g\rVert`, from a thousandth of :math:`\eta\lVert g\rVert` to all of it (evenly on a
    logarithmic scale). The run itself is :func:`gradclip_book.text_runs.train`'s (the probes leave the weights
    bitwise as they were), so its losses are the stored run's first steps.

    Returns:
        ``{"run": harness Run, "jumps": per step, the loss after the unclipped step minus before, "step", "norm",
        "lr", "loss" (before), "after", "distance", "along"}``.
    """
    from . import text_runs

    config = replace(config, steps=steps)
    model = text_runs.build(config)
    optimizer = text_runs.OPTIMIZERS[config.optimizer](list(model.parameters()), config.lr)
    loss_fn = text_runs.CarriedState()
    hook = _CliffHook(loss_fn, points, rise)
    run = harness.train(model, optimizer, text_runs._batches(config), steps, loss_fn=loss_fn, method=config.method,
                        threshold=config.threshold, hooks=[hook])
    if hook.record is None:
        raise ValueError(f"no step of the first {steps} raised its batch's loss by more than {rise} nats: {config}")
    return {"run": run, "jumps": hook.jumps, **hook.record}


def cliff_figure(cliff: dict[str, Any], threshold: float = RNN_CLIP) -> PlotlyFigure:
    """The loss along the gradient at a run's cliff (:func:`cliff_slice`), with where a clipped and an unclipped
    step land."""
    distance, along = cliff["distance"], cliff["along"]
    lr, norm, before = cliff["lr"], cliff["norm"], cliff["loss"]
    top = max(max(along), before) * 1.08
    traces = [
        {"x": distance, "y": [_r4(v) for v in along], "mode": "lines+markers", "name": "loss along −g",
         "line": {"color": "#777777", "width": 2}, "marker": {"size": 5, "color": "#777777"}},
        {"x": [distance[0], distance[-1]], "y": [_r4(before)] * 2, "mode": "lines", "name": "loss before the step",
         "line": {"color": "#999999", "dash": "dot", "width": 1.5}},
        run_style("clipped", x=[lr * threshold] * 2, y=[0, top], mode="lines",
                  name=f"clipped step (max_norm {threshold:g}): η·c = {lr * threshold:.3g}"),
        run_style("plain", x=[lr * norm] * 2, y=[0, top], mode="lines", name=f"unclipped step: η·‖g‖ = {lr * norm:.3g}"),
    ]
    layout = {"height": 430, "xaxis": {"type": "log", "title": {"text": "distance s moved along −g/‖g‖"}},
              "yaxis": {"title": {"text": "loss of that step's batch (nats)"}, "range": [0, top]}}
    return PlotlyFigure(traces, layout, name="text-cliff", label="fig-text-cliff",
                        caption="The loss of one training batch of the tanh RNN after moving its weights a distance s "
                                "against the gradient, at the step where an unclipped step raised that loss the most "
                                "(logarithmic distance axis). The vertical lines mark the length of the clipped step "
                                "and of the unclipped step.")


RNN_LR_AXIS_TOP = 4.0
"""The top of :func:`recurrent_lr_figure`'s loss axis (nats): above guessing by character frequencies, so that the
region of the best learning rates is not flattened by the wrecked runs (up to hundreds of nats), which the note lists."""


def recurrent_lr_figure() -> Explorer:
    """Validation loss against learning rate, mean and spread over the seeds, without and with clipping; model
    buttons (RNN, LSTM), at the headline window length."""

    def compute(model: str) -> dict:
        traces, note = [], []
        for threshold in (None, RNN_CLIP):
            scores = recurrent_scores(model, threshold)
            lrs = [lr for lr in RNN_LRS if scores[lr].mean is not None]
            traces.append({"x": lrs, "y": [_r4(scores[lr].mean) for lr in lrs],
                           "error_y": {"type": "data", "array": [_r4(scores[lr].std) for lr in lrs], "visible": True},
                           "text": [f"{scores[lr].seeds - scores[lr].diverged} of {scores[lr].seeds} seeds finished"
                                    for lr in lrs]})
            choice = recurrent_choice(model, threshold)
            best = choice.best
            name = "Without clipping" if threshold is None else f"Clipped at max_norm {threshold:g}"
            broken = [f"{lr:g}" for lr in RNN_LRS if scores[lr].diverged]
            note.append(f"{name}: best learning rate {best.setting:g}, validation loss {best.mean:.3f} ± "
                        f"{best.std:.3f}" + (f"; seeds diverged at learning rate {', '.join(broken)}" if broken else "")
                        + ".")
            off = [f"{lr:g} ({scores[lr].mean:.1f} ± {scores[lr].std:.1f})" for lr in lrs
                   if scores[lr].mean > RNN_LR_AXIS_TOP]
            if off:
                note.append(f"{name}, off the scale above {RNN_LR_AXIS_TOP:g} nats: learning rate "
                            + ", ".join(off) + " nats.")
        return {"traces": traces, "note": note}

    traces = [run_style("plain", name="no clipping", mode="lines+markers", marker={"size": 8, "symbol": "square"},
                        hovertemplate="lr %{x}: %{y:.3f} (%{text})"),
              run_style("clipped", name=f"max_norm {RNN_CLIP:g}", mode="lines+markers",
                        marker={"size": 8, "symbol": "circle"}, hovertemplate="lr %{x}: %{y:.3f} (%{text})")]
    layout = {"height": 420,
              "xaxis": {"type": "log", "title": {"text": "learning rate (plain SGD)"}, "tickvals": list(RNN_LRS),
                        "ticktext": [f"{lr:g}" for lr in RNN_LRS]},
              "yaxis": {"title": {"text": "validation loss (nats per character)"}, "range": [1.4, RNN_LR_AXIS_TOP]}}
    return Explorer(
        "text-rnn-lr", [Param("model", ["rnn", "lstm"], label="model", default="rnn", fmt=lambda m: MODEL_LABELS[m])],
        compute=compute, traces=traces, layout=layout, label="fig-text-rnn-lr",
        caption=f"Validation loss after {RNN.steps} steps against the learning rate, mean over seeds "
                f"{seed_range(SEEDS)} with their standard deviation as error bars, without clipping and with "
                f"global-norm clipping at max_norm {RNN_CLIP:g}; windows of {HEADLINE_SEQ_LEN} characters, "
                f"{RNN.width} units. A learning rate at which some seed diverged is left out of its line (the "
                "hover text counts the seeds that finished). The loss axis stops at "
                f"{RNN_LR_AXIS_TOP:g} nats, above guessing each character by its frequency, so that the "
                "differences near the best learning rate show; the note lists the points above it.")


# --- the transformer ---------------------------------------------------------------------------------------


def sensitivity_figure() -> PlotlyFigure:
    """Validation loss against the learning rate for every transformer arm, mean and std over the sweep seeds."""
    traces = []
    for arm in ARMS:
        scores = arm_scores(arm)
        lrs = [lr for lr in TRANSFORMER_LRS if scores[lr].mean is not None]
        style = ARM_STYLES[arm]
        traces.append({"x": lrs, "y": [_r4(scores[lr].mean) for lr in lrs], "mode": "lines+markers",
                       "name": ARM_LABELS[arm], "line": style["line"], "marker": {**style["marker"], "size": 9},
                       "hovertemplate": "lr %{x}: %{y:.3f}<extra>" + ARM_LABELS[arm] + "</extra>"})
    layout = {"height": 470, "legend": {"orientation": "h", "x": 0, "y": 1.02, "yanchor": "bottom"},
              "xaxis": {"type": "log", "title": {"text": "learning rate (AdamW)"}, "tickvals": list(TRANSFORMER_LRS),
                        "ticktext": [f"{lr:g}" for lr in TRANSFORMER_LRS]},
              "yaxis": {"title": {"text": "validation loss (nats per character)"}}}
    return PlotlyFigure(traces, layout, name="text-sensitivity", label="fig-text-sensitivity",
                        caption=f"The transformer's learning-rate sensitivity: validation loss after "
                                f"{TRANSFORMER.steps} steps of AdamW against the learning rate, {_over_seeds_words()}, "
                                "for each arm (each changes one thing against 'no remedy'). A learning rate where the "
                                "arm diverged is left out of its line.")


def _arm_frame(arm: str, lr: float) -> dict:
    run, plain = transformer_run(arm, lr), transformer_run("none", lr)
    c, p = curves(run), curves(plain)
    scores, base = arm_scores(arm), arm_scores("none")
    lrs = list(TRANSFORMER_LRS)
    note = [f"{ARM_LABELS[arm][0].upper() + ARM_LABELS[arm][1:]} at learning rate {lr:g}, seed 0: {describe(run)}"]
    if arm != "none":
        note.append(f"No remedy, same seed: {describe(plain)}")
    if HEADLINE_LR.get(arm) == lr:
        a = harness.score(lr, [test_loss(transformer_run(arm, lr, s)) for s in SEEDS])
        note.append(f"This is the arm's best learning rate (chosen on seed {SWEEP_SEEDS[0]}'s validation loss); over "
                    f"seeds {seed_range(SEEDS)} its test loss is {pm(a)} nats.")
    return {"traces": [{"x": c["x"], "y": c["loss"]}, {"x": p["x"], "y": p["loss"]},
                       {"x": lrs, "y": [_r4(scores[lr_].mean) for lr_ in lrs]},
                       {"x": lrs, "y": [_r4(base[lr_].mean) for lr_ in lrs]},
                       {"x": [lr], "y": [_r4(scores[lr].mean)]}],
            "note": note}


def sensitivity_explorer() -> Explorer:
    """Learning-rate slider and arm buttons: the arm's training loss (seed 0) against no remedy, and its sensitivity
    curve with the chosen learning rate marked."""

    def compute(arm: str, lr: float) -> dict:
        return _arm_frame(arm, lr)

    traces = [
        run_style("clipped", name="arm shown", mode="lines"),
        run_style("plain", name="no remedy", mode="lines"),
        run_style("clipped", name="arm shown", mode="lines+markers", xaxis="x2", yaxis="y2", showlegend=False,
                  marker={"size": 7}),
        run_style("plain", name="no remedy", mode="lines+markers", xaxis="x2", yaxis="y2", showlegend=False,
                  marker={"size": 7, "symbol": "square"}),
        {"mode": "markers", "name": "learning rate shown", "xaxis": "x2", "yaxis": "y2",
         "marker": {"symbol": "circle-open", "size": 16, "color": "#009E73", "line": {"width": 2.5}}},
    ]
    layout = {"height": 450,
              "xaxis": {"domain": [0, 0.46], "anchor": "y", **_log_step_axis(TRANSFORMER.steps)},
              "yaxis": {"title": {"text": "training loss (nats/char)"}, "anchor": "x"},
              "xaxis2": {"domain": [0.56, 1], "anchor": "y2", "type": "log", "title": {"text": "learning rate"},
                         "tickvals": list(TRANSFORMER_LRS), "ticktext": [f"{lr:g}" for lr in TRANSFORMER_LRS]},
              "yaxis2": {"title": {"text": "validation loss"}, "anchor": "x2"}}
    return Explorer(
        "text-transformer",
        [Param("arm", list(ARMS), label="remedy", default="norm", fmt=lambda a: ARM_LABELS[a]),
         Param("lr", list(TRANSFORMER_LRS), label="learning rate", default=0.1, fmt="g")],
        compute=compute, traces=traces, layout=layout, share_traces=True, label="fig-text-transformer",
        caption=f"The transformer ({TRANSFORMER.layers} pre-LN blocks of width {TRANSFORMER.width}, context "
                f"{TRANSFORMER.seq_len}, AdamW) with the remedy picked by the buttons (solid blue) against no remedy "
                "(dashed vermillion). First panel (left, or top on a phone): training loss of seed 0 at the "
                "learning rate set by the slider, mean per plotted bin of steps (logarithmic step axis); second "
                f"panel: validation loss against the learning rate ({_over_seeds_words()}), the slider's learning rate "
                "circled. The note says when that rate is the arm's chosen one (the best on seed 0's validation "
                "loss).")


def live_transformer_frame(arm: str, lr: float) -> dict:
    """A fresh transformer run of ``arm`` at ``lr`` (seed 0) for :func:`sensitivity_explorer`, against the stored run
    without a remedy; the sensitivity curves are the stored ones, the fresh run's validation loss circled."""
    run = fresh_run(replace(arm_config(arm, 0.01), lr=float(lr)))
    plain = transformer_run("none", lr) if lr in TRANSFORMER_LRS else fresh_run(arm_config("none", float(lr)))
    c, p = curves(run), curves(plain)
    lrs = list(TRANSFORMER_LRS)
    scores, base = arm_scores(arm), arm_scores("none")
    return {"traces": [{"x": c["x"], "y": c["loss"]}, {"x": p["x"], "y": p["loss"]},
                       {"x": lrs, "y": [_r4(scores[x].mean) for x in lrs]},
                       {"x": lrs, "y": [_r4(base[x].mean) for x in lrs]},
                       {"x": [lr], "y": [_r4(val_loss(run))]}],
            "note": [f"{ARM_LABELS[arm]} at learning rate {lr:g}, a fresh run (seed 0): {describe(run)}"]}


def attention_frame(lr: float) -> dict:
    """The :func:`attention_explorer` frame: the largest attention logit over training, per arm, at ``lr`` (seed 0)."""
    traces, note = [], []
    for arm in ARMS:
        values = transformer_run(arm, lr)["attention"]
        traces.append({"x": [v[0] + LOG_SHIFT for v in values], "y": [_r4(_f(v[1])) for v in values]})
    peak = {arm: max(_f(v[1]) for v in transformer_run(arm, lr)["attention"]) for arm in ARMS}
    note.append(f"Learning rate {lr:g}: the largest attention logit reaches " + ", ".join(
        f"{p:.3g} ({ARM_LABELS[a]})" for a, p in peak.items()) + ".")
    return {"traces": traces, "note": note}


def attention_explorer() -> Explorer:
    """The largest attention logit during training of each transformer arm; a learning-rate slider."""
    traces = [{"mode": "lines+markers", "name": ARM_LABELS[arm], "line": ARM_STYLES[arm]["line"],
               "marker": {**ARM_STYLES[arm]["marker"], "size": 8}} for arm in ARMS]
    layout = {"height": 450, "xaxis": _log_step_axis(TRANSFORMER.steps),
              "yaxis": {"type": "log", "title": {"text": "largest attention logit q·k/√d"}}}
    return Explorer(
        "text-attention", [Param("lr", list(TRANSFORMER_LRS), label="learning rate", default=0.1, fmt="g")],
        compute=attention_frame, traces=traces, layout=layout, label="fig-text-attention",
        caption="The largest attention logit of any block, head and position of the transformer on 16 windows of "
                "validation text, measured at initialisation, after 10, 30, 100 and 300 steps and at the last step "
                "(seed 0), for each arm at the learning rate set by the slider. Both axes are logarithmic.")
