r"""Chapter 5.3's cost table: what each safety guard adds to a training step, on the page's small MLP and on larger
models.

A guard's work is of two kinds. Some of it is paid once per call whatever the model (a host read of a number, a
few kernel launches, Python), and dominates on a network whose step takes a fraction of a millisecond. The rest
grows with the number of parameters P (a norm reads every gradient, SpikeGuard keeps a copy of the weights and the
momentum, rollback copies the whole state every few steps), while a training step's work also grows with the
examples and positions per step. This module measures the share each guard takes on networks of different sizes,
with chapter 5.1's machinery (:mod:`gradclip_book.step_costs`: its cases, its optimizers and learning rate, its
clock): for each case of :data:`CASES` it trains, calls interleaved in one process
(:func:`gradclip_book.timing.interleaved`, medians, one thread), :data:`~gradclip_book.safety.EVERY` steps per timed
call (one rollback period) under every guard of :data:`gradclip_book.safety.GUARDS`, each guard on its own copy of
the model (same weights), all on the same input and label tensors.

The numbers are stored in :data:`RESULTS_FILE` by :data:`COMMAND` (the stored run, ``--rounds 5`` on the quiet 2-core
machine, took 17 minutes for the three cases, a round of ResNet-50 about 3 minutes; see chapters/data/README.md),
with the machine they were measured on, and chapter 5.3 reads them; nothing is timed when the page builds.

Example:
    >>> from gradclip_book import guard_costs
    >>> [case.name for case, _ in guard_costs.CASES]
    ['mlp-safety', 'cnn', 'resnet50-b2']
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import os
import statistics
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import classification as cls
from . import safety, step_costs
from .timing import interleaved

__all__ = ["CASES", "COMMAND", "CONTROL", "GUARDS_ONLY", "GUARD_NAMES", "RESULTS_FILE", "dearer", "load", "main",
           "measure", "measure_case", "noise", "ratios", "relative"]

RESULTS_FILE = Path(__file__).resolve().parents[2] / "chapters" / "data" / "guard_costs.json"
COMMAND = "python -m gradclip_book.guard_costs"
CONTROL = "none-again"
"""A second plain step timed beside the guards (no guard, its own model): its ratio to ``"none"`` would be 1 but for
the timing's noise, so it shows which differences the measurement resolves."""
GUARD_NAMES: tuple[str, ...] = (*safety.GUARDS, CONTROL)
"""Every guard chapter 5.3 prices, ``"none"`` (the plain step every ratio divides by) first, then the control."""
GUARDS_ONLY: tuple[str, ...] = GUARD_NAMES[1:-1]
"""The guards of :data:`GUARD_NAMES` without its two plain copies (``"none"`` and :data:`CONTROL`)."""


def _page_mlp(generator: torch.Generator):
    return step_costs._classifier(cls.build_model(safety.BASE), (safety.BASE.batch, 64), 10)(generator)


_CNN, _RESNET = ({c.name: c for c in step_costs.CASES}[name] for name in ("cnn", "resnet50-b2"))

CASES: tuple[tuple[step_costs.Case, int], ...] = (
    (step_costs.Case("mlp-safety", "chapter 5.3's MLP, depth 8", safety.BASE.batch, 1, safety.BASE.optimizer,
                     _page_mlp), 15),
    (_CNN, 15),
    (_RESNET, 3),
)
"""(case, timed calls per guard and round): the page's own network (chapter 4's depth-8 MLP at batch 64), then
chapter 5.1's residual CNN and its smallest ResNet-50 step (batch 2 of 64x64 images: of 5.1's ResNet-50 steps the one
where a guard's share is largest). ResNet-50 gets fewer calls: one call is 10 steps of a third of a second."""


def _guarded(case: step_costs.Case, name: str, x: torch.Tensor, y: torch.Tensor, steps: int):
    """A fresh model, optimizer and guard ``name``; returns ``(run, actions, guard)``, ``run()`` training ``steps``
    steps with :func:`gradclip_book.safety._guarded_step`, the page's loop without its fault injection."""
    model = case.build(torch.Generator().manual_seed(0))[0]
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = step_costs.optimizer_for(case, params)
    guard = safety.GUARDS["none" if name == CONTROL else name].build()
    if isinstance(guard, safety._Activation):
        # the input of the head is the last hidden layer's activation; the page's MLP: its last ReLU, which is what
        # the guard's own setup hooks (the CNNs have no top-level ReLU after their stem)
        model[-2].register_forward_hook(guard._record)
    else:
        guard.setup(model, optimizer)
    counter, actions = itertools.count(), Counter()

    def run() -> None:
        for _ in range(steps):
            actions[safety._guarded_step(model, optimizer, guard, next(counter), x, y)[1]] += 1
    return run, actions, guard


