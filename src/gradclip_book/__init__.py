"""gradclip_book: the experiments, figures and exercises of the book *Exploding gradients and how to clip them*.

A separate package from :mod:`gradclip` (the clipping library), installed by
the ``book`` extra (``pip install -e ".[book]"``), which brings plotly,
scikit-learn and ipywidgets. Readers can call any experiment from their own
notebook; the book's tests re-run them to check what the chapters state.

Modules, one per experiment or concern:

* :mod:`~gradclip_book.data`: the digits data set, loaded from scikit-learn.
* :mod:`~gradclip_book.depth`: gradients through deep linear/tanh/ReLU networks.
* :mod:`~gradclip_book.rnn`: gradients through time in a recurrent network.
* :mod:`~gradclip_book.cliff`: Pascanu et al.'s one-unit RNN and its cliff.
* :mod:`~gradclip_book.quartic`: gradient descent on :math:`x^4`, clipped or not.
* :mod:`~gradclip_book.smoothness`: step counts, stable learning rates and local smoothness.
* :mod:`~gradclip_book.families`: every clipping method applied to one recorded gradient stream.
* :mod:`~gradclip_book.principle_figures`: the figures and run grids of chapter 2.
* :mod:`~gradclip_book.implementation`: chapter 3's measured steps and clipping placements.
* :mod:`~gradclip_book.implementation_figures`: chapter 3's two-dimensional clipping playground.
* :mod:`~gradclip_book.frameworks`: gradclip in PyTorch Lightning and Hugging Face Accelerate.
* :mod:`~gradclip_book.bugzoo`: real clipping bugs from public projects, reproduced and measured.
* :mod:`~gradclip_book.classification`: chapter 4's training harness (one config in, one record out).
* :mod:`~gradclip_book.grids`: the precomputed grids (``python -m gradclip_book.grids classification|optimization``).
* :mod:`~gradclip_book.classification_figures`: chapter 4's figures, read from the grid.
* :mod:`~gradclip_book.performance`, :mod:`~gradclip_book.performance_figures`: chapter 5.1 (learning rate,
  warm-up, Adam, the cost of clipping timed at build time).
* :mod:`~gradclip_book.scalability`, :mod:`~gradclip_book.scalability_figures`: chapter 5.2 (AGC across batch
  sizes, structure-aware and per-sample clipping); :mod:`~gradclip_book.dist_demo`: its two-process torchrun run.
* :mod:`~gradclip_book.safety`, :mod:`~gradclip_book.safety_figures`: chapter 5.3 (guards against injected
  faults: ``python -m gradclip_book.safety grid`` precomputes its runs).
* :mod:`~gradclip_book.conclusion`: chapter 6's decision guide, its evidence read from the other chapters.
* :mod:`~gradclip_book.timing`: the one interleaved timer (also behind ``benchmarks/timing.py``).
* :mod:`~gradclip_book.exercises`: the chapters' exercises (answers, hints, solutions) and their checkers.
* :mod:`~gradclip_book.exercise`: the exercise widget that works in the static book.
* :mod:`~gradclip_book.figures`: interactive plotly figures that work in the static book.
"""

from .cliff import cliff_descent, cliff_gradient, cliff_loss
from .depth import deep_gradients, depth_profile, fit_layer_ratio, predicted_layer_factor, predicted_norms
from .families import angle_degrees, apply_method, clip_vector, record_gradient_stream
from .quartic import DIVERGED, Run, quartic_descent
from .rnn import gradient_through_time
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
