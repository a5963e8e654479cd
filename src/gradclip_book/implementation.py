r"""Chapter 3's experiments: the four steps of a clipped training step, measured, and where the call goes.

The chapter takes one gradient step apart (preprocess the inputs, compute the
gradient, clip it, update the parameters) and measures each part on the
network and data of chapter 4 (:mod:`gradclip_book.classification`: a plain
ReLU MLP on scikit-learn's digits, at chapter 4's hard setting
:data:`gradclip_book.grids.HARD`). It then runs every place a clipping call
can go (plain loops, mixed precision with ``torch.amp.GradScaler``, fused
optimizers, gradient accumulation, ``zero_grad(set_to_none=True)``,
optimizers that step with a closure, stateful clippers attached to the
optimizer, ``torch.compile``), each case a short function returning the
numbers the chapter asserts.

The code of each placement pattern sits between ``# pattern`` and
``# end pattern`` comments inside its function: :func:`pattern` reads those
lines back from the source, so the lines the chapter shows are the lines
that ran.

Every function is seeded and deterministic on the CPU (up to the thread
count: the chapter runs with one thread).

Example:
    >>> from gradclip_book.implementation import plain_case
    >>> r = plain_case()
    >>> r["after_backward"]["step"] <= r["lr"] * r["max_norm"] + 1e-6 < r["after_step"]["step"]
    True
"""

from __future__ import annotations

import ast
import copy
import html
import importlib.metadata
import inspect
import math
import platform
import re
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

import gradclip

from . import classification as cls
from . import harness
from . import data
from .figures import table_html
from .grids import HARD, HARD_THRESHOLD, THRESHOLDS

__all__ = [
    "accumulation_case",
    "amp_case",
    "attach_case",
    "bf16_case",
    "book_extra",
    "clip_each_method",
    "closure_case",
    "compile_case",
    "corrected_listing",
    "ddp_accumulation_loop",
    "distributed_accumulation_case",
    "fsdp_accumulation_loop",
    "fused_case",
    "collected_items",
    "joint_optimizers_case",
    "layer_norms",
    "listing_recipe",
    "methods_table_html",
    "nonfinite_case",
    "pattern",
    "plain_case",
    "preprocessing_norms",
    "source_html",
    "count_tests",
    "update_lengths",
    "versions",
    "zero_grad_case",
]


# --- 3.1 the environment -----------------------------------------------------------------------


def versions() -> dict[str, str]:
    """The versions this page runs with: Python, torch, numpy, gradclip (installed metadata, not typed).

    Example:
        >>> sorted(versions())
        ['gradclip', 'numpy', 'python', 'torch']
    """
    return {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
            "gradclip": importlib.metadata.version("gradclip")}


def book_extra() -> list[str]:
    """The requirements of gradclip's ``book`` extra, read from the installed package's metadata.

    Example:
        >>> any(r.startswith("plotly") for r in book_extra())
        True
    """
    extra = re.compile(r"""extra\s*==\s*['"]book['"]""")
    out = []
    for requirement in importlib.metadata.requires("gradclip") or []:
        name, _, marker = requirement.partition(";")
        if extra.search(marker):
            out.append(name.strip())
    return out


# --- shared set-up -----------------------------------------------------------------------------


def _train_batch(batch: int = 64, split_seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``batch`` training images (standardised) and labels of chapter 4's split."""
    x, y = harness.image_split(split_seed)["train"]
    return x[:batch], y[:batch]


def _grads(params: list[torch.Tensor]) -> list[torch.Tensor]:
    return [p.grad.detach().clone() for p in params]


def _flat(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1).double() for t in tensors])


def _tiny(seed: int = 0, batch: int = 128) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """A 64-32-32-10 ReLU MLP (He init, seed) and a batch of digits: the placement cases' network."""
    model = cls.build_model(cls.RunConfig(depth=2, width=32, seed=seed))
    x, y = _train_batch(batch)
    return model, x, y


def _loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(model(x), y)


def _step_length(before: list[torch.Tensor], model: nn.Module) -> float:
    """||theta_after - theta_before||, over all parameters."""
    return float(torch.linalg.vector_norm(_flat([p - b for p, b in zip(model.parameters(), before)])))


