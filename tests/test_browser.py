"""The docs site as a reader sees it: every page opened in headless Chromium with the network off.

The site is built with ``mkdocs build --strict`` into a temporary folder and served on 127.0.0.1.
Chromium (Debian's ``chromium``; ``.ci/run`` installs it, ``$ATTNZOO_CHROMIUM`` names another) is
driven over the DevTools protocol on a pipe (``--remote-debugging-pipe``: no extra package). Its
proxy points at a port where nothing listens and every host name resolves to nothing, so no request
can leave the machine; each request a page makes is recorded all the same.

A page fails on raw TeX in its rendered text (``\\[``, ``\\(``, ``$$``, ``\\frac``, ... outside
code), a literal reST role or directive (``:class:``, ``:math:``, ``.. math::``), a doctest rendered
as a blockquote (Markdown reads ``>>>`` as three nested quotes), a display formula wider than the text
column at 1280 px (it would scroll sideways), or a request that leaves the site.
Each test names every failing page at once. Screenshots of the index, getting started and two
mechanism pages are kept in ``$ATTNZOO_ARTIFACTS`` (default ``tests/artifacts/``, git-ignored).
"""

from __future__ import annotations

import base64
import functools
import http.server
import importlib.util
import json
import os
import re
import select
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = Path(os.environ.get("ATTNZOO_ARTIFACTS", ROOT / "tests" / "artifacts"))
SCREENSHOTS = ("index", "getting-started", "mechanisms/se", "mechanisms/mha")
VIEWPORT = (1280, 1000)


def _chromium() -> str | None:
    named = os.environ.get("ATTNZOO_CHROMIUM")
    if named:
        return shutil.which(named) or named
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        found = shutil.which(name)
        if found:
            return found
    return None


CHROMIUM = _chromium()
pytestmark = [
    pytest.mark.skipif(
        CHROMIUM is None,
        reason="no Chromium: install Debian's `chromium` (.ci/run does) or set ATTNZOO_CHROMIUM",
    ),
    pytest.mark.skipif(
        importlib.util.find_spec("mkdocs") is None or importlib.util.find_spec("mkdocstrings") is None,
        reason="the docs extra is not installed (pip install -e '.[docs]')",
    ),
]


