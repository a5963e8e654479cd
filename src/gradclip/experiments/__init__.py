"""Small deterministic experiments the book runs, built on the real clipping functions.

They live in the library so that chapters share them, readers can call them
from their own notebooks, and tests can re-run any grid point a chapter saved.
"""

from .depth import deep_gradients, depth_profile, fit_layer_ratio, predicted_layer_factor, predicted_norms
from .families import angle_degrees, apply_method, clip_vector, record_gradient_stream
from .quartic import DIVERGED, Run, quartic_descent
from .rnn import cliff_descent, cliff_gradient, cliff_loss, gradient_through_time
from .smoothness import largest_stable_lr, local_smoothness, quartic_steps, smoothness_along_training

__all__ = [
    "DIVERGED",
    "Run",
    "angle_degrees",
    "apply_method",
    "cliff_descent",
    "cliff_gradient",
    "cliff_loss",
    "clip_vector",
    "deep_gradients",
    "depth_profile",
    "fit_layer_ratio",
    "gradient_through_time",
    "largest_stable_lr",
    "local_smoothness",
    "predicted_layer_factor",
    "predicted_norms",
    "quartic_descent",
    "quartic_steps",
    "record_gradient_stream",
    "smoothness_along_training",
]
