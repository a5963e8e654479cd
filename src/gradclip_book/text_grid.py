r"""The precomputed runs of chapter 4's text page: which runs, the command that computes them, and reading them.

``python -m gradclip_book.text_grid [--jobs N] [--part rnn|transformer|replicate|all] [--out PATH]`` computes the runs of
:func:`points` with :func:`gradclip_book.text_runs.run` through the harness's grid runner
(:func:`gradclip_book.harness.run_grid`: a tqdm progress bar, ``--jobs`` worker processes, resumable: an
interrupted command computes only the runs missing from the file) into ``chapters/data/text_grid.jsonl.gz``,
one JSON line per run, and rewrites the file in grid order at the end. ``--part`` limits one invocation to
the recurrent, the transformer or the replication runs (the file keeps the others).

Sections (each line's ``section``):

* ``"rnn"``: the vanilla tanh RNN at every window length of :data:`SEQ_LENS` x learning rate of :data:`RNN_LRS`
  x (no clipping and global-norm clipping at each threshold of :data:`RNN_THRESHOLDS`), seed 0;
* ``"rnn-seeds"``: the RNN and the LSTM at :data:`HEADLINE_SEQ_LEN`, every learning rate, without clipping and
  clipped at :data:`RNN_CLIP`, seeds :data:`SEEDS` (the headline comparison: best against best);
* ``"lstm"``: the LSTM at the window lengths :data:`LSTM_SEQ_LENS` x every learning rate, without clipping and clipped at :data:`RNN_CLIP`,
  seed 0;
* ``"transformer"``: the transformer at every learning rate of :data:`TRANSFORMER_LRS` x arm of :data:`ARMS`,
  seeds :data:`SWEEP_SEEDS`;
* ``"transformer-seeds"``: each arm at its learning rate of :data:`HEADLINE_LR` (chosen on the sweep's validation
  loss), the other :data:`SEEDS` (the transformer's headline comparison: best against best over five seeds);
* ``"rnn-replicate"``: the recurrent rows whose clipped-against-unclipped verdict the page states
  (:data:`REPLICATION_ROWS`), without clipping and clipped at :data:`RNN_CLIP`, at each group of
  :data:`UNSEEN_SEED_GROUPS` (a verdict stands only if every seed group gives it, as in chapter 4.4). Listed last,
  appended after the runs stored before them (``--part replicate``).

Example:
    >>> from gradclip_book import text_grid
    >>> pts = text_grid.points()
    >>> len(pts), pts[0][0], pts[-1][0]
    (319, 'rnn', 'rnn-replicate')
"""

from __future__ import annotations

import argparse
import functools
from dataclasses import replace
from pathlib import Path
from typing import Any

from . import harness, text, text_runs
from .text_runs import RNN, TRANSFORMER, TextConfig

__all__ = [
    "ARMS",
    "COMMAND",
    "GRID_FILE",
    "HEADLINE_LR",
    "HEADLINE_SEQ_LEN",
    "RNN_CLIP",
    "RNN_LRS",
    "REPLICATION_ROWS",
    "RNN_THRESHOLDS",
    "SEEDS",
    "SEQ_LENS",
    "SWEEP_SEEDS",
    "TRANSFORMER_LRS",
    "UNSEEN_SEED_GROUPS",
    "arm_config",
    "config_of",
    "lines",
    "points",
    "run_of",
    "version",
]

ROOT = Path(__file__).resolve().parents[2]
GRID_FILE = ROOT / "chapters" / "data" / "text_grid.jsonl.gz"
COMMAND = "python -m gradclip_book.text_grid"

SEEDS = (0, 1, 2, 3, 4)
"""The seeds of every headline comparison."""

