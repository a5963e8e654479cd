"""The bug zoo: every bug's symptom is there in the buggy code and gone in the fixed code.

The references are computed here, independently of the module: the true
gradient by autograd on a fresh copy of the model, the norm by hand in float64,
clipping by ``torch.nn.utils.clip_grad_norm_`` on a copy, the micro-batch and
AGC arithmetic by a plain transcription of what the code is meant to do.
"""

from __future__ import annotations

import inspect
import math
import re

import pytest
import torch
import torch.nn.functional as F

import gradclip
from gradclip_book import bugzoo
from gradclip_book.data import digits

C = bugzoo.MAX_NORM
REQUIRED = {"after_step", "before_backward", "amp_scaled", "micro_batch", "generator", "per_group", "closure",
            "fsdp_local_norm", "agc_axis"}


@pytest.fixture(scope="module")
def measured():
    """Every bug's ``measure()``, run once for the module (the FSDP one spawns two processes)."""
    return {entry.name: entry.measure() for entry in bugzoo.BUGS}


def gradients_by_hand(micro_batches=1):
    """The full-batch loss's gradient at the starting weights, per parameter, split by micro-batch if asked."""
    x, y = digits(samples=bugzoo.SAMPLES)
    model = bugzoo.tiny_mlp()
    parts = []
    for xs, ys in zip(x.chunk(micro_batches), y.chunk(micro_batches)):
        parts.append(torch.autograd.grad(F.cross_entropy(model(xs), ys) / micro_batches, list(model.parameters())))
    return parts


def flat(tensors):
    return torch.cat([t.reshape(-1) for t in tensors])


def norm_by_hand(vector):
    return math.sqrt(sum(float(v) ** 2 for v in vector.double()))


def torch_clipped_norm(grads, max_norm):
    """The norm torch's clip_grad_norm_ leaves on a copy of ``grads``."""
    params = [torch.nn.Parameter(torch.zeros_like(g)) for g in grads]
    for param, grad in zip(params, grads):
        param.grad = grad.clone()
    torch.nn.utils.clip_grad_norm_(params, max_norm)
    return float(flat([p.grad for p in params]).norm())


@pytest.fixture(scope="module")
def truth():
    grads = gradients_by_hand()[0]
    return {"grads": grads, "norm": norm_by_hand(flat(grads)), "clipped": torch_clipped_norm(grads, C)}


# --- the table ----------------------------------------------------------------------------------


def test_the_table_has_every_required_bug_once_with_a_citation_and_short_code():
    names = [entry.name for entry in bugzoo.BUGS]
    assert len(names) == len(set(names)) >= 9 and REQUIRED <= set(names)
    for entry in bugzoo.BUGS:
        assert entry.citation.url == f"https://github.com/{entry.citation.repo}/{entry.citation.kind}/{entry.citation.number}"
        assert entry.citation.kind in ("issues", "pull") and "/" in entry.citation.repo
        assert entry.description and entry.title
        for code in (entry.buggy, entry.fixed):  # short enough to print in the book
            assert len(inspect.getsource(code).splitlines()) <= 12, code.__name__
        assert entry.caught_by is not None or entry.uncaught_reason, entry.name
        if entry.caught_by is not None and entry.caught_by.fires is None:
            assert entry.uncaught_reason, f"{entry.name}: prevented only, but no reason it cannot be detected"


def test_bug_lookup_names_the_choices():
    assert bugzoo.bug("closure").citation.repo == "Lightning-AI/pytorch-lightning"
    with pytest.raises(KeyError, match="after_step"):
        bugzoo.bug("no such bug")


# --- step-level bugs: the gradient the update used ----------------------------------------------


@pytest.mark.parametrize("name", ["after_step", "before_backward", "generator", "closure"])
def test_unclipped_bugs_apply_the_raw_gradient_and_the_fix_clips_it(measured, truth, name):
    numbers = measured[name]
    assert numbers["true_norm"] == pytest.approx(truth["norm"], rel=1e-12)
    assert truth["norm"] > 3 * C  # the setting clips: otherwise the bug would be invisible
    assert numbers["buggy"]["applied_norm"] == pytest.approx(truth["norm"], rel=1e-9)  # no clipping at all
    assert numbers["fixed"]["applied_norm"] == pytest.approx(truth["clipped"], rel=1e-9)
    assert numbers["fixed"]["applied_norm"] <= C
    assert numbers["buggy"]["loss_after"] < numbers["fixed"]["loss_after"]  # the raw step is 3.7x longer


