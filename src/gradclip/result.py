"""What a clipping step did, as tensors: readable later without a sync now."""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["ClipResult"]


@dataclass(frozen=True)
class ClipResult:
    r"""The outcome of one clipping call, every field a 0-dim tensor on the device.

    Reading a field's value (``float(result.norm)``) synchronises with the
    device; keeping the object, or stacking fields over many steps and reading
    them once, does not.

    Attributes:
        norm: the gradient norm before clipping, :math:`\|g\|`, in the dtype a
            global norm is returned in (float32, float64 for float64 gradients).
        threshold: the threshold c that was applied (``inf`` when none); in a
            stateful clipper's state dtype (float64 by default) on every step, so
            thresholds stacked across the warm-up keep one dtype.
        scale: the factor the gradients were multiplied by, in [0, 1] for
            norm clipping (:math:`\min(1, c/(\|g\|+10^{-6}))`; AutoClip:
            :math:`c/\|g\|` when :math:`\|g\| > c`, else 1), in the norm's dtype.

    References:
        * Pascanu, Mikolov and Bengio (2013), "On the difficulty of training recurrent neural networks", `arXiv:1211.5063 <https://arxiv.org/abs/1211.5063>`__.

    Example:
        >>> import torch
        >>> from gradclip.result import ClipResult
        >>> r = ClipResult(norm=torch.tensor(5.0), threshold=torch.tensor(1.0), scale=torch.tensor(0.2))
        >>> bool(r.clipped), float(r.post_norm)
        (True, 1.0)
    """

    norm: torch.Tensor
    threshold: torch.Tensor
    scale: torch.Tensor

    @property
    def clipped(self) -> torch.Tensor:
        r"""A bool tensor: whether the gradients were scaled down (``scale < 1``).

        With torch's factor :math:`c/(\|g\|+10^{-6})` (``clip_grad_norm_report_``) this
        includes norms up to :math:`10^{-6}` below the threshold, which
        :func:`gradclip.clipped_fraction` counting norms against a threshold
        (``norm > threshold``) does not; AutoClip, ZClip and SpikeGuard scale
        only above their threshold, so for them both counts agree.
        """
        return self.scale < 1

    def to_dict(self) -> dict[str, float | bool]:
        """Plain Python values for logging (``norm``, ``threshold``, ``scale``, ``clipped``, ``post_norm``).

        Reads the values on the host: one device sync. To log every step without
        syncing, keep the results and convert them later (or stack their fields).
        """
        return {"norm": float(self.norm), "threshold": float(self.threshold), "scale": float(self.scale),
                "clipped": bool(self.clipped), "post_norm": float(self.post_norm)}

    @property
    def post_norm(self) -> torch.Tensor:
        """The norm after clipping, :math:`s\\,\\|g\\|`."""
        return self.norm * self.scale