SEQ_LENS = (16, 32, 64, 128)
"""Window lengths of truncated backpropagation through time (characters); every run sees 1,024 characters per step."""
HEADLINE_SEQ_LEN = 128
"""The window length of the recurrent headline comparison (the longest: where the gradient has most steps to grow)."""
RNN_LRS = (0.1, 0.3, 1.0, 3.0, 10.0, 30.0)
"""Plain-SGD learning rates of the recurrent runs: the book's grid (1 and 3 per decade, :data:`harness.LR_GRID`)
from 0.1, continued past its end at 3 to 10 and 30, where plain SGD on these recurrent networks still trains (the
LSTM at 10 without clipping) or fails even clipped; kept here so the shared grid, and the points of chapter 4's
image scans, stay as they are."""
RNN_THRESHOLDS = (0.25, 1.0, 4.0)
"""Global-norm thresholds (max_norm) of the recurrent runs: below, near and far above the typical norm (about 0.5)."""
LSTM_SEQ_LENS = (32, HEADLINE_SEQ_LEN)
"""Window lengths of the LSTM's seed-0 runs."""
RNN_CLIP = 1.0
"""The recurrent headline threshold: d2l's ``gradient_clip_val=1``."""
REPLICATION_ROWS = (("rnn", 3.0), ("lstm", 10.0))
"""``(model, lr)`` of the recurrent rows whose clipped-against-unclipped verdict the page states, run again at
:data:`UNSEEN_SEED_GROUPS` at :data:`HEADLINE_SEQ_LEN`: the tanh RNN and the LSTM one step above their best learning
rate, where clipping won at :data:`SEEDS`. The best-against-best rows (the tanh RNN at lr 1, the LSTM at lr 3, where
both arms chose the same rate) are not run again yet, for want of grid time: adding ``("rnn", 1.0)`` and
``("lstm", 3.0)`` here and running ``--part replicate`` appends their 40 runs."""
UNSEEN_SEED_GROUPS = harness.UNSEEN_SEED_GROUPS
"""The seed groups at which :data:`REPLICATION_ROWS` are judged again, beside :data:`SEEDS` (chapter 4.4's groups,
defined once in :data:`gradclip_book.harness.UNSEEN_SEED_GROUPS`)."""

TRANSFORMER_LRS = harness.lr_range(3e-3, 0.3)
"""AdamW learning rates of the transformer runs."""
SWEEP_SEEDS = SEEDS[:1]
"""The transformer's seeds at every learning rate (the sensitivity curves and the choice of learning rate): one,
for want of time on the grid machine; the page says so and compares the arms only at :data:`HEADLINE_LR`."""
HEADLINE_LR: dict[str, float] = {"none": 0.01, "norm": 0.01, "zclip": 0.01, "spike-guard": 0.01, "warmup": 0.01,
                                  "qk-norm": 0.01, "z-loss": 0.01}
"""Per transformer arm, the learning rate with the lowest validation loss of :data:`SWEEP_SEEDS` (the choice on
validation data, checked against the stored runs by a test), where the arm also runs at the other :data:`SEEDS`:
the headline comparison, best against best over five seeds."""
WARMUP = 50
"""Steps of the linear warm-up arm (a tenth of the run)."""
Z_WEIGHT = 1e-4
"""Weight of the z-loss arm (PaLM's and Wortsman et al.'s value)."""

ARMS: dict[str, dict[str, Any]] = {
    "none": {},
    "norm": {"method": "norm", "threshold": 1.0},
    "zclip": {"method": "zclip", "threshold": 2.5},
    "spike-guard": {"method": "spike-guard", "threshold": 6.0},
    "warmup": {"warmup": WARMUP},
    "qk-norm": {"qk_norm": True},
    "z-loss": {"z_loss": Z_WEIGHT},
}
"""The transformer's arms: no remedy, global-norm clipping at 1.0, ZClip at z = 2.5 (its paper's default), the spike
guard at 6 standard deviations (OLMo-core's skip-step factor), a linear warm-up, qk-layernorm, and a z-loss. Each arm
changes one thing against ``"none"``."""


def arm_config(arm: str, lr: float, seed: int = 0) -> TextConfig:
    """The transformer run of ``arm`` (a key of :data:`ARMS`) at ``lr`` and ``seed``.

    Example:
        >>> arm_config("qk-norm", 0.01).qk_norm
        True
    """
    return replace(TRANSFORMER, lr=lr, seed=seed, **ARMS[arm])


def _norm(threshold: float | None) -> dict[str, Any]:
    return {"method": "none" if threshold is None else "norm", "threshold": threshold}


