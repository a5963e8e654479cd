"""The book's prediction-first exercises: one data structure, and checkers built from it.

:data:`EXERCISES` holds, per exercise, its question, every accepted answer
(each with its tolerance and the feedback a reader who gives it sees), a hint
for a wrong answer and the worked solution. The ``check_*`` functions compare
a reader's number with those answers and print whether it is right (with the
hint when it is not) without printing the answer; each returns True or False,
so the book's own tests can verify them. :func:`widget` builds the static
:class:`~gradclip_book.exercise.Exercise` (answer box, Check button, hint,
solution behind a toggle; no kernel) from the same data, with the feedback of
each accepted line of reasoning.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from functools import cache

from . import exercise as _static
from .depth import predicted_layer_factor
from .families import angle_degrees, clip_vector
from .rnn import GAMMA
from .smoothness import quartic_steps


@dataclass(frozen=True)
class Answer:
    """One accepted answer.

    Attributes:
        value: the number.
        tolerance: the accepted error, relative to ``value`` when ``relative``, else absolute.
        relative: whether ``tolerance`` is relative.
        feedback: what a reader who gives this answer is told (it never states the number).
    """

    value: float
    tolerance: float
    relative: bool = True
    feedback: str = "Correct."

    def accepts(self, given: float) -> bool:
        """Whether ``given`` lies within the tolerance of this answer."""
        error = abs(given - self.value) / (abs(self.value) if self.relative else 1.0)
        return error <= self.tolerance


@dataclass(frozen=True)
class Exercise:
    """One exercise: question, accepted answers, hint and worked solution.

    Attributes:
        name: the key in :data:`EXERCISES`.
        question: the question, in Markdown with TeX.
        answers: every accepted answer; the first is the exact one.
        hint: shown for a wrong answer.
        solution: the worked solution, in Markdown with TeX (it states the answer).
    """

    name: str
    question: str
    answers: tuple[Answer, ...]
    hint: str
    solution: str

    @property
    def exact(self) -> float:
        """The exact answer (the first accepted one)."""
        return self.answers[0].value


@cache
def _exercises() -> dict[str, Exercise]:
    decades = 20 * math.log10(predicted_layer_factor(1.2, "linear", "xavier", 64))
    relu_gain = 1.0 / predicted_layer_factor(1.0, "relu", "xavier", 64)
    sigmoid = 1.0 / GAMMA["sigmoid"]
    steps = float(quartic_steps(50.0, 0.1, max_norm=1.0))
    walk = 50.0 / (0.1 * 1.0)
    angle = angle_degrees([4.0, 1.0], clip_vector([4.0, 1.0], 1.0, "value"))
    items = [
        Exercise("decades",
                 r"A linear network with Xavier initialisation, gain $\kappa = 1.2$, depth 20, probe loss. "
                 r"By how many decades is $\lVert\partial J/\partial h_0\rVert$ larger than "
                 r"$\lVert\partial J/\partial h_{20}\rVert$?",
                 (Answer(decades, 0.25, relative=False),),
                 "each layer multiplies the norm by about the gain; a decade is a factor of 10, "
                 "so count log10 of the gain per layer.",
                 rf"Each layer multiplies by $\kappa = 1.2$, so 20 layers give $20 \log_{{10}} 1.2 = {decades:.2f}$ decades."),
        Exercise("relu_gain",
                 r"A ReLU network initialised with Xavier's $1/\sqrt n$ scale times a gain $\kappa$. Which gain "
                 r"keeps $\lVert\partial J/\partial h_l\rVert$ the same from layer to layer?",
                 (Answer(relu_gain, 0.03),),
                 "a ReLU passes the gradient through only half of its units, which halves its mean square; "
                 "which factor on the weights' standard deviation doubles the mean square again?",
                 rf"Half the units pass the gradient, so the per-layer factor is $\kappa/\sqrt 2$ (section 2.2); it is "
                 rf"1 for $\kappa = \sqrt 2 = {relu_gain:.3f}$. That is He's initialisation: a standard deviation "
                 rf"$\sqrt 2$ times Xavier's."),
        Exercise("sigmoid_radius",
                 r"A recurrent network with sigmoid units. Below which largest singular value of "
                 r"$W_\text{rec}$ is the gradient guaranteed to vanish?",
                 (Answer(sigmoid, 0.02),),
                 "each step multiplies by at most gamma times the largest singular value; "
                 "what is the largest slope of the sigmoid?",
                 rf"The sigmoid's slope is at most $\gamma = 1/4$, so $\gamma\lambda_1 < 1$ means $\lambda_1 < {sigmoid:g}$."),
        Exercise("clipped_steps",
                 r"Clipped gradient descent on $x^4$ with $\eta = 0.1$ and $c = 1$, from $x_0 = 50$. "
                 r"About how many steps until $f < 10^{-4}$? (Within 15% counts.)",
                 (Answer(steps, 0.15, feedback=(
                      "Correct: within 15% of the exact count. The walk x0/(eta c) alone predicts fewer steps: it "
                      "leaves out the last stretch near the minimum, where |4x^3| < c and the unclipped steps shrink.")),
                  Answer(walk, 0.15, feedback=(
                      "Correct: within 15% of the clipped walk x0/(eta c), the steps of full length eta c. The exact "
                      "count is about a fifth higher, because near the minimum |4x^3| < c and the steps shrink."))),
                 "while the gradient is above c, every step moves exactly eta * c.",
                 rf"While $\lvert 4x^3\rvert > c$ each step moves $\eta c = 0.1$, so the walk takes "
                 rf"$x_0/(\eta c) = {walk:.0f}$ steps; the last stretch, where the gradient is below $c$, is "
                 rf"unclipped and slow. The exact count is {steps:.0f}; both are accepted."),
        Exercise("value_angle",
                 r"Value-clip $g = (4, 1)$ at $v = 1$. By how many degrees does its direction turn?",
                 (Answer(angle, 2.0, relative=False),),
                 "write down the clipped vector, then compare the angles both vectors make with the first axis.",
                 rf"The clipped vector is $(1, 1)$ at 45°; $g$ is at $\arctan(1/4) = 14.0°$: it turns {angle:.1f}°."),
    ]
    return {e.name: e for e in items}


def exercise(name: str) -> Exercise:
    """The exercise called ``name`` (its answers spoil it).

    Example:
        >>> from gradclip_book.exercises import exercise
        >>> len(exercise("clipped_steps").answers)
        2
    """
    return _exercises()[name]


def names() -> list[str]:
    """The exercises' names, in the chapter's order."""
    return list(_exercises())


def answer(name: str) -> float:
    """The exact value a checker accepts (for tests; reading it spoils the exercise).

    Args:
        name: ``decades``, ``relu_gain``, ``sigmoid_radius``, ``clipped_steps`` or ``value_angle``.

    Returns:
        The exact answer.

    Example:
        >>> from gradclip_book.exercises import answer
        >>> answer("sigmoid_radius") > 1
        True
    """
    return _exercises()[name].exact


def check(name: str, given: object) -> bool:
    """Check ``given`` against every accepted answer of exercise ``name``; print feedback, never the answer.

    Args:
        name: the exercise.
        given: the reader's prediction.

    Returns:
        Whether some accepted answer takes it.
    """
    if given is None or isinstance(given, bool) or not isinstance(given, (int, float)) or not math.isfinite(given):
        print("Replace None with your prediction, a number, and run the cell again.")
        return False
    ex = _exercises()[name]
    for accepted in ex.answers:
        if accepted.accepts(given):
            print(accepted.feedback)
            return True
    direction = "high" if given > ex.exact else "low"
    print(f"Not quite: your answer is too {direction}. Hint: {ex.hint}")
    return False


def check_decades(given: float | None) -> bool:
    r"""Exercise: a linear network, Xavier initialisation, gain 1.2, depth 20, probe loss.

    By how many decades (powers of ten) is :math:`\|\partial J/\partial h_0\|` larger
    than :math:`\|\partial J/\partial h_{20}\|`? Accepted within 0.25 decades.

    Example:
        >>> from gradclip_book.exercises import check_decades
        >>> check_decades(0.0)
        Not quite: your answer is too low. Hint: each layer multiplies the norm by about the gain; a decade is a factor of 10, so count log10 of the gain per layer.
        False
    """
    return check("decades", given)


def check_relu_gain(given: float | None) -> bool:
    r"""Exercise: which gain on Xavier's scale keeps a ReLU network's per-layer factor at 1? Within 3%.

    Example:
        >>> from gradclip_book.exercises import check_relu_gain
        >>> check_relu_gain(1.0)
        Not quite: your answer is too low. Hint: a ReLU passes the gradient through only half of its units, which halves its mean square; which factor on the weights' standard deviation doubles the mean square again?
        False
    """
    return check("relu_gain", given)


def check_sigmoid_radius(given: float | None) -> bool:
    r"""Exercise: below which largest singular value of :math:`W_\text{rec}` must a sigmoid RNN's gradient vanish? Within 2%.

    Example:
        >>> from gradclip_book.exercises import check_sigmoid_radius
        >>> check_sigmoid_radius(1.0)
        Not quite: your answer is too low. Hint: each step multiplies by at most gamma times the largest singular value; what is the largest slope of the sigmoid?
        False
    """
    return check("sigmoid_radius", given)


def check_clipped_steps(given: float | None) -> bool:
    r"""Exercise: clipped descent on :math:`x^4` (:math:`\eta = 0.1`, c = 1) from :math:`x_0 = 50`.

    How many steps until :math:`f < 10^{-4}`? The exact count and the walk
    :math:`x_0/(\eta c)` are both accepted, each within 15%.

    Example:
        >>> from gradclip_book.exercises import check_clipped_steps
        >>> check_clipped_steps(10)
        Not quite: your answer is too low. Hint: while the gradient is above c, every step moves exactly eta * c.
        False
    """
    return check("clipped_steps", given)


def check_value_angle(given: float | None) -> bool:
    r"""Exercise: value-clip :math:`g = (4, 1)` at v = 1. By how many degrees does its direction turn? Within 2 degrees.

    Example:
        >>> from gradclip_book.exercises import check_value_angle
        >>> check_value_angle(0)
        Not quite: your answer is too low. Hint: write down the clipped vector, then compare the angles both vectors make with the first axis.
        False
    """
    return check("value_angle", given)


@dataclass
class StaticExercise(_static.Exercise):
    """The static widget, with its own message per accepted line of reasoning (each starts with "Correct").

    ``notes`` holds ``(low, high, text)``: a right answer in ``[low, high]`` gets ``text``
    (the first range that holds it, in the order of :attr:`Exercise.answers`).
    """

    notes: list = field(default_factory=list)

    def check(self, value: float) -> bool:
        right = self.accepts(value)
        note = next((t for lo, hi, t in self.notes if lo <= float(value) <= hi), "Correct.") if right else ""
        print(note if right else "Not quite." + (" Open the hint." if self.hint else ""))
        return right

    def _repr_html_(self) -> str:
        page = super()._repr_html_()
        root = f"gc-ex-{self.name}"
        notes = [{"low": lo, "high": hi, "text": t} for lo, hi, t in self.notes]
        script = f"<script>({_NOTES_JS})({json.dumps(root)},{json.dumps(notes)});</script>"
        return page[: -len("</div>")] + script + "</div>"


_NOTES_JS = r"""function(id,notes){
var root=document.getElementById(id),input=document.getElementById(id+'-input'),out=document.getElementById(id+'-feedback');
root.querySelector('form').addEventListener('submit',function(){
  if(root.dataset.result!=='right'){return;}
  var t=String(input.value).trim().replace(/\u2212/g,'-').replace(/\s+/g,''),v;
  if(/^[-+]?\d+\/\d+$/.test(t)){var p=t.split('/');v=(+p[0])/(+p[1]);}
  else{v=parseFloat(t.replace(/(?:\u00d7|x|\*)10\^/i,'e').replace(/^10\^/,'1e'));}
  for(var i=0;i<notes.length;i++){var n=notes[i];if(n.low<=v&&v<=n.high){out.textContent=n.text;return;}}
});}"""


def _bounds(a: Answer) -> tuple[float, float]:
    allowed = a.tolerance * abs(a.value) if a.relative else a.tolerance
    return a.value - allowed, a.value + allowed


def widget(name: str, number: int | str = "") -> StaticExercise:
    """The static exercise widget of exercise ``name``, built from :data:`EXERCISES`' data.

    The first accepted answer is the widget's answer; the others are accepted
    too (as numbers with the same tolerance, or as intervals), and each one's
    feedback replaces the plain "Correct." when a reader's answer falls in it.

    Example:
        >>> from gradclip_book.exercises import answer, widget
        >>> w = widget("clipped_steps", 4)
        >>> w.answer == answer("clipped_steps"), w.accepts(500), w.name
        (True, True, 'clipped-steps')
    """
    ex = _exercises()[name]
    first, *others = ex.answers
    accept = [a.value if (a.tolerance, a.relative) == (first.tolerance, first.relative) else _bounds(a)
              for a in others]
    notes = [(*_bounds(a), a.feedback) for a in ex.answers if a.feedback != "Correct."]
    prompt = f"**{number}.** {ex.question}" if number != "" else ex.question
    return StaticExercise(name.replace("_", "-"), prompt, answer=first.value, tolerance=first.tolerance,
                          relative=first.relative, hint=ex.hint[:1].upper() + ex.hint[1:], solution_md=ex.solution,
                          accept=accept, notes=notes)

