"""The Streamlit app through ``streamlit.testing.v1.AppTest``: home and every page on an empty
session and with a small finished run open, widgets driving the figures, uploads (good and
bad) and a pipeline run from the home page."""

from __future__ import annotations

import base64
import io
import json
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from _helpers import zip_bytes
from fixtures_run import SMALL_TASKS, small_run_fixture  # noqa: F401  (the small_run fixture)
from streamlit.testing.v1 import AppTest

from app_helpers import RUN_INFO, zip_directory
from osrm_core.demo import demo_task
from osrm_core.settings import demo_config, merge_ready_config

ROOT = Path(__file__).resolve().parents[1]
APP = str(ROOT / "app.py")
RUN_PAGES = [
    "pages/1_Eigenspectra.py",
    "pages/2_Interference.py",
    "pages/3_Subspace_angles.py",
    "pages/4_Lambda_sweep.py",
]
ALL_PAGES = [*RUN_PAGES, "pages/5_Adapter_diagnosis.py", "pages/6_Learn.py"]
#: Adapted layers of the packaged MiniLM (select boxes show short labels, take full names).
LAYER = "bert.encoder.layer.{}.attention.self.{}"


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch, tmp_path):
    """No run opened from the environment, and an empty runs folder of the test's own."""
    monkeypatch.delenv("OSRM_RUN_DIR", raising=False)
    monkeypatch.setenv("OSRM_RUNS_ROOT", str(tmp_path / "runs"))


def make_app(run: Path | None = None, timeout: float = 60) -> AppTest:
    at = AppTest.from_file(APP, default_timeout=timeout)
    if run is not None:
        at.session_state["run_path"] = str(run)
    return at


def figures(at: AppTest) -> dict[str, dict]:
    """Every plotly figure on the page, by widget key (the end of the element id)."""
    return {el.proto.id.split("-", 2)[-1]: json.loads(el.proto.spec) for el in at.get("plotly_chart")}


def figure(at: AppTest, key: str) -> dict:
    figs = figures(at)
    assert key in figs, f"no figure {key!r}; figures: {list(figs)}"
    return figs[key]


def arr(value) -> np.ndarray:
    """A plotly JSON array: a list, or a typed array ``{"dtype", "bdata"[, "shape"]}``."""
    if isinstance(value, dict) and "bdata" in value:
        out = np.frombuffer(base64.b64decode(value["bdata"]), dtype=np.dtype(value["dtype"]))
        shape = value.get("shape")
        if shape:
            out = out.reshape([int(x) for x in str(shape).split(",")] if isinstance(shape, str) else shape)
        return out
    return np.asarray(value)


def trace_data(fig: dict) -> list:
    return [(t.get("name"), t.get("x"), t.get("y"), t.get("z")) for t in fig["data"]]


def errors(at: AppTest) -> list[str]:
    return [str(e.value) for e in at.error]


def assert_clean(at: AppTest) -> None:
    assert not at.exception, [e.value for e in at.exception]


def adapter_zip(run: Path, init: str, task: str) -> bytes:
    return zip_directory(run / "adapters" / init / task)


# --------------------------------------------------------------------------- empty session


def test_home_without_run_shows_tabs_and_no_summary():
    at = make_app().run()
    assert_clean(at)
    assert [t.label for t in at.tabs] == ["Summary of the open run", "Open a run", "New run"]
    assert any("No run is open" in i.value for i in at.info)
    # The quick preset is the starting point of the settings, and the config built from the
    # widgets is that preset (settings without a widget included).
    quick = demo_config(quick=True)
    assert at.number_input(key="home_rank").value == quick.rank
    assert at.text_input(key="home_lambdas").value == ", ".join(f"{x:g}" for x in quick.merge.lambdas)
    shown = yaml.safe_load(at.code[0].value)
    assert shown == {**quick.model_dump(mode="json"), "name": shown["name"]}


@pytest.mark.parametrize("page", RUN_PAGES)
def test_run_pages_without_run_ask_for_one(page):
    at = make_app().run()
    at.switch_page(page).run()
    assert_clean(at)
    assert [i.value for i in at.info] == [RUN_INFO]
    assert not at.get("plotly_chart")


def test_diagnosis_page_without_uploads_asks_for_adapters():
    at = make_app().run()
    at.switch_page("pages/5_Adapter_diagnosis.py").run()
    assert_clean(at)
    assert any("Upload two or more" in i.value for i in at.info)


def test_learn_page_needs_no_run_and_sliders_drive_the_toy():
    at = make_app().run()
    at.switch_page("pages/6_Learn.py").run()
    assert_clean(at)
    before = figure(at, "learn_toy_chart")
    metrics = [m.value for m in at.metric]
    assert len(metrics) == 2 and float(metrics[1]) < float(metrics[0])  # OSRM reads less of the other task
    at.slider(key="learn_angle").set_value(20).run()
    assert_clean(at)
    assert trace_data(figure(at, "learn_toy_chart")) != trace_data(before)
    at.radio(key="learn_dim").set_value(3).run()
    assert_clean(at)
    assert any(t["type"] == "scatter3d" for t in figure(at, "learn_toy_chart")["data"])
    assert at.latex
    from osrm_core.merge import MERGE_METHODS

    methods = next(df.value for df in at.dataframe if "summary" in df.value.columns)
    assert list(methods["name"]) == list(MERGE_METHODS) and methods["summary"].str.len().min() > 20


