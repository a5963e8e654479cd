"""Checkers for the book's prediction-first exercises.

Each ``check_*`` function compares a reader's answer with a value computed
here, from the same law or experiment the chapter uses, and prints whether it
is right (with a hint when it is not) without printing the answer. Each returns
True or False, so the book's own tests can verify the checkers.
"""

from __future__ import annotations

import math

from .depth import predicted_layer_factor
from .families import angle_degrees, clip_vector
from .rnn import GAMMA
from .smoothness import quartic_steps


def _answers() -> dict[str, float]:
    return {
        "decades": 20 * math.log10(predicted_layer_factor(1.2, "linear", "xavier", 64)),
        "relu_xavier": predicted_layer_factor(1.0, "relu", "xavier", 64),
        "sigmoid_radius": 1.0 / GAMMA["sigmoid"],
        "clipped_steps": float(quartic_steps(50.0, 0.1, max_norm=1.0)),
        "value_angle": angle_degrees([4.0, 1.0], clip_vector([4.0, 1.0], 1.0, "value")),
    }


def answer(name: str) -> float:
    """The value a checker accepts (for tests; reading it spoils the exercise).

    Args:
        name: ``decades``, ``relu_xavier``, ``sigmoid_radius``, ``clipped_steps`` or ``value_angle``.

    Returns:
        The expected answer.

    Example:
        >>> from gradclip_book.exercises import answer
        >>> answer("sigmoid_radius") > 1
        True
    """
    return _answers()[name]


def _check(name: str, given: object, tolerance: float, relative: bool, hint: str) -> bool:
    if given is None or isinstance(given, bool) or not isinstance(given, (int, float)) or not math.isfinite(given):
        print("Replace None with your prediction, a number, and run the cell again.")
        return False
    expected = _answers()[name]
    error = abs(given - expected) / (abs(expected) if relative else 1.0)
    if error <= tolerance:
        print("Correct.")
        return True
    direction = "high" if given > expected else "low"
    print(f"Not quite: your answer is too {direction}. Hint: {hint}")
    return False


def check_decades(given: float | None) -> bool:
    r"""Exercise: a linear network, Xavier initialisation, gain 1.2, depth 20, probe loss.

    By how many decades (powers of ten) is :math:`\|\partial J/\partial h_0\|` larger
    than :math:`\|\partial J/\partial h_{20}\|`? Accepted within 0.25 decades.

    Args:
        given: the reader's prediction.

    Returns:
        Whether it is right.

    Example:
        >>> from gradclip_book.exercises import check_decades
        >>> check_decades(0.0)
        Not quite: your answer is too low. Hint: each layer multiplies the norm by about the gain; a decade is a factor of 10, so count log10 of the gain per layer.
        False
    """
    return _check("decades", given, 0.25, False,
                  "each layer multiplies the norm by about the gain; a decade is a factor of 10, "
                  "so count log10 of the gain per layer.")


def check_relu_xavier(given: float | None) -> bool:
    r"""Exercise: the per-layer factor of a ReLU network with Xavier initialisation and gain 1.

    Accepted within 5%.

    Args:
        given: the reader's prediction of the factor.

    Returns:
        Whether it is right.

    Example:
        >>> from gradclip_book.exercises import check_relu_xavier
        >>> check_relu_xavier(1.0)
        Not quite: your answer is too high. Hint: Xavier is matched to a linear unit; a ReLU passes the gradient through only half of its units.
        False
    """
    return _check("relu_xavier", given, 0.05, True,
                  "Xavier is matched to a linear unit; a ReLU passes the gradient through only half of its units.")


def check_sigmoid_radius(given: float | None) -> bool:
    r"""Exercise: below which largest singular value of :math:`W_\text{rec}` must a sigmoid RNN's gradient vanish?

    Accepted within 2%.

    Args:
        given: the reader's prediction.

    Returns:
        Whether it is right.

    Example:
        >>> from gradclip_book.exercises import check_sigmoid_radius
        >>> check_sigmoid_radius(1.0)
        Not quite: your answer is too low. Hint: each step multiplies by at most gamma times the largest singular value; what is the largest slope of the sigmoid?
        False
    """
    return _check("sigmoid_radius", given, 0.02, True,
                  "each step multiplies by at most gamma times the largest singular value; "
                  "what is the largest slope of the sigmoid?")


def check_clipped_steps(given: float | None) -> bool:
    r"""Exercise: clipped descent on :math:`x^4` (:math:`\eta = 0.1`, c = 1) from :math:`x_0 = 50`.

    How many steps until :math:`f < 10^{-4}`? Accepted within 15%.

    Args:
        given: the reader's prediction.

    Returns:
        Whether it is right.

    Example:
        >>> from gradclip_book.exercises import check_clipped_steps
        >>> check_clipped_steps(10)
        Not quite: your answer is too low. Hint: while the gradient is above c, every step moves exactly eta * c.
        False
    """
    return _check("clipped_steps", given, 0.15, True,
                  "while the gradient is above c, every step moves exactly eta * c.")


def check_value_angle(given: float | None) -> bool:
    r"""Exercise: value-clip :math:`g = (4, 1)` at v = 1. By how many degrees does its direction turn?

    Accepted within 2 degrees.

    Args:
        given: the reader's prediction, in degrees.

    Returns:
        Whether it is right.

    Example:
        >>> from gradclip_book.exercises import check_value_angle
        >>> check_value_angle(0)
        Not quite: your answer is too low. Hint: write down the clipped vector, then compare the angles both vectors make with the first axis.
        False
    """
    return _check("value_angle", given, 2.0, False,
                  "write down the clipped vector, then compare the angles both vectors make with the first axis.")
