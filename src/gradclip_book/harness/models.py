r"""Model and optimizer factories: the networks the book trains, He-initialised, with or without normalisation.

Every image model takes the digits as ``(n, 64)`` standardised pixels (reshaped to ``(n, 1, 8, 8)`` inside)
and returns ``(n, 10)`` logits:

* :func:`mlp`: ``depth`` hidden ``Linear(width)`` + ReLU layers and a linear head (chapter 2's and the
  first illustration of chapter 4: explosion through depth alone);
* :func:`plain_cnn`: a 3x3 stem convolution, then ``depth`` 3x3 convolutions of ``width`` channels, each
  followed by the normalisation (if any) and ReLU, then global average pooling and a linear head;
* :func:`residual_cnn`: the same stem, then ``depth / 2`` basic residual blocks (He et al. 2016:
  ``relu(x + N(conv(relu(N(conv(x))))))``), pooling and head.

``norm`` is ``None`` (no normalisation layer), ``"batch"`` (``BatchNorm2d`` after every convolution) or
``"group"`` (``GroupNorm`` with groups of 4 channels; its statistics do not depend on the batch).
Convolutions and linear layers get He initialisation (:func:`he_init_`); normalisation layers start at
scale 1 and shift 0, as in torch.

Example:
    >>> import torch
    >>> from gradclip_book.harness import models
    >>> net = models.build("residual_cnn", depth=4, width=8, norm="batch", seed=0)
    >>> tuple(net(torch.zeros(5, 64)).shape), models.count_layers(net)
    ((5, 10), {'conv': 5, 'linear': 1, 'norm': 5})
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

__all__ = ["MODELS", "NORMS", "OPTIMIZERS", "build", "count_layers", "he_init_", "make_optimizer", "mlp",
           "plain_cnn", "residual_cnn"]

IMAGE_SHAPE = (1, 8, 8)
"""Channels, height, width of one digit image."""
CLASSES = 10


def _norm_layer(norm: str | None, channels: int) -> nn.Module:
    if norm is None:
        return nn.Identity()
    if norm == "batch":
        return nn.BatchNorm2d(channels)
    if norm == "group":
        return nn.GroupNorm(max(1, channels // 4), channels)
    raise ValueError(f"norm must be None, 'batch' or 'group', got {norm!r}")


NORMS = (None, "batch", "group")
"""The values of ``norm``: no normalisation layer, BatchNorm2d, GroupNorm (4 channels per group)."""


def he_init_(model: nn.Module) -> nn.Module:
    r"""He (Kaiming) initialisation in place: every ``Conv2d`` and ``Linear`` weight from
    :math:`N(0, 2/\text{fan-in})`, biases zero (He et al. 2015, arXiv:1502.01852); returns ``model``.

    Example:
        >>> layer = he_init_(nn.Linear(400, 3))
        >>> round(float(layer.weight.std()) * 20, 1), float(layer.bias.abs().max())
        (1.4, 0.0)
    """
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
    return model


def mlp(depth: int, width: int = 64, inputs: int = 64, classes: int = CLASSES) -> nn.Sequential:
    """``depth`` x (``Linear`` + ReLU), then a ``Linear(width, classes)`` head; no normalisation, PyTorch's init
    (call :func:`he_init_` or use :func:`build`).

    Example:
        >>> tuple(mlp(3, 16)(torch.zeros(2, 64)).shape)
        (2, 10)
    """
    layers: list[nn.Module] = []
    fan_in = inputs
    for _ in range(depth):
        layers += [nn.Linear(fan_in, width), nn.ReLU()]
        fan_in = width
    layers.append(nn.Linear(fan_in, classes))
    return nn.Sequential(*layers)


def _conv(channels_in: int, channels_out: int, norm: str | None) -> nn.Conv2d:
    # no bias where a normalisation layer follows (its shift does the bias's job)
    return nn.Conv2d(channels_in, channels_out, 3, padding=1, bias=norm is None)


def plain_cnn(depth: int, width: int = 16, norm: str | None = None, classes: int = CLASSES) -> nn.Sequential:
    """Stem conv + ``depth`` x (3x3 conv, norm, ReLU) at 8x8, global average pooling, linear head.

    Example:
        >>> tuple(plain_cnn(4, 8, "group")(torch.zeros(2, 64)).shape)
        (2, 10)
    """
    layers: list[nn.Module] = [nn.Unflatten(1, IMAGE_SHAPE)]
    channels = IMAGE_SHAPE[0]
    for _ in range(depth + 1):  # the stem, then the body
        layers += [_conv(channels, width, norm), _norm_layer(norm, width), nn.ReLU()]
        channels = width
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, classes)]
    return nn.Sequential(*layers)


class BasicBlock(nn.Module):
    """``relu(x + N2(conv2(relu(N1(conv1(x))))))``: two 3x3 convolutions of ``width`` channels and an identity skip."""

    def __init__(self, width: int, norm: str | None) -> None:
        super().__init__()
        self.conv1, self.norm1 = _conv(width, width, norm), _norm_layer(norm, width)
        self.conv2, self.norm2 = _conv(width, width, norm), _norm_layer(norm, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branch = self.norm2(self.conv2(torch.relu(self.norm1(self.conv1(x)))))
        return torch.relu(x + branch)


def residual_cnn(depth: int, width: int = 16, norm: str | None = None, classes: int = CLASSES) -> nn.Sequential:
    """Stem conv + ``depth / 2`` :class:`BasicBlock` s (``depth`` convolutions) at 8x8, pooling, linear head.

    Raises:
        ValueError: ``depth`` is odd (a block holds two convolutions).

    Example:
        >>> tuple(residual_cnn(4, 8)(torch.zeros(2, 64)).shape)
        (2, 10)
    """
    if depth % 2:
        raise ValueError(f"depth counts convolutions, two per residual block: it must be even, got {depth}")
    layers: list[nn.Module] = [nn.Unflatten(1, IMAGE_SHAPE), _conv(IMAGE_SHAPE[0], width, norm),
                               _norm_layer(norm, width), nn.ReLU()]
    layers += [BasicBlock(width, norm) for _ in range(depth // 2)]
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, classes)]
    return nn.Sequential(*layers)


MODELS: dict[str, Callable[..., nn.Module]] = {"mlp": mlp, "plain_cnn": plain_cnn, "residual_cnn": residual_cnn}
"""Model name -> factory; :func:`build` adds the seed and He initialisation."""


def build(name: str, seed: int = 0, **kwargs) -> nn.Module:
    """``MODELS[name](**kwargs)``, He-initialised from ``torch.manual_seed(seed)``.

    Raises:
        ValueError: ``name`` is not in :data:`MODELS`.

    Example:
        >>> a, b = build("plain_cnn", depth=2, width=4, seed=1), build("plain_cnn", depth=2, width=4, seed=1)
        >>> all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
        True
    """
    if name not in MODELS:
        raise ValueError(f"name must be one of {sorted(MODELS)}, got {name!r}")
    torch.manual_seed(seed)
    return he_init_(MODELS[name](**kwargs))


def count_layers(model: nn.Module) -> dict[str, int]:
    """How many convolutions, linear layers and normalisation layers ``model`` holds.

    Example:
        >>> count_layers(mlp(2, 8))
        {'conv': 0, 'linear': 3, 'norm': 0}
    """
    kinds = {"conv": (nn.Conv2d,), "linear": (nn.Linear,), "norm": (nn.BatchNorm2d, nn.GroupNorm, nn.LayerNorm)}
    return {name: sum(isinstance(m, types) for m in model.modules()) for name, types in kinds.items()}


OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "sgd": lambda params, lr: torch.optim.SGD(params, lr=lr, momentum=0.9),
    "adamw": lambda params, lr: torch.optim.AdamW(params, lr=lr),
    "adam": lambda params, lr: torch.optim.Adam(params, lr=lr),
}
"""Optimizer name -> ``factory(parameters, lr)``: SGD with momentum 0.9 (no weight decay), AdamW with torch's
defaults (betas 0.9, 0.999; decoupled weight decay 0.01), Adam with torch's defaults."""


def make_optimizer(name: str, params: Iterable[nn.Parameter], lr: float) -> torch.optim.Optimizer:
    """The optimizer :data:`OPTIMIZERS` names, over ``params`` at learning rate ``lr``.

    Raises:
        ValueError: ``name`` is not in :data:`OPTIMIZERS`, or ``lr`` is not positive.

    Example:
        >>> make_optimizer("sgd", nn.Linear(2, 2).parameters(), 0.1).defaults["momentum"]
        0.9
    """
    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {sorted(OPTIMIZERS)}, got {name!r}")
    if not lr > 0:
        raise ValueError(f"lr must be positive, got {lr!r}")
    return OPTIMIZERS[name](list(params), lr)
