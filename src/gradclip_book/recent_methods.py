r"""Chapter 6's measurement of the methods adopted since 2023 on chapter 4.11's transformer.

The runs: chapter 4.11's small character transformer (:data:`gradclip_book.text_runs.TRANSFORMER`: 2 pre-LN
blocks of width 64, AdamW with betas 0.9 and 0.95 and weight decay 0.1, 500 steps), at the learning rate the
chapter chose on validation loss for the plain run and for every arm (:data:`gradclip_book.text_grid.HEADLINE_LR`,
0.01), seeds :data:`RUN_SEEDS`, with one of the methods of :data:`ARMS` in place of the chapter's global-norm
clipping:

* ``"adagc"``: :class:`gradclip.AdaGC` with its defaults (each tensor clipped at 1.05 times an EMA of its own
  clipped norms, beta 0.98, after 100 steps of global clipping at 1.0, the chapter's threshold);
* ``"update-clip"``: :class:`gradclip.UpdateClip` ``("stable_adamw", d=1)`` attached to the AdamW optimizer
  (StableAdamW's per-tensor learning rate, from Adam's own second moment);
* ``"loss-guard"``: :meth:`gradclip.SpikeGuard.olmo_core` attached to the optimizer, given each step's training
  loss (OLMo-core's skip-step rule: a loss or gradient norm more than 6 standard deviations above the mean of
  the last 128, once 64 are known).

Everything else is the chapter's run (:func:`gradclip_book.text_runs.train`: the same model, initialisation,
batches, loss, loop and evaluation); the plain and globally clipped runs they are compared with are the chapter's
stored ones (``chapters/data/text_grid.jsonl.gz``), not recomputed. Section ``"check"`` re-runs the plain run of
seed 0 through this module; it equals the stored one (tested). The learning rate was not chosen again for
each method: the methods run at the plain run's choice.

``python -m gradclip_book.recent_methods [--jobs N]`` computes the runs into
``chapters/data/recent_methods.jsonl.gz`` (the harness's grid runner: a progress bar, resumable), one JSON line
per run: the harness's record (:meth:`gradclip_book.harness.Run.to_json`), ``fired`` (the share of steps at
which the method acted: some tensor clipped, some update scaled, the step skipped) and ``largest_rise``
(:func:`gradclip_book.text_runs.largest_rise`).

Example:
    >>> from gradclip_book import recent_methods as rm
    >>> [s for s, _ in rm.points()].count("seeds"), sorted(rm.ARMS)
    (15, ['adagc', 'loss-guard', 'update-clip'])
"""

from __future__ import annotations

import argparse
import functools
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

import gradclip

from . import harness, text, text_runs
from .text_grid import HEADLINE_LR, SEEDS

__all__ = ["ARMS", "COMMAND", "DATA_FILE", "RUN_SEEDS", "MethodConfig", "points", "run", "runs", "summary", "train",
           "version"]

ROOT = Path(__file__).resolve().parents[2]
DATA_FILE = ROOT / "chapters" / "data" / "recent_methods.jsonl.gz"
COMMAND = "python -m gradclip_book.recent_methods"

ARMS = {
    "adagc": "AdaGC (defaults: 1.05 x its EMA, beta 0.98, 100 warm-up steps at a global 1.0)",
    "update-clip": "UpdateClip('stable_adamw', d=1) on AdamW",
    "loss-guard": "SpikeGuard.olmo_core(): loss and norm, 6 std over 128 steps",
}
"""The methods measured (``"none"`` is the plain run, for the check against the stored grid)."""

RUN_SEEDS = SEEDS
"""The seeds of these runs: the chapter's five (seeds 0-2 were computed first, 3-4 appended later; the stored
lines of 0-2 were not recomputed); the comparison uses the chapter's stored plain and clipped runs of the same
seeds."""


@dataclass(frozen=True)
class MethodConfig:
    """One run: a method of :data:`ARMS` (or ``"none"``), the learning rate and the seed of chapter 4.11's transformer."""

    arm: str
    lr: float = HEADLINE_LR["none"]
    seed: int = 0

    def __post_init__(self) -> None:
        if self.arm not in (*ARMS, "none"):
            raise ValueError(f"arm must be 'none' or one of {sorted(ARMS)}, got {self.arm!r}")

    @property
    def text_config(self) -> text_runs.TextConfig:
        """The chapter's plain transformer run at this learning rate and seed."""
        return replace(text_runs.TRANSFORMER, lr=self.lr, seed=self.seed)