def test_learn_page_runs_the_comparison_on_the_real_model():
    at = make_app(timeout=180).run()
    at.switch_page("pages/6_Learn.py").run()
    at.select_slider(key="learn_real_rank").set_value(4)
    at.button(key="learn_real_button").click().run()
    assert_clean(at)
    fig = figure(at, "learn_real_chart")
    assert fig["layout"]["yaxis"]["type"] == "log"
    assert len([t for t in fig["data"] if t.get("mode") == "lines+markers"]) == 4  # one per demo task
    table = at.session_state["learn_real"]["table"]
    assert set(table["task"]) == {"sentiment", "topic", "question", "paraphrase"}
    assert (table["ratio"] < 1).all()  # OSRM's A sees less of the other tasks than a random A


# --------------------------------------------------------------------------- opening runs


def test_home_opens_a_run_with_the_path_widget(small_run):
    at = make_app().run()
    at.text_input(key="home_open_path").set_value(str(small_run))
    at.button(key="home_open_button").click().run()
    assert_clean(at)
    assert at.session_state["run_path"] == str(small_run.resolve())
    assert not errors(at)
    labels = [d.label for d in at.download_button]
    assert "Download table (CSV)" in labels and "Download figure (HTML)" in labels
    assert "Download this run (zip)" in labels
    best = figure(at, "home_best_fig_chart")
    assert {t["name"] for t in best["data"] if t["type"] == "bar"} == {"standard", "osrm"}
    frames = [el.value for el in at.dataframe]
    single = frames[0]
    assert set(single["task"]) == set(SMALL_TASKS) and {"standard", "osrm"} <= set(single.columns)
    diff = next(f for f in frames if "osrm - standard (plain)" in f.columns)
    best_table = frames[1].set_index(["init", "method"])
    for _, row in diff.iterrows():  # the differences of the best-point table, plain and normalized
        for value, label in (("avg_score", "plain"), ("normalized_avg", "normalized")):
            expected = best_table.loc[("osrm", row["method"]), value] - best_table.loc[("standard", row["method"]), value]
            assert row[f"osrm - standard ({label})"] == pytest.approx(expected)


def test_home_open_path_errors(tmp_path):
    at = make_app().run()
    at.text_input(key="home_open_path").set_value(str(tmp_path))
    at.button(key="home_open_button").click().run()
    assert_clean(at)
    assert any("not a run directory" in e for e in errors(at))
    assert at.session_state["run_path"] is None


def test_home_lists_runs_under_the_runs_root(small_run, monkeypatch):
    monkeypatch.setenv("OSRM_RUNS_ROOT", str(small_run.parent))
    at = make_app().run()
    choice = at.selectbox(key="home_run_choice")
    assert small_run.name in choice.options  # shown by folder name
    choice.set_value(str(small_run))
    at.button(key="home_open_choice").click().run()
    assert_clean(at)
    assert at.session_state["run_path"] == str(small_run.resolve())


def test_home_opens_a_zipped_run_in_the_session_folder(small_run):
    at = make_app().run()
    at.file_uploader(key="home_run_zip").upload("small.zip", zip_directory(small_run), "application/zip")
    at.run()
    assert_clean(at)
    assert not errors(at)
    opened = Path(at.session_state["run_path"])
    assert opened.name == small_run.name and opened != small_run.resolve()
    assert Path(at.session_state["_osrm_tmp"].name) in opened.parents
    assert (opened / "results" / "summary.json").is_file()
    at.switch_page("pages/4_Lambda_sweep.py").run()
    assert_clean(at)
    assert figure(at, "sw_fig_chart")


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"this is not a zip", "not a valid zip"),
        (zip_bytes({"../evil/config.yaml": b"x"}), "'..'"),
        (zip_bytes({"/abs/config.yaml": b"x"}), "absolute path"),
        (zip_bytes({"notes.txt": b"x"}), "no config.yaml"),
    ],
)
def test_home_refuses_bad_zips(content, message):
    at = make_app().run()
    at.file_uploader(key="home_run_zip").upload("run.zip", content, "application/zip")
    at.run()
    assert_clean(at)
    assert any(message in e for e in errors(at)), errors(at)
    assert at.session_state["run_path"] is None


# --------------------------------------------------------------------------- pages with a run


@pytest.mark.parametrize("page", ALL_PAGES)
def test_every_page_runs_with_the_run_open(small_run, page):
    at = make_app(small_run).run()
    assert_clean(at)
    at.switch_page(page).run()
    assert_clean(at)
    assert RUN_INFO not in [i.value for i in at.info]
    if page in RUN_PAGES or page.endswith("Learn.py"):
        assert at.get("plotly_chart"), "no chart"
        html = [d for d in at.download_button if d.label == "Download figure (HTML)"]
        assert len(html) == len(at.get("plotly_chart"))


