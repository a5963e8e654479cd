"""Each example's gradient norm without over- or underflow, and the factors DP-SGD scales each example by.

Shared by the two ways :mod:`gradclip.per_sample` computes per-example norms: from materialised
per-example gradients (``vmap``) and from ghost norms (:mod:`gradclip._ghost`). The norms are
combined from parts (row norms of 2-D tensors with one row per example, products of two of them,
or norms computed safely already), as :mod:`gradclip._norms` does for whole tensors.

:class:`ClipRule` is the clipping function: Abadi et al.'s ``min(1, C / (||g_i|| + 1e-6))`` or the
automatic clipping of Bu et al., ``C / (||g_i|| + gamma)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ._norms import accumulation_dtype, exact_on_host, scaled_norm, suspicious, wide_dtype
from ._scaling import clip_coefficient


@dataclass(frozen=True)
class ClipRule:
    """The factor each example's gradient is multiplied by, from its norm and the threshold C.

    ``automatic=False``: :math:`\\min(1, C/(\\|g_i\\| + 10^{-6}))` (Abadi et al. 2016; Opacus).
    ``automatic=True``: :math:`C/(\\|g_i\\| + \\gamma)` (AUTO-S, Bu et al. 2023; fastDP's
    ``clipping_fn='automatic'``, ``numerical_stability_constant``).
    """

    automatic: bool = False
    gamma: float = 0.01

    def factors(self, max_norm: float, norms: torch.Tensor) -> torch.Tensor:
        if self.automatic:
            return max_norm / (norms + self.gamma)
        return clip_coefficient(max_norm, norms)


ABADI = ClipRule()


def max_scaled(x: torch.Tensor, dims: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` (in its accumulation dtype) divided by each example's largest magnitude over ``dims``, and those
    magnitudes (wide dtype, shape (B,)).

    A zero, inf or NaN magnitude divides by 1 instead, so zeros stay zeros and
    non-finite values stay non-finite.
    """
    acc = accumulation_dtype(x.dtype)
    if x.numel() == 0:
        return x.to(acc), torch.ones(x.shape[0], dtype=wide_dtype(x.device), device=x.device)
    largest = torch.linalg.vector_norm(x, math.inf, dim=dims, keepdim=True).to(acc)
    largest = torch.where((largest > 0) & torch.isfinite(largest), largest, torch.ones_like(largest))
    return x / largest, largest.reshape(-1).to(wide_dtype(x.device))


def scaled_row_norms(rows: torch.Tensor) -> torch.Tensor:
    """The 2-norm of each row of a 2-D tensor, each row divided by its largest magnitude first (wide dtype)."""
    if rows.shape[1] == 0:
        return torch.zeros(rows.shape[0], dtype=wide_dtype(rows.device), device=rows.device)
    scaled, largest = max_scaled(rows, dims=(1,))
    # an inf entry divides by 1 and keeps the norm inf (NaN with a NaN), as it should
    return torch.linalg.vector_norm(scaled, dim=1).to(largest.dtype) * largest


