"""gradclip_book: the experiments, figures and exercises of the book *Exploding gradients and how to clip them*.

A separate package from :mod:`gradclip` (the clipping library), installed by
the ``book`` extra (``pip install -e ".[book]"``), which brings plotly,
scikit-learn and ipywidgets. Readers can call any experiment from their own
notebook; the book's tests re-run them to check what the chapters state.

The package has two kinds of parts.

**Shared by every chapter** (import these to run the book's experiments or your own):

* :mod:`~gradclip_book.harness`: the one experiment harness. Data with its split and batch order, model and
  optimizer factories, the clipping methods behind one interface, the training loop (``harness.train``: any
  module, optimizer, batches and loss, with hooks, warm-up, divergence detection and evaluation), choosing
  settings on validation data (``harness.select_best``) and precomputed grids (``harness.run_grid``).
* :mod:`~gradclip_book.figures`: interactive plotly figures that work in the static book (the Explorer).
* :mod:`~gradclip_book.exercise`, :mod:`~gradclip_book.exercises`: the exercise widget that works in the static
  book, and the chapters' exercises (answers, hints, solutions) with their checkers.
* :mod:`~gradclip_book.reproducibility`: pins PyTorch's CPU kernels to AVX2 on import, and checks a re-run
  against a stored run (exactly on the grids' kind of machine, its first steps on others).
* :mod:`~gradclip_book.data`: the data sets, loaded from installed packages;
  :mod:`~gradclip_book.timing`: the one interleaved timer (also behind ``benchmarks/timing.py``).

**Each chapter's experiments and figures** (one module or pair of modules per chapter):

* chapter 2: :mod:`~gradclip_book.depth` (gradients through deep linear/tanh/ReLU networks),
  :mod:`~gradclip_book.rnn` (gradients through time), :mod:`~gradclip_book.cliff` (Pascanu et al.'s one-unit
  RNN), :mod:`~gradclip_book.quartic` (gradient descent on :math:`x^4`), :mod:`~gradclip_book.smoothness`
  (step counts, stable learning rates, local smoothness), :mod:`~gradclip_book.families` (every method on one
  gradient stream), :mod:`~gradclip_book.principle_figures`;
* chapter 3: :mod:`~gradclip_book.implementation`, :mod:`~gradclip_book.implementation_figures`,
  :mod:`~gradclip_book.frameworks` (Lightning, Accelerate), :mod:`~gradclip_book.bugzoo` (real clipping bugs);
* chapter 4: :mod:`~gradclip_book.images` (one CNN run: config in, harness run out),
  :mod:`~gradclip_book.images_grid` (its precomputed runs: ``python -m gradclip_book.images_grid``),
  :mod:`~gradclip_book.images_figures` (its analysis and figures); the deep MLP of its first illustration in
  :mod:`~gradclip_book.classification` (one config in, one record out), :mod:`~gradclip_book.grids` (its
  precomputed grids and chapter 5.1's: ``python -m gradclip_book.grids classification|optimization``) and
  :mod:`~gradclip_book.classification_figures`;
* chapter 5.1: :mod:`~gradclip_book.performance`, :mod:`~gradclip_book.performance_figures`;
  5.2: :mod:`~gradclip_book.scalability`, :mod:`~gradclip_book.scalability_figures`,
  :mod:`~gradclip_book.dist_demo`; 5.3: :mod:`~gradclip_book.safety`, :mod:`~gradclip_book.safety_figures`;
* chapter 6: :mod:`~gradclip_book.conclusion` (the decision guide, its evidence read from the other chapters),
  :mod:`~gradclip_book.recent_methods` (AdaGC, update clipping and OLMo-core's skip rule on chapter 4.11's
  transformer: ``python -m gradclip_book.recent_methods``).
* chapter 4's text page (its second application): :mod:`~gradclip_book.text` (the corpus, its split and
  batches, the models), :mod:`~gradclip_book.text_runs` (one config in, one record out),
  :mod:`~gradclip_book.text_grid` (its precomputed runs: ``python -m gradclip_book.text_grid``),
  :mod:`~gradclip_book.text_figures` (its analysis and figures).
"""

from .reproducibility import pin_cpu_kernels

pin_cpu_kernels()  # before any module below runs a torch operation: see reproducibility

from .cliff import cliff_descent, cliff_gradient, cliff_loss  # noqa: E402
from .depth import deep_gradients, depth_profile, fit_layer_ratio, predicted_layer_factor, predicted_norms  # noqa: E402
from .families import angle_degrees, apply_method, clip_vector, record_gradient_stream  # noqa: E402
from .quartic import DIVERGED, Run, quartic_descent  # noqa: E402
from .rnn import gradient_through_time  # noqa: E402
from .smoothness import largest_stable_lr, local_smoothness, quartic_steps, smoothness_along_training  # noqa: E402

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