def _snapshot(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def _max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return float((_flat(a) - _flat(b)).abs().max())


# --- 3.2 the four steps ------------------------------------------------------------------------


def preprocessing_norms(config: cls.RunConfig = HARD, samples: int = 256, std_floor: float = 1.0 / 16.0) -> dict:
    r"""The same network's gradient norm on the same images, raw, scaled to [0, 1] and standardised.

    The images are the first ``samples`` digits: raw grey levels 0..16, the
    same divided by 16, and standardised per pixel as
    :math:`(x - \mu_j)/\max(\sigma_j, s)` with their own mean and standard
    deviation (chapter 4's :func:`~gradclip_book.data.digits_split` does the
    same with the training set's statistics). The network is ``config``'s at
    initialisation (chapter 4's hard setting by default).

    Returns:
        ``{"raw": norm, "unit": norm, "standardised": norm, "factor": raw / standardised,
        "input_rms": {...}}``: global L2 gradient norms of the mean cross-entropy
        (loss units per parameter unit) and the inputs' root mean square.

    Example:
        >>> r = preprocessing_norms(cls.RunConfig(depth=2), samples=64)
        >>> r["raw"] > r["standardised"]
        True
    """
    unit, labels = data.digits(samples=samples, dtype=torch.float32)
    mean, std = unit.mean(dim=0), unit.std(dim=0, unbiased=False).clamp(min=std_floor)
    inputs = {"raw": unit * 16.0, "unit": unit, "standardised": (unit - mean) / std}
    out: dict[str, Any] = {"input_rms": {}}
    for name, x in inputs.items():
        model = cls.build_model(config)
        _loss(model, x, labels).backward()
        out[name] = float(gradclip.get_total_norm([p.grad for p in model.parameters()]))
        out["input_rms"][name] = float(x.pow(2).mean().sqrt())
    out["factor"] = out["raw"] / out["standardised"]
    return out


def layer_norms(config: cls.RunConfig = HARD, batch: int = 64) -> dict:
    """Per-layer gradient norms of one backward pass, read with :class:`gradclip.GradientMonitor`.

    Returns:
        ``{"rows": monitor.table() rows, "by_hand": per-layer norms computed with
        torch.linalg.vector_norm, "total": the global norm}``.

    Example:
        >>> r = layer_norms(cls.RunConfig(depth=2), batch=8)
        >>> [row["layer"] for row in r["rows"]]   # Sequential indices of the Linear layers
        ['0', '2', '4']
    """
    model = cls.build_model(config)
    monitor = gradclip.GradientMonitor(model)   # one entry per layer: "0.weight" and "0.bias" -> "0"
    x, y = _train_batch(batch, config.split_seed)
    _loss(model, x, y).backward()
    monitor.record()
    layers: dict[str, list[torch.Tensor]] = {}
    for name, p in model.named_parameters():
        layers.setdefault(name.rsplit(".", 1)[0], []).append(p.grad.reshape(-1))
    by_hand = {k: float(torch.linalg.vector_norm(torch.cat(v))) for k, v in layers.items()}
    total = float(gradclip.get_total_norm([p.grad for p in model.parameters()]))
    return {"rows": monitor.table(), "by_hand": by_hand, "total": total}


def _batch_grads(model: nn.Module, count: int, batch: int, split_seed: int) -> list[list[torch.Tensor]]:
    """The gradients of ``count`` different minibatches at the same weights (a history for the stateful clippers)."""
    x, y = harness.image_split(split_seed)["train"]
    out = []
    for k in range(count):
        model.zero_grad(set_to_none=True)
        _loss(model, x[k * batch:(k + 1) * batch], y[k * batch:(k + 1) * batch]).backward()
        out.append(_grads(list(model.parameters())))
    return out


def clip_each_method(config: cls.RunConfig = HARD, batch: int = 32, history: int = 30, spike: float = 10.0) -> list[dict]:
    r"""Apply each clipping method of chapter 3 (five functions, AutoClip, ZClip) to one gradient and measure it.

    The gradient is that of ``config``'s network at initialisation on chapter
    4's first training minibatch. Thresholds are chapter 4's: global and
    per-tensor norm ``c`` = :data:`~gradclip_book.grids.HARD_THRESHOLD`, soft
    clipping at the same ``c``, value clipping at the second value of
    ``grids.THRESHOLDS["value"]``, AGC at the second of ``THRESHOLDS["agc"]``
    (on :func:`gradclip.agc_parameters`: the head is not clipped), AutoClip at
    its paper's 10th percentile, ZClip at its authors' defaults without the
    fixed cap. The stateful two first see the gradients of ``history`` other
    minibatches at the same weights, then this one; two more rows give them,
    after the same history, the gradient multiplied by ``spike`` instead (a
    stand-in for a bad batch).

    Returns:
        One dict per method (and the two spike rows): ``name``, ``input`` (``"g"`` or
        ``"10 x g"``), ``setting`` (the knob as text), ``pre``
        and ``post`` (global L2 norms before and after), ``changed`` (the
        fraction of the non-zero gradient entries whose value changed; about a
        third of the entries are exactly 0, units that ReLU switched off), ``units`` (AGC's
        returned fraction of units clipped; ``None`` for the others),
        ``tensors_clipped`` (per-tensor only), ``angle`` (degrees turned),
        ``threshold`` (for the stateful clippers, the threshold they used).

    Example:
        >>> rows = clip_each_method(cls.RunConfig(depth=2), history=3)
        >>> [r["name"] for r in rows][:2]
        ['clip_grad_norm_', 'clip_grad_value_']
    """
    from .families import angle_degrees

    model = cls.build_model(config)
    params = list(model.parameters())
    past = _batch_grads(model, history + 1, batch, config.split_seed)
    target, past = past[0], past[1:]
    c, v, lam = HARD_THRESHOLD, THRESHOLDS["value"][1], THRESHOLDS["agc"][1]
    autoclip, zclip = gradclip.AutoClip(percentile=10.0), gradclip.ZClip(max_grad_norm=None)
    for grads in past:   # the stateful clippers learn from earlier gradients first
        for clipper in (autoclip, zclip):
            for p, g in zip(params, grads):
                p.grad = g.clone()
            clipper(params)
    spiked = {"AutoClip": copy.deepcopy(autoclip), "ZClip": copy.deepcopy(zclip)}   # the same history, for the spike rows

    calls: dict[str, tuple[str, Callable[[], Any]]] = {
        "clip_grad_norm_": (f"max_norm={c:g}", lambda: gradclip.clip_grad_norm_(params, c)),
        "clip_grad_value_": (f"clip_value={v:g}", lambda: gradclip.clip_grad_value_(params, v)),
        "clip_grad_norm_per_tensor_": (f"max_norm={c:g}", lambda: gradclip.clip_grad_norm_per_tensor_(params, c)),
        "soft_clip_grad_norm_": (f"max_norm={c:g}", lambda: gradclip.soft_clip_grad_norm_(params, c)),
        "adaptive_clip_grad_": (f"clip_factor={lam:g}",
                                lambda: gradclip.adaptive_clip_grad_(gradclip.agc_parameters(model), clip_factor=lam)),
        "AutoClip": ("percentile=10", lambda: autoclip(params)),
        "ZClip": ("z_thresh=2.5, max_grad_norm=None", lambda: zclip(params)),
    }
    jobs = [(name, 1.0, setting_and_call) for name, setting_and_call in calls.items()]
    jobs += [(name, spike, (calls[name][0], lambda c=clipper: c(params))) for name, clipper in spiked.items()]
    rows = []
    for name, factor, (setting, call) in jobs:
        for p, g in zip(params, target):
            p.grad = g * factor
        before = _flat([p.grad for p in params])
        returned = call()
        after = _flat([p.grad for p in params])
        out = {"name": name, "input": "g" if factor == 1.0 else f"{factor:g} x g", "setting": setting, "pre": float(before.norm()), "post": float(after.norm()),
               "changed": float((after != before)[before != 0].double().mean()), "angle": angle_degrees(before, after),
               "units": None, "tensors_clipped": None, "threshold": None}
        if name == "adaptive_clip_grad_":
            out["units"] = float(returned)
        elif name == "clip_grad_norm_per_tensor_":
            out["tensors_clipped"] = int((returned > c).sum())
            out["tensors"] = len(params)
        elif name in ("AutoClip", "ZClip"):
            out["threshold"] = float(returned.threshold)
        rows.append(out)
    return rows


def methods_table_html(rows: list[dict]) -> str:
    """:func:`clip_each_method`'s rows as an HTML table (numbers rounded for reading).

    Example:
        >>> "<table" in methods_table_html([{"name": "clip_grad_norm_", "input": "g", "setting": "max_norm=0.1",
        ...     "pre": 7.0, "post": 0.1, "changed": 1.0, "units": None, "angle": 0.0, "threshold": None}])
        True
    """
    head = ["function", "input", "setting", "‖g‖ before", "‖g‖ after", "non-zero entries changed",
            "units clipped", "turned (°)", "threshold used"]

    def cell(value: Any, fmt: str) -> str:
        return "–" if value is None else html.escape(format(value, fmt))

    body = []
    for r in rows:
        threshold = None if r.get("threshold") is None else ("none" if math.isinf(r["threshold"]) else f"{r['threshold']:.3g}")
        body.append([   # <wbr>: long names break after an underscore or "=", never inside a word or number
            f"<code>{_breakable(r['name'])}</code>", html.escape(r["input"]).replace(" ", "&nbsp;"), f"<code>{_breakable(r['setting'])}</code>",
            cell(r["pre"], ".3g"), cell(r["post"], ".3g"), cell(r["changed"], ".0%"), cell(r["units"], ".0%"),
            cell(round(r["angle"], 1) + 0.0, ".1f"), threshold or "–"])
    # a smaller font: nine columns fit the desktop column instead of scrolling; no fixed shares (they cut
    # "input" and "0.559" inside the word at 1280 px): each column is as wide as its longest unbreakable piece
    return '<div style="font-size:0.85em">' + table_html(head, body) + "</div>"


def _breakable(text: str) -> str:
    """``text`` escaped for HTML, with a line-break opportunity after each ``_``, ``=`` and ``,``."""
    return "".join(ch + "<wbr>" if ch in "_=," else ch for ch in html.escape(text)).replace("<wbr><wbr>", "<wbr>")


def _without_docstring(source: str) -> str:
    """A function's or class method's source with its docstring removed (the formula is shown beside it)."""
    source = textwrap.dedent(source)
    tree = ast.parse(source)
    node = tree.body[0]
    body = getattr(node, "body", [])
    if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant) \
            and isinstance(body[0].value.value, str):
        lines = source.splitlines()
        start, end = body[0].lineno - 1, body[0].end_lineno
        return "\n".join(lines[:start] + lines[end:])
    return source


def source_html(objects: dict[str, Any]) -> str:
    """Each object's source, read from the installed package with ``inspect.getsource``, in a collapsed ``<details>``.

    Docstrings are left out (the chapter shows the formula next to it); the
    summary names the file and lines the code comes from.

    Example:
        >>> '<details' in source_html({"clip_grad_value_": gradclip.clip_grad_value_})
        True
    """
    parts = []
    for label, obj in objects.items():
        obj = inspect.unwrap(obj)  # past decorators such as @torch.no_grad(), to the function's own file
        lines, first = inspect.getsourcelines(obj)
        where = inspect.getsourcefile(obj) or "?"
        short = where[where.rfind("gradclip"):] if "gradclip" in where else Path(where).name
        code = _without_docstring("".join(lines))
        parts.append(
            f'<details class="gc-source"><summary><code>{html.escape(label)}</code>: '
            f"{html.escape(short)}, lines {first}–{first + len(lines) - 1}</summary>"
            f'<pre style="font-size:0.8em;overflow-x:auto"><code>{html.escape(code)}</code></pre></details>')
    return "\n".join(parts)


