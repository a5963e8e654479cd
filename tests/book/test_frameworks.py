"""gradclip_book.frameworks: gradclip inside Lightning and Accelerate, run for a few real steps on the CPU.

The references are independent of the code under test: Lightning's own
``Trainer(gradient_clip_val=c)``, ``accelerator.clip_grad_norm_`` (both torch's
clipping), and a plain PyTorch loop written here (backward, clip, step) on the
same model, data and optimizer. Each equality is paired with a control that
shows it could fail: the unclipped run differs, and a clipper placed after the
update (or before backward) does not reproduce the reference.
"""

from __future__ import annotations

import itertools
import time
import types

import lightning.pytorch as pl
import pytest
import torch
from accelerate.utils import DistributedType

import gradclip
from gradclip_book import frameworks as fw

STEPS = 8
MAX_NORM = 1.5  # clips the first, large-gradient steps of this run and not the later ones: both branches


# The framework runs use one thread (fw._quiet_single_thread); so does the reference loop here.
pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def plain_loop(steps: int, clip=None) -> dict[str, list]:
    """The reference: a plain PyTorch loop on the same model, batches and optimizer; ``clip(params)`` after backward."""
    model = fw.make_model()
    optimizer = fw.make_optimizer(model.parameters())
    params = list(model.parameters())
    out = {"loss": [], "pre": [], "post": [], "weights": []}
    for x, y in itertools.islice(fw.digits_loader(), steps):
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        out["pre"].append(float(torch.nn.utils.get_total_norm([p.grad.double() for p in params])))
        if clip is not None:
            clip(params)
        out["post"].append(float(torch.nn.utils.get_total_norm([p.grad.double() for p in params])))
        optimizer.step()
        out["loss"].append(float(loss.detach()))
        out["weights"].append(torch.nn.utils.parameters_to_vector(params).detach().clone())
    out["weights"] = torch.stack(out["weights"])
    return out


def torch_clip(params):
    torch.nn.utils.clip_grad_norm_(params, MAX_NORM)


