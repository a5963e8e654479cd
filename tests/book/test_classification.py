"""Chapter 4's harness (gradclip_book.classification) and its precomputed grid (gradclip_book.grids)."""

from __future__ import annotations

import math
import random
from dataclasses import replace

import numpy as np
import pytest
import torch

import gradclip
from gradclip_book import grids
from gradclip_book.reproducibility import rerun_differences
from gradclip_book.classification import (
    DEFAULT, METHODS, RunConfig, build_model, code_version, compact, config_key, train,
)
from gradclip_book.data import digits, digits_split

GRID_HINT = f"recompute it with `{grids.COMMAND}` (then update chapters/data/README.md)"


# --- data ------------------------------------------------------------------------------------------


def test_split_is_stratified_and_covers_every_image_once():
    parts = digits_split(seed=0)
    _, labels = digits()
    overall = np.bincount(labels.numpy(), minlength=10) / len(labels)
    sizes = {k: len(v[1]) for k, v in parts.items()}
    assert sum(sizes.values()) == len(labels) == 1797
    for name, (x, y) in parts.items():
        share = np.bincount(y.numpy(), minlength=10) / len(y)
        # stratified: each class within one image of its overall share
        assert np.all(np.abs(share - overall) * len(y) <= 1.0 + 1e-9), name


