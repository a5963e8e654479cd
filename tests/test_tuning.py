"""Threshold tuning (gradclip.tuning): suggest_threshold against numpy, clipped_fraction, should_lower_lr."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from support.sync import no_host_sync

from gradclip.result import ClipResult
from gradclip.tuning import clipped_fraction, should_lower_lr, suggest_threshold

NAN = float("nan")


@settings(max_examples=40, deadline=None)
@given(values=st.lists(st.floats(0.0, 1e6), min_size=1, max_size=200), q=st.floats(0.0, 1.0))
def test_suggest_threshold_is_numpys_linear_quantile(values, q):
    expected = np.quantile(np.array(values), q)
    assert math.isclose(float(suggest_threshold(values, q)), expected, rel_tol=1e-9, abs_tol=1e-9)
    tensor = suggest_threshold(torch.tensor(values, dtype=torch.float64), q)
    assert math.isclose(float(tensor), expected, rel_tol=1e-9, abs_tol=1e-9)


def test_clipped_fraction_and_lr_advice():
    results = [ClipResult(torch.tensor(n), torch.tensor(1.0), torch.clamp(1.0 / torch.tensor(n + 1e-6), max=1.0))
               for n in (0.5, 2.0, 3.0, 4.0)]
    assert float(clipped_fraction(results)) == 0.75
    assert bool(should_lower_lr(clipped_fraction(results)))
    assert float(clipped_fraction([0.5, 2.0, NAN, 0.1], threshold=1.0)) == 0.5  # NaN counts as clipped
    assert float(clipped_fraction(torch.tensor([True, False]))) == 0.5
    assert not bool(should_lower_lr(0.5)) and bool(should_lower_lr(0.51))
    assert not bool(should_lower_lr(torch.tensor(0.2)))
    assert math.isnan(float(suggest_threshold([1.0, NAN, 3.0])))  # NaN is not skipped
    norms = [r.norm for r in results]
    assert float(suggest_threshold(norms, q=0.5)) == pytest.approx(2.5)


# --- no host-device synchronisation ------------------------------------------------------------


def test_default_paths_never_read_a_value_on_the_host():
    with no_host_sync():
        history = torch.rand(50)
        suggest_threshold(history)
        should_lower_lr(clipped_fraction(history, 0.5))
    with pytest.raises(AssertionError, match="sync"), no_host_sync():
        float(history[0])  # the guard does catch a read


# --- bad input ------------------------------------------------------------------------------


def test_bad_arguments_raise_naming_them():
    for bad_q in (-0.1, 1.5):
        with pytest.raises(ValueError, match="q must"):
            suggest_threshold([1.0], bad_q)
    with pytest.raises(ValueError, match="empty"):
        suggest_threshold([])
    with pytest.raises(ValueError, match="1-D"):
        suggest_threshold(torch.ones(2, 2))
    with pytest.raises(TypeError, match="norm_history"):
        suggest_threshold("1,2")
    with pytest.raises(ValueError, match="threshold is required"):
        clipped_fraction([1.0, 2.0])
    with pytest.raises(ValueError, match="limit"):
        should_lower_lr(0.3, limit=1.0)
    with pytest.raises(ValueError, match="fraction"):
        should_lower_lr(1.5)


def test_clip_results_feed_the_tuning_helpers_and_export_plain_values():
    import gradclip
    results = []
    for g in ([3.0, 4.0], [0.3, 0.4], [6.0, 8.0], [0.6, 0.8]):
        w = torch.nn.Parameter(torch.zeros(2))
        w.grad = torch.tensor(g)
        results.append(gradclip.clip_grad_norm_report_([w], 2.0))
    torch.testing.assert_close(gradclip.suggest_threshold(results, q=0.5),
                               gradclip.suggest_threshold([5.0, 0.5, 10.0, 1.0], q=0.5).float())
    rows = [r.to_dict() for r in results]
    assert rows[0] == {"norm": 5.0, "threshold": 2.0, "scale": pytest.approx(2.0 / (5.0 + 1e-6)), "clipped": True,
                       "post_norm": pytest.approx(2.0, rel=1e-6)}
    assert [row["clipped"] for row in rows] == [True, False, True, False]
    assert all(type(v) in (float, bool) for row in rows for v in row.values())
