"""The opt-in flat gradient buffer (gradclip.flat.GradBuffer) and the single-buffer detection it relies on."""

from __future__ import annotations

import pytest
import torch

from support.params import clone_params, make_params

import gradclip


def test_grad_buffer_takes_the_single_kernel_path_and_matches_torch():
    model = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    twin = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    twin.load_state_dict(model.state_dict())
    buffer = gradclip.GradBuffer(model.parameters())
    x = torch.randn(16, 5, generator=torch.Generator().manual_seed(0))
    for step in range(3):
        buffer.zero_grad()
        twin.zero_grad()
        (model(x) ** 2).sum().backward()
        (twin(x) ** 2).sum().backward()
        assert buffer.views_intact()
        grads = [p.grad for p in model.parameters()]
        assert gradclip._groups.single_buffer(grads) is not None
        norm = gradclip.clip_grad_norm_(model.parameters(), 0.7)
        expected = torch.nn.utils.clip_grad_norm_(twin.parameters(), 0.7)
        torch.testing.assert_close(norm, expected)
        for p, q in zip(model.parameters(), twin.parameters()):
            torch.testing.assert_close(p.grad, q.grad)


def test_single_buffer_rejects_overlapping_and_gapped_views():
    base = torch.arange(10.0)
    assert gradclip._groups.single_buffer([base[0:5], base[5:10]]) is not None
    assert gradclip._groups.single_buffer([base[0:5], base[4:10]]) is None  # overlap
    assert gradclip._groups.single_buffer([base[0:4], base[5:10]]) is None  # gap
    assert gradclip._groups.single_buffer([base[0:5], base[0:5]]) is None  # same view twice
    assert gradclip._groups.single_buffer([base.view(2, 5)[:, :2], base[5:10]]) is None  # strided
    span = gradclip._groups.single_buffer([base[5:10], base[2:5]])
    assert span is not None and torch.equal(span, base[2:10])


def test_grad_buffer_rebinds_after_zero_grad_set_to_none():
    model = torch.nn.Linear(4, 2)
    buffer = gradclip.GradBuffer(model.parameters())
    model.zero_grad(set_to_none=True)
    with pytest.warns(UserWarning, match="outside the buffer"):
        model(torch.ones(1, 4)).sum().backward()
    assert not buffer.views_intact()
    expected = [p.grad.clone() for p in model.parameters()]
    buffer.rebind_()
    assert buffer.views_intact()
    for p, e in zip(model.parameters(), expected):
        assert torch.equal(p.grad, e)
    with pytest.raises(ValueError, match="parameters"):
        gradclip.GradBuffer([torch.zeros(2)])


def test_a_backward_pass_outside_the_buffer_warns_once_at_the_callers_line():
    import warnings

    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    buffer = gradclip.GradBuffer(model.parameters())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.warns(UserWarning, match=r"outside the buffer.*set_to_none=False") as record:
        for _ in range(3):
            optimizer.zero_grad()  # set_to_none=True by default: the views are dropped
            model(torch.ones(2, 3)).sum().backward()
    assert len([w for w in record if "outside the buffer" in str(w.message)]) == 1
    assert record[0].filename == __file__
    quiet = gradclip.GradBuffer(model.parameters())  # a newer buffer: the old one no longer checks
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for zero in (quiet.zero_grad, lambda: optimizer.zero_grad(set_to_none=False)):
            zero()
            model(torch.ones(2, 3)).sum().backward()
            assert quiet.views_intact()


def test_a_dropped_buffer_is_freed_and_its_check_goes_with_it():
    import gc
    import weakref

    model = torch.nn.Linear(3, 2)
    buffer = gradclip.GradBuffer(model.parameters())
    gone = weakref.ref(buffer)
    del buffer
    gc.collect()
    assert gone() is None  # the hooks hold it weakly
    model.zero_grad(set_to_none=True)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model(torch.ones(1, 3)).sum().backward()


def test_channels_last_weights_get_views_of_their_own_layout():
    # autograd accumulates into .grad in place only if its strides match the parameter's; a contiguous
    # view of a channels_last weight made every backward pass warn and copy
    import warnings

    def model():
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 3))
        return net.to(memory_format=torch.channels_last)

    ours, theirs = model(), model()
    buffer = gradclip.GradBuffer(ours.parameters())
    x = torch.randn(2, 3, 10, 10).to(memory_format=torch.channels_last)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "gradient layout contract" warning
        for _ in range(2):  # the second backward accumulates into the views
            ours(x).sum().backward()
            theirs(x).sum().backward()
    assert buffer.views_intact()
    assert all(p.grad.stride() == p.stride() for p in ours.parameters())
    assert gradclip._groups.single_buffer([p.grad for p in ours.parameters()]) is not None
    torch.testing.assert_close(gradclip.clip_grad_norm_(ours.parameters(), 0.5),
                               torch.nn.utils.clip_grad_norm_(theirs.parameters(), 0.5))
    for p, q in zip(ours.parameters(), theirs.parameters()):
        torch.testing.assert_close(p.grad, q.grad)


def test_a_parameter_with_gaps_in_its_strides_gets_a_contiguous_view():
    weight = torch.nn.Parameter(torch.randn(4, 6)[:, ::2])  # strides (6, 2): not dense
    buffer = gradclip.GradBuffer([weight])
    assert weight.grad.is_contiguous() and buffer.views_intact()


def test_a_grad_buffer_takes_its_flat_path_after_a_plain_list_of_the_same_shapes():
    # a kept plan of plain tensors with the same types, dtypes and shapes must not stand in for a
    # GradBuffer's views: the buffer's one-kernel path would be lost (it was, in bench_core)
    shapes = [(3, 4), (5,), (2, 2)]
    plain, flat = make_params(shapes, seed=1), make_params(shapes, seed=2)
    gradclip.GradBuffer(flat)
    theirs = clone_params(flat)
    gradclip.clip_grad_norm_(plain, 0.1)
    gradclip.clip_grad_norm_(plain, 0.1)
    for _ in range(2):
        plan = gradclip._groups.plan_for(gradclip._validate.check_call(flat), None)
        assert plan.groups[0].buffer is not None
    torch.testing.assert_close(gradclip.clip_grad_norm_(flat, 0.1), torch.nn.utils.clip_grad_norm_(theirs, 0.1))
    for p, q in zip(flat, theirs):
        torch.testing.assert_close(p.grad, q.grad)