def update_lengths(config: cls.RunConfig = HARD, max_norm: float = HARD_THRESHOLD, batch: int = 64) -> dict:
    r"""The first update's length :math:`\lVert\Delta\theta\rVert` with and without clipping, for SGD and for Adam.

    One step from ``config``'s initial weights on chapter 4's first minibatch,
    at ``config.lr`` for SGD (no momentum, so :math:`\Delta\theta = -\eta g`)
    and at 1e-3 for Adam (torch's default).

    Returns:
        ``{"norm": ||g||, "sgd": {"plain": ..., "clipped": ...}, "adam": {...}, "lr": ..., "adam_lr": ...}``
        (step lengths in parameter units).

    Example:
        >>> r = update_lengths(cls.RunConfig(depth=2, lr=0.1), max_norm=0.01)
        >>> abs(r["sgd"]["clipped"] - 0.1 * 0.01) < 1e-6
        True
    """
    x, y = _train_batch(batch, config.split_seed)
    out: dict[str, Any] = {"lr": config.lr, "adam_lr": 1e-3, "max_norm": max_norm}
    makers = {"sgd": lambda ps: torch.optim.SGD(ps, lr=config.lr), "adam": lambda ps: torch.optim.Adam(ps, lr=1e-3)}
    for name, make in makers.items():
        out[name] = {}
        for clip in (False, True):
            model = cls.build_model(config)
            optimizer = make(model.parameters())
            _loss(model, x, y).backward()
            norm = gradclip.clip_grad_norm_(model.parameters(), max_norm if clip else math.inf)
            before = _snapshot(model)
            optimizer.step()
            out[name]["clipped" if clip else "plain"] = _step_length(before, model)
            out["norm"] = float(norm)
    return out


def corrected_listing(max_norm: float = 1.0, epochs: int = 3, lr: float = 0.01, seed: int = 0) -> dict:
    """Chapter 4's listing (the article's 4.3 loop on the digits) with the clipping call in its place.

    Returns:
        ``{"steps", "clipped" (steps whose norm exceeded max_norm), "max_pre", "max_post", "test_accuracy"}``.

    Example:
        >>> r = corrected_listing(max_norm=0.5, epochs=1)
        >>> r["max_post"] <= 0.5 + 1e-5
        True
    """
    from torch.utils.data import DataLoader, TensorDataset

    parts = harness.image_split(0)
    x, y = parts["train"]
    loader = DataLoader(TensorDataset(x, y), batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(seed))
    torch.manual_seed(seed)
    model = nn.Linear(64, 10)
    criterion = nn.CrossEntropyLoss()
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    pre, post = [], []
    for _ in range(epochs):
        for inputs, targets in loader:
            optimizer.zero_grad()
            loss = criterion(model(inputs), targets)
            loss.backward()
            pre.append(float(gradclip.clip_grad_norm_(model.parameters(), max_norm)))
            post.append(float(gradclip.get_total_norm([p.grad for p in model.parameters()])))
            optimizer.step()
    with torch.no_grad():
        accuracy = float((model(parts["test"][0]).argmax(1) == parts["test"][1]).float().mean())
    return {"steps": len(pre), "clipped": sum(n > max_norm for n in pre), "max_pre": max(pre), "max_post": max(post),
            "test_accuracy": accuracy, "norms": pre}


def listing_recipe(seeds: tuple[int, ...] = (0, 1, 2, 3, 4), epochs: int = 3, lr: float = 0.01) -> list[dict]:
    """The corrected listing with chapter 4's threshold recipe, against the same listing unclipped, per seed.

    For each seed: the listing runs once without clipping (the probe: its
    pre-clip norms), :func:`gradclip_book.harness.recommend_threshold` takes
    the 90th percentile of its first 50 norms, and the listing runs again,
    from the same weights and batch order, clipped at that threshold.

    Returns:
        One dict per seed: ``{"seed", "max_norm" (the recipe's threshold), "plain" and "clipped"`` (the
        :func:`corrected_listing` results)``, "verdict"`` (:func:`gradclip_book.harness.recipe_verdict` on the
        clipped run's share of clipped steps)``}``.

    Example:
        >>> r = listing_recipe(seeds=(0,), epochs=1)[0]
        >>> r["clipped"]["clipped"] < r["clipped"]["steps"] / 2
        True
    """
    rows = []
    for seed in seeds:
        plain = corrected_listing(max_norm=math.inf, epochs=epochs, lr=lr, seed=seed)
        max_norm = harness.recommend_threshold(plain["norms"])
        clipped = corrected_listing(max_norm=max_norm, epochs=epochs, lr=lr, seed=seed)
        rows.append({"seed": seed, "max_norm": max_norm, "plain": plain, "clipped": clipped,
                     "verdict": harness.recipe_verdict(clipped["clipped"] / clipped["steps"])})
    return rows


# --- 3.3 where the call goes -------------------------------------------------------------------


def pattern(function: Callable[..., Any], which: int | tuple[int, ...] = 0) -> str:
    """The lines between the ``which``-th ``# pattern`` and ``# end pattern`` comments of ``function``, dedented.

    ``which`` may be a tuple: those blocks, each dedented, joined by a blank line.

    Example:
        >>> "clip_grad_norm_" in pattern(plain_case)
        True
    """
    lines = inspect.getsource(function).splitlines()
    starts = [i for i, line in enumerate(lines) if line.strip() == "# pattern"]
    ends = [i for i, line in enumerate(lines) if line.strip() == "# end pattern"]
    blocks = which if isinstance(which, tuple) else (which,)
    if len(starts) != len(ends) or any(not 0 <= b < len(starts) for b in blocks):
        raise ValueError(f"{function.__name__} has {len(starts)} '# pattern' blocks, asked for {which}")
    return "\n\n".join(textwrap.dedent("\n".join(lines[starts[b] + 1:ends[b]])) for b in blocks)


def plain_case(max_norm: float = 0.1, lr: float = 0.5) -> dict:
    """One SGD step with the clipping call after ``backward()`` (right), before it, and after ``step()``.

    Returns:
        ``{"after_backward" | "before_backward" | "after_step": {"returned": norm the call returned,
        "step": ||Δθ||}, "norm": ||g||, "lr", "max_norm"}``.

    Example:
        >>> r = plain_case()
        >>> r["before_backward"]["returned"]
        0.0
    """
    out: dict[str, Any] = {"lr": lr, "max_norm": max_norm}
    for place in ("after_backward", "before_backward", "after_step"):
        model, x, y = _tiny()
        optimizer = torch.optim.SGD(model.parameters(), lr=lr)
        before = _snapshot(model)
        if place == "after_backward":
            # pattern
            optimizer.zero_grad(set_to_none=True)
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            norm = gradclip.clip_grad_norm_(model.parameters(), max_norm)  # after backward ...
            optimizer.step()                                               # ... and before step
            # end pattern
        elif place == "before_backward":
            optimizer.zero_grad(set_to_none=True)
            norm = gradclip.clip_grad_norm_(model.parameters(), max_norm)   # no gradients yet: returns 0
            _loss(model, x, y).backward()
            optimizer.step()
        else:
            optimizer.zero_grad(set_to_none=True)
            _loss(model, x, y).backward()
            optimizer.step()
            norm = gradclip.clip_grad_norm_(model.parameters(), max_norm)   # the step already used the raw gradient
        out[place] = {"returned": float(norm), "step": _step_length(before, model)}
    model, x, y = _tiny()
    _loss(model, x, y).backward()
    out["norm"] = float(gradclip.get_total_norm([p.grad for p in model.parameters()]))
    return out


