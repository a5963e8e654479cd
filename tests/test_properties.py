"""Properties every clipping function keeps, whatever its input: one kind of input per section.

1. Extreme magnitudes and low precision: for every in-place method, every
   floating dtype and magnitudes from subnormal to near the dtype's largest
   value, on every path (foreach, loop, flat buffer, and the accelerator
   paths: no value read on the host; the CPU's row-by-row path for large
   tensors; a flat buffer with parameters that got no gradient in between), the outputs are finite
   wherever the exact result is, and within a stated tolerance of a float64
   transcription that factors out the largest magnitude (so the reference
   itself cannot overflow).
2. Inputs torch accepts: every argument type torch takes for ``max_norm``,
   ``clip_value`` and ``norm_type`` gives torch's result; an empty tensor
   contributes nothing to any norm on any path; the default paths compile
   with ``torch.compile(fullgraph=True)``.
5. Aliased and duplicated tensors: a parameter listed twice (tied weights
   passed by hand) is one parameter: every function gives the result of
   listing it once (torch counts it twice and scales it twice).
7. Non-finite gradients: a NaN or inf gradient entry never comes out as a finite
   gradient (clippers) or a finite parameter (update clipping), in every dtype, on the
   CPU and the accelerator paths.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import gradclip

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]


def magnitudes(dtype: torch.dtype) -> dict[str, float]:
    """Typical gradient entries of four sizes, from subnormal to near the largest finite value."""
    info = torch.finfo(dtype)
    return {"subnormal": info.smallest_normal / 8, "tiny": info.smallest_normal * 16, "unit": 1.0,
            "huge": info.max / 64}


def tolerance(dtype: torch.dtype) -> tuple[float, float]:
    """(rtol, atol): a few roundings in ``dtype``, and two steps of its subnormal spacing."""
    info = torch.finfo(dtype)
    return 8 * info.eps, 2 * info.smallest_normal * info.eps


SHAPES = [(300,), (7, 5), (1,)]


def make(dtype: torch.dtype, magnitude: float, seed: int = 0) -> list[torch.nn.Parameter]:
    """Parameters (unit-scale weights) whose gradients have entries of about ``magnitude``, both signs."""
    generator = torch.Generator().manual_seed(seed)
    params = []
    for shape in SHAPES:
        weight = torch.randn(shape, generator=generator, dtype=torch.float64)
        sizes = torch.rand(shape, generator=generator, dtype=torch.float64) * 0.5 + 0.5
        signs = torch.where(torch.rand(shape, generator=generator) < 0.5, -1.0, 1.0).to(torch.float64)
        p = torch.nn.Parameter(weight.to(dtype))
        p.grad = (sizes * signs * magnitude).to(dtype)
        params.append(p)
    return params


# --- the float64 transcriptions ---------------------------------------------------------------


def exact_norm(values: list[float], p: float = 2.0) -> float:
    """The p-norm of Python floats with the largest magnitude factored out: never over- or underflows."""
    largest = max((abs(v) for v in values), default=0.0)
    if largest == 0 or math.isinf(p):
        return largest
    return largest * math.fsum((abs(v) / largest) ** p for v in values) ** (1.0 / p)


def flat(params: list[torch.Tensor]) -> list[list[float]]:
    # complex gradients by their moduli (all a norm sees)
    return [(p.grad.abs() if p.grad.is_complex() else p.grad).double().reshape(-1).tolist() for p in params]


def scaled(grads: list[list[float]], factor: float) -> list[list[float]]:
    return [[v * factor for v in g] for g in grads]


def ref_norm_clip(grads, c):
    n = exact_norm([v for g in grads for v in g])
    return scaled(grads, min(1.0, c / (n + 1e-6)))


def ref_soft_norm(grads, c):
    n = exact_norm([v for g in grads for v in g])
    return scaled(grads, c / (n + c))


def ref_per_tensor(grads, c):
    return [[v * min(1.0, c / (exact_norm(g) + 1e-6)) for v in g] for g in grads]


def ref_block_rms(grads, c):
    return [[v / max(1.0, exact_norm(g) / math.sqrt(len(g)) / c) for v in g] for g in grads]


def ref_value(grads, v):
    return [[max(-v, min(v, x)) for x in g] for g in grads]


def ref_soft_value(grads, alpha):
    # g / (1 + alpha |g|) = sign(g) / (alpha + 1/|g|) where alpha |g| > 1: no overflow either way
    def tame(x):
        return x / (1 + alpha * abs(x)) if alpha * abs(x) <= 1 else math.copysign(1.0, x) / (alpha + 1 / abs(x))
    return [[tame(x) for x in g] for g in grads]


def ref_sign(grads, _):
    return [[math.copysign(1.0, x) if x else 0.0 for x in g] for g in grads]


def ref_agc(params, clip_factor, eps=1e-3, axis=0):
    """Per unit along ``axis`` (a ConvTranspose-like layout for axis 1), in float64 with the largest factored out."""
    out = []
    for p in params:
        w, g = p.detach().double(), p.grad.double()
        if axis and w.ndim > 1:  # units along ``axis``: move it first, then back into the original order
            w, g = w.movedim(axis, 0), g.movedim(axis, 0)
            rows = ref_agc_rows(w, g, clip_factor, eps)
            out.append(torch.tensor(rows, dtype=torch.float64).reshape(g.shape).movedim(0, axis).reshape(-1).tolist())
            continue
        out.append(ref_agc_rows(w, g, clip_factor, eps))
    return out


def ref_agc_rows(w, g, clip_factor, eps):
    """Brock et al. eq. 3 on the rows (axis 0) of ``w`` and ``g``, as a flat list."""
    rows_w = w.reshape(w.shape[0], -1).tolist() if w.ndim > 1 else [w.reshape(-1).tolist()]
    rows_g = g.reshape(g.shape[0], -1).tolist() if g.ndim > 1 else [g.reshape(-1).tolist()]
    result = []
    for rw, rg in zip(rows_w, rows_g):
        limit = clip_factor * max(exact_norm(rw), eps)
        gn = exact_norm(rg)
        result += [x * (limit / max(gn, 1e-6)) for x in rg] if gn >= limit else rg
    return result


# --- the methods, each with its threshold relative to the magnitude ----------------------------
# name -> (call(params, magnitude, path), reference(grads or params, magnitude))


def relative_norm(params, fraction):
    return fraction * exact_norm([v for g in flat(params) for v in g])


def autoclip_at_half(ps, foreach):
    """AutoClip whose history holds half the current norm: it clips to exactly that."""
    clipper = gradclip.AutoClip(percentile=0.0, include_current=False, foreach=foreach)
    history = torch.tensor([relative_norm(ps, 0.5)], dtype=torch.float64)
    clipper.load_state_dict({"config": clipper._config(), "steps": 1, "history": history})
    return clipper(ps)


def ref_clip_to(grads, c):
    n = exact_norm([v for g in grads for v in g])
    return scaled(grads, c / n if n > c else 1.0)


def soft_alpha(magnitude):
    """An alpha that puts alpha |g| around 1 (both regimes of the tamed formula), kept finite."""
    return min(1.5 / magnitude, 1e300)


METHODS = {
    "clip_grad_norm_": (lambda ps, m, f: gradclip.clip_grad_norm_(ps, 1.0, foreach=f),
                        lambda ps, m: ref_norm_clip(flat(ps), 1.0)),
    "clip_grad_norm_(c=norm/2)": (lambda ps, m, f: gradclip.clip_grad_norm_(ps, relative_norm(ps, 0.5), foreach=f),
                                  lambda ps, m: ref_norm_clip(flat(ps), relative_norm(ps, 0.5))),
    "clip_grad_norm_report_": (lambda ps, m, f: gradclip.clip_grad_norm_report_(ps, 1.0, foreach=f),
                               lambda ps, m: ref_norm_clip(flat(ps), 1.0)),
    "clip_grad_value_": (lambda ps, m, f: gradclip.clip_grad_value_(ps, 0.75 * m, foreach=f),
                         lambda ps, m: ref_value(flat(ps), 0.75 * m)),
    "clip_grad_norm_per_tensor_": (lambda ps, m, f: gradclip.clip_grad_norm_per_tensor_(ps, 1.0, foreach=f),
                                   lambda ps, m: ref_per_tensor(flat(ps), 1.0)),
    "clip_grad_block_rms_": (lambda ps, m, f: gradclip.clip_grad_block_rms_(ps, 0.7 * m, foreach=f),
                             lambda ps, m: ref_block_rms(flat(ps), 0.7 * m)),
    "soft_clip_grad_norm_": (lambda ps, m, f: gradclip.soft_clip_grad_norm_(ps, 1.0, foreach=f),
                             lambda ps, m: ref_soft_norm(flat(ps), 1.0)),
    "soft_clip_grad_value_": (lambda ps, m, f: gradclip.soft_clip_grad_value_(ps, soft_alpha(m), foreach=f),
                              lambda ps, m: ref_soft_value(flat(ps), soft_alpha(m))),
    "sign_grad_": (lambda ps, m, f: gradclip.sign_grad_(ps, foreach=f), lambda ps, m: ref_sign(flat(ps), m)),
    "adaptive_clip_grad_": (lambda ps, m, f: gradclip.adaptive_clip_grad_(ps, clip_factor=0.05, foreach=f),
                            lambda ps, m: ref_agc(ps, 0.05)),
    # output units along axis 1, as in a ConvTranspose weight
    "adaptive_clip_grad_(units on axis 1)": (
        lambda ps, m, f: gradclip.adaptive_clip_grad_(ps, clip_factor=0.05, foreach=f,
                                                      unit_dims={p: 1 for p in ps if p.ndim > 1}),
        lambda ps, m: ref_agc(ps, 0.05, axis=1)),
    # the first step's threshold is its own norm: nothing is clipped (torch's factor c / (c + 1e-6) would be)
    "AutoClip": (lambda ps, m, f: gradclip.AutoClip(percentile=50, foreach=f)(ps),
                 lambda ps, m: flat(ps)),
    "AutoClip(clipping)": (lambda ps, m, f: autoclip_at_half(ps, f),
                           lambda ps, m: ref_clip_to(flat(ps), relative_norm(ps, 0.5))),
    "ZClip(warm-up)": (lambda ps, m, f: gradclip.ZClip(max_grad_norm=1.0, foreach=f)(ps),
                       lambda ps, m: ref_norm_clip(flat(ps), 1.0)),
}

# AdaGC (gradclip.adagc) and update clipping (gradclip.update_clip)


def adagc_at_half(ps, foreach, rule="adagc"):
    """AdaGC past its warm-up with gamma at half of each tensor's exact norm: it clips each tensor to that."""
    clipper = gradclip.AdaGC(lambda_rel=1.0, warmup_steps=0, foreach=foreach) if rule == "adagc" else \
        gradclip.AdaGC.olmo(1.0, beta=0.9, foreach=foreach)
    gamma = torch.tensor([0.5 * exact_norm(g) for g in flat(ps)], dtype=torch.float64)
    clipper.load_state_dict({"config": clipper._config(), "steps": 1, "gamma": gamma})
    return clipper(ps)


