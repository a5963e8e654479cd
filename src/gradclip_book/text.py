r"""Chapter 4's text example: real English text, a character vocabulary, and three language models.

The corpus is the Python language reference that ships with CPython as
:mod:`pydoc_data.topics` (the text ``help("if")`` prints): about 465,000
characters of English prose and code, nothing downloaded. Its exact text
depends on the Python release (each release regenerates it), so
:func:`corpus_fingerprint` identifies it, and the book's stored runs record
the fingerprint they were trained on.

* :class:`Vocabulary`: one token per distinct character of the corpus.
* :func:`split`: a fixed train / validation / test split into interleaved
  blocks (so all three parts sample the whole reference, not its last topics).
* :func:`stream_batches`: consecutive windows of parallel streams, for a
  recurrent model that carries its state from one window to the next
  (truncated backpropagation through time).
* :func:`window_batches`: windows at seeded random positions, for a transformer.
* :func:`stream_loss`, :func:`window_loss`: a model's mean cross-entropy per
  character (nats) over a whole part, the validation metric.
* :class:`CharRNN` (a vanilla tanh RNN or an LSTM) and :class:`CharTransformer`
  (a small decoder-only pre-LN transformer with optional qk-layernorm).

Example:
    >>> from gradclip_book import text
    >>> vocab = text.Vocabulary.from_text("abca")
    >>> vocab.decode(vocab.encode("cab")), len(vocab)
    ('cab', 3)
"""

from __future__ import annotations

import functools
import hashlib
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

__all__ = [
    "BLOCK",
    "PARTS",
    "CharRNN",
    "CharTransformer",
    "Vocabulary",
    "corpus",
    "corpus_fingerprint",
    "encoded",
    "split",
    "stream_batches",
    "stream_loss",
    "window_batches",
    "window_loss",
    "z_loss",
]

BLOCK = 2048
"""Characters per block of the split (:func:`split`)."""

PARTS = ("train", "validation", "test")


# --- the corpus and its vocabulary -----------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def corpus() -> str:
    """The text of :mod:`pydoc_data.topics`: every topic in sorted order of its name, separated by a blank line.

    Example:
        >>> from gradclip_book.text import corpus
        >>> len(corpus()) > 400_000, "lambda" in corpus()
        (True, True)
    """
    from pydoc_data import topics

    return "\n\n".join(topics.topics[name] for name in sorted(topics.topics))


def corpus_fingerprint() -> str:
    """The first 16 hex digits of the SHA-256 of :func:`corpus` (UTF-8): which Python's reference this is."""
    return hashlib.sha256(corpus().encode("utf-8")).hexdigest()[:16]


@dataclass(frozen=True)
class Vocabulary:
    """One token per character: ``encode`` maps text to int64 ids, ``decode`` maps ids back.

    Attributes:
        chars: the characters, sorted by code point; a character's id is its index.
    """

    chars: str

    @classmethod
    def from_text(cls, text: str) -> Vocabulary:
        """The vocabulary of every distinct character of ``text``."""
        return cls("".join(sorted(set(text))))

    def __len__(self) -> int:
        return len(self.chars)

    @functools.cached_property
    def _index(self) -> dict[str, int]:
        return {c: i for i, c in enumerate(self.chars)}

    def encode(self, text: str) -> torch.Tensor:
        """``text`` as a 1-D int64 tensor of ids; ``KeyError`` names a character outside the vocabulary."""
        try:
            return torch.tensor([self._index[c] for c in text], dtype=torch.int64)
        except KeyError as error:
            raise KeyError(f"character {error.args[0]!r} is not in the vocabulary") from None

    def decode(self, ids: torch.Tensor | list[int]) -> str:
        """The text of a sequence of ids."""
        return "".join(self.chars[int(i)] for i in ids)


@functools.lru_cache(maxsize=1)
def encoded() -> tuple[Vocabulary, torch.Tensor]:
    """The corpus's vocabulary and the whole corpus encoded as one int64 tensor."""
    text = corpus()
    vocab = Vocabulary.from_text(text)
    return vocab, vocab.encode(text)


