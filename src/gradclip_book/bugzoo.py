r"""The clipping bug zoo: real clipping bugs from public projects, each reproduced and measured.

Every entry of :data:`BUGS` is one bug that was reported in a public
repository (the citation says where), reproduced in a few lines on a tiny
seeded model: a 64-32-10 tanh MLP on 256 of scikit-learn's handwritten
digits, trained by plain SGD on the full batch, in float64 (or, for AGC, a
3x4 linear layer whose numbers can be read by eye). Each entry holds

* ``buggy`` and ``fixed``: one training step (or one clipping call) written
  the wrong way and the right way, short enough to print with
  :func:`inspect.getsource`;
* ``measure()``: runs both and returns the symptom as numbers, chiefly the
  norm of the gradient the update actually used (``applied_norm``: the size
  of the parameter change divided by the learning rate) against the
  threshold ``max_norm``;
* ``caught_by``: what gradclip does about it: a warning or an error when the
  buggy code runs under gradclip, a :class:`gradclip.GradientMonitor` that
  records the gradient each step used, or the API that makes the bug
  impossible; ``None`` with the reason where no library can tell.

Nothing here is specific to gradclip's own clipping: the buggy and fixed code
call ``torch.nn.utils.clip_grad_norm_``, as the reported code did, and
``clip=`` swaps in gradclip's drop-in where a check needs it.
"""

from __future__ import annotations

import datetime
import functools
import math
import os
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import gradclip

__all__ = ["BUGS", "Bug", "Catch", "Citation", "LR", "MAX_NORM", "MICRO_BATCHES", "RESPONSES", "agc_layer", "bug", "loss_fn",
           "response_cells", "response_counts", "symptom_text", "run_fsdp_ranks", "tiny_mlp"]

MAX_NORM = 0.1  # the threshold every step clips at; the full-batch gradient norm at the start is 0.37
LR = 0.5  # plain SGD, no momentum: the update is exactly -LR times the gradient the step used
MICRO_BATCHES = 4  # gradient accumulation: the 256 digits in 4 micro-batches of 64
SAMPLES = 256
RANKS = 2  # the FSDP reproduction: two gloo processes on the CPU


# --- the table's records ----------------------------------------------------------------------


@dataclass(frozen=True)
class Citation:
    """A public report of the bug: ``repo`` (owner/name), ``number`` and whether it is an issue or a pull request."""

    repo: str
    number: int
    kind: str = "issues"  # or "pull"

    @property
    def url(self) -> str:
        return f"https://github.com/{self.repo}/{self.kind}/{self.number}"

    def __str__(self) -> str:
        return f"{self.repo}#{self.number}"


RESPONSES: dict[str, str] = {
    "raises": "raises an error by default",
    "warns": "warns by default",
    "prevents": "its default API computes the right thing",
    "silent": "nothing by default",
    "raises_opt_in": "raises only when opted in (a stateful clipper, or one given scaler=)",
    "process_group": "right once given process_group= (shards held as plain tensors)",
    "logs": "an attached GradientMonitor records the norm the step used, above max_norm (the comparison is yours)",
    "attach": "an attached adaptive clipper (AutoClip, ZClip, SpikeGuard) runs in the right place, with its own "
              "threshold: gradclip has no fixed-max_norm clipper to attach",
}
"""What gradclip does about a bug, in words: the keys of :attr:`Catch.default` and :attr:`Catch.opt_in`."""


@dataclass(frozen=True)
class Catch:
    """How gradclip catches a bug.

    ``how`` says it in words. ``fires``, where gradclip can flag the bug,
    runs a step function (the bug's ``buggy`` or ``fixed``) on a fresh setup
    under the gradclip check and returns the check's message, or ``None``
    when nothing fired. Where gradclip prevents the bug instead (its API
    computes the right thing), ``fires`` is ``None`` and ``measure()``
    reports gradclip's own result next to the fixed code's.

    ``default`` is what gradclip does when the buggy code simply calls it
    (``"raises"``, ``"warns"``, ``"prevents"`` or ``"silent"``), and
    ``opt_in`` what it does once the user opts in (``"raises_opt_in"``,
    ``"process_group"``, ``"logs"``, ``"attach"``): keys of :data:`RESPONSES`.
    """

    how: str
    fires: Callable[[Callable[..., Any]], str | None] | None = None
    default: str = "silent"
    opt_in: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.default not in ("raises", "warns", "prevents", "silent"):
            raise ValueError(f"default must be 'raises', 'warns', 'prevents' or 'silent', got {self.default!r}")
        unknown = [k for k in self.opt_in if k not in ("raises_opt_in", "process_group", "logs", "attach")]
        if unknown:
            raise ValueError(f"opt_in takes 'raises_opt_in', 'process_group', 'logs' and 'attach', got {unknown}")


@dataclass(frozen=True)
class Bug:
    """One bug of the zoo (see the module docstring)."""

    name: str
    title: str
    citation: Citation
    description: str
    buggy: Callable[..., Any]
    fixed: Callable[..., Any]
    measure: Callable[[], dict[str, Any]]
    caught_by: Catch | None
    uncaught_reason: str | None = None
    also: tuple[Citation, ...] = ()


# --- the tiny model every step-level bug trains -----------------------------------------------


@functools.lru_cache(maxsize=1)
def _digits() -> tuple[torch.Tensor, torch.Tensor]:
    from .data import digits

    return digits(samples=SAMPLES, dtype=torch.float64)


def tiny_mlp(seed: int = 0) -> nn.Sequential:
    """The 64-32-10 tanh MLP the step-level bugs train, seeded, in float64."""
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10)).double()
    torch.random.set_rng_state(generator_state)  # leave the caller's random stream alone
    return model