def ref_adagc_half(grads):
    # c = n/2 < n: both rules scale by c / (n + 1e-6)
    return [[v * (0.5 * exact_norm(g) / (exact_norm(g) + 1e-6)) for v in g] for g in grads]


def update_clip_at_half(ps, magnitude, foreach):
    """UpdateClip('adafactor', d = m/2) on SGD(lr=1) from zero weights; the new weights are written into .grad."""
    with torch.no_grad():
        for p in ps:
            p.zero_()
    optimizer = torch.optim.SGD(ps, lr=1.0, foreach=foreach)
    gradclip.UpdateClip("adafactor", d=0.5 * magnitude, foreach=foreach).attach(optimizer)
    optimizer.step()
    for p in ps:
        p.grad.copy_(p.detach())


def ref_update_clip_half(grads, magnitude):
    # U = g (SGD, lr 1): the new weights are -g / max(1, RMS(g) / d), d = m/2
    return [[-v / max(1.0, exact_norm(g) / math.sqrt(len(g)) / (0.5 * magnitude)) for v in g] for g in grads]


METHODS["AdaGC(warm-up)"] = (lambda ps, m, f: gradclip.AdaGC(lambda_abs=1.0, foreach=f)(ps),
                             lambda ps, m: ref_norm_clip(flat(ps), 1.0))
