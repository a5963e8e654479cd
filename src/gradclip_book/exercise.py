"""Exercises that work in the static book: an answer box, a Check button, a hint and a solution.

An :class:`Exercise` renders as HTML with a few lines of JavaScript, so it
works with no kernel behind the page: the reader types a number, presses
Check (or Enter) and is told whether it is right, without being shown the
answer; a hint and a worked solution sit behind toggles (``<details>``). In a
live notebook, :meth:`Exercise.check` does the same from Python.

An answer is accepted when it is within ``tolerance`` of ``answer`` (relative
to it when ``relative``, absolute otherwise), or matches any entry of
``accept``: another number (same tolerance) or an open interval ``(low, high)``
— for questions with several correct lines of reasoning, or a whole range of
right answers.

``prompt`` and ``solution_md`` are Markdown with ``$...$`` / ``$$...$$`` math,
typeset by the book's MathJax.

Example (a notebook cell; the last expression is displayed):

    from gradclip_book.exercise import Exercise
    Exercise(
        "quartic-step",
        prompt="From $x_0 = 4$ on $f(x) = x^4$, which learning rate $\\eta$ makes one "
               "unclipped step land closer to the minimum?",
        answer=1 / 64, tolerance=0.01,          # the step that lands exactly on 0 ...
        accept=[(0.0, 1 / 32)],                 # ... but any eta in (0, 1/32) is right
        hint="$x_1 = x_0 - \\eta \\cdot 4 x_0^3$; ask when $|x_1| < |x_0|$.",
        solution_md="$x_1 = 4 - 256\\,\\eta$, so $|x_1| < 4$ iff $0 < \\eta < 1/32$.",
    )

and in a live notebook ``exercise.check(0.02)`` prints whether 0.02 is right.

    >>> ex = Exercise("demo", "Two plus two?", answer=4, tolerance=0, relative=False, accept=[(10, 20)])
    >>> ex.accepts(4), ex.accepts(15), ex.accepts(5)
    (True, True, False)
"""

from __future__ import annotations

import html
import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

_NAME = re.compile(r"^[a-z][a-z0-9-]*$")
_MATH = re.compile(r"\$\$(.+?)\$\$|\$(.+?)\$", re.S)


def markdown_html(text: str) -> str:
    """Markdown to HTML, with ``$..$`` and ``$$..$$`` kept as MathJax ``\\(..\\)`` and ``\\[..\\]``."""
    from markdown_it import MarkdownIt

    formulas: list[str] = []

    def stash(match: re.Match) -> str:
        display, inline = match.group(1), match.group(2)
        formulas.append(f"\\[{display}\\]" if display is not None else f"\\({inline}\\)")
        return f"GCMATH{len(formulas) - 1}X"

    rendered = MarkdownIt("commonmark").render(_MATH.sub(stash, text)).strip()
    return re.sub(r"GCMATH(\d+)X", lambda m: html.escape(formulas[int(m.group(1))], quote=False), rendered)


