r"""gradclip: correct, fast gradient clipping for PyTorch.

Drop-in replacements for ``torch.nn.utils`` clipping that are right where
torch is silently wrong (half-precision norms, negative thresholds), never
synchronise with the device on their default paths, and batch their kernels;
plus the methods the book teaches (AGC, per-tensor, soft, quantized,
per-sample) and adaptive clippers (AutoClip, ZClip, a spike guard).

**Conventions shared by every function.** The rules below hold everywhere
and are not repeated in each docstring.

* *Inputs.* ``parameters`` is a tensor or an iterable of tensors (a
  generator is consumed once); the functions act on their ``.grad`` in place
  and skip tensors whose ``.grad`` is ``None``. In-place functions end with
  ``_``. Gradients must be dense (strided); a sparse one raises ``TypeError``
  naming it.
* *Outputs.* Norms are 0-dim tensors on the first gradient's device, in the
  gradients' dtype for float32/float64 and in float32 for float16/bfloat16
  (which are accumulated in float32, so a norm above 65504 is not ``inf``).
  Norms are in the gradients' own units (loss per parameter unit).
* *No host-device synchronisation* on default paths: nothing reads a
  tensor's value on the host, so a step costs no sync on an accelerator.
  Options that must read a value say so (``error_if_nonfinite=True``).
* *Non-finite values* are never turned into finite ones silently: a NaN in
  a gradient makes the norm NaN and the clipped gradients NaN; an inf makes
  the norm inf, the factor 0, and the inf entries NaN, as in torch. Stateful
  clippers keep non-finite norms out of their statistics.
* *Distributed training*: call the same function on every rank. DDP needs
  nothing; DTensor gradients (FSDP2, tensor parallelism) are reduced to the
  global norm automatically; hand-sharded gradients take ``process_group=``
  and ``replicated=``. The details, and the formula, are in
  :mod:`gradclip.distributed`.
* *Arguments* are checked on the host; an error names the argument, the
  values it accepts and what to do.
"""

from .adagc import AdaGC, AdaGCResult
from .agc import UnitSpec, adaptive_clip_grad_, agc_parameters, agc_unit_dims
from .autoclip import AutoClip
from .clip import clip_grad_norm_, clip_grad_norm_report_, clip_grad_value_, clip_grads_with_norm_
from .clippers import Clipper
from . import distributed
from .flat import GradBuffer
from .guard import SpikeGuard
from .layerwise import clip_grad_block_rms_, clip_grad_norm_per_tensor_
from .monitor import GradientMonitor
from .update_clip import UpdateClip, UpdateClipResult
from .tuning import clipped_fraction, should_lower_lr, suggest_threshold
from .norms import get_total_norm
from .per_sample import PerSampleClipResult, per_sample_clip_grad_, per_sample_clipped_grad, per_sample_grads
from .quantize import qsgd_quantize, qsgd_quantize_grad_, sign_grad_
from .result import ClipResult
from .soft import soft_clip_grad_norm_, soft_clip_grad_value_
from .zclip import ZClip

__version__ = "0.1.0"

__all__ = [
    "distributed",
    "AdaGC",
    "AdaGCResult",
    "AutoClip",
    "ClipResult",
    "Clipper",
    "GradBuffer",
    "GradientMonitor",
    "PerSampleClipResult",
    "SpikeGuard",
    "UnitSpec",
    "UpdateClip",
    "UpdateClipResult",
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
    "qsgd_quantize",
    "qsgd_quantize_grad_",
    "should_lower_lr",
    "sign_grad_",
    "soft_clip_grad_norm_",
    "soft_clip_grad_value_",
    "suggest_threshold",
]
