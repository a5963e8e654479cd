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

The answer box reads what readers type (:func:`readings`): decimals and
exponents (``0.02``, ``3e-4``, ``3×10^-4``), fractions and arithmetic
(``1/64``, ``0.1/6.4``, ``2^-6``), roots and pi (``sqrt(2)``, ``√2``, ``2√2``,
``pi/4``), and a decimal comma (``1,414``; a comma that can also group
thousands is read both ways, and either reading may be right).

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
_NUMBER = re.compile(r"(\d+\.?\d*|\.\d+)(e[-+]?\d+)?")
_THOUSANDS = re.compile(r"[-+]?\d{1,3}(,\d{3})+(\.\d+)?")


class _Expression:
    """A recursive-descent reader of what a reader types: + - * / ^, parentheses, sqrt/√, pi/π, juxtaposition.

    The same grammar as the page's JavaScript (``_CHECK_JS``): ``sum := product (('+'|'-') product)*``,
    ``product := unary (('*'|'/') unary | power)*`` (a power right after a value only where it begins with
    a bracket, a root or pi), ``unary := ('-'|'+') unary | power``,
    ``power := atom ('^' unary)?``, ``atom := number | '(' sum ')' | ('sqrt'|'√') power | 'pi' | 'π'``.
    """

    def __init__(self, text: str) -> None:
        self.text, self.at = text, 0

    def value(self) -> float:
        result = self._sum()
        if self.at != len(self.text):
            raise ValueError(f"unexpected {self.text[self.at:]!r}")
        return result

    def _word(self, word: str) -> bool:
        if self.text.startswith(word, self.at):
            self.at += len(word)
            return True
        return False

    def _starts_atom(self) -> bool:
        rest = self.text[self.at:]
        # juxtaposition multiplies before a bracket, a root or pi (2√2, 3(1+1), 2pi), never before a digit
        return rest.startswith(("(", "\u221a", "\u03c0", "sqrt", "pi"))

    def _atom(self) -> float:
        if self._word("("):
            inner = self._sum()
            if not self._word(")"):
                raise ValueError("missing )")
            return inner
        if self._word("sqrt") or self._word("\u221a"):
            return math.sqrt(self._power())
        if self._word("pi") or self._word("\u03c0"):
            return math.pi
        match = _NUMBER.match(self.text, self.at)
        if match is None:
            raise ValueError(f"a number expected at {self.text[self.at:]!r}")
        self.at = match.end()
        return float(match.group(0))

    def _power(self) -> float:
        base = self._atom()
        return base ** self._unary() if self._word("^") else base

    def _unary(self) -> float:
        if self._word("-"):
            return -self._unary()
        if self._word("+"):
            return self._unary()
        return self._power()

    def _product(self) -> float:
        result = self._unary()
        while True:
            if self._word("*"):
                result *= self._unary()
            elif self._word("/"):
                result /= self._unary()
            elif self._starts_atom():
                result *= self._power()
            else:
                return result

    def _sum(self) -> float:
        result = self._product()
        while True:
            if self._word("+"):
                result += self._product()
            elif self._word("-"):
                result -= self._product()
            else:
                return result


def readings(text: str) -> list[float]:
    """Every finite number ``text`` can be read as, the way the page's answer box reads it.

    Example:
        >>> readings("sqrt(2)") == readings("√2") == [math.sqrt(2)]
        True
        >>> readings("1,414"), readings("0,5"), readings("2^-6"), readings("1/0"), readings("1.2.3")
        ([1414.0, 1.414], [0.5], [0.015625], [], [])
    """
    s = re.sub(r"\s+", "", str(text).strip().lower().replace("\u2212", "-"))
    s = re.sub(r"(\d)x(?=[\d.(])", r"\1*", re.sub("[\u00d7\u22c5\u00b7]", "*", s))
    forms = [s]
    if "," in s:
        forms = [s.replace(",", "")] if _THOUSANDS.fullmatch(s) else []
        if "." not in s and s.count(",") == 1:
            forms.append(s.replace(",", "."))
    values = []
    for form in forms:
        try:
            value = _Expression(form).value()
        except (ValueError, ZeroDivisionError, OverflowError):
            continue
        if isinstance(value, float) and math.isfinite(value):
            values.append(value)
    return values
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

    def accepts(self, value: float | str) -> bool:
        """Whether ``value`` (a number, or text as typed in the page's box) is a right answer, as the page's Check says."""
        if isinstance(value, str):
            return any(self.accepts(v) for v in readings(value))
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

    def check(self, value: float | str) -> bool:
        """Print whether ``value`` (a number or text such as ``"sqrt(2)"``) is right (never the answer); returns it."""
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
function evaluate(s){var i=0;
  function peek(){return s.charAt(i);}
  function word(w){if(s.substr(i,w.length)===w){i+=w.length;return true;}return false;}
  function number(){var m=/^(\d+\.?\d*|\.\d+)(e[-+]?\d+)?/.exec(s.slice(i));if(!m)throw 0;i+=m[0].length;return parseFloat(m[0]);}
  function starts(){var c=peek();return c==='('||c==='\u221a'||c==='\u03c0'||s.substr(i,4)==='sqrt'||s.substr(i,2)==='pi';}
  function atom(){
    if(word('(')){var v=sum();if(!word(')'))throw 0;return v;}
    if(word('sqrt')||word('\u221a'))return Math.sqrt(power());
    if(word('pi')||word('\u03c0'))return Math.PI;
    return number();}
  function power(){var b=atom();if(word('^'))return Math.pow(b,unary());return b;}
  function unary(){if(word('-'))return -unary();if(word('+'))return unary();return power();}
  function product(){var v=unary();for(;;){if(word('*'))v*=unary();else if(word('/'))v/=unary();
    else if(starts())v*=power();else return v;}}
  function sum(){var v=product();for(;;){if(word('+'))v+=product();else if(word('-'))v-=product();else return v;}}
  var v=sum();if(i!==s.length)throw 0;return v;}
function readings(text){var s=String(text).trim().toLowerCase().replace(/\u2212/g,'-')
    .replace(/[\u00d7\u22c5\u00b7]/g,'*').replace(/\s+/g,'').replace(/(\d)x(?=[\d.(])/g,'$1*');
  var forms=[s];
  if(s.indexOf(',')>=0){forms=[];
    if(/^[-+]?\d{1,3}(,\d{3})+(\.\d+)?$/.test(s))forms.push(s.replace(/,/g,''));
    if(s.indexOf('.')<0&&(s.match(/,/g)||[]).length===1)forms.push(s.replace(',','.'));}
  var values=[];forms.forEach(function(f){try{var v=evaluate(f);if(isFinite(v))values.push(v);}catch(e){}});
  return values;}
function ok(v){return spec.targets.some(function(t){
  if('value' in t){var allowed=spec.relative?spec.tolerance*Math.abs(t.value):spec.tolerance;
    return Math.abs(v-t.value)<=allowed+1e-12;}
  return t.low<v&&v<t.high;});}
root.querySelector('form').addEventListener('submit',function(e){e.preventDefault();
  var values=readings(input.value);
  if(!values.length){out.textContent='Enter a number, such as 0.02, 1/64, 3e-4 or sqrt(2).';root.dataset.result='invalid';return;}
  var right=values.some(ok);out.textContent=right?'Correct.':'Not quite. Try again, or open the hint.';
  root.dataset.result=right?'right':'wrong';});
}"""