def measure_case(case: step_costs.Case, repeats: int, steps: int = safety.EVERY) -> dict[str, Any]:
    """Median ms per training step (this thread's CPU time) under each guard, calls of ``steps`` steps interleaved.

    Returns ``{"name", "label", "parameters", "tensors", "batch", "positions", "optimizer", "step_ms" (a plain step:
    the mean of the two unguarded copies, ``"none"`` and :data:`CONTROL`, as in :func:`relative`), "ms": {guard: ms
    per step}, "ratio": {guard: ms / step_ms}, "extra_ns_per_value": {guard: (ms - step_ms) per parameter, ns},
    "not_stepped": {guard: steps of the timing (warm-up included) that did not run backward and the update, or whose
    update a guard undid}}``; ``not_stepped`` must be all zero for the times to be training steps.
    """
    x, y = case.build(torch.Generator().manual_seed(0))[1:3]
    runs = {name: _guarded(case, name, x, y, steps) for name in GUARD_NAMES}
    times = interleaved({name: run for name, (run, _, _) in runs.items()}, repeats, clock=time.thread_time)
    model = case.build(torch.Generator().manual_seed(0))[0]
    params = [p for p in model.parameters() if p.requires_grad]
    values = sum(p.numel() for p in params)
    ms = {name: times[name] / steps for name in GUARD_NAMES}
    step_ms = _plain_ms(ms)
    return {"name": case.name, "label": case.label, "parameters": values, "tensors": len(params),
            "batch": case.batch, "positions": case.positions, "optimizer": case.optimizer, "step_ms": step_ms,
            "ms": ms, "ratio": relative({"ms": ms}),
            "extra_ns_per_value": {n: (ms[n] - step_ms) * 1e6 / values for n in GUARD_NAMES},
            "not_stepped": {n: sum(c for a, c in actions.items() if a != "step") + guard.skipped()
                            for n, (_, actions, guard) in runs.items()}}


def _summary(per_round: list[dict[str, Any]], repeats: int) -> dict[str, Any]:
    """One case's stored entry: its fields, per quantity the median over the rounds, and the rounds themselves."""
    timed = ("step_ms", "ms", "ratio", "extra_ns_per_value")
    summary = {k: v for k, v in per_round[0].items() if k not in timed}
    summary["repeats"] = repeats
    summary["not_stepped"] = {n: sum(r["not_stepped"][n] for r in per_round) for n in GUARD_NAMES}
    summary["step_ms"] = statistics.median(r["step_ms"] for r in per_round)
    for key in timed[1:]:
        summary[key] = {n: statistics.median(r[key][n] for r in per_round) for n in GUARD_NAMES}
    summary["rounds"] = [{k: r[k] for k in (*timed, "load") if k in r} for r in per_round]
    return summary