def points() -> list[tuple[str, TextConfig]]:
    """Every run of the grid as ``(section, config)``, in the file's order (see the module docstring)."""
    out: list[tuple[str, TextConfig]] = []
    for seq_len in SEQ_LENS:
        for lr in RNN_LRS:
            for t in (None, *RNN_THRESHOLDS):
                out.append(("rnn", replace(RNN, seq_len=seq_len, lr=lr, **_norm(t))))
    for seq_len in LSTM_SEQ_LENS:
        for lr in RNN_LRS:
            for t in (None, RNN_CLIP):
                out.append(("lstm", replace(RNN, model="lstm", seq_len=seq_len, lr=lr, **_norm(t))))
    for model in ("rnn", "lstm"):
        for lr in RNN_LRS:
            for t in (None, RNN_CLIP):
                for seed in SEEDS[1:]:
                    out.append(("rnn-seeds", replace(RNN, model=model, seq_len=HEADLINE_SEQ_LEN, lr=lr, seed=seed,
                                                     **_norm(t))))
    for lr in TRANSFORMER_LRS:
        for arm in ARMS:
            for seed in SWEEP_SEEDS:
                out.append(("transformer", arm_config(arm, lr, seed)))
    for arm, lr in HEADLINE_LR.items():
        for seed in (s for s in SEEDS if s not in SWEEP_SEEDS):
            out.append(("transformer-seeds", arm_config(arm, lr, seed)))
    for model, lr in REPLICATION_ROWS:
        for seeds in UNSEEN_SEED_GROUPS:
            for seed in seeds:
                for t in (None, RNN_CLIP):
                    out.append(("rnn-replicate", replace(RNN, model=model, seq_len=HEADLINE_SEQ_LEN, lr=lr, seed=seed,
                                                         **_norm(t))))
    return out


PARTS = {"rnn": ("rnn", "lstm", "rnn-seeds"), "transformer": ("transformer", "transformer-seeds"),
         "replicate": ("rnn-replicate",),
         "all": ("rnn", "lstm", "rnn-seeds", "transformer", "transformer-seeds", "rnn-replicate")}


def version() -> str:
    """The grid's code version: the text data and models, the runs, and the harness's loop, methods and curves."""
    return harness.code_version(text, text_runs, harness.loop, harness.methods, harness.curves)


def config_of(fields: dict[str, Any]) -> TextConfig:
    """The :class:`~gradclip_book.text_runs.TextConfig` of a stored line's ``config``."""
    return TextConfig(**fields)


@functools.lru_cache(maxsize=2)
def _lines(path: str) -> tuple[dict[str, Any], ...]:
    return tuple(harness.load_lines(path))


def lines(path: Path = GRID_FILE) -> list[dict[str, Any]]:
    """Every stored run of the grid file (read once per process)."""
    return list(_lines(str(path)))


@functools.lru_cache(maxsize=2)
def _by_key(path: str) -> dict[str, dict[str, Any]]:
    return {line["key"]: line for line in _lines(path)}


def run_of(config: TextConfig, path: Path = GRID_FILE) -> dict[str, Any]:
    """The stored run of ``config``; ``KeyError`` naming the config and the command when the grid lacks it."""
    try:
        return _by_key(str(path))[harness.config_key(config)]
    except KeyError:
        raise KeyError(f"the text grid has no run {config}; compute it with `{COMMAND}`") from None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog=COMMAND, description=__doc__.split("\n")[0])
    parser.add_argument("--jobs", type=int, default=1, help="worker processes (default 1)")
    parser.add_argument("--part", choices=sorted(PARTS), default="all", help="which runs (default all)")
    parser.add_argument("--out", type=Path, default=GRID_FILE, help=f"the grid file (default {GRID_FILE})")
    args = parser.parse_args(argv)
    everything = points()
    chosen = [(s, c) for s, c in everything if s in PARTS[args.part]]
    current = version()
    # run_grid rewrites the file with the runs it was given: keep the other parts' runs to put them back
    stored = {line["key"]: line for line in harness.load_lines(args.out) if line.get("code_version") == current}
    seconds = harness.run_grid(chosen, args.out, text_runs.run, version=current, jobs=args.jobs)
    stored.update({line["key"]: line for line in harness.load_lines(args.out)})
    # the file in the order of the whole grid, whichever part this invocation computed
    ordered = [stored.pop(harness.config_key(c)) for _, c in everything if harness.config_key(c) in stored]
    harness.write_lines(args.out, ordered + list(stored.values()))
    cpu = sum(line["seconds"] for line in ordered)
    print(f"{len(ordered)} of {len(everything)} runs in {args.out} ({args.out.stat().st_size / 1e6:.2f} MB); "
          f"this invocation took {seconds:.0f} s wall with {args.jobs} process(es); the stored runs' own wall "
          f"times add up to {cpu:.0f} s")


if __name__ == "__main__":
    main()