def test_eigenspectra_widgets_drive_the_figures(small_run):
    at = make_app(small_run).run()
    at.switch_page("pages/1_Eigenspectra.py").run()
    fig = figure(at, "eig_spec_chart")
    assert fig["layout"]["yaxis"]["type"] == "log"
    lines = [t for t in fig["data"] if t.get("mode") == "lines"]
    assert {t["name"] for t in lines} == set(SMALL_TASKS)
    marked = [t for t in fig["data"] if t.get("mode") == "markers"]
    assert marked and all(len(arr(t["x"])) == 4 for t in marked)  # r = the run's rank
    heat = figure(at, "eig_eff_chart")
    assert arr(heat["data"][0]["z"]).shape == (6, 3)  # 6 inputs x 3 tasks
    # The axis ends at the features' width (384), not beyond; the band's note and the warning
    # say when the r smallest eigenvalues are at numerical zero (the small run has few tokens).
    width = max(len(arr(t["x"])) for t in lines)
    assert width == 384 and fig["layout"]["xaxis"]["range"] == [0.5, width + 0.5]
    from osrm_core.viz import zero_smallest

    spectra = {t["name"]: arr(t["customdata"]) for t in lines}
    zero = zero_smallest(spectra, 4)
    band = fig["layout"]["annotations"][0]["text"]
    assert band == "4 smallest (OSRM)" + (": numerically zero" if zero else "")
    assert any(w.value.startswith("At numerical zero") for w in at.warning) == bool(zero)

    layer = at.selectbox(key="eig_layer")
    layer.set_value(layer.options[3]).run()
    assert_clean(at)
    assert trace_data(figure(at, "eig_spec_chart")) != trace_data(fig)

    at.slider(key="eig_rank").set_value(10).run()
    assert all(
        len(arr(t["x"])) == 10 for t in figure(at, "eig_spec_chart")["data"] if t.get("mode") == "markers"
    )

    at.selectbox(key="eig_osrm_for").set_value("topic").run()
    assert_clean(at)
    names = {t["name"] for t in figure(at, "eig_spec_chart")["data"]}
    assert "others of topic" in names

    at.multiselect(key="eig_tasks").set_value(["sentiment"]).run()
    at.selectbox(key="eig_osrm_for").set_value("(none)").run()
    assert {t["name"] for t in figure(at, "eig_spec_chart")["data"] if t.get("mode") == "lines"} == {
        "sentiment"
    }


def test_interference_layer_select_changes_the_heatmaps(small_run):
    at = make_app(small_run).run()
    at.switch_page("pages/2_Interference.py").run()
    assert_clean(at)
    std, osrm = figure(at, "int_heat_standard_chart"), figure(at, "int_heat_osrm_chart")
    z_std = std["data"][0]["customdata"]
    assert arr(z_std).shape == (len(SMALL_TASKS), len(SMALL_TASKS))
    assert any(m.label.startswith("Off-diagonal") for m in at.metric)

    at.selectbox(key="int_layer").set_value(LAYER.format(0, "query")).run()
    assert_clean(at)
    assert figure(at, "int_heat_standard_chart")["data"][0]["customdata"] != z_std
    assert figure(at, "int_heat_osrm_chart")["data"][0]["customdata"] != osrm["data"][0]["customdata"]

    at.selectbox(key="int_value").set_value("relative_shift").run()
    assert_clean(at)
    assert "relative shift" in figure(at, "int_heat_standard_chart")["layout"]["title"]["text"]
    own = figure(at, "int_own_chart")
    assert own["layout"]["yaxis"]["type"] == "log"
    assert len([t for t in own["data"]]) == 2 * len(SMALL_TASKS)
    # Interference during fine-tuning: per adapter, its energy on every task's inputs.
    drift = figure(at, "int_drift_chart")
    lines = [t for t in drift["data"] if t.get("showlegend") is False]
    assert len(lines) == len(SMALL_TASKS) ** 2
    assert sum(t["line"]["dash"] == "solid" for t in lines) == len(SMALL_TASKS)
    legend = [t["name"] for t in drift["data"] if t.get("showlegend") is not False]
    assert legend == [f"data of {t}" for t in SMALL_TASKS] + ["the panel's own task (solid)", "other tasks (dotted)"]
    assert not any(c.value.startswith("Note: Different ranks") for c in at.caption)  # one rank in this run
    box = at.selectbox(key="int_drift_init")
    assert set(box.options) == {"standard", "osrm"}
    box.set_value(next(o for o in box.options if o != box.value)).run()
    assert_clean(at)
    assert figure(at, "int_drift_chart")["data"][0]["y"] != drift["data"][0]["y"]


def test_rank_caveat_when_inits_differ_in_rank():
    from app_helpers import rank_caveat

    config = demo_config(quick=True)  # standard at rank 8, osrm_gen at rank 32
    assert config.for_init("standard").rank != config.for_init("osrm_gen").rank
    note = rank_caveat(config, ["standard", "osrm_gen"])
    assert note.startswith("Different ranks (standard rank 8, osrm_gen rank 32)")
    assert rank_caveat(config, ["standard"]) is None


