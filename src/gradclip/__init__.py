"""gradclip: correct, fast gradient clipping for PyTorch.

Drop-in replacements for ``torch.nn.utils`` clipping that are right where
torch is silently wrong (half-precision norms, negative thresholds), never
synchronise with the device on their default paths, and batch their kernels.
"""

from .clip import clip_grad_norm_, clip_grad_value_, clip_grads_with_norm_
from .flat import GradBuffer
from .norms import get_total_norm

__version__ = "0.1.0"

__all__ = [
    "GradBuffer",
    "clip_grad_norm_",
    "clip_grad_value_",
    "clip_grads_with_norm_",
    "get_total_norm",
]