def assert_same_run(record: fw.FrameworkRecord, reference) -> None:
    """Same losses, gradient norms and weights at every step (float32 tolerance)."""
    loss = reference["loss"] if isinstance(reference, dict) else reference.loss
    pre = reference["pre"] if isinstance(reference, dict) else reference.pre_norm
    post = reference["post"] if isinstance(reference, dict) else reference.post_norm
    weights = reference["weights"] if isinstance(reference, dict) else reference.weights
    assert len(record.loss) == len(loss) == STEPS
    torch.testing.assert_close(torch.tensor(record.loss), torch.tensor(loss), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(torch.tensor(record.pre_norm), torch.tensor(pre), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(torch.tensor(record.post_norm), torch.tensor(post), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(record.weights, weights, rtol=1e-5, atol=1e-6)


def assert_different_weights(a: torch.Tensor, b: torch.Tensor) -> None:
    assert float((a[-1] - b[-1]).abs().max()) > 1e-3


@pytest.fixture(scope="module")
def unclipped():
    return fw.run_lightning("none", steps=STEPS)


# --- Lightning: configure_gradient_clipping ---------------------------------------------------------


def test_lightning_gradclip_equals_lightnings_own_clipping_step_by_step(unclipped):
    ours = fw.run_lightning("gradclip", steps=STEPS, max_norm=MAX_NORM)
    theirs = fw.run_lightning("lightning", steps=STEPS, max_norm=MAX_NORM)
    assert_same_run(ours, theirs)
    assert any(ours.clipped) and not all(ours.clipped)  # both branches of min(norm, c) are exercised
    assert_different_weights(ours.weights, unclipped.weights)  # so skipping the clip would fail the equality
    assert ours.loss[0] == unclipped.loss[0] and ours.pre_norm[0] == unclipped.pre_norm[0]


def test_lightning_gradclip_clips_to_min_of_norm_and_threshold_and_matches_a_plain_loop():
    module = fw.GradclipModule()
    record = fw.fit_recorded(module, STEPS, gradient_clip_val=MAX_NORM, method="gradclip")
    expected = [min(pre, MAX_NORM) for pre in record.pre_norm]
    torch.testing.assert_close(torch.tensor(record.post_norm), torch.tensor(expected),
                               rtol=1e-5, atol=0)
    # configure_gradient_clipping ran once per step and gradclip saw the norm torch measured after backward
    assert len(module.clip_norms) == STEPS
    torch.testing.assert_close(torch.tensor([float(n) for n in module.clip_norms]),
                               torch.tensor(record.pre_norm, dtype=torch.float32), rtol=1e-6, atol=0)
    assert_same_run(record, plain_loop(STEPS, torch_clip))


def test_lightning_value_clipping_also_goes_through_gradclip():
    ours = fw.fit_recorded(fw.GradclipModule(), STEPS, gradient_clip_val=0.01, gradient_clip_algorithm="value")
    theirs = fw.fit_recorded(fw.DigitsModule(), STEPS, gradient_clip_val=0.01, gradient_clip_algorithm="value")
    assert_same_run(ours, theirs)
    assert all(ours.clipped)  # 0.01 clips some entry of every step's gradient


def test_lightning_without_trainer_clip_value_does_not_clip(unclipped):
    record = fw.fit_recorded(fw.GradclipModule(), STEPS, gradient_clip_val=None)
    assert_same_run(record, unclipped)


# --- Lightning: a stateful clipper in a callback, or attached ---------------------------------------


def test_callback_clipper_runs_once_per_step_after_backward_before_update(unclipped):
    clipper = gradclip.AutoClip(percentile=10.0)
    record = fw.run_lightning("callback", steps=STEPS, clipper=clipper)
    assert clipper.steps == STEPS  # once per optimizer step, not per closure wrapper or hook
    reference = plain_loop(STEPS, gradclip.AutoClip(percentile=10.0))
    assert_same_run(record, reference)
    assert any(record.clipped) and not all(record.clipped)
    assert_different_weights(record.weights, unclipped.weights)
    assert record.post_norm[-1] == pytest.approx(float(clipper.last_result.post_norm), rel=1e-6)


def test_attached_clipper_inside_lightnings_closure_equals_the_callback():
    clipper = gradclip.AutoClip(percentile=10.0)
    attached = fw.run_lightning("attach", steps=STEPS, clipper=clipper)
    assert clipper.steps == STEPS
    assert_same_run(attached, fw.run_lightning("callback", steps=STEPS, clipper=gradclip.AutoClip(percentile=10.0)))


class ClipAfterUpdate(fw.ClipperCallback):
    """Wrong on purpose: clips in on_train_batch_end, after the optimizer has used the gradients."""

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        pass

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.clipper(list(pl_module.parameters()))


class ClipBeforeBackward(fw.ClipperCallback):
    """Wrong on purpose: clips in on_train_batch_start, before the closure has run backward."""

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        pass

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.clipper(list(pl_module.parameters()))


def test_a_misplaced_clipper_is_caught(unclipped):
    clipper = gradclip.AutoClip(percentile=10.0)
    late = fw.fit_recorded(fw.DigitsModule(), STEPS, [ClipAfterUpdate(clipper)])
    assert clipper.steps == STEPS
    # the update used unclipped gradients: the run is the unclipped one, not the reference
    torch.testing.assert_close(late.weights, unclipped.weights, rtol=1e-5, atol=1e-6)
    with pytest.raises(AssertionError):
        assert_same_run(late, plain_loop(STEPS, gradclip.AutoClip(percentile=10.0)))
    # before backward there is no gradient yet (Lightning's closure zeroes and recomputes them inside the step)
    with pytest.raises(RuntimeError, match="no parameter has a gradient"):
        fw.fit_recorded(fw.DigitsModule(), STEPS, [ClipBeforeBackward(gradclip.AutoClip())])


def test_callback_saves_and_restores_the_clipper_state():
    clipper = gradclip.ZClip(warmup_steps=3)
    callback = fw.ClipperCallback(clipper)
    fw.fit_recorded(fw.DigitsModule(), 5, [callback])
    state = callback.state_dict()
    assert state["steps"] == 5 and clipper.mean is not None
    resumed = fw.ClipperCallback(gradclip.ZClip(warmup_steps=3))
    resumed.load_state_dict(state)
    assert resumed.clipper.steps == 5 and float(resumed.clipper.mean) == float(clipper.mean)
    assert isinstance(callback, pl.Callback)


# --- Accelerate -------------------------------------------------------------------------------------


def test_accelerate_gradclip_equals_accelerators_own_clip_grad_norm():
    ours = fw.run_accelerate("gradclip", steps=STEPS, max_norm=MAX_NORM)
    theirs = fw.run_accelerate("accelerate", steps=STEPS, max_norm=MAX_NORM)
    unclipped = fw.run_accelerate("none", steps=STEPS)
    assert_same_run(ours, theirs)
    assert any(ours.clipped) and not all(ours.clipped)
    assert_different_weights(ours.weights, unclipped.weights)
    expected = [min(pre, MAX_NORM) for pre in ours.pre_norm]
    torch.testing.assert_close(torch.tensor(ours.post_norm), torch.tensor(expected),
                               rtol=1e-5, atol=0)
    assert_same_run(ours, plain_loop(STEPS, torch_clip))


def test_accelerate_clipper_equals_a_plain_loop():
    clipper = gradclip.AutoClip(percentile=10.0)
    record = fw.run_accelerate("clipper", steps=STEPS, clipper=clipper)
    assert clipper.steps == STEPS
    assert any(record.clipped)
    assert_same_run(record, plain_loop(STEPS, gradclip.AutoClip(percentile=10.0)))


def test_both_frameworks_train_the_same_run():
    assert_same_run(fw.run_accelerate("gradclip", steps=STEPS, max_norm=MAX_NORM),
                    fw.run_lightning("gradclip", steps=STEPS, max_norm=MAX_NORM))


@pytest.mark.parametrize("kind, fsdp2, refused", [
    (DistributedType.DEEPSPEED, False, True),
    (DistributedType.FSDP, False, True),
    (DistributedType.FSDP, True, False),
    (DistributedType.MULTI_GPU, False, False),
    (DistributedType.NO, False, False),
])
def test_check_plain_gradients_refuses_deepspeed_and_fsdp1(kind, fsdp2, refused):
    accelerator = types.SimpleNamespace(distributed_type=kind, is_fsdp2=fsdp2)
    if refused:
        with pytest.raises(RuntimeError, match="accelerator.clip_grad_norm_"):
            fw.check_plain_gradients(accelerator)
    else:
        fw.check_plain_gradients(accelerator)


# --- arguments and cost -----------------------------------------------------------------------------


@pytest.mark.parametrize("run, method", [(fw.run_lightning, "nope"), (fw.run_accelerate, "callback"),
                                         (fw.run_lightning, "callback"), (fw.run_accelerate, "clipper")])
def test_bad_method_or_missing_clipper_raises(run, method):
    with pytest.raises(ValueError, match="method"):
        run(method, steps=1)


def test_runs_are_short_and_leave_no_files(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    start = time.perf_counter()
    record = fw.run_lightning("gradclip", steps=3)
    fw.run_accelerate("gradclip", steps=3)
    assert time.perf_counter() - start < 20
    assert len(record.step_seconds) == 3 and record.median_step_seconds < 1.0
    assert list(tmp_path.iterdir()) == []  # no lightning_logs/ or checkpoints in the working directory
