"""The opt-in flat gradient buffer (gradclip.flat.GradBuffer) and the single-buffer detection it relies on."""

from __future__ import annotations

import pytest
import torch

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


def test_a_foreign_set_to_none_is_taken_back_into_the_buffer_without_a_warning():
    # optimizer.zero_grad() sets every .grad to None and leaves the views stale: the next backward pass
    # zeroes them (one kernel) and accumulates into them again, with torch's gradients
    import warnings

    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 2))
    twin = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 2))
    twin.load_state_dict(model.state_dict())
    buffer = gradclip.GradBuffer(model.parameters())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for step in range(3):
            optimizer.zero_grad()
            twin.zero_grad()
            if step == 2:  # a layer frozen after its view held a gradient: that stale view must not leak back
                model[0].weight.requires_grad_(False)
                twin[0].weight.requires_grad_(False)
            model(x).pow(2).sum().backward()
            twin(x).pow(2).sum().backward()
            assert buffer.views_intact()
            for p, q in zip(model.parameters(), twin.parameters()):
                assert (p.grad is None) == (q.grad is None)
                if q.grad is not None:
                    assert torch.equal(p.grad, q.grad)
            grads = [p.grad for p in model.parameters() if p.grad is not None]
            assert gradclip._groups.single_buffer(grads) is not None  # one kernel, zeros in the gap
    assert torch.all(buffer._views[0] == 0)


def test_a_gradient_set_by_hand_is_copied_in_and_rebind_keeps_none_as_none():
    model = torch.nn.Linear(4, 2)
    buffer = gradclip.GradBuffer(model.parameters())
    by_hand = torch.full((2, 4), 0.5)
    model.weight.grad = by_hand
    model(torch.ones(1, 4)).sum().backward()
    assert model.weight.grad is buffer._views[0]  # backward added to it, in the buffer
    torch.testing.assert_close(model.weight.grad, torch.full((2, 4), 1.5))
    model.bias.grad = torch.ones(2)
    buffer.rebind_()
    assert buffer.views_intact() and model.bias.grad is buffer._views[1]
    model.zero_grad(set_to_none=True)
    buffer.rebind_()
    assert model.weight.grad is None and model.bias.grad is None
    with pytest.raises(ValueError, match="parameters"):
        gradclip.GradBuffer([torch.zeros(2)])
    with pytest.raises(ValueError, match="leaf"):
        gradclip.GradBuffer([torch.zeros(2, requires_grad=True) * 2])
    with pytest.raises(TypeError, match="set_to_none"):
        buffer.zero_grad(set_to_none="no")


@pytest.mark.filterwarnings("ignore:Using backward\\(\\) with create_graph")
def test_create_graph_keeps_gradients_outside_the_buffer_and_warns_once_at_the_callers_line():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    buffer = gradclip.GradBuffer(model.parameters())
    with pytest.warns(UserWarning, match=r"create_graph=True.*outside") as record:
        for _ in range(3):
            buffer.zero_grad()
            model(torch.ones(2, 3)).sum().backward(create_graph=True)
    assert len([w for w in record if "outside the buffer" in str(w.message)]) == 1
    assert record[0].filename == __file__
    assert not buffer.views_intact()
    buffer.zero_grad()  # the gradients hold graphs: drop them, as torch's warning asks


def test_a_newer_buffer_on_the_same_parameters_takes_over():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    old = gradclip.GradBuffer(model.parameters())
    new = gradclip.GradBuffer(model.parameters())
    for zero in (old.zero_grad, new.zero_grad, model.zero_grad):
        zero()
        model(torch.ones(2, 3)).sum().backward()
        assert new.views_intact() and all(p.grad is v for p, v in zip(model.parameters(), new._views))
    del old


def test_autograd_grad_and_backward_of_other_inputs_leave_grad_none():
    # torch.autograd.grad does not accumulate: the buffer must not give the parameter a (zero) .grad
    model = torch.nn.Linear(3, 2)
    gradclip.GradBuffer(model.parameters())
    x = torch.ones(1, 3, requires_grad=True)
    torch.autograd.grad(model(x).sum(), list(model.parameters()))
    model(x).sum().backward(inputs=[x])
    assert model.weight.grad is None and model.bias.grad is None and x.grad is not None


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
    (weight * 2).sum().backward()
    assert weight.grad.is_contiguous() and buffer.views_intact() and weight.grad is buffer._views[0]


# --- a parameter that gets no gradient is not stepped: the buffer against an eager set_to_none loop ---------


