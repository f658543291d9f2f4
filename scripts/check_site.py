"""Open the built documentation site in headless Chromium: screenshots, and every image loaded.

Usage::

    mkdocs build                                  # the site, into site/
    python scripts/check_site.py OUT_DIR          # screenshots into OUT_DIR
    python scripts/check_site.py OUT_DIR --site site --tutorial tutorials/02_horseshoe/

The site is served from a local HTTP server on 127.0.0.1 (as a browser would see it deployed),
and Chromium (Debian's ``chromium``: ``apt-get install -y chromium``; ``--chromium PATH`` for
another) is driven through the Chrome DevTools Protocol (the ``websockets`` package). For the
syllabus page and one tutorial page it writes a full-page screenshot, ``OUT_DIR/<page>.png``, and
reports the page's title and the number of formulas MathJax typeset (MathJax is served by the site
itself, so this needs no network). On the tutorial page it checks that every ``<img>`` loaded (``naturalWidth > 0``): a
notebook stored without outputs has no images, and the check reports "0 images" and passes.

Exit status 0 when both pages loaded with MathJax, every formula typeset and every image on the
tutorial page loaded, 1 otherwise (every failure is printed), 2 when the site, Chromium or ``websockets`` is missing.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import functools
import http.server
import importlib.util
import json
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PAGES_TIMEOUT_S = 60
IMAGE_WAIT_MS = 10_000

# resolves once every <img> has finished (loaded or failed), or after IMAGE_WAIT_MS
_INSPECT = """
(async () => {
  const imgs = Array.from(document.images);
  const settle = Promise.all(imgs.map(img => img.complete ? null :
      new Promise(done => { img.addEventListener('load', done); img.addEventListener('error', done); })));
  await Promise.race([settle, new Promise(done => setTimeout(done, IMAGE_WAIT_MS))]);
  const hub = typeof window.MathJax === 'object' && window.MathJax.Hub;
  if (hub) {  // MathJax queues its typesetting after load: wait until the queue has run it
    await Promise.race([new Promise(done => hub.Queue(done)), new Promise(done => setTimeout(done, IMAGE_WAIT_MS))]);
  }
  return JSON.stringify({
    title: document.title,
    images: imgs.map(img => ({src: img.currentSrc.slice(0, 80), width: img.naturalWidth})),
    math: document.querySelectorAll('script[type^="math/tex"]').length,  // one per typeset formula
    errors: Array.from(document.querySelectorAll('.noError, .MathJax_Error')).map(e => e.textContent.slice(0, 80)),
    mathjax: !!hub,
  });
})()
""".replace("IMAGE_WAIT_MS", str(IMAGE_WAIT_MS))


def _serve(site: Path) -> tuple[http.server.ThreadingHTTPServer, str]:
    handler = functools.partial(_QuietHandler, directory=str(site))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}/"


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):  # keep the report readable
        pass


class _Tab:
    """One page target of Chromium, spoken to over its DevTools websocket."""

    def __init__(self, ws):
        self.ws, self.next_id = ws, 0

    async def call(self, method: str, **params) -> dict:
        self.next_id += 1
        await self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            message = json.loads(await self.ws.recv())
            if message.get("id") == self.next_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message["result"]

    async def wait_event(self, name: str) -> None:
        while True:
            if json.loads(await self.ws.recv()).get("method") == name:
                return


def _page_target(port: int) -> str:
    """The DevTools websocket URL of Chromium's first page target."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list") as response:
        return next(t for t in json.load(response) if t["type"] == "page")["webSocketDebuggerUrl"]


