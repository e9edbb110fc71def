"""The whole app once in a real browser: ``streamlit run app.py`` with the small run opened
through ``OSRM_RUN_DIR``, every page loaded in headless Chromium (playwright), charts rendered,
no exception boxes; screenshots go to ``test-artifacts/``."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from fixtures_run import small_run_fixture  # noqa: F401  (the small_run fixture)

pytestmark = [pytest.mark.slow, pytest.mark.browser]

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
]
#: (url path, screenshot name, a selector that shows the page has drawn its content)
PAGES = [
    ("", "home", ".js-plotly-plot"),
    ("Eigenspectra", "1_eigenspectra", ".js-plotly-plot"),
    ("Interference", "2_interference", ".js-plotly-plot"),
    ("Subspace_angles", "3_subspace_angles", ".js-plotly-plot"),
    ("Lambda_sweep", "4_lambda_sweep", ".js-plotly-plot"),
    ("Adapter_diagnosis", "5_adapter_diagnosis", "text=Upload two or more LoRA adapters"),
    ("Learn", "6_learn", ".js-plotly-plot"),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(small_run, tmp_path_factory):
    if not Path(CHROMIUM).exists():
        pytest.skip(f"browser test needs Chromium at {CHROMIUM} (Debian package 'chromium')")
    pytest.importorskip("playwright.sync_api", reason="browser test needs the playwright package")
    ARTIFACTS.mkdir(exist_ok=True)
    port = _free_port()
    env = {
        **os.environ,
        "OSRM_RUN_DIR": str(small_run),
        "OSRM_RUNS_ROOT": str(tmp_path_factory.mktemp("runs")),
        # One BLAS/OpenMP thread: on a busy two-core machine threaded eigh/SVD can stall for seconds.
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "OPENBLAS_NUM_THREADS": "1",
    }
    log = open(ARTIFACTS / "streamlit.log", "w")  # noqa: SIM115  (closed below)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "streamlit",
            "run",
            "app.py",
            "--server.headless",
            "true",
            "--server.port",
            str(port),
            "--server.address",
            "127.0.0.1",
            "--browser.gatherUsageStats",
            "false",
        ],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 60
        while True:
            try:
                with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as r:
                    if r.read().strip() == b"ok":
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.time() > deadline:
                pytest.fail(f"streamlit did not start; see {ARTIFACTS / 'streamlit.log'}")
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


@pytest.fixture(scope="module")
def browser(server):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


IDLE = """() => !document.querySelector('[data-testid="stStatusWidget"]')
    && !document.querySelector('[data-stale="true"]')
    && !document.querySelector('[data-testid="stSkeleton"]')"""


#: A heatmap's cell texts (plotly.js draws each as SVG text, in a g.heatmap-label or with that class).
HEATMAP_LABELS = ".heatmap-label text, text.heatmap-label"


def _wait_until_idle(page, timeout_ms: int = 90_000) -> None:
    """Until the script has finished: no 'running' indicator, no stale or placeholder element."""
    page.wait_for_function(IDLE, timeout=timeout_ms)
    page.wait_for_timeout(300)
    page.wait_for_function(IDLE, timeout=timeout_ms)


def _settled_without_exception(page, screenshot: str) -> None:
    """Wait until the script is idle, check no exception is shown, keep a screenshot."""
    _wait_until_idle(page)
    assert page.locator('[data-testid="stException"]').count() == 0
    page.screenshot(path=str(ARTIFACTS / f"{screenshot}.png"), full_page=True)


@pytest.mark.parametrize(("path", "name", "ready"), PAGES, ids=[p[1] for p in PAGES])
def test_page_renders_in_chromium(server, browser, path, name, ready):
    page = browser.new_page(viewport={"width": 1400, "height": 2400})
    messages: list[str] = []
    page.on("pageerror", lambda err: messages.append(str(err)))
    try:
        page.goto(f"{server}/{path}", wait_until="domcontentloaded")
        page.wait_for_selector('[data-testid="stApp"]', timeout=60_000)
        page.wait_for_selector(ready, timeout=120_000)
        _wait_until_idle(page)
        if ready == ".js-plotly-plot":
            # plotly has drawn: its SVG holds the traces
            page.wait_for_selector(".js-plotly-plot .main-svg", timeout=30_000)
        page.wait_for_timeout(500)
        page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)
        exceptions = page.locator('[data-testid="stException"]')
        assert exceptions.count() == 0, exceptions.first.inner_text()
        assert (
            page.locator('[data-testid="stAlertContentInfo"]', has_text="Open or create a run").count() == 0
        )
        assert not messages, messages
    finally:
        page.close()


def test_layer_select_redraws_the_interference_heatmap(server, browser):
    """A widget change in the browser reruns the page and redraws the chart."""
    page = browser.new_page(viewport={"width": 1400, "height": 2400})
    try:
        page.goto(f"{server}/Interference", wait_until="domcontentloaded")
        page.wait_for_selector(".js-plotly-plot .main-svg", timeout=120_000)
        _wait_until_idle(page)
        title = page.locator(".js-plotly-plot .gtitle").first
        assert "summed over layers" in title.text_content()
        page.locator('[data-testid="stSelectbox"]', has_text="Layer").first.click()
        page.get_by_role("option", name="L2.value", exact=False).first.click()
        page.wait_for_function(
            "() => [...document.querySelectorAll('.js-plotly-plot .gtitle')].some(t => t.textContent.includes('L2.value'))",
            timeout=60_000,
        )
        _settled_without_exception(page, "2_interference_layer")
    finally:
        page.close()


def test_merge_advice_in_chromium(server, browser, small_run, tmp_path):
    """Upload two adapters and labelled sample texts, get the advice with a progress bar, build
    and download the recommended merged adapter."""
    import zipfile

    import pandas as pd

    from app_helpers import zip_directory
    from osrm_core.demo import demo_task

    zips, csvs = [], {}
    for task in ("sentiment", "topic"):
        z = tmp_path / f"{task}.zip"
        z.write_bytes(zip_directory(small_run / "adapters" / "standard" / task))
        zips.append(str(z))
        t = demo_task(task, n_train=24, n_test=10)
        csvs[task] = tmp_path / f"{task}.csv"
        pd.DataFrame({"text": t.train.text, "label": t.train.label}).to_csv(csvs[task], index=False)
    page = browser.new_page(viewport={"width": 1400, "height": 2400}, accept_downloads=True)
    try:
        page.goto(f"{server}/Adapter_diagnosis", wait_until="domcontentloaded")
        page.wait_for_selector("text=Upload two or more LoRA adapters", timeout=120_000)
        inputs = page.locator('[data-testid="stFileUploaderDropzoneInput"]')
        inputs.first.set_input_files(zips)
        page.wait_for_selector("text=Sample texts per task", timeout=120_000)
        _wait_until_idle(page)
        for k, task in enumerate(("sentiment", "topic"), start=1):
            page.get_by_role("tab", name=task).click()
            inputs.nth(k).set_input_files(str(csvs[task]))
            _wait_until_idle(page, 180_000)
        page.wait_for_selector(".js-plotly-plot .main-svg", timeout=120_000)
        page.screenshot(path=str(ARTIFACTS / "advice_1_uploaded.png"), full_page=True)

        # The data-free overlap heatmap: its diagonal (an adapter against itself) is blank, not "nan".
        plot = page.locator(".js-plotly-plot").filter(
            has=page.locator(".gtitle", has_text="Singular-vector overlap")).first
        plot.scroll_into_view_if_needed()
        plot.locator(HEATMAP_LABELS).first.wait_for(state="attached", timeout=30_000)
        cells = plot.locator(HEATMAP_LABELS).all_text_contents()
        assert len(cells) == 2 and "nan" not in [c.strip().lower() for c in cells], cells  # 2 adapters: 2 cells

        page.get_by_role("button", name="Get merge advice").click()
        page.wait_for_selector('[data-testid="stProgress"]', state="attached", timeout=60_000)
        page.wait_for_selector("text=Recommended:", timeout=300_000)
        _wait_until_idle(page, 180_000)
        assert page.locator("text=Advice ready:").count() >= 1
        page.screenshot(path=str(ARTIFACTS / "advice_2_recommended.png"), full_page=True)
        # The merge form holds the sentence's lambda and weights.
        sentence = page.locator('[data-testid="stAlertContentSuccess"]', has_text="Recommended:").first.inner_text()
        what = sentence.split("Recommended:", 1)[1].split(":", 1)[0]
        lam = float(page.locator("input[aria-label='λ']").input_value())
        weights = [float(w) for w in page.locator("input[aria-label^='Weights (']").input_value().split(",")]
        if ", lambda " in what:
            assert lam == pytest.approx(float(what.rsplit(", lambda ", 1)[1])) and set(weights) == {1.0}, sentence
        else:
            expected = [float(w) for w in what.rsplit(", per-adapter weights ", 1)[1].split("/")]
            assert lam == 1.0 and weights == pytest.approx(expected, abs=0.051), sentence

        page.get_by_role("button", name="Build the merged adapter").click()
        button = page.get_by_role("button", name="Download merged adapter (zip)")
        button.wait_for(timeout=120_000)
        _wait_until_idle(page)
        with page.expect_download(timeout=60_000) as info:
            button.click()
        saved = ARTIFACTS / info.value.suggested_filename
        info.value.save_as(str(saved))
        names = zipfile.ZipFile(saved).namelist()
        assert any(n.endswith("heads/sentiment.safetensors") for n in names), names
        assert any(n.endswith("adapter_model.safetensors") for n in names), names
        page.screenshot(path=str(ARTIFACTS / "advice_3_built.png"), full_page=True)
        assert page.locator('[data-testid="stException"]').count() == 0
    finally:
        page.close()


def test_per_init_settings_in_chromium(server, browser):
    """The demo's recipe fills the per-init row of osrm_gen; a rank typed for standard reaches the
    run's config.yaml."""
    page = browser.new_page(viewport={"width": 1400, "height": 2400})
    try:
        page.goto(server, wait_until="domcontentloaded")
        page.wait_for_selector('[data-testid="stApp"]', timeout=60_000)
        _wait_until_idle(page)
        page.get_by_role("tab", name="New run").click()
        page.get_by_text("More settings").click()
        ranks = page.locator("input[aria-label='rank']")
        ranks.last.wait_for(timeout=30_000)
        assert ranks.evaluate_all("els => els.map(e => e.value)") == ["", "32"]  # standard, osrm_gen
        ranks.first.fill("16")
        ranks.first.press("Enter")
        page.wait_for_function(
            "() => [...document.querySelectorAll('code')].some(c => /standard:\\s*\\n\\s*rank: 16/.test(c.textContent))",
            timeout=60_000,
        )
        _settled_without_exception(page, "home_per_init")
    finally:
        page.close()