@functools.lru_cache(maxsize=4)
def split(block: int = BLOCK, period: int = 20) -> dict[str, torch.Tensor]:
    """The fixed train / validation / test split of the encoded corpus, by interleaved blocks.

    The corpus is cut into consecutive blocks of ``block`` characters (the last one shorter). Of every
    ``period`` blocks, number ``period - 2`` goes to validation, number ``period - 1`` to test and the rest
    to training (with the default 20: 90% / 5% / 5%, every part spread over the whole reference).
    Each part is its blocks concatenated in corpus order.

    Returns:
        ``{"train": ids, "validation": ids, "test": ids}``, 1-D int64 tensors.

    Example:
        >>> from gradclip_book.text import split
        >>> parts = split()
        >>> round(len(parts["validation"]) / len(parts["train"]), 2)
        0.05
    """
    if block < 1 or period < 3:
        raise ValueError(f"need block >= 1 and period >= 3, got block={block}, period={period}")
    _, ids = encoded()
    blocks = list(torch.split(ids, block))
    which = {"train": [], "validation": [], "test": []}
    for index, piece in enumerate(blocks):
        slot = index % period
        name = "validation" if slot == period - 2 else "test" if slot == period - 1 else "train"
        which[name].append(piece)
    return {name: torch.cat(pieces) for name, pieces in which.items()}


# --- batches ---------------------------------------------------------------------------------------


def stream_batches(data: torch.Tensor, batch: int, length: int, offset: int = 0
                   ) -> Iterator[tuple[torch.Tensor, torch.Tensor, bool]]:
    """Consecutive windows of ``batch`` parallel streams, forever: d2l's sequential partitioning.

    ``data[offset:]`` is cut into ``batch`` equal streams (row b continues where row b-1's text ends);
    each yield is the next ``length`` characters of every stream and the characters that follow them,
    so window k+1 of a row continues window k. A recurrent model that carries its hidden state from
    one window to the next sees each stream as one long text, and backpropagation is truncated at the
    window's start. After the last full window the streams start again from their beginnings
    (``fresh`` is ``True`` then and on the first window: the state should be reset).

    Yields:
        ``(inputs, targets, fresh)``: two ``(batch, length)`` int64 tensors and a bool.

    Example:
        >>> import torch
        >>> from gradclip_book.text import stream_batches
        >>> it = stream_batches(torch.arange(20), batch=2, length=3)
        >>> x, y, fresh = next(it); x.tolist(), y.tolist(), fresh
        ([[0, 1, 2], [9, 10, 11]], [[1, 2, 3], [10, 11, 12]], True)
        >>> next(it)[0].tolist()
        [[3, 4, 5], [12, 13, 14]]
    """
    data = data[offset:]
    per_stream = (len(data) - 1) // batch
    if per_stream < length:
        raise ValueError(f"{len(data)} characters make no {batch} streams of at least {length}")
    inputs = data[:batch * per_stream].view(batch, per_stream)
    targets = data[1:batch * per_stream + 1].view(batch, per_stream)
    while True:
        for start in range(0, per_stream - length + 1, length):
            yield inputs[:, start:start + length], targets[:, start:start + length], start == 0


