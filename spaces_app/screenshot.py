# Copyright 2026 The pmf-diffusers developers. MIT License.
"""Drive the Space in headless Chromium: open the page, click **Generate**, wait for the gallery, save a screenshot.

    python spaces_app/screenshot.py                      # → docs/images/space_screenshot.png (bundled model)
    python spaces_app/screenshot.py --out shot.png --url http://127.0.0.1:7860/   # an app that is already running

The browser is controlled with the Chrome DevTools Protocol over `--remote-debugging-pipe` (JSON messages separated
by NUL bytes on file descriptors 3 and 4), so no websocket client or browser-automation package is needed. The click
is a real mouse press/release dispatched at the button's on-screen centre (`Input.dispatchMouseEvent`), so the page's
own Svelte handlers send the Generate event through the queue exactly as for a user.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO_ROOT / "docs" / "images" / "space_screenshot.png"
CHROMIUM_CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",  # CI runs as root
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-extensions",
    "--disable-quic",
    "--no-first-run",
    "--no-default-browser-check",
    "--hide-scrollbars",
    "--mute-audio",
    "--remote-debugging-pipe",
]

# JavaScript run in the page.
JS_BUTTON_RECT = """(() => {
  const b = document.querySelector('#generate');
  if (!b || b.disabled) return null;
  window.scrollTo(0, 0);
  b.scrollIntoView({block: 'center'});
  const r = b.getBoundingClientRect();
  if (r.width === 0 || r.height === 0) return null;
  const x = r.x + r.width / 2, y = r.y + r.height / 2;
  const hit = document.elementFromPoint(x, y);  // nothing (an open option list, a toast) covers the button
  if (!hit || !hit.closest('#generate')) return null;
  return JSON.stringify({x, y});
})()"""
JS_GALLERY_STATE = """(() => {
  const g = document.querySelector('#gallery');
  if (!g) return JSON.stringify({images: 0, loaded: 0});
  const imgs = Array.from(g.querySelectorAll('img'));
  const loaded = imgs.filter(i => i.complete && i.naturalWidth > 0).length;
  const t = document.querySelector('#timing textarea, #timing input');
  const err = Array.from(document.querySelectorAll('.toast-body.error .toast-messages'))
      .map(e => e.innerText.trim()).filter(s => s).join(' | ');
  return JSON.stringify({images: imgs.length, loaded, timing: t ? t.value : '', error: err});
})()"""
JS_TOASTS = """JSON.stringify(Array.from(document.querySelectorAll('.toast-body')).map(b => ({
  kind: ['error', 'warning', 'info', 'success'].find(k => b.classList.contains(k)) || '',
  text: (b.querySelector('.toast-messages') || b).innerText.trim()})))"""
JS_GALLERY_RECT = """(() => {
  window.scrollTo(0, 0);
  const r = document.querySelector('#gallery').getBoundingClientRect();
  return JSON.stringify({x: r.x + window.scrollX, y: r.y + window.scrollY, width: r.width, height: r.height,
                         pageHeight: document.documentElement.scrollHeight});
})()"""


def find_chromium() -> str | None:
    """The Chromium/Chrome executable (`$CHROMIUM` first), or None."""
    if os.environ.get("CHROMIUM"):
        return shutil.which(os.environ["CHROMIUM"]) or os.environ["CHROMIUM"]
    for name in CHROMIUM_CANDIDATES:
        if path := shutil.which(name):
            return path
    return None


class DevToolsPipe:
    """A minimal CDP client over `--remote-debugging-pipe` (browser reads fd 3, writes fd 4)."""

    def __init__(self, executable: str, width: int, height: int):
        self._profile = tempfile.mkdtemp(prefix="pmf_chromium_")
        to_browser_r, self._to_browser = os.pipe()
        self._from_browser, from_browser_w = os.pipe()
        # Move the browser's ends above 9 so that the redirections below cannot collide with fds 3/4.
        to_browser_r, from_browser_w = (self._high_fd(fd) for fd in (to_browser_r, from_browser_w))
        args = [executable, *CHROMIUM_FLAGS, f"--window-size={width},{height}", f"--user-data-dir={self._profile}"]
        # bash (dash cannot redirect fds > 9) puts our pipe ends on fds 3/4 of the exec'd browser; the Debian launcher
        # script keeps them open when it execs the real binary.
        redirect = f'exec "$@" 3<&{to_browser_r} 4>&{from_browser_w} {to_browser_r}<&- {from_browser_w}>&-'
        self.process = subprocess.Popen(
            [shutil.which("bash") or "/bin/bash", "-c", redirect, "bash", *args],
            pass_fds=(to_browser_r, from_browser_w),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        os.close(to_browser_r)
        os.close(from_browser_w)
        self._next_id = 0
        self._responses: dict[int, dict] = {}
        self._cond = threading.Condition()
        self._closed = False
        self._stderr: list[bytes] = []
        threading.Thread(target=self._read_loop, daemon=True).start()
        threading.Thread(target=self._drain_stderr, daemon=True).start()

    @staticmethod
    def _high_fd(fd: int) -> int:
        import fcntl

        high = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10)
        os.close(fd)
        return high

    def _drain_stderr(self):
        for line in self.process.stderr:
            self._stderr.append(line)
            del self._stderr[:-50]

    def _read_loop(self):
        buffer = b""
        with os.fdopen(self._from_browser, "rb", buffering=0) as stream:
            while chunk := stream.read(65536):
                buffer += chunk
                *messages, buffer = buffer.split(b"\0")
                for raw in messages:
                    message = json.loads(raw)
                    if "id" in message:
                        with self._cond:
                            self._responses[message["id"]] = message
                            self._cond.notify_all()
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def send(self, method: str, params: dict | None = None, session_id: str | None = None, timeout: float = 30.0):
        with self._cond:
            self._next_id += 1
            message_id = self._next_id
        message = {"id": message_id, "method": method, "params": params or {}}
        if session_id:
            message["sessionId"] = session_id
        os.write(self._to_browser, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        with self._cond:
            while message_id not in self._responses:
                remaining = deadline - time.monotonic()
                if self._closed or remaining <= 0:
                    raise RuntimeError(
                        f"No DevTools answer to {method} ({'browser exited' if self._closed else 'timeout'}); "
                        f"chromium stderr tail: {b''.join(self._stderr[-10:]).decode(errors='replace')}"
                    )
                self._cond.wait(remaining)
            response = self._responses.pop(message_id)
        if "error" in response:
            raise RuntimeError(f"DevTools {method} failed: {response['error']}")
        return response.get("result", {})

    def close(self):
        try:
            self.send("Browser.close", timeout=5)
        except Exception:  # noqa: BLE001 — the browser may already be gone
            pass
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        try:
            os.close(self._to_browser)
        except OSError:
            pass
        shutil.rmtree(self._profile, ignore_errors=True)


def _wait_for(predicate, timeout: float, what: str, interval: float = 0.1):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    raise TimeoutError(f"Timed out after {timeout:.0f} s waiting for {what} (last state: {last!r}).")


class BrowserPage:
    """One headless-Chromium tab driven over CDP: `with BrowserPage(url) as page: page.click("#generate")`."""

    def __init__(self, url: str, width: int = 1280, height: int = 1100, timeout: float = 60.0,
                 executable: str | None = None):
        executable = executable or find_chromium()
        if not executable:
            raise FileNotFoundError("No Chromium found: install it (`apt-get install -y chromium`) or set $CHROMIUM.")
        self.width, self.height, self.timeout = width, height, timeout
        self.cdp = DevToolsPipe(executable, width, height)
        try:
            target = self.cdp.send("Target.createTarget", {"url": "about:blank"})["targetId"]
            self.session = self.cdp.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
            self.send("Page.enable")
            self.send("Runtime.enable")
            self.set_viewport(height)
            self.send("Page.navigate", {"url": url})
            # The Svelte app is up once the Generate button is rendered and enabled.
            self.wait_for(lambda: self.evaluate(JS_BUTTON_RECT), "the Generate button")
        except BaseException:
            self.cdp.close()
            raise

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.cdp.close()

    def send(self, method: str, params: dict | None = None):
        return self.cdp.send(method, params, self.session)

    def set_viewport(self, height: int):
        self.send(
            "Emulation.setDeviceMetricsOverride",
            {"width": self.width, "height": height, "deviceScaleFactor": 1, "mobile": False},
        )

    def evaluate(self, expression: str):
        result = self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True})
        if "exceptionDetails" in result:
            raise RuntimeError(f"Page script failed: {result['exceptionDetails']}")
        value = result.get("result", {}).get("value")
        return json.loads(value) if isinstance(value, str) else value

    def wait_for(self, predicate, what: str, timeout: float | None = None, interval: float = 0.1):
        return _wait_for(predicate, self.timeout if timeout is None else timeout, what, interval)

    def click_generate(self):
        """A real left click (mouse move, press, release) at the centre of the Generate button."""
        previous = {}

        def settled():  # the same position twice in a row: the layout has stopped moving
            center = self.evaluate(JS_BUTTON_RECT)
            stable = center is not None and center == previous.get("center")
            previous["center"] = center
            return center if stable else None

        center = self.wait_for(settled, "the Generate button to be clickable", interval=0.25)
        self.send("Input.dispatchMouseEvent", {"type": "mouseMoved", "x": center["x"], "y": center["y"]})
        for kind in ("mousePressed", "mouseReleased"):
            self.send(
                "Input.dispatchMouseEvent",
                {"type": kind, "x": center["x"], "y": center["y"], "button": "left", "clickCount": 1},
            )

    def type_class(self, text: str):
        """Type a custom value into the class search box and press Enter (adds it to the selection)."""
        tokens = "JSON.stringify(Array.from(document.querySelectorAll('#classes .token')).map(e => e.innerText.trim()))"
        self._type_and_enter("#classes input", text)
        self.wait_for(lambda: text in self.evaluate(tokens), f"{text!r} among the selected classes", timeout=10)
        self.close_dropdowns()

    def close_dropdowns(self):
        """Leave the focused field (like clicking elsewhere) so no open option list covers the buttons."""
        self.evaluate("(() => { document.activeElement && document.activeElement.blur(); return true; })()")
        self.wait_for(
            lambda: self.evaluate("document.querySelectorAll('[aria-expanded=\"true\"]').length === 0"),
            "the option lists to close",
            timeout=10,
        )

    def _type_and_enter(self, selector: str, text: str):
        focused = self.evaluate(
            f"(() => {{ const i = document.querySelector({json.dumps(selector)}); if (!i) return false; "
            "i.focus(); i.select(); return document.activeElement === i; })()"
        )
        if not focused:
            raise RuntimeError(f"Cannot focus {selector} on the page.")
        self.send("Input.insertText", {"text": text})  # replaces the selected text, like typing
        self.wait_for(lambda: self.text_of(selector) == text, f"{text!r} typed into {selector}", timeout=10)
        time.sleep(0.2)  # let the dropdown filter its options
        for kind in ("keyDown", "keyUp"):
            self.send(
                "Input.dispatchKeyEvent",
                {"type": kind, "key": "Enter", "code": "Enter", "windowsVirtualKeyCode": 13, "text": "\r"},
            )

    def select_model(self, text: str):
        """Type into the model selector and press Enter: picks the first model whose label matches `text`."""
        self._type_and_enter("#model input", text)

    def text_of(self, selector: str) -> str:
        return self.evaluate(
            f"(() => {{ const e = document.querySelector({json.dumps(selector)}); "
            "return e ? JSON.stringify(e.value !== undefined ? e.value : e.innerText) : null; })()"
        )

    def toasts(self) -> list[dict]:
        """The notifications on screen: [{"kind": "error" | "warning" | …, "text": message}]."""
        return self.evaluate(JS_TOASTS)

    def gallery_state(self) -> dict:
        return self.evaluate(JS_GALLERY_STATE)

    def screenshot(self, out_path: str | Path) -> dict:
        """Save a PNG of the whole page; returns the gallery's box in screenshot pixels."""
        rect = self.evaluate(JS_GALLERY_RECT)
        page_height = max(self.height, min(int(rect["pageHeight"]), 4000))
        if page_height != self.height:  # capture the whole page, not only the first screen
            self.set_viewport(page_height)
            time.sleep(0.3)
            rect = self.evaluate(JS_GALLERY_RECT)
        shot = self.send("Page.captureScreenshot", {"format": "png"})
        out_path = Path(out_path)
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_bytes(base64.b64decode(shot["data"]))
        return {key: round(rect[key]) for key in ("x", "y", "width", "height")}


