"""Soak: the app under load, on this machine only (no network, no server port).

``--sessions`` Streamlit sessions (``streamlit.testing.v1.AppTest``, each in its own thread, all
in this process, so they share the app's caches as the sessions of one server do) open a
finished run, half of them by its path and half by uploading it zipped, then switch between
the home page and the pages at random until ``--minutes`` have passed; every tenth step a
session opens the run again (the uploaders upload it again). Counted: page views, exceptions
and error boxes (a finished, whole run shows none). Measured: this process's resident memory
(RSS) after a warm-up that opened every page once (models and caches loaded), half-way, and at
the end after the sessions were dropped; the caches are bounded (``max_entries``), so the end
must not grow beyond what one more round of cache entries holds.

    nice -n 10 python -m bench.soak --sessions 8 --minutes 3 --json bench/results/soak.json

The run is ``--run PATH``, or the one of ``bench/bench_app.py`` (``OSRM_BENCH_RUN``, else the
app tests' small run, built once in the temporary folder).
"""

from __future__ import annotations

import argparse
import gc
import io
import json
import random
import sys
import threading
import time
import warnings
import zipfile
from pathlib import Path

import psutil

from bench._common import ROOT, Context
from bench.bench_app import PAGES as APP_PAGES
from bench.bench_app import finished_run

PAGES = [*APP_PAGES, "pages/7_Study.py"]


def zipped(run: Path) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for p in sorted(run.rglob("*")):
            if p.is_file():
                zf.write(p, p.relative_to(run.parent).as_posix())
    return buf.getvalue()


def rss_mib() -> float:
    gc.collect()
    return psutil.Process().memory_info().rss / 2**20


class Session:
    """One browser session: an AppTest that opens the run and wanders over the pages."""

    def __init__(self, k: int, run: Path, data: bytes) -> None:
        from streamlit.testing.v1 import AppTest

        self.k, self.run, self.data = k, run, data
        self.rng = random.Random(k)
        self.at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=300)
        self.views, self.problems = 0, []

    def check(self, page: str) -> None:
        self.views += 1
        for e in self.at.exception:
            self.problems.append(f"session {self.k} {page}: exception {e.value}")
        for e in self.at.error:
            self.problems.append(f"session {self.k} {page}: error {e.value}")

    def open_run(self) -> None:
        self.at.switch_page("app.py")
        if self.k % 2:
            self.at.run()
            self.at.file_uploader(key="home_run_zip").upload(f"run{self.views}.zip", self.data, "application/zip")
        else:
            self.at.session_state["run_path"] = str(self.run)
        self.at.run()
        self.check("open")

    def step(self) -> None:
        if self.views % 10 == 0:
            self.open_run()
            return
        page = self.rng.choice(PAGES)
        self.at.switch_page(page).run()
        self.check(page)

    def loop(self, until: float) -> None:
        try:
            while time.monotonic() < until:
                self.step()
        except Exception as err:  # a failure of the harness or the app: counted, never hidden
            self.problems.append(f"session {self.k}: {type(err).__name__}: {err}")


def soak(run: Path, sessions: int, minutes: float, log=print) -> dict:
    data = zipped(run)
    warm = Session(-1, run, data)
    warm.open_run()
    for page in PAGES:
        warm.at.switch_page(page).run()
        warm.check(page)
    rss = {"after warm-up": rss_mib()}
    log(f"warm-up done ({len(warm.problems)} problems); RSS {rss['after warm-up']:.0f} MiB")
    start = time.monotonic()
    until = start + 60 * minutes
    group = [Session(k, run, data) for k in range(sessions)]
    threads = [threading.Thread(target=s.loop, args=(until,), name=f"session-{s.k}") for s in group]
    for t in threads:
        t.start()
    time.sleep(30 * minutes)
    rss["half-way"] = rss_mib()
    log(f"half-way: {sum(s.views for s in group)} page views; RSS {rss['half-way']:.0f} MiB")
    for t in threads:
        t.join()
    seconds = time.monotonic() - start
    problems = warm.problems + [p for s in group for p in s.problems]
    views = sum(s.views for s in group)
    del group, threads, warm
    rss["end, sessions dropped"] = rss_mib()
    return {"sessions": sessions, "minutes": round(seconds / 60, 2), "page_views": views,
            "errors": len(problems), "problems": problems[:20], "rss_mib": {k: round(v, 1) for k, v in rss.items()}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sessions", type=int, default=8)
    parser.add_argument("--minutes", type=float, default=3.0)
    parser.add_argument("--run", type=Path, default=None, help="a finished run (default: the app tests' small run)")
    parser.add_argument("--json", type=Path, default=None, help="write the figures here")
    args = parser.parse_args(argv)
    warnings.simplefilter("ignore")
    run = (args.run or finished_run(Context())).resolve()
    result = soak(run, args.sessions, args.minutes, log=lambda m: print(m, file=sys.stderr, flush=True))
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n", encoding="utf-8")
    return 0 if result["errors"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
