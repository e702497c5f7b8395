"""Headless Chromium for page tests (no browser download: Debian's `chromium`).

`chromium_or_skip()` finds Debian's `chromium`, installing it with apt-get when it is missing and we
are root; otherwise the test is skipped with a message saying so, except in CI (`CI` set), where a
missing browser fails the test instead of hiding the page checks. `inspect_page(path, png)` loads a
local page (the report) through the DevTools protocol with the network off, and returns its console
errors, the result of a JavaScript expression and a screenshot. `playwright_browser()` launches the
same browser under Playwright (`executable_path`), for pages that are clicked and typed into (the
search server's); `watch(page)` collects what must never happen on a page: console errors (CSP
violations included), uncaught exceptions, failed requests and HTTP errors.
"""

import base64
import contextlib
import json
import os
import re
import shutil
import subprocess
import tempfile
import threading
import time
import urllib.request

import pytest

# Flags Chromium needs on a machine without network (no background connections) and as root.
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
    "--window-size=1280,1600",
]
_INSTALL_TRIED = []


def chromium_or_skip() -> str:
    """Path of a chromium binary; installs Debian's package once if missing (root only)."""
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    if (
        not _INSTALL_TRIED
        and hasattr(os, "geteuid")
        and os.geteuid() == 0
        and shutil.which("apt-get")
    ):
        _INSTALL_TRIED.append(True)
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-qq"], env=env, capture_output=True, timeout=600)
        subprocess.run(
            ["apt-get", "install", "-y", "-qq", "chromium"],
            env=env,
            capture_output=True,
            timeout=1200,
        )
        if shutil.which("chromium"):
            return shutil.which("chromium")
    why = (
        "Chromium is not installed and could not be installed "
        "(as root: apt-get update && apt-get install -y chromium)"
    )
    if os.environ.get("CI"):
        pytest.fail(why)
    pytest.skip(why)


@contextlib.contextmanager
def playwright_browser():
    """Debian's chromium, headless, under Playwright (its own browsers are never downloaded)."""
    from playwright.sync_api import sync_playwright

    executable = chromium_or_skip()
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=executable,
            args=[f for f in CHROMIUM_FLAGS if f not in ("--headless", "--window-size=1280,1600")],
        )
        try:
            yield browser
        finally:
            browser.close()


def watch(page) -> list:
    """A list that fills with every console error, page exception, failed request and HTTP error
    response of `page` (a Content-Security-Policy violation is a console error)."""
    problems = []
    page.on(
        "console",
        lambda m: (
            problems.append(f"console: {m.text} ({m.location.get('url')})")
            if m.type == "error"
            else None
        ),
    )
    page.on("pageerror", lambda e: problems.append(f"exception: {e}"))
    page.on("requestfailed", lambda r: problems.append(f"failed: {r.url} {r.failure}"))
    page.on(
        "response",
        lambda r: problems.append(f"HTTP {r.status}: {r.url}") if r.status >= 400 else None,
    )
    page.on("dialog", lambda d: (problems.append(f"dialog: {d.message}"), d.dismiss()))
    return problems


class _DevTools:
    """A minimal synchronous DevTools protocol client over one page's websocket."""

    def __init__(self, ws):
        self._ws = ws  # a websockets.sync.client connection
        self._id = 0
        self.events = []

    def call(self, method: str, timeout: float = 30, **params) -> dict:
        self._id += 1
        self._ws.send(json.dumps({"id": self._id, "method": method, "params": params}))
        deadline = time.monotonic() + timeout
        while True:
            message = json.loads(self._ws.recv(timeout=max(deadline - time.monotonic(), 0.1)))
            if message.get("id") == self._id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result", {})
            self.events.append(message)

    def wait_for(self, method: str, timeout: float = 30) -> dict:
        deadline = time.monotonic() + timeout
        for event in self.events:
            if event.get("method") == method:
                return event
        while True:
            message = json.loads(self._ws.recv(timeout=max(deadline - time.monotonic(), 0.1)))
            self.events.append(message)
            if message.get("method") == method:
                return message


def console_errors(events) -> list:
    """Console errors, exceptions and failed loads among the DevTools events."""
    errors = []
    for event in events:
        method, params = event.get("method"), event.get("params", {})
        if method == "Runtime.exceptionThrown":
            errors.append(params["exceptionDetails"].get("text", "exception"))
        elif method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
            errors.append(" ".join(str(a.get("value", "")) for a in params.get("args", [])))
        elif method == "Log.entryAdded" and params["entry"].get("level") == "error":
            errors.append(params["entry"].get("text", ""))
    return errors


def inspect_page(path: str, expression: str, screenshot: str) -> tuple[list, object]:
    """Loads file `path` in headless Chromium; returns (console errors, value of `expression`)
    and writes a full-page PNG screenshot to `screenshot`."""
    from websockets.sync.client import connect

    chromium = chromium_or_skip()
    profile = tempfile.mkdtemp(prefix="chromium-")
    proc = subprocess.Popen(
        [
            chromium,
            *CHROMIUM_FLAGS,
            f"--user-data-dir={profile}",
            "--remote-debugging-port=0",
            "about:blank",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        port = _devtools_port(proc)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as r:
            page = next(t for t in json.load(r) if t["type"] == "page")
        with connect(page["webSocketDebuggerUrl"], max_size=None, open_timeout=30) as ws:
            return _inspect(_DevTools(ws), path, expression, screenshot)
    finally:
        proc.kill()
        proc.wait(timeout=30)
        shutil.rmtree(profile, ignore_errors=True)


def _inspect(tools: _DevTools, path: str, expression: str, screenshot: str):
    for domain in ("Runtime", "Log", "Page"):
        tools.call(f"{domain}.enable")
    tools.call("Page.navigate", url="file://" + os.path.abspath(path))
    tools.wait_for("Page.loadEventFired")
    value = tools.call(
        "Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True
    )["result"].get("value")
    metrics = tools.call("Page.getLayoutMetrics")
    size = metrics.get("cssContentSize") or metrics["contentSize"]
    shot = tools.call(
        "Page.captureScreenshot",
        format="png",
        captureBeyondViewport=True,
        clip={
            "x": 0,
            "y": 0,
            "width": size["width"],
            "height": min(size["height"], 4000),
            "scale": 1,
        },
    )
    with open(screenshot, "wb") as f:
        f.write(base64.b64decode(shot["data"]))
    return console_errors(tools.events), value


def _devtools_port(proc: subprocess.Popen, timeout: float = 60) -> int:
    deadline = time.monotonic() + timeout
    seen = []
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line:
            if proc.poll() is not None:
                break
            continue
        seen.append(line)
        match = re.search(r"DevTools listening on ws://[^:]+:(\d+)/", line)
        if match:  # keep draining stderr so Chromium never blocks on a full pipe
            threading.Thread(target=proc.stderr.read, daemon=True).start()
            return int(match.group(1))
    raise RuntimeError("Chromium did not start: " + "".join(seen[-20:]))