METHODS["AdaGC(per-tensor)"] = (lambda ps, m, f: adagc_at_half(ps, f), lambda ps, m: ref_adagc_half(flat(ps)))
METHODS["AdaGC.olmo"] = (lambda ps, m, f: adagc_at_half(ps, f, "olmo"), lambda ps, m: ref_adagc_half(flat(ps)))
METHODS["UpdateClip(adafactor)"] = (lambda ps, m, f: update_clip_at_half(ps, m, f),
                                    lambda ps, m: ref_update_clip_half(flat(ps), m))

PATHS = {"default": None, "foreach": True, "loop": False, "buffer": None, "buffer-gaps": None, "rows": None,
         "accelerator": None, "accelerator-loop": False}
_BUFFERS: list[gradclip.GradBuffer] = []  # the buffer of the latest buffer-gaps case, kept alive while it runs


def on_path(params, path, monkeypatch=None):
    """For the flat-buffer paths, move the gradients into one GradBuffer (per dtype) first (with parameters
    that have no gradient between them for buffer-gaps).

    The accelerator paths run on CPU tensors with the CPU-only host checks switched off
    (as tests/support/sync.py does): the code an accelerator runs, with no value read.
    The rows path lowers the size from which the CPU norms large tensors row by row (and the
    row length), so that these small tensors take it, in several rows each (and a remainder).
    """
    if path == "buffer":
        gradclip.GradBuffer(params)
    if path == "buffer-gaps":
        # parameters without a gradient (frozen, or in a branch the forward skipped) between the others: their
        # .grad stays None and their views hold zeros, and clipping still runs one kernel over the whole buffer
        gaps = [torch.nn.Parameter(torch.ones(3, dtype=p.dtype)) for p in params]
        _BUFFERS[:] = [gradclip.GradBuffer([t for pair in zip(gaps, params) for t in pair])]
        assert all(gap.grad is None for gap in gaps)
        grads = [p.grad for p in params if p.grad is not None]
        assert len(grads) < 2 or gradclip._groups.single_buffer(grads) is _BUFFERS[0].buffers[
            (grads[0].device, grads[0].dtype)], "the buffer with gaps is not taken as one buffer"
    if path == "rows":
        monkeypatch.setattr(gradclip._norms, "_ROWS_MIN_NUMEL", 2)
        monkeypatch.setattr(gradclip._norms, "_ROW", 64)
    if path.startswith("accelerator"):
        monkeypatch.setattr(gradclip._norms, "HOST_CHECKS_ON_CPU", False)
    return PATHS[path]


def case_ids():
    for dtype in DTYPES:
        for size in magnitudes(dtype):
            yield dtype, size


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("dtype,size", list(case_ids()), ids=lambda v: str(v).replace("torch.", ""))
def test_finite_and_accurate_at_every_magnitude(method, dtype, size, path, monkeypatch):
    call, reference = METHODS[method]
    magnitude = magnitudes(dtype)[size]
    params = make(dtype, magnitude)
    expected = reference(params, magnitude)
    call(params, magnitude, on_path(params, path, monkeypatch))
    rtol, atol = tolerance(dtype)
    info = torch.finfo(dtype)
    for p, want in zip(params, expected):
        got = p.grad.double().reshape(-1)
        want = torch.tensor(want, dtype=torch.float64)
        representable = want.abs() <= info.max
        assert torch.isfinite(got[representable]).all(), f"{method}: a finite exact result came back non-finite"
        # the exact result, rounded once into the dtype, is the best any method can do
        rounded = want.to(dtype).double()
        torch.testing.assert_close(got, rounded, rtol=rtol, atol=atol, msg=lambda m: f"{method}, {size}: {m}")


NORM_FUNCTIONS = {
    "get_total_norm": lambda ps, f: gradclip.get_total_norm([p.grad for p in ps], foreach=f),
    "clip_grad_norm_": lambda ps, f: gradclip.clip_grad_norm_(ps, 1.0, foreach=f),
    "soft_clip_grad_norm_": lambda ps, f: gradclip.soft_clip_grad_norm_(ps, 1.0, foreach=f),
    "clip_grad_norm_report_": lambda ps, f: gradclip.clip_grad_norm_report_(ps, 1.0, foreach=f).norm,
}


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("function", list(NORM_FUNCTIONS))
@pytest.mark.parametrize("dtype,size", list(case_ids()), ids=lambda v: str(v).replace("torch.", ""))
def test_norms_are_right_whenever_representable(function, dtype, size, path, monkeypatch):
    params = make(dtype, magnitudes(dtype)[size])
    exact = exact_norm([v for g in flat(params) for v in g])
    norm = NORM_FUNCTIONS[function](params, on_path(params, path, monkeypatch))
    assert norm.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    torch.testing.assert_close(norm.double(), torch.tensor(exact, dtype=torch.float64).to(norm.dtype).double(),
                               rtol=8 * torch.finfo(norm.dtype).eps, atol=0.0)