def amp_case(dtype: torch.dtype = torch.float16, max_norm: float = 0.1, lr: float = 0.5) -> dict:
    """Mixed precision on the CPU: autocast to ``dtype``, ``GradScaler("cpu")``, clipping after ``unscale_``.

    Runs one step three ways from the same weights: unscale then clip (right),
    clip the still-scaled gradients (wrong), and the reference (the same
    autocast forward, ``loss.backward()`` without scaling, clip). Also calls a
    stateful clipper given ``scaler=`` before ``unscale_``, which refuses.

    Returns:
        ``{"scale", "true_norm", "right": {"returned", "step"}, "wrong": {...}, "reference": {...},
        "guard": the refusal's message or None, "lr", "max_norm", "dtype"}``.

    Example:
        >>> r = amp_case(torch.bfloat16)
        >>> abs(r["right"]["returned"] / r["true_norm"] - 1) < 1e-2
        True
    """
    out: dict[str, Any] = {"lr": lr, "max_norm": max_norm, "dtype": str(dtype).replace("torch.", "")}
    for place in ("right", "wrong", "reference"):
        model, x, y = _tiny()
        optimizer = torch.optim.SGD(model.parameters(), lr=lr)
        scaler = torch.amp.GradScaler("cpu")
        before = _snapshot(model)
        if place == "right":
            # pattern
            with torch.autocast("cpu", dtype=dtype):
                loss = nn.functional.cross_entropy(model(x), y)
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)                                     # true-scale gradients ...
            norm = gradclip.clip_grad_norm_(model.parameters(), max_norm)  # ... are clipped
            scaler.step(optimizer)                                         # skips the step on inf/NaN
            scaler.update()
            # end pattern
            out["scale"] = float(scaler.get_scale())   # after update: the scale grows only after 2000 clean steps
        elif place == "wrong":
            with torch.autocast("cpu", dtype=dtype):
                loss = _loss(model, x, y)
            scaler.scale(loss).backward()
            norm = gradclip.clip_grad_norm_(model.parameters(), max_norm)   # scaled gradients: a threshold x scale
            scaler.step(optimizer)                                          # unscales what was already clipped
            scaler.update()
        else:
            with torch.autocast("cpu", dtype=dtype):
                loss = _loss(model, x, y)
            loss.backward()
            out["true_norm"] = float(gradclip.get_total_norm([p.grad for p in model.parameters()]))
            norm = gradclip.clip_grad_norm_(model.parameters(), max_norm)
            optimizer.step()
        out[place] = {"returned": float(norm), "step": _step_length(before, model)}
    model, x, y = _tiny()
    scaler = torch.amp.GradScaler("cpu")
    with torch.autocast("cpu", dtype=dtype):
        loss = _loss(model, x, y)
    scaler.scale(loss).backward()
    try:
        gradclip.AutoClip(scaler=scaler)(model.parameters(), torch.optim.SGD(model.parameters(), lr=lr))
        out["guard"] = None
    except RuntimeError as error:
        out["guard"] = str(error)
    return out


def bf16_case(max_norm: float = 0.1, lr: float = 0.5) -> dict:
    """bfloat16 autocast on the CPU without a ``GradScaler``: clip right after ``backward()``.

    bfloat16 has float32's exponent range, so small gradients do not underflow
    and there is no loss scale to undo. Runs one step from the same weights
    three ways: the pattern (autocast, ``backward``, clip, ``step``); the same
    with a ``GradScaler`` and ``unscale_`` (what float16 needs); and the
    reference, the autocast forward's gradient from ``torch.autograd.grad``,
    its norm in float64 by hand, clipped by hand.

    Returns:
        ``{"returned": the norm the call returned, "reference_norm", "float32_norm" (no autocast),
        "grad_dtypes", "step", "with_scaler_diff" / "reference_diff": largest parameter difference to those runs,
        "tiny": {dtype: smallest normal number}, "lr", "max_norm"}``.

    Example:
        >>> r = bf16_case()
        >>> r["grad_dtypes"], r["reference_diff"] < 1e-6
        (['torch.float32'], True)
    """
    out: dict[str, Any] = {"lr": lr, "max_norm": max_norm,
                           "tiny": {str(d).replace("torch.", ""): float(torch.finfo(d).tiny)
                                    for d in (torch.float16, torch.bfloat16, torch.float32)}}
    model, x, y = _tiny()
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    before = _snapshot(model)
    # pattern
    optimizer.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()                                                # no GradScaler: nothing to unscale
    norm = gradclip.clip_grad_norm_(model.parameters(), max_norm)  # right after backward
    optimizer.step()
    # end pattern
    out["returned"], out["step"] = float(norm), _step_length(before, model)
    out["grad_dtypes"] = sorted({str(p.grad.dtype) for p in model.parameters()})
    plain = list(model.parameters())

    scaled, x, y = _tiny()
    optimizer = torch.optim.SGD(scaled.parameters(), lr=lr)
    scaler = torch.amp.GradScaler("cpu")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = _loss(scaled, x, y)
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)
    gradclip.clip_grad_norm_(scaled.parameters(), max_norm)
    scaler.step(optimizer)
    out["with_scaler_diff"] = _max_diff(plain, list(scaled.parameters()))

    reference, x, y = _tiny()
    params = list(reference.parameters())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = _loss(reference, x, y)
    grads = torch.autograd.grad(loss, params)
    total = float(torch.cat([g.double().reshape(-1) for g in grads]).norm())
    factor = min(1.0, max_norm / (total + 1e-6))
    with torch.no_grad():
        for p, g in zip(params, grads):
            p -= lr * factor * g
    out["reference_norm"], out["reference_diff"] = total, _max_diff(plain, params)

    full, x, y = _tiny()
    out["float32_norm"] = float(torch.cat([g.double().reshape(-1) for g in torch.autograd.grad(
        _loss(full, x, y), list(full.parameters()))]).norm())
    return out


def fused_case(steps: int = 3, max_norm: float = 0.1, lr: float = 1e-2) -> dict:
    """``Adam(fused=True)`` under ``GradScaler``: clipping after ``unscale_``, or a clipper attached.

    Four runs of ``steps`` steps from the same weights with float16 autocast:
    fused and for-each Adam, each (a) with ``scaler.unscale_`` then
    :func:`gradclip.clip_grad_norm_`, and (b) with an :class:`gradclip.AutoClip`
    attached to the optimizer and no ``unscale_`` (``scaler.step`` of a fused
    optimizer leaves the gradients scaled; the attached clipper divides its
    norm by the scale).

    Returns:
        ``{"explicit": max |fused - foreach| over the parameters, "attached": the same,
        "attached_norms": {"fused": [...], "foreach": [...]} (the norms the clipper recorded),
        "scale": the loss scale}``.

    Example:
        >>> r = fused_case(steps=2)
        >>> r["explicit"] < 1e-5 and r["attached"] < 1e-5
        True
    """
    results: dict[tuple[str, bool], Any] = {}
    for how in ("explicit", "attached"):
        for fused in (True, False):
            model, x, y = _tiny()
            optimizer = torch.optim.Adam(model.parameters(), lr=lr, fused=fused, foreach=None if fused else True)
            scaler = torch.amp.GradScaler("cpu")
            clipper = None
            if how == "attached":
                # pattern
                clipper = gradclip.AutoClip(percentile=50.0).attach(optimizer)   # Adam(..., fused=True)
                # end pattern
            norms = []
            for _ in range(steps):
                optimizer.zero_grad(set_to_none=True)
                with torch.autocast("cpu", dtype=torch.float16):
                    loss = _loss(model, x, y)
                if how == "explicit":
                    # pattern
                    scaler.scale(loss).backward()
                    scaler.unscale_(optimizer)                      # a fused Adam accepts unscaled gradients too
                    gradclip.clip_grad_norm_(model.parameters(), max_norm)
                    scaler.step(optimizer)
                    scaler.update()
                    # end pattern
                else:
                    # pattern
                    scaler.scale(loss).backward()
                    scaler.step(optimizer)   # fused: no unscale_; the attached clipper divides by the scale
                    scaler.update()
                    # end pattern
                    norms.append(float(clipper.last_result.norm))
            results[how, fused] = (_snapshot(model), norms, float(scaler.get_scale()))
    return {"explicit": _max_diff(results["explicit", True][0], results["explicit", False][0]),
            "attached": _max_diff(results["attached", True][0], results["attached", False][0]),
            "attached_norms": {"fused": results["attached", True][1], "foreach": results["attached", False][1]},
            "scale": results["attached", True][2]}