def test_standardised_with_training_statistics_only():
    from sklearn.model_selection import train_test_split

    parts = digits_split(seed=3)
    x, y = digits()
    x, y = x.numpy(), y.numpy()
    x_rest, x_test, y_rest, y_test = train_test_split(x, y, test_size=0.2, stratify=y, random_state=3)
    x_train, _, _, _ = train_test_split(x_rest, y_rest, test_size=0.25, stratify=y_rest, random_state=3)
    mean, std = x_train.mean(0), np.maximum(x_train.std(0), 1 / 16)
    np.testing.assert_allclose(parts["test"][0].numpy(), (x_test - mean) / std, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(parts["test"][1].numpy(), y_test)
    # the training part is standardised; the test part is not standardised by its own statistics
    assert np.abs(parts["train"][0].numpy().mean(0)).max() < 1e-5
    test_mean, test_std = x_test.mean(0), np.maximum(x_test.std(0), 1 / 16)
    assert not np.allclose(parts["test"][0].numpy(), (x_test - test_mean) / test_std, atol=1e-3)
    assert np.isfinite(parts["test"][0].numpy()).all()


# --- runs ------------------------------------------------------------------------------------------


def test_models_have_no_normalisation_and_the_requested_depth():
    for kind, linear in (("mlp", torch.nn.Linear), ("cnn", torch.nn.Conv2d)):
        model = build_model(RunConfig(model=kind, depth=5, width=8))
        assert sum(isinstance(m, linear) for m in model.modules()) == 5 + (kind == "mlp")
        assert not any("Norm" in type(m).__name__ for m in model.modules())
        assert tuple(model(torch.zeros(3, 64)).shape) == (3, 10)


def test_same_config_same_numbers():
    config = replace(DEFAULT, depth=4, steps=60, method="autoclip", threshold=25.0, seed=7)
    a, b = train(config), train(config)
    assert a.loss == b.loss and a.grad_norm == b.grad_norm and a.clipped == b.clipped
    assert (a.val_accuracy, a.test_accuracy) == (b.val_accuracy, b.test_accuracy)
    c = train(replace(config, seed=8))
    assert c.loss != a.loss


def test_a_diverged_run_is_recorded_not_raised():
    record = train(replace(grids.HARD, steps=100))
    assert record.diverged_at is not None and record.diverged
    assert record.steps_run == record.diverged_at == len(record.loss) - 1 == len(record.grad_norm)
    assert not (record.loss[-1] <= 1e3)
    assert record.val_accuracy is None and record.test_accuracy is None
    line = compact(record)
    assert line["diverged_at"] == record.diverged_at and line["test_accuracy"] is None


def test_compact_curves_are_short_and_keep_the_raw_length():
    record = train(replace(DEFAULT, depth=2, steps=400))
    line = compact(record)
    assert line["steps_run"] == 400 and len(line["loss"]) == len(line["grad_norm"]) == 150
    assert line["curve_step"][0] == 0 and line["curve_step"][-1] < 400
    assert line["grad_norm"][0] == pytest.approx(max(record.grad_norm[:3]), rel=1e-4)


def _grads(seed: int = 0):
    """A model and its gradients on one batch (a fresh backward each call)."""
    model = build_model(RunConfig(depth=3, width=16, seed=seed))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = digits_split()["train"]
    torch.nn.functional.cross_entropy(model(x[:64]), y[:64]).backward()
    return model, optimizer


def _norm(model):
    return float(gradclip.get_total_norm([p.grad for p in model.parameters()]))


def test_norm_clipping_caps_the_post_clip_norm():
    model, optimizer = _grads()
    before = _norm(model)
    clip = METHODS["norm"].build(model, optimizer, before / 4)
    clip()
    norm, fired = clip.report()
    assert float(norm) == pytest.approx(before) and bool(fired)
    assert _norm(model) == pytest.approx(before / 4, rel=1e-4)


def test_value_clipping_caps_every_entry():
    model, optimizer = _grads()
    clip = METHODS["value"].build(model, optimizer, 1e-3)
    clip()
    assert bool(clip.report()[1])
    assert max(float(p.grad.abs().max()) for p in model.parameters()) == pytest.approx(1e-3)


def test_agc_leaves_the_head_alone():
    model, optimizer = _grads()
    head = [p.grad.clone() for p in model[-1].parameters()]
    body = [p.grad.clone() for p in model[0].parameters()]
    clip = METHODS["agc"].build(model, optimizer, 1e-4)
    clip()
    assert bool(clip.report()[1])
    assert all(torch.equal(a, p.grad) for a, p in zip(head, model[-1].parameters()))
    assert all(p.grad.norm() < a.norm() for a, p in zip(body, model[0].parameters()))


def test_soft_clipping_scales_by_c_over_norm_plus_c():
    model, optimizer = _grads()
    before = _norm(model)
    clip = METHODS["soft"].build(model, optimizer, 1.0)
    clip()
    assert _norm(model) == pytest.approx(before / (before + 1.0), rel=1e-4)


def test_spike_guard_is_attached_to_the_optimizer():
    model, optimizer = _grads()
    clip = METHODS["spike-guard"].build(model, optimizer, 3.0)
    assert isinstance(clip.clipper, gradclip.SpikeGuard)
    for p in model.parameters():
        p.grad = torch.full_like(p, math.nan)
    clip()
    before = [p.detach().clone() for p in model.parameters()]
    optimizer.step()  # a non-finite gradient: the attached guard skips the step
    assert bool(clip.report()[1])
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_fires_at_a_strict_threshold_and_records_norms(method):
    strict = {"none": None, "value": 1e-4, "norm": 1e-3, "agc": 1e-4, "autoclip": 10.0, "zclip": 0.1,
              "soft": 1e-3, "spike-guard": 0.01}
    assert set(strict) == set(METHODS)
    record = train(replace(DEFAULT, depth=3, steps=60, method=method, threshold=strict[method]))
    assert record.steps_run == 60 and len(record.grad_norm) == 60 and all(n > 0 for n in record.grad_norm)
    assert (record.clip_fraction > 0) == (method != "none")


def test_config_rejects_a_threshold_for_none_and_unknown_names():
    with pytest.raises(ValueError):
        RunConfig(method="none", threshold=1.0)
    with pytest.raises(ValueError):
        RunConfig(method="norm")
    with pytest.raises(ValueError):
        RunConfig(method="clip-everything", threshold=1.0)


# --- the precomputed grid --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def grid_lines():
    lines = grids.load(grids.CLASSIFICATION_FILE)
    assert lines, f"{grids.CLASSIFICATION_FILE} is missing: {GRID_HINT}"
    return lines


def test_grid_was_computed_by_the_current_harness(grid_lines):
    versions = {line["code_version"] for line in grid_lines}
    assert versions == {code_version()}, (
        f"the grid was computed by harness version(s) {sorted(versions)}, the harness is now {code_version()}: "
        f"{GRID_HINT}")


def test_grid_is_complete(grid_lines):
    wanted = {config_key(c) for _, c in grids.classification_configs()}
    stored = {line["key"] for line in grid_lines}
    assert wanted <= stored, f"{len(wanted - stored)} runs missing from the grid: {GRID_HINT}"
    for line in grid_lines:
        assert line["key"] == config_key(RunConfig(**line["config"]))
        assert len(line["loss"]) <= 150


def test_grid_records_match_a_rerun(grid_lines):
    rng = random.Random(20240601)
    cheap = [line for line in grid_lines if line["section"] == "grid" and line["config"]["depth"] <= 8]
    for line in rng.sample(cheap, 3):
        fresh = compact(train(RunConfig(**line["config"])))
        # every field bit for bit on the grid's kind of machine, the first steps elsewhere (reproducibility)
        assert not rerun_differences(fresh, line), (rerun_differences(fresh, line)[:5], line["config"], GRID_HINT)


def test_headline_hard_setting(grid_lines):
    """At the hard setting unclipped SGD diverges for every seed and norm clipping trains every seed to >= 90%."""
    head = [line for line in grid_lines if line["section"] == "headline"]
    plain = [line for line in head if line["config"]["method"] == "none"]
    clipped = [line for line in head if line["config"]["method"] == "norm"
               and line["config"]["threshold"] == grids.HARD_THRESHOLD]
    assert len(plain) >= 3 and len(clipped) >= 3
    assert all(line["diverged_at"] is not None for line in plain)
    assert all(line["diverged_at"] is None and line["test_accuracy"] >= 0.9 for line in clipped)


def test_readme_states_the_command_and_the_format():
    text = (grids.CLASSIFICATION_FILE.parent / "README.md").read_text(encoding="utf-8")
    assert grids.COMMAND in text and grids.CLASSIFICATION_FILE.name in text