def test_the_issue_case_two_float32_tensors_of_1e18():
    # 2 x 300 entries of 1e18: the norm 2.449e19 is representable; torch returns inf and zeroes everything
    params = [torch.nn.Parameter(torch.zeros(300)) for _ in range(2)]
    for p in params:
        p.grad = torch.full((300,), 1e18)
    torch_copy = [torch.nn.Parameter(torch.zeros(300)) for _ in range(2)]
    for p in torch_copy:
        p.grad = torch.full((300,), 1e18)
    assert torch.isinf(torch.nn.utils.clip_grad_norm_(torch_copy, 1.0))
    assert all(torch.all(p.grad == 0) for p in torch_copy)  # torch: silently wrong
    norm = gradclip.clip_grad_norm_(params, 1.0)
    assert math.isclose(float(norm), math.sqrt(600) * 1e18, rel_tol=1e-6)
    total = gradclip.get_total_norm([p.grad for p in params])
    assert math.isclose(float(total), 1.0, rel_tol=1e-5)


@pytest.mark.parametrize("values,exact", [([2e200, 0.0], 2e200), ([1e-163, 0.0], 1e-163)], ids=["2e200", "1e-163"])
def test_float64_gradients_whose_squares_overflow_or_underflow(values, exact):
    # torch squares in float64: 4e400 overflows (norm inf, gradients zeroed), 1e-326 underflows (norm 0)
    theirs = torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))
    theirs.grad = torch.tensor(values, dtype=torch.float64)
    ours = torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))
    ours.grad = theirs.grad.clone()
    torch_norm = torch.nn.utils.clip_grad_norm_([theirs], 1.0)
    assert float(torch_norm) == (math.inf if exact > 1 else 0.0)
    if exact > 1:
        assert torch.all(theirs.grad == 0)  # torch: silently wrong
    norm = gradclip.clip_grad_norm_([ours], 1.0)
    assert math.isclose(float(norm), exact, rel_tol=1e-12)
    expected = [1.0, 0.0] if exact > 1 else values  # scaled to the threshold, or left alone below it
    torch.testing.assert_close(ours.grad, torch.tensor(expected, dtype=torch.float64), rtol=1e-12, atol=0)
    assert math.isclose(float(gradclip.get_total_norm([theirs.grad.new_tensor(values)])), exact, rel_tol=1e-12)


@pytest.mark.parametrize("foreach", [None, True, False])
def test_an_empty_gradient_under_the_inf_norm_contributes_nothing_where_torch_raises(foreach):
    # torch: a max over no entries has no identity, so it raises; gradclip: as for every other p, nothing
    def params():
        empty, full = torch.nn.Parameter(torch.zeros(0)), torch.nn.Parameter(torch.zeros(3))
        empty.grad, full.grad = torch.zeros(0), torch.tensor([1.0, -3.0, 2.0])
        return [empty, full]

    theirs, ours = params(), params()
    with pytest.raises(RuntimeError, match="empty tensor"):
        torch.nn.utils.clip_grad_norm_(theirs, 1.0, math.inf, foreach=foreach)
    with pytest.raises(RuntimeError, match="empty tensor"):
        torch.nn.utils.get_total_norm([p.grad for p in theirs], math.inf, foreach=foreach)
    assert float(gradclip.clip_grad_norm_(ours, 1.0, math.inf, foreach=foreach)) == 3.0
    torch.testing.assert_close(ours[1].grad, torch.tensor([1.0, -3.0, 2.0]) / (3.0 + 1e-6))
    assert float(gradclip.get_total_norm([torch.zeros(0)], math.inf, foreach=foreach)) == 0.0


def test_the_issue_case_qsgd_float16_stays_finite_and_unbiased():
    torch.manual_seed(0)
    draws = []
    for seed in range(400):
        w = torch.nn.Parameter(torch.zeros(2, dtype=torch.float16))
        w.grad = torch.tensor([60000.0, 30000.0], dtype=torch.float16)
        gradclip.qsgd_quantize_grad_([w], levels=2, generator=torch.Generator().manual_seed(seed))
        assert torch.isfinite(w.grad).all()
        draws.append(w.grad.double())
    mean = torch.stack(draws).mean(0)
    # unbiased: the mean of 400 draws is within 4 standard errors of the input
    spread = torch.stack(draws).std(0) / math.sqrt(len(draws))
    assert torch.all((mean - torch.tensor([60000.0, 30000.0], dtype=torch.float64)).abs() <= 4 * spread + 64)


# --- 2. inputs torch accepts ------------------------------------------------------------------

THRESHOLDS = [1, 1.0, np.float32(1.0), np.float64(1.0), np.array(1.0), np.array([1.0]), "1.0", True,
              torch.tensor(1.0), torch.tensor([1.0]), torch.tensor([[1.0]]), torch.tensor(1), torch.tensor(1.0).double()]
NORM_TYPES = [2, 2.0, "2", "inf", float("inf"), np.float64(3.0), np.int64(1), torch.tensor(2.0), torch.tensor([2.0])]


def twin_params(seed=0):
    ours = make(torch.float32, 3.0, seed)
    theirs = []
    for p in ours:
        q = torch.nn.Parameter(p.detach().clone())
        q.grad = p.grad.clone()
        theirs.append(q)
    return ours, theirs


def torch_outcome(call):
    """What torch does with a call: ("ok", result) or ("raises", exception type)."""
    try:
        return "ok", call()
    except (TypeError, ValueError, RuntimeError) as error:
        return "raises", type(error)


@pytest.mark.parametrize("max_norm", THRESHOLDS, ids=repr)
def test_every_max_norm_torch_accepts_gives_torchs_result(max_norm):
    ours, theirs = twin_params()
    outcome, expected = torch_outcome(lambda: torch.nn.utils.clip_grad_norm_(theirs, max_norm))
    if outcome == "raises":  # e.g. a 1-D numpy array: float() refuses it, so does gradclip
        with pytest.raises(expected, match="max_norm"):
            gradclip.clip_grad_norm_(ours, max_norm)
        return
    torch.testing.assert_close(gradclip.clip_grad_norm_(ours, max_norm), expected)
    for p, q in zip(ours, theirs):
        torch.testing.assert_close(p.grad, q.grad)