async def _check(websocket_url: str, base: str, pages: dict[str, str], out: Path) -> dict[str, dict]:
    import websockets

    found = {}
    async with websockets.connect(websocket_url, max_size=None) as ws:
        tab = _Tab(ws)
        await tab.call("Page.enable")
        await tab.call("Emulation.setDeviceMetricsOverride", width=1280, height=900, deviceScaleFactor=1,
                       mobile=False)
        for name, path in pages.items():
            await tab.call("Page.navigate", url=base + path)
            await asyncio.wait_for(tab.wait_event("Page.loadEventFired"), PAGES_TIMEOUT_S)
            result = await tab.call("Runtime.evaluate", expression=_INSPECT, awaitPromise=True,
                                    returnByValue=True)
            info = json.loads(result["result"]["value"])
            shot = await tab.call("Page.captureScreenshot", format="png", captureBeyondViewport=True)
            (out / f"{name}.png").write_bytes(base64.b64decode(shot["data"]))
            found[name] = info
    return found


def _devtools_port(profile: Path, process: subprocess.Popen, timeout_s: float = 30) -> int:
    port_file = profile / "DevToolsActivePort"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if port_file.is_file() and port_file.read_text().strip():
            return int(port_file.read_text().splitlines()[0])
        if process.poll() is not None:
            raise RuntimeError(f"chromium exited with status {process.returncode}")
        time.sleep(0.1)
    raise RuntimeError(f"chromium opened no DevTools port within {timeout_s:.0f} s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="directory for the screenshots (created)")
    parser.add_argument("--site", type=Path, default=ROOT / "site", help="the built site (default: site/)")
    parser.add_argument("--tutorial", default="tutorials/01_bnn_from_scratch/",
                        help="the tutorial page to check, relative to the site")
    parser.add_argument("--chromium", default=shutil.which("chromium") or shutil.which("chromium-browser"),
                        help="the Chromium executable (default: chromium on PATH)")
    args = parser.parse_args(argv)

    if not (args.site / "index.html").is_file():
        print(f"no built site at {args.site}: run `mkdocs build` first", file=sys.stderr)
        return 2
    if not args.chromium:
        print("no chromium on PATH: apt-get install -y chromium, or --chromium PATH", file=sys.stderr)
        return 2
    if importlib.util.find_spec("websockets") is None:
        print("the websockets package is missing: pip install websockets", file=sys.stderr)
        return 2
    pages = {"syllabus": "syllabus/", "tutorial": args.tutorial}
    for name, path in pages.items():
        if not (args.site / path / "index.html").is_file():
            print(f"{name} page {path} is not in {args.site}", file=sys.stderr)
            return 2
    args.out.mkdir(parents=True, exist_ok=True)

    server, base = _serve(args.site)
    with tempfile.TemporaryDirectory() as profile:
        process = subprocess.Popen(
            [args.chromium, "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
             "--disable-dev-shm-usage", "--remote-debugging-port=0", f"--user-data-dir={profile}",
             "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            port = _devtools_port(Path(profile), process)
            found = asyncio.run(_check(_page_target(port), base, pages, args.out))
        finally:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
            server.shutdown()

    failures = []
    for name, info in found.items():
        math = f"{info['math']} formulas typeset by MathJax" if info["mathjax"] else "MathJax not loaded"
        print(f"{name} ({pages[name]}): title {info['title']!r}; {math}; screenshot {args.out / (name + '.png')}")
        if not info["mathjax"]:
            failures.append(f"MathJax did not load on {pages[name]} (javascripts/mathjax/ of the site)")
        for error in info["errors"]:
            failures.append(f"a formula MathJax could not typeset on {pages[name]}: {error!r}")
    images = found["tutorial"]["images"]
    broken = [img for img in images if img["width"] <= 0]
    if not images:
        print(f"tutorial images: 0 images on {pages['tutorial']} "
              "(the notebook is stored without outputs); nothing to check")
    else:
        print(f"tutorial images: {len(images) - len(broken)} of {len(images)} loaded (naturalWidth > 0)")
    for img in broken:
        failures.append(f"image not loaded on {pages['tutorial']}: {img['src']}")
    for failure in failures:
        print("FAIL:", failure)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