def test_generator_bug_is_what_torch_warns_about_in_its_own_words(measured):
    numbers = measured["generator"]
    assert any("empty generator" in message for message in numbers["buggy"]["torch_warnings"])
    assert numbers["fixed"]["torch_warnings"] == []


def test_amp_bug_clips_at_max_norm_over_the_scale_and_training_stalls(measured, truth):
    numbers = measured["amp_scaled"]
    assert numbers["scale"] == 2.0**16
    # the scaled gradient (norm 65536 * true) is clipped to C, then unscaled: C / 65536 in true units
    assert numbers["buggy"]["applied_norm"] == pytest.approx(C / numbers["scale"], rel=1e-6)
    assert numbers["fixed"]["applied_norm"] == pytest.approx(truth["clipped"], rel=1e-9)
    buggy_curve, fixed_curve = numbers["buggy"]["loss_curve"], numbers["fixed"]["loss_curve"]
    assert max(buggy_curve) - min(buggy_curve) < 1e-4 < numbers["loss_before"] - fixed_curve[-1]
    assert fixed_curve[-1] < fixed_curve[0] - 0.1


def test_per_group_clipping_lets_the_whole_gradient_reach_sqrt_groups_times_max_norm(measured, truth):
    grads = truth["grads"]
    group_norms = [norm_by_hand(flat(grads[:2])), norm_by_hand(flat(grads[2:]))]  # layer 1, layer 2
    expected = math.sqrt(sum(torch_clipped_norm([torch.tensor([n], dtype=torch.float64)], C) ** 2 for n in group_norms))
    numbers = measured["per_group"]
    assert min(group_norms) > C  # both groups clip, so the total is sqrt(2) * C
    assert numbers["buggy"]["applied_norm"] == pytest.approx(expected, rel=1e-9)
    assert numbers["buggy"]["applied_norm"] == pytest.approx(math.sqrt(2) * C, rel=1e-4)
    assert numbers["buggy"]["cosine"] < 0.999  # the groups got different factors
    assert numbers["fixed"]["applied_norm"] == pytest.approx(truth["clipped"], rel=1e-9)


def running_sum_weights(micro, max_norm):
    """What clipping the accumulating gradient after every micro-batch does to each micro-batch's weight."""
    weights, running = [], torch.zeros_like(micro[0])
    for index, gradient in enumerate(micro):
        running, weights = running + gradient, weights + [1.0]
        factor = min(1.0, max_norm / (norm_by_hand(running) + 1e-6))  # torch's clip coefficient
        running, weights = running * factor, [w * factor for w in weights]
    return weights


def test_micro_batch_clipping_weights_the_last_micro_batch_most(measured, truth):
    micro = [flat(part) for part in gradients_by_hand(bugzoo.MICRO_BATCHES)]
    numbers = measured["micro_batch"]
    expected = running_sum_weights(micro, C)
    assert numbers["buggy"]["micro_batch_weights"] == pytest.approx(expected, rel=1e-6)
    assert expected[-1] > 3 * expected[0]
    fixed = numbers["fixed"]["micro_batch_weights"]
    assert fixed == pytest.approx([truth["clipped"] / truth["norm"]] * bugzoo.MICRO_BATCHES, rel=1e-6)
    # the norm is capped either way (the last clip sees to it): only the direction shows the bug
    assert numbers["buggy"]["applied_norm"] == pytest.approx(C, rel=1e-4)
    assert numbers["buggy"]["cosine"] < 0.99 and numbers["fixed"]["cosine"] == pytest.approx(1.0, abs=1e-12)


