"""Shared fixtures: the built book (built once per session, in the background) and a local web server for it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from gradclip_book.reproducibility import pin_cpu_kernels

pin_cpu_kernels()  # before torch runs anything: the re-run checks compare with runs stored on another CPU

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

# Slow, deterministic results (chapter 5.2's two-process launch, the collected-test count) computed once per
# session and reused by the book build, nbval and the tests (gradclip_book.session_cache); a fresh folder
# each session, so nothing outlives it.
_SESSION_CACHE = tempfile.mkdtemp(prefix="gradclip-book-cache-")
os.environ["GRADCLIP_BOOK_CACHE"] = _SESSION_CACHE


def pytest_report_header(config: pytest.Config) -> list[str]:
    """The CPU and kernels in effect: a stored run that no longer reproduces is read against these."""
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), "unknown") if Path("/proc/cpuinfo").exists() else "unknown"
    from gradclip_book.reproducibility import cpu_kernels
    return [f"cpu: {model}, {os.cpu_count()} cores; kernels: {cpu_kernels()}"]


BUILD_TIMEOUT_S = 1500  # from its start; alone the build takes about 5 minutes on 2 cores
BUILT_HTML = ROOT / "_build" / "html"


class BookBuild:
    """The book build (``jupyter-book build --all -W``), run in the background while other tests run.

    The build executes every notebook, mostly on one core; the test session starts it as soon as it
    knows that a collected test reads the book, and runs those tests last, so that the build overlaps
    the rest of the suite instead of adding to it. While it runs, the build's kernels and the tests each
    get one torch thread: two threads each on two cores would make every small parallel region wait
    for a thread the other process holds.
    """

    def __init__(self) -> None:
        self.process: subprocess.Popen | None = None
        self.log = None
        self.started = 0.0
        self.test_threads: int | None = None  # the tests' torch threads before the build, while it runs
        self.audit_pages = False  # whether the session's browser tests will read the page audits

    def share_cores(self) -> None:
        """One torch thread for the tests while the build runs; the former number once it has finished."""
        running = self.process is not None and self.process.poll() is None
        if running and self.test_threads is None:
            self.test_threads = torch.get_num_threads()
            torch.set_num_threads(1)
        elif not running and self.test_threads is not None:
            torch.set_num_threads(self.test_threads)
            self.test_threads = None
        if self.audit_pages and self.process is not None and self.process.poll() == 0:
            self.audit_pages = False
            self._start_page_audits()

    def _start_page_audits(self) -> None:
        """The built pages' browser audits, in a thread while the tests before the browser tests run."""
        from support.browser import BACKGROUND, PAGES, browser_missing

        if not browser_missing() and (BUILT_HTML / "index.html").exists():
            BACKGROUND.start(BUILT_HTML, PAGES)

    def start(self) -> None:
        if self.process is not None:
            return
        shutil.rmtree(ROOT / "_build", ignore_errors=True)  # stale pages must not survive
        jupyter_book = Path(sys.executable).with_name("jupyter-book")
        self.log = tempfile.TemporaryFile(mode="w+", encoding="utf-8")
        self.started = time.monotonic()
        self.process = subprocess.Popen(
            [str(jupyter_book), "build", "--all", "-W", "--keep-going", str(ROOT)],
            cwd=ROOT, env={"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", **os.environ, "GRADCLIP_STATIC": "1"},
            stdout=self.log, stderr=subprocess.STDOUT, text=True,
        )

    def wait(self) -> Path:
        self.start()
        remaining = BUILD_TIMEOUT_S - (time.monotonic() - self.started)
        try:
            code = self.process.wait(timeout=max(remaining, 1))
        except subprocess.TimeoutExpired:
            self.stop()
            pytest.fail(f"the book build took more than {BUILD_TIMEOUT_S} s:\n{self.output()[-6000:]}")
        assert code == 0, f"book build failed:\n{self.output()[-12000:]}"
        assert (BUILT_HTML / "index.html").exists(), "jupyter-book reported success but wrote no index.html"
        return BUILT_HTML

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()


_BOOK_BUILD = BookBuild()


def _reads_the_book(item: pytest.Item) -> bool:
    return "built_book" in getattr(item, "fixturenames", ())


@pytest.hookimpl(trylast=True)  # after -k/-m deselection: start the build only for tests that will run
def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.option.collectonly or os.environ.get("GRADCLIP_BOOK_HTML"):
        return
    book_modules = {item.module for item in items if _reads_the_book(item) and getattr(item, "module", None)}
    if not book_modules:
        return
    # whole modules move, so that their module-scoped fixtures (the browser) are set up once
    items[:] = ([item for item in items if getattr(item, "module", None) not in book_modules]
                + [item for item in items if getattr(item, "module", None) in book_modules])
    _BOOK_BUILD.audit_pages = any(getattr(item, "module", None) is not None
                                  and item.module.__name__.endswith("test_browser") for item in items)
    # the first test to read the book waits for the build in its setup: give it the build's time, not one test's
    next(item for item in items if _reads_the_book(item)).add_marker(pytest.mark.timeout(BUILD_TIMEOUT_S + 60))
    _BOOK_BUILD.start()


def pytest_runtest_setup(item: pytest.Item) -> None:
    _BOOK_BUILD.share_cores()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    _BOOK_BUILD.stop()  # an interrupted or failed session leaves no build running
    shutil.rmtree(_SESSION_CACHE, ignore_errors=True)


@pytest.fixture(scope="session")
def built_book() -> Path:
    """The HTML book: the background build's, or GRADCLIP_BOOK_HTML if it names an existing build."""
    reuse = os.environ.get("GRADCLIP_BOOK_HTML")
    if reuse:
        html = Path(reuse)
        assert (html / "index.html").exists(), f"GRADCLIP_BOOK_HTML={reuse} has no index.html"
        return html
    return _BOOK_BUILD.wait()


@pytest.fixture(scope="session")
def book_server(built_book: Path):
    """Serve the built book on 127.0.0.1 at a free port; yields the base URL."""
    from support.browser import serve

    with serve(built_book) as url:
        yield url


@pytest.fixture
def one_thread():
    """torch on one CPU thread for the test (a fixed reduction order, as the book's runs use); restored after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