def accumulation_case(micro: int = 4, max_norm: float = 0.1) -> dict:
    """Gradient accumulation over ``micro`` micro-batches: clip once after the last, or (wrongly) after each.

    Compared with the full batch's gradient (one backward over all images, clipped).

    Returns:
        ``{"once": max |once - full| over the clipped gradients, "per_micro": the same for clipping after
        every micro-batch, "per_micro_angle": degrees between that gradient and the full one,
        "norms": {"full", "once", "per_micro"} (the clipped gradients' norms), "pre_norm": the full norm}``.

    Example:
        >>> r = accumulation_case()
        >>> r["once"] < 1e-6 < r["per_micro"]
        True
    """
    from .families import angle_degrees

    model, x, y = _tiny()
    params = list(model.parameters())
    pre = 0.0

    model.zero_grad(set_to_none=True)
    _loss(model, x, y).backward()
    pre = float(gradclip.clip_grad_norm_(params, max_norm))
    full = _grads(params)

    chunks = list(zip(x.chunk(micro), y.chunk(micro)))
    model.zero_grad(set_to_none=True)
    # pattern
    for inputs, targets in chunks:                        # micro-batches of equal size
        loss = nn.functional.cross_entropy(model(inputs), targets) / len(chunks)
        loss.backward()                                   # gradients add up in .grad
    gradclip.clip_grad_norm_(model.parameters(), max_norm)  # once, on the sum
    # end pattern
    once = _grads(params)

    model.zero_grad(set_to_none=True)
    for inputs, targets in chunks:
        (_loss(model, inputs, targets) / len(chunks)).backward()
        gradclip.clip_grad_norm_(params, max_norm)         # wrong: clips each partial sum
    per_micro = _grads(params)
    norm = lambda g: float(_flat(g).norm())  # noqa: E731
    return {"once": _max_diff(once, full), "per_micro": _max_diff(per_micro, full),
            "per_micro_angle": angle_degrees(_flat(per_micro), _flat(full)),
            "norms": {"full": norm(full), "once": norm(once), "per_micro": norm(per_micro)}, "pre_norm": pre}


DIST_STEPS, DIST_MICRO, DIST_BATCH = 3, 2, 64  # steps, micro-batches per rank and step, images per step (all ranks)


def _dist_batches(steps: int = DIST_STEPS, batch: int = DIST_BATCH) -> list[tuple[torch.Tensor, torch.Tensor]]:
    x, y = _train_batch(steps * batch)
    return list(zip(x.split(batch), y.split(batch)))


def ddp_accumulation_loop(model: nn.Module, rank: int, world: int, micro: int, max_norm: float, lr: float,
                          batches: list[tuple[torch.Tensor, torch.Tensor]]) -> list[float]:
    """DDP with gradient accumulation: ``no_sync`` on all micro-batches but the last, one clip per step.

    Run on each rank of an initialised process group by :func:`distributed_accumulation_case`; trains
    ``model`` in place and returns the norm each step's clipping call returned.
    """
    import contextlib

    from torch.nn.parallel import DistributedDataParallel

    ddp = DistributedDataParallel(model)
    optimizer = torch.optim.SGD(ddp.parameters(), lr=lr)
    norms = []
    for x, y in batches:
        micro_batches = list(zip(x.chunk(world)[rank].chunk(micro), y.chunk(world)[rank].chunk(micro)))
        # pattern
        optimizer.zero_grad()
        for k, (xs, ys) in enumerate(micro_batches):
            last = k == len(micro_batches) - 1
            with contextlib.nullcontext() if last else ddp.no_sync():  # all-reduce only on the last
                loss = nn.functional.cross_entropy(ddp(xs), ys) / len(micro_batches)
                loss.backward()
        norm = gradclip.clip_grad_norm_(ddp.parameters(), max_norm)  # once, on the averaged gradient
        optimizer.step()
        # end pattern
        norms.append(float(norm))
    del ddp, optimizer
    return norms


def fsdp_accumulation_loop(model: nn.Module, rank: int, world: int, micro: int, max_norm: float, lr: float,
                           batches: list[tuple[torch.Tensor, torch.Tensor]]) -> list[float]:
    """FSDP2 with gradient accumulation: gradient sync (reduce-scatter) only on the last micro-batch.

    Run on each rank of an initialised process group by :func:`distributed_accumulation_case`; shards
    ``model`` (:func:`gradclip_book.dist_demo.shard`), trains it and returns the norm each step's call returned.
    """
    from .dist_demo import shard

    model = shard(model, world)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    norms = []
    for x, y in batches:
        micro_batches = list(zip(x.chunk(world)[rank].chunk(micro), y.chunk(world)[rank].chunk(micro)))
        # pattern
        optimizer.zero_grad()
        for k, (xs, ys) in enumerate(micro_batches):
            model.set_requires_gradient_sync(k == len(micro_batches) - 1)  # reduce-scatter on the last only
            loss = nn.functional.cross_entropy(model(xs), ys) / len(micro_batches)
            loss.backward()
        norm = gradclip.clip_grad_norm_(model.parameters(), max_norm)  # DTensor shards: one global norm
        optimizer.step()
        # end pattern
        norms.append(float(norm))
    return norms


def _tiny_model(state: dict[str, torch.Tensor]) -> nn.Module:
    model = cls.build_model(cls.RunConfig(depth=2, width=32))   # _tiny's architecture, without loading the data
    model.load_state_dict(state)
    return model