@pytest.mark.parametrize("clip_value", THRESHOLDS, ids=repr)
def test_every_clip_value_torch_accepts_gives_torchs_result(clip_value):
    ours, theirs = twin_params()
    outcome, expected = torch_outcome(lambda: torch.nn.utils.clip_grad_value_(theirs, clip_value))
    if outcome == "raises":
        with pytest.raises(expected, match="clip_value"):
            gradclip.clip_grad_value_(ours, clip_value)
        return
    gradclip.clip_grad_value_(ours, clip_value)
    for p, q in zip(ours, theirs):
        torch.testing.assert_close(p.grad, q.grad)


@pytest.mark.parametrize("norm_type", NORM_TYPES, ids=repr)
def test_every_norm_type_torch_accepts_gives_torchs_result(norm_type):
    ours, theirs = twin_params()
    outcome, expected = torch_outcome(lambda: torch.nn.utils.clip_grad_norm_(theirs, 1.0, norm_type=norm_type))
    assert outcome == "ok", "every norm type listed here is one torch accepts"
    torch.testing.assert_close(gradclip.clip_grad_norm_(ours, 1.0, norm_type=norm_type), expected)
    torch.testing.assert_close(gradclip.get_total_norm([q.grad for q in theirs], norm_type=norm_type),
                               torch.nn.utils.get_total_norm([q.grad for q in theirs], norm_type=norm_type))


@pytest.mark.parametrize("bad,kind", [("one", ValueError), ([1.0], TypeError), (None, TypeError),
                                      (torch.ones(2), TypeError), (-1, ValueError)], ids=repr)
def test_what_float_refuses_is_refused_with_the_argument_named(bad, kind):
    ours, _ = twin_params()
    before = [p.grad.clone() for p in ours]
    with pytest.raises(kind, match="max_norm"):
        gradclip.clip_grad_norm_(ours, bad)
    with pytest.raises(kind, match="clip_value"):
        gradclip.clip_grad_value_(ours, bad)
    assert all(torch.equal(p.grad, b) for p, b in zip(ours, before))


def with_empty(dtype=torch.float32):
    """A zero-size gradient (and a 0 x 3 one) beside ``full((300,), 2.0)``."""
    params = []
    for shape, value in (((0,), 0.0), ((300,), 2.0), ((0, 3), 0.0)):
        p = torch.nn.Parameter(torch.ones(shape, dtype=dtype))
        p.grad = torch.full(shape, value, dtype=dtype)
        params.append(p)
    return params


EMPTY_CALLS = {
    "get_total_norm": lambda ps, p, f: gradclip.get_total_norm([q.grad for q in ps], p, foreach=f),
    "clip_grad_norm_": lambda ps, p, f: gradclip.clip_grad_norm_(ps, 1.0, p, foreach=f),
    "clip_grad_norm_report_": lambda ps, p, f: gradclip.clip_grad_norm_report_(ps, 1.0, p, foreach=f).norm,
    "soft_clip_grad_norm_": lambda ps, p, f: gradclip.soft_clip_grad_norm_(ps, 1.0, p, foreach=f),
    "clip_grad_norm_per_tensor_": lambda ps, p, f: gradclip.clip_grad_norm_per_tensor_(ps, 1.0, p, foreach=f),
    "clip_grad_block_rms_": lambda ps, p, f: gradclip.clip_grad_block_rms_(ps, 0.5, foreach=f),
    "adaptive_clip_grad_": lambda ps, p, f: gradclip.adaptive_clip_grad_(ps, 0.01, norm_type=p, foreach=f),
    "clip_grad_value_": lambda ps, p, f: gradclip.clip_grad_value_(ps, 1.0, foreach=f),
    "soft_clip_grad_value_": lambda ps, p, f: gradclip.soft_clip_grad_value_(ps, 1.0, foreach=f),
    "sign_grad_": lambda ps, p, f: gradclip.sign_grad_(ps, foreach=f),
    "qsgd_quantize_grad_": lambda ps, p, f: gradclip.qsgd_quantize_grad_(ps, 4, torch.Generator().manual_seed(0)),
    "AutoClip": lambda ps, p, f: gradclip.AutoClip(norm_type=p, foreach=f)(ps).norm,
    "ZClip": lambda ps, p, f: gradclip.ZClip(norm_type=p, foreach=f)(ps).norm,
    "SpikeGuard": lambda ps, p, f: gradclip.SpikeGuard(norm_type=p, foreach=f)(ps).norm,
    "SpikeGuard(loss)": lambda ps, p, f: fed(gradclip.SpikeGuard(signals=("loss", "norm"), norm_type=p,
                                                                 foreach=f))(ps).norm,
}


def fed(guard, loss=1.0):
    """A guard that watches the loss, given this step's (what a loop does before it decides)."""
    guard.record_loss(loss)
    return guard


def drop_empty(value, params):
    """A per-tensor result without the entries of the empty tensors (they have norm 0)."""
    if isinstance(value, torch.Tensor) and value.ndim == 1 and len(value) == len(params):
        return value[[i for i, p in enumerate(params) if p.numel()]]
    return value


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("norm_type", [1.0, 2.0, math.inf])
@pytest.mark.parametrize("function", list(EMPTY_CALLS))
def test_an_empty_tensor_contributes_nothing(function, norm_type, path, monkeypatch):
    params = with_empty()
    alone = [params[1]]
    twin = torch.nn.Parameter(alone[0].detach().clone())
    twin.grad = alone[0].grad.clone()
    expected = EMPTY_CALLS[function]([twin], norm_type, PATHS[path])
    result = EMPTY_CALLS[function](params, norm_type, on_path(params, path, monkeypatch))
    if isinstance(result, torch.Tensor) and result.ndim == 1 and len(result) == 3:
        assert torch.all(result[[0, 2]] == 0), "an empty tensor's own norm is 0"
    if isinstance(expected, torch.Tensor):
        torch.testing.assert_close(drop_empty(result, params), expected)
    torch.testing.assert_close(params[1].grad, twin.grad)


