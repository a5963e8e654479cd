"""The browser audit of the built book: each page opened in Debian's chromium at 1280 px, 390 px and in dark mode.

tests/test_browser.py asserts on the audits; tests/conftest.py starts :data:`BACKGROUND` as soon as the book
is built, so that most pages are audited while the rest of the suite runs.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import threading
import time
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlparse

import yaml

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
MODES = {"desktop": (1280, False), "phone": (390, False), "dark": (1280, True)}


def _entries(chapters: list[dict]) -> list[str]:
    """Every file of a list of toc entries, with their nested ``sections``, in reading order."""
    return [f for c in chapters for f in [c["file"], *_entries(c.get("sections", []))]]


def toc_files() -> list[str]:
    """Every file of ``_toc.yml`` (without its suffix), in reading order."""
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    return [toc["root"]] + [f for part in toc.get("parts", []) for f in _entries(part.get("chapters", []))]


def toc_pages() -> list[str]:
    return [f"{f}.html" for f in toc_files()]


PAGES = toc_pages()


class PageWatch:
    """A page plus everything it logged and requested."""

    def __init__(self, browser, width: int = 1280, dark: bool = False) -> None:
        self.page = browser.new_page(viewport={"width": width, "height": 900})
        if dark:
            self.page.add_init_script("localStorage.setItem('mode','dark');localStorage.setItem('theme','dark');")
        self.errors: list[str] = []
        self.foreign: list[str] = []
        self.page.on("pageerror", lambda error: self.errors.append(f"uncaught: {error}"))
        self.page.on("console", self._console)
        self.page.on("request", self._request)
        self.page.on("response", self._response)

    def _console(self, message) -> None:
        # every console error counts: the theme's "invalid theme mode" and the favicon 404 are fixed, not filtered
        if message.type == "error":
            self.errors.append(f"console: {message.text}")

    def _response(self, response) -> None:
        if response.status >= 400:
            self.errors.append(f"HTTP {response.status}: {response.url}")

    def _request(self, request) -> None:
        url = urlparse(request.url)
        if url.scheme in ("http", "https", "ws", "wss") and url.hostname != "127.0.0.1":
            self.foreign.append(request.url)

    def open(self, url: str) -> None:
        self.page.goto(url, wait_until="load")
        self.page.wait_for_timeout(200)

    def scroll_through(self) -> None:
        """Scroll to the bottom and back, so that figures drawn on approach all draw."""
        self.page.evaluate("""async () => {
          const h = document.scrollingElement.scrollHeight;
          for (let y = 0; y <= h; y += 500) { window.scrollTo(0, y); await new Promise(r => setTimeout(r, 15)); }
          window.scrollTo(0, 0);
        }""")

    def wait_for_figures(self) -> int:
        count = self.page.locator(".gc-figure, .gc-plot").count()
        # a figure draws when it comes near the viewport; a fast scroll on a busy machine can pass one
        # before the browser reports it, so bring each one not yet drawn into view
        for index in range(count):
            figure = self.page.locator(".gc-figure, .gc-plot").nth(index)
            if not figure.evaluate("d => !!(d.querySelector('.main-svg') && d.data)"):
                figure.scroll_into_view_if_needed()
        if count:
            self.page.wait_for_function(
                "Array.from(document.querySelectorAll('.gc-figure, .gc-plot'))"
                ".every(d => d.querySelector('.main-svg') && d.data && d.data.length > 0)", timeout=15_000)
        if self.page.locator(".math, mjx-container, .gc-exercise").count():
            self.page.wait_for_function("window.MathJax && MathJax.startup && MathJax.startup.promise",
                                        timeout=10_000)
            self.page.evaluate("async () => { await MathJax.startup.promise; }")
        return count


RAW_TEX_JS = r"""() => {
  const bad = [], tex = /\$[^$\s][^$]*\$|\\(frac|sqrt|eta|alpha|beta|gamma|sigma|rho|lambda|nabla|sum|prod|mathbf|mathrm|left|right|cdot|begin|end|le|ge|ne|approx|infty|partial)\b|\\[()\[\]]/;
  const skip = 'mjx-container, script, style, pre, code, .highlight, textarea, svg, .MathJax, mjx-assistive-mml';
  const article = document.querySelector('.bd-article') || document.body;
  const walker = document.createTreeWalker(article, NodeFilter.SHOW_TEXT);
  while (walker.nextNode()) {
    const node = walker.currentNode, el = node.parentElement;
    if (!el || el.closest(skip) || !tex.test(node.textContent)) continue;
    if (!el.checkVisibility({visibilityProperty: true})) continue;
    const where = el.closest('[id]');
    bad.push(`<${el.tagName.toLowerCase()}> in #${where ? where.id : '?'}: ${node.textContent.trim().slice(0, 120)}`);
  }
  return bad;
}"""

WIDE_EQUATIONS_JS = r"""() => {
  const column = (document.querySelector('.bd-article') || document.body).getBoundingClientRect();
  return Array.from(document.querySelectorAll('mjx-container[display="true"]')).flatMap(el => {
    const math = el.querySelector('mjx-math') || el, r = math.getBoundingClientRect();
    if (r.width <= column.width + 1) return [];
    const where = el.closest('[id]');
    const tex = (el.querySelector('mjx-assistive-mml') || el).textContent.trim().slice(0, 80);
    return [`equation in #${where ? where.id : '?'} is ${Math.round(r.width)} px, column ${Math.round(column.width)} px: ${tex}`];
  });
}"""

CUT_OUTPUTS_JS = r"""() => Array.from(document.querySelectorAll('.output.stream pre, .output.text_plain pre'))
  .filter(p => p.scrollWidth > p.clientWidth + 1).map(p => {
    const line = p.textContent.split('\n').reduce((a, b) => b.length > a.length ? b : a, '');
    return `printed output ${p.scrollWidth - p.clientWidth} px wider than its box: ${line.trim().slice(0, 100)}`;
  })"""

OVERLAPPING_TICKS_JS = r"""() => Array.from(document.querySelectorAll('.gc-plot, .gc-figure')).flatMap(plot => {
  // two tick labels of one axis drawn over each other ("90" on "100", "0.005" on "0.01" at 390 px)
  const layout = plot._fullLayout || {}, caption = (plot.closest('.gc-box') || plot).querySelector('.gc-number');
  const name = caption ? caption.textContent.trim() : plot.id, found = [];
  for (const key of Object.keys(layout).filter(k => /^[xy]axis\d*$/.test(k))) {
    const boxes = Array.from(plot.querySelectorAll(`.${layout[key]._id}tick text`))
      .filter(t => t.textContent.trim()).map(t => [t.textContent, t.getBoundingClientRect()]);
    for (let i = 1; i < boxes.length; i++) for (let j = 0; j < i; j++) {
      const [a, b] = [boxes[i][1], boxes[j][1]];
      if (a.left < b.right - 1 && b.left < a.right - 1 && a.top < b.bottom - 1 && b.top < a.bottom - 1)
        found.push(`${name} ${key}: tick label '${boxes[j][0]}' overlaps '${boxes[i][0]}'`);
    }
  }
  return found;
})"""

SPLIT_WORDS_JS = r"""() => {
  // a word of a table cell drawn on two lines, split between two letters ("gradcli|p", "25,557,|032"); a break
  // after a hyphen, a slash or at a <wbr> (which ends the text node) is a break between words
  const found = [];
  for (const td of document.querySelectorAll('.bd-article table.gc-table td, .bd-article table.gc-table th')) {
    if (!td.checkVisibility()) continue;
    const walker = document.createTreeWalker(td, NodeFilter.SHOW_TEXT);
    while (walker.nextNode()) {
      const node = walker.currentNode, word = /\S+/g;
      let m;
      while ((m = word.exec(node.textContent))) {
        let top = null;
        for (let i = 0; i < m[0].length; i++) {
          const r = document.createRange(); r.setStart(node, m.index + i); r.setEnd(node, m.index + i + 1);
          const boxes = Array.from(r.getClientRects()).filter(b => b.width), box = boxes[boxes.length - 1];
          if (!box) continue;  // (a character after a soft hyphen's break also has a box on the line above)
          if (top !== null && box.top > top + 2 && !/[-\/\u00ad\u2013]/.test(m[0][i - 1])) {
            found.push(`'${m[0].slice(0, i)}|${m[0].slice(i)}' in a cell of '${(td.closest('table').querySelector('caption, th') || td).textContent.trim().slice(0, 40)}'`);
            break;
          }
          top = box.top;
        }
      }
    }
  }
  return found;
}"""

SIDEWAYS_JS = r"""() => {
  const s = document.scrollingElement, over = s.scrollWidth - s.clientWidth;
  if (over <= 0) return [];
  const wide = Array.from(document.querySelectorAll('body *')).filter(el => {
    const r = el.getBoundingClientRect();
    return r.width > 0 && r.right > s.clientWidth + 1 && !Array.from(el.children).some(c => c.getBoundingClientRect().right > s.clientWidth + 1);
  }).slice(0, 5).map(el => `<${el.tagName.toLowerCase()} class="${el.className}"> right edge ${Math.round(el.getBoundingClientRect().right)}: ${(el.textContent || '').trim().slice(0, 60)}`);
  return [`page scrolls sideways by ${over} px`, ...wide];
}"""

CONTRAST_JS = r"""() => {
  const parse = c => { const m = c.match(/[\d.]+/g).map(Number); return {r: m[0], g: m[1], b: m[2], a: m.length > 3 ? m[3] : 1}; };
  const lum = c => { const f = v => { v /= 255; return v <= 0.03928 ? v / 12.92 : Math.pow((v + 0.055) / 1.055, 2.4); };
                     return 0.2126 * f(c.r) + 0.7152 * f(c.g) + 0.0722 * f(c.b); };
  const background = el => { for (let n = el; n && n.nodeType === 1; n = n.parentElement) {
      const c = parse(getComputedStyle(n).backgroundColor); if (c.a > 0.5) return c; }
    return parse(getComputedStyle(document.body).backgroundColor); };
  const selector = '.gc-box figcaption, .gc-note, .gc-slider .gc-label, .gc-slider output, .gc-choice legend, ' +
                   '.gc-option span, .gc-exercise .gc-prompt, .gc-exercise label, .gc-exercise summary, ' +
                   '.gc-exercise button, .gc-feedback, .gc-launch-note p';
  return Array.from(document.querySelectorAll(selector)).flatMap(el => {
    if (!el.checkVisibility() || !el.textContent.trim()) return [];
    const fg = parse(getComputedStyle(el).color), bg = background(el);
    const [hi, lo] = [lum(fg), lum(bg)].sort((a, b) => b - a), ratio = (hi + 0.05) / (lo + 0.05);
    return ratio < 4.5 ? [`${ratio.toFixed(2)}:1 <${el.tagName.toLowerCase()} class="${el.className}">: ${el.textContent.trim().slice(0, 50)}`] : [];
  });
}"""

SET_CONTROL_JS = r"""([rootId, index, value]) => {
  const root = document.getElementById(rootId), el = root.querySelector(`.gc-controls [data-index="${index}"]`);
  if (el.tagName === 'INPUT') { el.value = String(value); el.dispatchEvent(new Event('input', {bubbles: true})); }
  else { el.querySelector(`input[value="${value}"]`).click(); }
}"""

DRAWN_MATCHES_FRAME_JS = r"""(rootId) => {
  const root = document.getElementById(rootId), spec = window.gcData[rootId];  // inline or loaded from its file
  const frame = spec.frames[root.dataset.key], data = document.getElementById(rootId + '-plot').data;
  return frame.traces.every((t, i) => ['x', 'y', 'z'].every(k => !(k in t) ||
    JSON.stringify(Array.from(data[i][k] || [], v => Array.isArray(v) || ArrayBuffer.isView(v) ? Array.from(v) : v)) === JSON.stringify(t[k])));
}"""


def drive_every_control(page) -> list[str]:
    """Move each control of each Explorer to another value; report any that does not redraw to its frame."""
    problems = []
    for root in page.evaluate("Array.from(document.querySelectorAll('.gc-explorer')).map(e => e.id)"):
        page.locator(f"#{root}").scroll_into_view_if_needed()
        page.wait_for_function(f"document.getElementById('{root}').dataset.key !== undefined", timeout=10_000)
        spec = page.evaluate(f"window.gcData['{root}']")  # inline in the page, or loaded from its data file
        for index, param in enumerate(spec["params"]):
            for value in {(param["start"] + 1) % len(param["shown"]), param["start"]}:
                if len(param["shown"]) == 1:
                    continue
                before = page.evaluate(f"document.getElementById('{root}').dataset.key")
                page.evaluate(SET_CONTROL_JS, [root, index, value])
                key = page.evaluate(f"document.getElementById('{root}').dataset.key")
                if key.split("|")[index] != str(value) or (key == before and str(value) != before.split("|")[index]):
                    problems.append(f"#{root} {param['control']} {param['name']}={param['shown'][value]}: key {key}")
                elif not page.evaluate(DRAWN_MATCHES_FRAME_JS, root):
                    problems.append(f"#{root} {param['control']} {param['name']}={param['shown'][value]}: "
                                    "plot differs from its frame")
    return problems


def audit_page(browser, server: str, page_name: str, mode: str) -> dict:
    """Open ``page_name`` from ``server`` in ``mode`` and return every check's findings (JSON-ready)."""
    width, dark = MODES[mode]
    watch = PageWatch(browser, width, dark)
    watch.open(f"{server}/{page_name}")
    watch.scroll_through()
    result: dict = {"figures": watch.wait_for_figures()}
    if mode in ("desktop", "phone"):
        # a table of text shows every column (cards on a phone, fixed shares on a desktop)
        result["hidden_columns"] = watch.page.evaluate(
            "Array.from(document.querySelectorAll('table.gc-table')).filter(t => t.scrollWidth > t.clientWidth + 1)"
            ".map(t => (t.querySelector('th, td') || t).textContent.slice(0, 40))")
    if mode in ("desktop", "phone"):
        watch.page.wait_for_timeout(100)  # log axes refit their ticks just after a figure draws
        result["overlapping_ticks"] = watch.page.evaluate(OVERLAPPING_TICKS_JS)
    if mode == "desktop":
        result["raw_tex"] = watch.page.evaluate(RAW_TEX_JS)
        result["wide_equations"] = watch.page.evaluate(WIDE_EQUATIONS_JS)
        result["cut_outputs"] = watch.page.evaluate(CUT_OUTPUTS_JS)
        result["split_words"] = watch.page.evaluate(SPLIT_WORDS_JS)
        result["controls"] = drive_every_control(watch.page)
    if mode == "phone":
        result["sideways"] = watch.page.evaluate(SIDEWAYS_JS)
        result["overflowing_figures"] = watch.page.evaluate(
            "Array.from(document.querySelectorAll('.gc-box')).filter(f => f.getBoundingClientRect().right > "
            "window.innerWidth + 1).map(f => f.id)")
    if mode == "dark":
        result["theme"] = watch.page.evaluate("document.documentElement.dataset.theme")
        result["contrast"] = watch.page.evaluate(CONTRAST_JS)
        result["dark_figures"] = watch.page.evaluate(
            "Array.from(document.querySelectorAll('.gc-plot, .gc-figure')).filter(p => p.layout && "
            "p.layout.paper_bgcolor === 'white').map(p => p.id)")
    result["errors"], result["foreign"] = watch.errors, watch.foreign
    watch.page.close()
    return result