def _setup(groups: bool = False) -> tuple[nn.Module, torch.optim.Optimizer, torch.Tensor, torch.Tensor]:
    """A fresh model, its SGD optimizer (one parameter group per layer with ``groups``) and the batch."""
    model = tiny_mlp()
    if groups:  # e.g. a group without weight decay: the usual reason for several groups
        param_groups = [{"params": model[0].parameters()}, {"params": model[2].parameters()}]
        optimizer = torch.optim.SGD(param_groups, lr=LR)
    else:
        optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    x, y = _digits()
    return model, optimizer, x, y


def _flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def _true_gradient() -> torch.Tensor:
    """The full-batch gradient at the starting weights, flattened, by autograd on a fresh copy."""
    model = tiny_mlp()
    x, y = _digits()
    grads = torch.autograd.grad(F.cross_entropy(model(x), y), list(model.parameters()))
    return torch.cat([g.reshape(-1) for g in grads])


def _run(step: Callable[..., Any], model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor,
         y: torch.Tensor, scaler: bool, clip: Callable[..., Any] | None) -> None:
    """One call of a bug's step function, with a fresh GradScaler if it takes one and ``clip`` if given."""
    extra: dict[str, Any] = {"scaler": _scaler()} if scaler else {}
    if clip is not None:
        extra["clip"] = clip
    step(model, optimizer, x, y, MAX_NORM, **extra)


def _step_numbers(step: Callable[..., Any], groups: bool = False, scaler: bool = False,
                  clip: Callable[..., Any] | None = None) -> dict[str, float]:
    """Run ``step`` once from the starting weights: the gradient the update used, by its norm and direction."""
    model, optimizer, x, y = _setup(groups)
    before = _flat(model)
    _run(step, model, optimizer, x, y, scaler, clip)
    used = (before - _flat(model)) / LR
    true = _true_gradient()
    return {"applied_norm": float(used.norm()), "cosine": float(F.cosine_similarity(used, true, dim=0)),
            "loss_after": _loss(model)}


def _loss(model: nn.Module) -> float:
    x, y = _digits()
    with torch.no_grad():
        return float(F.cross_entropy(model(x), y))


def _compare(buggy: Callable[..., Any], fixed: Callable[..., Any], groups: bool = False,
             scaler: bool = False) -> dict[str, Any]:
    """``measure()`` of a step-level bug: both versions from the same start, against the true gradient."""
    true_norm = float(_true_gradient().norm())
    return {"threshold": MAX_NORM, "true_norm": true_norm, "loss_before": _loss(tiny_mlp()),
            "buggy": _step_numbers(buggy, groups, scaler), "fixed": _step_numbers(fixed, groups, scaler)}


def _monitored_norm(step: Callable[..., Any], groups: bool = False) -> float:
    """The global norm of the gradient the step used, as an attached GradientMonitor recorded it."""
    model, optimizer, x, y = _setup(groups)
    monitor = gradclip.GradientMonitor(model, track_updates=False).attach(optimizer)
    _run(step, model, optimizer, x, y, False, None)
    monitor.detach()
    layer_norms = [row["grad_norm"] for row in monitor.table()]
    return math.sqrt(sum(n * n for n in layer_norms))


def _monitor_fires(groups: bool = False) -> Callable[[Callable[..., Any]], str | None]:
    def fires(step: Callable[..., Any]) -> str | None:
        used = _monitored_norm(step, groups)
        if used > MAX_NORM * (1 + 1e-4):  # torch's clip lands at max_norm * (1 - 1e-5) at most
            return f"GradientMonitor: the step used a gradient of norm {used:.4g} > max_norm {MAX_NORM}"
        return None

    return fires