def measure(rounds: int = 3, scale: float = 1.0, names: list[str] | None = None, progress: bool = True,
            after_round: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """The cases of :data:`CASES` named in ``names`` (``None``: all), ``rounds`` separate interleaved timings each,
    on one thread (``scale`` multiplies each case's timed calls, at least 1). ``after_round(result so far)`` is
    called after every round (the command stores it, so an interrupted measurement keeps its finished rounds).

    Returns ``{"machine", "date", "steps_per_call", "rounds", "clock", "cases": [{case fields, "repeats", per
    quantity the median over the rounds, "rounds": [per round: step_ms, ms, ratio, extra_ns_per_value, load (the
    1-minute load average after the round)]}], "order"}``.
    """
    from tqdm.auto import tqdm

    from .performance import machine

    torch.set_num_threads(1)
    result = {"machine": machine(), "date": datetime.date.today().isoformat(), "steps_per_call": safety.EVERY,
              "rounds": rounds, "clock": "thread CPU time (time.thread_time), one torch thread",
              "order": "calls interleaved, the order reversed every other round (timing.interleaved)", "cases": []}
    chosen = [(case, repeats) for case, repeats in CASES if names is None or case.name in names]
    bar = tqdm(total=len(chosen) * rounds, desc="timing guards", disable=not progress)
    for case, repeats in chosen:
        repeats = max(1, round(repeats * scale))
        per_round: list[dict[str, Any]] = []
        for _ in range(rounds):
            per_round.append({**measure_case(case, repeats), "load": _load_average()})
            bar.update()
            result["cases"] = [c for c in result["cases"] if c["name"] != case.name] + [_summary(per_round, repeats)]
            if after_round is not None:
                after_round(result)
    bar.close()
    return result


def _load_average() -> float | None:
    """The machine's 1-minute load average after a round (``None`` where the system has none): what else ran."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def load(path: str | Path = RESULTS_FILE) -> dict[str, Any]:
    """The stored measurements; ``FileNotFoundError`` naming the command that writes them."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"no stored guard costs at {path}; measure them with `{COMMAND}`") from None


def _plain_ms(ms: dict[str, float]) -> float:
    """A plain step's time: the mean of the two unguarded copies' (``"none"`` and :data:`CONTROL`)."""
    return (ms["none"] + ms[CONTROL]) / 2


def relative(timed_round: dict[str, Any]) -> dict[str, float]:
    """One stored round's times as multiples of a plain step, the plain step being the mean of its two unguarded
    copies (``"none"`` and :data:`CONTROL`, timed in the same round): dividing by one copy alone carries that copy's
    own error into every ratio.

    Example:
        >>> relative({"ms": {**dict.fromkeys(GUARD_NAMES, 3.0), "none": 2.1, CONTROL: 1.9}})["spike"]
        1.5
    """
    plain = _plain_ms(timed_round["ms"])
    return {name: ms / plain for name, ms in timed_round["ms"].items()}


def ratios(case: dict[str, Any]) -> dict[str, list[float]]:
    """Per guard (and the two plain copies), its :func:`relative` time in each round of a stored case."""
    per_round = [relative(r) for r in case["rounds"]]
    return {name: [r[name] for r in per_round] for name in GUARD_NAMES}


def noise(case: dict[str, Any], by_round: dict[str, list[float]] | None = None) -> float:
    """The timing noise of one stored case: over its rounds, the largest of either plain copy's distance from their
    mean and a guard's shortfall below it (a guard only adds work, so a time below a plain step's is noise).
    Differences below it are not resolved. ``by_round``: :func:`ratios` of ``case``, when already computed.

    Example:
        >>> round(noise({"rounds": [{"ms": {**dict.fromkeys(GUARD_NAMES, 1.2), "none": 1.05, CONTROL: 0.95}}]}), 2)
        0.05
    """
    by_round = by_round or ratios(case)  # the two copies lie equally far on either side of their mean: one of them tells
    return max(max(abs(by_round["none"][i] - 1), *(1 - by_round[g][i] for g in GUARDS_ONLY))
               for i in range(len(case["rounds"])))


def dearer(case: dict[str, Any]) -> list[str]:
    """The guards of one stored case that made a step dearer than a plain one (:func:`relative`) in every round by
    more than :func:`noise` (in the order of :data:`gradclip_book.safety.GUARDS`).

    Example:
        >>> plain = {**dict.fromkeys(GUARD_NAMES, 1.0), "none": 1.02, CONTROL: 0.98}   # noise 0.02
        >>> dearer({"rounds": [{"ms": {**plain, "spike": 1.5, "rollback": 1.03}},
        ...                    {"ms": {**plain, "spike": 1.2, "rollback": 1.01}}]})   # rollback: not in every round
        ['spike']
    """
    by_round = ratios(case)
    bar = 1 + noise(case, by_round)
    return [g for g in GUARDS_ONLY if all(x > bar for x in by_round[g])]


def main(argv: list[str] | None = None) -> None:
    """``python -m gradclip_book.guard_costs [--cases NAME ...] [--rounds R] [--scale S] [--out PATH]``: measure
    and store (with ``--cases``, the other cases stored in ``--out`` are kept)."""
    parser = argparse.ArgumentParser(prog=COMMAND, description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="separate interleaved timings per case (default 3)")
    parser.add_argument("--scale", type=float, default=1.0,
                        help="multiplies each case's timed calls per guard (default 1: 15, 15 and 3)")
    parser.add_argument("--cases", nargs="+", choices=[case.name for case, _ in CASES], metavar="NAME",
                        help="measure only these cases and keep the others stored in --out (default: all)")
    parser.add_argument("--out", type=Path, default=RESULTS_FILE, help=f"the file to write (default {RESULTS_FILE})")
    args = parser.parse_args(argv)

    def store(result: dict[str, Any]) -> None:
        if args.cases and args.out.exists():  # read now: another process may have stored its cases meanwhile
            kept = {c["name"]: c for c in load(args.out)["cases"]} | {c["name"]: c for c in result["cases"]}
            result = {**result, "cases": [kept[case.name] for case, _ in CASES if case.name in kept]}
        args.out.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")

    result = measure(args.rounds, args.scale, args.cases, after_round=store)
    for c in result["cases"]:
        if args.cases and c["name"] not in args.cases:
            continue
        print(f"{c['label']} ({c['parameters']:,} values, a step {c['step_ms']:.2f} ms)")
        for n in GUARD_NAMES[1:]:
            spread = [r["ratio"][n] for r in c["rounds"]]
            print(f"  {n:10s} {c['ratio'][n]:6.3f} x  (rounds {min(spread):.3f}-{max(spread):.3f})"
                  f"  {c['extra_ns_per_value'][n]:+8.2f} ns/value  not stepped {c['not_stepped'][n]}")
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