def test_angles_page_layer_and_statistic(small_run):
    at = make_app(small_run).run()
    at.switch_page("pages/3_Subspace_angles.py").run()
    assert_clean(at)
    before = figure(at, "ang_ad_heat_osrm_chart")["data"][0]["z"]
    at.selectbox(key="ang_layer").set_value(LAYER.format(1, "value")).run()
    assert_clean(at)
    after = figure(at, "ang_ad_heat_osrm_chart")["data"][0]["z"]
    assert after != before
    assert ((arr(after) >= 0) & (arr(after) <= 90)).all()
    at.radio(key="ang_stat").set_value("mean_angle").run()
    assert_clean(at)
    assert figure(at, "ang_dd_lines_chart")["layout"]["yaxis"]["title"]["text"].startswith("mean angle")


def test_sweep_page_task_density_and_best_point(small_run):
    at = make_app(small_run).run()
    at.switch_page("pages/4_Lambda_sweep.py").run()
    assert_clean(at)
    fig = figure(at, "sw_fig_chart")
    lines = [t for t in fig["data"] if not str(t["name"]).startswith("best")]
    best = [t for t in fig["data"] if str(t["name"]).startswith("best")]
    assert len(lines) == 4 and len(best) == 4  # 2 inits x 2 methods
    assert all(t["marker"]["symbol"] == "star" for t in best)
    # Every best point of the small run is at its grid's smallest lambda (0.5 of 0.5, 1): noted.
    notes = [c.value for c in at.caption if c.value.startswith("Note: ")]
    assert len(notes) == 4 and all("is the smallest of the grid (0.5 to 1)" in n for n in notes), notes
    at.selectbox(key="sw_task").set_value("topic").run()
    assert_clean(at)
    assert "topic" in figure(at, "sw_fig_chart")["layout"]["yaxis"]["title"]["text"]
    at.radio(key="sw_y").set_value("score").run()
    assert_clean(at)
    at.multiselect(key="sw_inits").set_value(["osrm"]).run()
    assert {t["name"] for t in figure(at, "sw_fig_chart")["data"]} == {
        "task_arithmetic (osrm)",
        "ties (osrm)",
        "best: task_arithmetic (osrm)",
        "best: ties (osrm)",
    }
    assert any("0.5 (the only one" in c.value for c in at.caption)  # one density: no slider


def test_sweep_page_density_selector_drives_ties_only(small_run, tmp_path):
    run = tmp_path / "two-densities"
    shutil.copytree(small_run, run)
    path = run / "results" / "sweep_osrm.csv"
    df = pd.read_csv(path)
    extra = df[df["method"] == "ties"].assign(density=0.8)
    extra["normalized"] = extra["normalized"] * 0.5
    pd.concat([df, extra]).to_csv(path, index=False)
    at = make_app(run).run()
    at.switch_page("pages/4_Lambda_sweep.py").run()
    assert_clean(at)
    before = {t["name"]: t for t in figure(at, "sw_fig_chart")["data"]}
    slider = at.select_slider(key="sw_density")
    assert slider.value == 0.5 and list(slider.options) == ["0.5", "0.8"]
    slider.set_value(0.8).run()
    assert_clean(at)
    after = {t["name"]: t for t in figure(at, "sw_fig_chart")["data"]}
    assert arr(after["ties (osrm)"]["y"]) == pytest.approx(arr(before["ties (osrm)"]["y"]) * 0.5)
    assert after["task_arithmetic (osrm)"] == before["task_arithmetic (osrm)"]


# --------------------------------------------------------------------------- adapter diagnosis


def _texts(task: str, n: int = 12) -> list[str]:
    return demo_task(task, n_train=max(n, 10), n_test=10).train.text[:n]


def _csv(task: str, with_label: bool = True) -> bytes:
    t = demo_task(task, n_train=16, n_test=10)
    df = pd.DataFrame({"text": t.train.text})
    if with_label:
        df["label"] = t.train.label
    return df.to_csv(index=False).encode()


def _diagnosis_with_two_adapters(small_run, init: str = "standard") -> AppTest:
    at = make_app(timeout=180).run()
    at.switch_page("pages/5_Adapter_diagnosis.py").run()
    up = at.file_uploader(key="diag_files")
    for task in ("sentiment", "topic"):
        up.upload(f"{task}.zip", adapter_zip(small_run, init, task), "application/zip")
    at.run()
    assert_clean(at)
    return at


