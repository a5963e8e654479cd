"""The exercise checkers (gradclip_book.exercises): they accept the answer, never print it, and the answers are right."""

from __future__ import annotations

import contextlib
import io
import math

import pytest

from gradclip_book import exercises, quartic_descent


@pytest.mark.parametrize("name", ["decades", "relu_xavier", "sigmoid_radius", "clipped_steps", "value_angle"])
def test_checkers_accept_the_answer_and_never_print_it(name):
    check = getattr(exercises, f"check_{name}")
    right = exercises.answer(name)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert check(right) is True
        assert check(right * 1.5 + 1) is False
        assert check(None) is False
    for shown in (f"{right:g}", f"{right:.2f}", f"{right:.1f}"):
        assert shown not in out.getvalue()


def test_exercise_answers_agree_with_independent_computations():
    assert exercises.answer("decades") == pytest.approx(20 * math.log10(1.2))
    assert exercises.answer("relu_xavier") == pytest.approx(1 / math.sqrt(2))
    assert exercises.answer("sigmoid_radius") == pytest.approx(4.0)
    assert exercises.answer("value_angle") == pytest.approx(math.degrees(math.atan2(1, 1) - math.atan2(1, 4)))
    run = quartic_descent(50.0, 0.1, max_norm=1.0, steps=700)
    assert exercises.answer("clipped_steps") == run.steps_to(1e-4)


def test_clipped_steps_accepts_the_walk_and_the_exact_count_and_says_why():
    walk = 50.0 / (0.1 * 1.0)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert exercises.check_clipped_steps(walk) is True
        assert exercises.check_clipped_steps(exercises.answer("clipped_steps")) is True
    assert "near the minimum" in out.getvalue() and "613" not in out.getvalue() and "500" not in out.getvalue()


def test_every_exercise_has_answers_hint_and_solution_in_one_structure():
    for name in exercises.names():
        ex = exercises.exercise(name)
        assert ex.answers and ex.hint and ex.question and ex.solution
        assert all(a.tolerance > 0 for a in ex.answers)