COMPILED = {
    "clip_grad_norm_": lambda ps: gradclip.clip_grad_norm_(ps, 0.5),
    "clip_grad_norm_report_": lambda ps: gradclip.clip_grad_norm_report_(ps, 0.5).scale,
    "get_total_norm": lambda ps: gradclip.get_total_norm([p.grad for p in ps]),
    "clip_grads_with_norm_": lambda ps: gradclip.clip_grads_with_norm_(ps, 0.5, torch.tensor(7.0)),
    "clip_grad_value_": lambda ps: gradclip.clip_grad_value_(ps, 0.5),
    "soft_clip_grad_norm_": lambda ps: gradclip.soft_clip_grad_norm_(ps, 0.5),
    "soft_clip_grad_value_": lambda ps: gradclip.soft_clip_grad_value_(ps, 0.5),
    "clip_grad_norm_per_tensor_": lambda ps: gradclip.clip_grad_norm_per_tensor_(ps, 0.5),
    "clip_grad_block_rms_": lambda ps: gradclip.clip_grad_block_rms_(ps, 0.5),
    "sign_grad_": lambda ps: gradclip.sign_grad_(ps),
    "adaptive_clip_grad_": lambda ps: gradclip.adaptive_clip_grad_(ps, 0.01),
}


@pytest.mark.parametrize("function", list(COMPILED))
def test_default_paths_compile_with_fullgraph(function):
    # aot_eager traces the whole graph (a graph break fails with fullgraph=True) without a C++ toolchain
    torch._dynamo.reset()
    ours, theirs = twin_params()
    compiled = torch.compile(COMPILED[function], fullgraph=True, backend="aot_eager")
    compiled(ours)
    COMPILED[function](theirs)
    for p, q in zip(ours, theirs):
        torch.testing.assert_close(p.grad, q.grad)


def test_torchs_own_case_compiles_too():
    # the reported call: torch compiles it, so must gradclip
    ours, theirs = twin_params()
    torch._dynamo.reset()
    torch.compile(lambda ps: torch.nn.utils.clip_grad_norm_(ps, 0.5), fullgraph=True, backend="aot_eager")(theirs)
    torch._dynamo.reset()
    torch.compile(lambda ps: gradclip.clip_grad_norm_(ps, 0.5), fullgraph=True, backend="aot_eager")(ours)
    for p, q in zip(ours, theirs):
        torch.testing.assert_close(p.grad, q.grad)


# --- 5. a parameter listed twice ----------------------------------------------------------------

EMPTY_CALLS["AdaGC"] = lambda ps, p, f: gradclip.AdaGC(norm_type=p, foreach=f)(ps).norm

TWICE_CALLS = {name: call for name, call in EMPTY_CALLS.items()}
TWICE_CALLS["GradientMonitor"] = None  # named parameters: duplicates come from module sharing, see test_monitor


@pytest.mark.parametrize("path", ["default", "foreach", "loop"])
@pytest.mark.parametrize("function", [name for name, call in TWICE_CALLS.items() if call is not None])
def test_a_parameter_listed_twice_counts_once(function, path):
    w = torch.nn.Parameter(torch.randn(3, 4, generator=torch.Generator().manual_seed(1)))
    w.grad = torch.randn(3, 4, generator=torch.Generator().manual_seed(2)) * 5
    d = torch.nn.Parameter(torch.ones(1, dtype=torch.float64))
    d.grad = torch.tensor([0.5], dtype=torch.float64)
    once = [torch.nn.Parameter(t.detach().clone()) for t in (w, d)]
    for copy, original in zip(once, (w, d)):
        copy.grad = original.grad.clone()
    expected = TWICE_CALLS[function](once, 2.0, PATHS[path])
    result = TWICE_CALLS[function]([w, w, d], 2.0, PATHS[path])
    if isinstance(expected, torch.Tensor):
        torch.testing.assert_close(result, expected)
    torch.testing.assert_close(w.grad, once[0].grad)
    torch.testing.assert_close(d.grad, once[1].grad)


def test_torch_counts_a_duplicate_twice_where_gradclip_counts_it_once():
    w = torch.nn.Parameter(torch.zeros(2))
    w.grad = torch.tensor([3.0, 4.0])
    assert math.isclose(float(torch.nn.utils.get_total_norm([w.grad, w.grad])), 5 * math.sqrt(2), rel_tol=1e-6)
    assert math.isclose(float(gradclip.get_total_norm([w.grad, w.grad])), 5.0, rel_tol=1e-6)


# --- 8. errors name the argument, the allowed values and what to do ---------------------------


SPARSE_CALLS = {
    "clip_grad_norm_": lambda ps: gradclip.clip_grad_norm_(ps, 1.0),
    "get_total_norm": lambda ps: gradclip.get_total_norm([p.grad for p in ps]),
    "clip_grad_value_": lambda ps: gradclip.clip_grad_value_(ps, 1.0),
    "clip_grad_norm_per_tensor_": lambda ps: gradclip.clip_grad_norm_per_tensor_(ps, 1.0),
    "clip_grad_block_rms_": lambda ps: gradclip.clip_grad_block_rms_(ps, 1.0),
    "soft_clip_grad_norm_": lambda ps: gradclip.soft_clip_grad_norm_(ps, 1.0),
    "soft_clip_grad_value_": lambda ps: gradclip.soft_clip_grad_value_(ps, 1.0),
    "sign_grad_": lambda ps: gradclip.sign_grad_(ps),
    "qsgd_quantize_grad_": lambda ps: gradclip.qsgd_quantize_grad_(ps, 2),
    "adaptive_clip_grad_": lambda ps: gradclip.adaptive_clip_grad_(ps),
    "AutoClip": lambda ps: gradclip.AutoClip()(ps),
    "ZClip": lambda ps: gradclip.ZClip()(ps),
    "SpikeGuard": lambda ps: gradclip.SpikeGuard()(ps),
    "SpikeGuard(loss)": lambda ps: fed(gradclip.SpikeGuard.olmo_core())(ps),
}