def test_diagnosis_of_uploaded_adapters(small_run):
    at = _diagnosis_with_two_adapters(small_run)
    assert not errors(at)
    assert any("at least 2 sample texts" in i.value for i in at.info)
    for task in ("sentiment", "topic"):
        at.text_area(key=f"diag_texts_{task}").set_value("\n".join(_texts(task)))
    at.run()
    assert_clean(at)
    assert not errors(at)
    up_fig = figure(at, "diag_heat_uploaded_chart")
    assert figure(at, "diag_heat_posthoc_osrm_chart")["data"]
    assert arr(up_fig["data"][0]["customdata"]).shape == (2, 2)
    kept = at.session_state["diag_result"]["diagnosis"].posthoc
    assert len(kept) == 2 * 12 and ((kept["energy_kept"] > 0) & (kept["energy_kept"] <= 1 + 1e-9)).all()
    assert figure(at, "diag_kept_chart")["data"]
    # The data-free overlap: blank diagonal, named axes, the adapters in the page's order.
    overlap = figure(at, "diag_sv_overlap_chart")
    cells = [c for row in overlap["data"][0]["text"] for c in row]
    assert "nan" not in " ".join(cells).lower() and cells.count("") == 2
    assert overlap["layout"]["xaxis"]["title"]["text"] == "input directions of adapter i"
    assert list(overlap["data"][0]["x"]) == list(up_fig["data"][0]["x"]) == ["sentiment", "topic"]
    # The projection onto the OSRM subspaces cuts the cross-task input interference.
    table = at.session_state["diag_result"]["diagnosis"].interference
    cross = table[table["adapter"] != table["data"]].groupby("init")["input_energy"].sum()
    assert cross["posthoc_osrm"] < cross["uploaded"]
    # The layer select drives the heatmaps.
    at.selectbox(key="diag_layer").set_value(LAYER.format(2, "query")).run()
    assert figure(at, "diag_heat_uploaded_chart")["data"][0]["customdata"] != up_fig["data"][0]["customdata"]
    # Advice without labels is refused with a message.
    at.button(key="diag_advise_button").click().run()
    assert_clean(at)
    assert any("has no labels" in e for e in errors(at))
    # A merged adapter can be built and downloaded: a zip of a folder that plain peft loads
    # (tests/test_workflows.py checks its weights), each task's head under heads/.
    at.button(key="diag_merge_button").click().run()
    assert_clean(at)
    assert "Download merged adapter (zip)" in [d.label for d in at.download_button]
    with zipfile.ZipFile(io.BytesIO(at.session_state["diag_merged"]["zip"])) as zf:
        names = zf.namelist()
        config = json.loads(zf.read("merged_task_arithmetic_uploaded/adapter_config.json"))
    assert config["task_type"] is None and not config["modules_to_save"]
    assert {f"merged_task_arithmetic_uploaded/heads/{t}.safetensors" for t in ("sentiment", "topic")} <= set(names)


@pytest.mark.slow
def test_diagnosis_advice_with_labelled_csvs_fills_the_merge_form(small_run):
    at = _diagnosis_with_two_adapters(small_run, init="osrm")
    at.file_uploader(key="diag_csv_sentiment").upload("s.csv", _csv("sentiment"), "text/csv")
    at.file_uploader(key="diag_csv_topic").upload("t.csv", _csv("topic", with_label=False), "text/csv")
    at.run()
    assert_clean(at)
    assert at.selectbox(key="diag_label_col_topic").value == "(none)"
    at.button(key="diag_advise_button").click().run()
    assert any("'topic' has no labels" in e for e in errors(at))  # CSV without a label column

    at.file_uploader(key="diag_csv_topic").clear().upload("t.csv", _csv("topic"), "text/csv")
    at.multiselect(key="diag_methods").set_value(["task_arithmetic", "ties"])
    at.text_input(key="diag_lambdas").set_value("0.5, 1.0")
    at.number_input(key="diag_budget").set_value(2)
    at.run()
    at.selectbox(key="diag_label_col_topic").set_value("label").run()
    at.button(key="diag_advise_button").click().run()
    assert_clean(at)
    assert not errors(at)
    assert any(s.value.startswith("Recommended:") for s in at.success)
    advice = at.session_state["diag_advice"]["advice"]
    origins = advice.summary["origin"]  # finalists: the default (TA, lambda 1), TA's best lambda, TIES x 3
    assert (origins == "default").sum() == 1 and 3 <= (origins == "grid").sum() <= 4
    assert len(advice.search[advice.search["stage"] == "grid"]) == 2 * (1 + 3)  # 2 lambdas each
    score_fig = figure(at, "diag_adv_score_chart")
    assert score_fig["data"] and any(t.get("error_y") for t in score_fig["data"])
    assert figure(at, "diag_adv_norm_chart")["data"]
    # The chart labels its candidates and names the chosen one (and the best held-out one).
    assert score_fig["layout"]["xaxis"].get("showticklabels") is not False
    notes = [a["text"] for a in score_fig["layout"]["annotations"]]
    assert any(n.startswith("★ chosen") for n in notes), notes
    # The recommendation fills the merge form, with the sentence's lambda and weights.
    rec = advice.recommended
    assert at.selectbox(key="diag_merge_method").value == rec["method"]
    lam = at.number_input(key="diag_merge_lambda").value
    weights = [float(w) for w in at.text_input(key="diag_merge_weights").value.split(",")]
    what = advice.reason.split(":")[0]  # "ties (density 0.5), lambda 1.3" or "..., per-adapter weights 1.3/0.9"
    if ", lambda " in what:
        assert lam == pytest.approx(float(what.rsplit(", lambda ", 1)[1])) and set(weights) == {1.0}
    else:
        assert lam == 1.0 and weights == pytest.approx([float(w) for w in what.rsplit(", per-adapter weights ", 1)[1].split("/")],
                                                         abs=0.051)
    assert [lam * w for w in weights] == pytest.approx(rec["weights"])  # the same merge
    if rec["density"] is not None:
        assert at.number_input(key="diag_merge_density").value == pytest.approx(rec["density"])
    at.button(key="diag_merge_button").click().run()
    assert_clean(at)
    assert at.session_state["diag_merged"]["name"] == f"merged_{rec['method']}_uploaded"
    # TIES is full rank: the form warns of the rank and size it writes, and truncates on request.
    at.selectbox(key="diag_merge_method").set_value("ties").run()
    assert any(w.value.startswith("This merge writes rank 384 per layer, about") and "truncation rank" in w.value
               for w in at.warning), [w.value for w in at.warning]
    at.number_input(key="diag_merge_rank").set_value(8).run()
    assert any(c.value.startswith("This merge writes rank 8 per layer") for c in at.caption)
    at.button(key="diag_merge_button").click().run()
    assert_clean(at)
    with zipfile.ZipFile(io.BytesIO(at.session_state["diag_merged"]["zip"])) as zf:
        assert json.loads(zf.read("merged_ties_uploaded/adapter_config.json"))["r"] == 8
        card = zf.read("merged_ties_uploaded/README.md").decode()
    assert "| uploaded " in card and "osrm-upload" not in card  # the uploaded names, not server paths
    # Bad weights: one error line, the page keeps working.
    at.text_input(key="diag_merge_weights").set_value("1, x").run()
    at.button(key="diag_merge_button").click().run()
    assert_clean(at)
    assert any(e.startswith("weights '1, x': give numbers") for e in errors(at))


