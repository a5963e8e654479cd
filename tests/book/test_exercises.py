"""The exercise checkers (gradclip_book.exercises): they accept the answer, never print it, and the answers are right."""

from __future__ import annotations

import contextlib
import io
import math

import pytest

from gradclip_book import exercises, quartic_descent


@pytest.mark.parametrize("name", ["decades", "relu_gain", "sigmoid_radius", "clipped_steps", "value_angle"])
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
    assert exercises.answer("relu_gain") == pytest.approx(math.sqrt(2))
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


@pytest.mark.parametrize("name", ["decades", "relu_gain", "sigmoid_radius", "clipped_steps", "value_angle"])
def test_static_widget_accepts_what_the_checker_accepts(name):
    widget = exercises.widget(name, 1)
    right = exercises.answer(name)
    assert widget.answer == right and widget.hint and widget.solution_md
    page = widget._repr_html_()
    assert "gc-answer" in page and "gc-solution" in page and "Check" in page
    with contextlib.redirect_stdout(io.StringIO()):
        for factor in [0.5, 0.8, 0.84, 0.9, 0.96, 0.99, 1.0, 1.01, 1.04, 1.1, 1.2, 1.5, 2.0]:  # off the boundaries
            for given in (right * factor, right * factor + 0.3):
                assert widget.accepts(given) == exercises.check(name, given), given


def test_clipped_steps_widget_explains_each_line_of_reasoning():
    widget = exercises.widget("clipped_steps", 4)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert widget.check(500.0) and widget.check(exercises.answer("clipped_steps"))
    text = out.getvalue()
    assert "near the minimum" in text and "exact count" in text and "500" not in text
    assert len(widget.notes) == 2 and "notes" not in widget.prompt
