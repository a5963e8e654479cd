"""gradclip: correct, fast gradient clipping for PyTorch.

Drop-in replacements for ``torch.nn.utils`` clipping that are right where
torch is silently wrong (half-precision norms, negative thresholds), never
synchronise with the device on their default paths, and batch their kernels;
plus the methods the book teaches (AGC, per-tensor, soft, quantized,
per-sample) and adaptive clippers (AutoClip, ZClip, a spike guard).
"""

from .agc import UnitSpec, adaptive_clip_grad_, agc_parameters, agc_unit_dims
from .autoclip import AutoClip
from .clip import clip_grad_norm_, clip_grad_norm_report_, clip_grad_value_, clip_grads_with_norm_
from .clippers import Clipper
from . import distributed
from .flat import GradBuffer
from .guard import SpikeGuard
from .layerwise import clip_grad_block_rms_, clip_grad_norm_per_tensor_
from .monitor import GradientMonitor
from .tuning import clipped_fraction, should_lower_lr, suggest_threshold
from .norms import get_total_norm
from .per_sample import PerSampleClipResult, per_sample_clip_grad_, per_sample_clipped_grad, per_sample_grads
from .quantize import qsgd_quantize_grad_, sign_grad_
from .result import ClipResult
from .soft import soft_clip_grad_norm_, soft_clip_grad_value_
from .zclip import ZClip

__version__ = "0.1.0"

__all__ = [
    "distributed",
    "AutoClip",
    "ClipResult",
    "Clipper",
    "GradBuffer",
    "GradientMonitor",
    "PerSampleClipResult",
    "SpikeGuard",
    "UnitSpec",
    "ZClip",
    "adaptive_clip_grad_",
    "agc_parameters",
    "agc_unit_dims",
    "clip_grad_block_rms_",
    "clip_grad_norm_",
    "clip_grad_norm_per_tensor_",
    "clip_grad_norm_report_",
    "clip_grad_value_",
    "clip_grads_with_norm_",
    "clipped_fraction",
    "get_total_norm",
    "per_sample_clip_grad_",
    "per_sample_clipped_grad",
    "per_sample_grads",
    "qsgd_quantize_grad_",
    "should_lower_lr",
    "sign_grad_",
    "soft_clip_grad_norm_",
    "soft_clip_grad_value_",
    "suggest_threshold",
]