SPARSE_CALLS["AdaGC"] = lambda ps: gradclip.AdaGC()(ps)


@pytest.mark.parametrize("function", list(SPARSE_CALLS))
def test_a_sparse_gradient_gets_an_error_that_says_what_to_do(function):
    dense = torch.nn.Parameter(torch.ones(3))
    dense.grad = torch.ones(3)
    sparse = torch.nn.Parameter(torch.ones(4, 2))
    sparse.grad = torch.ones(4, 2).to_sparse()
    with pytest.raises(TypeError) as error:
        SPARSE_CALLS[function]([dense, sparse])
    message = str(error.value)
    assert "sparse" in message and "dense" in message and ".to_dense()" in message, message
    assert "1" in message, "the message names which tensor"
    assert "or its" not in message


def test_a_tensor_threshold_is_checked_on_the_cpu_and_made_loud_on_an_accelerator(monkeypatch):
    for bad in (torch.tensor(-1.0), torch.tensor(float("nan"))):
        ours, _ = twin_params()
        before = [p.grad.clone() for p in ours]
        with pytest.raises(ValueError, match="max_norm"):
            gradclip.clip_grad_norm_(ours, bad)
        with pytest.raises(ValueError, match="clip_value"):
            gradclip.clip_grad_value_(ours, bad)
        assert all(torch.equal(p.grad, b) for p, b in zip(ours, before))
    # a device tensor is not read (that would be a sync): the factor becomes NaN, never a flip
    monkeypatch.setattr(gradclip._norms, "HOST_CHECKS_ON_CPU", False)
    ours, _ = twin_params()
    gradclip.clip_grad_norm_(ours, torch.tensor(-1.0))
    assert all(torch.isnan(p.grad).all() for p in ours)


def test_errors_say_what_to_pass():
    model = torch.nn.Linear(3, 2)
    model(torch.ones(1, 3)).sum().backward()
    with pytest.raises(TypeError, match=r"parameters\(\)"):
        gradclip.clip_grad_norm_(model, 1.0)
    with pytest.raises(TypeError, match="not named_parameters"):
        gradclip.clip_grad_norm_(model.named_parameters(), 1.0)
    with pytest.raises(TypeError, match="error_if_nonfinite"):
        gradclip.clip_grad_norm_(model.parameters(), 1.0, error_if_nonfinite="yes")


def test_a_sparse_gradient_is_named_by_its_own_position():
    no_grad = torch.nn.Parameter(torch.ones(2))
    dense = torch.nn.Parameter(torch.ones(3))
    dense.grad = torch.ones(3)
    sparse = torch.nn.Parameter(torch.ones(4, 2))
    sparse.grad = torch.ones(4, 2).to_sparse()
    with pytest.raises(TypeError, match=r"parameters\[2\]\.grad"):
        gradclip.clip_grad_norm_([no_grad, dense, sparse], 1.0)


# --- 6. Complex gradients -------------------------------------------------------------------------
# A norm of complex entries is the norm of their moduli, a real number (as torch returns); clipping by a
# norm multiplies by a real factor. Reference: the same call on real twins whose gradients (and weights)
# are the moduli, which have the same norms: every complex gradient must come back as z times the factor
# its twin got. Entrywise rules (clamp, sign, quantise) have no meaning for complex values: TypeError.

COMPLEX_NORM_CALLS = {
    "clip_grad_norm_": lambda ps, f: gradclip.clip_grad_norm_(ps, 1.0, foreach=f),
    "clip_grad_norm_report_": lambda ps, f: gradclip.clip_grad_norm_report_(ps, 1.0, foreach=f).norm,
    "clip_grad_norm_per_tensor_": lambda ps, f: gradclip.clip_grad_norm_per_tensor_(ps, 1.0, foreach=f),
    "clip_grad_block_rms_": lambda ps, f: gradclip.clip_grad_block_rms_(ps, 0.3, foreach=f),
    "soft_clip_grad_norm_": lambda ps, f: gradclip.soft_clip_grad_norm_(ps, 1.0, foreach=f),
    "adaptive_clip_grad_": lambda ps, f: gradclip.adaptive_clip_grad_(ps, clip_factor=0.05, foreach=f),
    "AutoClip(clipping)": lambda ps, f: autoclip_at_half(ps, f).norm,
    "ZClip(warm-up)": lambda ps, f: gradclip.ZClip(max_grad_norm=1.0, foreach=f)(ps).norm,
}


COMPLEX_NORM_CALLS["AdaGC(warm-up)"] = lambda ps, f: gradclip.AdaGC(lambda_abs=1.0, foreach=f)(ps).norm
COMPLEX_NORM_CALLS["AdaGC(per-tensor)"] = lambda ps, f: adagc_at_half(ps, f).norm


def complex_params(dtype: torch.dtype, scale: float, seed: int = 1) -> list[torch.nn.Parameter]:
    generator = torch.Generator().manual_seed(seed)
    params = []
    for shape in SHAPES:
        weight = torch.randn(shape + (2,), generator=generator, dtype=torch.float64)
        grad = torch.randn(shape + (2,), generator=generator, dtype=torch.float64) * scale
        p = torch.nn.Parameter(torch.view_as_complex(weight).to(dtype))
        p.grad = torch.view_as_complex(grad).to(dtype)
        params.append(p)
    return params


def real_twins(params: list[torch.nn.Parameter]) -> list[torch.nn.Parameter]:
    twins = []
    for p in params:
        twin = torch.nn.Parameter(p.detach().abs().clone())
        twin.grad = p.grad.abs().clone()
        twins.append(twin)
    return twins


