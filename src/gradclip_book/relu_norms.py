"""Chapter 6's ReLU exercise at several seeds: the first gradient norms of chapter 4.11's RNN with tanh and with ReLU.

d2l's exercise ("replace tanh by ReLU: does the RNN still need clipping?") is answered by the largest pre-clip
gradient norm of the first :data:`STEPS` steps, ReLU's against tanh's. That ratio depends on the seed a lot (at
seed 4 the ReLU network's norm grows past a thousand times tanh's), so the exercise asks for what holds at
every seed of :data:`SEEDS`: the smallest ratio. The norms come from :func:`gradclip_book.conclusion.rnn_norms`
(about 0.7 s per run on one thread), computed once by

    python -m gradclip_book.relu_norms

into ``chapters/data/relu_norms.json``; chapter 6 re-runs seed 0's ReLU run and checks it against the file, and
a test re-runs another seed.

Example:
    >>> stored = load()
    >>> sorted(stored["seeds"]) == [str(s) for s in SEEDS] and len(stored["seeds"]["0"]["relu"]) == STEPS
    True
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

__all__ = ["COMMAND", "FILE", "LR", "SEEDS", "SEQ_LEN", "STEPS", "compute", "load", "main", "ratios"]

FILE = Path(__file__).resolve().parents[2] / "chapters" / "data" / "relu_norms.json"
COMMAND = "python -m gradclip_book.relu_norms"
SEEDS = (0, 1, 2, 3, 4)
"""The seeds of the exercise (the model's initial weights and the stream's offset, as chapter 4.11 draws them)."""
SEQ_LEN, LR, STEPS = 32, 1.0, 30
"""d2l's setting as chapter 4.11 runs it: windows of 32 characters, plain SGD at lr 1; the first 30 steps."""


def compute(seeds: tuple[int, ...] = SEEDS, steps: int = STEPS) -> dict[str, Any]:
    """Per seed the pre-clip gradient norms of the first ``steps`` steps with tanh and with ReLU, no clipping.

    Returns ``{"seq_len", "lr", "steps", "machine" (:func:`gradclip_book.reproducibility.machine`),
    "seeds": {str(seed): {"tanh": [norm per step], "relu": [...]}}}``.
    """
    import torch

    from .conclusion import rnn_norms
    from .reproducibility import machine

    torch.set_num_threads(1)
    runs = {str(s): {act: rnn_norms(act, SEQ_LEN, LR, steps, seed=s) for act in ("tanh", "relu")} for s in seeds}
    return {"seq_len": SEQ_LEN, "lr": LR, "steps": steps, "machine": machine(), "seeds": runs}


def load(path: str | Path = FILE) -> dict[str, Any]:
    """The stored norms; ``FileNotFoundError`` naming the command that writes them."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"no stored ReLU norms at {path}; compute them with `{COMMAND}`") from None


def ratios(stored: dict[str, Any], steps: int | None = None) -> dict[int, float]:
    """Per seed: the largest ReLU norm over the first ``steps`` steps (all stored ones by default) / tanh's."""
    steps = steps or stored["steps"]
    return {int(s): max(r["relu"][:steps]) / max(r["tanh"][:steps]) for s, r in stored["seeds"].items()}


def main(argv: list[str] | None = None) -> None:
    """``python -m gradclip_book.relu_norms [--out PATH]``: compute and store (under a minute on one core)."""
    from .harness.grid import store_json_command

    def report(result: dict[str, Any]) -> list[str]:
        return [f"seed {seed}: largest norm over {result['steps']} steps, ReLU / tanh = {ratio:.2f}"
                for seed, ratio in ratios(result).items()]

    store_json_command(argv, COMMAND, __doc__.split("\n\n")[0], FILE, compute, report)


if __name__ == "__main__":
    main()
