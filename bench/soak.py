"""Soak: the app under load, on this machine only (127.0.0.1, nothing else reached).

Starts ``streamlit run app.py`` on a free local port with a finished run opened for every new
session (``OSRM_RUN_DIR``), then drives ``--sessions`` browser sessions at once (headless
Chromium through playwright, one browser context each) until ``--minutes`` have passed: each
session switches between the pages by the sidebar's links at random, and every tenth step loads
a page by its address instead, which starts a new server session that opens the run again.
Counted: page views, exception boxes and error boxes (a finished, whole run shows none).
Measured: the server's resident memory (RSS) after a warm-up that opened every page once
(model and caches loaded), half-way, and at the end after every session was closed; the caches
are bounded (``max_entries``), so the end must not grow beyond them.

    nice -n 10 python -m bench.soak --sessions 8 --minutes 3 --json bench/results/soak.json

The run is ``--run PATH``, or the one of ``bench/bench_app.py`` (``OSRM_BENCH_RUN``, else the
app tests' small run, built once in the temporary folder). Needs Chromium at /usr/bin/chromium.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import psutil

from bench._common import ROOT, Context
from bench.bench_app import finished_run

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run"]
#: Sidebar title and address of every page (``st.navigation`` names them after their files).
PAGES = {"Home": ""} | {
    p.stem.split("_", 1)[1].replace("_", " "): p.stem.split("_", 1)[1] for p in sorted((ROOT / "pages").glob("[1-9]_*.py"))
}
SETTLED = '[data-testid="stApp"][data-test-script-state="notRunning"]'


def start_server(run: Path, runs_root: Path, log) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OSRM_RUN_DIR": str(run), "OSRM_RUNS_ROOT": str(runs_root),
           "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", "app.py", "--server.headless", "true", "--server.port", str(port),
         "--server.address", "127.0.0.1", "--browser.gatherUsageStats", "false"],
        cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while True:
        try:
            with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as r:
                if r.read().strip() == b"ok":
                    return proc, url
        except OSError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            raise RuntimeError("streamlit did not start")
        time.sleep(0.5)


def rss_mib(proc: subprocess.Popen) -> float:
    return psutil.Process(proc.pid).memory_info().rss / 2**20


class Session:
    """One browser session wandering over the pages; counts views and what went wrong."""

    def __init__(self, k: int, url: str) -> None:
        self.k, self.url, self.rng = k, url, random.Random(k)
        self.views, self.problems = 0, []

    async def settle(self, page) -> None:
        await asyncio.sleep(0.5)  # let the rerun start before waiting for its end
        await page.wait_for_selector(SETTLED, timeout=300_000)
        self.views += 1
        for kind in ("stException", "stAlertContentError"):
            for text in await page.locator(f'[data-testid="{kind}"]').all_inner_texts():
                self.problems.append(f"session {self.k} {page.url}: {kind}: {text.strip()[:200]}")

    async def visit(self, page, title: str, *, fresh: bool) -> None:
        if fresh:  # a new server session, which opens the run again
            await page.goto(f"{self.url}/{PAGES[title]}", timeout=300_000)
        else:
            await page.locator('[data-testid="stSidebarNavLink"]', has_text=title).first.click(timeout=300_000)
        await self.settle(page)

    async def loop(self, browser, until: float) -> None:
        context = await browser.new_context(viewport={"width": 1200, "height": 900})
        page = await context.new_page()
        try:
            await self.visit(page, "Home", fresh=True)
            while time.monotonic() < until:
                await self.visit(page, self.rng.choice(list(PAGES)), fresh=self.views % 10 == 9)
        except Exception as err:  # a timeout or a crash: counted, never hidden
            self.problems.append(f"session {self.k}: {type(err).__name__}: {str(err).splitlines()[0][:200]}")
        finally:
            await context.close()


async def drive(url: str, server: subprocess.Popen, sessions: int, minutes: float, log) -> dict:
    from playwright.async_api import async_playwright

    rss = {}
    async with async_playwright() as p:
        browser = await p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        warm = Session(-1, url)  # every page once
        context = await browser.new_context()
        page = await context.new_page()
        await warm.visit(page, "Home", fresh=True)
        for title in PAGES:
            await warm.visit(page, title, fresh=False)
        await context.close()
        rss["after warm-up"] = rss_mib(server)
        log(f"warm-up: {warm.views} views, {len(warm.problems)} problems; server RSS {rss['after warm-up']:.0f} MiB")
        start = time.monotonic()
        group = [Session(k, url) for k in range(sessions)]
        tasks = [asyncio.create_task(s.loop(browser, start + 60 * minutes)) for s in group]
        await asyncio.sleep(30 * minutes)
        rss["half-way"] = rss_mib(server)
        log(f"half-way: {sum(s.views for s in group)} views; server RSS {rss['half-way']:.0f} MiB")
        await asyncio.gather(*tasks)
        seconds = time.monotonic() - start
        await browser.close()
    await asyncio.sleep(10)  # the server drops closed sessions
    rss["end, sessions closed"] = rss_mib(server)
    problems = warm.problems + [p for s in group for p in s.problems]
    return {"sessions": sessions, "minutes": round(seconds / 60, 2), "page_views": sum(s.views for s in group),
            "errors": len(problems), "problems": problems[:20],
            "server_rss_mib": {k: round(v, 1) for k, v in rss.items()}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sessions", type=int, default=8)
    parser.add_argument("--minutes", type=float, default=3.0)
    parser.add_argument("--run", type=Path, default=None, help="a finished run (default: the app tests' small run)")
    parser.add_argument("--json", type=Path, default=None, help="write the figures here")
    args = parser.parse_args(argv)
    run = (args.run or finished_run(Context())).resolve()
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    with tempfile.TemporaryDirectory(prefix="osrm-soak-") as tmp, open(Path(tmp) / "server.log", "w") as server_log:
        server, url = start_server(run, Path(tmp) / "runs", server_log)
        try:
            result = asyncio.run(drive(url, server, args.sessions, args.minutes, log))
        finally:
            server.terminate()
            server.wait(timeout=30)
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n", encoding="utf-8")
    return 0 if result["errors"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