def test_negative_threshold_flips_the_gradient_and_climbs_the_loss(measured, truth):
    numbers = measured["negative_threshold"]
    threshold = bugzoo.BASE_NORM * (1 - bugzoo.LATE_STEP / bugzoo.SCHEDULE_STEPS)
    assert numbers["threshold"] == pytest.approx(threshold) and threshold < 0
    assert numbers["buggy"]["cosine"] == pytest.approx(-1.0, abs=1e-12)
    assert numbers["buggy"]["applied_norm"] == pytest.approx(-threshold * truth["norm"] / (truth["norm"] + 1e-6))
    assert numbers["buggy"]["loss_after"] > numbers["loss_before"] > numbers["fixed"]["loss_after"]
    assert numbers["fixed"]["cosine"] == pytest.approx(1.0, abs=1e-12)


# --- FSDP on two gloo processes -----------------------------------------------------------------


def test_fsdp_local_norms_are_the_halves_and_the_fix_and_gradclip_use_the_global_one(measured, truth):
    numbers = measured["fsdp_local_norm"]
    halves = flat(truth["grads"]).tensor_split(bugzoo.RANKS)
    local = [norm_by_hand(half) for half in halves]
    assert numbers["buggy"]["norm_per_rank"] == pytest.approx(local, rel=1e-9)
    assert max(local) < truth["norm"]
    expected_applied = math.sqrt(sum(torch_clipped_norm([half], C) ** 2 for half in halves))
    assert numbers["buggy"]["applied_norm"] == pytest.approx(expected_applied, rel=1e-9)
    assert numbers["buggy"]["applied_norm"] > C * 1.3
    for name in ("fixed", "gradclip"):  # gradclip: DTensor gradients, no hand-written all-reduce
        assert numbers[name]["norm_per_rank"] == pytest.approx([truth["norm"]] * bugzoo.RANKS, rel=1e-9)
        assert numbers[name]["applied_norm"] == pytest.approx(truth["clipped"], rel=1e-9)
        assert numbers[name]["cosine"] == pytest.approx(1.0, abs=1e-12)


# --- AGC ---------------------------------------------------------------------------------------


def agc_by_hand(weight, grad, factor, eps):
    """Brock et al.'s rule, one output row at a time, in plain Python."""
    rows = []
    for w_row, g_row in zip(weight.tolist(), grad.tolist()):
        w_norm = max(math.sqrt(sum(v * v for v in w_row)), eps)
        g_norm = math.sqrt(sum(v * v for v in g_row))
        scale = factor * w_norm / max(g_norm, 1e-6) if g_norm > factor * w_norm else 1.0
        rows.append([v * scale for v in g_row])
    return torch.tensor(rows, dtype=torch.float64)


def test_agc_on_the_wrong_axis_lets_a_unit_through_and_shrinks_quiet_ones(measured):
    numbers = measured["agc_axis"]
    layer = bugzoo.agc_layer()
    expected = agc_by_hand(layer.weight.detach(), layer.weight.grad, bugzoo.AGC_FACTOR, bugzoo.AGC_EPS)
    torch.testing.assert_close(numbers["fixed"]["gradient"], expected)
    torch.testing.assert_close(numbers["gradclip"]["gradient"], expected)  # gradclip reads the axis from Linear
    assert numbers["buggy"]["max_ratio"] > 10 * bugzoo.AGC_FACTOR
    assert numbers["fixed"]["max_ratio"] <= bugzoo.AGC_FACTOR * (1 + 1e-9)
    assert numbers["fixed"]["unit_factors"][1:] == [1.0, 1.0]  # the quiet units are left alone...
    assert max(numbers["buggy"]["unit_factors"][1:]) < 0.5  # ...unless the units are columns
    assert gradclip.agc_unit_dims(layer)[layer.weight] == gradclip.UnitSpec(0)


# --- what gradclip catches ----------------------------------------------------------------------

MESSAGES = {
    "after_step": "GradientMonitor: the step used a gradient of norm",
    "closure": "GradientMonitor: the step used a gradient of norm",
    "per_group": "GradientMonitor: the step used a gradient of norm",
    "before_backward": "no parameter has a gradient",
    "amp_scaled": r"scaler\.unscale_\(optimizer\)",
    "generator": r"yielded no tensors: .*list\(model\.parameters\(\)\)",
    "negative_threshold": r"max_norm must be a number in \[0, inf\]",
}