def test_diagnosis_adapter_table_shows_every_layer(small_run):
    at = _diagnosis_with_two_adapters(small_run)
    frames = [d.value for d in at.dataframe]
    per_layer = next(f for f in frames if "layer" in f.columns and "scale" in f.columns)
    assert len(per_layer) == 2 * 12 and set(per_layer["rank"]) == {4}
    assert at.file_uploader(key="diag_csv_sentiment").proto.max_upload_size_mb == 50


def test_diagnosis_bad_uploads_give_errors_and_the_page_keeps_working(small_run, make_tiny_model, tmp_path):
    from osrm_core.adapters import write_adapter
    from osrm_core.inits import init_lora
    from osrm_core.train import adapter_of

    # An adapter for another base model: the tiny BERT of the test suite (hidden size 32).
    other = adapter_of(init_lora(make_tiny_model(seed=0), "standard", rank=2, alpha=4))
    folder = write_adapter(tmp_path / "tiny", other.layers, other.config, head=other.head)
    tiny_zip = zip_directory(folder)
    loose_weights = (folder / "adapter_model.safetensors").read_bytes()

    at = make_app(timeout=120).run()
    at.switch_page("pages/5_Adapter_diagnosis.py").run()
    up = at.file_uploader(key="diag_files")
    up.upload("notes.txt", b"hello", "text/plain")
    up.upload("broken.zip", b"PK\x03\x04 broken", "application/zip")
    up.upload("tiny.zip", tiny_zip, "application/zip")
    up.upload("adapter_model.safetensors", loose_weights, "application/octet-stream")
    up.upload("sentiment.zip", adapter_zip(small_run, "standard", "sentiment"), "application/zip")
    at.run()
    assert_clean(at)
    messages = errors(at)
    assert any(m.startswith("notes.txt: not an adapter file") for m in messages), messages
    assert any(m.startswith("broken.zip:") and "zip" in m for m in messages), messages
    assert any(m.startswith("tiny.zip:") and "size mismatch" in m for m in messages), messages
    assert any("needs adapter_config.json" in m for m in messages), messages
    assert any("Upload two or more" in i.value for i in at.info)  # one good adapter is not enough
    # A second good adapter and the page goes on.
    up = at.file_uploader(key="diag_files")
    up.clear()
    up.upload("sentiment.zip", adapter_zip(small_run, "standard", "sentiment"), "application/zip")
    up.upload("topic.zip", adapter_zip(small_run, "standard", "topic"), "application/zip")
    at.run()
    assert_clean(at)
    assert not errors(at)
    at.file_uploader(key="diag_csv_topic").upload("bad.csv", b"\xff\xfe\x00bad", "text/csv")
    at.run()
    assert_clean(at)
    assert any(e.startswith("bad.csv:") for e in errors(at))