def _dist_rank(rank: int, world: int, micro: int, max_norm: float, lr: float, state: dict[str, torch.Tensor],
               batches: list[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, Any]:
    """One rank of :func:`distributed_accumulation_case`: the DDP run, then the FSDP2 run, from the same weights."""
    out: dict[str, Any] = {}
    model = _tiny_model(state)
    out["ddp"] = {"norms": ddp_accumulation_loop(model, rank, world, micro, max_norm, lr, batches),
                  "params": [p.detach().clone() for p in model.parameters()]}
    model = _tiny_model(state)
    norms = fsdp_accumulation_loop(model, rank, world, micro, max_norm, lr, batches)
    out["fsdp"] = {"norms": norms, "params": [p.detach().full_tensor().clone() for p in model.parameters()]}
    return out


def distributed_accumulation_case(micro: int = DIST_MICRO, max_norm: float = 0.1, lr: float = 0.5,
                                  world: int = 2) -> dict:
    """Gradient accumulation under DDP (``no_sync``) and FSDP2 (``set_requires_gradient_sync``), clipped once per step.

    Runs :data:`DIST_STEPS` steps of :data:`DIST_BATCH` images on ``world``
    gloo processes on the CPU (file rendezvous, no network;
    :func:`gradclip_book.bugzoo.run_fsdp_ranks`), each rank taking its share
    of every batch in ``micro`` micro-batches. The reference is one eager
    process on the whole batch: ``backward``, the norm in float64 by hand,
    SGD on the clipped gradient.

    Returns:
        ``{"ddp" | "fsdp": {"norms": per rank, per step, "max_diff": largest parameter difference to the
        reference over ranks, "norm_rel": largest relative norm difference}, "reference_norms", "steps",
        "micro", "world", "max_norm"}``.

    Example (starts two processes, so the doctest skips it):
        >>> r = distributed_accumulation_case()  # doctest: +SKIP
        >>> r["ddp"]["max_diff"] < 1e-6  # doctest: +SKIP
        True
    """
    from .bugzoo import run_fsdp_ranks

    model, _, _ = _tiny()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    ranks = run_fsdp_ranks(_dist_rank, (micro, max_norm, lr, state, _dist_batches()), world=world, timeout_s=120.0)
    reference_norms = []
    for x, y in _dist_batches():
        grads = torch.autograd.grad(_loss(model, x, y), list(model.parameters()))
        total = float(_flat(list(grads)).norm())
        factor = min(1.0, max_norm / (total + 1e-6))
        with torch.no_grad():
            for p, g in zip(model.parameters(), grads):
                p -= lr * factor * g
        reference_norms.append(total)
    reference = _snapshot(model)
    out: dict[str, Any] = {"reference_norms": reference_norms, "steps": len(reference_norms), "micro": micro,
                           "world": world, "max_norm": max_norm}
    for kind in ("ddp", "fsdp"):
        out[kind] = {"norms": [r[kind]["norms"] for r in ranks],
                     "max_diff": max(_max_diff(r[kind]["params"], reference) for r in ranks),
                     "norm_rel": max(abs(n / m - 1) for r in ranks for n, m in zip(r[kind]["norms"], reference_norms))}
    return out


def joint_optimizers_case(max_norm: float = 0.1, lrs: tuple[float, float] = (0.5, 0.1)) -> dict:
    """Two optimizers (the body's and the head's, at different learning rates) clipped by one norm over both.

    Runs one step from the same weights: the pattern (one ``clip_grad_norm_``
    over both optimizers' parameters), each optimizer clipped on its own (the
    bug zoo's per-group mistake), and the reference by hand in float64 (one
    factor ``min(1, c / (||g|| + 1e-6))`` for every parameter, then each
    parameter's own learning rate).

    Returns:
        ``{"norm": the returned norm, "reference_norm", "max_diff": largest parameter difference to the reference,
        "used_norm" / "used_norm_separate": norm of the gradient each update used, "max_norm", "lrs"}``.

    Example:
        >>> r = joint_optimizers_case()
        >>> r["max_diff"] < 1e-6 and abs(r["used_norm"] / r["max_norm"] - 1) < 1e-4
        True
    """
    out: dict[str, Any] = {"max_norm": max_norm, "lrs": lrs}
    for way in ("joint", "separate"):
        model, x, y = _tiny()
        body, head = list(model[:-1].parameters()), list(model[-1].parameters())
        body_optimizer = torch.optim.SGD(body, lr=lrs[0])
        head_optimizer = torch.optim.SGD(head, lr=lrs[1])
        before = _snapshot(model)
        if way == "joint":
            # pattern
            optimizers = (body_optimizer, head_optimizer)
            for opt in optimizers:
                opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            params = [p for opt in optimizers for group in opt.param_groups for p in group["params"]]
            norm = gradclip.clip_grad_norm_(params, max_norm)  # one norm over all of them
            for opt in optimizers:
                opt.step()
            # end pattern
            out["norm"], joint = float(norm), list(model.parameters())
        else:
            _loss(model, x, y).backward()
            for opt in (body_optimizer, head_optimizer):
                gradclip.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], max_norm)
                opt.step()
        rates = [lrs[0]] * len(body) + [lrs[1]] * len(head)
        used = [(b - p.detach()) / lr for b, p, lr in zip(before, model.parameters(), rates)]
        out["used_norm" if way == "joint" else "used_norm_separate"] = float(_flat(used).norm())
    model, x, y = _tiny()
    params = list(model.parameters())
    grads = torch.autograd.grad(_loss(model, x, y), params)
    total = float(_flat(list(grads)).norm())
    factor = min(1.0, max_norm / (total + 1e-6))
    rates = [lrs[0]] * (len(params) - 2) + [lrs[1]] * 2
    with torch.no_grad():
        for p, g, lr in zip(params, grads, rates):
            p -= lr * factor * g
    out["reference_norm"], out["max_diff"] = total, _max_diff(joint, params)
    return out


def nonfinite_case(steps: int = 6, bad_step: int = 3, max_norm: float = 0.1, lr: float = 0.5) -> dict:
    """A batch whose gradient is not finite: ``error_if_nonfinite=True`` raises, a finite-norm check skips the step.

    Every step trains on the next 32 of 192 digits; at ``bad_step`` one pixel
    of the batch is ``inf``, so the loss and the gradient are NaN. Four runs:
    the pattern (skip the step when the returned norm is not finite); no check
    (the NaN reaches the weights); ``error_if_nonfinite=True`` (raises before
    the step); no check but a :class:`gradclip.SpikeGuard` attached (skips on
    the device); and the reference, the same loop with the bad batch left out.

    Returns:
        ``{"norms": the pattern's returned norms, "skipped": steps it skipped, "skip_vs_reference" /
        "guard_vs_reference": largest parameter difference, "unchecked_finite": whether the unchecked run's weights stayed finite,
        "error": the message raised, "error_step", "params_unchanged_by_error", "steps", "bad_step"}``.

    Example:
        >>> r = nonfinite_case()
        >>> r["skipped"], r["skip_vs_reference"], r["unchecked_finite"]
        ([3], 0.0, False)
    """
    x_all, y_all = _train_batch(32 * steps)
    batches = [[x.clone(), y] for x, y in zip(x_all.split(32), y_all.split(32))]
    batches[bad_step][0][0, 0] = math.inf
    out: dict[str, Any] = {"steps": steps, "bad_step": bad_step}
    for way in ("skip", "unchecked", "error", "guard", "reference"):
        model, _, _ = _tiny()
        optimizer = torch.optim.SGD(model.parameters(), lr=lr)
        guard = gradclip.SpikeGuard().attach(optimizer) if way == "guard" else None
        norms, skipped = [], []
        for step, (x, y) in enumerate(batches):
            if way == "reference" and step == bad_step:
                continue
            if way == "skip":
                # pattern
                optimizer.zero_grad()
                nn.functional.cross_entropy(model(x), y).backward()
                norm = gradclip.clip_grad_norm_(model.parameters(), max_norm)
                if torch.isfinite(norm):  # reads the norm on the host: one sync per step
                    optimizer.step()
                else:
                    skipped.append(step)  # inf or NaN: leave the weights as they are
                # end pattern
                norms.append(float(norm))
            elif way == "error":
                optimizer.zero_grad()
                _loss(model, x, y).backward()
                before = _snapshot(model)
                try:
                    # pattern
                    gradclip.clip_grad_norm_(model.parameters(), max_norm, error_if_nonfinite=True)
                    # end pattern
                except RuntimeError as error:
                    out["error"], out["error_step"] = str(error), step
                    out["params_unchanged_by_error"] = _max_diff(before, _snapshot(model)) == 0.0
                    break
                optimizer.step()
            else:
                optimizer.zero_grad()
                _loss(model, x, y).backward()
                gradclip.clip_grad_norm_(model.parameters(), max_norm)
                optimizer.step()
        if way == "skip":
            out["norms"], out["skipped"], skip_params = norms, skipped, _snapshot(model)
        elif way == "unchecked":
            out["unchecked_finite"] = bool(torch.isfinite(_flat(list(model.parameters()))).all())
        elif way == "guard":
            guard.detach()
            guard_params = _snapshot(model)
        elif way == "reference":
            out["skip_vs_reference"] = _max_diff(skip_params, _snapshot(model))
            out["guard_vs_reference"] = _max_diff(guard_params, _snapshot(model))
    return out