class _FunctionClip(harness.Clip):
    """AdaGC called by hand after backward, as the harness's stateful methods are."""

    def __init__(self, params: list[torch.nn.Parameter], clipper: gradclip.AdaGC) -> None:
        super().__init__(params)
        self.clipper = clipper

    def __call__(self) -> None:
        result = self.clipper(self.params)
        self.last = (result.norm, result.clipped.any())


class _AfterStep(harness.Clip):
    """An object attached to the optimizer that acts inside ``step()``; ``fired`` reads what it did."""

    def __init__(self, params: list[torch.nn.Parameter], fired) -> None:
        super().__init__(params)
        self.fired = fired
        self.norm: torch.Tensor | None = None

    def __call__(self) -> None:
        self.norm = gradclip.get_total_norm([p.grad for p in self.params if p.grad is not None])

    def report(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.norm, self.fired()


class _RecordLoss(harness.Hook):
    """Gives the guard each step's training loss before the step (``SpikeGuard.record_loss``)."""

    def __init__(self, guard: gradclip.SpikeGuard) -> None:
        self.guard = guard

    def after_forward(self, step: harness.Step) -> None:
        self.guard.record_loss(step.loss.detach())


def _clip(arm: str, params: list[torch.nn.Parameter], optimizer: torch.optim.Optimizer,
          hooks: list[harness.Hook]) -> harness.Clip | None:
    """The method of ``arm`` on this optimizer (``None`` for the plain run); adds the hooks it needs."""
    if arm == "none":
        return None
    if arm == "adagc":
        return _FunctionClip(params, gradclip.AdaGC())
    if arm == "update-clip":
        clip = gradclip.UpdateClip("stable_adamw", d=1.0).attach(optimizer)
        return _AfterStep(params, lambda: clip.last_result.clipped.any())
    guard = gradclip.SpikeGuard.olmo_core().attach(optimizer)
    hooks.append(_RecordLoss(guard))
    return _AfterStep(params, lambda: guard.skip)


def train(config: MethodConfig, steps: int | None = None, evaluate: bool = True) -> harness.Run:
    """Chapter 4.11's transformer run of ``config`` (optionally cut to ``steps`` steps), trained by the harness.

    The model, optimizer, batches, loss and evaluation are :func:`gradclip_book.text_runs.train`'s; only the
    method differs (module docstring). ``evaluate=False`` skips the final validation and test losses.

    Example:
        >>> r = train(MethodConfig("loss-guard"), steps=3, evaluate=False)
        >>> r.steps_run, r.metrics
        (3, {})
    """
    base = config.text_config
    if steps is not None:
        base = replace(base, steps=steps)
    model = text_runs.build(base)
    params = list(model.parameters())
    optimizer = text_runs.OPTIMIZERS[base.optimizer](params, base.lr)
    hooks: list[harness.Hook] = []
    clip = _clip(config.arm, params, optimizer, hooks)
    method = "none" if clip is None else harness.Method("-", ARMS[config.arm], lambda *_: clip)
    return harness.train(model, optimizer, text_runs._batches(base), base.steps, loss_fn=text_runs.WindowLoss(),
                         method=method, hooks=hooks, evaluate=text_runs._evaluator(base) if evaluate else None)


def run(config: MethodConfig) -> dict[str, Any]:
    """One stored record: the harness's record, ``fired`` and ``largest_rise``."""
    result = train(config)
    return {**result.to_json(), "fired": round(sum(result.clipped) / max(1, len(result.clipped)), 4),
            "largest_rise": text_runs.largest_rise(result.loss[:result.steps_run])}


def points() -> list[tuple[str, MethodConfig]]:
    """Every run, as ``(section, config)`` (module docstring)."""
    out: list[tuple[str, MethodConfig]] = [("check", MethodConfig("none"))]
    for seed in RUN_SEEDS:
        for arm in ARMS:
            out.append(("seeds", MethodConfig(arm, HEADLINE_LR["none"], seed)))
    return out


def version() -> str:
    """The code version of these runs: the code of this module that trains (not :func:`points` nor the summary),
    chapter 4.11's runs, the harness's loop and methods, and the three methods' modules of gradclip."""
    from gradclip import adagc, guard, update_clip

    return harness.code_version(MethodConfig, _FunctionClip, _AfterStep, _RecordLoss, _clip, train, run, text,
                                text_runs, harness.loop, harness.methods, adagc, guard, update_clip)


@functools.lru_cache(maxsize=1)
def _lines(path: str) -> tuple[dict[str, Any], ...]:
    return tuple(harness.load_lines(path))


def runs(path: Path = DATA_FILE) -> list[dict[str, Any]]:
    """The stored records."""
    return list(_lines(str(path)))


def summary(path: Path = DATA_FILE) -> dict[str, Any]:
    """Each method against the chapter's plain and globally clipped runs of the same seeds, by the book's rule.

    Returns ``{"lr", "seeds", "arms": {arm: {"val", "test": Score, "fired": mean share of steps,
    "vs_plain", "vs_norm": verdict, "flips_without": {"plain": [seed, ...], "norm": [...]}}}, "plain": {"val",
    "test"}, "norm": {"val", "test", "fired"}}``: Scores (:func:`gradclip_book.harness.score`) of the losses over
    :data:`RUN_SEEDS`, and verdicts ``"better"``, ``"worse"`` or ``"no difference"`` by
    :func:`gradclip_book.harness.beats` on the test losses (lower is better), as chapter 4.11 judges its arms.
    ``flips_without`` lists the seeds whose omission (from both sides) gives another verdict against the plain
    or the clipped runs: empty when the verdict survives leaving out any one seed.
    """
    from .text_figures import transformer_run

    lr = HEADLINE_LR["none"]
    by = {(line["config"]["arm"], line["config"]["lr"], line["config"]["seed"]): line for line in runs(path)}

    def scores(records, split):
        return harness.score(split, harness.values_of(records, f"{split}_loss"))

    def verdict(a, b):
        return "better" if harness.beats(a, b, mode="min") else "worse" if harness.beats(b, a, mode="min") \
            else "no difference"

    def flips_without(a, b):  # the seeds whose omission changes the verdict of a against b
        kept = lambda s, i: harness.score(s.setting, s.values[:i] + s.values[i + 1:])
        return [seed for i, seed in enumerate(RUN_SEEDS) if verdict(kept(a, i), kept(b, i)) != verdict(a, b)]

    base = {name: [transformer_run(name, HEADLINE_LR[name], s) for s in RUN_SEEDS] for name in ("none", "norm")}
    ref = {name: {split: scores(records, split) for split in ("val", "test")} for name, records in base.items()}
    ref["norm"]["fired"] = sum(float(r["clip_fraction"]) for r in base["norm"]) / len(RUN_SEEDS)
    arms = {}
    for arm in ARMS:
        records = [by[(arm, lr, s)] for s in RUN_SEEDS]
        test = scores(records, "test")
        arms[arm] = {"test": test, "val": scores(records, "val"),
                     "fired": sum(r["fired"] for r in records) / len(records),
                     "vs_plain": verdict(test, ref["none"]["test"]), "vs_norm": verdict(test, ref["norm"]["test"]),
                     "flips_without": {name: flips_without(test, ref[key]["test"])
                                       for name, key in (("plain", "none"), ("norm", "norm"))}}
    return {"lr": lr, "seeds": len(RUN_SEEDS), "arms": arms, "plain": ref["none"], "norm": ref["norm"]}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog=COMMAND, description=__doc__.split("\n")[0])
    parser.add_argument("--jobs", type=int, default=1, help="worker processes (default 1)")
    parser.add_argument("--out", type=Path, default=DATA_FILE, help=f"the data file (default {DATA_FILE})")
    args = parser.parse_args(argv)
    seconds = harness.run_grid(points(), args.out, run, version=version(), jobs=args.jobs)
    print(f"{len(harness.load_lines(args.out))} runs in {args.out}; this invocation took {seconds:.0f} s wall")


if __name__ == "__main__":
    main()