# --------------------------------------------------------------------------- a run from the home page


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:.*rank-deficient")
def test_new_run_from_the_home_page_with_an_uploaded_task(tmp_path, monkeypatch):
    monkeypatch.setenv("OSRM_RUNS_ROOT", str(tmp_path))
    at = make_app(timeout=300).run()
    at.multiselect(key="home_demo_tasks").set_value(["sentiment"])
    task = demo_task("topic", n_train=40, n_test=10)
    csv = pd.DataFrame(
        {"sentence": task.train.text, "category": [task.label_names[y] for y in task.train.label]}
    )
    at.file_uploader(key="home_task_files").upload(
        "my news.csv", csv.to_csv(index=False).encode(), "text/csv"
    )
    at.run()
    assert_clean(at)
    # The column mapping: text and label columns are chosen from the file's columns.
    at.selectbox(key="home_up_text_0").set_value("sentence")
    at.selectbox(key="home_up_label_0").set_value("category")
    at.number_input(key="home_rank").set_value(2)
    at.number_input(key="home_samples").set_value(8)
    at.number_input(key="home_steps").set_value(2)
    at.number_input(key="home_batch").set_value(4)
    at.number_input(key="home_max_length").set_value(16)
    at.number_input(key="home_max_test").set_value(10)
    at.multiselect(key="home_methods").set_value(["task_arithmetic"])
    at.text_input(key="home_lambdas").set_value("1.0")
    at.text_input(key="home_name").set_value("from-app")
    at.run()
    assert_clean(at)
    assert not errors(at), errors(at)
    at.button(key="home_run").click().run()
    assert_clean(at)
    assert not errors(at), errors(at)
    out = tmp_path / "from-app"
    assert at.session_state["run_path"] == str(out.resolve())
    # The sidebar names the run the page just opened, beside the message.
    assert any(s.value.startswith(f"Finished and opened {out}") for s in at.success), [s.value for s in at.success]
    assert any(m.value.startswith("✅ Finished from-app") for m in at.markdown)  # the progress box stays
    assert [c.value for c in at.sidebar.code] == [str(out.resolve())]
    assert "none" not in [c.value for c in at.sidebar.caption]
    summary = json.loads((out / "results" / "summary.json").read_text())
    assert summary["tasks"] == ["sentiment", "my_news"]
    config = (out / "config.yaml").read_text()
    assert str((out / "data" / "my_news").resolve()) in config
    saved = pd.read_csv(out / "data" / "my_news" / "train.csv")
    assert list(saved.columns) == ["text", "label"] and set(saved["label"]) == set(task.label_names)


def test_csv_without_a_text_column_gets_the_command_lines_error(tmp_path):
    """No silent first column: the library's message (what ``osrm`` prints) until one is chosen."""
    from osrm_core.data import DataError, load_task

    csv = pd.DataFrame({"sentence": ["good", "bad", "fine", "awful"], "category": ["p", "n", "p", "n"]})
    (tmp_path / "notext.csv").write_bytes(csv.to_csv(index=False).encode())
    with pytest.raises(DataError, match=r"column 'text' for text not found; columns are \['sentence', 'category'\]"):
        load_task("notext", tmp_path / "notext.csv", label="category")
    at = make_app().run()
    at.multiselect(key="home_demo_tasks").set_value(["sentiment"])
    at.file_uploader(key="home_task_files").upload("notext.csv", csv.to_csv(index=False).encode(), "text/csv")
    at.run()
    assert_clean(at)
    assert at.selectbox(key="home_up_text_0").value is None
    assert any(e.startswith("notext.csv: column 'text' for text not found; columns are ['sentence', 'category']")
               for e in errors(at)), errors(at)
    assert at.button(key="home_run").disabled
    at.selectbox(key="home_up_text_0").set_value("sentence").run()
    assert not any("for text not found" in e for e in errors(at)), errors(at)
    assert not at.button(key="home_run").disabled


def test_new_run_settings_errors_are_shown():
    at = make_app().run()
    at.text_input(key="home_lambdas").set_value("0.5, lots")
    at.run()
    assert_clean(at)
    assert any("lambda grid" in e for e in errors(at))
    assert at.button(key="home_run").disabled
    at.text_input(key="home_lambdas").set_value("0.5")
    at.multiselect(key="home_demo_tasks").set_value(["topic"])
    at.run()
    assert any("at least two tasks" in e for e in errors(at))


def test_presets_fill_the_settings():
    at = make_app().run()
    full, quick = demo_config(), demo_config(quick=True)
    assert full.train.steps != quick.train.steps
    at.button(key="home_preset_full").click().run()
    assert_clean(at)
    assert at.number_input(key="home_steps").value == full.train.steps
    assert at.multiselect(key="home_methods").value == full.merge.methods
    shown = yaml.safe_load(at.code[0].value)
    assert shown == {**full.model_dump(mode="json"), "name": shown["name"]}
    # The demo's per-init recipe is in its widgets: osrm_gen at rank 32 with A frozen, standard at the run's.
    assert at.number_input(key="home_per_osrm_gen_rank").value == 32
    assert at.selectbox(key="home_per_osrm_gen_constraint").value == "freeze_A"
    assert at.number_input(key="home_per_standard_rank").value is None
    at.button(key="home_preset_quick").click().run()
    assert at.number_input(key="home_steps").value == quick.train.steps
    ready = merge_ready_config()
    at.button(key="home_preset_merge_ready").click().run()
    assert_clean(at)
    assert at.multiselect(key="home_inits").value == ["osrm_gen"] and at.number_input(key="home_rank").value == 32
    assert at.selectbox(key="home_constraint").value == "freeze_A" and at.number_input(key="home_steps").value == 1000
    shown = yaml.safe_load(at.code[0].value)
    assert shown == {**ready.model_dump(mode="json"), "name": shown["name"]}


