"""A headless Chromium driven through chromedriver's W3C WebDriver HTTP API.

The few WebDriver calls the contact-sheet tests need (open a URL, run a script,
type into an element, take a screenshot, look for an alert), over urllib: no
client library. Chromium and chromedriver are the Debian packages ``chromium``
and ``chromium-driver`` (``.ci/run`` installs them).
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request

CHROMIUM_CANDIDATES = ("/usr/bin/chromium", "/usr/bin/chromium-browser")
# Started as the issue asks; the rest keeps a test run off the network and quiet.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-quic",
    "--disable-dev-shm-usage",
    "--no-first-run",
    "--no-default-browser-check",
    "--hide-scrollbars",
    "--force-device-scale-factor=1",
    "--window-size=1200,900",
]
ELEMENT = "element-6066-11e4-a52e-4f735466cecf"  # the W3C element reference key


def find_chromium() -> tuple[str | None, str | None]:
    chromium = next((p for p in CHROMIUM_CANDIDATES if os.access(p, os.X_OK)), None) or shutil.which("chromium")
    driver = shutil.which("chromedriver") or (
        "/usr/bin/chromedriver" if os.access("/usr/bin/chromedriver", os.X_OK) else None
    )
    return chromium, driver


class WebDriverError(RuntimeError):
    pass


class Browser:
    """One chromedriver process and one browser session with a fresh user-data dir."""

    def __init__(self, chromium: str, driver: str, *, timeout: float = 60):
        self.profile = tempfile.mkdtemp(prefix="blip2-chromium-")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.base = f"http://127.0.0.1:{port}"
        self.log = open(os.path.join(self.profile, "chromedriver.log"), "w+b")
        self.proc = subprocess.Popen([driver, f"--port={port}"], stdout=self.log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + timeout
            while True:
                try:
                    if self._call("GET", "/status").get("ready"):
                        break
                except (OSError, WebDriverError):
                    pass
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise WebDriverError(f"chromedriver did not start: {self.driver_log()}")
                time.sleep(0.1)
            options = {"binary": chromium, "args": [*CHROMIUM_ARGS, f"--user-data-dir={self.profile}/data"]}
            caps = {"capabilities": {"alwaysMatch": {"browserName": "chrome", "goog:chromeOptions": options,
                                                     "unhandledPromptBehavior": "ignore"}}}
            self.session = self._call("POST", "/session", caps)["sessionId"]
        except BaseException:
            self.close()
            raise

    def driver_log(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read().decode("utf-8", "replace")[-2000:]

    def _call(self, method: str, path: str, body: dict | None = None, *, timeout: float = 60):
        data = json.dumps(body).encode() if body is not None else (b"{}" if method == "POST" else None)
        request = urllib.request.Request(self.base + path, data=data, method=method,
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                payload = json.loads(response.read() or b"{}")
        except urllib.error.HTTPError as exc:
            payload = json.loads(exc.read() or b"{}")
            value = payload.get("value") or {}
            raise WebDriverError(f"{value.get('error')}: {value.get('message', '')[:500]}") from None
        return payload.get("value", payload)

    def _session(self, method: str, path: str, body: dict | None = None):
        return self._call(method, f"/session/{self.session}{path}", body)

    # -- what the tests use ----------------------------------------------------
    def open(self, url: str) -> None:
        self._session("POST", "/url", {"url": url})

    def run(self, script: str, *args):
        """Run a function body in the page (``return ...``), with ``arguments``."""
        return self._session("POST", "/execute/sync", {"script": script, "args": list(args)})

    def element(self, css: str) -> str:
        return self._session("POST", "/element", {"using": "css selector", "value": css})[ELEMENT]

    def type(self, css: str, text: str) -> None:
        """Real key events into the element (as a person typing)."""
        self._session("POST", f"/element/{self.element(css)}/value", {"text": text})

    def clear(self, css: str) -> None:
        self._session("POST", f"/element/{self.element(css)}/clear")

    def alert_text(self) -> str | None:
        try:
            return self._session("GET", "/alert/text")
        except WebDriverError as exc:
            if "no such alert" in str(exc):
                return None
            raise

    def screenshot(self) -> bytes:
        return base64.b64decode(self._session("GET", "/screenshot"))

    def wait_for(self, script: str, *args, timeout: float = 5.0):
        """Poll ``script`` until it returns something truthy; return that."""
        deadline = time.monotonic() + timeout
        while True:
            got = self.run(script, *args)
            if got or time.monotonic() > deadline:
                return got
            time.sleep(0.05)

    def close(self) -> None:
        try:
            if getattr(self, "session", None):
                self._call("DELETE", f"/session/{self.session}", timeout=20)
        except Exception:  # noqa: BLE001 - closing anyway
            pass
        finally:
            if self.proc.poll() is None:
                self.proc.terminate()
                try:
                    self.proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
            self.log.close()
            shutil.rmtree(self.profile, ignore_errors=True)
