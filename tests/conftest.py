"""Shared fixtures: the built book (built once per session) and a local web server for it."""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from gradclip_book.reproducibility import pin_cpu_kernels

pin_cpu_kernels()  # before torch runs anything: the re-run checks compare with runs stored on another CPU

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def pytest_report_header(config: pytest.Config) -> list[str]:
    """The CPU and kernels in effect: a stored run that no longer reproduces is read against these."""
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), "unknown") if Path("/proc/cpuinfo").exists() else "unknown"
    from gradclip_book.reproducibility import cpu_kernels
    return [f"cpu: {model}, {os.cpu_count()} cores; kernels: {cpu_kernels()}"]


@pytest.fixture(scope="session")
def built_book() -> Path:
    """The HTML book. Built from scratch unless GRADCLIP_BOOK_HTML names an existing build."""
    reuse = os.environ.get("GRADCLIP_BOOK_HTML")
    if reuse:
        html = Path(reuse)
        assert (html / "index.html").exists(), f"GRADCLIP_BOOK_HTML={reuse} has no index.html"
        return html
    shutil.rmtree(ROOT / "_build", ignore_errors=True)  # stale pages must not survive
    jupyter_book = Path(sys.executable).with_name("jupyter-book")
    env = {**os.environ, "GRADCLIP_STATIC": "1"}
    result = subprocess.run(
        [str(jupyter_book), "build", "--all", "-W", "--keep-going", str(ROOT)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
    )
    assert result.returncode == 0, f"book build failed:\n{result.stdout[-6000:]}\n{result.stderr[-6000:]}"
    html = ROOT / "_build" / "html"
    assert (html / "index.html").exists(), "jupyter-book reported success but wrote no index.html"
    return html


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


@pytest.fixture(scope="session")
def book_server(built_book: Path):
    """Serve the built book on 127.0.0.1 at a free port; yields the base URL."""
    handler = functools.partial(_QuietHandler, directory=str(built_book))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture
def one_thread():
    """torch on one CPU thread for the test (a fixed reduction order, as the book's runs use); restored after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