def window_batches(data: torch.Tensor, batch: int, length: int, generator: torch.Generator
                   ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``batch`` windows of ``length`` characters at uniformly drawn positions, forever (nanoGPT's batches).

    Yields:
        ``(inputs, targets)``: ``(batch, length)`` int64 tensors, targets shifted by one character.
    """
    span = torch.arange(length)
    while True:
        starts = torch.randint(0, len(data) - length, (batch,), generator=generator)
        index = starts[:, None] + span
        yield data[index], data[index + 1]


def _lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def z_loss(logits: torch.Tensor) -> torch.Tensor:
    r"""The mean of :math:`\log^2 Z` over positions, :math:`Z = \sum_j e^{z_j}` (PaLM's auxiliary loss).

    Added with a small weight (1e-4 in PaLM and in Wortsman et al. 2023), it keeps the output logits
    from drifting to large values, which is one route to divergence at high learning rates.

    References:
        Chowdhery et al. (2022), "PaLM", `arXiv:2204.02311 <https://arxiv.org/abs/2204.02311>`__;
        Wortsman et al. (2023), "Small-scale proxies for large-scale Transformer training
        instabilities", `arXiv:2309.14322 <https://arxiv.org/abs/2309.14322>`__.
    """
    return torch.logsumexp(logits.float(), dim=-1).pow(2).mean()


@torch.no_grad()
def stream_loss(model: CharRNN, data: torch.Tensor, batch: int = 16, length: int = 256) -> float:
    """Mean cross-entropy per character (nats) of a recurrent model over ``data`` read as ``batch`` streams.

    The state is carried through each stream from a zero start, so every character but the first of
    each stream is predicted from all the text before it in its stream. Covers ``batch`` times
    ``(len(data) - 1) // batch`` characters (all but at most ``batch`` of them).
    """
    was_training = model.training
    model.eval()
    per_stream = (len(data) - 1) // batch
    inputs = data[:batch * per_stream].view(batch, per_stream)
    targets = data[1:batch * per_stream + 1].view(batch, per_stream)
    total, state = 0.0, None
    for start in range(0, per_stream, length):
        logits, state = model(inputs[:, start:start + length], state)
        total += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                       targets[:, start:start + length].reshape(-1), reduction="sum"))
    model.train(was_training)
    return total / (batch * per_stream)


@torch.no_grad()
def window_loss(model: CharTransformer, data: torch.Tensor, length: int | None = None, chunk: int = 64) -> float:
    """Mean cross-entropy per character (nats) over every non-overlapping window of ``length`` in ``data``.

    ``length`` defaults to the model's context. Windows are evaluated ``chunk`` at a time.
    """
    was_training = model.training
    model.eval()
    length = length or model.context
    count = (len(data) - 1) // length
    inputs = data[:count * length].view(count, length)
    targets = data[1:count * length + 1].view(count, length)
    total = 0.0
    for start in range(0, count, chunk):
        logits = model(inputs[start:start + chunk])
        total += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                       targets[start:start + chunk].reshape(-1), reduction="sum"))
    model.train(was_training)
    return total / (count * length)


# --- models ----------------------------------------------------------------------------------------


class CharRNN(nn.Module):
    r"""A character-level recurrent language model: embedding, one recurrent layer, linear read-out.

    ``cell="rnn"`` is the vanilla network :math:`h_t = \tanh(W_{ih} x_t + W_{hh} h_{t-1} + b)`
    (:class:`torch.nn.RNN`); ``cell="lstm"`` is :class:`torch.nn.LSTM`. Weights keep PyTorch's
    default initialisation (uniform in :math:`\pm 1/\sqrt{\text{hidden}}`).

    Args:
        vocab: the number of characters V.
        hidden: the state size H (also the embedding size).
        cell: ``"rnn"`` or ``"lstm"``.

    Shapes:
        ``forward(x, state)``: x ``(batch, T)`` int64 ids; returns logits ``(batch, T, V)`` and the last state
        (``(1, batch, H)``, a pair of them for the LSTM). ``hidden_states(x, state)`` returns the top
        layer's states ``(batch, T, H)`` as well, for the gradient through time.

    Example:
        >>> import torch
        >>> from gradclip_book.text import CharRNN
        >>> logits, state = CharRNN(10, 8)(torch.zeros(2, 5, dtype=torch.long))
        >>> tuple(logits.shape), tuple(state.shape)
        ((2, 5, 10), (1, 2, 8))
    """

    def __init__(self, vocab: int, hidden: int, cell: str = "rnn") -> None:
        super().__init__()
        if cell not in ("rnn", "lstm"):
            raise ValueError(f"cell must be 'rnn' or 'lstm', got {cell!r}")
        self.cell = cell
        self.embed = nn.Embedding(vocab, hidden)
        self.rnn = (nn.RNN(hidden, hidden, batch_first=True, nonlinearity="tanh") if cell == "rnn"
                    else nn.LSTM(hidden, hidden, batch_first=True))
        self.head = nn.Linear(hidden, vocab)

    def hidden_states(self, x: torch.Tensor, state=None):
        """``(states, last_state)``: the states :math:`h_1..h_T` ``(batch, T, H)`` and the state to carry on."""
        return self.rnn(self.embed(x), state)

    def forward(self, x: torch.Tensor, state=None):
        states, state = self.hidden_states(x, state)
        return self.head(states), state

    def unrolled_states(self, x: torch.Tensor) -> list[torch.Tensor]:
        r"""The states :math:`h_1, \dots, h_T` (each ``(batch, H)``) from a zero state, one step at a time.

        Computes the same states as :meth:`hidden_states` with the layer's own weights, but each
        :math:`h_t` is a node of the graph that the later steps are computed from, so
        ``torch.autograd.grad(loss, states)`` gives the full derivative with respect to each :math:`h_t`
        (through every later step), which the fused layer does not expose. For the LSTM
        (gates i, f, g, o as in :class:`torch.nn.LSTM`): :math:`c_t = f_t c_{t-1} + i_t g_t`,
        :math:`h_t = o_t \tanh c_t`.
        """
        rnn = self.rnn
        inputs = self.embed(x)
        h = inputs.new_zeros(x.shape[0], rnn.hidden_size)
        c = torch.zeros_like(h)
        states = []
        for t in range(x.shape[1]):
            pre = F.linear(inputs[:, t], rnn.weight_ih_l0, rnn.bias_ih_l0) + F.linear(h, rnn.weight_hh_l0, rnn.bias_hh_l0)
            if self.cell == "rnn":
                h = torch.tanh(pre)
            else:
                i, f, g, o = pre.chunk(4, dim=1)
                c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
                h = torch.sigmoid(o) * torch.tanh(c)
            states.append(h)
        return states


class _Block(nn.Module):
    """Pre-LN block: x + attention(LN(x)), then x + MLP(LN(x)); qk-layernorm normalises q and k per head."""

    def __init__(self, width: int, heads: int, qk_norm: bool) -> None:
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv, self.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))
        head = width // heads
        self.q_norm = nn.LayerNorm(head) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(head) if qk_norm else nn.Identity()

    def _qkv(self, x: torch.Tensor):
        n, t, width = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(width, dim=2)
        shape = (n, t, self.heads, width // self.heads)
        q, k, v = (z.view(shape).transpose(1, 2) for z in (q, k, v))
        return self.q_norm(q), self.k_norm(k), v

    def attention_logits(self, x: torch.Tensor) -> torch.Tensor:
        r"""The causal attention logits :math:`q\cdot k/\sqrt{d_h}` ``(batch, heads, T, T)`` (masked: -inf)."""
        q, k, _ = self._qkv(x)
        logits = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
        t = x.shape[1]
        return logits.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self._qkv(x)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(x.shape))
        return x + self.mlp(self.ln2(x))


class CharTransformer(nn.Module):
    r"""A small decoder-only transformer over characters (pre-LN, learned positions, GELU MLP of 4x width).

    Args:
        vocab: the number of characters V.
        width: the model width d (divisible by ``heads``).
        layers: the number of blocks.
        heads: attention heads per block.
        context: the longest input T (positions learned).
        qk_norm: apply LayerNorm to each head's queries and keys before their dot product
            (qk-layernorm: Dehghani et al. 2023, arXiv:2302.05442; Wortsman et al. 2023, arXiv:2309.14322).

    Weights keep PyTorch's default initialisation.

    Shapes:
        ``forward(x)``: x ``(batch, T)`` int64 ids, T <= ``context``; returns logits ``(batch, T, V)``.

    Example:
        >>> import torch
        >>> from gradclip_book.text import CharTransformer
        >>> model = CharTransformer(10, width=16, layers=2, heads=2, context=8)
        >>> tuple(model(torch.zeros(3, 8, dtype=torch.long)).shape)
        (3, 8, 10)
    """

    def __init__(self, vocab: int, width: int = 64, layers: int = 2, heads: int = 4, context: int = 64,
                 qk_norm: bool = False) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"width ({width}) must be divisible by heads ({heads})")
        self.context = context
        self.token = nn.Embedding(vocab, width)
        self.position = nn.Embedding(context, width)
        self.blocks = nn.ModuleList(_Block(width, heads, qk_norm) for _ in range(layers))
        self.ln_f = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = x.shape[1]
        if t > self.context:
            raise ValueError(f"input of {t} characters exceeds the context of {self.context}")
        h = self.token(x) + self.position(torch.arange(t, device=x.device))
        for block in self.blocks:
            h = block(h)
        return self.head(self.ln_f(h))

    @torch.no_grad()
    def max_attention_logit(self, x: torch.Tensor) -> float:
        """The largest attention logit of any block, head and (unmasked) position on the input ``x``."""
        h = self.token(x) + self.position(torch.arange(x.shape[1], device=x.device))
        largest = -math.inf
        for block in self.blocks:
            logits = block.attention_logits(h)
            largest = max(largest, float(logits[torch.isfinite(logits)].max()))
            h = block(h)
        return largest
