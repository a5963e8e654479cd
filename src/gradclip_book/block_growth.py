r"""Chapter 4.9 at many seeds: how the signal grows through the residual CNN's blocks at initialisation.

Section 4.9 measures, on one minibatch at initialisation, the root-mean-square activation after each residual block of
the depth-16 residual CNN (:data:`gradclip_book.images_grid.HARD`), without normalisation and with BatchNorm, and the
RMS of the logits. Seed 0's numbers alone would describe one draw of the weights, so the measurement is stored for
every seed of :data:`SEEDS` (chapter 4's seeds, its two unseen groups and a review's five) by

    python -m gradclip_book.block_growth

into ``chapters/data/block_growth.json`` (no training: a few seconds on an idle core; it rewrites the file and prints
:func:`summary`). A test re-measures one seed.

Example:
    >>> stored = load()
    >>> stored["seeds"] == list(SEEDS) and sorted(stored["runs"]["0"]) == ["residual", "residual+bn"]
    True
"""

from __future__ import annotations

import json
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

__all__ = ["COMMAND", "FILE", "SEEDS", "compute", "load", "main", "measure", "summary"]

FILE = Path(__file__).resolve().parents[2] / "chapters" / "data" / "block_growth.json"
COMMAND = "python -m gradclip_book.block_growth"
SEEDS = tuple(range(20))
"""Chapter 4's seeds 0-4, its unseen groups 5-9 and 10-14, and 15-19 (the seeds of a review)."""
DIGITS = 7
"""Significant digits stored per value (a re-run is compared to this precision)."""
MINIBATCH = 64
"""Images of the minibatch measured: the first of the training split, as chapter 4's batch size."""


def measure(config: Any) -> dict[str, Any]:
    """One network at initialisation: ``{"blocks": RMS activation after each residual block, in order, "logits": RMS
    of the logits}`` on the first :data:`MINIBATCH` training images (no gradient, no training), to :data:`DIGITS`
    significant digits."""
    import torch

    from . import harness, images

    model, sizes = images.build_model(config), []
    for module in model.modules():
        if type(module).__name__ == "BasicBlock":
            module.register_forward_hook(lambda mod, inp, out: sizes.append(float(out.detach().pow(2).mean().sqrt())))
    with torch.no_grad():
        logits = model(harness.image_split()["train"][0][:MINIBATCH])
    rms = float(logits.pow(2).mean().sqrt())
    return {"blocks": [float(f"{v:.{DIGITS}g}") for v in sizes], "logits": float(f"{rms:.{DIGITS}g}")}


def compute(seeds: tuple[int, ...] = SEEDS) -> dict[str, Any]:
    """:func:`measure` of the hard case without normalisation (``"residual"``) and with BatchNorm
    (``"residual+bn"``) at every seed: ``{"config" (seed 0's), "seeds", "runs": {seed: {model: measure}}}``."""
    from . import images_grid as ig

    runs = {str(s): {model: measure(replace(ig.HARD, model=model, seed=s)) for model in ("residual", "residual+bn")}
            for s in seeds}
    return {"config": asdict(ig.HARD), "seeds": list(seeds), "runs": runs}


def load(path: str | Path = FILE) -> dict[str, Any]:
    """The stored measurements (:func:`compute`'s result)."""
    return json.loads(Path(path).read_text(encoding="utf-8"))


def summary(stored: dict[str, Any]) -> dict[int, dict[str, Any]]:
    """Per seed: ``"gains"`` (each block's RMS over the previous block's, without normalisation), ``"growth"`` and
    ``"growth_bn"`` (last block's RMS over the first's, without and with BatchNorm), ``"logit_ratio"`` (logit RMS
    without BatchNorm over with it), ``"blocks"`` (how many)."""
    out = {}
    for seed, by_model in stored["runs"].items():
        plain, bn = by_model["residual"], by_model["residual+bn"]
        sizes = plain["blocks"]
        out[int(seed)] = {"gains": [b / a for a, b in zip(sizes, sizes[1:])], "growth": sizes[-1] / sizes[0],
                          "growth_bn": bn["blocks"][-1] / bn["blocks"][0], "logit_ratio": plain["logits"] / bn["logits"],
                          "blocks": len(sizes)}
    return out


def main(argv: list[str] | None = None) -> None:
    """``python -m gradclip_book.block_growth [--out PATH]``: compute and store."""
    from .harness.grid import store_json_command

    def report(result: dict[str, Any]) -> list[str]:
        return [f"seed {seed}: per-block gain {min(s['gains']):.2f} to {max(s['gains']):.2f}, "
                f"growth {s['growth']:.1f}x over {s['blocks']} blocks (BatchNorm {s['growth_bn']:.2f}x), "
                f"logits {s['logit_ratio']:.2f}x BatchNorm's" for seed, s in summary(result).items()]

    store_json_command(argv, COMMAND, __doc__.split("\n\n")[0], FILE, compute, report)


if __name__ == "__main__":
    main()
