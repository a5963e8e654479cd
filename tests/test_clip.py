"""Global norm and value clipping (gradclip.clip) against torch.nn.utils itself, and where it deliberately differs."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from support.params import clone_params, make_params
from support.references import clip_by_norm, global_norm
from support.strategies import NORM_TYPES, seeds, shape_lists
from support.sync import forbid_sync, no_host_sync  # noqa: F401 (forbid_sync is a fixture)

import gradclip
from gradclip import clip_grad_norm_
from gradclip.clip import clip_grad_norm_report_
from gradclip.result import ClipResult

NAN = float("nan")


@settings(max_examples=60, deadline=None)
@given(
    shapes=shape_lists(max_side=7, max_tensors=12),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    norm_type=st.sampled_from(NORM_TYPES),
    max_norm=st.floats(0.0, 20.0),
    scale=st.sampled_from([1e-3, 1.0, 1e3]),
    foreach=st.sampled_from([None, True, False]),
    seed=seeds(),
)
def test_clip_grad_norm_matches_torch(shapes, dtype, norm_type, max_norm, scale, foreach, seed):
    ours = make_params(shapes, dtype, seed, grad_scale=scale)
    theirs = clone_params(ours)
    exact = global_norm([p.grad for p in ours], norm_type)  # float64 transcription
    norm = gradclip.clip_grad_norm_(ours, max_norm, norm_type, foreach=foreach)
    expected = torch.nn.utils.clip_grad_norm_(theirs, max_norm, norm_type, foreach=foreach)
    assert norm.dtype == expected.dtype and norm.device == expected.device
    # gradclip combines the per-tensor norms in float64, torch in the gradients' dtype: both are a few
    # roundings of that dtype from the exact norm (p < 1 amplifies rounding), so they agree to that.
    # On the CPU gradclip sums the small tensors in one pass (hundreds of values: up to 5 ulp from the
    # exact 1-norm, seen for float64 at seed 2545), torch tensor by tensor (3 ulp the other way there)
    ulp = torch.finfo(dtype).eps
    rtol = (32 if norm_type < 1 else 12) * ulp
    torch.testing.assert_close(norm, expected, rtol=rtol, atol=0)
    torch.testing.assert_close(norm.double(), exact, rtol=rtol, atol=0)
    for p, q in zip(ours, theirs):
        torch.testing.assert_close(p.grad, q.grad, rtol=rtol, atol=1e-12)


def test_clip_grads_with_norm_matches_torch():
    ours = make_params([(4, 3), (5,)], seed=3)
    theirs = clone_params(ours)
    total = gradclip.get_total_norm([p.grad for p in ours])
    gradclip.clip_grads_with_norm_(ours, 0.5, total)
    torch.nn.utils.clip_grads_with_norm_(theirs, 0.5, torch.nn.utils.get_total_norm([q.grad for q in theirs]))
    for p, q in zip(ours, theirs):
        torch.testing.assert_close(p.grad, q.grad)
    with pytest.raises(TypeError, match="total_norm"):
        gradclip.clip_grads_with_norm_(ours, 0.5, 3.0)


@pytest.mark.parametrize("foreach", [None, True, False])
def test_clip_grad_value_matches_torch_and_keeps_nan(foreach):
    ours = make_params([(6, 2), (9,)], seed=5, grad_scale=3.0)
    ours[1].grad[0] = float("nan")
    theirs = clone_params(ours)
    assert gradclip.clip_grad_value_(ours, 1.5, foreach=foreach) is None
    torch.nn.utils.clip_grad_value_(theirs, 1.5, foreach=foreach)
    for p, q in zip(ours, theirs):
        torch.testing.assert_close(p.grad, q.grad, equal_nan=True)
    assert torch.isnan(ours[1].grad[0])
    assert float(ours[0].grad.abs().max()) <= 1.5


def test_mixed_dtypes_promote_like_torch():
    ours = make_params([(3,)], torch.float32) + make_params([(4,)], torch.float64, seed=1)
    theirs = clone_params(ours)
    norm = gradclip.clip_grad_norm_(ours, 0.1)
    expected = torch.nn.utils.clip_grad_norm_(theirs, 0.1)
    assert norm.dtype == expected.dtype == torch.float64
    torch.testing.assert_close(norm, expected)


def test_parameters_without_grad_are_skipped_and_empty_input_gives_zero():
    params = make_params([(3,), (2,)])
    params.append(torch.nn.Parameter(torch.ones(4)))  # no .grad
    theirs = clone_params(params)
    torch.testing.assert_close(gradclip.clip_grad_norm_(params, 1.0), torch.nn.utils.clip_grad_norm_(theirs, 1.0))
    assert params[2].grad is None
    empty = gradclip.clip_grad_norm_([], 1.0)
    assert empty.device.type == "cpu" and empty.dtype == torch.float32 and float(empty) == 0.0
    no_grads = gradclip.clip_grad_norm_([torch.nn.Parameter(torch.ones(2))], 1.0)
    assert float(no_grads) == 0.0


def test_empty_generator_warns_like_torch():
    with pytest.warns(UserWarning, match="empty generator"):
        gradclip.clip_grad_norm_((p for p in []), 1.0)


def test_single_tensor_is_accepted():
    p = make_params([(5,)])[0]
    q = clone_params([p])[0]
    torch.testing.assert_close(gradclip.clip_grad_norm_(p, 0.3), torch.nn.utils.clip_grad_norm_(q, 0.3))
    torch.testing.assert_close(p.grad, q.grad)


# --- where torch is silently wrong ---------------------------------------------------------


def test_fp16_norm_above_65504_is_right_where_torch_zeroes_everything():
    values = torch.tensor([60000.0, 60000.0], dtype=torch.float16)
    ours = torch.nn.Parameter(torch.zeros(2, dtype=torch.float16))
    ours.grad = values.clone()
    theirs = clone_params([ours])[0]

    torch_norm = torch.nn.utils.clip_grad_norm_([theirs], 1.0)
    assert torch.isinf(torch_norm) and torch_norm.dtype == torch.float16
    assert torch.equal(theirs.grad, torch.zeros(2, dtype=torch.float16))  # torch silently zeroed them

    norm = gradclip.clip_grad_norm_([ours], 1.0)
    assert norm.dtype == torch.float32
    assert math.isclose(float(norm), 60000 * math.sqrt(2), rel_tol=1e-6)
    expected = clip_by_norm([values], 1.0)[1][0].to(torch.float16)
    torch.testing.assert_close(ours.grad, expected, rtol=1e-3, atol=0)
    assert math.isclose(float(ours.grad.float().norm()), 1.0, rel_tol=2e-3)


def test_negative_max_norm_raises_where_torch_flips_the_gradient():
    p = make_params([(3,)], seed=2)[0]
    q = clone_params([p])[0]
    before = q.grad.clone()
    torch.nn.utils.clip_grad_norm_([q], -1.0)
    assert torch.all(torch.sign(q.grad) == -torch.sign(before))  # torch flipped the direction
    for bad in (-1.0, float("nan")):
        with pytest.raises(ValueError, match="max_norm"):
            gradclip.clip_grad_norm_([p], bad)
    with pytest.raises(ValueError, match="clip_value"):
        gradclip.clip_grad_value_([p], -0.5)
    with pytest.raises(ValueError, match="max_norm"):
        gradclip.clip_grad_norm_([p], "one")  # float("one") fails in torch too
    with pytest.raises(TypeError, match="max_norm"):
        gradclip.clip_grad_norm_([p], [1.0])
    assert torch.equal(p.grad, before)


def test_sparse_gradients_get_a_clear_error():
    p = torch.nn.Parameter(torch.zeros(4, 2))
    p.grad = torch.zeros(4, 2).to_sparse()
    with pytest.raises(TypeError, match="sparse|dense"):
        gradclip.clip_grad_norm_([p], 1.0)


def test_nonfinite_gradients_stay_nonfinite_as_in_torch():
    for bad in (float("inf"), float("nan")):
        ours = make_params([(3,), (2,)], seed=4)
        ours[0].grad[1] = bad
        theirs = clone_params(ours)
        norm = gradclip.clip_grad_norm_(ours, 1.0)
        expected = torch.nn.utils.clip_grad_norm_(theirs, 1.0)
        torch.testing.assert_close(norm, expected, equal_nan=True)
        for p, q in zip(ours, theirs):
            torch.testing.assert_close(p.grad, q.grad, equal_nan=True)
        assert not torch.isfinite(ours[0].grad[1])
        with pytest.raises(RuntimeError, match="non-finite"):
            gradclip.clip_grad_norm_(clone_params(theirs), 1.0, error_if_nonfinite=True)


def test_foreach_argument_is_checked():
    p = make_params([(3,)])[0]
    with pytest.raises(TypeError, match="foreach"):
        gradclip.clip_grad_norm_([p], 1.0, foreach="yes")


def test_non_tensor_parameter_is_named():
    with pytest.raises(TypeError, match=r"parameters\[1\]"):
        gradclip.clip_grad_norm_([torch.nn.Parameter(torch.ones(1)), 3.0], 1.0)


def test_bad_arguments_raise_naming_them():
    p = make_params([(3,)])[0]
    with pytest.raises(ValueError, match="max_norm"):
        clip_grad_norm_report_([p], NAN)


# --- clip_grad_norm_report_ -------------------------------------------------------------------


@settings(max_examples=30, deadline=None)
@given(shapes=shape_lists(), max_norm=st.floats(0.0, 10.0), seed=seeds())
def test_report_equals_clip_grad_norm_and_describes_it(shapes, max_norm, seed):
    ours = make_params(shapes, seed=seed)
    theirs = clone_params(ours)
    result = clip_grad_norm_report_(ours, max_norm)
    norm = clip_grad_norm_(theirs, max_norm)
    assert isinstance(result, ClipResult)
    assert torch.equal(result.norm, norm)
    for p, q in zip(ours, theirs):
        assert torch.equal(p.grad, q.grad)
    new_norm = torch.cat([p.grad.reshape(-1) for p in ours]).norm()
    torch.testing.assert_close(result.post_norm, new_norm, rtol=1e-5, atol=1e-7)
    assert bool(result.clipped) == (float(norm) + 1e-6 > max_norm)
    assert float(result.threshold) == pytest.approx(max_norm)
    assert result.norm.shape == result.scale.shape == result.threshold.shape == ()


# --- no host-device synchronisation ------------------------------------------------------------


def test_forbid_sync_fixture_can_fail(forbid_sync):
    with pytest.raises(AssertionError, match="synchronisation"):
        bool(torch.tensor(1.0) > 0)


@pytest.mark.parametrize("norm_type", [2.0, 1.0, math.inf, 3.0])
@pytest.mark.parametrize("foreach", [None, True, False])
def test_default_paths_never_sync(forbid_sync, norm_type, foreach):
    params = make_params([(3,)] * 20 + [(40, 40), (7,)], seed=1)
    params += make_params([(5,)], torch.float16, seed=2)
    gradclip.clip_grad_norm_(params, 0.5, norm_type, foreach=foreach)
    total = gradclip.get_total_norm([p.grad for p in params], norm_type, foreach=foreach)
    gradclip.clip_grads_with_norm_(params, 0.5, total, foreach=foreach)
    gradclip.clip_grad_value_(params, 0.1, foreach=foreach)
    gradclip.clip_grad_norm_(params, torch.tensor(0.5), norm_type)
    buffer = gradclip.GradBuffer(params)
    gradclip.clip_grad_norm_(params, 0.5, norm_type)
    buffer.zero_grad()


def test_default_paths_never_read_a_value_on_the_host():
    params = make_params([(4, 3), (3,), (2, 2, 2)], seed=9)
    with no_host_sync():
        clip_grad_norm_report_(params, 1.0)


def test_no_warning_on_ordinary_use():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        gradclip.clip_grad_norm_(make_params([(3,)]), 1.0)


# --- an iterator that yields nothing: a consumed model.parameters() -----------------------------
# torch warns only in clip_grad_norm_ and only for generators; a consumed filter/map object, or any
# empty iterator passed to get_total_norm, gives a norm of 0 in silence. gradclip warns for every
# single-use iterator, in every function, and says what to do.


def _consumed(kind, params):
    """An iterator of the kind a training loop hands over, already exhausted by an earlier loop."""
    made = {"generator": lambda: (p for p in params), "filter": lambda: filter(lambda p: p.requires_grad, params),
            "map": lambda: map(lambda p: p, params), "iter": lambda: iter(params)}[kind]()
    for _ in made:  # e.g. a finiteness check over the parameters
        pass
    return made


ITERATOR_KINDS = ["generator", "filter", "map", "iter"]
PARAMETER_FUNCTIONS = {
    "clip_grad_norm_": lambda ps: gradclip.clip_grad_norm_(ps, 1.0),
    "clip_grad_value_": lambda ps: gradclip.clip_grad_value_(ps, 1.0),
    "clip_grads_with_norm_": lambda ps: gradclip.clip_grads_with_norm_(ps, 1.0, torch.tensor(2.0)),
    "clip_grad_norm_report_": lambda ps: gradclip.clip_grad_norm_report_(ps, 1.0),
    "adaptive_clip_grad_": lambda ps: gradclip.adaptive_clip_grad_(ps),
    "soft_clip_grad_norm_": lambda ps: gradclip.soft_clip_grad_norm_(ps, 1.0),
    "clip_grad_norm_per_tensor_": lambda ps: gradclip.clip_grad_norm_per_tensor_(ps, 1.0),
    "sign_grad_": lambda ps: gradclip.sign_grad_(ps),
}


@pytest.mark.parametrize("kind", ITERATOR_KINDS)
@pytest.mark.parametrize("function", sorted(PARAMETER_FUNCTIONS))
def test_consumed_iterator_warns_in_every_function_and_points_at_the_caller(function, kind):
    params = make_params([(3,), (2, 2)])
    before = [p.grad.clone() for p in params]
    consumed = _consumed(kind, params)
    with pytest.warns(UserWarning, match=r"yielded no tensors") as record:
        PARAMETER_FUNCTIONS[function](consumed)
    message = str(record[0].message)
    named = "empty generator" if kind == "generator" else f"empty iterator ({type(consumed).__name__})"
    assert named in message and "list(model.parameters())" in message
    assert record[0].filename == __file__  # the caller's line, not a line inside gradclip or torch
    for param, grad in zip(params, before):  # nothing was touched
        torch.testing.assert_close(param.grad, grad, rtol=0, atol=0)


@pytest.mark.parametrize("kind", ITERATOR_KINDS)
def test_consumed_iterator_norm_is_zero_as_in_torch_with_the_warning(kind):
    params = make_params([(5,)], seed=3)
    with pytest.warns(UserWarning, match="yielded no tensors"):
        norm = gradclip.clip_grad_norm_(_consumed(kind, params), 0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = torch.nn.utils.clip_grad_norm_(_consumed(kind, clone_params(params)), 0.1)
    assert float(norm) == float(expected) == 0.0
    with pytest.warns(UserWarning, match="`tensors` yielded no tensors"):
        total = gradclip.get_total_norm(_consumed(kind, [p.grad for p in params]))
    assert float(total) == 0.0


def test_torch_is_silent_where_gradclip_warns():
    # the difference the README's table states, checked on torch itself
    params = make_params([(4,)], seed=4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert float(torch.nn.utils.clip_grad_norm_(_consumed("filter", params), 0.1)) == 0.0
        assert float(torch.nn.utils.get_total_norm(_consumed("generator", [p.grad for p in params]))) == 0.0
    with pytest.raises(RuntimeError):
        torch.nn.utils.clip_grad_value_(_consumed("map", params), 0.1)
    with pytest.warns(UserWarning, match="yielded no tensors"):
        assert gradclip.clip_grad_value_(_consumed("map", params), 0.1) is None


@pytest.mark.parametrize("clipper", [gradclip.AutoClip, gradclip.ZClip, gradclip.SpikeGuard])
def test_clippers_warn_then_say_the_parameters_were_consumed(clipper):
    params = make_params([(3,)], seed=5)
    with pytest.warns(UserWarning, match="yielded no tensors") as record:
        with pytest.raises(RuntimeError, match=r"no parameters: .*consumed earlier.*list\(model.parameters\(\)\)"):
            clipper()(_consumed("generator", params))
    assert record[0].filename == __file__
    with pytest.raises(RuntimeError, match="no parameters"):  # an empty list too (no warning: taken as meant)
        clipper()([])
    bare = torch.nn.Parameter(torch.zeros(2))  # parameters without gradients: the other message
    with pytest.raises(RuntimeError, match="no parameter has a gradient"):
        clipper()([bare])


@pytest.mark.parametrize("call,hint", [
    (lambda m: gradclip.clip_grad_norm_(m, 1.0), r"got Linear; pass model\.parameters\(\)"),
    (lambda m: gradclip.clip_grad_norm_(torch.nn.Sequential(m), 1.0), r"got Sequential; pass model\.parameters\(\)"),
    (lambda m: gradclip.clip_grad_norm_([m], 1.0), r"parameters\[0\] .*got Linear \(a module: pass model\.parameters\(\)\)"),
    (lambda m: gradclip.get_total_norm(m), r"pass the gradients, \[p\.grad for p in model\.parameters\(\)"),
    (lambda m: gradclip.AutoClip()(m), r"got Linear; pass model\.parameters\(\)"),
    (lambda m: gradclip.GradientMonitor(m.parameters()), r"pass the model itself or model\.named_parameters\(\)"),
])
def test_a_module_or_the_wrong_iterable_gets_a_hint_that_fits_the_function(call, hint):
    with pytest.raises(TypeError, match=hint):
        call(torch.nn.Linear(2, 2))


def test_autoclip_warns_when_its_percentile_looks_like_a_quantile():
    with pytest.warns(UserWarning, match=r"percentile=90") as record:
        gradclip.AutoClip(percentile=0.9)
    assert record[0].filename == __file__
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for percentile in (0.0, 1.5, 10.0, 100.0):
            gradclip.AutoClip(percentile=percentile)


def test_agc_exclude_consumed_warns_that_nothing_is_excluded():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    model(torch.ones(2, 3)).sum().backward()
    with pytest.warns(UserWarning, match="`exclude` yielded no tensors: .* nothing is excluded"):
        gradclip.adaptive_clip_grad_(model, exclude=_consumed("generator", list(model[1].parameters())))


@pytest.mark.parametrize("empty", [[], ()], ids=["list", "tuple"])
def test_empty_list_or_tuple_the_caller_built_does_not_warn(empty):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert float(gradclip.clip_grad_norm_(empty, 1.0)) == 0.0
        assert float(gradclip.get_total_norm(empty)) == 0.0
        gradclip.clip_grad_value_(empty, 1.0)


@pytest.mark.parametrize("kind", ITERATOR_KINDS)
def test_fresh_iterators_are_clipped_like_torch_without_a_warning_or_a_sync(kind):
    params = make_params([(3,), (4, 2)], seed=6)
    theirs = clone_params(params)
    fresh = {"generator": lambda ps: (p for p in ps), "filter": lambda ps: filter(lambda p: p.requires_grad, ps),
             "map": lambda ps: map(lambda p: p, ps), "iter": iter}[kind]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with no_host_sync():
            norm = gradclip.clip_grad_norm_(fresh(params), 0.1)
    torch.testing.assert_close(norm, torch.nn.utils.clip_grad_norm_(fresh(theirs), 0.1))
    for ours, reference in zip(params, theirs):
        torch.testing.assert_close(ours.grad, reference.grad)


# --- the plan kept between calls (gradclip._groups) never answers for gradients that changed ----------------


def _check_against_torch(ours, max_norm=0.5):
    theirs = clone_params(ours)
    norm = gradclip.clip_grad_norm_(ours, max_norm)
    torch.testing.assert_close(norm, torch.nn.utils.clip_grad_norm_(theirs, max_norm), rtol=2e-6, atol=0)
    for p, q in zip(ours, theirs):
        assert (p.grad is None) == (q.grad is None)
        if p.grad is not None:
            assert p.grad.dtype == q.grad.dtype and p.grad.shape == q.grad.shape
            torch.testing.assert_close(p.grad, q.grad, rtol=2e-6, atol=0)


@pytest.mark.parametrize("change", ["new objects", "None", "dtype", "shape", "resized in place", "requires_grad",
                                    "a parameter added", "layout"])
def test_a_kept_plan_is_never_used_for_gradients_that_changed(change):
    gradclip._groups.forget_plans()
    shapes = [(300,), (20, 30), (5,), (7, 3)]  # large and small (the CPU's concatenated) tensors
    params = make_params(shapes, seed=3)
    for _ in range(2):  # the second call takes the kept plan
        _check_against_torch(params)
    generator = torch.Generator().manual_seed(4)
    if change == "new objects":  # zero_grad()'s default: same type, dtype, device, shape
        for p in params:
            p.grad = torch.randn(p.shape, generator=generator)
    elif change == "None":
        params[1].grad = None
    elif change == "dtype":
        params[0].data = params[0].data.double()
        params[0].grad = torch.randn(300, generator=generator, dtype=torch.float64)
    elif change == "shape":
        params[2].data = torch.zeros(400)  # a small tensor becomes a large one
        params[2].grad = torch.randn(400, generator=generator)
    elif change == "resized in place":  # the same gradient object: the kept plan is used, and must still hold
        params[0].grad.resize_(2).copy_(torch.tensor([30.0, 40.0]))
        params[0].data = params[0].data[:2].clone()
    elif change == "requires_grad":  # torch still clips a frozen parameter's leftover gradient, and so do we
        params[3].requires_grad_(False)
    elif change == "a parameter added":
        params = params + make_params([(6,)], seed=5)
    elif change == "layout":
        params[1].grad = params[1].grad.to_sparse()
        with pytest.raises(TypeError, match=r"parameters\[1\]\.grad"):
            gradclip.clip_grad_norm_(params, 0.5)
        return
    _check_against_torch(params)
    _check_against_torch(params)


def test_kept_plans_hold_no_gradient_alive():
    import gc
    import weakref

    params = make_params([(30,), (4, 5)], seed=1)
    gradclip.clip_grad_norm_(params, 0.5)
    gradclip.clip_grad_norm_(params, 0.5)
    grads = [weakref.ref(p.grad) for p in params]
    for p in params:
        p.grad = None
    gc.collect()
    assert all(ref() is None for ref in grads), "a kept plan holds a gradient"