def capture_generate(
    url: str,
    out_path: str | Path,
    expected_images: int = 1,
    width: int = 1280,
    height: int = 1100,
    timeout: float = 60.0,
    executable: str | None = None,
) -> dict:
    """Open `url`, click the Generate button (a real mouse click), wait until the gallery shows at least
    `expected_images` loaded images and the time per image, and save a PNG screenshot of the page to `out_path`.

    Returns `{"gallery": {x, y, width, height} in screenshot pixels, "images": n, "timing": text, "seconds": s}`.
    """
    start = time.monotonic()
    with BrowserPage(url, width, height, timeout, executable) as page:
        before = page.gallery_state()
        page.click_generate()

        def gallery_ready():
            state = page.gallery_state()
            if state.get("error"):
                raise RuntimeError(f"The page shows an error: {state['error']}")
            ready = state["loaded"] >= max(expected_images, before["loaded"] + 1) and state["timing"]
            return state if ready else None

        try:
            state = page.wait_for(gallery_ready, f"{expected_images} image(s) in the gallery")
        except TimeoutError as error:  # keep what the page showed, for the CI log
            failed = Path(out_path).with_suffix(".timeout.png")
            page.screenshot(failed)
            raise TimeoutError(f"{error} Page state: {page.gallery_state()}; screenshot: {failed}") from None
        time.sleep(0.3)  # let the last thumbnails paint
        gallery = page.screenshot(out_path)
    return {"gallery": gallery, "images": state["loaded"], "timing": state["timing"],
            "seconds": time.monotonic() - start}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"PNG to write (default: {DEFAULT_OUT})")
    parser.add_argument("--url", help="screenshot an app that is already running instead of launching one")
    parser.add_argument("--model", default="bundled", help="model to launch the app with (default: bundled)")
    parser.add_argument("--images", type=int, default=4, help="gallery images to wait for (default: 4)")
    args = parser.parse_args(argv)

    demo = None
    url = args.url
    if url is None:
        os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
        sys.path.insert(0, str(Path(__file__).parent))
        from app import CSS, build_demo

        demo = build_demo(default_model=args.model)
        _, url, _ = demo.launch(server_name="127.0.0.1", prevent_thread_lock=True, quiet=True, css=CSS)
    try:
        info = capture_generate(url, args.out, expected_images=args.images)
    finally:
        if demo is not None:
            demo.close()
    print(f"Wrote {args.out} ({info['images']} images; {info['timing']}; {info['seconds']:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