@dataclass
class Exercise:
    """A question with a numeric answer, checkable in the static page and from Python.

    Args:
        name: a stable id (lowercase letters, digits, dashes), unique on its page.
        prompt: the question (Markdown with math).
        answer: the expected value.
        tolerance: how far an answer may be from ``answer`` (and from numbers in ``accept``).
        relative: ``tolerance`` is relative to the expected value (default) or absolute.
        hint: shown behind a "Hint" toggle (Markdown with math).
        solution_md: the worked solution, behind a "Solution" toggle (Markdown with math).
        accept: other correct answers: numbers, or open intervals ``(low, high)``.
        unit: shown after the answer box.
    """

    name: str
    prompt: str
    answer: float
    tolerance: float = 0.02
    relative: bool = True
    hint: str = ""
    solution_md: str = ""
    accept: Sequence[float | tuple[float, float]] = field(default_factory=list)
    unit: str = ""

    def __post_init__(self) -> None:
        if not _NAME.match(self.name):
            raise ValueError(f"name must match {_NAME.pattern}, got {self.name!r}")
        if self.tolerance < 0:
            raise ValueError("tolerance must be >= 0")
        for item in self.accept:
            if isinstance(item, (tuple, list)) and not (len(item) == 2 and item[0] < item[1]):
                raise ValueError(f"an accepted interval is (low, high) with low < high, got {item!r}")

    def _targets(self) -> list[dict]:
        targets = [{"value": float(self.answer)}]
        for item in self.accept:
            if isinstance(item, (tuple, list)):
                targets.append({"low": float(item[0]), "high": float(item[1])})
            else:
                targets.append({"value": float(item)})
        return targets

    def accepts(self, value: float) -> bool:
        """Whether ``value`` is a right answer (the same rule as the page's Check button)."""
        value = float(value)
        if not math.isfinite(value):
            return False
        for target in self._targets():
            if "value" in target:
                allowed = self.tolerance * abs(target["value"]) if self.relative else self.tolerance
                if abs(value - target["value"]) <= allowed + 1e-12:
                    return True
            elif target["low"] < value < target["high"]:
                return True
        return False

    def check(self, value: float) -> bool:
        """Print whether ``value`` is right (never the answer), for a live notebook; returns it."""
        right = self.accepts(value)
        print("Correct." if right else "Not quite." + (" Open the hint." if self.hint else ""))
        return right

    def _repr_html_(self) -> str:
        root = f"gc-ex-{self.name}"
        data = json.dumps({"targets": self._targets(), "tolerance": self.tolerance, "relative": self.relative})
        hint = (f'<details class="gc-hint"><summary>Hint</summary>{markdown_html(self.hint)}</details>'
                if self.hint else "")
        solution = (f'<details class="gc-solution"><summary>Solution</summary>{markdown_html(self.solution_md)}'
                    "</details>" if self.solution_md else "")
        unit = f' <span class="gc-unit">{html.escape(self.unit)}</span>' if self.unit else ""
        return (
            f'<div class="gc-exercise mathjax_process" id="{root}" data-check="{html.escape(data)}">'
            f'<div class="gc-prompt">{markdown_html(self.prompt)}</div>'
            f'<form class="gc-answer" onsubmit="return false">'
            f'<label for="{root}-input">Your answer</label>'
            f'<input type="text" inputmode="decimal" id="{root}-input" autocomplete="off">{unit}'
            f'<button type="submit" id="{root}-check">Check</button>'
            f'<span class="gc-feedback" id="{root}-feedback" role="status" aria-live="polite"></span></form>'
            f"{hint}{solution}"
            f"<script>({_CHECK_JS})({json.dumps(root)});</script></div>"
        )


_CHECK_JS = r"""function(id){
var root=document.getElementById(id),spec=JSON.parse(root.getAttribute('data-check'));
var input=document.getElementById(id+'-input'),out=document.getElementById(id+'-feedback');
function parse(text){text=String(text).trim().replace(/\u2212/g,'-').replace(/\s+/g,'')
  .replace(/(?:\u00d7|x|\*)10\^/i,'e').replace(/^10\^/,'1e');
  if(/^[-+]?(\d+\.?\d*|\.\d+)\/(\d+\.?\d*|\.\d+)$/.test(text)){var p=text.split('/');return (+p[0])/(+p[1]);}
  return /^[-+]?(\d+\.?\d*|\.\d+)(e[-+]?\d+)?$/i.test(text)?parseFloat(text):NaN;}
function ok(v){return spec.targets.some(function(t){
  if('value' in t){var allowed=spec.relative?spec.tolerance*Math.abs(t.value):spec.tolerance;
    return Math.abs(v-t.value)<=allowed+1e-12;}
  return t.low<v&&v<t.high;});}
root.querySelector('form').addEventListener('submit',function(e){e.preventDefault();
  var v=parse(input.value);
  if(!isFinite(v)){out.textContent='Enter a number, such as 0.02, 1/64 or 3e-4.';root.dataset.result='invalid';return;}
  var right=ok(v);out.textContent=right?'Correct.':'Not quite. Try again, or open the hint.';
  root.dataset.result=right?'right':'wrong';});
}"""