class DevTools:
    """A minimal DevTools-protocol client over Chromium's ``--remote-debugging-pipe`` (fds 3 and 4)."""

    def __init__(self, binary: str, profile: Path, args: list[str]) -> None:
        to_child_r, self._to_child = os.pipe()
        self._from_child, from_child_w = os.pipe()
        shell = f'exec "$0" "$@" 3<&{to_child_r} 4>&{from_child_w} {to_child_r}<&- {from_child_w}>&-'
        self.proc = subprocess.Popen(
            ["bash", "-c", shell, binary, "--remote-debugging-pipe", f"--user-data-dir={profile}", *args],
            pass_fds=(to_child_r, from_child_w),
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )
        os.close(to_child_r)
        os.close(from_child_w)
        self._buffer = b""
        self._next_id = 0
        self.events: list[dict[str, Any]] = []

    def _read(self, deadline: float) -> dict[str, Any]:
        while b"\0" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("Chromium did not answer in time")
            ready, _, _ = select.select([self._from_child], [], [], left)
            if ready:
                chunk = os.read(self._from_child, 1 << 20)
                if not chunk:
                    err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
                    raise RuntimeError(f"Chromium closed its DevTools pipe:\n{err[-3000:]}")
                self._buffer += chunk
        raw, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(raw)

    def call(self, method: str, params: dict | None = None, session: str | None = None,
             timeout: float = 30.0) -> dict[str, Any]:
        self._next_id += 1
        message: dict[str, Any] = {"id": self._next_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        os.write(self._to_child, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            reply = self._read(deadline)
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def wait_for(self, method: str, session: str, timeout: float = 30.0) -> None:
        """Read until an event ``method`` of ``session`` is in ``events`` (which keeps every event)."""
        deadline = time.monotonic() + timeout
        seen = 0
        while True:
            for event in self.events[seen:]:
                if event.get("method") == method and event.get("sessionId") == session:
                    return
            seen = len(self.events)
            self.events.append(self._read(deadline))

    def settle(self, quiet: float = 0.3, timeout: float = 5.0) -> None:
        """Read events until none came for ``quiet`` seconds (late requests get recorded)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ready, _, _ = select.select([self._from_child], [], [], quiet)
            if not ready and b"\0" not in self._buffer:
                return
            self.events.append(self._read(deadline))

    def close(self) -> None:
        try:
            self.call("Browser.close", timeout=5)
        except Exception:  # the browser may already be gone; it is killed below either way
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._to_child)
        os.close(self._from_child)


# Rendered text outside code, math and scripts; blockquotes that hold a doctest.
_PAGE_PROBE = r"""
(() => {
  const skip = new Set(["CODE", "PRE", "KBD", "SAMP", "SCRIPT", "STYLE", "MATH", "NOSCRIPT", "TEXTAREA"]);
  const root = document.querySelector(".md-content") || document.body;
  const walker = document.createTreeWalker(root, NodeFilter.SHOW_TEXT, {
    acceptNode(node) {
      for (let e = node.parentElement; e; e = e.parentElement) {
        if (skip.has(e.tagName.toUpperCase())) return NodeFilter.FILTER_REJECT;
      }
      return NodeFilter.FILTER_ACCEPT;
    }
  });
  const text = [];
  while (walker.nextNode()) text.push(walker.currentNode.nodeValue);
  const quoted = [...root.querySelectorAll("blockquote")]
    .filter(b => b.querySelector("blockquote") || b.textContent.includes(">>>"))
    .filter(b => !b.parentElement.closest("blockquote"))
    .map(b => b.textContent.trim().replace(/\s+/g, " ").slice(0, 70));
  const mathText = [...root.querySelectorAll("math")].map(m => m.textContent).join(" ");
  const column = (root.querySelector(".md-typeset") || root).getBoundingClientRect();
  const wideMath = [...root.querySelectorAll("div.math")]
    .filter(d => d.scrollWidth > d.clientWidth + 2 || d.getBoundingClientRect().right > column.right + 2)
    .map(d => ({tex: (d.dataset.tex || d.textContent).slice(0, 70), width: d.scrollWidth,
                column: Math.min(d.clientWidth, Math.round(column.right - d.getBoundingClientRect().left))}));
  return {text: text.join(""), quoted: quoted, math: root.querySelectorAll("math").length, mathText: mathText,
          unrendered: root.querySelectorAll(".arithmatex").length,
          displayMath: root.querySelectorAll("div.math").length, wideMath: wideMath};
})()
"""

_RAW_TEX = re.compile(r"\\[\[\]()]|\$\$|\\[A-Za-z]{2,}|\$[^$\s][^$\n]*\$")
_TEX_COMMAND = re.compile(r"\\[A-Za-z]+")  # inside typeset math: a command the typesetter did not know
_REST = re.compile(r":(?:class|func|meth|math|mod|attr|data|exc|obj|ref|py:\w+):|\.\. [a-z-]+::")


def _snippets(pattern: re.Pattern[str], text: str, limit: int = 3) -> list[str]:
    found = []
    for m in list(pattern.finditer(text))[:limit]:
        found.append(text[max(0, m.start() - 25): m.end() + 25].replace("\n", " ").strip())
    return found


@functools.cache
def _free_port_nothing_listens() -> int:
    # Bound but never listening: connections are refused. Kept open so no one else takes the port.
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    _free_port_nothing_listens.sock = sock  # type: ignore[attr-defined]
    return sock.getsockname()[1]


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def visited(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, dict[str, Any]]]:
    """Every page of the built site, opened once: its probe result, requests and screenshot."""
    site = tmp_path_factory.mktemp("site")
    build = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-d", str(site)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert build.returncode == 0, build.stdout[-4000:] + build.stderr[-4000:]
    pages = sorted(p.parent.relative_to(site).as_posix() for p in site.rglob("index.html"))
    pages = ["index" if p == "." else p for p in pages]

    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(_Quiet, directory=str(site)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    origin = f"http://127.0.0.1:{server.server_address[1]}"
    dead = f"127.0.0.1:{_free_port_nothing_listens()}"
    assert CHROMIUM is not None
    browser = DevTools(CHROMIUM, tmp_path_factory.mktemp("profile"), [
        "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
        "--no-default-browser-check", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--disable-extensions", "--mute-audio", "--hide-scrollbars",
        f"--proxy-server=http://{dead}", "--proxy-bypass-list=127.0.0.1",
        "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
        f"--window-size={VIEWPORT[0]},{VIEWPORT[1]}", "about:blank",
    ])
    results: dict[str, dict[str, Any]] = {}
    try:
        target = browser.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = browser.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Page.enable", "Network.enable", "Runtime.enable"):
            browser.call(domain, session=session)
        browser.call("Emulation.setDeviceMetricsOverride", {
            "width": VIEWPORT[0], "height": VIEWPORT[1], "deviceScaleFactor": 1, "mobile": False,
        }, session=session)
        for page in pages:
            url = f"{origin}/" if page == "index" else f"{origin}/{page}/"
            browser.events.clear()
            browser.call("Page.navigate", {"url": url}, session=session)
            browser.wait_for("Page.loadEventFired", session)
            browser.settle()
            requests = sorted({
                e["params"]["request"]["url"] for e in browser.events
                if e.get("method") == "Network.requestWillBeSent" and e.get("sessionId") == session
            })
            probe = browser.call("Runtime.evaluate", {
                "expression": _PAGE_PROBE, "returnByValue": True,
            }, session=session)["result"]["value"]
            shot = None
            if page in SCREENSHOTS:
                shot = base64.b64decode(browser.call("Page.captureScreenshot", {"format": "png"},
                                                     session=session)["data"])
            results[page] = {"probe": probe, "requests": requests, "screenshot": shot, "origin": origin}
    finally:
        browser.close()
        server.shutdown()
        server.server_close()
    yield results


def test_every_page_was_opened(visited: dict[str, dict[str, Any]]) -> None:
    assert {"index", "getting-started", "api", "mechanisms/se", "mechanisms/mha"} <= set(visited)
    empty = [page for page, r in visited.items() if len(r["probe"]["text"].strip()) < 50]
    assert not empty, f"pages that rendered (almost) no text: {empty}"


def test_math_is_typeset_no_raw_tex(visited: dict[str, dict[str, Any]]) -> None:
    problems = []
    for page, r in visited.items():
        probe = r["probe"]
        raw = _snippets(_RAW_TEX, probe["text"]) + _snippets(_TEX_COMMAND, probe["mathText"])
        if raw or probe["unrendered"]:
            left = f", {probe['unrendered']} formula(s) not typeset" if probe["unrendered"] else ""
            problems.append(f"{page}: raw TeX {raw}{left}")
    without_math = [p for p in visited if p.startswith("mechanisms/") and visited[p]["probe"]["math"] == 0]
    if without_math:
        problems.append(f"mechanism pages with no typeset formula: {without_math}")
    if problems:
        pytest.fail(f"{len(problems)} page(s) show raw TeX:\n" + "\n".join(problems), pytrace=False)


def test_display_math_fits_the_column(visited: dict[str, dict[str, Any]]) -> None:
    # A browser never breaks a formula, so one wider than the text column scrolls sideways at 1280 px:
    # the reader sees it cut off. tools/mkdocs_math.py cuts a formula at its top-level \qquad, \quad,
    # \\ and = chains into parts that wrap; a single part still too wide needs its TeX split by hand
    # (several $$ blocks, or named sub-terms).
    assert sum(r["probe"]["displayMath"] for r in visited.values()) > 50, "the probe found no display math"
    problems = [f"{page}: {m['width']} px in a {m['column']} px column: {m['tex']!r}"
                for page, r in visited.items() for m in r["probe"]["wideMath"]]
    if problems:
        pytest.fail(f"{len(problems)} display formula(s) wider than the text column at {VIEWPORT[0]} px:\n"
                    + "\n".join(problems), pytrace=False)


def test_no_rest_roles(visited: dict[str, dict[str, Any]]) -> None:
    problems = [f"{page}: {found}" for page, r in visited.items()
                if (found := _snippets(_REST, r["probe"]["text"]))]
    if problems:
        pytest.fail(f"{len(problems)} page(s) show literal reST roles:\n" + "\n".join(problems),
                    pytrace=False)


def test_no_doctest_in_a_blockquote(visited: dict[str, dict[str, Any]]) -> None:
    problems = [f"{page}: {r['probe']['quoted'][:3]}" for page, r in visited.items() if r["probe"]["quoted"]]
    if problems:
        pytest.fail(f"{len(problems)} page(s) render a doctest as a blockquote (put the example in a "
                    "```python fence):\n" + "\n".join(problems), pytrace=False)


def test_no_request_leaves_the_site(visited: dict[str, dict[str, Any]]) -> None:
    problems = []
    for page, r in visited.items():
        outside = [u for u in r["requests"] if not u.startswith(r["origin"] + "/")
                   and not u.startswith(("data:", "blob:", "about:"))]
        if outside:
            problems.append(f"{page}: {outside}")
    if problems:
        pytest.fail(f"{len(problems)} page(s) request something outside the site:\n" + "\n".join(problems),
                    pytrace=False)


def test_screenshots_are_kept(visited: dict[str, dict[str, Any]]) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    for page in SCREENSHOTS:
        shot = visited[page]["screenshot"]
        assert shot is not None and shot.startswith(b"\x89PNG"), f"no screenshot of {page}"
        (ARTIFACTS / f"{page.replace('/', '_')}.png").write_bytes(shot)
