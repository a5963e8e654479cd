"""The docstring examples of the method modules run and print what they show."""

from __future__ import annotations

import doctest

import pytest

import gradclip
from gradclip import agc, layerwise, monitoring, per_sample, quantize, soft

MODULES = [agc, layerwise, soft, quantize, per_sample, monitoring]

# The public names of these modules, as gradclip/__init__.py exports them.
EXPORTS = {
    "adaptive_clip_grad_": agc.adaptive_clip_grad_,
    "agc_parameters": agc.agc_parameters,
    "agc_unit_dims": agc.agc_unit_dims,
    "UnitSpec": agc.UnitSpec,
    "clip_grad_norm_per_tensor_": layerwise.clip_grad_norm_per_tensor_,
    "clip_grad_block_rms_": layerwise.clip_grad_block_rms_,
    "soft_clip_grad_norm_": soft.soft_clip_grad_norm_,
    "soft_clip_grad_value_": soft.soft_clip_grad_value_,
    "sign_grad_": quantize.sign_grad_,
    "qsgd_quantize_grad_": quantize.qsgd_quantize_grad_,
    "per_sample_grads": per_sample.per_sample_grads,
    "per_sample_clipped_grad": per_sample.per_sample_clipped_grad,
    "per_sample_clip_grad_": per_sample.per_sample_clip_grad_,
    "PerSampleClipResult": per_sample.PerSampleClipResult,
    "clip_grad_norm_report_": monitoring.clip_grad_norm_report_,
    "suggest_threshold": monitoring.suggest_threshold,
    "clipped_fraction": monitoring.clipped_fraction,
    "should_lower_lr": monitoring.should_lower_lr,
}


@pytest.mark.parametrize("module", MODULES, ids=lambda m: m.__name__)
def test_docstring_examples_run(module, monkeypatch):
    for name, obj in EXPORTS.items():
        if hasattr(gradclip, name):
            assert getattr(gradclip, name) is obj, f"gradclip.{name} is not {module.__name__}'s"
        else:
            monkeypatch.setattr(gradclip, name, obj, raising=False)
    runner = doctest.DocTestRunner(optionflags=doctest.NORMALIZE_WHITESPACE)
    tests = [t for t in doctest.DocTestFinder().find(module) if t.examples]
    assert tests, f"{module.__name__} has no examples"
    for test in tests:
        runner.run(test)
    assert runner.failures == 0


@pytest.mark.parametrize("name", sorted(EXPORTS))
def test_every_public_function_has_a_documented_example(name):
    doc = EXPORTS[name].__doc__ or ""
    assert "Example" in doc or isinstance(EXPORTS[name], type), name
    if not isinstance(EXPORTS[name], type):
        assert "Args:" in doc or "Returns:" in doc, name
        assert "arxiv.org" in doc or "Playbook" in doc or "gradclip.clip_grad_norm_" in doc or "per_sample_clipped_grad" in doc, name