def test_csv_without_a_text_column_gets_an_error_in_chromium(server, browser, tmp_path):
    """A task file without a text column: the command line's error, not a silent first column."""
    csv = tmp_path / "notext.csv"
    csv.write_text("sentence,category\ngood,p\nbad,n\nfine,p\nawful,n\n")
    page = browser.new_page(viewport={"width": 1400, "height": 2400})
    try:
        page.goto(server, wait_until="domcontentloaded")
        page.wait_for_selector('[data-testid="stTabs"]', timeout=120_000)
        _wait_until_idle(page)
        page.get_by_role("tab", name="New run").click()
        uploader = page.locator('[data-testid="stFileUploader"]', has_text="Your own tasks")
        uploader.locator('[data-testid="stFileUploaderDropzoneInput"]').set_input_files(str(csv))
        error = page.locator('[data-testid="stAlertContentError"]', has_text="column 'text' for text not found")
        error.first.wait_for(state="attached", timeout=60_000)
        _wait_until_idle(page)
        page.get_by_role("tab", name="New run").click()  # the rerun may show the first tab again
        error.first.wait_for(timeout=30_000)
        assert "notext.csv: column 'text' for text not found; columns are ['sentence', 'category']" in \
            error.first.text_content()
        assert page.get_by_role("button", name="Run the pipeline").is_disabled()
        _settled_without_exception(page, "home_csv_without_text")
    finally:
        page.close()