def loss_fn(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The mean cross-entropy of ``model`` on the digits ``x`` with labels ``y`` (nats per example)."""
    return F.cross_entropy(model(x), y)


# --- 1. clipping after optimizer.step() --------------------------------------------------------


def after_step_buggy(model, optimizer, x, y, max_norm, clip=torch.nn.utils.clip_grad_norm_):
    optimizer.zero_grad()
    loss_fn(model, x, y).backward()
    optimizer.step()  # the update is made here, from the raw gradient
    clip(model.parameters(), max_norm)  # clips a gradient nobody uses any more


def after_step_fixed(model, optimizer, x, y, max_norm, clip=torch.nn.utils.clip_grad_norm_):
    optimizer.zero_grad()
    loss_fn(model, x, y).backward()
    clip(model.parameters(), max_norm)  # backward -> clip -> step
    optimizer.step()


# --- 2. clipping before backward() -------------------------------------------------------------


def before_backward_buggy(model, optimizer, x, y, max_norm, clip=torch.nn.utils.clip_grad_norm_):
    optimizer.zero_grad()  # the gradients are now None
    loss = loss_fn(model, x, y)
    clip(model.parameters(), max_norm)  # nothing to clip yet
    loss.backward()
    optimizer.step()


def before_backward_fixed(model, optimizer, x, y, max_norm, clip=torch.nn.utils.clip_grad_norm_):
    optimizer.zero_grad()
    loss = loss_fn(model, x, y)
    loss.backward()
    clip(model.parameters(), max_norm)
    optimizer.step()


def _clipper_fires(step: Callable[..., Any]) -> str | None:
    """Run ``step`` with a gradclip clipper (AutoClip) in place of the clipping call."""
    clipper = gradclip.AutoClip()
    try:
        _step_numbers(step, clip=lambda parameters, max_norm: clipper(parameters))
    except RuntimeError as error:
        return str(error)
    return None


# --- 3. clipping AMP-scaled gradients ----------------------------------------------------------


def _scaler() -> torch.amp.GradScaler:
    return torch.amp.GradScaler("cpu", init_scale=2.0**16)


def amp_scaled_buggy(model, optimizer, x, y, max_norm, scaler, clip=torch.nn.utils.clip_grad_norm_):
    optimizer.zero_grad()
    scaler.scale(loss_fn(model, x, y)).backward()  # gradients times 65536
    clip(model.parameters(), max_norm)  # clips the scaled gradients: threshold / 65536 in true units
    scaler.step(optimizer)  # unscales what is left, then steps
    scaler.update()


def amp_scaled_fixed(model, optimizer, x, y, max_norm, scaler, clip=torch.nn.utils.clip_grad_norm_):
    optimizer.zero_grad()
    scaler.scale(loss_fn(model, x, y)).backward()
    scaler.unscale_(optimizer)  # back to true units first
    clip(model.parameters(), max_norm)
    scaler.step(optimizer)  # knows the gradients are unscaled already
    scaler.update()


def _amp_fires(step: Callable[..., Any]) -> str | None:
    """Run ``step`` with ``gradclip.AutoClip(scaler=scaler)`` as the clipping call."""
    model, optimizer, x, y = _setup()
    scaler = _scaler()
    clipper = gradclip.AutoClip(scaler=scaler)
    try:
        step(model, optimizer, x, y, MAX_NORM, scaler, clip=lambda parameters, max_norm: clipper(parameters, optimizer))
    except RuntimeError as error:
        return str(error)
    return None


AMP_CURVE_STEPS = 30


def _amp_measure() -> dict[str, Any]:
    numbers = _compare(amp_scaled_buggy, amp_scaled_fixed, scaler=True)
    numbers["scale"] = _scaler().get_scale()
    for name, step in (("buggy", amp_scaled_buggy), ("fixed", amp_scaled_fixed)):
        numbers[name]["loss_curve"] = _amp_loss_curve(step)
    return numbers


def _amp_loss_curve(step: Callable[..., Any]) -> list[float]:
    """The full-batch loss after each of 30 steps, with one GradScaler for the whole run."""
    model, optimizer, x, y = _setup()
    scaler = _scaler()
    losses = []
    for _ in range(AMP_CURVE_STEPS):
        step(model, optimizer, x, y, MAX_NORM, scaler)
        losses.append(_loss(model))
    return losses


# --- 4. clipping every micro-batch of an accumulated step --------------------------------------


def micro_batch_buggy(model, optimizer, x, y, max_norm, clip=torch.nn.utils.clip_grad_norm_):
    optimizer.zero_grad()
    for xs, ys in zip(x.chunk(MICRO_BATCHES), y.chunk(MICRO_BATCHES)):
        (loss_fn(model, xs, ys) / MICRO_BATCHES).backward()
        clip(model.parameters(), max_norm)  # clips a running sum, once per micro-batch
    optimizer.step()


def micro_batch_fixed(model, optimizer, x, y, max_norm, clip=torch.nn.utils.clip_grad_norm_):
    optimizer.zero_grad()
    for xs, ys in zip(x.chunk(MICRO_BATCHES), y.chunk(MICRO_BATCHES)):
        (loss_fn(model, xs, ys) / MICRO_BATCHES).backward()
    clip(model.parameters(), max_norm)  # once, on the accumulated gradient
    optimizer.step()


def _micro_gradients() -> torch.Tensor:
    """Each micro-batch's share of the accumulated gradient (loss / MICRO_BATCHES), flattened: one row each."""
    model = tiny_mlp()
    x, y = _digits()
    rows = []
    for xs, ys in zip(x.chunk(MICRO_BATCHES), y.chunk(MICRO_BATCHES)):
        grads = torch.autograd.grad(loss_fn(model, xs, ys) / MICRO_BATCHES, list(model.parameters()))
        rows.append(torch.cat([g.reshape(-1) for g in grads]))
    return torch.stack(rows)


def _micro_weights(step: Callable[..., Any]) -> list[float]:
    """The weight each micro-batch's gradient got in the update: least squares of the used gradient on them.

    Unclipped accumulation gives every micro-batch weight 1; clipping the sum once
    gives all of them the same weight; clipping every micro-batch shrinks the early
    ones again at each later clip.
    """
    model, optimizer, x, y = _setup()
    before = _flat(model)
    step(model, optimizer, x, y, MAX_NORM)
    used = (before - _flat(model)) / LR
    solution = torch.linalg.lstsq(_micro_gradients().T, used.unsqueeze(1)).solution
    return [float(w) for w in solution.squeeze(1)]


def _attached_accumulation() -> dict[str, float]:
    """An attached gradclip clipper under accumulation: how often it ran and the norm it saw."""
    model, optimizer, x, y = _setup()
    clipper = gradclip.AutoClip().attach(optimizer)
    optimizer.zero_grad()
    for xs, ys in zip(x.chunk(MICRO_BATCHES), y.chunk(MICRO_BATCHES)):
        (loss_fn(model, xs, ys) / MICRO_BATCHES).backward()
    optimizer.step()  # the clipper runs here, once, in the step's pre-hook
    clipper.detach()
    return {"calls": clipper.steps, "norm_seen": float(clipper.last_result.norm)}


def _micro_measure() -> dict[str, Any]:
    numbers = _compare(micro_batch_buggy, micro_batch_fixed)
    for name, step in (("buggy", micro_batch_buggy), ("fixed", micro_batch_fixed)):
        numbers[name]["micro_batch_weights"] = _micro_weights(step)
    numbers["attached_clipper"] = _attached_accumulation()
    return numbers


# --- 5. a parameter generator consumed before clipping ------------------------------------------


def generator_buggy(model, optimizer, x, y, max_norm, clip=torch.nn.utils.clip_grad_norm_):
    params = model.parameters()  # a generator: it can be iterated once
    optimizer.zero_grad()
    loss_fn(model, x, y).backward()
    for p in params:  # a finiteness check that exhausts the generator
        assert torch.isfinite(p.grad).all()
    clip(params, max_norm)  # an empty generator: nothing is clipped
    optimizer.step()


def generator_fixed(model, optimizer, x, y, max_norm, clip=torch.nn.utils.clip_grad_norm_):
    params = list(model.parameters())  # a list can be iterated again
    optimizer.zero_grad()
    loss_fn(model, x, y).backward()
    for p in params:
        assert torch.isfinite(p.grad).all()
    clip(params, max_norm)
    optimizer.step()


def _generator_measure() -> dict[str, Any]:
    """The numbers, plus the warnings torch itself gave on the buggy and the fixed step."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's own warning is recorded below
        numbers = _compare(generator_buggy, generator_fixed)
    for name, step in (("buggy", generator_buggy), ("fixed", generator_fixed)):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            _step_numbers(step)
        numbers[name]["torch_warnings"] = [str(w.message) for w in caught]
    return numbers


def _warning_fires(step: Callable[..., Any]) -> str | None:
    """Run ``step`` with ``gradclip.clip_grad_norm_``; the message of the first UserWarning, if any."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _step_numbers(step, clip=gradclip.clip_grad_norm_)
    messages = [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
    return messages[0] if messages else None


# --- 6. clipping per parameter group, believed to be global ----------------------------------


def per_group_buggy(model, optimizer, x, y, max_norm, clip=torch.nn.utils.clip_grad_norm_):
    optimizer.zero_grad()
    loss_fn(model, x, y).backward()
    for group in optimizer.param_groups:  # each group gets max_norm: sqrt(groups) * max_norm in all
        clip(group["params"], max_norm)
    optimizer.step()


def per_group_fixed(model, optimizer, x, y, max_norm, clip=torch.nn.utils.clip_grad_norm_):
    optimizer.zero_grad()
    loss_fn(model, x, y).backward()
    every = [p for group in optimizer.param_groups for p in group["params"]]
    clip(every, max_norm)  # one norm over all groups
    optimizer.step()


# --- 7. backward inside step(closure), after the clipper ran -----------------------------------


def closure_buggy(model, optimizer, x, y, max_norm, clip=torch.nn.utils.clip_grad_norm_):
    def closure():
        optimizer.zero_grad()
        loss = loss_fn(model, x, y)
        loss.backward()  # the gradients the step uses are made here, inside step()
        return loss

    clip(model.parameters(), max_norm)  # before the closure: clips old gradients (or none) that it discards
    optimizer.step(closure)


def closure_fixed(model, optimizer, x, y, max_norm, clip=torch.nn.utils.clip_grad_norm_):
    def closure():
        optimizer.zero_grad()
        loss = loss_fn(model, x, y)
        loss.backward()
        clip(model.parameters(), max_norm)  # clip inside the closure, after its backward
        return loss

    optimizer.step(closure)


# --- 8. FSDP: the local shard's norm taken for the global one ----------------------------------


def fsdp_buggy(shard, max_norm):
    # each rank holds half of the flattened gradient (FSDP's shard) as a plain tensor
    return torch.nn.utils.clip_grad_norm_([shard], max_norm)  # this half's norm only


def fsdp_fixed(shard, max_norm):
    import torch.distributed as dist

    local = torch.linalg.vector_norm(shard.grad).square()
    dist.all_reduce(local)  # the sum of squares over every rank's shard
    total = local.sqrt()
    torch.nn.utils.clip_grads_with_norm_([shard], max_norm, total)
    return total


def _fsdp_rank(rank: int, world: int, flat_gradient: torch.Tensor, max_norm: float) -> dict[str, Any]:
    """One rank's view: its shard clipped the buggy way, the fixed way, and by gradclip on a DTensor."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mine = flat_gradient.tensor_split(world)[rank]
    results: dict[str, Any] = {}
    for name, clip in (("buggy", fsdp_buggy), ("fixed", fsdp_fixed)):
        shard = nn.Parameter(torch.zeros_like(mine))
        shard.grad = mine.clone()
        results[name] = {"norm": float(clip(shard, max_norm)), "clipped": shard.grad.clone()}
    mesh = init_device_mesh("cpu", (world,))  # what fully_shard gives: DTensor gradients, Shard(0)
    sharded = nn.Parameter(distribute_tensor(torch.zeros_like(flat_gradient), mesh, [Shard(0)]))
    sharded.grad = distribute_tensor(flat_gradient.clone(), mesh, [Shard(0)])
    norm = gradclip.clip_grad_norm_([sharded], max_norm)
    results["gradclip"] = {"norm": float(norm), "clipped": sharded.grad.to_local().clone()}
    return results


def _rank_entry(rank: int, world: int, outdir: str, job: Callable[..., Any], args: tuple) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    try:
        # a file store, not a TCP one: with no DNS at all (an offline build) the TCP store's client socket
        # warns that its hostname cannot be retrieved, and the book build treats that stderr as a failure
        store = os.path.join(outdir, "rendezvous")
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=30))
        result = job(rank, world, *args)
        dist.barrier()
        torch.save(result, os.path.join(outdir, f"rank{rank}.pt.tmp"))
        os.replace(os.path.join(outdir, f"rank{rank}.pt.tmp"), os.path.join(outdir, f"rank{rank}.pt"))
        dist.destroy_process_group()
    except BaseException:
        with open(os.path.join(outdir, f"rank{rank}.err"), "w") as log:
            log.write(traceback.format_exc())
        os._exit(1)  # skip an interpreter shutdown that could wait on gloo's threads


_FORKSERVER_PRELOAD = ["torch", "gradclip", "gradclip_book.bugzoo", "gradclip_book.implementation"]


def run_fsdp_ranks(job: Callable[..., Any], args: tuple, world: int = RANKS, timeout_s: float = 60.0) -> list[Any]:
    """Run ``job(rank, world, *args)`` on ``world`` new gloo processes on the CPU; their results by rank.

    ``job`` must be a module-level function (the processes import it). Where
    the platform has it, the processes are forked from multiprocessing's
    fork server, which imports torch, gradclip and the book's modules once
    for the whole session (in a process that has run nothing, so the fork
    is safe); the first call pays that import, later calls start in a
    fraction of a second. Elsewhere they are spawned.
    A rank that fails, or ranks still running after ``timeout_s`` seconds,
    stop all of them and raise ``RuntimeError`` with the ranks' tracebacks.
    """
    import multiprocessing

    if "forkserver" in multiprocessing.get_all_start_methods():
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(_FORKSERVER_PRELOAD)  # read when the server starts, on first use
    else:
        context = multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory() as outdir:
        procs = [context.Process(target=_rank_entry, args=(rank, world, outdir, job, args), daemon=True)
                 for rank in range(world)]
        for proc in procs:
            proc.start()
        deadline = time.monotonic() + timeout_s
        while any(proc.exitcode is None for proc in procs) and time.monotonic() < deadline:
            if any(proc.exitcode not in (None, 0) for proc in procs):
                break
            time.sleep(0.05)
        for proc in procs:
            if proc.is_alive():
                proc.terminate()
            proc.join(5)
        if any(proc.exitcode != 0 for proc in procs):
            logs = [os.path.join(outdir, f"rank{r}.err") for r in range(world)]
            errors = "\n".join(open(log).read() for log in logs if os.path.exists(log))
            raise RuntimeError(f"the {world} ranks did not all finish within {timeout_s:.0f} s\n{errors}")
        return [torch.load(os.path.join(outdir, f"rank{r}.pt"), weights_only=False) for r in range(world)]


def _fsdp_measure() -> dict[str, Any]:
    gradient = _true_gradient()
    ranks = run_fsdp_ranks(_fsdp_rank, (gradient, MAX_NORM))
    numbers: dict[str, Any] = {"threshold": MAX_NORM, "true_norm": float(gradient.norm()), "ranks": RANKS}
    for name in ("buggy", "fixed", "gradclip"):
        clipped = torch.cat([rank[name]["clipped"] for rank in ranks])
        numbers[name] = {"norm_per_rank": [rank[name]["norm"] for rank in ranks],
                         "applied_norm": float(clipped.norm()),
                         "cosine": float(F.cosine_similarity(clipped, gradient, dim=0))}
    return numbers


# --- 9. AGC with its units on the wrong axis --------------------------------------------------


AGC_FACTOR = 0.1  # lambda: a unit's gradient may be at most 0.1 of its weight's norm
AGC_EPS = 1e-3


def agc_layer() -> nn.Linear:
    """A 4-input, 3-output layer: output unit 0 has small weights and a large gradient, units 1-2 the reverse."""
    layer = nn.Linear(4, 3, bias=False).double()
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[0.1] * 4, [1.0] * 4, [1.0] * 4]))
    layer.weight.grad = torch.tensor([[0.5] * 4, [0.01] * 4, [0.01] * 4], dtype=torch.float64)
    return layer


def agc_buggy(layer, clip_factor):
    w, g = layer.weight.detach(), layer.weight.grad
    w_norm = w.norm(dim=0, keepdim=True).clamp(min=AGC_EPS)  # dim=0: one norm per input column
    g_norm = g.norm(dim=0, keepdim=True)
    limit = clip_factor * w_norm
    g.copy_(torch.where(g_norm > limit, g * limit / g_norm.clamp(min=1e-6), g))


def agc_fixed(layer, clip_factor):
    w, g = layer.weight.detach(), layer.weight.grad
    w_norm = w.norm(dim=1, keepdim=True).clamp(min=AGC_EPS)  # dim=1: one norm per output row (out, in)
    g_norm = g.norm(dim=1, keepdim=True)
    limit = clip_factor * w_norm
    g.copy_(torch.where(g_norm > limit, g * limit / g_norm.clamp(min=1e-6), g))


def _unit_ratios(layer: nn.Linear) -> list[float]:
    """||G_i|| / ||W_i|| of every output unit i (row), the quantity AGC bounds by lambda."""
    ratios = layer.weight.grad.norm(dim=1) / layer.weight.detach().norm(dim=1)
    return [float(r) for r in ratios]


def _agc_measure() -> dict[str, Any]:
    numbers: dict[str, Any] = {"threshold": AGC_FACTOR, "ratios_before": _unit_ratios(agc_layer())}
    for name, clip in (("buggy", agc_buggy), ("fixed", agc_fixed),
                       ("gradclip", lambda layer, factor: gradclip.adaptive_clip_grad_(layer, factor, AGC_EPS))):
        layer = agc_layer()
        before = layer.weight.grad.clone()
        clip(layer, AGC_FACTOR)
        kept = layer.weight.grad.norm(dim=1) / before.norm(dim=1)  # the factor each output unit got
        numbers[name] = {"unit_ratios": _unit_ratios(layer), "max_ratio": max(_unit_ratios(layer)),
                         "unit_factors": [float(k) for k in kept], "gradient": layer.weight.grad.clone()}
    return numbers


# --- 10. a threshold schedule that turns negative ----------------------------------------------


BASE_NORM = 0.1
SCHEDULE_STEPS = 100  # the threshold decays linearly to 0 over 100 steps...
LATE_STEP = 150  # ...and a run that goes on to step 150 reaches -0.05


def negative_buggy(model, optimizer, x, y, step, clip=torch.nn.utils.clip_grad_norm_):
    optimizer.zero_grad()
    loss_fn(model, x, y).backward()
    max_norm = BASE_NORM * (1 - step / SCHEDULE_STEPS)  # negative once step > SCHEDULE_STEPS
    clip(model.parameters(), max_norm)  # a negative factor: the gradient is flipped
    optimizer.step()  # and the step climbs the loss


def negative_fixed(model, optimizer, x, y, step, clip=torch.nn.utils.clip_grad_norm_):
    optimizer.zero_grad()
    loss_fn(model, x, y).backward()
    max_norm = BASE_NORM * max(1 - step / SCHEDULE_STEPS, 0.01)  # the schedule has a floor
    clip(model.parameters(), max_norm)
    optimizer.step()


def _negative_step(step: Callable[..., Any], clip: Callable[..., Any] = torch.nn.utils.clip_grad_norm_) -> dict[str, float]:
    model, optimizer, x, y = _setup()
    before = _flat(model)
    step(model, optimizer, x, y, LATE_STEP, clip=clip)
    used = (before - _flat(model)) / LR
    return {"applied_norm": float(used.norm()), "cosine": float(F.cosine_similarity(used, _true_gradient(), dim=0)),
            "loss_after": _loss(model)}


def _negative_measure() -> dict[str, Any]:
    return {"threshold": BASE_NORM * (1 - LATE_STEP / SCHEDULE_STEPS), "true_norm": float(_true_gradient().norm()),
            "loss_before": _loss(tiny_mlp()), "buggy": _negative_step(negative_buggy),
            "fixed": _negative_step(negative_fixed)}


def _negative_fires(step: Callable[..., Any]) -> str | None:
    try:
        _negative_step(step, clip=gradclip.clip_grad_norm_)
    except ValueError as error:
        return str(error)
    return None


# --- the table ----------------------------------------------------------------------------------


_MONITOR = ("gradclip.GradientMonitor(model).attach(optimizer) records the norm of the gradient each step "
            "actually used (inside the closure when there is one); it reads above max_norm, a comparison the "
            "user makes (the monitor does not know max_norm). ")
_ATTACH = ("An attached adaptive clipper (AutoClip, ZClip or SpikeGuard: clipper.attach(optimizer)) runs in the "
           "step's pre-hook, on all of the optimizer's parameters, once per step, inside the closure if there "
           "is one; it clips with its own threshold (gradclip has no fixed-max_norm clipper to attach).")

BUGS: list[Bug] = [
    Bug(
        name="after_step",
        title="Clipping after optimizer.step()",
        citation=Citation("jongwook/onsets-and-frames", 24),
        also=(Citation("VGraphRNN/VGRNN", 4), Citation("taesunwhang/UMS-ResSel", 3),
              Citation("awslabs/graphstorm", 1366)),
        description="clip_grad_norm_ is called after optimizer.step(), so the update used the raw gradient "
                    "and the clipped one is zeroed before anyone reads it: clipping silently does nothing.",
        buggy=after_step_buggy, fixed=after_step_fixed,
        measure=functools.partial(_compare, after_step_buggy, after_step_fixed),
        caught_by=Catch(_MONITOR + _ATTACH, _monitor_fires(), opt_in=("logs", "attach")),
    ),
    Bug(
        name="before_backward",
        title="Clipping before backward()",
        citation=Citation("yandex-research/tabm", 20),
        also=(Citation("Cranial-XIX/FAMO", 4), Citation("simchowitzlabpublic/nano-world-model", 22, "pull")),
        description="clip_grad_norm_ runs before loss.backward(): it sees no gradient (None after "
                    "zero_grad) or the previous step's, and the gradient backward() then makes is used unclipped.",
        buggy=before_backward_buggy, fixed=before_backward_fixed,
        measure=functools.partial(_compare, before_backward_buggy, before_backward_fixed),
        caught_by=Catch("A gradclip clipper (AutoClip, ZClip, SpikeGuard) called where no parameter has a "
                        "gradient raises RuntimeError saying to call backward() first (with zero_grad()'s "
                        "default set_to_none=True). " + _ATTACH, _clipper_fires,
                        opt_in=("raises_opt_in", "logs", "attach")),
    ),
    Bug(
        name="amp_scaled",
        title="Clipping AMP-scaled gradients",
        citation=Citation("victorchall/EveryDream2trainer", 175, "pull"),
        also=(Citation("pytorch/examples", 1196), Citation("milesial/Pytorch-UNet", 468),
              Citation("rwth-i6/returnn", 1595, "pull")),
        description="Under a GradScaler the gradients are multiplied by the loss scale (65536 here) until "
                    "unscale_(); clipping them before that clips at max_norm/65536 in true units, which "
                    "all but stops training (or, if the threshold was raised to compensate, follows the "
                    "scale as it changes).",
        buggy=amp_scaled_buggy, fixed=amp_scaled_fixed, measure=_amp_measure,
        caught_by=Catch("A gradclip clipper given scaler=scaler raises RuntimeError when called while the "
                        "gradients are still scaled, saying to call scaler.unscale_(optimizer) first; "
                        "attached, it runs after scaler.step() has unscaled them (and divides by the scale "
                        "itself for fused optimizers).", _amp_fires, opt_in=("raises_opt_in", "attach")),
    ),
    Bug(
        name="micro_batch",
        title="Clipping every micro-batch of gradient accumulation",
        citation=Citation("huggingface/transformers", 1563),
        also=(Citation("Deci-AI/super-gradients", 653, "pull"),),
        description="With gradient accumulation, clipping after every micro-batch's backward() clips a "
                    "running sum several times; the accumulated gradient the step uses can reach "
                    "micro-batches x max_norm, in a direction no longer that of the full-batch gradient.",
        buggy=micro_batch_buggy, fixed=micro_batch_fixed,
        measure=_micro_measure,
        caught_by=Catch("Prevented, not detected: an attached gradclip clipper (clipper.attach(optimizer)) "
                        "runs once per optimizer.step(), on the accumulated gradient, however many "
                        "backward() calls came before; measure() reports how often it ran and the norm it saw.",
                        opt_in=("attach",)),
        uncaught_reason="A clipping call cannot tell a running sum from a finished gradient: nothing in the "
                        "gradients says that more backward() calls will follow before the step, and the "
                        "last clip leaves the used norm at max_norm, so a monitor sees nothing wrong either.",
    ),
    Bug(
        name="generator",
        title="A parameter generator consumed before clipping",
        citation=Citation("pytorch/pytorch", 148259),
        also=(Citation("pytorch/pytorch", 151529, "pull"), Citation("PixArt-alpha/PixArt-alpha", 160, "pull"),
              Citation("pytorch/torchtitan", 1258, "pull")),
        description="model.parameters() is a generator; once a loop (or an optimizer, or a filter() "
                    "object) has consumed it, clip_grad_norm_ gets nothing, clips nothing and returns 0.",
        buggy=generator_buggy, fixed=generator_fixed,
        measure=_generator_measure,
        caught_by=Catch("Every gradclip function and clipper warns when its parameters are an iterator "
                        "that yields nothing (a generator, filter, map or iter() object), says it was "
                        "probably consumed and to pass list(model.parameters()). torch 2.13 warns only in "
                        "clip_grad_norm_, only for generators, and without the cause.", _warning_fires,
                        default="warns", opt_in=("logs", "attach")),
    ),
    Bug(
        name="per_group",
        title="Clipping per parameter group, believed to be global",
        citation=Citation("huggingface/transformers", 581),
        also=(Citation("huggingface/transformers", 614, "pull"), Citation("NVIDIA/DeepLearningExamples", 287)),
        description="BertAdam clipped each parameter group to max_norm inside its step; with G groups the "
                    "whole gradient may reach sqrt(G) x max_norm, and the groups are scaled by different "
                    "factors, which changes the direction.",
        buggy=per_group_buggy, fixed=per_group_fixed,
        measure=functools.partial(_compare, per_group_buggy, per_group_fixed, groups=True),
        caught_by=Catch(_MONITOR + _ATTACH, _monitor_fires(groups=True), opt_in=("logs", "attach")),
    ),
    Bug(
        name="closure",
        title="backward() inside step(closure), after the clipper ran",
        # #10167: Lightning's own fix, "backward will not have been run yet (hence no gradients)" in the hook
        # it advertised for inspecting gradients before the step
        citation=Citation("Lightning-AI/pytorch-lightning", 10167, "pull"),
        also=(Citation("Lightning-AI/pytorch-lightning", 10248, "pull"), Citation("Lightning-AI/pytorch-lightning", 6346)),
        description="When the optimizer is given a closure (LBFGS, SAM, Lightning's automatic "
                    "optimization), backward() runs inside optimizer.step(closure); a clip call placed "
                    "before step() sees no gradient (or a stale one) and the step uses the closure's "
                    "gradient unclipped. Lightning wraps the closure so that clipping runs after its backward.",
        buggy=closure_buggy, fixed=closure_fixed,
        measure=functools.partial(_compare, closure_buggy, closure_fixed),
        caught_by=Catch(_MONITOR + _ATTACH, _monitor_fires(), opt_in=("logs", "attach")),
    ),
    Bug(
        name="fsdp_local_norm",
        title="FSDP: a rank's local norm taken for the global one",
        citation=Citation("pytorch/pytorch", 170862),
        also=(Citation("pytorch/pytorch", 126457, "pull"), Citation("radixark/miles_diffusion", 35, "pull"),
              Citation("meta-pytorch/torchtune", 2169)),
        description="Reproduced with 2 gloo processes on the CPU, each holding half of the flattened "
                    "gradient as FSDP does: clipping each rank's shard by its own norm uses a norm "
                    "smaller than the global one, so the whole update can reach sqrt(ranks) x max_norm "
                    "and the two halves are scaled by different factors.",
        buggy=fsdp_buggy, fixed=fsdp_fixed, measure=_fsdp_measure,
        caught_by=Catch("Called on the shards as plain tensors (this reproduction), gradclip.clip_grad_norm_ "
                        "takes the local norm, as torch does; given process_group=True it all-reduces the "
                        "squared norms and returns the global one. On DTensor gradients (FSDP2's fully_shard) "
                        "gradclip and torch's own clip_grad_norm_ both return the global norm, so there "
                        "gradclip adds nothing. measure() reports gradclip's result next to the fix.",
                        opt_in=("process_group",)),
        uncaught_reason="A shard held as a plain tensor cannot be told from a whole one, so no library can "
                        "warn when local shards are passed without process_group.",
    ),
    Bug(
        name="agc_axis",
        title="AGC on the wrong axis",
        citation=Citation("SlopDotCash/asi", 439),
        also=(Citation("SlopDotCash/asi", 440, "pull"),),
        description="Adaptive gradient clipping bounds each output unit's gradient by lambda times that "
                    "unit's weight norm; reducing over dim 0 of a PyTorch (out, in) weight makes the units "
                    "input columns, so an over-budget output unit passes and quiet units sharing its "
                    "columns are scaled down.",
        buggy=agc_buggy, fixed=agc_fixed, measure=_agc_measure,
        caught_by=Catch("Prevented: gradclip.adaptive_clip_grad_(model) reads each weight's output-unit axis "
                        "from its module (gradclip.agc_unit_dims: axis 0 for Linear and ConvNd, axis 1 for "
                        "ConvTranspose); measure() reports its result next to the fix.", default="prevents"),
        uncaught_reason="A bare tensor does not say which axis holds its output units, so a hand-written "
                        "AGC on tensors cannot be checked by any library.",
    ),
    Bug(
        name="negative_threshold",
        title="A threshold schedule that goes negative",
        citation=Citation("pytorch/pytorch", 31367),
        also=(Citation("pytorch/torchtitan", 4295, "pull"), Citation("ml-explore/mlx", 4058, "pull")),
        description="torch's clip_grad_norm_ accepts a negative max_norm and multiplies the gradients by a "
                    "negative factor: a decaying threshold schedule that runs past its end flips the "
                    "gradient, and SGD climbs the loss.",
        buggy=negative_buggy, fixed=negative_fixed, measure=_negative_measure,
        caught_by=Catch("gradclip.clip_grad_norm_ (and every function taking a threshold) raises ValueError "
                        "naming max_norm and the allowed interval [0, inf].", _negative_fires, default="raises"),
    ),
]


def symptom_text(bug: Bug, measured: dict[str, Any]) -> str:
    """One line for a table: the buggy code's measured symptom next to the fixed code's.

    The norm of the gradient the update used (``applied_norm``), or for AGC the
    largest unit's gradient-to-weight ratio; the cosine with the correctly
    clipped gradient when the bug turned it.

    Example:
        >>> b = bug("per_group")
        >>> symptom_text(b, {"threshold": 0.1, "buggy": {"applied_norm": 0.1414, "cosine": 0.99},
        ...                  "fixed": {"applied_norm": 0.1}})
        'update used a gradient of norm 0.141 (fixed: 0.1); cosine with the right one 0.990'
    """
    bad, good = measured["buggy"], measured["fixed"]
    if "applied_norm" in bad:
        text = f"update used a gradient of norm {bad['applied_norm']:.3g} (fixed: {good['applied_norm']:.3g})"
    else:
        text = f"largest unit ratio |G|/|W| {bad['max_ratio']:.3g} (fixed: {good['max_ratio']:.3g})"
    if measured.get("threshold", MAX_NORM) != MAX_NORM:
        text += f" at max_norm {measured['threshold']:g}"
        if measured["threshold"] < 0:
            text += " (the fix floors the schedule at 1% of its start)"
    if bad.get("cosine", 1.0) < 0.9999:
        text += f"; cosine with the right one {bad['cosine']:.3f}"
    return text


def response_counts(bugs: list[Bug] | None = None) -> dict[str, list[str]]:
    """The bugs (by name) under each key of :data:`RESPONSES`: what gradclip does by default and once opted in.

    A bug counts once under its ``default`` and once under each of its
    ``opt_in`` responses; ``"caught_by_default"`` lists the bugs whose default
    is ``"raises"``, ``"warns"`` or ``"prevents"``, and ``"opt_in_only"`` those
    gradclip does nothing about unless the user opts in.

    Example:
        >>> counts = response_counts()
        >>> counts["raises"], counts["warns"]
        (['negative_threshold'], ['generator'])
    """
    bugs = BUGS if bugs is None else bugs
    out: dict[str, list[str]] = {key: [] for key in RESPONSES}
    for entry in bugs:
        catch = entry.caught_by if entry.caught_by is not None else Catch("")
        out[catch.default].append(entry.name)
        for key in catch.opt_in:
            out[key].append(entry.name)
    out["caught_by_default"] = [b.name for b in bugs if b.name not in out["silent"]]
    out["opt_in_only"] = [b.name for b in bugs if b.name in out["silent"]
                          and b.caught_by is not None and b.caught_by.opt_in]
    return out


def response_cells(entry: Bug) -> tuple[str, str]:
    """Two short phrases for a table: what gradclip does about ``entry`` by default, and once opted in.

    Example:
        >>> response_cells(bug("amp_scaled"))
        ('nothing', 'a clipper given scaler= raises; an attached adaptive clipper clips there')
    """
    catch = entry.caught_by if entry.caught_by is not None else Catch("")
    default = {"raises": "raises ValueError", "warns": "warns (empty iterator)",
               "prevents": "computes it right", "silent": "nothing"}[catch.default]
    if entry.name == "fsdp_local_norm" and catch.default == "silent":
        default = "nothing (on DTensors: right, as torch)"
    if entry.name == "agc_axis" and catch.default == "prevents":
        default = "computes it right (module's unit axis)"
    raise_text = "a clipper given scaler= raises" if entry.name == "amp_scaled" else "a stateful clipper raises"
    words = {"raises_opt_in": raise_text, "process_group": "the global norm, given process_group",
             "logs": "GradientMonitor records the norm used", "attach": "an attached adaptive clipper clips there"}
    return default, "; ".join(words[k] for k in catch.opt_in) or "not needed"


def bug(name: str) -> Bug:
    """The entry of :data:`BUGS` called ``name``.

    Raises:
        KeyError: no bug has that name (the message lists the names).

    Example:
        >>> from gradclip_book.bugzoo import bug
        >>> str(bug("generator").citation), bug("generator").citation.url
        ('pytorch/pytorch#148259', 'https://github.com/pytorch/pytorch/issues/148259')
    """
    for entry in BUGS:
        if entry.name == name:
            return entry
    raise KeyError(f"no bug named {name!r}; the zoo has {', '.join(entry.name for entry in BUGS)}")