class ExampleNorms:
    """Each example's gradient norm, from parts, without over- or underflow.

    The parts are row norms of 2-D tensors (one row per example), products of two of them
    (a ghost norm), or norms already computed safely (wide dtype).

    On the CPU (where a host read costs no sync) the row norms come from one kernel in the
    accumulation dtype and are combined in it, as in torch, and one host read checks the
    result: every row norm and every combined norm within [1e-15, 1e18] (the low end as
    :func:`gradclip._norms.suspicious`), so that no square over- or underflowed on the way,
    and no factor underflows float32. Otherwise, the row norms that may have over- or underflowed are
    recomputed with their largest entry factored out and everything is combined again in the
    wide dtype. Elsewhere (no host read) each row is divided by its largest magnitude before
    its norm is taken (two more passes) and the parts are combined in the wide dtype, with
    the largest factored out when the gradients are as wide as it.
    """

    # float32 squares of norms in this range neither overflow nor underflow (LOW as _norms.suspicious)
    LOW, HIGH = torch.finfo(torch.float32).tiny ** 0.5 * 1e4, 1e18

    def __init__(self, batch: int, device: torch.device) -> None:
        self.batch, self.device = batch, device
        self.on_host = exact_on_host(device)
        self.wide = wide_dtype(device)
        self.sources: list[torch.Tensor] = []
        self.row_norms: list[torch.Tensor] = []
        self.pairs: list[tuple[int, int | None]] = []
        self.exact: list[torch.Tensor] = []
        self.narrow = self.wide == torch.float64  # every part from a dtype narrower than the wide one

    def rows(self, rows: torch.Tensor) -> int:
        """Register the rows of a 2-D tensor (B, n); returns the index of their norms."""
        acc = accumulation_dtype(rows.dtype)
        self.narrow = self.narrow and acc != torch.float64
        self.sources.append(rows)
        if self.on_host:
            self.row_norms.append(torch.linalg.vector_norm(rows, dim=1, dtype=acc))
        else:
            self.row_norms.append(scaled_row_norms(rows).to(self.device))
        return len(self.sources) - 1

    def add(self, first: int, second: int | None = None) -> None:
        """A part: the norms of rows ``first``, or their product with those of rows ``second``."""
        self.pairs.append((first, second))

    def add_rows(self, rows: torch.Tensor) -> None:
        """A part: the norms of the rows of a 2-D tensor (B, n)."""
        self.add(self.rows(rows))

    def add_exact(self, norms: torch.Tensor) -> None:
        """A part computed without over- or underflow already (wide dtype)."""
        self.exact.append(norms.to(self.device))

    def _combined(self, row_norms: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        parts = [row_norms[first] if second is None else row_norms[first] * row_norms[second]
                 for first, second in self.pairs] + self.exact
        if not parts:
            return torch.zeros(self.batch, dtype=dtype, device=self.device)
        if len(parts) == 1 and self.narrow:
            return parts[0].abs()
        stacked = torch.stack(parts, dim=1)
        if self.narrow or dtype != self.wide:
            return torch.linalg.vector_norm(stacked, dim=1)
        return scaled_norm(stacked, 2.0, dim=(1,))

    def finish(self, max_norm: float, rule: ClipRule = ABADI) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """The norms and factors, and whether a factor would underflow float32 (CPU only).

        In float32 from the CPU's fast path, else in the wide dtype.
        """
        # a factor below float32's smallest normal number: norm > max_norm / tiny
        limit = max_norm / torch.finfo(torch.float32).tiny if max_norm > 0 else math.inf
        fast = (self.on_host and self.narrow and not self.exact and self.batch > 0 and self.row_norms
                and {(n.dtype, n.device) for n in self.row_norms} == {(torch.float32, self.device)})
        if fast:
            norms = self._combined(self.row_norms, torch.float32)
            smallest, largest = torch.aminmax(torch.cat([*self.row_norms, norms]))
            # (a NaN fails this test, and takes the careful path to its NaN result)
            if smallest.item() >= self.LOW and largest.item() <= min(self.HIGH, limit):
                return norms, rule.factors(max_norm, norms), False
        if self.on_host:
            row_norms = [self._repaired(k) for k in range(len(self.sources))]
        else:
            row_norms = self.row_norms
        norms = self._combined(row_norms, self.wide)
        scales = rule.factors(max_norm, norms)
        in_wide = self.on_host and self.batch > 0 and bool(norms.amax() > limit)
        return norms, scales, in_wide

    def _repaired(self, index: int) -> torch.Tensor:
        """Row norms ``index`` in the wide dtype, the ones that may have over- or underflowed recomputed (CPU)."""
        norms = self.row_norms[index].to(self.device, self.wide)
        suspect = suspicious(norms, 2.0, torch.float32)
        if bool(suspect.any()):
            rows = suspect.nonzero().flatten()
            norms[rows] = scaled_norm(self.sources[index][rows.to(self.sources[index].device)], 2.0, dim=(1,)).to(
                self.device)
        return norms


class Factors:
    """The clipping factors (wide dtype) cast to each gradient's dtype, once per dtype and device.

    ``in_wide``: on the CPU, a factor that the cast would flush below float32's smallest
    normal number (a norm above about 1e38 times ``max_norm``) sends the weighted sums of
    narrower dtypes to the wide dtype instead, so that no finite gradient is zeroed.
    Elsewhere (no host read) such a factor loses precision in the cast.
    """

    def __init__(self, scales: torch.Tensor, in_wide: bool, cast: torch.Tensor) -> None:
        self.scales, self.in_wide = scales, in_wide
        self._cast = {(cast.dtype, cast.device): cast}

    def get(self, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, bool]:
        """The factors to multiply by, and whether to multiply in the wide dtype (then they are wide)."""
        if self.in_wide and dtype != self.scales.dtype:
            return self.scales.to(device), True
        key = (dtype, device)
        if key not in self._cast:
            self._cast[key] = self.scales.to(device=device, dtype=dtype)
        return self._cast[key], False
