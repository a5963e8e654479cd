"""What per-sample clipping does to a model before ``torch.func.vmap`` runs it one example at a time.

* A trainable ``nn.Embedding``/``nn.EmbeddingBag`` with ``sparse=True`` is refused with a
  ``TypeError`` that says what to do: a per-example gradient is dense (and so is DP-SGD's noise).
* An embedding with ``max_norm`` renormalises the rows it looks up, in place, during its
  forward pass, which ``vmap`` cannot do (the indices are batched, the weight is not). One
  ordinary forward pass of the batch, without gradients, renormalises the rows the batch uses,
  as the training forward pass would (a row already renormalised is left alone, so this is what a
  loop over the examples does too); the per-example pass then runs with ``max_norm`` off.
* Stock ``nn.RNN``, ``nn.LSTM`` and ``nn.GRU`` run unrolled (:mod:`gradclip._recurrent`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence

from . import _recurrent

_EMBEDDINGS = (nn.Embedding, nn.EmbeddingBag)


def refuse_sparse_embeddings(model: nn.Module) -> None:
    for name, module in model.named_modules():
        if isinstance(module, _EMBEDDINGS) and module.sparse and module.weight.requires_grad:
            raise TypeError(
                f"{name or 'model'!r} ({type(module).__name__}) has sparse=True: its gradient would be a sparse tensor, "
                "but per-sample clipping computes each example's gradient as a dense tensor (and DP-SGD's noise "
                "touches every row, so the clipped, noised gradient is dense anyway). Construct it with "
                "sparse=False (and use an optimizer for dense gradients, not SparseAdam)."
            )


@contextlib.contextmanager
def prepared(model: nn.Module, inputs: torch.Tensor) -> Iterator[None]:
    """Inside, ``model`` can run under ``vmap`` one example at a time (see the module's docstring)."""
    refuse_sparse_embeddings(model)
    renormed = [m for m in model.modules() if isinstance(m, _EMBEDDINGS) and m.max_norm is not None]
    if renormed and inputs.shape[0]:
        with torch.no_grad():
            model(inputs)  # renormalises, in place, the rows this batch looks up
    saved = [(module, module.max_norm) for module in renormed]
    try:
        for module in renormed:
            module.max_norm = None
        with _recurrent.unrolled(model):
            yield
    finally:
        for module, max_norm in saved:
            module.max_norm = max_norm


def packed_sequence_error(model: nn.Module, inputs: torch.Tensor) -> TypeError | None:
    """If a recurrent layer of ``model`` gets a PackedSequence for the first example, the error to raise.

    Called after ``vmap`` failed: a model that packs its sequences fails inside
    ``pack_padded_sequence`` (data-dependent lengths), before any recurrent layer runs. One
    ordinary forward pass of one example, without gradients, shows whether that is the cause.
    """
    recurrent = [m for m in model.modules() if isinstance(m, nn.RNNBase)]
    if not recurrent or not inputs.shape[0]:
        return None
    found: list[nn.Module] = []

    def spot(module: nn.Module, args: tuple) -> None:
        if args and isinstance(args[0], PackedSequence):
            found.append(module)

    handles = [module.register_forward_pre_hook(spot) for module in recurrent]
    try:
        with torch.no_grad():
            model(inputs[:1])
    except Exception:  # the probe only explains; the original error stands
        return None
    finally:
        for handle in handles:
            handle.remove()
    if not found:
        return None
    return _recurrent.PackedSequenceError(f"a {type(found[0]).__name__} of the model gets a PackedSequence: "
                                          f"{_recurrent.PACKED_HINT}")