@pytest.mark.parametrize("name", sorted(MESSAGES))
def test_the_gradclip_check_fires_on_the_buggy_code_and_not_on_the_fix(name):
    entry = bugzoo.bug(name)
    message = entry.caught_by.fires(entry.buggy)
    assert message is not None
    assert re.search(MESSAGES[name], message), message
    assert entry.caught_by.fires(entry.fixed) is None


def test_every_detecting_check_is_tested_above():
    detecting = {entry.name for entry in bugzoo.BUGS if entry.caught_by is not None and entry.caught_by.fires}
    assert detecting == set(MESSAGES)


def test_monitor_reads_the_norm_the_step_used(measured):
    # the monitor's number is the applied norm the update shows, for the buggy step
    message = bugzoo.bug("after_step").caught_by.fires(bugzoo.after_step_buggy)
    assert f"{measured['after_step']['buggy']['applied_norm']:.4g}" in message


def test_an_attached_clipper_runs_once_per_accumulated_step_on_the_whole_gradient(measured, truth):
    attached = measured["micro_batch"]["attached_clipper"]
    assert attached["calls"] == 1
    assert attached["norm_seen"] == pytest.approx(truth["norm"], rel=1e-9)


def test_gradclip_drop_in_reproduces_the_same_bug_numbers():
    # the zoo's symptoms are torch's semantics: gradclip's clip_grad_norm_ gives the same updates
    for step in (bugzoo.per_group_buggy, bugzoo.micro_batch_buggy, bugzoo.after_step_fixed):
        ours = bugzoo._step_numbers(step, groups=step is bugzoo.per_group_buggy, clip=gradclip.clip_grad_norm_)
        theirs = bugzoo._step_numbers(step, groups=step is bugzoo.per_group_buggy)
        assert ours == pytest.approx(theirs, rel=1e-9)


# --- what gradclip does by default and once opted in (the table's two columns) -----------------

STEP_LEVEL = ["after_step", "before_backward", "micro_batch", "generator", "per_group", "closure"]


def _default_outcome(entry):
    """What the buggy code does when its clipping call is gradclip's drop-in: 'raises', 'warns' or 'silent'."""
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            if entry.name == "negative_threshold":
                bugzoo._negative_step(entry.buggy, clip=gradclip.clip_grad_norm_)
            else:
                bugzoo._step_numbers(entry.buggy, groups=entry.name == "per_group", scaler=entry.name == "amp_scaled",
                                     clip=gradclip.clip_grad_norm_)
        except (ValueError, RuntimeError):
            return "raises"
    return "warns" if any(issubclass(w.category, UserWarning) for w in caught) else "silent"


@pytest.mark.parametrize("name", STEP_LEVEL + ["amp_scaled", "negative_threshold"])
def test_the_default_column_is_what_the_drop_in_does_on_the_buggy_code(name):
    entry = bugzoo.bug(name)
    assert _default_outcome(entry) == entry.caught_by.default


def test_the_logs_column_is_where_an_attached_monitor_reads_a_norm_above_max_norm():
    fires = {name for name in STEP_LEVEL if bugzoo._monitor_fires(groups=name == "per_group")(bugzoo.bug(name).buggy)}
    assert fires == set(bugzoo.response_counts()["logs"])
    assert "amp_scaled" not in fires  # the step there used a gradient far below max_norm


def test_response_counts_partition_the_bugs_by_default():
    counts = bugzoo.response_counts()
    defaults = ["raises", "warns", "prevents", "silent"]
    assert sorted(n for key in defaults for n in counts[key]) == sorted(b.name for b in bugzoo.BUGS)
    assert set(counts["caught_by_default"]) | set(counts["opt_in_only"]) == {b.name for b in bugzoo.BUGS}
    assert counts["raises_opt_in"] == ["before_backward", "amp_scaled"]
    with pytest.raises(ValueError, match="default must be"):
        bugzoo.Catch("x", default="flags")
