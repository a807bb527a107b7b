"""Screenshots of the Ray dashboard while a tiny CPU sweep runs: the token sign-in, then the Actors page with every
running trial under its own name. Exits 1 when the trial names are not on the Actors page.

    python bench/dashboard_screenshot.py                       # writes docs/images/dashboard_*.png
    python bench/dashboard_screenshot.py --out /tmp/shots --chromium /usr/bin/chromium

Needs a Chromium (`apt-get install -y chromium`); drives it headless over the DevTools protocol with aiohttp (a Ray
dependency), so nothing else is installed. The sweep gets a random token of its own (RAY_AUTH_TOKEN), which the
script types into the dashboard's sign-in dialog as a user pastes the one `ray get-auth-token` prints. About a minute.
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TRIALS = ("baseline_bs4", "bf16_bs4", "bf16_window16_bs4")
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run", "--window-size=1500,900",
                  "--hide-scrollbars")


def start_sweep(token: str, storage: Path) -> subprocess.Popen:
    """Three small CPU trials, two at a time, long enough to be looked at."""
    env = {**os.environ, "RAY_AUTH_TOKEN": token, "RAY_USAGE_STATS_ENABLED": "0", "CUDA_VISIBLE_DEVICES": ""}
    for name in ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH"):
        env.pop(name, None)
    data = ROOT / "prepared" / "sample-bpe1024-s64"
    argv = [sys.executable, "-m", "sweep.run", "--device", "cpu", "--techniques", "baseline", "bf16", "window",
            "--windows", "16", "--batch-sizes", "4", "--max-steps", "4000", "--max-concurrent", "2",
            "--n-layers", "2", "--d-model", "64", "--n-heads", "4", "--ff-dim", "256", "--seq-len", "64",
            "--storage-path", str(storage), "--name", "dashboard", "--address", "local",
            *(["--data", str(data)] if data.is_dir() else [])]
    return subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def dashboard_url(sweep: subprocess.Popen, timeout_s: float = 300) -> str:
    deadline = time.monotonic() + timeout_s
    for line in sweep.stderr:
        print(line, end="", file=sys.stderr)
        if line.startswith("Ray dashboard: "):
            return line.split()[2]
        if time.monotonic() > deadline:
            break
    raise SystemExit("the sweep printed no dashboard address")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Page:
    """One Chromium tab over the DevTools protocol."""

    def __init__(self, ws):
        self.ws, self.next_id = ws, 0

    async def call(self, method: str, **params):
        self.next_id += 1
        await self.ws.send_json({"id": self.next_id, "method": method, "params": params})
        while True:
            message = await self.ws.receive_json()
            if message.get("id") == self.next_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result", {})

    async def js(self, expression: str):
        result = await self.call("Runtime.evaluate", expression=expression, awaitPromise=True, returnByValue=True)
        return result.get("result", {}).get("value")

    async def wait_for_text(self, needles, timeout_s: float = 60) -> str:
        deadline = time.monotonic() + timeout_s
        text = ""
        while time.monotonic() < deadline:
            text = await self.js("document.body ? document.body.innerText : ''") or ""
            if all(n in text for n in needles):
                return text
            await asyncio.sleep(1)
        return text

    async def screenshot(self, path: Path) -> None:
        shot = await self.call("Page.captureScreenshot", format="png")
        path.write_bytes(base64.b64decode(shot["data"]))
        print(f"wrote {path}", file=sys.stderr)


async def capture(url: str, token: str, out: Path, chromium: str) -> bool:
    import aiohttp

    port = free_port()
    profile = tempfile.mkdtemp(prefix="chromium-")
    browser = subprocess.Popen([chromium, *CHROMIUM_FLAGS, f"--remote-debugging-port={port}",
                                f"--user-data-dir={profile}", "about:blank"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        async with aiohttp.ClientSession() as http:
            for _ in range(100):
                try:
                    async with http.get(f"http://127.0.0.1:{port}/json/list") as r:
                        target = next(t for t in await r.json() if t["type"] == "page")
                    break
                except (aiohttp.ClientError, StopIteration):
                    await asyncio.sleep(0.2)
            async with http.ws_connect(target["webSocketDebuggerUrl"], max_msg_size=0) as ws:
                page = Page(ws)
                await page.call("Page.enable")
                await page.call("Page.navigate", url=url)
                await page.wait_for_text(["Authentication Token"])
                await page.screenshot(out / "dashboard_sign_in.png")
                # Paste the token into the dialog's field, as a user would, and submit it.
                await page.js("document.querySelector('[role=dialog] input').focus()")
                await page.call("Input.insertText", text=token)
                await page.js("[...document.querySelectorAll('[role=dialog] button')].find(b => /submit/i"
                              ".test(b.innerText)).click()")
                for _ in range(30):
                    if not await page.js("!!document.querySelector('[role=dialog]')"):
                        break
                    await asyncio.sleep(0.5)
                else:
                    await page.screenshot(out / "dashboard_sign_in_failed.png")
                    raise SystemExit("the dashboard did not accept the token")
                await page.call("Page.navigate", url=f"{url}/#/actors")
                text = await page.wait_for_text(TRIALS[:2], timeout_s=90)
                await asyncio.sleep(2)  # let the table settle
                await page.screenshot(out / "dashboard_actors.png")
                found = [t for t in TRIALS if t in text]
                print(f"trial names on the Actors page: {', '.join(found) or 'none'}", file=sys.stderr)
                return set(TRIALS[:2]) <= set(found)
    finally:
        browser.terminate()
        browser.wait(10)
        shutil.rmtree(profile, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(ROOT / "docs" / "images"), help="where the PNGs go (default: %(default)s)")
    parser.add_argument("--chromium", default=shutil.which("chromium") or "chromium",
                        help="the Chromium binary (default: %(default)s)")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    token = secrets.token_hex(32)
    with tempfile.TemporaryDirectory(prefix="dashboard-sweep-") as storage:
        sweep = start_sweep(token, Path(storage))
        try:
            ok = asyncio.run(capture(dashboard_url(sweep), token, out, args.chromium))
        finally:
            os.killpg(sweep.pid, signal.SIGINT)  # Ctrl-C: the sweep stops its trials and its Ray
            try:
                sweep.wait(120)
            except subprocess.TimeoutExpired:
                os.killpg(sweep.pid, signal.SIGKILL)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
