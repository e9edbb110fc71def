"""Pages that only render: the Home settings form as one table (every setting a user can set maps
to a widget and back), the run folder's layout, stage count and comparison with standard in the
library (and ``osrm show``), the Adapter diagnosis page drawing the library's Diagnosis, and the
Study page reading ``findings.json`` (with a note for older study folders)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
from fixtures_run import small_run_fixture  # noqa: F401  (the small_run fixture)
from pydantic import BaseModel
from streamlit.testing.v1 import AppTest

from app_helpers import zip_directory
from app_helpers.home_form import FORM, NO_WIDGET, OTHER_PARAMS, PER_INIT, config_to_form, form_to_config
from osrm_core.rundir import RunDir, inits_vs_standard, stage_count
from osrm_core.settings import ConfigError, InitSettings, RunConfig, demo_config, merge_ready_config
from osrm_core.viz import summary_tables

ROOT = Path(__file__).resolve().parents[1]
#: Set apart from the form table: the run's name, model and tasks have their own widgets; per_init,
#: merge.params and init options are drawn from their registries.
OWN_WIDGETS = ("name", "model", "tasks", "per_init", "merge.params", "init_params")


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch, tmp_path):
    monkeypatch.delenv("OSRM_RUN_DIR", raising=False)
    monkeypatch.setenv("OSRM_RUNS_ROOT", str(tmp_path / "runs"))


def _leaves(model: type[BaseModel], prefix: str = "") -> list[str]:
    out = []
    for name, info in model.model_fields.items():
        kind = info.annotation
        if isinstance(kind, type) and issubclass(kind, BaseModel):
            out += _leaves(kind, f"{prefix}{name}.")
        else:
            out.append(prefix + name)
    return out


def _round_trip(config: RunConfig) -> RunConfig:
    form = config_to_form(config)
    return form_to_config(form, name=config.name, model=config.model, tasks=[t.model_dump() for t in config.tasks])


def test_every_setting_has_one_row_in_the_form_table() -> None:
    paths = [f.path for f in FORM]
    assert len(paths) == len(set(paths)) and len({f.key for f in FORM}) == len(FORM)
    for leaf in _leaves(RunConfig):
        assert leaf in paths or leaf in NO_WIDGET or leaf in OWN_WIDGETS, f"{leaf}: no widget and not in NO_WIDGET"
    assert set(PER_INIT) == set(InitSettings.model_fields)
    # Every merge parameter besides density has its sweep widget (the old five-column zip dropped a sixth).
    assert len(OTHER_PARAMS) >= 6
    assert {f"merge.params.{s.name}" for s in OTHER_PARAMS} <= set(paths)


@pytest.mark.parametrize("make", [lambda: demo_config(quick=True), demo_config, merge_ready_config])
def test_presets_go_into_the_form_and_back(make) -> None:
    config = make()
    assert _round_trip(config) == config


def test_every_widget_setting_changed_goes_into_the_form_and_back() -> None:
    config = demo_config(quick=True)
    data = config.model_dump(mode="json")
    changed = {"rank": 12, "alpha": 24.0, "samples": 33, "target_modules": ["query", "value"], "max_length": 40,
               "max_test": 77, "inits": ["standard", "osrm"], "osrm_weighting": "tokens", "seed": 5, "device": "auto",
               "init_params": {"osrm_gen": {"eps": 0.5}}, "per_init": {"osrm": {"rank": 16, "alpha": None, "constraint": "freeze_A",
                                                          "lr": None, "a_lr_scale": 2.0}}}
    data.update(changed)
    data["train"].update(steps=9, lr=1e-3, batch_size=4, head_lr=3e-3, constraint="none", penalty_beta=0.5,
                         b_density=0.3, calibration=0.2)
    data["merge"].update(methods=["ties", "regmean"], lambdas=[0.25, 2.0], densities=[0.3, 0.7],
                         params={s.name: [s.default] for s in OTHER_PARAMS})
    config = RunConfig.validate_dict(data)
    assert _round_trip(config) == config
    form = config_to_form(config)
    assert form["home_lambdas"] == "0.25, 2" and form["home_max_test"] == 77 and form["home_targets"] == "query, value"
    # Empty widgets mean "none" or "the default": all test examples, the LoRA learning rate for the head.
    form.update(home_max_test=0, home_head_lr=0.0, home_targets="", **{f"home_param_{s.name}": "" for s in OTHER_PARAMS})
    back = form_to_config(form, name="x", model=None, tasks=[t.model_dump() for t in config.tasks])
    assert back.max_test is None and back.train.head_lr is None and back.target_modules is None
    assert back.merge.params == {}


def test_bad_form_values_name_the_setting() -> None:
    form = config_to_form(demo_config(quick=True))
    tasks = [t.model_dump() for t in demo_config(quick=True).tasks]
    with pytest.raises(ConfigError, match=r"^lambda grid '0.5, lots': give numbers separated by commas \('lots'"):
        form_to_config({**form, "home_lambdas": "0.5, lots"}, name="x", model=None, tasks=tasks)
    with pytest.raises(ConfigError, match=r"^densities \(ties/dare\) '': give numbers"):
        form_to_config({**form, "home_densities": ""}, name="x", model=None, tasks=tasks)
    with pytest.raises(ConfigError, match=r"^settings: train.b_density: .*b_density must be in \(0, 1\]"):
        form_to_config({**form, "home_b_density": 0.0}, name="x", model=None, tasks=tasks)


def test_home_draws_every_merge_parameter_and_init_options() -> None:
    """A widget per merge parameter, and per option an init declares (``params``, ParamSpecs)."""
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=60).run()
    assert not at.exception
    for spec in OTHER_PARAMS:
        assert at.text_input(key=f"home_param_{spec.name}").label.startswith(f"Sweep {spec.name}")
    assert at.number_input(key="home_init_osrm_gen_eps").value == 0.01  # osrm_gen is in the quick preset
    at.multiselect(key="home_inits").set_value(["standard"]).run()
    assert not [w for w in at.number_input if w.key == "home_init_osrm_gen_eps"]


def test_run_layout_stage_count_and_comparison_with_standard(small_run, tmp_path, capsys) -> None:
    from osrm_core.cli import main
    from osrm_core.pipeline import run_experiment

    run = RunDir(small_run)
    assert run.task_data_path("mine") == small_run / "data" / "mine"
    copy = tmp_path / "small"
    shutil.copytree(small_run, copy)
    stages = []
    run_experiment(run.config(), copy, on_stage=stages.append)  # finished: it only reports its stages
    assert stage_count(run.config()) == len([s for s in stages if s != "done"]) == 6
    summary = run.summary()
    _, best = summary_tables(summary)
    versus = inits_vs_standard(best)
    assert list(versus.columns) == ["method", "osrm - standard (plain)", "osrm - standard (normalized)"]
    ta = best.set_index(["init", "method"]).loc[:, "avg_score"]
    row = versus.set_index("method").loc["task_arithmetic"]
    assert row["osrm - standard (plain)"] == pytest.approx(ta["osrm", "task_arithmetic"] - ta["standard", "task_arithmetic"])
    assert inits_vs_standard(best[best["init"] == "osrm"]).empty
    # osrm show prints it; the page shows the same table.
    assert main(["show", str(small_run)]) == 0
    out = capsys.readouterr().out
    assert "each init minus standard" in out and "osrm - standard (plain)" in out
    assert main(["show", str(small_run), "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)["inits_vs_standard"]
    assert [r["method"] for r in shown] == list(versus["method"])
    assert pd.DataFrame(shown).drop(columns="method").to_numpy() == pytest.approx(versus.drop(columns="method").to_numpy())
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=60)
    at.session_state["run_path"] = str(small_run)
    at.run()
    assert not at.exception
    shown = next(d.value for d in at.dataframe if "osrm - standard (plain)" in d.value.columns)
    pd.testing.assert_frame_equal(shown.reset_index(drop=True), versus, check_dtype=False)


def test_diagnosis_page_draws_the_librarys_diagnosis(small_run) -> None:
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=180).run()
    at.switch_page("pages/5_Adapter_diagnosis.py").run()
    up = at.file_uploader(key="diag_files")
    for task in ("sentiment", "topic"):
        up.upload(f"{task}.zip", zip_directory(small_run / "adapters" / "osrm" / task), "application/zip")
    at.run()
    at.button(key="diag_fill_demo").click().run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    diagnosis = at.session_state["diag_result"]["diagnosis"]
    assert "\n".join(diagnosis.notes()) in [m.value for m in at.markdown]
    verdicts = next(d.value for d in at.dataframe if "cross_shift" in d.value.columns)
    pd.testing.assert_frame_equal(verdicts.reset_index(drop=True), diagnosis.verdicts, check_dtype=False)
    # The advisor's lambda grid is read by settings.parse_values: a word is refused, naming it.
    at.text_input(key="diag_lambdas").set_value("0.5, x").run()
    at.button(key="diag_advise_button").click().run()
    assert not at.exception
    assert any(e.value.startswith("lambda grid '0.5, x': give numbers") for e in at.error)


def _study_folder(run: Path, findings: list[str] | None) -> Path:
    study = run / "studies" / "quick"
    (study / "tables").mkdir(parents=True)
    (study / "report.md").write_text("# Study\n\n## Findings\n- from the report\n\n## 1. Merged\n")
    (study / "tables" / "q1_merged.csv").write_text("init,method,mean\nstandard,task_arithmetic,0.9\n")
    if findings is not None:
        (study / "findings.json").write_text(json.dumps({"study": "quick", "findings": findings}))
    return study


@pytest.mark.parametrize("with_json", [True, False])
def test_study_page_reads_findings_json_and_old_folders_with_a_note(small_run, tmp_path, with_json) -> None:
    run = tmp_path / "small"
    shutil.copytree(small_run, run)
    _study_folder(run, ["osrm is better than standard (**one seed**)."] if with_json else None)
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=60)
    at.session_state["run_path"] = str(run)
    at.run()
    at.switch_page("pages/7_Study.py").run()
    assert not at.exception
    markdown = [m.value for m in at.markdown]
    note = any("read from report.md" in c.value for c in at.caption)
    if with_json:
        assert "- osrm is better than standard (**one seed**)." in markdown and not note
    else:
        assert "- from the report" in markdown and note


def test_write_report_writes_the_findings_it_shows(tmp_path, monkeypatch) -> None:
    from osrm_core import study_report
    from osrm_core.study import quick_study_config

    q1 = pd.DataFrame([{"init": i, "constraint": "none", "rank": 8, "lr": 1e-3, "method": "task_arithmetic",
                        "normalized_best_mean": n, "normalized_best_std": float("nan"), "merged_avg_mean": m,
                        "merged_avg_std": float("nan"), "best_lambda": 0.5, "auc_mean": n, "width_2pt": 0.1,
                        "seeds": 1} for i, n, m in (("standard", 0.8, 0.6), ("osrm", 0.9, 0.62))])
    q2 = pd.DataFrame([{"init": i, "constraint": "none", "rank": 8, "lr": 1e-3, "task": "a", "mean": 0.9, "std": 0.0}
                       for i in ("standard", "osrm")])
    curves = pd.DataFrame([{"group": "main", "method": "task_arithmetic", "init": i, "constraint": "none", "rank": 8,
                            "lr": 1e-3, "lambda": lam, "normalized_avg": 0.8} for i in ("standard", "osrm")
                           for lam in (0.5, 1.0)])
    empty = pd.DataFrame()
    tables = {"q1_merged": q1, "q2_single": q2, "q4_samples": empty, "q5_rank": empty, "q7_a_lr_scale": empty,
              "curves": curves}
    monkeypatch.setattr(study_report, "_collect", lambda study, out: {})
    monkeypatch.setattr(study_report, "analyse", lambda frames: tables)
    study_report.write_report(quick_study_config(), tmp_path)
    found, from_json = study_report.read_findings(tmp_path)
    assert from_json and found == [line.removeprefix("- ") for line in study_report.findings(tables)]
    assert any(line.startswith("osrm, task_arithmetic: best normalized average 0.900 vs standard 0.800") for line in found)
    report = (tmp_path / "report.md").read_text()
    assert all(f"- {line}" in report for line in found)
    (tmp_path / "findings.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="findings.json: expected an object with a list 'findings'"):
        study_report.read_findings(tmp_path)