def zero_grad_case(max_norm: float = 0.1) -> dict:
    """``zero_grad(set_to_none=True)`` leaves ``.grad`` as ``None``: what a clip before ``backward()`` does.

    Returns:
        ``{"none_grads": parameters whose .grad is None after zero_grad, "function_returns": the norm
        clip_grad_norm_ returns then, "clipper_error": the message a stateful clipper raises then,
        "frozen_skipped": whether a frozen parameter (no gradient) is left alone after backward,
        "after_backward": the norm returned in the right place}``.

    Example:
        >>> r = zero_grad_case()
        >>> r["function_returns"], r["frozen_skipped"]
        (0.0, True)
    """
    model, x, y = _tiny()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    _loss(model, x, y).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    none_grads = sum(p.grad is None for p in model.parameters())
    returned = float(gradclip.clip_grad_norm_(model.parameters(), max_norm))
    try:
        gradclip.AutoClip()(model.parameters())
        error = None
    except RuntimeError as e:
        error = str(e)
    frozen = model[0].weight          # the first layer's weight stays frozen: no gradient is computed for it
    frozen.requires_grad_(False)
    # pattern
    optimizer.zero_grad(set_to_none=True)        # .grad = None: nothing to clip yet
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()                              # .grad exists now (not for frozen parameters)
    norm = gradclip.clip_grad_norm_(model.parameters(), max_norm)   # skips .grad None
    optimizer.step()
    # end pattern
    return {"none_grads": none_grads, "parameters": len(list(model.parameters())), "function_returns": returned,
            "clipper_error": error, "frozen_skipped": frozen.grad is None, "after_backward": float(norm)}


def closure_case(steps: int = 2, max_norm: float = 0.1, lr: float = 0.5) -> dict:
    """LBFGS, which calls a closure several times per step: where clipping has an effect.

    Runs ``steps`` LBFGS steps (``max_iter=4``) from the same weights: no
    clipping; :func:`gradclip.clip_grad_norm_` before ``step(closure)`` (the
    closure recomputes the gradients, so it is lost); the same call inside the
    closure; a :class:`gradclip.ZClip` (in its warm-up, where it clips at its
    fixed cap ``max_grad_norm``, the same rule) called by hand inside the
    closure; and the same ZClip attached to the optimizer with a plain closure.

    Returns:
        ``{"outside_vs_none", "inside_vs_none", "attached_vs_hand", "attached_vs_inside": max parameter differences,
        "evaluations": closure evaluations the attached clipper saw, "clipped_evaluations": how many of
        the hand-called clipper's evaluations it clipped, "losses": {run: final loss}}``.

    Example:
        >>> r = closure_case(steps=1)
        >>> r["outside_vs_none"] == 0.0 == r["attached_vs_hand"] and r["inside_vs_none"] > 0
        True
    """
    finals, losses, evaluations, clipped = {}, {}, 0, []
    for run in ("none", "outside", "inside", "hand", "attached"):
        model, x, y = _tiny()
        optimizer = torch.optim.LBFGS(model.parameters(), lr=lr, max_iter=4)
        # in its warm-up (25 calls by default) ZClip clips at its fixed cap: here the same rule as clip_grad_norm_
        clipper = gradclip.ZClip(max_grad_norm=max_norm) if run in ("hand", "attached") else None
        if run == "attached":
            clipper.attach(optimizer)
        for _ in range(steps):
            if run == "inside":
                # pattern
                def closure():
                    optimizer.zero_grad()
                    loss = nn.functional.cross_entropy(model(x), y)
                    loss.backward()
                    gradclip.clip_grad_norm_(model.parameters(), max_norm)  # inside: every evaluation
                    return loss
                optimizer.step(closure)
                # end pattern
            else:
                def closure():
                    optimizer.zero_grad()
                    loss = _loss(model, x, y)
                    loss.backward()
                    if run == "hand":
                        clipped.append(bool(clipper(model.parameters()).clipped))
                    return loss
                if run == "outside":
                    gradclip.clip_grad_norm_(model.parameters(), max_norm)   # before the step: recomputed inside
                optimizer.step(closure)
        finals[run] = _snapshot(model)
        with torch.no_grad():
            losses[run] = float(_loss(model, x, y))
        if run == "attached":
            evaluations = clipper.steps
    return {"outside_vs_none": _max_diff(finals["outside"], finals["none"]),
            "inside_vs_none": _max_diff(finals["inside"], finals["none"]),
            "attached_vs_hand": _max_diff(finals["attached"], finals["hand"]),
            "attached_vs_inside": _max_diff(finals["attached"], finals["inside"]),
            "evaluations": evaluations, "clipped_evaluations": sum(clipped), "steps": steps, "losses": losses}


def attach_case(steps: int = 8, resume_at: int = 4, lr: float = 0.5, micro: int = 4) -> dict:
    """A stateful clipper attached with ``clipper.attach(optimizer)`` against the same clipper called by hand.

    The clipper is :class:`gradclip.AutoClip` at its paper's 10th percentile; step k
    trains on the k-th of ``micro`` slices of the batch (in turn), so the norms
    vary and the clipper fires on some steps only. Also: attaching *and*
    calling by hand raises (the clipper would see the same gradients twice),
    and a clipper restored from ``state_dict()`` after ``resume_at`` steps
    continues exactly as one that never stopped.

    Returns:
        ``{"attached_vs_hand": max parameter difference, "thresholds": {"hand": [...], "attached": [...]},
        "clipped": {"hand": [...], "attached": [...]} (per step), "twice_error": the message,
        "resumed_vs_straight": max parameter difference}``.

    Example:
        >>> r = attach_case(steps=4, resume_at=2)
        >>> r["attached_vs_hand"] == 0.0 == r["resumed_vs_straight"]
        True
    """
    def run(how: str) -> tuple[list[torch.Tensor], list[float], list[bool]]:
        model, xs, ys = _tiny()
        batches = list(zip(xs.chunk(micro), ys.chunk(micro)))
        optimizer = torch.optim.SGD(model.parameters(), lr=lr)
        clipper = gradclip.AutoClip(percentile=10.0)
        if how in ("attached", "resumed"):
            # pattern
            clipper.attach(optimizer)         # clipper = gradclip.AutoClip(percentile=10.0)
            # end pattern
        thresholds, clipped = [], []
        for step in range(steps):
            x, y = batches[step % micro]
            if how == "resumed" and step == resume_at:   # a new clipper from the saved state, as after a restart
                saved = clipper.state_dict()
                clipper.detach()
                clipper = gradclip.AutoClip(percentile=10.0)
                clipper.load_state_dict(saved)
                clipper.attach(optimizer)
            if how == "hand":
                optimizer.zero_grad(set_to_none=True)
                _loss(model, x, y).backward()
                clipper(model.parameters())
                optimizer.step()
            else:
                # pattern
                optimizer.zero_grad(set_to_none=True)
                loss = nn.functional.cross_entropy(model(x), y)
                loss.backward()
                optimizer.step()              # the attached clipper runs first, on these gradients
                # end pattern
            thresholds.append(float(clipper.last_result.threshold))
            clipped.append(bool(clipper.last_result.clipped))
        return _snapshot(model), thresholds, clipped

    hand, attached, resumed = run("hand"), run("attached"), run("resumed")
    model, x, y = _tiny()
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    clipper = gradclip.AutoClip().attach(optimizer)
    _loss(model, x, y).backward()
    clipper(model.parameters())
    try:
        optimizer.step()
        twice = None
    except RuntimeError as error:
        twice = str(error)
    return {"attached_vs_hand": _max_diff(attached[0], hand[0]),
            "thresholds": {"hand": hand[1], "attached": attached[1]},
            "clipped": {"hand": hand[2], "attached": attached[2]},
            "twice_error": twice, "resumed_vs_straight": _max_diff(resumed[0], attached[0])}


