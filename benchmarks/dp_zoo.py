"""The DP-SGD architecture zoo of ``bench_peers.py --only dp``: small models of each kind DP-SGD trains.

Each entry builds a model and a batch (inputs, class targets) for a batch size. Images are 1 x 28 x 28
(MNIST-sized), token sequences 32 (transformer) or 20 (LSTM) ids from a vocabulary of 1,000. Only
torch modules that Opacus 1.6's GradSampleModule supports are used, except the LSTM, for which
Opacus needs its own ``DPLSTM`` (``bench_peers.py`` builds that twin and copies the weights).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn


def mlp() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 10))


def cnn_3x3_padded() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Flatten(), nn.Linear(32 * 7 * 7, 10))


def cnn_5x5() -> nn.Module:
    """The classic MNIST CNN: 5x5 convolutions without padding (28 -> 24 -> 12 -> 8 -> 4)."""
    return nn.Sequential(nn.Conv2d(1, 16, 5), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(16, 32, 5), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Flatten(), nn.Linear(32 * 4 * 4, 10))


def cnn_strided() -> nn.Module:
    """Downsampling by stride-2 convolutions instead of pooling (28 -> 14 -> 7)."""
    return nn.Sequential(nn.Conv2d(1, 16, 3, stride=2, padding=1), nn.ReLU(),
                         nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(),
                         nn.Flatten(), nn.Linear(32 * 7 * 7, 10))


class ResidualBlock(nn.Module):
    """x + GN(conv(ReLU(GN(conv(x))))), then ReLU: a ResNet basic block with GroupNorm, as DP-SGD needs."""

    def __init__(self, channels: int, groups: int = 4) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.norm1 = nn.GroupNorm(groups, channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.norm2 = nn.GroupNorm(groups, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x + self.norm2(self.conv2(F.relu(self.norm1(self.conv1(x))))))


def residual_groupnorm() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 16, 3, padding=1, bias=False), nn.GroupNorm(4, 16), nn.ReLU(),
                         nn.MaxPool2d(2), ResidualBlock(16), nn.MaxPool2d(2),
                         nn.Flatten(), nn.Linear(16 * 7 * 7, 10))


class SelfAttention(nn.Module):
    """Multi-head self-attention from nn.Linear layers and ``F.scaled_dot_product_attention`` (as Opacus's
    DPMultiheadAttention is built from linear layers)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv, self.out = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, steps, dim = x.shape
        q, k, v = self.qkv(x).reshape(batch, steps, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        attended = F.scaled_dot_product_attention(q, k, v)
        return self.out(attended.transpose(1, 2).reshape(batch, steps, dim))


class TransformerClassifier(nn.Module):
    """Token embedding plus fixed sinusoidal positions, one pre-LayerNorm transformer block, mean pooling, linear."""

    def __init__(self, vocab: int = 1000, dim: int = 64, heads: int = 4, steps: int = 32, classes: int = 2) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        position = torch.arange(steps).unsqueeze(1) * torch.exp(torch.arange(0, dim, 2) * (-math.log(1e4) / dim))
        self.register_buffer("positions", torch.cat([position.sin(), position.cos()], dim=1))
        self.norm1, self.attention = nn.LayerNorm(dim), SelfAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
        self.norm3, self.head = nn.LayerNorm(dim), nn.Linear(dim, classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens) + self.positions[: tokens.shape[1]]
        x = x + self.attention(self.norm1(x))
        x = x + self.mlp(self.norm2(x))
        return self.head(self.norm3(x).mean(dim=1))


class LSTMClassifier(nn.Module):
    """Embedding -> LSTM (torch's, or Opacus's DPLSTM twin with the same weights) -> linear on the last step."""

    def __init__(self, recurrent: type[nn.Module] = nn.LSTM, vocab: int = 1000, dim: int = 32, hidden: int = 64):
        super().__init__()
        self.embed, self.rnn = nn.Embedding(vocab, dim), recurrent(dim, hidden, batch_first=True)
        self.head = nn.Linear(hidden, 2)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(self.embed(tokens))
        return self.head(out[:, -1])


def images(batch: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(batch, 1, 28, 28, generator=generator), torch.randint(0, 10, (batch,), generator=generator)


def tokens(steps: int) -> Callable[[int, torch.Generator], tuple[torch.Tensor, torch.Tensor]]:
    def make(batch: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        return (torch.randint(0, 1000, (batch, steps), generator=generator),
                torch.randint(0, 2, (batch,), generator=generator))
    return make


# name -> (model factory, batch factory, whether the 1.5x-of-forward+backward target applies)
ZOO: dict[str, tuple[Callable[[], nn.Module], Callable, bool]] = {
    "MLP 784-256-10": (mlp, images, True),
    "CNN 3x3 padded": (cnn_3x3_padded, images, True),
    "CNN 5x5 unpadded": (cnn_5x5, images, True),
    "CNN strided": (cnn_strided, images, True),
    "ResNet block + GroupNorm": (residual_groupnorm, images, False),
    "Embedding + transformer": (TransformerClassifier, tokens(32), False),
    "Embedding + LSTM": (LSTMClassifier, tokens(20), False),
}
