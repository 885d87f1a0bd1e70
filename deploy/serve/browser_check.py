"""A real browser against the chat page: start `dgpt serve`, open the page in headless Chromium
over the Chrome DevTools protocol, type a message, wait for the answer, save a screenshot.

    python -m deploy.serve.browser_check MODEL_DIR [--message TEXT] [--out chat.png]

(scripts/browser_check.sh installs Chromium from Debian first when it is missing.) Prints the
answer, the page's forward-pass/time line and the screenshot path; exit code 1 when the page
shows no finished answer within the timeout.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import itertools
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import websockets

from .process import free_port, running, started_server, wait_for

BROWSERS = ("chromium", "chromium-browser", "google-chrome")


class DevTools:
    """Commands to one page over its DevTools websocket."""

    def __init__(self, socket_: Any) -> None:
        self.socket, self.ids = socket_, itertools.count(1)

    async def call(self, method: str, **params: Any) -> dict[str, Any]:
        call_id = next(self.ids)
        await self.socket.send(json.dumps({"id": call_id, "method": method, "params": params}))
        while True:
            message = json.loads(await self.socket.recv())
            if message.get("id") == call_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result", {})

    async def evaluate(self, expression: str) -> Any:
        result = await self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        return result.get("result", {}).get("value")

    async def until(self, expression: str, timeout: float) -> Any:
        deadline = time.monotonic() + timeout
        while not (value := await self.evaluate(expression)):
            if time.monotonic() > deadline:
                raise TimeoutError(f"the page never satisfied {expression!r} within {timeout:.0f}s")
            await asyncio.sleep(0.05)
        return value


async def chat_in_page(debug_port: int, page_url: str, message: str, out: Path, timeout: float) -> dict[str, Any]:
    targets = wait_for(f"http://127.0.0.1:{debug_port}/json/list", timeout)
    target = next(t for t in targets if t["type"] == "page")
    async with websockets.connect(target["webSocketDebuggerUrl"], max_size=2**26) as ws:
        page = DevTools(ws)
        await page.call("Page.enable")
        await page.call("Page.navigate", url=page_url)
        await page.until("document.getElementById('model')?.textContent.length > 1 "
                         "&& document.getElementById('model').textContent !== '…'", timeout)
        await page.evaluate("document.getElementById('message').focus()")
        await page.call("Input.insertText", text=message)
        for kind in ("keyDown", "keyUp"):
            await page.call("Input.dispatchKeyEvent", type=kind, key="Enter", code="Enter",
                            windowsVirtualKeyCode=13, **({"text": "\r"} if kind == "keyDown" else {}))
        # mid-answer: masks beside some resolved text (or the finished answer, if that comes first)
        masks_seen = await page.until(
            "document.querySelector('.assistant[data-done]') ? 'done' : (document.querySelector('.assistant .mask')"
            " && document.querySelector('.assistant .body').textContent.replace(/\u2591/g, '').trim() ? 'masks' : '')",
            timeout)
        if masks_seen == "masks":  # the answer mid-denoising, masks and resolved tokens side by side
            mid = await page.call("Page.captureScreenshot", format="png")
            out.with_name(out.stem + "-denoising.png").write_bytes(base64.b64decode(mid["data"]))
        await page.until("document.querySelector('.assistant[data-done]')?.dataset.done", timeout)
        shot = await page.call("Page.captureScreenshot", format="png")
        out.write_bytes(base64.b64decode(shot["data"]))
        return {
            "state": await page.evaluate("document.querySelector('.assistant').dataset.done"),
            "answer": await page.evaluate("document.querySelector('.assistant .body').textContent"),
            "meta": await page.evaluate("document.querySelector('.assistant .meta').textContent"),
            "saw_masks": masks_seen == "masks",
        }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model_dir")
    parser.add_argument("--message", default="Which university did Nora Lee attend?")
    parser.add_argument("--out", default="runs/browser_check/chat.png", help="screenshot PNG")
    parser.add_argument("--timeout", type=float, default=120)
    args = parser.parse_args(argv)
    browser = next((b for b in map(shutil.which, BROWSERS) if b), None)
    if browser is None:
        print("browser_check: no Chromium found; run scripts/browser_check.sh (installs it from Debian)",
              file=sys.stderr)
        return 2
    out = Path(args.out).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    debug_port = free_port()
    with tempfile.TemporaryDirectory() as profile, \
            started_server(args.model_dir, log=out.parent / "serve.log", timeout=args.timeout) as base, \
            running([browser, "--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1100,800",
                     f"--remote-debugging-port={debug_port}", f"--user-data-dir={profile}", "about:blank"],
                    out.parent / "chromium.log"):
        result = asyncio.run(chat_in_page(debug_port, base + "/", args.message, out, args.timeout))
    print(json.dumps({**result, "screenshot": str(out)}, indent=2, ensure_ascii=False))
    return 0 if result["state"] == "true" else 1


if __name__ == "__main__":
    sys.exit(main())