def _set_number(page, label: str, value) -> None:
    box = page.locator(f"input[aria-label='{label}']").first
    box.fill(str(value))
    box.press("Enter")
    _wait_until_idle(page)


def test_a_run_from_the_home_page_is_named_in_the_sidebar(server, browser):
    """A tiny pipeline run from the New run tab: when it finishes, the sidebar names the run (it
    said "none" beside "Finished and opened ..." before)."""
    page = browser.new_page(viewport={"width": 1400, "height": 2400})
    try:
        page.goto(server, wait_until="domcontentloaded")
        page.wait_for_selector('[data-testid="stTabs"]', timeout=120_000)
        _wait_until_idle(page)
        sidebar = page.locator('[data-testid="stSidebar"]')
        sidebar.get_by_role("button", name="Close this run").click()
        _wait_until_idle(page)
        sidebar.locator("code").first.wait_for(state="detached", timeout=60_000)  # the rerun may lag on a busy machine
        assert sidebar.locator("code").count() == 0
        page.get_by_role("tab", name="New run").click()
        page.get_by_text("More settings").click()
        for label, value in (("LoRA rank r", 2), ("Samples per task for the statistics", 8), ("Training steps", 2),
                             ("Batch size", 4), ("Max tokens per example", 16),
                             ("Test examples per task (0: all)", 10)):
            _set_number(page, label, value)
        for label, value in (("Lambda grid", "1"), ("Run name", "browser-run")):
            box = page.locator(f"input[aria-label='{label}']").first
            box.fill(value)
            box.press("Enter")
            _wait_until_idle(page)
        page.get_by_role("button", name="Run the pipeline").click()
        page.wait_for_selector("text=Finished and opened", timeout=480_000)
        _wait_until_idle(page)
        assert "browser-run" in sidebar.locator("code").first.inner_text()
        assert sidebar.get_by_text("none", exact=True).count() == 0
        _settled_without_exception(page, "home_run_finished")
    finally:
        page.close()
