"""Downloads that cannot attack: CSV cells that a spreadsheet would run are neutralized, user text
in figures shows as text, file names are safe, and every download of the app goes through one
helper."""

from __future__ import annotations

import csv
import io
import json
import re
import shutil
from pathlib import Path

import pandas as pd
from fixtures_run import small_run_fixture  # noqa: F401
from streamlit.testing.v1 import AppTest

from osrm_core.downloads import escaped_figure, safe_csv, safe_file_name
from osrm_core.runcheck import file_hash
from osrm_core.viz import figure_html, interference_heatmap, summary_figure

ROOT = Path(__file__).resolve().parents[1]
HOSTILE = ["=HYPERLINK(\"http://x\",\"y\")", "+1+2", "-2+3", "@SUM(A1)", "\tx", "\rx"]
SCRIPT = "<script>alert(1)</script>"


def test_csv_cells_that_start_a_formula_are_neutralized():
    df = pd.DataFrame({"task": [*HOSTILE, "plain", "a=b"], "score": [-0.5, 0.25, -1, 2, 3, 4, 5, 6],
                       "=cmd": ["x"] * 8})
    data = safe_csv(df)
    rows = list(csv.reader(io.StringIO(data.decode("utf-8"), newline="")))
    assert rows[0] == ["task", "score", "'=cmd"]
    assert [r[0] for r in rows[1:]] == [f"'{t}" for t in HOSTILE] + ["plain", "a=b"]
    assert [r[1] for r in rows[1:]] == ["-0.5", "0.25", "-1.0", "2.0", "3.0", "4.0", "5.0", "6.0"]  # numbers stay numbers
    for line in data.split(b"\r\n")[1:7]:  # on the bytes: every hostile cell opens with the quote
        assert line.startswith((b"'", b"\"'")), line
    assert pd.read_csv(io.BytesIO(data))["score"].tolist() == df["score"].tolist()


def test_a_task_named_script_shows_as_text_in_figure_downloads():
    matrix = pd.DataFrame([[1.0, 0.1], [0.2, 1.0]], index=[SCRIPT, "b"], columns=[SCRIPT, "b"])
    best = pd.DataFrame({"init": ["standard"], "method": ["<a href='javascript:alert(1)'>ta</a>"], "lambda": [0.5],
                         "avg_score": [0.8], "density": [None],
                         "normalized_avg": [0.9]})
    for fig in (interference_heatmap(matrix, title=f"interference of {SCRIPT}"), summary_figure(best, title="x")):
        page = figure_html(escaped_figure(fig))
        assert "alert(1)" in page  # the text is there ...
        assert "<script>alert" not in page and "\\u003cscript\\u003ealert" not in page  # ... never as markup
        assert "<a href='javascript" not in page and "\\u003ca href" not in page
    shown = escaped_figure(interference_heatmap(matrix, title=f"interference of {SCRIPT}")).to_dict()
    assert shown["layout"]["title"]["text"] == "interference of &lt;script&gt;alert(1)&lt;/script&gt;"
    assert list(shown["data"][0]["x"])[0] == "&lt;script&gt;alert(1)&lt;/script&gt;"
    assert shown["data"][0]["hovertemplate"].count("<br>") == 2  # our own markup is kept
    assert shown["data"][0]["hovertemplate"].endswith("<extra></extra>")


def test_download_file_names_are_safe():
    assert safe_file_name("../../etc/passwd", "csv") == "etc_passwd.csv"
    assert safe_file_name("sweep <script> \x00 é", "html") == "sweep_script.html"
    assert safe_file_name("///", "zip") == "download.zip"
    assert len(safe_file_name("a" * 500, "csv")) == 104


def test_every_download_of_the_app_goes_through_one_helper():
    files = [ROOT / "app.py", *(ROOT / "app_helpers").glob("*.py"), *(ROOT / "pages").glob("*.py")]
    sources = {p.relative_to(ROOT).as_posix(): p.read_text() for p in files}
    calls = {name: len(re.findall(r"download_button\(", text)) for name, text in sources.items()}
    assert calls.pop("app_helpers/widgets.py") == 1  # inside download()
    assert not any(calls.values()), calls
    helper = sources["app_helpers/widgets.py"].split("def download(", 1)[1].split("\ndef ", 1)[0]
    assert "safe_file_name(name, kind)" in helper


def test_the_interference_page_shows_a_hostile_task_name_as_text(small_run, tmp_path, monkeypatch):
    monkeypatch.delenv("OSRM_RUN_DIR", raising=False)
    run = tmp_path / "run"
    shutil.copytree(small_run, run)
    table = run / "results" / "interference.csv"
    table.write_text(table.read_text().replace(",question,", f",{SCRIPT},"))
    manifest = json.loads((run / "manifest.json").read_text())
    manifest["stages"]["diagnostics"]["files"]["results/interference.csv"] = file_hash(table)
    (run / "manifest.json").write_text(json.dumps(manifest))
    at = AppTest.from_file(str(ROOT / "pages" / "2_Interference.py"), default_timeout=60)
    at.session_state["run_path"] = str(run)
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    fig = json.loads(next(el.proto.spec for el in at.get("plotly_chart")))
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in fig["data"][0]["x"]
    assert "<script>" not in json.dumps(fig, ensure_ascii=False)
