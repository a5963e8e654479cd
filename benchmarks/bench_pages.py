"""Page weight and figure time of the built book, measured in headless Chromium.

Serves ``_build/html`` on 127.0.0.1, opens every page with a cold cache at a
desktop width, scrolls through it so that lazily drawn figures draw, and
prints per page the bytes transferred (uncompressed: the local server does not
compress), the time to the load event, the time from navigation until every figure on the page is
drawn (which includes the harness scrolling through the page), and how long the last figures
took to draw after the last scroll.

    .venv/bin/python benchmarks/bench_pages.py [path/to/_build/html]

Uses Debian's /usr/bin/chromium through python playwright (no browser download).
"""

from __future__ import annotations

import functools
import os
import platform
import sys
import threading
import time
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]
SKIP = {"genindex.html", "search.html", "py-modindex.html", "index.html"}

ALL_DRAWN = """() => {
  const boxes = Array.from(document.querySelectorAll('.gc-plot, .gc-figure'));
  return boxes.every(b => b.querySelector('.main-svg'));
}"""


class _Quiet(SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


def measure(browser, url: str) -> dict:
    context = browser.new_context(viewport={"width": 1280, "height": 900})  # a fresh, cold cache
    page = context.new_page()
    sizes: list[int] = []
    page.on("requestfinished", lambda r: sizes.append(r.sizes()["responseBodySize"]))
    started = time.perf_counter()
    page.goto(url, wait_until="load")
    load_s = time.perf_counter() - started
    figures = page.locator(".gc-plot, .gc-figure").count()
    height = page.evaluate("document.scrollingElement.scrollHeight")
    for y in range(0, height + 900, 600):  # scroll through, as a reader would, quickly
        page.evaluate(f"window.scrollTo(0, {y})")
        page.wait_for_timeout(20)
    scrolled = time.perf_counter()
    page.wait_for_function(ALL_DRAWN, timeout=30_000)
    done = time.perf_counter()
    page.wait_for_load_state("networkidle")
    # drawn_s includes the harness's own scrolling (long pages take seconds to scroll through);
    # after_scroll_s is how long the last figures took to draw once the reader reached them
    result = {"figures": figures, "bytes": sum(sizes), "requests": len(sizes), "drawn_s": done - started,
              "load_s": load_s, "after_scroll_s": done - scrolled}
    context.close()
    return result


def main(html: Path) -> None:
    from playwright.sync_api import sync_playwright

    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(html)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    pages = sorted(str(p.relative_to(html)) for p in html.rglob("*.html")
                   if p.name not in SKIP and "_static" not in p.parts and "_sources" not in p.parts)
    print(f"# {platform.node()}: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"Python {platform.python_version()}, {CHROMIUM}")
    print(f"{'page':28} {'figures':>7} {'requests':>8} {'MB':>7} {'load (s)':>9} {'all drawn (s)':>13} "
          f"{'after last scroll (s)':>21}")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        for relative in pages:
            r = measure(browser, f"{base}/{relative}")
            print(f"{relative:28} {r['figures']:>7} {r['requests']:>8} {r['bytes'] / 1e6:>7.2f} {r['load_s']:>9.2f} "
                  f"{r['drawn_s']:>13.2f} {r['after_scroll_s']:>21.2f}")
        browser.close()
    server.shutdown()


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).resolve().parents[1] / "_build" / "html"))