def compile_case(steps: int = 20, max_norm: float = 0.1, lr: float = 0.5, backend: str = "inductor") -> dict:
    """The clipping call compiled with ``torch.compile(fullgraph=True)`` against the same steps in eager mode.

    ``zero_grad()`` gives new gradient tensors every step, as in a real loop;
    the compiled call must not compile again for them.

    Returns:
        ``{"max_diff": max |compiled - eager| over the parameters after ``steps`` SGD steps,
        "norms": {"eager": [...], "compiled": [...]}, "graphs": graphs dynamo compiled over the
        steps, "steps", "backend"}``.

    Example:
        >>> r = compile_case(steps=3, backend="aot_eager")
        >>> r["max_diff"] < 1e-6, r["graphs"]
        (True, 1)
    """
    from torch._dynamo.utils import counters

    finals, norms = {}, {}
    torch._dynamo.reset()
    counters.clear()
    for mode in ("eager", "compiled"):
        model, x, y = _tiny()
        optimizer = torch.optim.SGD(model.parameters(), lr=lr)
        params = list(model.parameters())
        if mode == "compiled":
            # pattern
            clip = torch.compile(lambda: gradclip.clip_grad_norm_(params, max_norm), fullgraph=True, backend=backend)
            # end pattern
        else:
            def clip():
                return gradclip.clip_grad_norm_(params, max_norm)
        seen = []
        for _ in range(steps):
            # pattern
            optimizer.zero_grad(set_to_none=True)
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            norm = clip()                     # compiled: one graph for every step, no break
            optimizer.step()
            # end pattern
            seen.append(float(norm))
        finals[mode], norms[mode] = _snapshot(model), seen
    graphs = int(counters["stats"]["unique_graphs"])
    torch._dynamo.reset()   # leave no compiled graph behind that holds these parameters
    return {"max_diff": _max_diff(finals["compiled"], finals["eager"]), "norms": norms, "graphs": graphs,
            "steps": steps, "backend": backend}


# --- 3.6 how gradclip is tested ----------------------------------------------------------------


_PEERS = ("timm", "Keras", "optax", "Opacus", "numpy")  # code a reference may transcribe; found in the docstrings
_WHOLE_PROJECT = {"test_browser.py", "test_book.py", "test_docs.py", "test_packaging.py", "test_publishing.py",
                  "test_layout.py"}


def _decorator_names(node: ast.AST) -> set[str]:
    names = set()
    for dec in getattr(node, "decorator_list", []):
        target = dec.func if isinstance(dec, ast.Call) else dec
        names.add(ast.unparse(target))
    return names


def count_tests(tests_dir: str | Any) -> dict:
    """Count the library's tests by the reference they check against, by reading their source (not running them).

    Looks at every ``tests/test_*.py`` except the whole-project ones (book build,
    browser, docs, packaging, publishing, layout). A test function is counted
    under every kind that applies:

    * ``property``: decorated with hypothesis's ``@given`` (random inputs, many examples per run);
    * ``torch``: its body calls ``torch.nn.utils`` (torch's own clipping as the reference);
    * ``reference``: its body calls a function of ``support.references`` (a slow float64
      transcription of a formula, or of a peer's code: timm, Keras, optax, ...);
    * ``sync``: it uses the host-sync detector (``forbid_sync`` / ``no_host_sync``);
    * ``raises``: it uses ``pytest.raises`` (bad input and misuse).

    Returns:
        ``{"files": n, "functions": n, "kinds": {kind: n}, "none_of_these": n, "peers": [names of the
        peers whose code support/references.py transcribes]}``.

    Example:
        >>> import tempfile
        >>> from pathlib import Path
        >>> tests = Path(tempfile.mkdtemp())
        >>> (tests / "support").mkdir()
        >>> _ = (tests / "support" / "references.py").write_text('def ref_norm(g):\\n    "As optax does."\\n')
        >>> _ = (tests / "test_a.py").write_text(
        ...     "import pytest\\n"
        ...     "def test_ref():\\n    ref_norm(1)\\n"
        ...     "def test_bad():\\n    with pytest.raises(ValueError):\\n        pass\\n")
        >>> counts = count_tests(tests)
        >>> counts["functions"], counts["kinds"]["reference"], counts["kinds"]["raises"], counts["peers"]
        (2, 1, 1, ['optax'])
    """
    from pathlib import Path

    tests_dir = Path(tests_dir)
    references = tests_dir / "support" / "references.py"
    ref_tree = ast.parse(references.read_text(encoding="utf-8"))
    ref_names = {f.name for f in ref_tree.body if isinstance(f, ast.FunctionDef)}
    docstrings = " ".join((ast.get_docstring(f) or "").lower() for f in ref_tree.body if isinstance(f, ast.FunctionDef))
    peers = [peer for peer in _PEERS if peer.lower() in docstrings]
    kinds = dict.fromkeys(["property", "torch", "reference", "sync", "raises"], 0)
    functions = files = none = 0
    for path in sorted(tests_dir.glob("test_*.py")):
        if path.name in _WHOLE_PROJECT:
            continue
        files += 1
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if not (isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name.startswith("test_")):
                continue
            functions += 1
            body = ast.unparse(node)
            called = {n.func.id for n in ast.walk(node) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)}
            found = {
                "property": any(d.split(".")[-1] == "given" for d in _decorator_names(node)),
                "torch": "torch.nn.utils" in body,
                "reference": bool(called & ref_names),
                "sync": "forbid_sync" in body or "no_host_sync" in body,
                "raises": "pytest.raises" in body,
            }
            for kind, hit in found.items():
                kinds[kind] += hit
            none += not any(found.values())
    return {"files": files, "functions": functions, "kinds": kinds, "none_of_these": none, "peers": peers,
            "reference_functions": len(ref_names)}


def collected_items(tests_dir: str | Any, timeout: float = 120.0) -> int:
    """How many test cases pytest collects (``--collect-only``) from the files :func:`count_tests` reads.

    Runs pytest in a subprocess from the folder above ``tests_dir``; nothing is executed but collection.
    Within one test session or book build the count is reused while the tests and the library are
    unchanged (:mod:`gradclip_book.session_cache`).

    Example:
        >>> import tempfile
        >>> from pathlib import Path
        >>> tests = Path(tempfile.mkdtemp()) / "tests"
        >>> tests.mkdir()
        >>> _ = (tests / "test_a.py").write_text(
        ...     "import pytest\\n"
        ...     "@pytest.mark.parametrize('x', [1, 2, 3])\\ndef test_x(x):\\n    pass\\n")
        >>> collected_items(tests)
        3
    """
    import subprocess
    import sys
    from pathlib import Path

    from gradclip_book import session_cache

    tests_dir = Path(tests_dir).resolve()
    files = [str(p) for p in sorted(tests_dir.glob("test_*.py")) if p.name not in _WHOLE_PROJECT]

    def collect() -> int:
        done = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                               *files], cwd=tests_dir.parent, capture_output=True, text=True, timeout=timeout)
        found = re.search(r"(\d+) tests? collected", done.stdout)
        if done.returncode != 0 or found is None:
            raise RuntimeError(f"pytest --collect-only failed ({done.returncode}): "
                               f"{done.stdout[-500:]} {done.stderr[-500:]}")
        return int(found.group(1))

    sources = sorted(tests_dir.rglob("*.py")) + session_cache.package_files("gradclip", "gradclip_book")
    return session_cache.cached_json("collected_items", {"files": files}, sources, collect)