@pytest.mark.parametrize("path", ["default", "foreach", "loop", "rows", "accelerator"])
@pytest.mark.parametrize("scale", [1e-3, 1.0, 1e3])
@pytest.mark.parametrize("dtype", [torch.complex64, torch.complex128])
@pytest.mark.parametrize("function", list(COMPLEX_NORM_CALLS))
def test_complex_gradients_are_clipped_by_their_moduli_norms(function, dtype, scale, path, monkeypatch):
    params = complex_params(dtype, scale)
    before = [p.grad.clone() for p in params]
    twins = real_twins(params)
    twin_before = [t.grad.clone() for t in twins]
    foreach = on_path(params, path, monkeypatch)
    norm = COMPLEX_NORM_CALLS[function](params, foreach)
    twin_norm = COMPLEX_NORM_CALLS[function](twins, foreach)
    if isinstance(norm, torch.Tensor):  # what the twin returns, in the same (real) dtype
        assert not norm.is_complex()
        torch.testing.assert_close(norm, twin_norm)
    tol = 1e-12 if dtype == torch.complex128 else 2e-6
    for p, z, t, m in zip(params, before, twins, twin_before):
        factor = torch.where(m > 0, t.grad / torch.where(m > 0, m, 1), 1)  # what each modulus was multiplied by
        torch.testing.assert_close(p.grad, z * factor.to(z.dtype), rtol=tol, atol=tol * scale)


def test_complex_norms_equal_torchs_real_norms():
    params = complex_params(torch.complex64, 2.0)
    grads = [p.grad for p in params]
    for norm_type in (1.0, 2.0, 3.0, math.inf):
        ours = gradclip.get_total_norm(grads, norm_type)
        assert not ours.is_complex()
        torch.testing.assert_close(ours, torch.nn.utils.get_total_norm(grads, norm_type), rtol=1e-6, atol=0)
    assert bool(gradclip.clip_grad_norm_report_(params, 1.0).clipped)


def test_a_complex_modulus_beyond_float32_keeps_the_right_norm_on_the_cpu():
    p = torch.nn.Parameter(torch.zeros(2, dtype=torch.complex64))
    p.grad = torch.tensor([3e38 + 3e38j, 1.0 + 0j], dtype=torch.complex64)  # |z| = 4.2e38 > float32's max
    _, _, wide = gradclip.norms.grouped_norm([p.grad], 2.0, None)
    assert math.isclose(float(wide), math.hypot(3e38, 3e38), rel_tol=1e-6)


ENTRYWISE_CALLS = {
    "clip_grad_value_": lambda ps: gradclip.clip_grad_value_(ps, 1.0),
    "soft_clip_grad_value_": lambda ps: gradclip.soft_clip_grad_value_(ps, 1.0),
    "sign_grad_": lambda ps: gradclip.sign_grad_(ps),
    "qsgd_quantize_grad_": lambda ps: gradclip.qsgd_quantize_grad_(ps, 4, torch.Generator().manual_seed(0)),
}


@pytest.mark.parametrize("function", list(ENTRYWISE_CALLS))
def test_entrywise_rules_refuse_complex_gradients_by_name(function):
    params = [torch.nn.Parameter(torch.zeros(2))] + complex_params(torch.complex64, 1.0)
    params[0].grad = torch.ones(2)
    before = [p.grad.clone() for p in params]
    with pytest.raises(TypeError, match=r"parameters\[1\]\.grad is complex .*view_as_real"):
        ENTRYWISE_CALLS[function](params)
    assert all(torch.equal(p.grad, b) for p, b in zip(params, before))  # nothing changed


# --- 7. Non-finite gradients never become finite -------------------------------------------------
# A NaN or inf entry in one gradient: whatever the method does to the rest, the entry it produces
# from it (a clipped gradient, or a parameter after a clipped update) is not finite.


def with_state_then(fault, call):
    """Run ``call`` on parameters whose state (gamma) comes from clean gradients, then with ``fault`` injected."""
    def run(ps, foreach):
        clean = [g.clone() for g in (p.grad for p in ps)]
        fault(ps)
        return call(ps, foreach, clean)
    return run


def adagc_after_clean(ps, foreach, clean, rule):
    clipper = gradclip.AdaGC(lambda_rel=1.0, warmup_steps=0, foreach=foreach) if rule == "adagc" else \
        gradclip.AdaGC.olmo(1.0, beta=0.9, foreach=foreach)
    gamma = torch.tensor([0.5 * exact_norm(g.double().reshape(-1).tolist()) for g in clean], dtype=torch.float64)
    clipper.load_state_dict({"config": clipper._config(), "steps": 1, "gamma": gamma})
    clipper(ps)
    return [p.grad for p in ps]


def stepped(ps, foreach, optimizer_class, rule):
    optimizer = optimizer_class(ps, lr=0.1, foreach=foreach)
    gradclip.UpdateClip(rule, d=0.5).attach(optimizer)
    optimizer.step()
    return [p.detach() for p in ps]


NONFINITE_CALLS = {
    "AdaGC(warm-up)": lambda ps, f, clean: (gradclip.AdaGC(lambda_abs=1.0, foreach=f)(ps), [p.grad for p in ps])[1],
    "AdaGC(per-tensor)": lambda ps, f, clean: adagc_after_clean(ps, f, clean, "adagc"),
    "AdaGC.olmo": lambda ps, f, clean: adagc_after_clean(ps, f, clean, "olmo"),
    "UpdateClip(adafactor, SGD)": lambda ps, f, clean: stepped(ps, f, torch.optim.SGD, "adafactor"),
    "UpdateClip(stable_adamw, Adam)": lambda ps, f, clean: stepped(ps, f, torch.optim.Adam, "stable_adamw"),
}


@pytest.mark.parametrize("path", ["default", "loop", "accelerator"])
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda v: str(v).replace("torch.", ""))
@pytest.mark.parametrize("method", list(NONFINITE_CALLS))
def test_a_non_finite_gradient_never_comes_out_finite(method, dtype, bad, path, monkeypatch):
    params = make(dtype, 1.0)

    def fault(ps):
        ps[0].grad[5] = bad

    out = with_state_then(fault, NONFINITE_CALLS[method])(params, on_path(params, path, monkeypatch))
    assert not torch.isfinite(out[0][5]), f"{method}: a {bad} gradient entry came out {float(out[0][5])}"