def test_per_init_settings_follow_the_selected_inits():
    at = make_app().run()
    at.number_input(key="home_per_standard_rank").set_value(4).run()
    at.number_input(key="home_per_standard_lr").set_value(1e-3).run()
    assert_clean(at)
    shown = yaml.safe_load(at.code[0].value)
    assert shown["per_init"] == {"standard": {"rank": 4, "alpha": None, "constraint": None, "lr": 1e-3,
                                              "a_lr_scale": None},
                                 "osrm_gen": {"rank": 32, "alpha": None, "constraint": "freeze_A", "lr": None,
                                              "a_lr_scale": None}}
    # An init taken out of the run takes its settings with it; they come back with it.
    at.multiselect(key="home_inits").set_value(["standard"]).run()
    assert_clean(at)
    assert list(yaml.safe_load(at.code[0].value)["per_init"]) == ["standard"]
    at.multiselect(key="home_inits").set_value(["standard", "osrm_gen"]).run()
    assert yaml.safe_load(at.code[0].value)["per_init"]["osrm_gen"]["rank"] == 32
    # A constraint that needs a subspace is refused for standard, naming the field.
    at.selectbox(key="home_per_standard_constraint").set_value("project").run()
    assert any("per_init.standard.constraint 'project'" in e for e in errors(at))
    assert at.button(key="home_run").disabled


# --------------------------------------------------------------------------- study page


def test_study_page_counts_the_librarys_variants_and_names_them_for_people(small_run):
    from app_helpers.study_view import study_plan
    from osrm_core.settings import RunConfig
    from osrm_core.study import quick_study_config, variant_name, variants

    config = RunConfig.from_yaml(small_run / "config.yaml")
    quick = quick_study_config(config)
    todo = variants(quick)
    at = make_app(small_run).run()
    at.switch_page("pages/7_Study.py").run()
    assert_clean(at)
    assert any(c.value.startswith(f"{len(todo)} variants, ") for c in at.caption), [c.value for c in at.caption]
    listed = next(m.value for m in at.markdown if m.value.startswith("- "))
    assert len(listed.splitlines()) == len(todo)
    names = [variant_name(v, quick.base.train.lr) for v in todo]
    assert not any(n in listed for n in names)  # no internal ids
    assert any(i.value.startswith("This run has no study yet") for i in at.info)
    # Progress messages get the same labels.
    arms, label = study_plan(quick)
    assert label(f"statistics 1/{len(todo)}: {names[-1]}") == f"statistics 1/{len(todo)}: {arms[-1]}"


def test_the_quick_study_of_a_demo_run_leaves_out_the_pair_task():
    from osrm_core.study import quick_study_config, variants

    study = quick_study_config(demo_config(quick=True))  # the app's: on the open run's config
    assert "paraphrase" not in [t.name for t in study.base.tasks]
    assert len(variants(study)) == 6


def test_progress_display_estimates_the_time_left():
    from app_helpers.widgets import duration, time_left

    assert time_left(60.0, 0.25) == pytest.approx(180.0)
    assert time_left(1.0, 0.5) is None and time_left(60.0, 0.01) is None  # too early to say
    assert time_left(60.0, 1.0) == 0.0
    assert [duration(s) for s in (42, 185, 3725)] == ["42 s", "3 min 05 s", "1 h 02 min"]


def test_progress_display_shows_stage_bar_and_time_left():
    def script():
        import streamlit as st

        from app_helpers.widgets import ProgressDisplay

        ticks = iter([0.0, 10.0, 60.0])  # start, stage 1, step 5 of 10
        display = ProgressDisplay("Running x", 2, clock=lambda: next(ticks))
        display.on_stage("train standard")
        display.progress(5, 10, "training")
        st.session_state["overall"] = display.overall()

    at = AppTest.from_function(script).run()
    assert_clean(at)
    assert [m.value for m in at.markdown] == ["**Running x**", "Stage 1 of 2: train standard"]
    assert at.session_state["overall"] == 0.25
    # 60 s for a quarter of the work: about 3 minutes left.
    assert [c.value for c in at.caption] == ["1 min 00 s so far · about 3 min 00 s left (rough)"]
    bar = at.get("progress")[0]
    assert bar.value == 50 and bar.proto.text == "training (5/10)"


def test_home_summary_notes_a_best_lambda_at_the_grids_edge(small_run):
    from osrm_core.rundir import RunDir
    from osrm_core.viz import edge_notes, summary_tables

    run = RunDir(small_run)
    _, best = summary_tables(json.loads((small_run / "results" / "summary.json").read_text()))
    grid = best[["init", "method"]].merge(pd.DataFrame({"lambda": run.config().merge.lambdas}), how="cross")
    expected = [f"Note: {n}" for n in edge_notes(grid, best)]
    at = make_app(small_run).run()
    assert_clean(at)
    assert [c.value for c in at.caption if c.value.startswith("Note: ")] == expected
    lams = run.config().merge.lambdas
    at_edge = best["lambda"].isin([min(lams), max(lams)]).sum() if len(lams) > 1 else 0
    assert len(expected) == at_edge