def browser_missing() -> list[str]:
    """What the browser checks need and this machine lacks (empty when they can run)."""
    missing = []
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        missing.append("the playwright package")
    if not (os.path.exists(CHROMIUM) or shutil.which("chromium")):
        missing.append(f"chromium at {CHROMIUM} (apt-get install chromium)")
    return missing


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


@contextlib.contextmanager
def serve(directory: Path) -> Iterator[str]:
    """Serve ``directory`` on 127.0.0.1 at a free port; yields the base URL."""
    handler = functools.partial(_QuietHandler, directory=str(directory))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


class BackgroundAudits:
    """Every page of the table of contents audited in every mode, in a thread while other tests run.

    The test session starts it once the book is built (tests/conftest.py); the browser tests read its
    results and audit in their own process whatever it did not finish (for instance after an error,
    which they then meet themselves).
    """

    def __init__(self) -> None:
        self.thread: threading.Thread | None = None
        self.results: dict[tuple[str, str], dict] = {}
        self.abandoned = False

    def start(self, html: Path, pages: list[str]) -> None:
        if self.thread is None:
            self.thread = threading.Thread(target=self._run, args=(html, pages), daemon=True, name="page audits")
            self.thread.start()

    def _run(self, html: Path, pages: list[str]) -> None:
        from playwright.sync_api import sync_playwright

        try:
            with serve(html) as server, sync_playwright() as playwright:
                instance = playwright.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
                try:
                    for page_name in pages:
                        for mode in MODES:
                            self.results[(page_name, mode)] = audit_page(instance, server, page_name, mode)
                finally:
                    instance.close()
        except Exception:  # noqa: BLE001 (the tests audit what is missing themselves, and see the error there)
            pass

    def result(self, page_name: str, mode: str, timeout: float) -> dict | None:
        """The audit of ``page_name`` in ``mode``, waiting for it up to ``timeout`` s; None if it will not come."""
        deadline = time.monotonic() + timeout
        while (page_name, mode) not in self.results:
            if self.thread is None or not self.thread.is_alive() or self.abandoned:
                return self.results.get((page_name, mode))
            if time.monotonic() > deadline:
                self.abandoned = True  # stuck: the tests audit the rest themselves, without waiting again
                return None
            time.sleep(0.1)
        return self.results[(page_name, mode)]


BACKGROUND = BackgroundAudits()