class Branchy(torch.nn.Module):
    """A trunk, a head, and an auxiliary head that some forward passes skip."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.trunk, self.head, self.aux = torch.nn.Linear(4, 6), torch.nn.Linear(6, 3), torch.nn.Linear(6, 3)

    def forward(self, x, use_aux):
        h = torch.tanh(self.trunk(x))
        return self.head(h) + self.aux(h) if use_aux else self.head(h)


# step -> whether the trunk's weight trains; the trunk is frozen at step 2 and unfrozen at step 4
TRUNK_TRAINS = [True, True, False, False, True, True]
# (step, micro-batch) -> whether the auxiliary head runs: never in step 1, only in the second micro-batch of step 3
USES_AUX = {(1, 0): False, (1, 1): False, (3, 0): False}
OPTIMIZERS = {
    "AdamW(weight_decay)": lambda ps: torch.optim.AdamW(ps, lr=0.05, weight_decay=0.1),
    "SGD(momentum, weight_decay)": lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, weight_decay=0.01),
    "Adam(foreach)": lambda ps: torch.optim.Adam(ps, lr=0.05, foreach=True),
    "RMSprop": lambda ps: torch.optim.RMSprop(ps, lr=0.01),
}
X = torch.randn(2, 8, 4, generator=torch.Generator().manual_seed(1))


def train(optimizer_name, buffered, zero, clip):
    """Six steps of two micro-batches each; returns the model, the optimizer and what each step saw."""
    model = Branchy()
    optimizer = OPTIMIZERS[optimizer_name](model.parameters())
    buffer = gradclip.GradBuffer(model.parameters()) if buffered else None
    flat_path = []
    for step, trains in enumerate(TRUNK_TRAINS):
        model.trunk.weight.requires_grad_(trains)
        if buffered and zero == "buffer":
            buffer.zero_grad()
        else:
            optimizer.zero_grad()
        before = model.trunk.weight.detach().clone()
        for micro in range(2):
            model(X[micro], USES_AUX.get((step, micro), True)).pow(2).mean().backward()
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        flat_path.append(gradclip._groups.single_buffer(grads) is not None)
        clip(model.parameters())
        optimizer.step()
        if not trains:
            assert torch.equal(model.trunk.weight, before), f"step {step}: a frozen weight moved"
    return model, optimizer, flat_path


@pytest.mark.parametrize("zero", ["buffer", "optimizer"])
@pytest.mark.parametrize("optimizer_name", list(OPTIMIZERS))
def test_parameters_without_gradients_are_not_stepped_as_in_an_eager_set_to_none_loop(optimizer_name, zero):
    ours, our_optimizer, flat_path = train(optimizer_name, True, zero, lambda ps: gradclip.clip_grad_norm_(ps, 0.5))
    ref, ref_optimizer, _ = train(optimizer_name, False, None, lambda ps: torch.nn.utils.clip_grad_norm_(ps, 0.5))
    assert all(flat_path), "clipping left the one-kernel path when some parameters had no gradient"
    for (name, p), q in zip(ours.named_parameters(), ref.parameters()):
        assert (p.grad is None) == (q.grad is None), name
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)
        mine, theirs = our_optimizer.state[p], ref_optimizer.state[q]
        assert mine.keys() == theirs.keys(), name
        for key in theirs:  # the same number of steps and the same moments: no update from a zero gradient
            torch.testing.assert_close(torch.as_tensor(mine[key]), torch.as_tensor(theirs[key]), rtol=1e-5, atol=1e-6,
                                       msg=f"{name} {key}")


def test_a_compiled_model_with_a_layer_frozen_mid_training_keeps_the_buffer_and_torchs_gradients():
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 2))
    twin = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 2))
    twin.load_state_dict(model.state_dict())
    buffer = gradclip.GradBuffer(model.parameters())
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    graphs_before = torch._dynamo.utils.counters["stats"]["unique_graphs"]  # (counters outlive reset())
    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(1))
    for step in range(5):
        frozen = step in (1, 2)
        model[0].weight.requires_grad_(not frozen)
        twin[0].weight.requires_grad_(not frozen)
        buffer.zero_grad()
        twin.zero_grad()
        compiled(x).pow(2).sum().backward()
        twin(x).pow(2).sum().backward()
        assert buffer.views_intact() and (model[0].weight.grad is None) == frozen
        for p, q in zip(model.parameters(), twin.parameters()):
            assert (p.grad is None) == (q.grad is None)
            if q.grad is not None:
                torch.testing.assert_close(p.grad, q.grad)
        assert gradclip._groups.single_buffer([p.grad for p in model.parameters() if p.grad is not None]) is not None
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs_before
    assert graphs <= 2  # frozen and not: no recompiling per step
